//! Flows the node's stack forwarded: their replies take the stack back.
//!
//! weft's fast paths (`bpf_redirect_peer` into a pod, encapsulation straight
//! from a pod's veth) go around the node's netfilter. That is right for pod
//! to pod traffic, and wrong for a flow the stack forwarded, because the
//! stack may have NATed it: kube-proxy turns a Service address into a backend
//! pod (DNAT in PREROUTING or OUTPUT), portmap does the same for hostPorts,
//! and only conntrack can turn the backend's reply back into the address the
//! client spoke to. A reply that skips it reaches the client from an address
//! the client never used, and is dropped there.
//!
//! What the stack forwards to a pod leaves it through one of two places:
//! `weft0` (remote pods, via the cluster route) or the local pod's host-side
//! veth (its /32 route). Their egress programs, `weft_from_host` and
//! `weft_to_pod`, record the reply's tuple ([`record_reply`]).
//! `weft_from_pod` and the decapsulation ask [`must_take_stack`] before a
//! fast path; a recorded reply, an IPv4 fragment (the stack reassembles for
//! NAT) or an ICMP error (whose quoted header NAT rewrites) goes up the stack
//! instead. Pod to pod flows take the fast paths both ways and pass neither
//! place, so they are never recorded.
//!
//! Entries expire as conntrack's would: five days after the last packet of a
//! TCP or SCTP flow, two minutes (a TIME_WAIT) after the last packet once a
//! TCP FIN or RST was seen, three minutes after the last UDP packet. The map
//! is an LRU: under more live stack-forwarded flows than it holds, the oldest
//! are evicted, and their replies would take the fast path un-NATed (sized
//! well above a node's usual Service flows).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use weft_common::{FlowKey, FlowKey6, FlowState};

use crate::parse::{
    ptr_at, Ipv4Hdr, Ipv6Hdr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IPV6_HLEN, NEXTHDR_FRAGMENT,
};

/// Reply tuple → until when it takes the stack.
#[map]
static WEFT_STACKFLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(131072, 0);

/// The same for IPv6 flows.
#[map]
static WEFT_STACKFLOWS6: LruHashMap<FlowKey6, FlowState> = LruHashMap::pinned(65536, 0);

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offset of the data-offset and flags bytes in a TCP header. (Reads here
/// are at least two bytes wide: for a one-byte read LLVM turns the bounds
/// check into `end > ptr`, from which the verifier learns no range.)
const TCP_OFF_FLAGS: usize = 12;
/// Bytes of the L4 header [`must_take_stack`] and [`record_reply`] read: the
/// ports, and for TCP the flags.
pub const L4_PEEK: usize = TCP_OFF_FLAGS + 2;

const SEC: u64 = 1_000_000_000;
/// conntrack's `nf_conntrack_tcp_timeout_established` (also SCTP's).
const ESTABLISHED_NS: u64 = 5 * 24 * 3600 * SEC;
/// conntrack's `nf_conntrack_tcp_timeout_time_wait`.
const TIME_WAIT_NS: u64 = 120 * SEC;
/// Above conntrack's `nf_conntrack_udp_timeout_stream` (120 s).
const UDP_NS: u64 = 180 * SEC;

/// A flow tuple of either family: its key the other way round.
trait Tuple: Copy {
    fn reversed(&self) -> Self;
}

impl Tuple for FlowKey {
    #[inline(always)]
    fn reversed(&self) -> Self {
        FlowKey::reversed(self)
    }
}

impl Tuple for FlowKey6 {
    #[inline(always)]
    fn reversed(&self) -> Self {
        FlowKey6::reversed(self)
    }
}

/// One packet's flow tuple, its L4 protocol and its TCP flags (0 for other
/// protocols).
struct Flow<K> {
    key: K,
    proto: u8,
    tcp_flags: u8,
}

/// The ports and TCP flags of an L4 header of `proto` at `l4` in
/// `[start, end)`, if it is TCP, UDP or SCTP with its ports in reach.
#[inline(always)]
fn ports(start: usize, end: usize, l4: usize, proto: u8) -> Option<([u8; 2], [u8; 2], u8)> {
    if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return None;
    }
    let ports: *const [[u8; 2]; 2] = ptr_at(start, end, l4).ok()?;
    // SAFETY: ptr_at checked the four port bytes lie inside the packet.
    let [sport, dport] = unsafe { *ports };
    let tcp_flags = match proto {
        IPPROTO_TCP => match ptr_at::<[u8; 2]>(start, end, l4 + TCP_OFF_FLAGS) {
            // SAFETY: as above.
            Ok(off_flags) => unsafe { (*off_flags)[1] },
            Err(_) => 0,
        },
        _ => 0,
    };
    Some((sport, dport, tcp_flags))
}

/// The flow of the IPv4 packet whose header `ip` starts at `ip_off` in
/// `[start, end)`, if it is TCP, UDP or SCTP with its ports in reach.
#[inline(always)]
fn flow(start: usize, end: usize, ip_off: usize, ip: &Ipv4Hdr) -> Option<Flow<FlowKey>> {
    let (sport, dport, tcp_flags) = ports(start, end, ip_off + ip.header_len(), ip.proto)?;
    Some(Flow {
        key: FlowKey {
            saddr: u32::from_ne_bytes(ip.src),
            daddr: u32::from_ne_bytes(ip.dst),
            sport,
            dport,
            proto: ip.proto,
            _pad: [0; 3],
        },
        proto: ip.proto,
        tcp_flags,
    })
}

