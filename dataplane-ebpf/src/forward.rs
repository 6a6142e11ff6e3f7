//! TC path for IPv4 and IPv6 leaving a pod (host-side veth ingress) or the
//! node (`weft0` egress): same-node short-cut, VXLAN encapsulation, or
//! hand-off to the stack. Both families take the same steps (source check,
//! cluster CIDR, hop limit, what must take the stack, local pod, remote
//! node); each has its maps.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use weft_common::{DropReason, Endpoint, FwdReason};

use crate::{
    csum, encap, flows,
    maps::{self, count_fwd},
    parse::{
        ipv6_link_scoped, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6,
        IPPROTO_TCP, IPV6_HLEN,
    },
    verdict::{Verdict, TC_ACT_UNSPEC},
};

/// Where the packet came from: decides how a same-node delivery is done.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// TC ingress of a pod's host-side veth: `bpf_redirect_peer` is allowed.
    Pod,
    /// TC egress of `weft0`: peer redirects only work from ingress.
    Host,
}

/// Forwards what a pod or the node sends: the action, or why it is dropped.
#[inline(always)]
pub fn forward(ctx: &TcContext, origin: Origin) -> Verdict<i32> {
    if origin == Origin::Pod {
        if let Some(action) = decapsulated_for_the_pod(ctx) {
            return Ok(action);
        }
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    // Shorter than an Ethernet header: malformed, counted like the rest.
    let eth: *mut EthHdr = ptr_at(start, end, 0)?;
    // SAFETY: ptr_at checked the header lies inside the packet.
    match unsafe { (*eth).proto } {
        ETH_P_IP => forward_v4(ctx, origin, eth),
        ETH_P_IPV6 => forward_v6(ctx, origin, eth),
        _ => not_ours(origin, false),
    }
}

/// A frame the TC decap sent through this veth's ingress for the pod
/// behind it (its fallback before Linux 6.3, decap.rs: the mark says so; no
/// pod can set it, a namespace crossing clears marks): on into the pod,
/// the mark cleared.
#[inline(always)]
fn decapsulated_for_the_pod(ctx: &TcContext) -> Option<i32> {
    // SAFETY: ctx.skb.skb points at the program's __sk_buff, whose mark TC
    // programs may write.
    let skb = unsafe { &mut *ctx.skb.skb };
    if skb.mark & maps::DECAP_DELIVERY_MARK == 0 {
        return None;
    }
    skb.mark &= !maps::DECAP_DELIVERY_MARK;
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect_peer(skb.ifindex, 0) } as i32)
}

/// [`forward`] for IPv4.
#[inline(always)]
fn forward_v4(ctx: &TcContext, origin: Origin, eth: *mut EthHdr) -> Verdict<i32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = ptr_at(start, end, ETH_HLEN)?;
    // SAFETY: as above.
    let hdr = unsafe { *ip };
    if !hdr.is_valid() {
        return Err(DropReason::Malformed);
    }
    if origin == Origin::Pod {
        match its_pod(ctx, hdr.src) {
            None => return Err(DropReason::SpoofedSource),
            // Its veth is shaped: the qdisc and filters there must see it.
            Some(ep) if ep.shaped() => return Ok(to_stack(false)),
            Some(_) => {}
        }
    }
    if !maps::in_cluster(hdr.dst) {
        return not_ours(origin, false);
    }
    if hdr.ttl <= 1 {
        // From a pod, the stack answers with ICMP time exceeded.
        return not_ours(origin, false);
    }
    match origin {
        // Replies of flows the stack forwarded (it may have NATed them) go
        // back through it, as do fragments and ICMP errors (flows.rs).
        Origin::Pod if flows::must_take_stack(start, end, ETH_HLEN, &hdr) => {
            return Ok(to_stack(false));
        }
        // The stack forwarded this from a pod: its replies must return the
        // same way (a shaped pod's take the stack anyway: not recorded, so
        // its flows do not crowd NATed ones out of the map).
        Origin::Host if is_unshaped_pod(hdr.src) => flows::record_reply(start, end, ETH_HLEN, &hdr),
        _ => {}
    }

    if let Some(ep) = maps::endpoint(u32::from_ne_bytes(hdr.dst)) {
        // A pod whose veth is shaped gets it through the stack and the qdisc
        // on its veth. From weft0 the redirect below is to the veth's egress,
        // which passes the qdisc anyway.
        if ep.shaped() && origin == Origin::Pod {
            return Ok(to_stack(false));
        }
        // SAFETY: header bounds checked above; TC makes the data writable.
        unsafe {
            (*ip).ttl = hdr.ttl - 1;
            (*ip).check = csum::after_ttl_decrement(hdr.check);
        }
        return Ok(deliver_local(eth, &ep, origin, false));
    }

    let Some(remote) = maps::remote(hdr.dst) else {
        return Err(DropReason::NoRoute);
    };
    let remote = *remote;
    if maps::is_own(&remote) {
        // Our own pod CIDR but no endpoint: the gateway address or a pod that
        // is gone; the stack answers (or sends ICMP unreachable).
        return not_ours(origin, false);
    }
    // SAFETY: header bounds checked above.
    unsafe {
        (*ip).ttl = hdr.ttl - 1;
        (*ip).check = csum::after_ttl_decrement(hdr.check);
    }
    encap::encap_and_redirect(ctx, &remote, ETH_P_IP)
}

