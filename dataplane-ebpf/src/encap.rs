//! VXLAN encapsulation in TC: where the outer headers are written.
//!
//! Room is made with `bpf_skb_adjust_room` and the ENCAP flags, so the kernel
//! marks the skb as a UDP tunnel (`SKB_GSO_UDP_TUNNEL`, inner headers set)
//! and TSO/GSO keep working: a 64 KiB TCP segment leaves as one tunnel GSO
//! packet and is segmented by the device or by software GSO at the very end.
//! Outer L2 comes from the kernel FIB and neighbour tables
//! (`bpf_fib_lookup`, falling back to `bpf_redirect_neigh`), whose answer
//! is kept per peer until the agent reports a change ([`next_hop`]).
//!
//! Wire format as the Linux vxlan driver with flannel's settings: UDP
//! destination port and VNI configurable (8472 / 1 by default), source port
//! from the inner flow hash, outer UDP checksum 0, TTL 64, DF clear (the
//! vxlan default `df unset`), inner destination MAC = the remote VTEP MAC.
//!
//! Over an IPv6 underlay ([`over_underlay6`]) the outer headers are the
//! kernel's: the UDP checksum is mandatory there (RFC 8200; a Linux vxlan
//! device such as flannel's `flannel-v6.1` drops a zero one), and a GSO skb
//! gets one per segment only when marked `SKB_GSO_UDP_TUNNEL_CSUM`, which
//! `bpf_skb_adjust_room` cannot set. So the program writes the inner
//! Ethernet header, sets the tunnel key (remote address, VNI) and redirects
//! to weft's collect-metadata VXLAN device (`weft_gro`), whose transmit
//! builds outer IPv6, UDP with its checksum, VXLAN, and segments GSO.

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
        bpf_tunnel_key as TunnelKey, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_TUNINFO_IPV6,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_hash_recalc, bpf_ktime_get_coarse_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
    EbpfContext,
};
use weft_common::{DropReason, FwdReason, NextHop, RemoteNode, VXLAN_ENCAP_LEN};

use crate::{
    csum,
    maps::{self, count_fwd},
    parse::{ETH_HLEN, ETH_P_IPV6, IPPROTO_UDP, VXLAN_FLAG_I},
    verdict::Verdict,
    zeroed::Zeroed,
};

const AF_INET: u8 = 2;
/// BPF_F_ADJ_ROOM_ENCAP_L2(len): inner L2 header length in bits 56..63.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;
/// Ephemeral range for the outer source port, as the kernel's default
/// `ip_local_port_range`.
const SPORT_MIN: u32 = 32768;
const SPORT_MAX: u32 = 61000;
const OUTER_TTL: u8 = 64;
/// Bytes written at the front after the room is made: outer Ethernet + IPv4
/// + UDP + VXLAN + inner Ethernet.
const HDR_LEN: usize = ETH_HLEN + VXLAN_ENCAP_LEN;

/// Outer UDP source port from a flow hash, spread over the ephemeral range
/// like the kernel's `udp_flow_src_port`.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    ((((hash as u64) * ((SPORT_MAX - SPORT_MIN) as u64)) >> 32) as u32 + SPORT_MIN) as u16
}

/// Encapsulates the frame in `ctx` (whose inner EtherType is `inner_proto`,
/// IPv4 or IPv6) for `remote` and redirects it to the underlay.
#[inline(always)]
pub fn encap_and_redirect(
    ctx: &TcContext,
    remote: &RemoteNode,
    inner_proto: [u8; 2],
) -> Verdict<i32> {
    let local_ip = maps::local_ip();
    let remote_ip = remote.underlay_ip.to_ne_bytes();
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let outer_len = inner_len + VXLAN_ENCAP_LEN;

    // SAFETY: ctx.skb.skb points at the program's __sk_buff.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let hop = next_hop(ctx, local_ip, remote.underlay_ip, outer_len, gso)?;

    // SAFETY: ctx is our skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.as_ptr() as *mut _) };
    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        | ENCAP_L2_ETH_LEN
        // Pods already run at underlay MTU - 50: keep gso_size as it is.
        | BPF_F_ADJ_ROOM_FIXED_GSO as u64;
    if ctx
        .adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return Err(DropReason::HelperFailed);
    }

    let mut hdr = MaybeUninit::uninit();
    // SAFETY: all-zero is a valid byte array (64 bytes).
    let hdr: &mut [u8; HDR_LEN] = unsafe { Zeroed::init(&mut hdr) };
    write_headers(
        hdr,
        &hop.dmac,
        &hop.smac,
        local_ip,
        remote_ip,
        outer_len as u16,
        source_port(hash),
        hash as u16,
        maps::vni(),
        maps::vxlan_port(),
        &remote.vtep_mac,
        &maps::vtep_mac(),
        inner_proto,
    );
    if ctx.store(0, hdr, 0).is_err() {
        return Err(DropReason::HelperFailed);
    }

    if hop.resolved {
        count_fwd(FwdReason::Encap, inner_proto == ETH_P_IPV6);
        // SAFETY: plain helper call.
        Ok(unsafe { bpf_redirect(hop.ifindex, 0) as i32 })
    } else {
        count_fwd(FwdReason::EncapNeigh, inner_proto == ETH_P_IPV6);
        // SAFETY: NULL params: the helper does its own FIB lookup on the
        // (outer) network header and resolves the neighbour.
        Ok(unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) as i32 })
    }
}

