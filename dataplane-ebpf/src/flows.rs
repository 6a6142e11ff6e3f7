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
use weft_common::{FlowKey, FlowState};

use crate::parse::{
    ptr_at, Ipv4Hdr, Ipv6Hdr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IPV6_HLEN, NEXTHDR_FRAGMENT,
};

/// Reply tuple → until when it takes the stack.
#[map]
static WEFT_STACKFLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(131072, 0);

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

/// One packet's flow tuple and its TCP flags (0 for other protocols).
struct Flow {
    key: FlowKey,
    tcp_flags: u8,
}

/// The flow of the IPv4 packet whose header `ip` starts at `ip_off` in
/// `[start, end)`, if it is TCP, UDP or SCTP with its ports in reach.
#[inline(always)]
fn flow(start: usize, end: usize, ip_off: usize, ip: &Ipv4Hdr) -> Option<Flow> {
    if !matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return None;
    }
    let l4 = ip_off + ip.header_len();
    let ports: *const [[u8; 2]; 2] = ptr_at(start, end, l4).ok()?;
    // SAFETY: ptr_at checked the four port bytes lie inside the packet.
    let [sport, dport] = unsafe { *ports };
    let tcp_flags = match ip.proto {
        IPPROTO_TCP => match ptr_at::<[u8; 2]>(start, end, l4 + TCP_OFF_FLAGS) {
            // SAFETY: as above.
            Ok(off_flags) => unsafe { (*off_flags)[1] },
            Err(_) => 0,
        },
        _ => 0,
    };
    Some(Flow {
        key: FlowKey {
            saddr: u32::from_ne_bytes(ip.src),
            daddr: u32::from_ne_bytes(ip.dst),
            sport,
            dport,
            proto: ip.proto,
            _pad: [0; 3],
        },
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
    let Some(f) = flow(start, end, ip_off, ip) else {
        return false;
    };
    let Some(state) = WEFT_STACKFLOWS.get_ptr_mut(f.key) else {
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
    refresh(state, &f, now);
    true
}

/// [`must_take_stack`] for the IPv6 packet whose fixed header `ip` starts at
/// `ip_off`: a fragment (the stack reassembles) or an ICMPv6 error (types
/// below 128 quote the packet that caused them) goes up the stack. IPv6
/// flows the stack forwarded are not recorded yet: weft does not carry
/// IPv6 Services (docs/DATAPLANE.md, "Known limits").
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
        _ => false,
    }
}

/// Records that replies to this packet's flow must take the stack: called on
/// the egress of `weft0` and of pods' host-side veths, for packets the stack
/// forwarded from a pod.
#[inline(always)]
pub fn record_reply(start: usize, end: usize, ip_off: usize, ip: &Ipv4Hdr) {
    let Some(f) = flow(start, end, ip_off, ip) else {
        return;
    };
    let key = f.key.reversed();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let new_conn = f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(state) = WEFT_STACKFLOWS.get_ptr_mut(key) {
        // SAFETY: as in must_take_stack.
        let state = unsafe { &mut *state };
        if state.expires_ns <= now || new_conn {
            // A stale entry, or a new connection on an old tuple: start over.
            state.flags = 0;
        }
        refresh(state, &f, now);
        return;
    }
    let mut state = FlowState::default();
    refresh(&mut state, &f, now);
    // Best effort: on failure the reply takes the fast path, as before.
    let _ = WEFT_STACKFLOWS.insert(key, state, 0);
}

/// Moves the entry's expiry on for a packet of its flow seen at `now`: as
/// conntrack, every packet restarts the timeout of the flow's state (a
/// half-closed TCP flow that still carries data stays).
#[inline(always)]
fn refresh(state: &mut FlowState, f: &Flow, now: u64) {
    if f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        state.flags |= FlowState::CLOSING;
    }
    state.expires_ns = now
        + match f.key.proto {
            _ if state.flags & FlowState::CLOSING != 0 => TIME_WAIT_NS,
            IPPROTO_UDP => UDP_NS,
            _ => ESTABLISHED_NS,
        };
}
