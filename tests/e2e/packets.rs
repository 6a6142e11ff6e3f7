//! Packet-level tests: the real BPF programs run on crafted frames with
//! BPF_PROG_TEST_RUN, each case named pktgen (the frame) → setup (maps) →
//! check (action, output bytes, counters), like Cilium's bpf/tests.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use weft_agent::{
    dataplane::{
        Dataplane, Globals, Maps, ip_key,
        nexthops::Generation,
        stats::{self, Counters},
    },
    host::netdev,
};
use weft_common::{DropReason, Endpoint, FlowKey, FlowState, FwdReason, RemoteNode, Vtep, names};
use weft_tests::{
    InNetns, Lab,
    pktgen::{self, Ipv4},
    privileged,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// -1: no verdict, the next program or filter on the hook decides (how
/// weft's TC programs let a packet pass).
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const LOCAL_VTEP: [u8; 6] = [0x0e, 0x77, 198, 18, 0, 1];
const PEER_VTEP: [u8; 6] = [0x0e, 0x77, 198, 18, 0, 2];
const POD: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const POD_NO_XDP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x0a];
const HOST_VETH_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x0a];
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 20);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
/// The IPv6 cluster: 2001:2::/48, the IPv6 benchmarking range (RFC 5180),
/// as 198.18.0.0/15 is IPv4's. This node's pod CIDR 2001:2:0:1::/64, the
/// peer's 2001:2:0:2::/64.
const CLUSTER6: &str = "2001:2::/48";

/// The IPv6 cases, run on the same fixture.
#[path = "packets/ipv6.rs"]
mod ipv6;

/// A namespace with an underlay (`und0`, 198.18.0.1/24, a permanent neighbour
/// for the peer node), the dataplane loaded for it and its maps filled.
struct Fixture {
    // Field order is drop order: leave the namespace before the lab removes it.
    _inside: InNetns,
    dp: Dataplane,
    maps: Maps,
    und: netdev::Interface,
    /// Host-side veth of the fixture's pods (a real device: `weft_from_pod`
    /// checks a pod's source against the veth a packet arrives on).
    pod_ifindex: u32,
    /// The pin directory (maps outside [`Maps`] are opened from it).
    pins: std::path::PathBuf,
    vni: u32,
    port: u16,
    _lab: Lab,
}

impl Fixture {
    fn new(tag: &str, vni: u32, port: u16) -> Self {
        let mut lab = Lab::new(tag);
        let ns = lab.netns("t");
        let peer = lab.netns("peer");
        ns.ip(&[
            "link", "add", "und0", "type", "veth", "peer", "name", "p0", "netns", &peer.name,
        ]);
        ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "und0"]);
        ns.ip(&["link", "set", "und0", "up"]);
        ns.ip(&[
            "neigh",
            "replace",
            "198.18.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "und0",
            "nud",
            "permanent",
        ]);
        // bpf_fib_lookup answers FWD_DISABLED without forwarding on the device
        // (the agent turns it on for the node).
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.ip(&[
            "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
        ]);
        let pins = lab.bpffs().join("t");
        let inside = InNetns::enter(&ns);
        let und = netdev::get("und0").expect("und0");
        let pod_ifindex = netdev::index("pod0").expect("pod0");
        let globals = Globals {
            vni,
            port,
            local_ip: Some(LOCAL),
            underlay_ifindex: und.index,
            vtep_mac: LOCAL_VTEP,
            underlay_mac: und.mac,
            cluster_cidr: Some("198.19.0.0/16".parse().unwrap()),
            cluster_cidr6: Some(CLUSTER6.parse().unwrap()),
            // No tunnel device: these tests take VXLAN over IPv6 in only.
            underlay6: Some((ipv6::LOCAL6, 0)),
            pod_mtu: 1450,
            bpf_log_level: 0,
        };
        let dp = Dataplane::load(&globals, &pins).expect("load dataplane");
        let mut maps = Maps::open(&pins).expect("open maps");
        let lpm = |cidr: &str| {
            let c: weft_agent::cidr::Ipv4Cidr = cidr.parse().unwrap();
            aya::maps::lpm_trie::Key::new(u32::from(c.prefix()), c.addr().octets())
        };
        maps.remotes
            .insert(
                &lpm("198.19.1.0/24"),
                RemoteNode {
                    underlay_ip: ip_key(LOCAL),
                    vtep_mac: LOCAL_VTEP,
                    ..RemoteNode::default()
                },
                0,
            )
            .unwrap();
        maps.remotes
            .insert(
                &lpm("198.19.2.0/24"),
                RemoteNode {
                    underlay_ip: ip_key(PEER),
                    vtep_mac: PEER_VTEP,
                    ..RemoteNode::default()
                },
                0,
            )
            .unwrap();
        maps.nodes.insert(ip_key(PEER), Vtep::default(), 0).unwrap();
        let ep = |flags| Endpoint {
            ifindex: pod_ifindex,
            pod_mac: POD_MAC,
            host_mac: HOST_VETH_MAC,
            flags,
        };
        maps.endpoints
            .insert(ip_key(POD), ep(Endpoint::FLAG_XDP_REDIRECT), 0)
            .unwrap();
        maps.endpoints.insert(ip_key(POD_NO_XDP), ep(0), 0).unwrap();
        ipv6::setup(&mut maps, pod_ifindex);
        drop(peer);
        Self {
            _inside: inside,
            dp,
            maps,
            und,
            pod_ifindex,
            pins,
            vni,
            port,
            _lab: lab,
        }
    }

    fn counters(&self) -> Counters {
        stats::read(&self.maps.drops, &self.maps.fwds)
    }

    /// Every drop counted, and only drops: after each run of a program on a
    /// frame (every case of every test here), the drop counters went up by
    /// exactly one when the program dropped it (`drop`: its drop action),
    /// else not at all.
    fn counted(&self, before: &Counters, action: u32, drop: u32, frame: &[u8]) {
        let total = |c: &Counters| DropReason::ALL.iter().map(|r| c.drop(*r)).sum::<u64>();
        let (was, is) = (total(before), total(&self.counters()));
        let want = u64::from(action == drop);
        assert_eq!(
            is - was,
            want,
            "action {action} on a {}-byte frame: {} drops counted, {want} expected",
            frame.len(),
            is - was
        );
    }

    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let before = self.counters();
        let prog: &mut Xdp = self.dp.program_mut(names::PROG_XDP_DECAP).unwrap();
        let out = run(|o| prog.test_run(o), frame);
        self.counted(&before, out.0, XDP_DROP, frame);
        out
    }

    /// Runs the underlay decap program of `hook`.
    fn decap(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        match hook {
            Hook::Xdp => self.xdp(frame),
            Hook::Tc => self.tc_prog(names::PROG_FROM_UNDERLAY, frame),
        }
    }

    /// Runs the TC program `name` on `frame` (no `__sk_buff` context).
    fn tc_prog(&mut self, name: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
        let before = self.counters();
        let prog: &mut SchedClassifier = self.dp.program_mut(name).unwrap();
        let out = run(|o| prog.test_run(o), frame);
        self.counted(&before, out.0, TC_ACT_SHOT, frame);
        out
    }

    /// Runs `weft_from_pod` on a frame arriving on the pods' veth.
    fn tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_on(self.pod_ifindex, frame)
    }

    /// Runs `weft_from_pod` on a frame arriving on device `ifindex`.
    fn tc_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = self.dp.program_mut(names::PROG_FROM_POD).unwrap();
        // struct __sk_buff up to `ifindex` (offset 40): the device the
        // program runs on; every other field zero.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let before = stats::read(&self.maps.drops, &self.maps.fwds);
        let out = run(
            |o| {
                prog.test_run(TestRunOptions {
                    ctx_in: Some(&ctx),
                    ..o
                })
            },
            frame,
        );
        self.counted(&before, out.0, TC_ACT_SHOT, frame);
        out
    }

    /// Sets the underlay device's MTU.
    fn und_mtu(&self, mtu: u32) {
        let mut nl = weft_agent::host::netlink::Netlink::open().expect("netlink");
        nl.set_link(
            self.und.index,
            &weft_agent::host::netlink::LinkChange {
                mtu: Some(mtu),
                ..Default::default()
            },
        )
        .expect("und0's MTU");
    }

    /// A VXLAN frame from `src` carrying `inner` (an Ethernet frame).
    fn vxlan_frame(&self, src: Ipv4Addr, vni: u32, dport: u16, inner: &[u8]) -> Vec<u8> {
        let outer_ip = Ipv4 {
            frag: 0,
            ..Ipv4::new(src, LOCAL, 17)
        };
        pktgen::eth(
            self.und.mac,
            PEER_MAC,
            pktgen::ETH_P_IP,
            &outer_ip.build(&pktgen::udp(50000, dport, &pktgen::vxlan(vni, inner))),
        )
    }
}

