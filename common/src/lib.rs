//! Types shared by the BPF programs (`dataplane-ebpf`) and the agent.
//!
//! Every map key and value here is `#[repr(C)]`, `Copy`, and has no implicit
//! padding, so the kernel and user space agree on its bytes. Each field says
//! its byte order: **network order** fields hold the bytes exactly as they
//! appear on the wire (an IPv4 address `a.b.c.d` is stored as the `u32` whose
//! in-memory bytes are `[a, b, c, d]`, i.e. `u32::from_ne_bytes(ip.octets())`);
//! **host order** fields are plain numbers.
#![no_std]

pub mod names;
pub mod stats;

pub use stats::{DropReason, FwdReason};

/// Key of [`names::REMOTE_CIDRS`], an LPM trie of remote pod CIDRs.
///
/// aya's `LpmTrie` key wraps this with the prefix length, so the key is just
/// the address: `[u8; 4]`, network order.
pub type Ipv4Key = [u8; 4];

/// Key of [`names::REMOTE_CIDRS6`] (inside aya's `LpmTrie` key) and of
/// [`names::ENDPOINTS6`]: an IPv6 address, bytes as on the wire.
pub type Ipv6Key = [u8; 16];

/// Value of [`names::REMOTE_CIDRS`] and [`names::REMOTE_CIDRS6`]: where a remote pod CIDR lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RemoteNode {
    /// The remote node's underlay IPv4 address, network order.
    pub underlay_ip: u32,
    /// The remote node's VTEP MAC: the inner Ethernet destination, like the
    /// neighbour entry flannel installs on `flannel.1` (with
    /// [`RemoteNode::FLAG_UNDERLAY6`], its IPv6 VTEP's, as on `flannel-v6.1`).
    pub vtep_mac: [u8; 6],
    /// [`RemoteNode::FLAG_UNDERLAY6`], [`RemoteNode::FLAG_OWN`] (host order).
    pub flags: u16,
    /// With [`RemoteNode::FLAG_UNDERLAY6`]: the remote node's underlay IPv6
    /// address, bytes as on the wire; else all zero.
    pub underlay_ip6: [u8; 16],
}

impl RemoteNode {
    /// The CIDR's VXLAN goes over the IPv6 underlay, to `underlay_ip6`
    /// (IPv6 pods between two nodes that both have an IPv6 underlay
    /// address, as flannel's `flannel-v6.1`).
    pub const FLAG_UNDERLAY6: u16 = 1;
    /// The CIDR is this node's own (also told by `underlay_ip` being the
    /// node's IPv4 address, but an IPv6-only node has none).
    pub const FLAG_OWN: u16 = 2;

    /// Whether [`RemoteNode::FLAG_UNDERLAY6`] is set.
    #[inline(always)]
    pub fn over_underlay6(&self) -> bool {
        self.flags & Self::FLAG_UNDERLAY6 != 0
    }
}

/// Value of [`names::ENDPOINTS`] (keyed by the pod's IPv4 address, network
/// order): a pod on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// ifindex of the host-side veth of the pod (host order).
    pub ifindex: u32,
    /// MAC of the pod's interface (inside the pod): the Ethernet destination
    /// for frames delivered to it.
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth: the Ethernet source for frames delivered to
    /// the pod (the pod's gateway MAC).
    pub host_mac: [u8; 6],
    /// [`Endpoint::FLAG_XDP_REDIRECT`] etc. (host order).
    pub flags: u32,
}

impl Endpoint {
    /// The pod-side veth has NAPI (GRO on), so XDP may redirect into the
    /// host-side veth: drivers/net/veth.c drops `ndo_xdp_xmit` frames when the
    /// receiving peer has no NAPI.
    pub const FLAG_XDP_REDIRECT: u32 = 1;
    /// A qdisc other than weft's shapes the pod's host-side veth (the
    /// `bandwidth` CNI plugin's token bucket and ingress filter, or an
    /// operator's): the pod's traffic takes the node's stack both ways, so
    /// that the qdisc and the tc filters after weft's program see it. The
    /// fast paths (`bpf_redirect_peer`, XDP redirect, the redirect into the
    /// underlay) would bypass them.
    pub const FLAG_SHAPED: u32 = 2;

    /// Whether [`Endpoint::FLAG_SHAPED`] is set.
    #[inline(always)]
    pub fn shaped(&self) -> bool {
        self.flags & Self::FLAG_SHAPED != 0
    }
}