/// The flow of an IPv6 packet whose L4 header follows the fixed header
/// (one behind extension headers is not followed: such a packet is not
/// recorded, and takes the fast path).
#[inline(always)]
fn flow6(start: usize, end: usize, ip_off: usize, ip: &Ipv6Hdr) -> Option<Flow<FlowKey6>> {
    let (sport, dport, tcp_flags) = ports(start, end, ip_off + IPV6_HLEN, ip.next_hdr)?;
    Some(Flow {
        key: FlowKey6 {
            saddr: ip.src,
            daddr: ip.dst,
            sport,
            dport,
            proto: ip.next_hdr,
            _pad: [0; 3],
        },
        proto: ip.next_hdr,
        tcp_flags,
    })
}

/// ICMP types whose payload quotes the packet that caused them (destination
/// unreachable, source quench, redirect, time exceeded, parameter problem).
#[inline(always)]
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// Whether the IPv4 packet whose header `ip` starts at `ip_off` in
/// `[start, end)`, about to take a fast path, must go up the node's stack
/// instead (module docs). A hit keeps its entry alive.
#[inline(always)]
pub fn must_take_stack(start: usize, end: usize, ip_off: usize, ip: &Ipv4Hdr) -> bool {
    if ip.is_fragment() {
        return true;
    }
    if ip.proto == IPPROTO_ICMP {
        // Type and code (two bytes: see TCP_OFF_FLAGS).
        return match ptr_at::<[u8; 2]>(start, end, ip_off + ip.header_len()) {
            // SAFETY: ptr_at checked bounds.
            Ok(type_code) => is_icmp_error(unsafe { (*type_code)[0] }),
            Err(_) => false,
        };
    }
    flow(start, end, ip_off, ip).is_some_and(|f| recorded(&WEFT_STACKFLOWS, &f))
}

/// [`must_take_stack`] for the IPv6 packet whose fixed header `ip` starts at
/// `ip_off`: a fragment (the stack reassembles), an ICMPv6 error (types
/// below 128 quote the packet that caused them) or a recorded reply goes up
/// the stack.
#[inline(always)]
pub fn must_take_stack6(start: usize, end: usize, ip_off: usize, ip: &Ipv6Hdr) -> bool {
    match ip.next_hdr {
        NEXTHDR_FRAGMENT => true,
        // Type and code (two bytes: see TCP_OFF_FLAGS).
        IPPROTO_ICMPV6 => match ptr_at::<[u8; 2]>(start, end, ip_off + IPV6_HLEN) {
            // SAFETY: ptr_at checked bounds.
            Ok(type_code) => (unsafe { (*type_code)[0] }) < 128,
            Err(_) => false,
        },
        _ => flow6(start, end, ip_off, ip).is_some_and(|f| recorded(&WEFT_STACKFLOWS6, &f)),
    }
}

/// Whether `f` is a live entry of `map` (a recorded reply); a hit keeps it
/// alive.
#[inline(always)]
fn recorded<K: Copy>(map: &LruHashMap<K, FlowState>, f: &Flow<K>) -> bool {
    let Some(state) = map.get_ptr_mut(f.key) else {
        return false;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map value; a concurrent writer at worst stores its own
    // refresh of the same entry.
    let state = unsafe { &mut *state };
    if state.expires_ns <= now {
        return false;
    }
    refresh(state, f, now);
    true
}

/// Records that replies to this packet's flow must take the stack: called on
/// the egress of `weft0` and of pods' host-side veths, for packets the stack
/// forwarded from a pod.
#[inline(always)]
pub fn record_reply(start: usize, end: usize, ip_off: usize, ip: &Ipv4Hdr) {
    if let Some(f) = flow(start, end, ip_off, ip) {
        record(&WEFT_STACKFLOWS, &f);
    }
}

/// [`record_reply`] for an IPv6 packet.
#[inline(always)]
pub fn record_reply6(start: usize, end: usize, ip_off: usize, ip: &Ipv6Hdr) {
    if let Some(f) = flow6(start, end, ip_off, ip) {
        record(&WEFT_STACKFLOWS6, &f);
    }
}

/// Records `f`'s reply in `map`.
#[inline(always)]
fn record<K: Tuple>(map: &LruHashMap<K, FlowState>, f: &Flow<K>) {
    let key = f.key.reversed();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let new_conn = f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(state) = map.get_ptr_mut(key) {
        // SAFETY: as in `recorded`.
        let state = unsafe { &mut *state };
        if state.expires_ns <= now || new_conn {
            // A stale entry, or a new connection on an old tuple: start over.
            state.flags = 0;
        }
        refresh(state, f, now);
        return;
    }
    let mut state = FlowState::default();
    refresh(&mut state, f, now);
    // Best effort: on failure the reply takes the fast path, as before.
    let _ = map.insert(key, state, 0);
}

/// Moves the entry's expiry on for a packet of its flow seen at `now`: as
/// conntrack, every packet restarts the timeout of the flow's state (a
/// half-closed TCP flow that still carries data stays).
#[inline(always)]
fn refresh<K>(state: &mut FlowState, f: &Flow<K>, now: u64) {
    if f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        state.flags |= FlowState::CLOSING;
    }
    state.expires_ns = now
        + match f.proto {
            _ if state.flags & FlowState::CLOSING != 0 => TIME_WAIT_NS,
            IPPROTO_UDP => UDP_NS,
            _ => ESTABLISHED_NS,
        };
}