fn run(
    f: impl FnOnce(
        TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = f(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Asserts that exactly the listed counters moved, by the listed amounts.
fn assert_deltas(
    case: &str,
    before: &Counters,
    after: &Counters,
    drops: &[(DropReason, u64)],
    fwds: &[(FwdReason, u64)],
) {
    for r in DropReason::ALL {
        let want = drops.iter().find(|(d, _)| d == r).map_or(0, |(_, n)| *n);
        assert_eq!(
            after.drop(*r) - before.drop(*r),
            want,
            "{case}: drop counter {}",
            r.name()
        );
    }
    for r in FwdReason::ALL {
        let want = fwds.iter().find(|(d, _)| d == r).map_or(0, |(_, n)| *n);
        assert_eq!(
            after.fwd(*r) - before.fwd(*r),
            want,
            "{case}: forward counter {}",
            r.name()
        );
    }
}

/// Every counter that moved between `before` and `after` moved in one
/// family's share: IPv6's when `v6`, else IPv4's.
fn assert_family(case: &str, before: &Counters, after: &Counters, v6: bool) {
    let moved = |total: &[(String, u64)],
                 was: &[(String, u64)],
                 six: &[(String, u64)],
                 was6: &[(String, u64)]| {
        total
            .iter()
            .zip(was)
            .zip(six.iter().zip(was6))
            .map(|(((n, t), (_, w)), ((_, s), (_, w6)))| (n.clone(), t - w, s - w6))
            .collect::<Vec<_>>()
    };
    for (name, delta, delta6) in moved(
        &after.forwards,
        &before.forwards,
        &after.forwards_ipv6,
        &before.forwards_ipv6,
    )
    .into_iter()
    .chain(moved(
        &after.drops,
        &before.drops,
        &after.drops_ipv6,
        &before.drops_ipv6,
    )) {
        let want6 = if v6 { delta } else { 0 };
        assert_eq!(
            delta6, want6,
            "{case}: {name} moved {delta}, of it IPv6 {delta6}"
        );
    }
}

/// An inner frame: IPv4 ICMP echo from a remote pod to `dst`.
fn inner_frame(dst: Ipv4Addr) -> Vec<u8> {
    let ip = Ipv4::new(REMOTE_POD, dst, 1).build(&pktgen::icmp_echo(7, 1, b"weft-test-payload"));
    pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IP, &ip)
}

/// The two decap hooks, run through the same cases.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// (redirect, pass, drop) verdicts.
    fn verdicts(self) -> (u32, u32, u32) {
        match self {
            Hook::Xdp => (XDP_REDIRECT, XDP_PASS, XDP_DROP),
            Hook::Tc => (TC_ACT_REDIRECT, TC_ACT_UNSPEC, TC_ACT_SHOT),
        }
    }

    /// The counter of a decapsulated frame delivered into a pod.
    fn delivered(self) -> FwdReason {
        match self {
            Hook::Xdp => FwdReason::DecapRedirect,
            Hook::Tc => FwdReason::DecapPeer,
        }
    }
}

#[test]
fn xdp_decap_cases() {
    if !privileged("xdp_decap_cases") {
        return;
    }
    decap_cases(Hook::Xdp);
}

#[test]
fn tc_decap_cases() {
    if !privileged("tc_decap_cases") {
        return;
    }
    decap_cases(Hook::Tc);
}

fn decap_cases(hook: Hook) {
    let mut fx = Fixture::new("pkx", 1, 8472);
    let (vni, port) = (fx.vni, fx.port);
    let (redirect, pass, drop) = hook.verdicts();

    // decap → local pod: inner frame, MACs rewritten. (TC keeps the outer
    // Ethernet header and rewrites it: the same bytes.)
    let inner = inner_frame(POD);
    let frame = fx.vxlan_frame(PEER, vni, port, &inner);
    let before = fx.counters();
    let (action, out) = fx.decap(hook, &frame);
    assert_eq!(action, redirect, "decap to pod");
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

    // decap → the node itself (gateway): passed up with the underlay MAC.
    // XDP also passes a pod without NAPI (no XDP redirect into it); TC's
    // bpf_redirect_peer needs no NAPI.
    for (case, dst) in [
        ("decap to node", GATEWAY),
        ("decap to pod without NAPI", POD_NO_XDP),
    ] {
        let inner = inner_frame(dst);
        let frame = fx.vxlan_frame(PEER, vni, port, &inner);
        let before = fx.counters();
        let (action, out) = fx.decap(hook, &frame);
        let mut want = inner.clone();
        if hook == Hook::Tc && dst == POD_NO_XDP {
            assert_eq!(action, redirect, "{case}");
            want[0..6].copy_from_slice(&POD_MAC);
            want[6..12].copy_from_slice(&HOST_VETH_MAC);
            assert_eq!(out, want, "{case}: output frame");
            assert_deltas(case, &before, &fx.counters(), &[], &[(hook.delivered(), 1)]);
            continue;
        }
        assert_eq!(action, pass, "{case}");
        want[0..6].copy_from_slice(&fx.und.mac);
        if hook == Hook::Tc {
            // The outer header stays: its source is the sending node.
            want[6..12].copy_from_slice(&frame[6..12]);
        }
        assert_eq!(out, want, "{case}: output frame");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::DecapPass, 1)],
        );
    }

    // decap → an address that is not this node's (another node's pod, or
    // outside the cluster): dropped, never forwarded on.
    for (case, dst) in [
        ("inner destination on another node", REMOTE_POD),
        (
            "inner destination outside the cluster",
            Ipv4Addr::new(198, 18, 200, 1),
        ),
    ] {
        let inner = inner_frame(dst);
        let frame = fx.vxlan_frame(PEER, vni, port, &inner);
        let before = fx.counters();
        let (action, _) = fx.decap(hook, &frame);
        assert_eq!(action, drop, "{case}");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[(DropReason::NotLocal, 1)],
            &[],
        );
    }

    // Outer IPv4 with options (IHL 6): still ours, still decapsulated.
    let outer_ip = Ipv4 {
        frag: 0,
        options: vec![1, 1, 1, 0],
        ..Ipv4::new(PEER, LOCAL, 17)
    };
    let frame = pktgen::eth(
        fx.und.mac,
        PEER_MAC,
        pktgen::ETH_P_IP,
        &outer_ip.build(&pktgen::udp(50000, port, &pktgen::vxlan(vni, &inner))),
    );
    let before = fx.counters();
    let (action, out) = fx.decap(hook, &frame);
    assert_eq!(action, redirect, "outer IP options");
    assert_eq!(out[12..], inner[12..], "outer IP options: inner frame");
    assert_deltas(
        "outer IP options",
        &before,
        &fx.counters(),
        &[],
        &[(hook.delivered(), 1)],
    );

    // Wrong VNI, unknown source, inner not IPv4: dropped and counted.
    let arp_inner = pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_ARP, &[0u8; 28]);
    let bad_flags = {
        let mut f = fx.vxlan_frame(PEER, vni, port, &inner);
        f[42] = 0; // clear the I flag
        f
    };
    for (case, frame, reason) in [
        (
            "wrong VNI",
            fx.vxlan_frame(PEER, vni + 1, port, &inner),
            DropReason::WrongVni,
        ),
        ("VXLAN without the I flag", bad_flags, DropReason::WrongVni),
        (
            "unknown source VTEP",
            fx.vxlan_frame(STRANGER, vni, port, &inner),
            DropReason::UnknownVtep,
        ),
        (
            "inner ARP",
            fx.vxlan_frame(PEER, vni, port, &arp_inner),
            DropReason::InnerNotIp,
        ),
    ] {
        let before = fx.counters();
        let (action, _) = fx.decap(hook, &frame);
        assert_eq!(action, drop, "{case}");
        assert_deltas(case, &before, &fx.counters(), &[(reason, 1)], &[]);
    }

    // Not ours: passes untouched.
    let udp_other = pktgen::eth(
        fx.und.mac,
        PEER_MAC,
        pktgen::ETH_P_IP,
        &Ipv4::new(PEER, LOCAL, 17).build(&pktgen::udp(50000, 53, b"dns?")),
    );
    let to_other_host = fx
        .vxlan_frame(PEER, vni, port, &inner)
        .iter()
        .enumerate()
        .map(|(i, b)| if i == 33 { 77 } else { *b })
        .collect::<Vec<u8>>();
    let fragment = {
        let ip = Ipv4 {
            frag: 0x2000,
            ..Ipv4::new(PEER, LOCAL, 17)
        };
        pktgen::eth(
            fx.und.mac,
            PEER_MAC,
            pktgen::ETH_P_IP,
            &ip.build(&pktgen::udp(50000, port, &pktgen::vxlan(vni, &inner))),
        )
    };
    let vlan = {
        let mut payload = vec![0x00, 0x05, 0x08, 0x00];
        payload.extend_from_slice(&fx.vxlan_frame(PEER, vni, port, &inner)[14..]);
        pktgen::eth(fx.und.mac, PEER_MAC, pktgen::ETH_P_8021Q, &payload)
    };
    for (case, frame) in [
        (
            "wrong UDP port",
            fx.vxlan_frame(PEER, vni, port.wrapping_add(1), &inner),
        ),
        ("other UDP", udp_other),
        ("outer fragment", fragment),
        ("VLAN-tagged", vlan),
        (
            "ARP",
            pktgen::eth([0xff; 6], PEER_MAC, pktgen::ETH_P_ARP, &[0u8; 28]),
        ),
        (
            "IPv6",
            pktgen::eth(fx.und.mac, PEER_MAC, pktgen::ETH_P_IPV6, &[0x60u8; 48]),
        ),
        ("VXLAN for another address", to_other_host),
    ] {
        let before = fx.counters();
        let (action, out) = fx.decap(hook, &frame);
        assert_eq!(action, pass, "{case}");
        assert_eq!(out, frame, "{case}: must pass untouched");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::Passthrough, 1)],
        );
    }

    // Truncated at every header boundary: before the UDP port is readable it
    // is not (yet) ours and passes; after, a short VXLAN frame is malformed.
    let full = fx.vxlan_frame(PEER, vni, port, &inner);
    for len in [14, 20, 33, 34, 41, 42, 45, 49, 50, 55, 63, 64, 70, 83] {
        if hook == Hook::Tc && len < 34 {
            // test_run refuses an skb shorter than its IPv4 header.
            continue;
        }
        let frame = &full[..len];
        let before = fx.counters();
        let (action, _) = fx.decap(hook, frame);
        let case = format!("truncated to {len} bytes");
        if len < 42 {
            assert_eq!(action, pass, "{case}");
            assert_deltas(
                &case,
                &before,
                &fx.counters(),
                &[],
                &[(FwdReason::Passthrough, 1)],
            );
        } else {
            assert_eq!(action, drop, "{case}");
            assert_deltas(
                &case,
                &before,
                &fx.counters(),
                &[(DropReason::Malformed, 1)],
                &[],
            );
        }
    }
}

