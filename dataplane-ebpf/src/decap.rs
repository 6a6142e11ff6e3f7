//! VXLAN decapsulation on the underlay, in XDP or in TC.
//!
//! Only VXLAN addressed to this node on our UDP port is touched; everything
//! else passes unchanged. Ours must come from a known node, carry our VNI and
//! be for this node (a local pod, or an address of this node's pod CIDR), or
//! it is dropped here and counted — it never reaches a pod, and the node
//! never forwards it on. Both hooks
//! share that check ([`classify`]) and differ in how they strip and deliver:
//!
//! - XDP ([`xdp`]): the outer headers go with `bpf_xdp_adjust_head` and the
//!   inner frame is redirected straight into the pod's host-side veth (the
//!   pod side needs NAPI; see drivers/net/veth.c `veth_xdp_xmit`). Best on a
//!   NIC with native XDP, which hands XDP one wire frame at a time anyway.
//! - TC ([`tc`]): the outer headers go with `bpf_skb_adjust_room` and the
//!   inner frame enters the pod with `bpf_redirect_peer`. The skb keeps its
//!   GSO and checksum state, so a 64 KiB GSO skb from a veth underlay is
//!   decapsulated once, not as 45 wire frames: XDP on a veth forces its peer
//!   to segment and copies every frame (drivers/net/veth.c
//!   `veth_xdp_rcv_skb`, `skb_pp_cow_data`).
//!
//! Anything for the node itself (or, in XDP, a pod without NAPI), for a pod
//! whose veth is shaped ([`Endpoint::FLAG_SHAPED`]: the stack delivers it
//! through the veth's qdisc), and what must take the stack (a reply of a
//! flow the stack NATed, a fragment, an ICMP error: [`crate::flows`]) is
//! passed to the stack with the inner frame addressed to the underlay
//! interface.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action::XDP_PASS, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_INGRESS,
    },
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use weft_common::{DropReason, Endpoint, FwdReason, VXLAN_HLEN};

use crate::{
    flows,
    maps::{self, count_fwd},
    parse::{
        ptr_at, says_ipv6, EthHdr, Ipv4Hdr, Ipv6Hdr, UdpHdr, VxlanHdr, ETH_HLEN, ETH_P_IP,
        ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, UDP_HLEN, VXLAN_FLAG_I,
    },
    verdict::{Verdict, TC_ACT_UNSPEC},
};

/// The inner packet's network header, by family.
#[derive(Clone, Copy)]
pub enum InnerIp {
    V4(Ipv4Hdr),
    V6(Ipv6Hdr),
}

/// What the underlay received, as far as weft is concerned.
pub enum Vxlan {
    /// Not VXLAN for this node: leave it alone.
    NotOurs,
    /// Claims to be ours but must not reach a pod.
    Drop(DropReason),
    /// Ours: the inner Ethernet frame starts at `inner_off`; `inner_ip` is
    /// its IPv4 header (without options) or IPv6 fixed header; `ep` the
    /// local pod it is for, or `None` for this node itself (an address of
    /// its pod CIDR).
    Ours {
        inner_off: usize,
        inner_ip: InnerIp,
        ep: Option<Endpoint>,
        /// The outer header is IPv6 (so is the inner one, then).
        outer_v6: bool,
    },
}

impl InnerIp {
    /// Whether a packet for a local pod must take the stack instead
    /// (flows.rs); `ip_off` is where this header starts in `[start, end)`.
    #[inline(always)]
    fn must_take_stack(&self, start: usize, end: usize, ip_off: usize) -> bool {
        match self {
            InnerIp::V4(ip) => flows::must_take_stack(start, end, ip_off, ip),
            InnerIp::V6(ip) => flows::must_take_stack6(start, end, ip_off, ip),
        }
    }

    /// Whether the inner packet is IPv6 (its counters' family).
    #[inline(always)]
    fn is_v6(&self) -> bool {
        matches!(self, InnerIp::V6(_))
    }

