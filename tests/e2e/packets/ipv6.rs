//! IPv6 pods over the IPv4 underlay: the cases the IPv4 tests have, on the
//! same fixture (its IPv6 maps filled by [`setup`]).

use std::net::Ipv6Addr;

use aya::maps::lpm_trie::Key;
use weft_agent::dataplane::{Maps, ip_key};
use weft_common::{DropReason, Endpoint, FwdReason, RemoteNode};
use weft_tests::{
    pktgen::{self, Ipv6},
    privileged,
};

use super::{
    Fixture, HOST_VETH_MAC, Hook, LOCAL, LOCAL_VTEP, PEER, PEER_VTEP, POD_MAC, TC_ACT_REDIRECT,
    TC_ACT_SHOT, TC_ACT_UNSPEC, assert_deltas, assert_family, expected_encap_of,
};

const fn v6(tail: [u16; 2]) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, tail[0], 0, 0, 0, tail[1])
}
/// A pod of this node (its veth takes XDP redirects).
const POD6: Ipv6Addr = v6([1, 0x10]);
/// A pod of this node without NAPI on its veth.
const POD6_NO_XDP: Ipv6Addr = v6([1, 0x11]);
/// The gateway of this node's IPv6 pod CIDR (no endpoint: the node's own).
const GATEWAY6: Ipv6Addr = v6([1, 1]);
const REMOTE_POD6: Ipv6Addr = v6([2, 0x20]);
/// In the cluster, in no node's pod CIDR.
const NOWHERE6: Ipv6Addr = v6([0x77, 1]);
/// Outside the cluster (2001:2::/48).
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
/// Solicited-node multicast address of the gateway (what a pod's neighbour
/// solicitation for it goes to).
const GATEWAY_SOLICITED: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1);
const POD_SRC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 6];
/// This node's and the peer's IPv6 underlay addresses (outside the
/// cluster CIDR), and an address on the underlay that is no node's.
pub(super) const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 2);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x99);

/// The fixture's IPv6 entries: this node's and the peer's pod CIDRs, and
/// the two local pods on the fixture's veth.
pub(super) fn setup(maps: &mut Maps, pod_ifindex: u32) {
    for (cidr, owner, vtep_mac) in [
        (v6([1, 0]), LOCAL, LOCAL_VTEP),
        (v6([2, 0]), PEER, PEER_VTEP),
    ] {
        let node = RemoteNode {
            underlay_ip: ip_key(owner),
            vtep_mac,
            ..RemoteNode::default()
        };
        maps.remotes6
            .insert(&Key::new(64, cidr.octets()), node, 0)
            .unwrap();
    }
    for (ip, flags) in [(POD6, Endpoint::FLAG_XDP_REDIRECT), (POD6_NO_XDP, 0)] {
        let ep = Endpoint {
            ifindex: pod_ifindex,
            pod_mac: POD_MAC,
            host_mac: HOST_VETH_MAC,
            flags,
        };
        maps.endpoints6.insert(ip.octets(), ep, 0).unwrap();
    }
    maps.nodes6
        .insert(PEER6.octets(), weft_common::Vtep::default(), 0)
        .unwrap();
}

/// A frame a pod sends on its veth.
fn from_pod(ip: &[u8]) -> Vec<u8> {
    pktgen::eth(HOST_VETH_MAC, POD_SRC_MAC, pktgen::ETH_P_IPV6, ip)
}

/// `packet` with its hop limit (byte 7) lowered by one, as forwarding does.
fn routed(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[7] -= 1;
    p
}