#[test]
fn xdp_decap_custom_vni_and_port() {
    if !privileged("xdp_decap_custom_vni_and_port") {
        return;
    }
    let mut fx = Fixture::new("pkv", 4242, 4789);
    let inner = inner_frame(POD);
    let (action, _) = fx.xdp(&fx.vxlan_frame(PEER, 4242, 4789, &inner));
    assert_eq!(action, XDP_REDIRECT, "configured VNI/port");
    let before = fx.counters();
    let (action, _) = fx.xdp(&fx.vxlan_frame(PEER, 1, 4789, &inner));
    assert_eq!(action, XDP_DROP, "flannel's default VNI is not ours here");
    assert_deltas(
        "VNI 1 on a VNI 4242 node",
        &before,
        &fx.counters(),
        &[(DropReason::WrongVni, 1)],
        &[],
    );
    let frame = fx.vxlan_frame(PEER, 4242, 8472, &inner);
    let (action, out) = fx.xdp(&frame);
    assert_eq!(
        (action, out),
        (XDP_PASS, frame),
        "port 8472 is not ours here"
    );
}

/// The expected encapsulation of `inner_ip` (an IPv4 packet) for the peer
/// node, built field by field from RFC 7348 and the kernel vxlan defaults.
fn expected_encap(fx: &Fixture, inner_ip: &[u8], sport: u16, ip_id: u16) -> Vec<u8> {
    expected_encap_of(fx, pktgen::ETH_P_IP, inner_ip, sport, ip_id)
}