    /// Header bytes up to the L4 header (IPv6 extension headers not
    /// counted: flows.rs reads no further than the fixed header for them).
    #[inline(always)]
    fn header_len(&self) -> usize {
        match self {
            InnerIp::V4(ip) => ip.header_len(),
            InnerIp::V6(_) => IPV6_HLEN,
        }
    }
}

/// `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (linux/bpf.h, Linux 6.3): a shrink that
/// leaves an IPv6 packet sets skb->protocol to match.
const BPF_F_ADJ_ROOM_DECAP_L3_IPV6: u64 = 1 << 8;

/// The most header bytes [`classify`] reads for an inner IPv4 packet: outer
/// Ethernet, IPv4 with the longest options, UDP, VXLAN, inner Ethernet and
/// IPv4 (20 more for an inner IPv6 header).
pub const MAX_HEADERS: usize = ETH_HLEN + 60 + UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN;

/// [`MAX_HEADERS`] for a packet without outer IPv4 options (nearly all).
pub const MIN_HEADERS: usize = MAX_HEADERS - (60 - IPV4_HLEN);

/// Makes the first `len` bytes of the packet (or all of it, if shorter)
/// linear; a no-op when they are. False only when the kernel is out of memory.
#[inline(always)]
fn linear(ctx: &TcContext, len: usize) -> bool {
    let want = core::cmp::min(ctx.len() as usize, len);
    ctx.data() + want <= ctx.data_end() || ctx.pull_data(want as u32).is_ok()
}

/// Makes the headers [`classify`] reads linear. Only as many as this
/// packet has: pulling more would copy payload out of the fragments of
/// every GSO skb (a veth delivers the headers, and only they, in the linear
/// part). The outer header's length is read once those are linear (a NIC
/// may have left even the outer IPv4 header in a fragment). False only when
/// the kernel is out of memory. Nothing to do when the whole packet is
/// linear (small packets, as a rule).
#[inline(always)]
fn headers_linear(ctx: &TcContext) -> bool {
    if all_linear(ctx) {
        return true;
    }
    if !linear(ctx, MIN_HEADERS) {
        return false;
    }
    let outer_v6 = match ptr_at::<[u8; 2]>(ctx.data(), ctx.data_end(), 12) {
        // SAFETY: ptr_at checked bounds.
        Ok(proto) => (unsafe { *proto }) == ETH_P_IPV6,
        Err(_) => false,
    };
    let outer_len = if outer_v6 {
        IPV6_HLEN
    } else {
        match ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) {
            // SAFETY: ptr_at checked bounds.
            Ok(ip) => unsafe { (*ip).header_len() },
            Err(_) => IPV4_HLEN,
        }
    };
    let headers = MIN_HEADERS + outer_len - IPV4_HLEN;
    // An inner IPv6 header is 20 bytes longer than the IPv4 one
    // MIN_HEADERS counts. (Its EtherType's offset is computed from the
    // header length itself, which the verifier knows is never negative.)
    let inner_proto_off = ETH_HLEN + outer_len + UDP_HLEN + VXLAN_HLEN + 12;
    let inner_v6 = match ptr_at::<[u8; 2]>(ctx.data(), ctx.data_end(), inner_proto_off) {
        // SAFETY: ptr_at checked bounds.
        Ok(proto) => (unsafe { *proto }) == ETH_P_IPV6,
        Err(_) => false,
    };
    (headers == MIN_HEADERS || linear(ctx, headers))
        && (!inner_v6 || linear(ctx, headers + IPV6_HLEN - IPV4_HLEN))
}

/// Whether the whole packet is in the linear part (no page fragments).
#[inline(always)]
fn all_linear(ctx: &TcContext) -> bool {
    ctx.data() + ctx.len() as usize == ctx.data_end()
}