#[test]
fn tc_encap_and_local_cases_ipv6() {
    if !privileged("tc_encap_and_local_cases_ipv6") {
        return;
    }
    let mut fx = Fixture::new("pk6", 1, 8472);

    // Pod → remote pod: VXLAN over the IPv4 underlay, byte for byte; the
    // inner frame says IPv6, its hop limit is one lower.
    let sent = Ipv6::new(POD6, REMOTE_POD6, 0).echo(9, 3, &[0xab; 100]);
    let before = fx.counters();
    let (action, out) = fx.tc(&from_pod(&sent));
    assert_eq!(action, TC_ACT_REDIRECT, "encap: {:?}", fx.counters().drops);
    assert_eq!(out.len(), 14 + sent.len() + 50, "encap adds 50 bytes");
    let sport = u16::from_be_bytes([out[34], out[35]]);
    let ip_id = u16::from_be_bytes([out[18], out[19]]);
    assert!((32768..61000).contains(&sport), "source port {sport}");
    assert_eq!(
        out,
        expected_encap_of(&fx, pktgen::ETH_P_IPV6, &routed(&sent), sport, ip_id),
        "IPv6 encap output byte for byte"
    );
    assert_deltas(
        "encap",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::Encap, 1)],
    );
    assert_family("encap", &before, &fx.counters(), true);

    // Pod → remote pod, one byte above the node's pod MTU (1450 here):
    // to the stack unchanged, which answers packet too big; at the MTU it
    // is encapsulated.
    for (size, action, counted) in [
        (1451, TC_ACT_UNSPEC, FwdReason::ToStack),
        (1450, TC_ACT_REDIRECT, FwdReason::Encap),
    ] {
        let sent = Ipv6::new(POD6, REMOTE_POD6, 0).echo(9, 4, &vec![0xcd; size - 48]);
        assert_eq!(sent.len(), size);
        let frame = from_pod(&sent);
        let before = fx.counters();
        let (got, out) = fx.tc(&frame);
        assert_eq!(got, action, "{size} bytes: {:?}", fx.counters().drops);
        if action == TC_ACT_UNSPEC {
            assert_eq!(out, frame, "{size} bytes: untouched");
        }
        assert_deltas(
            &format!("{size} bytes"),
            &before,
            &fx.counters(),
            &[],
            &[(counted, 1)],
        );
        assert_family(&format!("{size} bytes"), &before, &fx.counters(), true);
    }

    // Pod → pod on this node: MACs rewritten, hop limit lowered.
    let sent = Ipv6::new(POD6_NO_XDP, POD6, 17).build(&pktgen::udp(1000, 2000, b"hi"));
    let before = fx.counters();
    let (action, out) = fx.tc(&from_pod(&sent));
    assert_eq!(action, TC_ACT_REDIRECT, "local delivery");
    assert_eq!(
        out,
        pktgen::eth(POD_MAC, HOST_VETH_MAC, pktgen::ETH_P_IPV6, &routed(&sent)),
        "local delivery frame"
    );
    assert_deltas(
        "local",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::Local, 1)],
    );

    // The node's business, untouched: neighbour discovery (link-local and
    // unspecified sources, multicast destinations), outside the cluster, the
    // gateway, hop limit 1.
    let solicit = |src| Ipv6 {
        hop_limit: 255,
        ..Ipv6::new(src, GATEWAY_SOLICITED, 0)
    };
    let ns_body = [&[0u8; 4][..], &GATEWAY6.octets()].concat();
    for (case, sent) in [
        (
            "neighbour solicitation from the link-local address",
            solicit(LINK_LOCAL).icmp6(135, 0, &ns_body),
        ),
        (
            "duplicate address detection (source ::)",
            solicit(Ipv6Addr::UNSPECIFIED).icmp6(135, 0, &ns_body),
        ),
        (
            "outside the cluster",
            Ipv6::new(POD6, OUTSIDE6, 17).build(&pktgen::udp(1, 2, b"x")),
        ),
        (
            "to the gateway",
            Ipv6::new(POD6, GATEWAY6, 0).echo(1, 1, b"x"),
        ),
        (
            "hop limit 1",
            Ipv6 {
                hop_limit: 1,
                ..Ipv6::new(POD6, REMOTE_POD6, 17)
            }
            .build(&pktgen::udp(1, 2, b"x")),
        ),
    ] {
        let frame = from_pod(&sent);
        let before = fx.counters();
        let (action, out) = fx.tc(&frame);
        assert_eq!(action, TC_ACT_UNSPEC, "{case}");
        assert_eq!(out, frame, "{case}: untouched");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::Passthrough, 1)],
        );
    }

    // What the stack must see: a fragment (it reassembles) and an ICMPv6
    // error (it quotes a packet the stack may have translated).
    let fragment = [
        &[17u8, 0, 0, 0x01, 0, 0, 0, 7][..],
        &pktgen::udp(1, 2, b"x"),
    ]
    .concat();
    let quoted = Ipv6::new(REMOTE_POD6, POD6, 17).build(&pktgen::udp(2, 1, b"x"));
    let unreachable = [&[0u8; 4][..], &quoted].concat();
    for (case, sent) in [
        (
            "fragment",
            Ipv6::new(POD6, REMOTE_POD6, pktgen::NEXTHDR_FRAGMENT).build(&fragment),
        ),
        (
            "ICMPv6 destination unreachable",
            Ipv6::new(POD6, REMOTE_POD6, 0).icmp6(1, 4, &unreachable),
        ),
    ] {
        let frame = from_pod(&sent);
        let before = fx.counters();
        let (action, out) = fx.tc(&frame);
        assert_eq!(action, TC_ACT_UNSPEC, "{case}");
        assert_eq!(out, frame, "{case}: untouched");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }

    // Dropped and counted: in the cluster but no node's, a source the pod
    // was not given, not IPv6 behind the IPv6 EtherType. (The kernel's
    // test_run refuses a frame shorter than the IPv6 header, so truncation
    // is covered by the decap cases, where the cut header is the inner one.)
    let mut not_v6 = Ipv6::new(POD6, REMOTE_POD6, 17).build(&pktgen::udp(1, 2, b"x"));
    not_v6[0] = 0x40;
    for (case, frame, reason) in [
        (
            "no route",
            from_pod(&Ipv6::new(POD6, NOWHERE6, 17).build(&pktgen::udp(1, 2, b"x"))),
            DropReason::NoRoute,
        ),
        (
            "a remote pod's address as source",
            from_pod(&Ipv6::new(REMOTE_POD6, POD6, 17).build(&pktgen::udp(1, 2, b"x"))),
            DropReason::SpoofedSource,
        ),
        (
            "an address no pod has as source",
            from_pod(&Ipv6::new(v6([1, 0x99]), REMOTE_POD6, 17).build(&pktgen::udp(1, 2, b"x"))),
            DropReason::SpoofedSource,
        ),
        (
            "version 4 in an IPv6 frame",
            from_pod(&not_v6),
            DropReason::Malformed,
        ),
    ] {
        let before = fx.counters();
        let (action, _) = fx.tc(&frame);
        assert_eq!(action, TC_ACT_SHOT, "{case}");
        assert_deltas(case, &before, &fx.counters(), &[(reason, 1)], &[]);
    }

    // From the node (weft0's egress): to a remote pod, encapsulated; its
    // own link-local chatter (an MLD report) passes to weft0's dead-end peer,
    // not counted as a drop; to nowhere in the cluster, dropped.
    let weft0_mac = [0x02, 0xdd, 0, 0, 0, 1];
    let from_node =
        |ip: &[u8]| pktgen::eth([0x02, 0xde, 0, 0, 0, 1], weft0_mac, pktgen::ETH_P_IPV6, ip);
    let mld = Ipv6 {
        hop_limit: 1,
        ..Ipv6::new(LINK_LOCAL, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16), 0)
    }
    .icmp6(143, 0, &[0u8; 4]);
    for (case, sent, action, fwd) in [
        (
            "node to a remote pod",
            Ipv6::new(GATEWAY6, REMOTE_POD6, 0).echo(2, 2, b"x"),
            TC_ACT_REDIRECT,
            Some(FwdReason::Encap),
        ),
        (
            "weft0's MLD report",
            mld,
            TC_ACT_UNSPEC,
            Some(FwdReason::Passthrough),
        ),
        (
            "node to no node's CIDR",
            Ipv6::new(GATEWAY6, NOWHERE6, 0).echo(2, 2, b"x"),
            TC_ACT_SHOT,
            None,
        ),
    ] {
        let before = fx.counters();
        let (got, _) = fx.tc_prog(weft_common::names::PROG_FROM_HOST, &from_node(&sent));
        assert_eq!(got, action, "{case}");
        match fwd {
            Some(f) => assert_deltas(case, &before, &fx.counters(), &[], &[(f, 1)]),
            None => assert_deltas(
                case,
                &before,
                &fx.counters(),
                &[(DropReason::NoRoute, 1)],
                &[],
            ),
        }
    }

    // A pod's own address from another veth is spoofed too.
    let und = fx.und.index;
    let before = fx.counters();
    let (action, _) = fx.tc_on(
        und,
        &from_pod(&Ipv6::new(POD6, REMOTE_POD6, 0).echo(1, 1, b"x")),
    );
    assert_eq!(action, TC_ACT_SHOT, "a local pod's address on another veth");
    assert_deltas(
        "a local pod's address on another veth",
        &before,
        &fx.counters(),
        &[(DropReason::SpoofedSource, 1)],
        &[],
    );
}

