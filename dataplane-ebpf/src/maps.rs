//! Maps, per-CPU counters and load-time globals.
//!
//! Globals are per-node constants the agent writes at load time
//! (`EbpfLoader::set_global`); reading them through `read_volatile` stops
//! LLVM from folding in the placeholder values below.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use weft_common::{DropReason, Endpoint, FwdReason, Ipv4Key, Ipv6Key, NextHop, RemoteNode, Vtep};

use crate::parse::ipv6_halves;

/// Remote pod CIDR → the node that owns it. An entry whose `underlay_ip` is
/// our own address marks this node's pod CIDR (handed to the stack).
#[map]
static WEFT_REMOTES: LpmTrie<Ipv4Key, RemoteNode> = LpmTrie::pinned(65536, 0);

/// Local pod IPv4 (network order) → its veth and MACs.
#[map]
static WEFT_ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(16384, 0);

/// Remote IPv6 pod CIDR → the node that owns it (the IPv4 map's twin; the
/// tunnel is the same whatever the inner family).
#[map]
static WEFT_REMOTES6: LpmTrie<Ipv6Key, RemoteNode> = LpmTrie::pinned(65536, 0);

/// Local pod IPv6 (bytes as on the wire) → its veth and MACs.
#[map]
static WEFT_ENDPOINTS6: HashMap<Ipv6Key, Endpoint> = HashMap::pinned(16384, 0);

/// Underlay IPv4 (network order) of every node we accept VXLAN from.
#[map]
static WEFT_NODES: HashMap<u32, Vtep> = HashMap::pinned(65536, 0);

/// Underlay IPv6 address of every node we accept VXLAN over IPv6 from.
#[map]
static WEFT_NODES6: HashMap<Ipv6Key, Vtep> = HashMap::pinned(65536, 0);

/// Peer underlay IPv4 (network order) → its next hop as the FIB last
/// answered (encap.rs). Only the programs write it.
#[map]
static WEFT_NEXTHOPS: LruHashMap<u32, NextHop> = LruHashMap::pinned(65536, 0);

/// The generation [`WEFT_NEXTHOPS`]' entries must carry to be used: the
/// agent moves it on at every neighbour, route, address or link change.
#[map]
static WEFT_NEXTHOP_GN: Array<u32> = Array::pinned(1, 0);

/// Drops per [`DropReason`] and family ([`DropReason::slot`]), per CPU.
#[map]
static WEFT_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::SLOTS, 0);

/// Forwarding decisions per [`FwdReason`] and family, per CPU.
#[map]
static WEFT_FWDS: PerCpuArray<u64> = PerCpuArray::pinned(FwdReason::SLOTS, 0);

#[inline(always)]
pub fn remote(dst: [u8; 4]) -> Option<&'static RemoteNode> {
    WEFT_REMOTES.get(aya_ebpf::maps::lpm_trie::Key::new(32, dst))
}

/// Whether a remotes-map entry is this node's own pod CIDR rather than
/// another node's: flagged so, or (an entry an earlier agent wrote)
/// carrying this node's IPv4 underlay address. An IPv6-only node has none:
/// its peers' entries carry 0.0.0.0 too.
#[inline(always)]
pub fn is_own(r: &RemoteNode) -> bool {
    r.flags & RemoteNode::FLAG_OWN != 0
        || (r.underlay_ip != 0 && r.underlay_ip.to_ne_bytes() == local_ip())
}

/// Whether `ip` lies in this node's own pod CIDR.
#[inline(always)]
pub fn in_local_cidr(ip: [u8; 4]) -> bool {
    remote(ip).is_some_and(is_own)
}

#[inline(always)]
pub fn endpoint(ip: u32) -> Option<Endpoint> {
    // SAFETY: entries are plain data copied out at once; a concurrent update
    // can at worst hand us the old or the new value of one field set.
    unsafe { WEFT_ENDPOINTS.get(ip).copied() }
}

/// The IPv6 twin of [`remote`].
#[inline(always)]
pub fn remote6(dst: &Ipv6Key) -> Option<&'static RemoteNode> {
    WEFT_REMOTES6.get(aya_ebpf::maps::lpm_trie::Key::new(128, *dst))
}

/// Whether `ip` lies in this node's own IPv6 pod CIDR.
#[inline(always)]
pub fn in_local_cidr6(ip: &Ipv6Key) -> bool {
    remote6(ip).is_some_and(is_own)
}

/// The IPv6 twin of [`endpoint`].
#[inline(always)]
pub fn endpoint6(ip: &Ipv6Key) -> Option<Endpoint> {
    // SAFETY: as in `endpoint`.
    unsafe { WEFT_ENDPOINTS6.get(ip).copied() }
}

#[inline(always)]
pub fn is_known_vtep(ip: u32) -> bool {
    WEFT_NODES.get_ptr(ip).is_some()
}

/// [`is_known_vtep`] for an IPv6 underlay address.
#[inline(always)]
pub fn is_known_vtep6(ip: &Ipv6Key) -> bool {
    WEFT_NODES6.get_ptr(ip).is_some()
}

/// The cached next hop of the peer at underlay IPv4 `ip`, if any (fresh
/// or not: see encap.rs).
#[inline(always)]
pub fn next_hop(ip: u32) -> Option<*mut NextHop> {
    WEFT_NEXTHOPS.get_ptr_mut(ip)
}

/// Caches `hop` for the peer at underlay IPv4 `ip` (best effort).
#[inline(always)]
pub fn put_next_hop(ip: u32, hop: &NextHop) {
    let _ = WEFT_NEXTHOPS.insert(ip, *hop, 0);
}

