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