#[test]
fn xdp_decap_cases_ipv6() {
    if !privileged("xdp_decap_cases_ipv6") {
        return;
    }
    decap_cases(Hook::Xdp);
}

#[test]
fn tc_decap_cases_ipv6() {
    if !privileged("tc_decap_cases_ipv6") {
        return;
    }
    decap_cases(Hook::Tc);
}

#[test]
fn xdp_decap_over_the_ipv6_underlay() {
    if !privileged("xdp_decap_over_the_ipv6_underlay") {
        return;
    }
    decap6_cases(Hook::Xdp);
}

#[test]
fn tc_decap_over_the_ipv6_underlay() {
    if !privileged("tc_decap_over_the_ipv6_underlay") {
        return;
    }
    decap6_cases(Hook::Tc);
}

/// VXLAN over IPv6 from `src` to this node (as flannel-v6.1 sends it, the
/// UDP checksum aside: decap does not read it).
fn vxlan6_frame(fx: &Fixture, src: Ipv6Addr, vni: u32, dport: u16, inner: &[u8]) -> Vec<u8> {
    let outer =
        Ipv6::new(src, LOCAL6, 17).build(&pktgen::udp(50000, dport, &pktgen::vxlan(vni, inner)));
    pktgen::eth(fx.und.mac, super::PEER_MAC, pktgen::ETH_P_IPV6, &outer)
}