/// Where the VXLAN header of a packet for this node's UDP port starts, and
/// whether the outer header is IPv6; `None` when the packet is not VXLAN
/// for this node (a fragment too: the stack reassembles it), `Some(Err)`
/// when it is but comes from no known node.
#[inline(always)]
fn outer(start: usize, end: usize) -> Option<Result<(usize, bool), DropReason>> {
    let eth = ptr_at::<EthHdr>(start, end, 0).ok()?;
    // SAFETY: ptr_at checked bounds.
    let (udp_off, known, v6) = match unsafe { (*eth).proto } {
        ETH_P_IP => {
            let ip = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN).ok()?;
            // SAFETY: as above.
            let ip = unsafe { *ip };
            if !ip.is_valid()
                || ip.proto != IPPROTO_UDP
                || ip.dst != maps::local_ip()
                || ip.is_fragment()
            {
                return None;
            }
            let ihl = ip.header_len();
            if ihl > 60 {
                return None;
            }
            (
                ETH_HLEN + ihl,
                maps::is_known_vtep(u32::from_ne_bytes(ip.src)),
                false,
            )
        }
        ETH_P_IPV6 => {
            let ip = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN).ok()?;
            // SAFETY: as above.
            let ip = unsafe { *ip };
            // UDP right after the fixed header: what a VXLAN sender writes
            // (extension headers, fragments among them, go to the stack).
            if !ip.is_valid() || ip.next_hdr != IPPROTO_UDP || ip.dst != maps::local_ip6() {
                return None;
            }
            (ETH_HLEN + IPV6_HLEN, maps::is_known_vtep6(&ip.src), true)
        }
        _ => return None,
    };
    let udp = ptr_at::<UdpHdr>(start, end, udp_off).ok()?;
    // SAFETY: as above.
    if u16::from_be_bytes(unsafe { (*udp).dport }) != maps::vxlan_port() {
        return None;
    }
    // From here on the packet claims to be ours.
    if !known {
        return Some(Err(DropReason::UnknownVtep));
    }
    Some(Ok((udp_off + UDP_HLEN, v6)))
}

/// Checks the packet in `[start, end)` against the rules above.
#[inline(always)]
pub fn classify(start: usize, end: usize) -> Vxlan {
    let (vx_off, outer_v6) = match outer(start, end) {
        None => return Vxlan::NotOurs,
        Some(Err(reason)) => return Vxlan::Drop(reason),
        Some(Ok(o)) => o,
    };
    let Ok(vx) = ptr_at::<VxlanHdr>(start, end, vx_off) else {
        return Vxlan::Drop(DropReason::Malformed);
    };
    // SAFETY: as above.
    let vx = unsafe { *vx };
    let vni = maps::vni();
    if vx.flags & VXLAN_FLAG_I == 0 || vx.vni != [(vni >> 16) as u8, (vni >> 8) as u8, vni as u8] {
        return Vxlan::Drop(DropReason::WrongVni);
    }
    let inner_off = vx_off + VXLAN_HLEN;
    let Ok(inner_eth) = ptr_at::<EthHdr>(start, end, inner_off) else {
        return Vxlan::Drop(DropReason::Malformed);
    };
    // For a local pod or this node (its pod CIDR); nothing is forwarded on.
    // SAFETY: as above.
    let (inner_ip, ep) = match unsafe { (*inner_eth).proto } {
        ETH_P_IP if outer_v6 => return Vxlan::Drop(DropReason::InnerFamily),
        ETH_P_IP => {
            let Ok(ip) = ptr_at::<Ipv4Hdr>(start, end, inner_off + ETH_HLEN) else {
                return Vxlan::Drop(DropReason::Malformed);
            };
            // SAFETY: as above.
            let ip = unsafe { *ip };
            if !ip.is_valid() {
                return Vxlan::Drop(DropReason::Malformed);
            }
            let ep = maps::endpoint(u32::from_ne_bytes(ip.dst));
            if ep.is_none() && !maps::in_local_cidr(ip.dst) {
                return Vxlan::Drop(DropReason::NotLocal);
            }
            (InnerIp::V4(ip), ep)
        }
        ETH_P_IPV6 => {
            let Ok(ip) = ptr_at::<Ipv6Hdr>(start, end, inner_off + ETH_HLEN) else {
                return Vxlan::Drop(DropReason::Malformed);
            };
            // SAFETY: as above.
            let ip = unsafe { *ip };
            if !ip.is_valid() {
                return Vxlan::Drop(DropReason::Malformed);
            }
            let ep = maps::endpoint6(&ip.dst);
            if ep.is_none() && !maps::in_local_cidr6(&ip.dst) {
                return Vxlan::Drop(DropReason::NotLocal);
            }
            (InnerIp::V6(ip), ep)
        }
        _ => return Vxlan::Drop(DropReason::InnerNotIp),
    };
    Vxlan::Ours {
        inner_off,
        inner_ip,
        ep,
        outer_v6,
    }
}