/// [`forward`] for IPv6. What a stack keeps on its link (neighbour
/// discovery, MLD: link-local, multicast or unspecified addresses) is left
/// to it; the rest is checked and forwarded as IPv4 is, with the hop
/// limit in place of the TTL (no header checksum to mend).
#[inline(always)]
fn forward_v6(ctx: &TcContext, origin: Origin, eth: *mut EthHdr) -> Verdict<i32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv6Hdr = ptr_at(start, end, ETH_HLEN)?;
    // SAFETY: ptr_at checked the header lies inside the packet.
    let hdr = unsafe { *ip };
    if !hdr.is_valid() {
        return Err(DropReason::Malformed);
    }
    if ipv6_link_scoped(&hdr.src) || ipv6_link_scoped(&hdr.dst) {
        // Also on weft0, whose own link-local chatter (MLD reports, router
        // solicitations) goes on to its peer, a dead end, uncounted as a
        // drop: it is the node's, not a packet weft failed to route.
        count_fwd(FwdReason::Passthrough, true);
        return Ok(TC_ACT_UNSPEC);
    }
    if origin == Origin::Pod {
        match its_pod6(ctx, &hdr.src) {
            None => return Err(DropReason::SpoofedSource),
            Some(ep) if ep.shaped() => return Ok(to_stack(true)),
            Some(_) => {}
        }
    }
    if !maps::in_cluster6(&hdr.dst) {
        return not_ours(origin, true);
    }
    if hdr.hop_limit <= 1 {
        // From a pod, the stack answers with ICMPv6 time exceeded.
        return not_ours(origin, true);
    }
    match origin {
        // As for IPv4: replies of flows the stack forwarded, fragments and
        // ICMPv6 errors take the stack.
        Origin::Pod if flows::must_take_stack6(start, end, ETH_HLEN, &hdr) => {
            return Ok(to_stack(true));
        }
        Origin::Host if is_unshaped_pod6(&hdr.src) => {
            flows::record_reply6(start, end, ETH_HLEN, &hdr)
        }
        _ => {}
    }

    if let Some(ep) = maps::endpoint6(&hdr.dst) {
        if ep.shaped() && origin == Origin::Pod {
            return Ok(to_stack(true));
        }
        // SAFETY: header bounds checked above; TC makes the data writable.
        unsafe { (*ip).hop_limit = hdr.hop_limit - 1 };
        return Ok(deliver_local(eth, &ep, origin, true));
    }

    let Some(remote) = maps::remote6(&hdr.dst) else {
        return Err(DropReason::NoRoute);
    };
    let remote = *remote;
    if maps::is_own(&remote) {
        return not_ours(origin, true);
    }
    if origin == Origin::Pod && too_big6(ctx, &hdr) {
        // The stack answers with ICMPv6 packet too big (its route to the
        // cluster, on weft0, has the node's pod MTU): the pod learns the
        // path MTU instead of losing the packet to the tunnel.
        return Ok(to_stack(true));
    }
    // SAFETY: header bounds checked above.
    unsafe { (*ip).hop_limit = hdr.hop_limit - 1 };
    if remote.over_underlay6() {
        return encap::over_underlay6(ctx, &remote);
    }
    encap::encap_and_redirect(ctx, &remote, ETH_P_IPV6)
}