/// Decap of VXLAN over the IPv6 underlay: the same checks as over IPv4
/// (known VTEP, VNI, inner destination local), IPv4 inside refused, and
/// what is not VXLAN for this node left alone.
fn decap6_cases(hook: Hook) {
    let mut fx = Fixture::new("pu6", 1, 8472);
    let (vni, port) = (fx.vni, fx.port);
    let (redirect, pass, drop) = hook.verdicts();

    let inner = inner_frame(POD6);
    let before = fx.counters();
    let (action, out) = fx.decap(hook, &vxlan6_frame(&fx, PEER6, vni, port, &inner));
    assert_eq!(action, redirect, "decap to pod: {:?}", fx.counters().drops);
    let mut want = inner.clone();
    want[0..6].copy_from_slice(&POD_MAC);
    want[6..12].copy_from_slice(&HOST_VETH_MAC);
    assert_eq!(out, want, "decap to pod: output frame");
    assert_deltas(
        "decap to pod",
        &before,
        &fx.counters(),
        &[],
        &[(hook.delivered(), 1)],
    );

    let inner4 = pktgen::eth(
        LOCAL_VTEP,
        PEER_VTEP,
        pktgen::ETH_P_IP,
        &pktgen::Ipv4::new(super::REMOTE_POD, super::POD, 1).build(&pktgen::icmp_echo(1, 1, b"x")),
    );
    for (case, frame, reason) in [
        (
            "from an unknown VTEP",
            vxlan6_frame(&fx, STRANGER6, vni, port, &inner),
            DropReason::UnknownVtep,
        ),
        (
            "another VNI",
            vxlan6_frame(&fx, PEER6, vni + 1, port, &inner),
            DropReason::WrongVni,
        ),
        (
            "another node's pod",
            vxlan6_frame(&fx, PEER6, vni, port, &inner_frame(REMOTE_POD6)),
            DropReason::NotLocal,
        ),
        (
            "IPv4 inside",
            vxlan6_frame(&fx, PEER6, vni, port, &inner4),
            DropReason::InnerFamily,
        ),
    ] {
        let before = fx.counters();
        let (action, _) = fx.decap(hook, &frame);
        assert_eq!(action, drop, "{case}");
        assert_deltas(case, &before, &fx.counters(), &[(reason, 1)], &[]);
        // Dropped VXLAN over IPv6 counts as IPv6 (the outer frame's family).
        assert_family(case, &before, &fx.counters(), true);
    }

    // Not ours: another UDP port; an extension header before UDP.
    let mut ext = vxlan6_frame(&fx, PEER6, vni, port, &inner);
    ext[14 + 6] = 0; // next header: hop-by-hop options
    for (case, frame) in [
        (
            "another port",
            vxlan6_frame(&fx, PEER6, vni, port + 1, &inner),
        ),
        ("an extension header", ext),
    ] {
        let before = fx.counters();
        let (action, out) = fx.decap(hook, &frame);
        assert_eq!((action, &out), (pass, &frame), "{case}: untouched");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::Passthrough, 1)],
        );
    }
}