/// The counter of a decapsulated frame passed to the stack: it had to go
/// there (flows.rs), or it was for the node itself.
#[inline(always)]
fn passed(to_stack: bool) -> FwdReason {
    if to_stack {
        FwdReason::ToStack
    } else {
        FwdReason::DecapPass
    }
}

/// XDP on the underlay: strip, then redirect into a local pod or pass up.
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> Verdict<u32> {
    let (inner_off, inner_ip, ep) = match classify(ctx.data(), ctx.data_end()) {
        Vxlan::NotOurs => {
            count_fwd(
                FwdReason::Passthrough,
                says_ipv6(ctx.data(), ctx.data_end()),
            );
            return Ok(XDP_PASS);
        }
        Vxlan::Drop(reason) => return Err(reason),
        Vxlan::Ours {
            inner_off,
            inner_ip,
            ep,
            ..
        } => (inner_off, inner_ip, ep),
    };
    // A local pod, unless the stack must see the packet (its veth is shaped,
    // or flows.rs).
    let to_stack = ep.is_some_and(|ep| {
        ep.shaped() || inner_ip.must_take_stack(ctx.data(), ctx.data_end(), inner_off + ETH_HLEN)
    });

    // Strip outer Ethernet, IPv4, UDP and VXLAN.
    // SAFETY: ctx is our xdp_md; inner_off ≤ 14 + 60 + 16.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner_off as i32) } != 0 {
        return Err(DropReason::HelperFailed);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(start, end, 0)?;
    match ep {
        Some(Endpoint {
            ifindex,
            pod_mac,
            host_mac,
            flags,
        }) if flags & Endpoint::FLAG_XDP_REDIRECT != 0 && !to_stack => {
            // SAFETY: bounds checked just above.
            unsafe {
                (*eth).dst = pod_mac;
                (*eth).src = host_mac;
            }
            count_fwd(FwdReason::DecapRedirect, inner_ip.is_v6());
            // SAFETY: plain helper call.
            Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
        }
        _ => {
            // SAFETY: bounds checked just above.
            unsafe { (*eth).dst = maps::underlay_mac() };
            count_fwd(passed(to_stack), inner_ip.is_v6());
            Ok(XDP_PASS)
        }
    }
}

