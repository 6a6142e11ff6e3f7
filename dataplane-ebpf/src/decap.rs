//! VXLAN decapsulation in XDP on the underlay interface.
//!
//! Only VXLAN addressed to this node on our UDP port is touched; everything
//! else passes unchanged. Ours must come from a known node and carry our VNI,
//! or it is dropped here and counted — it never reaches a pod.
//!
//! Delivery, in one of two modes (load-time global):
//! - XDP redirect: for a local pod whose veth can take XDP frames (the pod
//!   side has NAPI; see drivers/net/veth.c `veth_xdp_xmit`), the inner frame
//!   is redirected straight into the pod's host-side veth.
//! - pass: the inner frame goes up the underlay's receive path (where GRO
//!   merges it and the checksum state the driver gave it stands), and the
//!   underlay's TC program (`weft_from_und`) redirects it into the pod with
//!   `bpf_redirect_peer`. Faster on a veth underlay, where an XDP redirect
//!   loses both.
//!
//! Anything else (the node itself, a pod without NAPI) is passed to the
//! stack with the inner frame addressed to the underlay interface.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use weft_common::{DropReason, Endpoint, FwdReason, VXLAN_HLEN};

use crate::{
    maps::{self, count_drop, count_fwd},
    parse::{
        ptr_at, EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr, ETH_HLEN, ETH_P_IP, IPPROTO_UDP, UDP_HLEN,
        VXLAN_FLAG_I,
    },
};

#[inline(always)]
fn pass() -> Result<u32, ()> {
    count_fwd(FwdReason::Passthrough);
    Ok(XDP_PASS)
}

/// Counts the drop; at debug log level (a load-time global: pruned by the
/// verifier when off) also says why.
#[inline(always)]
fn drop(ctx: &XdpContext, reason: DropReason) -> Result<u32, ()> {
    count_drop(reason);
    debug!(ctx, "weft xdp: drop {}", reason.name());
    Ok(XDP_DROP)
}

#[inline(always)]
pub fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Ok(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return pass();
    };
    // SAFETY: ptr_at checked bounds.
    if unsafe { (*eth).proto } != ETH_P_IP {
        return pass();
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return pass();
    };
    // SAFETY: as above.
    let ip = unsafe { *ip };
    if !ip.is_valid() || ip.proto != IPPROTO_UDP || ip.dst != maps::local_ip() || ip.is_fragment() {
        // Not VXLAN for us (fragments are left to the stack to reassemble).
        return pass();
    }
    let ihl = ip.header_len();
    if ihl > 60 {
        return pass();
    }
    let udp_off = ETH_HLEN + ihl;
    let Ok(udp) = ptr_at::<UdpHdr>(start, end, udp_off) else {
        return pass();
    };
    // SAFETY: as above.
    if u16::from_be_bytes(unsafe { (*udp).dport }) != maps::vxlan_port() {
        return pass();
    }

    // From here on the packet claims to be ours.
    if !maps::is_known_vtep(u32::from_ne_bytes(ip.src)) {
        return drop(ctx, DropReason::UnknownVtep);
    }
    let vx_off = udp_off + UDP_HLEN;
    let Ok(vx) = ptr_at::<VxlanHdr>(start, end, vx_off) else {
        return drop(ctx, DropReason::Malformed);
    };
    // SAFETY: as above.
    let vx = unsafe { *vx };
    let vni = maps::vni();
    if vx.flags & VXLAN_FLAG_I == 0 || vx.vni != [(vni >> 16) as u8, (vni >> 8) as u8, vni as u8] {
        return drop(ctx, DropReason::WrongVni);
    }
    let inner_off = vx_off + VXLAN_HLEN;
    let Ok(inner_eth) = ptr_at::<EthHdr>(start, end, inner_off) else {
        return drop(ctx, DropReason::Malformed);
    };
    // SAFETY: as above.
    if unsafe { (*inner_eth).proto } != ETH_P_IP {
        return drop(ctx, DropReason::InnerNotIpv4);
    }
    let Ok(inner_ip) = ptr_at::<Ipv4Hdr>(start, end, inner_off + ETH_HLEN) else {
        return drop(ctx, DropReason::Malformed);
    };
    // SAFETY: as above.
    let inner_ip = unsafe { *inner_ip };
    if !inner_ip.is_valid() {
        return drop(ctx, DropReason::Malformed);
    }
    let ep = maps::endpoint(u32::from_ne_bytes(inner_ip.dst));

    // Strip outer Ethernet, IPv4, UDP and VXLAN.
    // SAFETY: ctx is our xdp_md; inner_off ≤ 14 + 60 + 16.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner_off as i32) } != 0 {
        return drop(ctx, DropReason::HelperFailed);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Ok(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return drop(ctx, DropReason::Malformed);
    };
    match ep {
        Some(Endpoint {
            ifindex,
            pod_mac,
            host_mac,
            flags,
        }) if flags & Endpoint::FLAG_XDP_REDIRECT != 0 && maps::decap_xdp_redirect() != 0 => {
            // SAFETY: bounds checked just above.
            unsafe {
                (*eth).dst = pod_mac;
                (*eth).src = host_mac;
            }
            count_fwd(FwdReason::DecapRedirect);
            // SAFETY: plain helper call.
            Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
        }
        _ => {
            // SAFETY: bounds checked just above.
            unsafe { (*eth).dst = maps::underlay_mac() };
            count_fwd(FwdReason::DecapPass);
            Ok(XDP_PASS)
        }
    }
}