/// An inner frame: an ICMPv6 echo from a remote pod to `dst`.
fn inner_frame(dst: Ipv6Addr) -> Vec<u8> {
    let ip = Ipv6::new(REMOTE_POD6, dst, 0).echo(7, 1, b"weft-test-payload");
    pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IPV6, &ip)
}

fn decap_cases(hook: Hook) {
    let mut fx = Fixture::new("pd6", 1, 8472);
    let (vni, port) = (fx.vni, fx.port);
    let (redirect, pass, drop) = hook.verdicts();

    // To a local pod: the inner frame (EtherType IPv6 also where TC keeps
    // the outer Ethernet header), MACs rewritten.
    let inner = inner_frame(POD6);
    let frame = fx.vxlan_frame(PEER, vni, port, &inner);
    let before = fx.counters();
    let (action, out) = fx.decap(hook, &frame);
    assert_eq!(action, redirect, "decap to pod: {:?}", fx.counters().drops);
    let mut want = inner.clone();
    want[0..6].copy_from_slice(&POD_MAC);
    want[6..12].copy_from_slice(&HOST_VETH_MAC);
    assert_eq!(out, want, "decap to pod: output frame");
    assert_deltas(
        "decap to pod",
        &before,
        &fx.counters(),
        &[],
        &[(hook.delivered(), 1)],
    );
    // The pod's packet is IPv6, whatever the tunnel's family.
    assert_family("decap to pod", &before, &fx.counters(), true);

    // To the node itself (the gateway): passed up, addressed to the underlay.
    let inner = inner_frame(GATEWAY6);
    let frame = fx.vxlan_frame(PEER, vni, port, &inner);
    let before = fx.counters();
    let (action, out) = fx.decap(hook, &frame);
    assert_eq!(action, pass, "decap to node");
    let mut want = inner.clone();
    want[0..6].copy_from_slice(&fx.und.mac);
    if hook == Hook::Tc {
        want[6..12].copy_from_slice(&frame[6..12]);
    }
    assert_eq!(out, want, "decap to node: output frame");
    assert_deltas(
        "decap to node",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::DecapPass, 1)],
    );

    // A fragment for a local pod goes up the stack, which reassembles it.
    let fragment = [
        &[17u8, 0, 0, 0x01, 0, 0, 0, 7][..],
        &pktgen::udp(1, 2, b"x"),
    ]
    .concat();
    let inner = pktgen::eth(
        LOCAL_VTEP,
        PEER_VTEP,
        pktgen::ETH_P_IPV6,
        &Ipv6::new(REMOTE_POD6, POD6, pktgen::NEXTHDR_FRAGMENT).build(&fragment),
    );
    let before = fx.counters();
    let (action, _) = fx.decap(hook, &fx.vxlan_frame(PEER, vni, port, &inner));
    assert_eq!(action, pass, "fragment for a pod");
    assert_deltas(
        "fragment",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::ToStack, 1)],
    );

    // Not for this node: another node's pod, outside the cluster; and an
    // inner IPv6 header cut short or not IPv6.
    let short = {
        let f = fx.vxlan_frame(PEER, vni, port, &inner_frame(POD6));
        // Outer 14 + 20 + 8 + 8, inner Ethernet 14, 30 of the 40 IPv6 bytes.
        let mut cut = f[..14 + 36 + 14 + 30].to_vec();
        let len = (cut.len() - 14) as u16;
        cut[16..18].copy_from_slice(&len.to_be_bytes());
        cut[24..26].copy_from_slice(&[0, 0]);
        let c = pktgen::checksum(&cut[14..34]);
        cut[24..26].copy_from_slice(&c.to_be_bytes());
        cut[38..40].copy_from_slice(&(len - 20).to_be_bytes());
        cut
    };
    let mut not_v6 = inner_frame(POD6);
    not_v6[14] = 0x40;
    for (case, frame, reason) in [
        (
            "another node's pod",
            fx.vxlan_frame(PEER, vni, port, &inner_frame(REMOTE_POD6)),
            DropReason::NotLocal,
        ),
        (
            "outside the cluster",
            fx.vxlan_frame(PEER, vni, port, &inner_frame(OUTSIDE6)),
            DropReason::NotLocal,
        ),
        ("inner IPv6 header cut short", short, DropReason::Malformed),
        (
            "version 4 behind the IPv6 EtherType",
            fx.vxlan_frame(PEER, vni, port, &not_v6),
            DropReason::Malformed,
        ),
    ] {
        let before = fx.counters();
        let (action, _) = fx.decap(hook, &frame);
        assert_eq!(action, drop, "{case}");
        assert_deltas(case, &before, &fx.counters(), &[(reason, 1)], &[]);
    }
}