/// Where an encapsulated packet leaves: the device and outer MACs, or only
/// the device when its neighbour is not resolved yet.
struct Hop {
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
    resolved: bool,
}

/// The next hop towards the peer at underlay `remote_ip` for an outer
/// packet of `outer_len` bytes (`gso`: a GSO packet, whose segments are
/// made to fit later): from the cache while its entry is of the current
/// generation, not expired and has passed a packet at least this long
/// (the agent moves the generation on at every neighbour, route, address
/// or link change, so a cached answer is the answer the FIB would give);
/// else from `bpf_fib_lookup`, whose answer is cached.
#[inline(always)]
fn next_hop(
    ctx: &TcContext,
    local_ip: [u8; 4],
    remote_ip: u32,
    outer_len: usize,
    gso: bool,
) -> Verdict<Hop> {
    let generation = maps::next_hop_generation();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cached = maps::next_hop(remote_ip).map(|e| {
        // SAFETY: a map value; its writers store whole answers of the FIB.
        unsafe { &mut *e }
    });
    let live = cached
        .filter(|e| e.generation == generation && now.wrapping_sub(e.written_ns) < NextHop::TTL_NS);
    if let Some(e) = &live {
        if gso || outer_len <= usize::from(e.max_len) {
            return Ok(Hop {
                ifindex: e.ifindex,
                dmac: e.dmac,
                smac: e.smac,
                resolved: true,
            });
        }
    }

    let mut fib = MaybeUninit::uninit();
    // SAFETY: all-zero is a valid bpf_fib_lookup (64 bytes).
    let fib: &mut FibParams = unsafe { Zeroed::init(&mut fib) };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    // With tot_len set the kernel checks it against the route MTU; a GSO
    // packet is segmented to fit later, so it is checked only when it is not
    // GSO (tot_len 0: the kernel then lets GSO skbs through).
    let checked_len = if gso { 0 } else { outer_len as u16 };
    fib.__bindgen_anon_1.tot_len = checked_len;
    fib.ifindex = maps::underlay_ifindex();
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(local_ip);
    fib.__bindgen_anon_4.ipv4_dst = remote_ip;
    // SAFETY: fib is a valid, writable bpf_fib_lookup on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            fib,
            size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    let resolved = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        // FRAG_NEEDED: a non-GSO packet larger than the underlay MTU allows.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(DropReason::Mtu),
        _ => return Err(DropReason::FibLookupFailed),
    };
    let hop = Hop {
        ifindex: fib.ifindex,
        dmac: fib.dmac,
        smac: fib.smac,
        resolved,
    };
    if !resolved {
        // Not cached: the kernel resolves the neighbour (redirect_neigh).
        return Ok(hop);
    }
    match live {
        // The same next hop, passed for a longer packet: remember the length.
        Some(e) if e.ifindex == hop.ifindex && e.dmac == hop.dmac && e.smac == hop.smac => {
            e.max_len = e.max_len.max(checked_len);
        }
        _ => maps::put_next_hop(
            remote_ip,
            &NextHop {
                generation,
                ifindex: hop.ifindex,
                dmac: hop.dmac,
                smac: hop.smac,
                max_len: checked_len,
                _pad: [0; 2],
                written_ns: now,
            },
        ),
    }
    Ok(hop)
}

/// `struct bpf_tunnel_key` (44 bytes) padded to 8-byte words for [`Zeroed`].
#[repr(C)]
struct TunnelKeyBuf {
    key: TunnelKey,
    _pad: [u8; 4],
}