/// Delivers the frame (its TTL or hop limit already lowered) to pod `ep` on
/// this node: MACs rewritten, then into the pod (`bpf_redirect_peer`, from
/// a pod's veth ingress) or to its veth's egress (from weft0).
#[inline(always)]
fn deliver_local(eth: *mut EthHdr, ep: &Endpoint, origin: Origin, v6: bool) -> i32 {
    // SAFETY: the caller checked the Ethernet header lies in the packet;
    // TC makes the data writable.
    unsafe {
        (*eth).dst = ep.pod_mac;
        (*eth).src = ep.host_mac;
    }
    count_fwd(FwdReason::Local, v6);
    // SAFETY: plain helper calls.
    let action = unsafe {
        match origin {
            Origin::Pod => bpf_redirect_peer(ep.ifindex, 0),
            Origin::Host => bpf_redirect(ep.ifindex, 0),
        }
    };
    action as i32
}

/// `weft_to_pod`: the node's stack is delivering this packet to a pod (the
/// fast paths never pass here, nor the node's own redirects), so the pod's
/// replies must go back through the stack, which may have NATed it
/// (flows.rs); not for a shaped pod, whose replies take the stack anyway.
/// Never decides: what follows on the hook, then the veth's qdisc, does.
#[inline(always)]
pub fn note_stack_delivery(ctx: &TcContext) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if let Ok(eth) = ptr_at::<EthHdr>(start, end, 0) {
        // SAFETY: ptr_at checked bounds.
        match unsafe { (*eth).proto } {
            ETH_P_IP => {
                if let Ok(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) {
                    // SAFETY: as above.
                    let hdr = unsafe { *ip };
                    if hdr.is_valid() && is_pod(hdr.src) && !is_shaped(hdr.dst) {
                        flows::record_reply(start, end, ETH_HLEN, &hdr);
                    }
                }
            }
            ETH_P_IPV6 => {
                if let Ok(ip) = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN) {
                    // SAFETY: as above.
                    let hdr = unsafe { *ip };
                    if hdr.is_valid() && is_pod6(&hdr.src) && !is_shaped6(&hdr.dst) {
                        flows::record_reply6(start, end, ETH_HLEN, &hdr);
                    }
                }
            }
            _ => {}
        }
    }
    TC_ACT_UNSPEC
}

/// Whether `ip` is a pod of this node whose veth is shaped.
#[inline(always)]
fn is_shaped(ip: [u8; 4]) -> bool {
    maps::endpoint(u32::from_ne_bytes(ip)).is_some_and(|ep| ep.shaped())
}

/// Whether `ip` is a pod's: one of this node's endpoints or in another node's
/// pod CIDR (not this node's gateway or a free address of its CIDR).
#[inline(always)]
fn is_pod(ip: [u8; 4]) -> bool {
    maps::endpoint(u32::from_ne_bytes(ip)).is_some() || is_remote_pod(ip)
}

/// [`is_pod`], but not a shaped pod of this node; one endpoint lookup.
#[inline(always)]
fn is_unshaped_pod(ip: [u8; 4]) -> bool {
    match maps::endpoint(u32::from_ne_bytes(ip)) {
        Some(ep) => !ep.shaped(),
        None => is_remote_pod(ip),
    }
}

/// Whether `ip` is in another node's pod CIDR.
#[inline(always)]
fn is_remote_pod(ip: [u8; 4]) -> bool {
    maps::remote(ip).is_some_and(|r| !maps::is_own(r))
}