/// [`expected_encap`] of an inner packet of EtherType `inner_proto`.
fn expected_encap_of(
    fx: &Fixture,
    inner_proto: u16,
    inner_ip: &[u8],
    sport: u16,
    ip_id: u16,
) -> Vec<u8> {
    let inner = pktgen::eth(PEER_VTEP, LOCAL_VTEP, inner_proto, inner_ip);
    let outer = Ipv4 {
        ttl: 64,
        id: ip_id,
        frag: 0,
        ..Ipv4::new(LOCAL, PEER, 17)
    };
    pktgen::eth(
        PEER_MAC,
        fx.und.mac,
        pktgen::ETH_P_IP,
        &outer.build(&pktgen::udp(sport, fx.port, &pktgen::vxlan(fx.vni, &inner))),
    )
}

#[test]
fn tc_encap_and_local_cases() {
    if !privileged("tc_encap_and_local_cases") {
        return;
    }
    for (vni, port) in [(1, 8472), (77, 4789)] {
        let mut fx = Fixture::new("pkt", vni, port);
        let pod_src_mac = [0x02, 0xcc, 0, 0, 0, 1];
        let sent_ip = Ipv4::new(POD, REMOTE_POD, 1).build(&pktgen::icmp_echo(9, 3, &[0xab; 100]));
        let frame = pktgen::eth(HOST_VETH_MAC, pod_src_mac, pktgen::ETH_P_IP, &sent_ip);
        let before = fx.counters();
        let (action, out) = fx.tc(&frame);
        assert_eq!(
            action,
            TC_ACT_REDIRECT,
            "encap (vni {vni}): {:?}",
            fx.counters().drops
        );
        assert_eq!(out.len(), frame.len() + 50, "encap adds 50 bytes");
        // The source port comes from the flow hash and the IP ID from it too:
        // take both from the output, check them, build the rest independently.
        let sport = u16::from_be_bytes([out[34], out[35]]);
        let ip_id = u16::from_be_bytes([out[18], out[19]]);
        assert!(
            (32768..61000).contains(&sport),
            "source port {sport} in the ephemeral range"
        );
        let routed = Ipv4 {
            ttl: 63,
            ..Ipv4::new(POD, REMOTE_POD, 1)
        }
        .build(&pktgen::icmp_echo(9, 3, &[0xab; 100]));
        assert_eq!(
            out,
            expected_encap(&fx, &routed, sport, ip_id),
            "encap output byte for byte (vni {vni}, port {port})"
        );
        assert_deltas(
            "encap",
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::Encap, 1)],
        );

        // Same flow → same source port (ECMP keeps a flow on one path).
        let (_, again) = fx.tc(&frame);
        assert_eq!(
            &again[34..36],
            &out[34..36],
            "source port is stable per flow"
        );
    }

    let mut fx = Fixture::new("pkl", 1, 8472);
    // Pod → pod on this node: MACs rewritten, TTL decremented, redirected to the peer.
    let sent = Ipv4::new(POD_NO_XDP, POD, 17).build(&pktgen::udp(1000, 2000, b"hi"));
    let frame = pktgen::eth(
        HOST_VETH_MAC,
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_IP,
        &sent,
    );
    let before = fx.counters();
    let (action, out) = fx.tc(&frame);
    assert_eq!(action, TC_ACT_REDIRECT, "local delivery");
    let routed = Ipv4 {
        ttl: 63,
        ..Ipv4::new(POD_NO_XDP, POD, 17)
    }
    .build(&pktgen::udp(1000, 2000, b"hi"));
    assert_eq!(
        out,
        pktgen::eth(POD_MAC, HOST_VETH_MAC, pktgen::ETH_P_IP, &routed),
        "local delivery frame"
    );
    assert_deltas(
        "local delivery",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::Local, 1)],
    );

    // Not ours: outside the cluster CIDR, non-IPv4, the gateway, TTL 1.
    let outside = pktgen::eth(
        HOST_VETH_MAC,
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_IP,
        &Ipv4::new(POD, PEER, 17).build(&pktgen::udp(1, 2, b"x")),
    );
    let arp = pktgen::eth(
        [0xff; 6],
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_ARP,
        &[0u8; 28],
    );
    let to_gw = pktgen::eth(
        HOST_VETH_MAC,
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_IP,
        &Ipv4::new(POD, GATEWAY, 17).build(&pktgen::udp(1, 2, b"x")),
    );
    let ttl1 = pktgen::eth(
        HOST_VETH_MAC,
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_IP,
        &Ipv4 {
            ttl: 1,
            ..Ipv4::new(POD, REMOTE_POD, 17)
        }
        .build(&pktgen::udp(1, 2, b"x")),
    );
    for (case, frame) in [
        ("outside the cluster", outside),
        ("ARP", arp),
        ("to the gateway", to_gw),
        ("TTL 1", ttl1),
    ] {
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

    // In the cluster CIDR but owned by no node; and an IPv4 header claiming
    // fewer than 20 bytes (the kernel's test_run refuses frames shorter than
    // an IPv4 header, so truncation is covered by the XDP cases).
    let nowhere = pktgen::eth(
        HOST_VETH_MAC,
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_IP,
        &Ipv4::new(POD, Ipv4Addr::new(198, 19, 77, 1), 17).build(&pktgen::udp(1, 2, b"x")),
    );
    let mut bad_ihl = pktgen::eth(
        HOST_VETH_MAC,
        [2, 0xcc, 0, 0, 0, 2],
        pktgen::ETH_P_IP,
        &Ipv4::new(POD, REMOTE_POD, 17).build(&pktgen::udp(1, 2, b"x")),
    );
    bad_ihl[14] = 0x44;
    for (case, frame, reason) in [
        ("no route", nowhere, DropReason::NoRoute),
        ("IPv4 header length 16", bad_ihl, DropReason::Malformed),
    ] {
        let before = fx.counters();
        let (action, _) = fx.tc(&frame);
        assert_eq!(action, TC_ACT_SHOT, "{case}");
        assert_deltas(case, &before, &fx.counters(), &[(reason, 1)], &[]);
    }
    // Every counter of this IPv4 traffic is IPv4's.
    assert_family("IPv4 cases", &Counters::default(), &fx.counters(), false);
}