/// Value of [`names::NODES`] (keyed by underlay IPv4 address, network order)
/// and [`names::NODES6`] (keyed by underlay IPv6 address): a peer VTEP we
/// accept VXLAN from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Vtep {
    /// Reserved flags; always zero for now.
    pub flags: u32,
}

/// Value of [`names::NEXTHOPS`] (keyed by a peer's underlay IPv4 address,
/// network order): what `bpf_fib_lookup` answered for it, kept so that
/// the next packets to that peer skip the lookup. Written by the BPF
/// programs only; the agent invalidates every entry at once by moving the
/// generation in [`names::NEXTHOP_GEN`] on (rtnetlink told it that a
/// neighbour, route, address or link changed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// The generation the lookup was made in: the entry is used only while
    /// [`names::NEXTHOP_GEN`] still holds it.
    pub generation: u32,
    /// The device the FIB chose (host order).
    pub ifindex: u32,
    /// Outer Ethernet destination: the next hop's MAC.
    pub dmac: [u8; 6],
    /// Outer Ethernet source: the device's MAC.
    pub smac: [u8; 6],
    /// The longest outer IPv4 packet (not GSO) the FIB passed with this
    /// next hop: a longer one is looked up again, which checks it against
    /// the route's MTU. GSO packets are segmented to fit later.
    pub max_len: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
    /// When the entry was written (`bpf_ktime_get_coarse_ns`): it expires
    /// after [`NextHop::TTL_NS`] even without a change of generation (a
    /// change made while no agent was running to see it).
    pub written_ns: u64,
}

impl NextHop {
    /// How long an entry is used at most.
    pub const TTL_NS: u64 = 10_000_000_000;
}

/// Key of [`names::STACK_FLOWS`]: one direction of a TCP, UDP or SCTP flow,
/// exactly as its packets carry it. All fields network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct FlowKey {
    /// IPv4 source.
    pub saddr: u32,
    /// IPv4 destination.
    pub daddr: u32,
    /// Source port, bytes as on the wire.
    pub sport: [u8; 2],
    /// Destination port, bytes as on the wire.
    pub dport: [u8; 2],
    /// IP protocol number (6, 17 or 132).
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The other direction of the same flow.
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Key of [`names::STACK_FLOWS6`]: [`FlowKey`] for IPv6. All fields network
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct FlowKey6 {
    /// IPv6 source.
    pub saddr: [u8; 16],
    /// IPv6 destination.
    pub daddr: [u8; 16],
    /// Source port, bytes as on the wire.
    pub sport: [u8; 2],
    /// Destination port, bytes as on the wire.
    pub dport: [u8; 2],
    /// Next header: the L4 protocol (6, 17 or 132).
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
}

impl FlowKey6 {
    /// The other direction of the same flow.
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of [`names::STACK_FLOWS`] and [`names::STACK_FLOWS6`]: until when
/// the entry holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC, ns, host order) after which the
    /// entry is stale and ignored.
    pub expires_ns: u64,
    /// [`FlowState::CLOSING`] (host order).
    pub flags: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

impl FlowState {
    /// A TCP FIN or RST was seen: the entry lives out a TIME_WAIT, no longer.
    pub const CLOSING: u32 = 1;
}

/// VXLAN header length (RFC 7348).
pub const VXLAN_HLEN: usize = 8;
/// Bytes VXLAN over IPv4 adds in front of the inner frame: outer Ethernet is
/// replaced, so the growth is IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_ENCAP_LEN: usize = 20 + 8 + VXLAN_HLEN + 14;
/// The default pod MTU is the underlay MTU minus this (as flannel's vxlan backend).
pub const VXLAN_OVERHEAD: u32 = VXLAN_ENCAP_LEN as u32;
/// The same over an IPv6 underlay: the outer IPv6 header is 40 bytes, so 70
/// (flannel's `flannel-v6.1` MTU is the underlay's minus 70).
pub const VXLAN6_OVERHEAD: u32 = VXLAN_OVERHEAD + 20;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and
    // byte arrays, and have no implicit padding (checked by the size asserts).
    unsafe impl aya::Pod for super::RemoteNode {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Vtep {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::FlowState {}
}

const _: () = assert!(core::mem::size_of::<RemoteNode>() == 28);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<Vtep>() == 4);
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);
const _: () = assert!(core::mem::size_of::<FlowState>() == 16);