/// [`is_shaped`] for an IPv6 address.
#[inline(always)]
fn is_shaped6(ip: &[u8; 16]) -> bool {
    maps::endpoint6(ip).is_some_and(|ep| ep.shaped())
}

/// [`is_pod`] for an IPv6 address.
#[inline(always)]
fn is_pod6(ip: &[u8; 16]) -> bool {
    maps::endpoint6(ip).is_some() || is_remote_pod6(ip)
}

/// [`is_unshaped_pod`] for an IPv6 address.
#[inline(always)]
fn is_unshaped_pod6(ip: &[u8; 16]) -> bool {
    match maps::endpoint6(ip) {
        Some(ep) => !ep.shaped(),
        None => is_remote_pod6(ip),
    }
}

/// [`is_remote_pod`] for an IPv6 address.
#[inline(always)]
fn is_remote_pod6(ip: &[u8; 16]) -> bool {
    maps::remote6(ip).is_some_and(|r| !maps::is_own(r))
}

/// The entry of the pod behind the veth this packet arrived on, if `src` is
/// the address weft gave it. Anything else a pod sends over IPv4 (another
/// pod's address, one it made up) is dropped wherever it is going, so no pod
/// can be another.
#[inline(always)]
fn its_pod(ctx: &TcContext, src: [u8; 4]) -> Option<Endpoint> {
    // SAFETY: ctx.skb.skb points at the program's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    maps::endpoint(u32::from_ne_bytes(src)).filter(|ep| ep.ifindex == ifindex)
}

/// The IPv6 twin of [`its_pod`].
#[inline(always)]
fn its_pod6(ctx: &TcContext, src: &[u8; 16]) -> Option<Endpoint> {
    // SAFETY: ctx.skb.skb points at the program's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    maps::endpoint6(src).filter(|ep| ep.ifindex == ifindex)
}

/// Whether the IPv6 packet in `ctx` (a GSO packet: each of its segments)
/// is larger than this node's pod MTU, which its tunnel carries. A pod's
/// MTU can be larger: one created before the node's MTU shrank (an IPv6
/// underlay turned on takes 20 bytes more), or set by hand; IPv6 is never
/// fragmented on the way, so the sender must be told.
#[inline(always)]
fn too_big6(ctx: &TcContext, hdr: &Ipv6Hdr) -> bool {
    let mtu = maps::pod_mtu();
    if mtu == 0 {
        return false;
    }
    // SAFETY: ctx.skb.skb points at the program's __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return ctx.len().saturating_sub(ETH_HLEN as u32) > mtu;
    }
    // A segment: the IPv6 header, the L4 header (TCP's with its options),
    // gso_size bytes of payload.
    let l4 = match hdr.next_hdr {
        IPPROTO_TCP => match ptr_at::<[u8; 13]>(ctx.data(), ctx.data_end(), ETH_HLEN + IPV6_HLEN) {
            // SAFETY: ptr_at checked bounds.
            Ok(tcp) => u32::from(unsafe { (*tcp)[12] } >> 4) * 4,
            Err(_) => 20,
        },
        _ => 8,
    };
    IPV6_HLEN as u32 + l4 + gso_size > mtu
}

/// A packet from a pod that must take the node's stack (flows.rs, or
/// a shaped veth), counted as such.
#[inline(always)]
fn to_stack(v6: bool) -> i32 {
    count_fwd(FwdReason::ToStack, v6);
    TC_ACT_UNSPEC
}

/// A packet weft does not forward. From a pod it goes to the stack
/// unchanged; on `weft0` there is nowhere else for it to go (the veth peer is
/// a dead end), so it is dropped and counted.
#[inline(always)]
fn not_ours(origin: Origin, v6: bool) -> Verdict<i32> {
    match origin {
        Origin::Pod => {
            count_fwd(FwdReason::Passthrough, v6);
            Ok(TC_ACT_UNSPEC)
        }
        Origin::Host => Err(DropReason::NoRoute),
    }
}