/// The next-hop cache keeps the FIB's checks: a packet that is not GSO is
/// served from it only when the FIB already passed one at least as long
/// with that next hop (a longer one is looked up again, which checks it
/// against the route's MTU), and a change of generation (what the agent
/// does at every rtnetlink change) makes the next packet look up again.
#[test]
fn cached_next_hops_keep_the_mtu_check() {
    if !privileged("cached_next_hops_keep_the_mtu_check") {
        return;
    }
    let mut fx = Fixture::new("pkn", 1, 8472);
    let pod_mac = [0x02, 0xcc, 0, 0, 0, 1];
    // A UDP packet from the pod whose IP packet is `ip_len` bytes: 50 more
    // outside after encapsulation.
    let frame = |ip_len: usize| {
        let payload = vec![0x5a; ip_len - 28];
        let ip = Ipv4::new(POD, REMOTE_POD, 17).build(&pktgen::udp(40000, 5001, &payload));
        pktgen::eth(HOST_VETH_MAC, pod_mac, pktgen::ETH_P_IP, &ip)
    };
    let send = |fx: &mut Fixture, ip_len: usize| {
        let before = fx.counters();
        let (action, _) = fx.tc(&frame(ip_len));
        let mtu_drops = fx.counters().drop(DropReason::Mtu) - before.drop(DropReason::Mtu);
        (action, mtu_drops)
    };
    // und0's MTU is 1500: the largest that fits is 1450 inside.
    assert_eq!(send(&mut fx, 100), (TC_ACT_REDIRECT, 0), "small: cached");
    assert_eq!(send(&mut fx, 1451), (TC_ACT_SHOT, 1), "1 byte too long");
    assert_eq!(send(&mut fx, 1450), (TC_ACT_REDIRECT, 0), "the longest");
    assert_eq!(
        send(&mut fx, 1451),
        (TC_ACT_SHOT, 1),
        "still too long with the cache warm"
    );
    // The underlay's MTU shrinks; the cache still holds 1500-byte answers
    // until the generation moves on.
    fx.und_mtu(1400);
    let mut generation = Generation::open(&fx.pins).unwrap();
    generation.bump().unwrap();
    assert_eq!(
        send(&mut fx, 1450),
        (TC_ACT_SHOT, 1),
        "the next packet is checked against the new MTU"
    );
    assert_eq!(
        send(&mut fx, 1350),
        (TC_ACT_REDIRECT, 0),
        "fits the new MTU"
    );
}

