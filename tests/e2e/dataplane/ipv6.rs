//! Dual-stack clusters: real agents configured with an IPv6 cluster CIDR,
//! pods wired by the CNI plugin with an address of each family, IPv6 pod
//! traffic in VXLAN over the IPv4 underlay.

use std::net::IpAddr;

use weft_tests::{
    Cluster, ClusterSpec, EchoServer, Lab, Netns, bulk_tcp_intact, iperf_gbps, privileged,
};

use super::{
    ECHO_PORT, assert_pair_dropped_nothing, capture_vxlan, pcap_records, reach, total_drops,
};

/// [`ipv6_matrix`], every path working.
fn assert_ipv6_matrix(c: &Cluster) {
    let (failures, paths) = ipv6_matrix(c);
    assert!(
        failures.is_empty(),
        "{} of {paths} IPv6 paths failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every pod and every node host → every pod's IPv6 address (ICMPv6, TCP,
/// UDP); the failures, and how many paths were tried.
fn ipv6_matrix(c: &Cluster) -> (Vec<String>, usize) {
    let (mut failures, mut paths) = (Vec::new(), 0);
    let sources: Vec<(String, &Netns)> = c
        .pods
        .iter()
        .map(|p| (format!("pod {}", p.ip6.expect("dual-stack pod")), &p.ns))
        .chain(c.nodes.iter().map(|n| (format!("host {}", n.name), &n.ns)))
        .collect();
    for (label, ns) in &sources {
        for dst in &c.pods {
            let ip6 = dst.ip6.expect("dual-stack pod");
            paths += 1;
            let failed = reach(ns, IpAddr::V6(ip6));
            if !failed.is_empty() {
                failures.push(format!("{label} → pod {ip6}: {failed:?}"));
            }
        }
    }
    (failures, paths)
}

/// Echo servers on every pod's two addresses.
fn echo_servers(c: &Cluster) -> Vec<EchoServer> {
    c.pods
        .iter()
        .flat_map(|p| {
            [
                EchoServer::start(&p.ns, p.ip, ECHO_PORT),
                EchoServer::start(&p.ns, p.ip6.expect("dual-stack pod"), ECHO_PORT),
            ]
        })
        .collect()
}

#[test]
fn dual_stack_matrix_3_nodes_2_pods() {
    if !privileged("dual_stack_matrix_3_nodes_2_pods") {
        return;
    }
    let mut lab = Lab::new("ds");
    let c = Cluster::start(&mut lab, ClusterSpec::default().dual_stack());
    let _servers = echo_servers(&c);
    assert_ipv6_matrix(&c);
    // IPv4 beside it, every pod → every pod.
    let v4: Vec<String> = c
        .pods
        .iter()
        .flat_map(|a| c.pods.iter().map(move |b| (a, b)))
        .filter_map(|(a, b)| {
            let failed = reach(&a.ns, b.ip);
            (!failed.is_empty()).then(|| format!("{} → {}: {failed:?}", a.ip, b.ip))
        })
        .collect();
    assert!(v4.is_empty(), "IPv4 beside IPv6:\n{}", v4.join("\n"));
    for i in 0..c.nodes.len() {
        let s = c.status(i);
        let rows = |list: &str, family: &str| {
            s[list]
                .as_array()
                .expect("status list")
                .iter()
                .filter(|r| r["family"] == family)
                .count()
        };
        assert_eq!(
            rows("nodes", "ipv6"),
            3,
            "node {}: IPv6 pod CIDRs: {}",
            i + 1,
            s["nodes"]
        );
        assert_eq!(
            rows("endpoints", "ipv6"),
            2,
            "node {}: {}",
            i + 1,
            s["endpoints"]
        );
        assert_eq!(
            s["node"]["v6"]["subnet"],
            format!("2001:2:0:{}::/64", i + 1)
        );
        for counter in ["encap", "decap_peer", "local"] {
            assert!(c.counter(i, counter) > 0, "node {}: no {counter}", i + 1);
            // The IPv6 pods' share of it, counted as IPv6's.
            let six = s["counters"]["forwards_ipv6"]
                .as_array()
                .expect("IPv6 counters")
                .iter()
                .find(|p| p[0] == counter)
                .and_then(|p| p[1].as_u64())
                .unwrap_or(0);
            assert!(
                six > 0,
                "node {}: no IPv6 {counter}: {}",
                i + 1,
                s["counters"]
            );
            assert!(
                six < c.counter(i, counter),
                "node {}: all {counter} IPv6?",
                i + 1
            );
        }
        assert_eq!(total_drops(&c, i), 0, "node {}: {}", i + 1, s["counters"]);
    }
}

#[test]
fn ipv6_iperf3_across_nodes_keeps_tunnel_gso_and_every_byte() {
    if !privileged("ipv6_iperf3_across_nodes_keeps_tunnel_gso_and_every_byte") {
        return;
    }
    let mut lab = Lab::new("i6");
    let c = Cluster::start(&mut lab, ClusterSpec::pair().dual_stack());
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    let (a6, b6) = (a.ip6.unwrap(), b.ip6.unwrap());
    let pcap = capture_vxlan(&mut lab, &c.nodes[0].ns, "gso6", 128);
    let gbps = iperf_gbps(&b.ns, b6, &a.ns, &mut lab, "iperf6", 3, &[]);
    println!("iperf3 over IPv6, pod→pod across nodes, 3 s: {gbps:.2} Gbit/s");
    lab.stop("tcpdump");
    let records = pcap_records(&std::fs::read(&pcap).expect("pcap"));
    // Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8: the inner frame's
    // EtherType is at 62.
    let v6_gso = records
        .iter()
        .filter(|(len, p)| *len > 1514 && p.len() > 64 && p[62..64] == [0x86, 0xdd])
        .count();
    println!(
        "{v6_gso} of {} captured VXLAN packets carried IPv6 as tunnel GSO packets (> 1514 bytes)",
        records.len()
    );
    assert!(
        v6_gso > 0,
        "no IPv6 tunnel GSO packet on the underlay ({} captured)",
        records.len()
    );
    bulk_tcp_intact(&b.ns, b6, 7001, &a.ns, 32 << 20).expect("32 MiB over IPv6, node 1 → 2");
    bulk_tcp_intact(&a.ns, a6, 7001, &b.ns, 32 << 20).expect("32 MiB over IPv6, node 2 → 1");
    assert_pair_dropped_nothing(&c);
}

#[test]
fn ipv6_pods_through_xdp_decap() {
    if !privileged("ipv6_pods_through_xdp_decap") {
        return;
    }
    let mut lab = Lab::new("x6");
    let c = Cluster::start(&mut lab, ClusterSpec::pair().xdp_decap().dual_stack());
    let _servers = echo_servers(&c);
    assert_ipv6_matrix(&c);
    assert!(
        c.counter(0, "decap_redirect") + c.counter(1, "decap_redirect") > 0,
        "XDP redirected decapsulated IPv6 into the pods"
    );
    assert_pair_dropped_nothing(&c);
}

#[test]
fn ipv6_through_tc_decap_as_before_linux_6_3() {
    if !privileged("ipv6_through_tc_decap_as_before_linux_6_3") {
        return;
    }
    // The agent forces what it does on 6.0 to 6.2, without
    // BPF_F_ADJ_ROOM_DECAP_L3_IPV6: stripped without retyping, the frame is
    // retyped on its way through the pod veth's ingress.
    let mut lab = Lab::new("r6");
    let mut spec = ClusterSpec::pair().dual_stack();
    spec.agent_env = vec![("WEFT_DECAP_RETYPE".into(), "1".into())];
    let c = Cluster::start(&mut lab, spec);
    let _servers = echo_servers(&c);
    assert_ipv6_matrix(&c);
    let (a, b) = (&c.pods[0], &c.pods[1]);
    bulk_tcp_intact(&b.ns, b.ip6.unwrap(), 7001, &a.ns, 32 << 20).expect("32 MiB, node 1 → 2");
    bulk_tcp_intact(&a.ns, a.ip6.unwrap(), 7001, &b.ns, 32 << 20).expect("32 MiB, node 2 → 1");
    for i in 0..2 {
        // Nothing took the stack for the pods' sake (the way through the
        // veth is not the stack's delivery), nothing dropped.
        assert_eq!(
            c.counter(i, "to_stack"),
            0,
            "node {}: {}",
            i + 1,
            c.status(i)["counters"]
        );
        assert_eq!(
            total_drops(&c, i),
            0,
            "node {}: {}",
            i + 1,
            c.status(i)["counters"]
        );
        assert!(c.counter(i, "decap_peer") > 0);
    }
}

/// A node set up as flannel's vxlan backend with `EnableIPv6` sets it up
/// (`flannel.1` and `flannel-v6.1`, [`weft_tests::FlannelNode`] and
/// [`weft_tests::FlannelNode6`]), one dual-stack pod on `cni0`.
struct FlannelV6Node {
    pod: Netns,
    pod_ip6: std::net::Ipv6Addr,
    pod_ip: std::net::Ipv4Addr,
    ip6: std::net::Ipv6Addr,
    v4: weft_tests::FlannelNode,
    v6: weft_tests::FlannelNode6,
}

impl FlannelV6Node {
    fn new(lab: &mut Lab, c: &Cluster, host: u8) -> Self {
        let ns = lab.netns(&format!("fl{host}"));
        let ip = c.underlay.plug(&ns, host);
        let ip6 = c.underlay.plug6(&ns, host);
        let v4 = weft_tests::FlannelNode::new(&ns, ip, host, 1, 8472);
        let v6 = weft_tests::FlannelNode6::new(&ns, ip6, host, 1, 8472);
        let pod_ip = std::net::Ipv4Addr::new(198, 19, host, 10);
        let pod = weft_tests::bridge_pod(
            lab,
            &ns,
            "cni0",
            &format!("fl{host}p1"),
            pod_ip,
            std::net::Ipv4Addr::new(198, 19, host, 1),
            1430,
        );
        let pod_ip6 = v6.pod_address(&pod, host, 0x10);
        Self {
            pod,
            pod_ip6,
            pod_ip,
            ip6,
            v4,
            v6,
        }
    }

    /// What flanneld installs for a remote dual-stack node, both families.
    fn add_remote(&self, n: &weft_tests::NodeInfo, vtep_mac: &str) {
        let subnet: u8 = n.pod_cidr.split('.').nth(2).unwrap().parse().unwrap();
        self.v4.add_remote(n.underlay_ip, subnet, vtep_mac);
        let ip6 = n.underlay_ip6.expect("IPv6 underlay");
        self.v6.add_remote(ip6, subnet, vtep_mac);
    }
}

#[test]
fn ipv6_pods_over_the_ipv6_underlay_with_weft_and_flannel_v6_nodes() {
    if !privileged("ipv6_pods_over_the_ipv6_underlay_with_weft_and_flannel_v6_nodes") {
        return;
    }
    let mut lab = Lab::new("u6");
    // NIC-like ports: every frame reaches a node checksummed in full, so
    // flannel-v6.1 verifies the outer UDP checksum of what weft sends.
    let mut spec = ClusterSpec::pair().underlay6();
    spec.underlay = weft_tests::UnderlayKind::NicLike;
    let mut c = Cluster::new(&mut lab, spec);
    let fl = FlannelV6Node::new(&mut lab, &c, 3);
    for (i, n) in c.nodes.iter().enumerate() {
        // The registry derives a weft node's VTEP MAC from its IPv4 address.
        fl.add_remote(n, &format!("0e:77:c6:12:00:{:02x}", i + 1));
    }
    c.foreign.push(weft_tests::ForeignNode {
        name: "flannel-node".into(),
        underlay_ip: std::net::Ipv4Addr::new(198, 18, 0, 3),
        pod_cidr: "198.19.3.0/24".into(),
        vtep_mac: fl.v4.vtep_mac.clone(),
        pod_cidr6: Some("2001:2:0:3::/64".into()),
        underlay6: Some((fl.ip6, fl.v6.vtep_mac.clone())),
    });
    c.launch(&mut lab);
    let mut servers = echo_servers(&c);
    servers.push(EchoServer::start(&fl.pod, fl.pod_ip6, ECHO_PORT));
    servers.push(EchoServer::start(&fl.pod, fl.pod_ip, ECHO_PORT));
    let pcap = capture_vxlan(&mut lab, &c.nodes[0].ns, "u6", 128);
    // Weft pods to each other and both ways with the flannel pod, IPv6 and
    // IPv4; node hosts to the flannel pod.
    assert_ipv6_matrix(&c);
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    // The flannel node's devices had IPv6 turned on a moment ago: its first
    // forwarded packets can be discarded there (Ip6InDiscards, seen while
    // weft's own paths above already worked). Wait until it forwards.
    weft_tests::wait_for(
        "the flannel node to forward IPv6",
        std::time::Duration::from_secs(10),
        || weft_tests::ping(&a.ns, fl.pod_ip6, 1).then_some(()),
    );
    let mut failures = Vec::new();
    let fl6 = IpAddr::V6(fl.pod_ip6);
    for (label, from, to) in [
        ("weft pod → flannel pod (IPv6)", &a.ns, fl6),
        ("weft pod on node-2 → flannel pod (IPv6)", &b.ns, fl6),
        ("node-1 → flannel pod (IPv6)", &c.nodes[0].ns, fl6),
        (
            "flannel pod → weft pod (IPv6)",
            &fl.pod,
            IpAddr::V6(a.ip6.unwrap()),
        ),
        (
            "flannel pod → weft pod on node-2 (IPv6)",
            &fl.pod,
            IpAddr::V6(b.ip6.unwrap()),
        ),
        (
            "weft pod → flannel pod (IPv4)",
            &a.ns,
            IpAddr::V4(fl.pod_ip),
        ),
        ("flannel pod → weft pod (IPv4)", &fl.pod, IpAddr::V4(a.ip)),
    ] {
        let failed = reach(from, to);
        if !failed.is_empty() {
            failures.push(format!("{label}: {failed:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Bulk both ways between weft pods (tunnel GSO through the kernel's
    // VXLAN transmit) and with the flannel pod.
    bulk_tcp_intact(&b.ns, b.ip6.unwrap(), 7001, &a.ns, 32 << 20).expect("32 MiB, node 1 → 2");
    bulk_tcp_intact(&a.ns, a.ip6.unwrap(), 7001, &b.ns, 32 << 20).expect("32 MiB, node 2 → 1");
    bulk_tcp_intact(&fl.pod, fl.pod_ip6, 7002, &a.ns, 16 << 20).expect("16 MiB, weft → flannel");
    bulk_tcp_intact(&a.ns, a.ip6.unwrap(), 7003, &fl.pod, 16 << 20)
        .expect("16 MiB, flannel → weft");
    let there = iperf_gbps(&fl.pod, fl.pod_ip6, &a.ns, &mut lab, "iperf-u6a", 2, &[]);
    let back = iperf_gbps(
        &fl.pod,
        fl.pod_ip6,
        &a.ns,
        &mut lab,
        "iperf-u6b",
        2,
        &["-R"],
    );
    println!(
        "IPv6 over the IPv6 underlay: weft→flannel-v6.1 {there:.2} Gbit/s, flannel-v6.1→weft {back:.2} Gbit/s"
    );
    lab.stop("tcpdump");
    // What node-1 sent: VXLAN in IPv6 (outer EtherType 86dd), UDP checksum
    // set, VNI 1, the inner frame IPv6 to a VTEP MAC of the registry's.
    let records = pcap_records(&std::fs::read(&pcap).expect("pcap"));
    let over6: Vec<_> = records
        .iter()
        .map(|(_, p)| p)
        .filter(|p| p.len() >= 84 && p[12..14] == [0x86, 0xdd])
        .collect();
    assert!(
        !over6.is_empty(),
        "no VXLAN over IPv6 captured ({} packets)",
        records.len()
    );
    for p in &over6 {
        assert_eq!(p[20], 17, "outer next header UDP");
        assert_eq!(&p[56..58], &8472u16.to_be_bytes(), "destination port");
        assert_ne!(&p[60..62], &[0, 0], "outer UDP checksum set");
        assert_eq!(
            &p[62..70],
            &[0x08, 0, 0, 0, 0, 0, 1, 0],
            "VXLAN header, VNI 1"
        );
        assert_eq!(&p[82..84], &[0x86, 0xdd], "inner IPv6");
    }
    let inner_macs: std::collections::BTreeSet<String> = over6
        .iter()
        .map(|p| weft_agent::host::netdev::mac_to_string(p[70..76].try_into().unwrap()))
        .collect();
    assert!(
        inner_macs.contains(&fl.v6.vtep_mac) && inner_macs.contains("0e:77:c6:12:00:02"),
        "inner destinations: flannel-v6.1's {} and node-2's VTEP MAC; got {inner_macs:?}",
        fl.v6.vtep_mac
    );
    // weft status says which underlay each IPv6 pod CIDR takes.
    let rows = c.status(0)["nodes"].as_array().unwrap().clone();
    let row = |cidr: &str| rows.iter().find(|r| r["pod_cidr"] == cidr).cloned();
    let fl_row = row("2001:2:0:3::/64").expect("the flannel node's IPv6 CIDR");
    assert_eq!(
        (
            &fl_row["underlay"],
            &fl_row["underlay_ip"],
            &fl_row["state"]
        ),
        (&"ipv6".into(), &fl.ip6.to_string().into(), &"remote".into()),
        "{fl_row}"
    );
    let fl_row4 = row("198.19.3.0/24").expect("the flannel node's IPv4 CIDR");
    assert_eq!(fl_row4["underlay"], "ipv4", "{fl_row4}");
    assert_pair_dropped_nothing(&c);
}

/// Gives pod `p` (its eth0 and its host-side veth) MTU `mtu`: a pod made
/// before its node's MTU shrank, or set by hand.
fn set_pod_mtu(c: &Cluster, p: &weft_tests::PodInfo, mtu: u32) {
    let mtu = mtu.to_string();
    p.ns.ip(&["link", "set", "eth0", "mtu", &mtu]);
    let status = c.status(p.node);
    let ip = p.ip.to_string();
    let ifindex = status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == ip.as_str())
        .and_then(|e| e["ifindex"].as_u64())
        .expect("the pod's endpoint");
    let links = c.nodes[p.node].ns.ip(&["-o", "link"]);
    let name = links
        .lines()
        .find_map(|l| {
            let (index, rest) = l.split_once(": ")?;
            (index == ifindex.to_string())
                .then(|| rest.split(['@', ':']).next().unwrap().to_string())
        })
        .expect("the pod's host-side veth");
    c.nodes[p.node].ns.ip(&["link", "set", &name, "mtu", &mtu]);
}

#[test]
fn ipv6_pods_above_the_node_mtu_are_told_packet_too_big() {
    if !privileged("ipv6_pods_above_the_node_mtu_are_told_packet_too_big") {
        return;
    }
    // Over the IPv4 underlay (pod MTU 1450) and over an IPv6 one (1430).
    for (name, spec, node_mtu) in [
        ("mt4", ClusterSpec::pair().dual_stack(), 1450u32),
        ("mt6", ClusterSpec::pair().underlay6(), 1430),
    ] {
        let mut lab = Lab::new(name);
        let c = Cluster::start(&mut lab, spec);
        let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
        let link = a.ns.ip(&["link", "show", "eth0"]);
        assert!(link.contains(&format!("mtu {node_mtu}")), "{name}: {link}");
        // Pod a thinks its link takes 1500 bytes.
        set_pod_mtu(&c, &a, 1500);
        let b6 = b.ip6.unwrap().to_string();
        let ping = |size: u32| {
            let out = a.ns.try_sh(
                "ping",
                &[
                    "-M",
                    "do",
                    "-s",
                    &size.to_string(),
                    "-c",
                    "2",
                    "-i",
                    "0.3",
                    "-W",
                    "1",
                    &b6,
                ],
            );
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        // A packet of 1500 bytes (1452 of payload, 48 of headers) is answered
        // with packet too big at the node's MTU, not lost.
        let said = ping(1500 - 48);
        assert!(
            said.contains(&format!("mtu={node_mtu}"))
                || said.contains(&format!("mtu = {node_mtu}")),
            "{name}: the pod is told the path MTU {node_mtu}: {said}"
        );
        // The largest that fits goes through.
        let said = ping(node_mtu - 48);
        assert!(said.contains(" 0% packet loss"), "{name}: {said}");
        // TCP from the pod with the large MTU learns the path MTU and
        // moves its bytes intact, both ways.
        bulk_tcp_intact(&b.ns, b.ip6.unwrap(), 7001, &a.ns, 8 << 20).expect("8 MiB, a → b");
        bulk_tcp_intact(&a.ns, a.ip6.unwrap(), 7001, &b.ns, 8 << 20).expect("8 MiB, b → a");
        assert!(
            c.counter(0, "to_stack") > 0,
            "{name}: the too-big packets took the stack"
        );
        assert_pair_dropped_nothing(&c);
    }
}

#[test]
fn an_ipv6_only_cluster_has_no_ipv4_anywhere_and_carries_every_path() {
    if !privileged("an_ipv6_only_cluster_has_no_ipv4_anywhere_and_carries_every_path") {
        return;
    }
    let mut lab = Lab::new("v6o");
    let c = Cluster::start(&mut lab, ClusterSpec::default().ipv6_only());
    let addrs4 = |ns: &Netns, dev: &str| {
        String::from_utf8_lossy(
            &ns.try_sh("ip", &["-4", "-o", "addr", "show", "dev", dev])
                .stdout,
        )
        .trim()
        .to_string()
    };
    // No IPv4 on the underlay, on weft0 or in a pod: what the cluster
    // carries below goes over IPv6 alone.
    for n in &c.nodes {
        assert_eq!(addrs4(&n.ns, "und0"), "", "{}: IPv4 on und0", n.name);
        assert_eq!(addrs4(&n.ns, "weft0"), "", "{}: IPv4 on weft0", n.name);
        let env = std::fs::read_to_string(n.run_dir.join("subnet.env")).unwrap();
        assert!(
            !env.contains("WEFT_SUBNET=") && env.contains("WEFT_SUBNET6="),
            "{env}"
        );
    }
    for p in &c.pods {
        assert!(p.ip.is_unspecified() && p.ip6.is_some(), "{p:?}");
        assert_eq!(addrs4(&p.ns, "eth0"), "", "{}: IPv4 in the pod", p.name);
    }
    let _servers: Vec<EchoServer> = c
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, p.ip6.unwrap(), ECHO_PORT))
        .collect();
    let pcap = capture_vxlan(&mut lab, &c.nodes[0].ns, "v6o", 128);
    // Every pod and node host → every pod: same node, across nodes, host ↔
    // pod (ICMPv6, TCP, UDP).
    assert_ipv6_matrix(&c);
    // Each pod → its gateway, an address of its node's own pod CIDR that is
    // no pod's: the programs must tell that CIDR is this node's (no IPv4
    // address to tell it by) and hand the packet to the stack.
    for p in &c.pods {
        let cidr6 = c.nodes[p.node].pod_cidr6.as_deref().unwrap();
        let gw: std::net::Ipv6Addr = format!("{}1", cidr6.trim_end_matches("/64"))
            .parse()
            .unwrap();
        assert!(
            weft_tests::ping(&p.ns, gw, 2),
            "{} → its gateway {gw}",
            p.name
        );
    }
    let (a, b) = (c.pods[0].clone(), c.pods[2].clone());
    assert_ne!(a.node, b.node);
    bulk_tcp_intact(&b.ns, b.ip6.unwrap(), 7001, &a.ns, 32 << 20).expect("32 MiB, node 1 → 2");
    bulk_tcp_intact(&a.ns, a.ip6.unwrap(), 7001, &b.ns, 32 << 20).expect("32 MiB, node 2 → 1");
    let gbps = iperf_gbps(&b.ns, b.ip6.unwrap(), &a.ns, &mut lab, "iperf-v6o", 2, &[]);
    println!("IPv6-only cluster, pod → pod across nodes, 2 s: {gbps:.2} Gbit/s");
    lab.stop("tcpdump");
    // On the wire: VXLAN in IPv6 only, tunnel GSO kept.
    let records = pcap_records(&std::fs::read(&pcap).expect("pcap"));
    let over4 = records
        .iter()
        .filter(|(_, p)| p[12..14] == [0x08, 0x00])
        .count();
    let over6: Vec<_> = records
        .iter()
        .filter(|(_, p)| p.len() >= 84 && p[12..14] == [0x86, 0xdd])
        .collect();
    assert_eq!(over4, 0, "VXLAN over IPv4 captured");
    assert!(!over6.is_empty(), "no VXLAN over IPv6 captured");
    for (_, p) in &over6 {
        assert_ne!(&p[60..62], &[0, 0], "outer UDP checksum set");
        assert_eq!(&p[82..84], &[0x86, 0xdd], "inner IPv6");
    }
    let gso = over6.iter().filter(|(len, _)| *len > 1514).count();
    println!(
        "{gso} of {} VXLAN-over-IPv6 packets captured were tunnel GSO (> 1514 bytes)",
        over6.len()
    );
    assert!(gso > 0, "no tunnel GSO packet over the IPv6 underlay");
    // weft status: IPv6 rows only, each peer over the IPv6 underlay.
    let rows = c.status(0)["nodes"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r["family"], "ipv6", "{r}");
        if r["state"] != "local" {
            assert_eq!(
                (&r["underlay"], &r["state"]),
                (&"ipv6".into(), &"remote".into()),
                "{r}"
            );
        }
    }
    assert_eq!(
        rows.iter().filter(|r| r["state"] == "local").count(),
        1,
        "its own CIDR, told apart without an IPv4 address: {rows:?}"
    );
    // The agent restarts with its IPv6 endpoints map lost (a bpffs
    // remount): the node's pods are found again from their IPv6 routes and
    // neighbours, and reached.
    let agent = Cluster::agent_name(0);
    lab.stop(&agent);
    std::fs::remove_file(c.nodes[0].bpffs.join(weft_common::names::ENDPOINTS6)).unwrap();
    c.start_agent(&mut lab, 0);
    weft_tests::wait_for(
        "node-1's pods restored into its IPv6 endpoints map",
        std::time::Duration::from_secs(20),
        || {
            // Until the agent has pinned the map again, status has none to read.
            let out = c.weft(0, &["status", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (out.status.success() && s["endpoints"].as_array().map(Vec::len) == Some(2))
                .then_some(())
        },
    );
    assert!(
        lab.log(&agent)
            .contains("restored them from the node's routes"),
        "{}",
        lab.log(&agent)
    );
    assert!(
        weft_tests::ping(&b.ns, a.ip6.unwrap(), 3),
        "node-2's pod → restored pod"
    );
    // CNI CHECK, then DEL, of an IPv6-only pod: its entry and address go.
    let conf = c.cni_conf(0, "1.1.0");
    let netns = a.ns.path().to_str().unwrap().to_string();
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = serde_json::json!({
        "cniVersion": "1.1.0",
        "ips": [{"address": format!("{}/128", a.ip6.unwrap())}],
    });
    let out = c.cni(0, "CHECK", &a.ns.name, &netns, &with_prev);
    assert!(
        out.status.success(),
        "CHECK: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = c.cni(0, "DEL", &a.ns.name, &netns, &conf);
    assert!(
        out.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let endpoints = c.status(0)["endpoints"].clone();
    assert!(
        !endpoints.to_string().contains(&a.ip6.unwrap().to_string()),
        "{endpoints}"
    );
    assert_pair_dropped_nothing(&c);
}
