//! Counters: why the dataplane dropped a packet, and what it forwarded.

macro_rules! counter_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal,)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every variant, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// Number of variants: the size of the per-CPU array.
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable, snake_case name (used in `weft status` and metrics).
            pub const fn name(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }

            /// Index into the per-CPU array of the IPv4 counters; the IPv6
            /// ones follow them ([`Self::slot`]).
            pub const fn index(self) -> u32 {
                self as u32
            }

            /// Slots in the per-CPU array: each reason once per family.
            pub const SLOTS: u32 = Self::COUNT * 2;

            /// The slot of this reason for a packet of the family: IPv4
            /// (and frames of neither family) first, then IPv6.
            #[inline(always)]
            pub const fn slot(self, v6: bool) -> u32 {
                self as u32 + if v6 { Self::COUNT } else { 0 }
            }
        }
    };
}

counter_enum! {
    /// Why a packet was dropped. Every `XDP_DROP` / `TC_ACT_SHOT` counts one.
    DropReason {
        /// Headers shorter than they claim, or a bad IPv4 header length.
        Malformed = 0 => "malformed",
        /// VXLAN from an underlay address that is not a known node.
        UnknownVtep = 1 => "unknown_vtep",
        /// VXLAN with a VNI other than ours, or without the I flag.
        WrongVni = 2 => "wrong_vni",
        /// The inner destination is in the cluster CIDR but no node or pod owns it.
        NoRoute = 3 => "no_route",
        /// Packet would exceed the underlay MTU after encapsulation and DF is set.
        Mtu = 4 => "mtu",
        /// A kernel helper failed (adjust_room, store_bytes, redirect).
        HelperFailed = 5 => "helper_failed",
        /// The underlay FIB has no route to the remote node.
        FibLookupFailed = 6 => "fib_lookup_failed",
        /// Inner frame is neither IPv4 nor IPv6.
        InnerNotIp = 7 => "inner_not_ip",
        /// IPv4 from a pod whose source address is not that pod's own (another
        /// pod's, or none weft assigned): spoofed, as Cilium's source IP check.
        SpoofedSource = 8 => "spoofed_source",
        /// VXLAN whose inner destination is neither a pod on this node nor in
        /// this node's pod CIDR: nothing a node should forward for others.
        NotLocal = 9 => "not_local",
        /// VXLAN over the IPv6 underlay carrying IPv4: weft (as flannel)
        /// carries IPv4 pods over the IPv4 underlay only.
        InnerFamily = 10 => "inner_family",
    }
}

counter_enum! {
    /// What the dataplane did with packets it handled.
    FwdReason {
        /// Encapsulated and sent to a remote node.
        Encap = 0 => "encap",
        /// Decapsulated and redirected into a local pod (XDP redirect).
        DecapRedirect = 1 => "decap_redirect",
        /// Decapsulated and passed to the stack (the node itself, or a pod
        /// that cannot take XDP redirects).
        DecapPass = 2 => "decap_pass",
        /// Pod to pod on this node, short-cut with `bpf_redirect_peer`.
        Local = 3 => "local",
        /// Not ours (non-IPv4, outside the cluster CIDR, not VXLAN): untouched.
        Passthrough = 4 => "passthrough",
        /// Encapsulated but the underlay neighbour was unresolved: sent with
        /// `bpf_redirect_neigh`.
        EncapNeigh = 5 => "encap_neigh",
        /// Decapsulated in the underlay's TC program (`tc` decap mode) and
        /// delivered into the pod with `bpf_redirect_peer`.
        DecapPeer = 6 => "decap_peer",
        /// Handed to the node's stack instead of a fast path: a reply of a
        /// flow the stack forwarded (which may be NATed: kube-proxy Services,
        /// hostPorts), an IPv4 fragment, or an ICMP error.
        ToStack = 7 => "to_stack",
    }
}