/// `struct bpf_tunnel_key` up to `local_ipv6` (Linux 5.15's whole struct):
/// the size a kernel without a settable tunnel source takes.
const TUNNEL_KEY_NO_LOCAL: u32 = 28;

/// Sends the frame in `ctx` to `remote` over the IPv6 underlay: inner
/// Ethernet written here, the rest by the kernel's VXLAN transmit (see the
/// module comment).
#[inline(always)]
pub fn over_underlay6(ctx: &TcContext, remote: &RemoteNode) -> Verdict<i32> {
    let ifindex = maps::tunnel6_ifindex();
    if ifindex == 0 {
        // The agent writes such entries only with the device in place.
        return Err(DropReason::HelperFailed);
    }
    let mut macs = [0u8; 12];
    macs[0..6].copy_from_slice(&remote.vtep_mac);
    macs[6..12].copy_from_slice(&maps::vtep_mac());
    if ctx.store(0, &macs, 0).is_err() {
        return Err(DropReason::HelperFailed);
    }
    let mut key = MaybeUninit::uninit();
    // SAFETY: all-zero is a valid bpf_tunnel_key (and 4 bytes of padding).
    let key: &mut TunnelKeyBuf = unsafe { Zeroed::init(&mut key) };
    let key = &mut key.key;
    key.tunnel_id = maps::vni();
    key.tunnel_ttl = OUTER_TTL;
    key.__bindgen_anon_1.remote_ipv6 = words(&remote.underlay_ip6);
    key.__bindgen_anon_3.local_ipv6 = words(&maps::local_ip6());
    let key: *mut TunnelKey = key;
    let set = |size: u32| {
        // SAFETY: key is a valid bpf_tunnel_key of at least `size` bytes.
        unsafe {
            bpf_skb_set_tunnel_key(ctx.as_ptr() as *mut _, key, size, BPF_F_TUNINFO_IPV6 as u64)
        }
    };
    // The source address is settable from Linux 6.1; before, the kernel
    // takes the route's (the node's underlay address, as a rule).
    if set(size_of::<TunnelKey>() as u32) != 0 && set(TUNNEL_KEY_NO_LOCAL) != 0 {
        return Err(DropReason::HelperFailed);
    }
    count_fwd(FwdReason::Encap, true);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(ifindex, 0) as i32 })
}

/// An IPv6 address as `struct bpf_tunnel_key` holds it: four words whose
/// bytes are the address's, in order.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The 64 bytes in front of the inner IP header, written into `h`, which
/// is all zero (the fields left zero stay so).
#[expect(clippy::too_many_arguments, reason = "one flat header, one call site")]
#[inline(always)]
fn write_headers(
    h: &mut [u8; HDR_LEN],
    outer_dmac: &[u8; 6],
    outer_smac: &[u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    outer_len: u16,
    sport: u16,
    ip_id: u16,
    vni: u32,
    port: u16,
    inner_dmac: &[u8; 6],
    inner_smac: &[u8; 6],
    inner_proto: [u8; 2],
) {
    // Outer Ethernet.
    h[0..6].copy_from_slice(outer_dmac);
    h[6..12].copy_from_slice(outer_smac);
    h[12] = 0x08;
    h[13] = 0x00;
    // Outer IPv4 at 14..34: no options, DF clear, checksum over the 20
    // bytes with the checksum field still zero.
    h[14] = 0x45;
    h[16..18].copy_from_slice(&outer_len.to_be_bytes());
    h[18..20].copy_from_slice(&ip_id.to_be_bytes());
    h[22] = OUTER_TTL;
    h[23] = IPPROTO_UDP;
    h[26..30].copy_from_slice(&src);
    h[30..34].copy_from_slice(&dst);
    let ip: &[u8; 20] = h[14..34].try_into().unwrap_or(&[0; 20]);
    let check = csum::ipv4_header(ip);
    h[24] = check[0];
    h[25] = check[1];
    // UDP: checksum 0 (allowed for IPv4, as the kernel vxlan default).
    h[34..36].copy_from_slice(&sport.to_be_bytes());
    h[36..38].copy_from_slice(&port.to_be_bytes());
    h[38..40].copy_from_slice(&outer_len.wrapping_sub(20).to_be_bytes());
    // VXLAN.
    h[42] = VXLAN_FLAG_I;
    h[46] = (vni >> 16) as u8;
    h[47] = (vni >> 8) as u8;
    h[48] = vni as u8;
    // Inner Ethernet.
    h[50..56].copy_from_slice(inner_dmac);
    h[56..62].copy_from_slice(inner_smac);
    h[62..64].copy_from_slice(&inner_proto);
}