/// TC ingress on the underlay: strip in place (GSO and checksum state kept),
/// then `bpf_redirect_peer` into a local pod or continue up the stack.
#[inline(always)]
pub fn tc(ctx: &TcContext) -> Verdict<i32> {
    // A NIC may leave headers in page fragments: make the ones we read
    // linear.
    if !headers_linear(ctx) {
        // Out of memory: leave the packet to the stack, as anything not ours.
        count_fwd(
            FwdReason::Passthrough,
            says_ipv6(ctx.data(), ctx.data_end()),
        );
        return Ok(TC_ACT_UNSPEC);
    }
    let (inner_off, inner_ip, ep, outer_v6) = match classify(ctx.data(), ctx.data_end()) {
        Vxlan::NotOurs => {
            count_fwd(
                FwdReason::Passthrough,
                says_ipv6(ctx.data(), ctx.data_end()),
            );
            return Ok(TC_ACT_UNSPEC);
        }
        Vxlan::Drop(reason) => return Err(reason),
        Vxlan::Ours {
            inner_off,
            inner_ip,
            ep,
            outer_v6,
        } => (inner_off, inner_ip, ep, outer_v6),
    };
    // A local pod, unless the stack must see the packet (its veth is shaped,
    // or flows.rs). flows.rs reads the start of the inner L4 header, which
    // must be linear too (a no-op unless the inner IPv4 header has options).
    let inner_ip_off = inner_off + ETH_HLEN;
    let to_stack = ep.is_some_and(|ep| {
        ep.shaped()
            || (linear(ctx, inner_ip_off + inner_ip.header_len() + flows::L4_PEEK)
                && inner_ip.must_take_stack(ctx.data(), ctx.data_end(), inner_ip_off))
    });
    // Remove outer IPv4 (or IPv6), UDP, VXLAN and the inner Ethernet header right after
    // the outer Ethernet header, which stays and is rewritten below.
    // `inner_off` bytes in all. FIXED_GSO: gso_size is already the inner MSS.
    // An IPv6 frame also needs skb->protocol changed (DECAP_L3_IPV6, Linux
    // 6.3); an older kernel rejects the flag, and the frame is then stripped
    // without it and delivered the slower way, through a device that reads
    // its protocol afresh ([`deliver_retyped`]).
    // (Over an IPv6 underlay the skb is IPv6 already.)
    let v6 = matches!(inner_ip, InnerIp::V6(_)) && !outer_v6;
    let strip = |flags: u64| {
        ctx.adjust_room(
            -(inner_off as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_FIXED_GSO as u64 | flags,
        )
        .is_ok()
    };
    let way = maps::decap_retype();
    let retyped = v6 && way == maps::RETYPE_FLAG && strip(BPF_F_ADJ_ROOM_DECAP_L3_IPV6);
    if !retyped && !strip(0) {
        return Err(DropReason::HelperFailed);
    }
    // Whether the skb's protocol is still IPv4 for an IPv6 frame.
    let stale_proto = v6 && !retyped;
    let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0)?;
    if v6 {
        // SAFETY: bounds checked just above; TC makes the data writable.
        unsafe { (*eth).proto = ETH_P_IPV6 };
    }
    match ep {
        Some(ep) if !to_stack => {
            // SAFETY: as above.
            unsafe {
                (*eth).dst = ep.pod_mac;
                (*eth).src = ep.host_mac;
            }
            count_fwd(FwdReason::DecapPeer, inner_ip.is_v6());
            if stale_proto && way == maps::RETYPE_VIA_EGRESS {
                // Through the veth (Linux 5.15: the way below fails there);
                // weft_to_pod takes it for the stack's delivery, so the
                // pod's replies take the stack.
                return Ok(deliver_retyped(ep.ifindex, 0));
            }
            if stale_proto {
                // Into the pod's host-side veth's ingress, where the skb is
                // retyped and weft_from_pod, seeing the mark, sends it on
                // into the pod.
                // SAFETY: ctx.skb.skb points at the program's __sk_buff,
                // whose mark TC programs may write.
                unsafe { (*ctx.skb.skb).mark |= maps::DECAP_DELIVERY_MARK };
                return Ok(deliver_retyped(ep.ifindex, BPF_F_INGRESS as u64));
            }
            // SAFETY: plain helper call.
            Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
        }
        _ => {
            // SAFETY: as above.
            unsafe { (*eth).dst = maps::underlay_mac() };
            count_fwd(passed(to_stack), inner_ip.is_v6());
            if stale_proto {
                return Ok(deliver_retyped(
                    maps::underlay_ifindex(),
                    BPF_F_INGRESS as u64,
                ));
            }
            Ok(TC_ACT_UNSPEC)
        }
    }
}

/// Delivers a stripped IPv6 frame whose skb still says IPv4 (a kernel
/// before 6.3, without `BPF_F_ADJ_ROOM_DECAP_L3_IPV6`) through the ingress
/// of `ifindex` (`BPF_F_INGRESS` runs `eth_type_trans`, which retypes it):
/// a pod's host-side veth, whose `weft_from_pod` then redirects it into the
/// pod (the skb keeps its GSO state, as with `bpf_redirect_peer` here; a
/// transmit through the veth would not carry a tunnel GSO skb), or the
/// underlay again, where the frame is no longer VXLAN and goes up the
/// stack.
#[inline(always)]
fn deliver_retyped(ifindex: u32, flags: u64) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, flags) as i32 }
}