#[test]
fn shaped_pods_take_the_stack_both_ways() {
    if !privileged("shaped_pods_take_the_stack_both_ways") {
        return;
    }
    let mut fx = Fixture::new("pkb", 1, 8472);
    // setup: a third pod on the fixture's veth, shaped (a qdisc on its veth,
    // e.g. the bandwidth plugin's), XDP redirect possible.
    const SHAPED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 12);
    let pod_ifindex = fx.pod_ifindex;
    let shaped_ep = |flags| Endpoint {
        ifindex: pod_ifindex,
        pod_mac: POD_MAC,
        host_mac: HOST_VETH_MAC,
        flags,
    };
    let both = Endpoint::FLAG_XDP_REDIRECT | Endpoint::FLAG_SHAPED;
    let ep = shaped_ep(both);
    fx.maps.endpoints.insert(ip_key(SHAPED), ep, 0).unwrap();
    let udp = |src, dst| {
        pktgen::eth(
            HOST_VETH_MAC,
            [2, 0xcc, 0, 0, 0, 2],
            pktgen::ETH_P_IP,
            &Ipv4::new(src, dst, 17).build(&pktgen::udp(1000, 2000, b"hi")),
        )
    };

    // pktgen: the shaped pod sends to a pod on another node, to one on this
    // node, and out of the cluster; an unshaped pod sends to the shaped one.
    // check: no verdict (the tc filter after weft's program, e.g. the
    // bandwidth plugin's redirect to its ifb, decides; then the stack),
    // untouched, counted as to the stack.
    for (case, frame) in [
        ("shaped pod to a remote pod", udp(SHAPED, REMOTE_POD)),
        ("shaped pod to a local pod", udp(SHAPED, POD)),
        ("shaped pod out of the cluster", udp(SHAPED, PEER)),
        ("a local pod to the shaped pod", udp(POD, SHAPED)),
    ] {
        let before = fx.counters();
        let (action, out) = fx.tc(&frame);
        assert_eq!((action, &out), (TC_ACT_UNSPEC, &frame), "{case}");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }
    // From weft0 (the node itself) the redirect is to the veth's egress,
    // which passes its qdisc: unchanged.
    let from_node = udp(GATEWAY, SHAPED);
    let (action, _) = fx.tc_prog(names::PROG_FROM_HOST, &from_node);
    assert_eq!(action, TC_ACT_REDIRECT, "the node to the shaped pod");

    // Decapsulated for the shaped pod: passed up with the underlay's MAC, in
    // both decap hooks, so that the stack routes it through the veth's qdisc.
    for hook in [Hook::Xdp, Hook::Tc] {
        let (_, pass, _) = hook.verdicts();
        let inner = inner_frame(SHAPED);
        let frame = fx.vxlan_frame(PEER, fx.vni, fx.port, &inner);
        let before = fx.counters();
        let (action, out) = fx.decap(hook, &frame);
        let mut want = inner.clone();
        want[0..6].copy_from_slice(&fx.und.mac);
        if hook == Hook::Tc {
            want[6..12].copy_from_slice(&frame[6..12]);
        }
        assert_eq!(
            (action, &out),
            (pass, &want),
            "{hook:?} decap to the shaped pod"
        );
        assert_deltas(
            "decap to the shaped pod",
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }

    // What the stack delivers to the shaped pod (weft_to_pod) and forwards
    // from it to another node (weft_from_host) is not recorded in the stack
    // flows map: the pod's replies take the stack anyway, and a busy shaped
    // pod must not crowd NATed flows out of the map.
    let flows = weft_agent::dataplane::stack_flows(&fx.pins).expect("open the stack flows map");
    let syn = Ipv4::new(REMOTE_POD, SHAPED, 6).build(&pktgen::tcp(40000, 80, pktgen::TCP_SYN, b""));
    let to_shaped = pktgen::eth(POD_MAC, HOST_VETH_MAC, pktgen::ETH_P_IP, &syn);
    let (action, _) = fx.tc_prog(names::PROG_TO_POD, &to_shaped);
    assert_eq!(action, TC_ACT_UNSPEC, "weft_to_pod passes");
    let ack = Ipv4::new(SHAPED, REMOTE_POD, 6).build(&pktgen::tcp(80, 40000, pktgen::TCP_ACK, b""));
    let from_shaped = pktgen::eth(HOST_VETH_MAC, POD_MAC, pktgen::ETH_P_IP, &ack);
    let (action, _) = fx.tc_prog(names::PROG_FROM_HOST, &from_shaped);
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "forwarded by the stack, encapsulated on weft0"
    );
    for key in [
        flow_key(SHAPED, 80, REMOTE_POD, 40000, 6),
        flow_key(REMOTE_POD, 40000, SHAPED, 80, 6),
    ] {
        assert!(
            flows.get(&key, 0).is_err(),
            "no stack flow recorded: {key:?}"
        );
    }

    // The flag, not the address, decides: unshaped, the same pod is back on
    // the fast paths.
    let ep = shaped_ep(Endpoint::FLAG_XDP_REDIRECT);
    fx.maps.endpoints.insert(ip_key(SHAPED), ep, 0).unwrap();
    assert_eq!(
        fx.tc(&udp(SHAPED, REMOTE_POD)).0,
        TC_ACT_REDIRECT,
        "encapsulated"
    );
    assert_eq!(fx.tc(&udp(POD, SHAPED)).0, TC_ACT_REDIRECT, "short-cut");
    let frame = fx.vxlan_frame(PEER, fx.vni, fx.port, &inner_frame(SHAPED));
    assert_eq!(fx.decap(Hook::Xdp, &frame).0, XDP_REDIRECT, "XDP decap");
    assert_eq!(fx.decap(Hook::Tc, &frame).0, TC_ACT_REDIRECT, "TC decap");
}

#[test]
fn tc_from_pod_drops_spoofed_sources() {
    if !privileged("tc_from_pod_drops_spoofed_sources") {
        return;
    }
    let mut fx = Fixture::new("pks", 1, 8472);
    let from = |src: Ipv4Addr, dst: Ipv4Addr| {
        pktgen::eth(
            HOST_VETH_MAC,
            [2, 0xcc, 0, 0, 0, 3],
            pktgen::ETH_P_IP,
            &Ipv4::new(src, dst, 17).build(&pktgen::udp(1, 2, b"x")),
        )
    };
    let und = fx.und.index;
    let pods = fx.pod_ifindex;
    // (case, device it arrives on, frame): every one would be forwarded or
    // passed with an honest source.
    for (case, ifindex, frame) in [
        (
            "a local pod's address on another veth",
            und,
            from(POD, REMOTE_POD),
        ),
        (
            "an address no pod has, to a remote pod",
            pods,
            from(Ipv4Addr::new(198, 19, 1, 77), REMOTE_POD),
        ),
        (
            "a remote pod's address, to a local pod",
            pods,
            from(REMOTE_POD, POD),
        ),
        (
            "a remote pod's address, out of the cluster",
            pods,
            from(REMOTE_POD, PEER),
        ),
        (
            "the gateway's address, to the gateway",
            pods,
            from(GATEWAY, GATEWAY),
        ),
    ] {
        let before = fx.counters();
        let (action, _) = fx.tc_on(ifindex, &frame);
        assert_eq!(action, TC_ACT_SHOT, "{case}");
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[(DropReason::SpoofedSource, 1)],
            &[],
        );
    }
    // The same frame from its own veth is encapsulated; ARP is not checked.
    let before = fx.counters();
    let (action, _) = fx.tc_on(pods, &from(POD, REMOTE_POD));
    assert_eq!(action, TC_ACT_REDIRECT, "honest source");
    assert_deltas(
        "honest source",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::Encap, 1)],
    );
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The key of one direction of a flow, as the map stores it.
fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        saddr: ip_key(src),
        daddr: ip_key(dst),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