/// The current generation of the next-hop cache.
#[inline(always)]
pub fn next_hop_generation() -> u32 {
    match WEFT_NEXTHOP_GN.get_ptr(0) {
        // SAFETY: index 0 of a one-entry array; a u32 read is atomic.
        Some(g) => unsafe { core::ptr::read_volatile(g) },
        None => 0,
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// Counts one dropped packet under `reason`, IPv6 (`v6`) or not.
#[inline(always)]
pub fn count_drop(reason: DropReason, v6: bool) {
    bump(&WEFT_DROPS, reason.slot(v6));
}

/// Counts one forwarded packet under `reason`, IPv6 (`v6`) or not: the
/// pod's packet (the inner one of VXLAN), frames of neither family as IPv4.
#[inline(always)]
pub fn count_fwd(reason: FwdReason, v6: bool) {
    bump(&WEFT_FWDS, reason.slot(v6));
}

/// A bit of skb->mark that the TC decap sets on a frame it sends through a
/// pod's host-side veth ingress (its fallback before Linux 6.3, decap.rs)
/// and that `weft_from_pod` clears there at once, sending the frame on into
/// the pod. Never seen by netfilter: the frame goes from TC to TC.
pub const DECAP_DELIVERY_MARK: u32 = 0x0800_0000;

macro_rules! global {
    ($(#[$m:meta])* $name:ident: $ty:ty = $default:expr, $getter:ident) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        static $name: $ty = $default;

        #[inline(always)]
        pub fn $getter() -> $ty {
            // SAFETY: reading a static; volatile so the loader's value is used.
            unsafe { core::ptr::read_volatile(&$name) }
        }
    };
}

global!(
    /// VNI, host order.
    WEFT_VNI: u32 = 1, vni
);
global!(
    /// VXLAN UDP port, host order.
    WEFT_VXLAN_PORT: u16 = 8472, vxlan_port
);
global!(
    /// This node's underlay IPv4, network order (bytes as on the wire).
    WEFT_LOCAL_IP: [u8; 4] = [0; 4], local_ip
);
global!(
    /// Underlay interface index.
    WEFT_UNDERLAY_IFINDEX: u32 = 0, underlay_ifindex
);
global!(
    /// This node's VTEP MAC: inner Ethernet source on encap.
    WEFT_VTEP_MAC: [u8; 6] = [0; 6], vtep_mac
);
global!(
    /// Underlay interface MAC: destination of decapsulated frames passed to the stack.
    WEFT_UNDERLAY_MAC: [u8; 6] = [0; 6], underlay_mac
);
global!(
    /// Cluster CIDR network address, network order.
    WEFT_CLUSTER_NET: [u8; 4] = [0; 4], cluster_net
);
global!(
    /// Cluster CIDR netmask, network order.
    WEFT_CLUSTER_MASK: [u8; 4] = [0xff; 4], cluster_mask
);

global!(
    /// IPv6 cluster CIDR network address, bytes as on the wire (all zero
    /// with the all-ones mask below: no IPv6 cluster, nothing matches but ::).
    WEFT_CLUSTER6_NET: [u8; 16] = [0; 16], cluster6_net
);
global!(
    /// IPv6 cluster CIDR mask, bytes as on the wire.
    WEFT_CLUSTER6_MASK: [u8; 16] = [0xff; 16], cluster6_mask
);

global!(
    /// This node's underlay IPv6 address, bytes as on the wire (all zero:
    /// none; VXLAN over IPv6 is then never taken).
    WEFT_LOCAL_IP6: [u8; 16] = [0; 16], local_ip6
);
global!(
    /// The VXLAN device that sends over the IPv6 underlay (0: none).
    WEFT_TUNNEL6_IF: u32 = 0, tunnel6_ifindex
);

global!(
    /// The pods' MTU on this node (0: not checked): larger IPv6 packets
    /// from a pod take the stack, which answers with packet too big.
    WEFT_POD_MTU: u32 = 0, pod_mtu
);

global!(
    /// How TC decap retypes a stripped IPv6 frame (decap.rs): one of the
    /// `RETYPE_*` below, which the agent picks from the kernel version.
    WEFT_DECAP_RETYPE: u8 = RETYPE_FLAG, decap_retype
);

/// `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (Linux 6.3+). (1, any other value: through
/// the pod veth's ingress, then `bpf_redirect_peer`, as on 6.1.)
pub const RETYPE_FLAG: u8 = 2;
/// Through the pod veth's egress, the pod's replies through the stack
/// (5.15, where the ingress way delivers nothing).
pub const RETYPE_VIA_EGRESS: u8 = 0;

/// Whether `ip` lies in the IPv6 cluster CIDR.
#[inline(always)]
pub fn in_cluster6(ip: &Ipv6Key) -> bool {
    let (net_hi, net_lo) = ipv6_halves(&cluster6_net());
    let (mask_hi, mask_lo) = ipv6_halves(&cluster6_mask());
    let (hi, lo) = ipv6_halves(ip);
    hi & mask_hi == net_hi && lo & mask_lo == net_lo
}

/// Whether `ip` lies in the cluster CIDR.
#[inline(always)]
pub fn in_cluster(ip: [u8; 4]) -> bool {
    let net = u32::from_ne_bytes(cluster_net());
    let mask = u32::from_ne_bytes(cluster_mask());
    u32::from_ne_bytes(ip) & mask == net
}