#[test]
fn ipv6_stack_forwarded_flows_return_through_the_stack() {
    if !privileged("ipv6_stack_forwarded_flows_return_through_the_stack") {
        return;
    }
    let mut fx = Fixture::new("pf6", 1, 8472);
    let flows =
        weft_agent::dataplane::stack_flows6(&fx.pins).expect("open the IPv6 stack flows map");
    let tcp = |src, sport, dst, dport, flags| {
        Ipv6::new(src, dst, 6).build(&pktgen::tcp(sport, dport, flags, b"x"))
    };
    // The stack delivers a SYN from a remote pod to the local pod (after a
    // Service's DNAT, say) through the pod veth's egress: weft_to_pod lets
    // it through, counts nothing, records the reply.
    let syn = tcp(REMOTE_POD6, 40000, POD6, 8080, pktgen::TCP_SYN);
    let frame = pktgen::eth(POD_MAC, HOST_VETH_MAC, pktgen::ETH_P_IPV6, &syn);
    let before = fx.counters();
    let (action, out) = fx.tc_prog(weft_common::names::PROG_TO_POD, &frame);
    assert_eq!(
        (action, &out),
        (TC_ACT_UNSPEC, &frame),
        "weft_to_pod passes"
    );
    assert_deltas("weft_to_pod", &before, &fx.counters(), &[], &[]);
    let reply = weft_common::FlowKey6 {
        saddr: POD6.octets(),
        daddr: REMOTE_POD6.octets(),
        sport: 8080u16.to_be_bytes(),
        dport: 40000u16.to_be_bytes(),
        proto: 6,
        _pad: [0; 3],
    };
    assert!(flows.get(&reply, 0).is_ok(), "the reply is recorded");
    // The pod's reply goes to the stack; another flow is encapsulated.
    let synack = from_pod(&tcp(
        POD6,
        8080,
        REMOTE_POD6,
        40000,
        pktgen::TCP_SYN | pktgen::TCP_ACK,
    ));
    let before = fx.counters();
    assert_eq!(
        fx.tc(&synack),
        (TC_ACT_UNSPEC, synack.clone()),
        "reply to the stack"
    );
    assert_deltas(
        "reply",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::ToStack, 1)],
    );
    let other = from_pod(&tcp(POD6, 8081, REMOTE_POD6, 40000, pktgen::TCP_ACK));
    let before = fx.counters();
    assert_eq!(
        fx.tc(&other).0,
        TC_ACT_REDIRECT,
        "another flow is encapsulated"
    );
    assert_deltas(
        "other flow",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::Encap, 1)],
    );
    // VXLAN from the remote pod on the same flow, the other way: not a
    // recorded reply, delivered straight into the pod.
    let inbound = tcp(REMOTE_POD6, 40000, POD6, 8080, pktgen::TCP_ACK);
    let recorded_back = weft_common::FlowKey6 {
        saddr: REMOTE_POD6.octets(),
        daddr: POD6.octets(),
        sport: 40000u16.to_be_bytes(),
        dport: 8080u16.to_be_bytes(),
        proto: 6,
        _pad: [0; 3],
    };
    assert!(
        flows.get(&recorded_back, 0).is_err(),
        "only the reply direction is recorded"
    );
    let inner = pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IPV6, &inbound);
    let before = fx.counters();
    let (action, _) = fx.decap(Hook::Tc, &fx.vxlan_frame(PEER, 1, 8472, &inner));
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "a flow not recorded this way is delivered"
    );
    assert_deltas(
        "inbound",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::DecapPeer, 1)],
    );

    // From weft0: the stack forwarded a pod's packet to a remote pod (a
    // Service's backend elsewhere): recorded, so the backend's reply, in
    // VXLAN, takes the stack back.
    let weft0_mac = [0x02, 0xdd, 0, 0, 0, 1];
    let fwd = tcp(POD6_NO_XDP, 41000, REMOTE_POD6, 7000, pktgen::TCP_SYN);
    let (action, _) = fx.tc_prog(
        weft_common::names::PROG_FROM_HOST,
        &pktgen::eth(
            [0x02, 0xde, 0, 0, 0, 1],
            weft0_mac,
            pktgen::ETH_P_IPV6,
            &fwd,
        ),
    );
    assert_eq!(action, TC_ACT_REDIRECT, "encapsulated from weft0");
    let back = tcp(
        REMOTE_POD6,
        7000,
        POD6_NO_XDP,
        41000,
        pktgen::TCP_SYN | pktgen::TCP_ACK,
    );
    let inner = pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IPV6, &back);
    for hook in [Hook::Tc, Hook::Xdp] {
        let before = fx.counters();
        let (action, _) = fx.decap(hook, &fx.vxlan_frame(PEER, 1, 8472, &inner));
        assert_eq!(
            action,
            hook.verdicts().1,
            "{hook:?}: the backend's reply goes up the stack"
        );
        assert_deltas(
            "backend reply",
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }
}
