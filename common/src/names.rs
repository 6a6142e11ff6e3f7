//! Names of programs, maps and load-time globals, shared so that the agent's
//! `program_mut("…")`/`map_mut("…")` cannot drift from the BPF side. Kernel
//! object names are at most 15 bytes, so every name here fits in 15.

/// XDP program on the underlay interface: VXLAN decapsulation.
pub const PROG_XDP_DECAP: &str = "weft_xdp_decap";
/// TC ingress program on each pod's host-side veth: traffic *from* the pod.
pub const PROG_FROM_POD: &str = "weft_from_pod";
/// TC egress program on each pod's host-side veth: traffic the node's stack
/// delivers *to* the pod (it notes the flow, so replies return the same way).
pub const PROG_TO_POD: &str = "weft_to_pod";
/// TC egress program on the `weft0` host device: traffic from the node itself
/// to remote pods.
pub const PROG_FROM_HOST: &str = "weft_from_host";
/// TC ingress program on the underlay interface: delivers decapsulated
/// frames into local pods (the `tc` decap delivery mode).
pub const PROG_FROM_UNDERLAY: &str = "weft_from_und";

/// LPM trie: remote pod CIDR → [`crate::RemoteNode`].
pub const REMOTE_CIDRS: &str = "WEFT_REMOTES";
/// Hash: local pod IPv4 → [`crate::Endpoint`].
pub const ENDPOINTS: &str = "WEFT_ENDPOINTS";
/// LPM trie: remote IPv6 pod CIDR → [`crate::RemoteNode`].
pub const REMOTE_CIDRS6: &str = "WEFT_REMOTES6";
/// Hash: local pod IPv6 → [`crate::Endpoint`].
pub const ENDPOINTS6: &str = "WEFT_ENDPOINTS6";
/// Hash: peer underlay IPv4 → [`crate::Vtep`]; VXLAN from anyone else is dropped.
pub const NODES: &str = "WEFT_NODES";
/// Hash: peer underlay IPv6 → [`crate::Vtep`]: the IPv6 twin of [`NODES`].
pub const NODES6: &str = "WEFT_NODES6";
/// LRU hash: [`crate::FlowKey`] of a reply → [`crate::FlowState`]. Replies
/// of flows the node's stack forwarded (and so may have NATed: kube-proxy
/// Services, hostPorts) take the stack back instead of a fast path.
pub const STACK_FLOWS: &str = "WEFT_STACKFLOWS";
/// LRU hash: [`crate::FlowKey6`] of an IPv6 reply → [`crate::FlowState`].
pub const STACK_FLOWS6: &str = "WEFT_STACKFLOWS6";
/// LRU hash: peer underlay IPv4 → [`crate::NextHop`]: the outer Ethernet
/// header and device of the last FIB lookup for it, valid while its
/// generation is [`NEXTHOP_GEN`]'s.
pub const NEXTHOPS: &str = "WEFT_NEXTHOPS";
/// Array of one `u32`: the generation of [`NEXTHOPS`], which the agent
/// moves on at every neighbour, route, address or link change.
pub const NEXTHOP_GEN: &str = "WEFT_NEXTHOP_GN";
/// Per-CPU array of drop counters indexed by [`crate::DropReason`].
pub const DROP_STATS: &str = "WEFT_DROPS";
/// Per-CPU array of forward counters indexed by [`crate::FwdReason`].
pub const FWD_STATS: &str = "WEFT_FWDS";

/// Load-time global: VNI (host order, 24 significant bits).
pub const GLOBAL_VNI: &str = "WEFT_VNI";
/// Load-time global: VXLAN UDP destination port (host order).
pub const GLOBAL_VXLAN_PORT: &str = "WEFT_VXLAN_PORT";
/// Load-time global: this node's underlay IPv4 (network order).
pub const GLOBAL_LOCAL_IP: &str = "WEFT_LOCAL_IP";
/// Load-time global: ifindex of the underlay interface (host order).
pub const GLOBAL_UNDERLAY_IFINDEX: &str = "WEFT_UNDERLAY_IFINDEX";
/// Load-time global: this node's VTEP MAC (inner Ethernet source on encap).
pub const GLOBAL_VTEP_MAC: &str = "WEFT_VTEP_MAC";
/// Load-time global: the MAC of the underlay interface (Ethernet destination of
/// decapsulated frames handed to the stack).
pub const GLOBAL_UNDERLAY_MAC: &str = "WEFT_UNDERLAY_MAC";
/// Load-time global: cluster CIDR network address (network order) and prefix
/// length; traffic outside it is never touched.
pub const GLOBAL_CLUSTER_NET: &str = "WEFT_CLUSTER_NET";
/// Load-time global: cluster CIDR netmask (network order).
pub const GLOBAL_CLUSTER_MASK: &str = "WEFT_CLUSTER_MASK";
/// Load-time global: 1 when TC decap may retype IPv6 with
/// `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (Linux 6.3+), else 0.
pub const GLOBAL_DECAP_RETYPE: &str = "WEFT_DECAP_RETYPE";
/// Load-time global: IPv6 cluster CIDR network address (bytes as on the wire).
pub const GLOBAL_CLUSTER6_NET: &str = "WEFT_CLUSTER6_NET";
/// Load-time global: IPv6 cluster CIDR mask (bytes as on the wire).
pub const GLOBAL_CLUSTER6_MASK: &str = "WEFT_CLUSTER6_MASK";
/// Load-time global: this node's underlay IPv6 address (bytes as on the
/// wire; all zero: no IPv6 underlay, nothing VXLAN over IPv6 is taken).
pub const GLOBAL_LOCAL_IP6: &str = "WEFT_LOCAL_IP6";
/// Load-time global: ifindex of the VXLAN device that sends over the IPv6
/// underlay (host order; 0: none).
pub const GLOBAL_TUNNEL6_IFINDEX: &str = "WEFT_TUNNEL6_IF";
/// Load-time global: the pods' MTU on this node (host order; 0: unchecked).
pub const GLOBAL_POD_MTU: &str = "WEFT_POD_MTU";