/// Replies of flows the node's stack forwarded (kube-proxy's DNAT, hostPorts)
/// go back through the stack: the egress programs that see stack-forwarded
/// packets record the reply's tuple, and the fast paths hand such replies,
/// fragments and ICMP errors to the stack.
#[test]
fn stack_forwarded_flows_return_through_the_stack() {
    if !privileged("stack_forwarded_flows_return_through_the_stack") {
        return;
    }
    const SEC: u64 = 1_000_000_000;
    let mut fx = Fixture::new("pks", 1, 8472);
    let flows = weft_agent::dataplane::stack_flows(&fx.pins).expect("open the stack flows map");
    let expiry_in = |key: &FlowKey| -> (u64, u32) {
        let st: FlowState = flows.get(key, 0).expect("the flow is recorded");
        (st.expires_ns.saturating_sub(monotonic_ns()), st.flags)
    };
    let pod_mac = [0x02, 0xcc, 0, 0, 0, 1];
    let from_pod = |ip: Vec<u8>| pktgen::eth(HOST_VETH_MAC, pod_mac, pktgen::ETH_P_IP, &ip);
    let tcp = |src, sport, dst, dport, flags| {
        Ipv4::new(src, dst, 6).build(&pktgen::tcp(sport, dport, flags, b"x"))
    };

    // pktgen: the stack delivers a TCP SYN from a remote pod to the local pod
    // (say after a hostPort DNAT), through the pod veth's egress.
    // check: weft_to_pod lets it through, counts nothing, records the reply.
    let syn = tcp(REMOTE_POD, 40000, POD, 8080, pktgen::TCP_SYN);
    let frame = pktgen::eth(POD_MAC, HOST_VETH_MAC, pktgen::ETH_P_IP, &syn);
    let before = fx.counters();
    let (action, out) = fx.tc_prog(names::PROG_TO_POD, &frame);
    assert_eq!(
        (action, &out),
        (TC_ACT_UNSPEC, &frame),
        "weft_to_pod passes"
    );
    assert_deltas("weft_to_pod", &before, &fx.counters(), &[], &[]);
    let reply = flow_key(POD, 8080, REMOTE_POD, 40000, 6);
    let (left, flags) = expiry_in(&reply);
    assert!(
        (4 * 24 * 3600 * SEC..5 * 24 * 3600 * SEC + SEC).contains(&left) && flags == 0,
        "a TCP flow lives five days after its last packet: {left} ns, flags {flags}"
    );

    // The pod's reply goes to the stack (TC_ACT_UNSPEC, untouched) instead of
    // being encapsulated; another flow of the same pod is not affected.
    let synack = from_pod(tcp(
        POD,
        8080,
        REMOTE_POD,
        40000,
        pktgen::TCP_SYN | pktgen::TCP_ACK,
    ));
    let before = fx.counters();
    let (action, out) = fx.tc(&synack);
    assert_eq!(
        (action, &out),
        (TC_ACT_UNSPEC, &synack),
        "reply to the stack"
    );
    assert_deltas(
        "reply",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::ToStack, 1)],
    );
    let other = from_pod(tcp(POD, 8081, REMOTE_POD, 40000, pktgen::TCP_ACK));
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

    // FIN: the entry lives out a TIME_WAIT from the last packet; a new SYN
    // on the same tuple starts it over.
    let fin = tcp(
        REMOTE_POD,
        40000,
        POD,
        8080,
        pktgen::TCP_FIN | pktgen::TCP_ACK,
    );
    fx.tc_prog(
        names::PROG_TO_POD,
        &pktgen::eth(POD_MAC, HOST_VETH_MAC, pktgen::ETH_P_IP, &fin),
    );
    let (left, flags) = expiry_in(&reply);
    assert!(
        (100 * SEC..=120 * SEC).contains(&left) && flags == FlowState::CLOSING,
        "closing: {left} ns, flags {flags}"
    );
    fx.tc(&synack);
    assert_eq!(
        expiry_in(&reply).1,
        FlowState::CLOSING,
        "a reply keeps it closing"
    );
    fx.tc_prog(names::PROG_TO_POD, &frame);
    let (left, flags) = expiry_in(&reply);
    assert!(
        left > 4 * 24 * 3600 * SEC && flags == 0,
        "a new SYN starts the flow over: {left} ns, flags {flags}"
    );

    // pktgen: the stack forwards a pod's UDP query to a remote pod (say a
    // Service DNAT'd to a backend on another node), out of weft0.
    // check: encapsulated as before, and the reply recorded (UDP: 3 minutes).
    let query = Ipv4::new(POD, REMOTE_POD, 17).build(&pktgen::udp(33000, 53, b"query"));
    let frame = pktgen::eth(HOST_VETH_MAC, HOST_VETH_MAC, pktgen::ETH_P_IP, &query);
    let before = fx.counters();
    let (action, _) = fx.tc_prog(names::PROG_FROM_HOST, &frame);
    assert_eq!(action, TC_ACT_REDIRECT, "weft_from_host encapsulates");
    assert_deltas(
        "weft0",
        &before,
        &fx.counters(),
        &[],
        &[(FwdReason::Encap, 1)],
    );
    let answer_key = flow_key(REMOTE_POD, 53, POD, 33000, 17);
    let (left, _) = expiry_in(&answer_key);
    assert!(
        (170 * SEC..=180 * SEC).contains(&left),
        "UDP: three minutes, {left} ns"
    );
    // The node's own traffic (from the gateway address) is not recorded: its
    // replies go to the stack anyway.
    let own = Ipv4::new(GATEWAY, REMOTE_POD, 17).build(&pktgen::udp(33001, 53, b"query"));
    fx.tc_prog(
        names::PROG_FROM_HOST,
        &pktgen::eth(HOST_VETH_MAC, HOST_VETH_MAC, pktgen::ETH_P_IP, &own),
    );
    assert!(
        flows
            .get(&flow_key(REMOTE_POD, 53, GATEWAY, 33001, 17), 0)
            .is_err(),
        "the node's own flow is not recorded"
    );

    // The answer arrives in VXLAN: both decap hooks pass it up the stack
    // (underlay MAC, as for the node itself) instead of into the pod.
    let answer = Ipv4::new(REMOTE_POD, POD, 17).build(&pktgen::udp(53, 33000, b"answer"));
    let inner = pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IP, &answer);
    for hook in [Hook::Xdp, Hook::Tc] {
        let (_, pass, _) = hook.verdicts();
        let frame = fx.vxlan_frame(PEER, fx.vni, fx.port, &inner);
        let before = fx.counters();
        let (action, out) = fx.decap(hook, &frame);
        assert_eq!(action, pass, "{hook:?}: the answer goes to the stack");
        let mut want = inner.clone();
        want[0..6].copy_from_slice(&fx.und.mac);
        if hook == Hook::Tc {
            want[6..12].copy_from_slice(&frame[6..12]);
        }
        assert_eq!(out, want, "{hook:?}: decapsulated frame");
        assert_deltas(
            &format!("{hook:?} answer"),
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }

    // A stale entry (expired) is ignored: the fast path again.
    let stale = flow_key(POD, 9000, REMOTE_POD, 9001, 6);
    let mut flows = flows;
    flows
        .insert(
            stale,
            FlowState {
                expires_ns: 1,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    let (action, _) = fx.tc(&from_pod(tcp(POD, 9000, REMOTE_POD, 9001, pktgen::TCP_ACK)));
    assert_eq!(action, TC_ACT_REDIRECT, "an expired entry is ignored");

    // Fragments (the stack reassembles them for NAT) and ICMP errors (NAT
    // rewrites the header they quote) take the stack from a pod and from the
    // underlay; an echo request does not.
    let fragment = Ipv4 {
        frag: 0x2000, // MF
        ..Ipv4::new(POD, REMOTE_POD, 17)
    }
    .build(&pktgen::udp(1, 2, &[0; 64]));
    let unreachable = Ipv4::new(POD, REMOTE_POD, 1).build(&pktgen::icmp_error(3, 3, &query[..28]));
    for (case, ip) in [("fragment", &fragment), ("ICMP error", &unreachable)] {
        let before = fx.counters();
        assert_eq!(
            fx.tc(&from_pod(ip.clone())).0,
            TC_ACT_UNSPEC,
            "{case} from a pod"
        );
        assert_deltas(
            case,
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }
    let echo = Ipv4::new(POD, REMOTE_POD, 1).build(&pktgen::icmp_echo(1, 1, b"x"));
    assert_eq!(
        fx.tc(&from_pod(echo)).0,
        TC_ACT_REDIRECT,
        "echo is encapsulated"
    );
    let inbound_fragment = Ipv4 {
        frag: 0x2000,
        ..Ipv4::new(REMOTE_POD, POD, 17)
    }
    .build(&pktgen::udp(2, 1, &[0; 64]));
    for hook in [Hook::Xdp, Hook::Tc] {
        let inner = pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IP, &inbound_fragment);
        let frame = fx.vxlan_frame(PEER, fx.vni, fx.port, &inner);
        let before = fx.counters();
        assert_eq!(
            fx.decap(hook, &frame).0,
            hook.verdicts().1,
            "{hook:?} fragment"
        );
        assert_deltas(
            "fragment",
            &before,
            &fx.counters(),
            &[],
            &[(FwdReason::ToStack, 1)],
        );
    }
}

/// Not a test: a measurement, run by hand (`cargo test -p weft-tests --test
/// packets -- --ignored --nocapture program_cost`; `N` runs per program,
/// default 100,000). The kernel's time per run of each fast path on a
/// 64-byte UDP packet (BPF_PROG_TEST_RUN, one run per call: the paths
/// change the packet), from a quiet machine rather than a loaded one as in
/// `weft profile`. Two differences from live traffic: a test skb carries no
/// flow hash, so encap's `bpf_get_hash_recalc` computes one here (about
/// 110 ns on the development VM) where a socket's packet brings its own;
/// and each call's run includes the kernel's timing overhead (about 50 ns:
/// the last line, a frame the program only counts).
#[test]
#[ignore = "a measurement, run by hand"]
fn program_cost() {
    let mut fx = Fixture::new("pkm", 1, 8472);
    let n: u32 = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let payload = [0x5a; 18];
    let to_pod = Ipv4::new(REMOTE_POD, POD, 17).build(&pktgen::udp(40000, 5001, &payload));
    let inner = pktgen::eth(LOCAL_VTEP, PEER_VTEP, pktgen::ETH_P_IP, &to_pod);
    let decap = fx.vxlan_frame(PEER, 1, 8472, &inner);
    let pod_mac = [2, 0xcc, 0, 0, 0, 1];
    let from_pod = Ipv4::new(POD, REMOTE_POD, 17).build(&pktgen::udp(40000, 5001, &payload));
    let encap = pktgen::eth(HOST_VETH_MAC, pod_mac, pktgen::ETH_P_IP, &from_pod);
    let arp = pktgen::eth(HOST_VETH_MAC, pod_mac, 0x0806, &[0u8; 46]);
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&fx.pod_ifindex.to_ne_bytes());
    let cases = [
        (
            "decap to a pod",
            names::PROG_FROM_UNDERLAY,
            &decap,
            None,
            TC_ACT_REDIRECT,
        ),
        (
            "encap",
            names::PROG_FROM_POD,
            &encap,
            Some(&ctx[..]),
            TC_ACT_REDIRECT,
        ),
        (
            "counted only",
            names::PROG_FROM_POD,
            &arp,
            Some(&ctx[..]),
            TC_ACT_UNSPEC,
        ),
    ];
    for (case, name, frame, ctx_in, want) in cases {
        let prog: &mut SchedClassifier = fx.dp.program_mut(name).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let mut ns: Vec<u128> = (0..n)
            .map(|_| {
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in,
                        ..Default::default()
                    })
                    .expect("BPF_PROG_TEST_RUN");
                assert_eq!(r.return_value, want, "{case}: the fast path");
                r.duration.as_nanos()
            })
            .collect();
        ns.sort_unstable();
        println!(
            "{name}, {case}: mean {} ns, median {} ns ({n} runs)",
            ns.iter().sum::<u128>() / u128::from(n),
            ns[ns.len() / 2]
        );
    }
}
