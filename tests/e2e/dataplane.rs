//! End to end: real agents, real namespaces and veths, real traffic.

use std::{net::Ipv4Addr, time::Duration};

use weft_tests::{
    Cluster, ClusterSpec, EchoServer, ForeignNode, Lab, Netns, ping, privileged, tcp_roundtrip,
    udp_roundtrip, wait_for,
};

const ECHO_PORT: u16 = 7000;

/// ICMP, TCP and UDP from `from` to `to`; returns the protocols that failed.
fn reach(from: &Netns, to: Ipv4Addr) -> Vec<&'static str> {
    let mut failed = Vec::new();
    if !ping(from, to, 1) {
        failed.push("icmp");
    }
    if !tcp_roundtrip(from, to, ECHO_PORT) {
        failed.push("tcp");
    }
    if !udp_roundtrip(from, to, ECHO_PORT) {
        failed.push("udp");
    }
    failed
}

fn total_drops(c: &Cluster, i: usize) -> u64 {
    let s = c.status(i);
    s["counters"]["drops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .sum()
}

#[test]
fn connectivity_matrix_3_nodes_2_pods() {
    if !privileged("connectivity_matrix_3_nodes_2_pods") {
        return;
    }
    let mut lab = Lab::new("mx");
    let c = Cluster::start(&mut lab, ClusterSpec::default());
    let _servers: Vec<EchoServer> = c
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, p.ip, ECHO_PORT))
        .chain(
            c.nodes
                .iter()
                .map(|n| EchoServer::start(&n.ns, n.underlay_ip, ECHO_PORT)),
        )
        .collect();

    let mut failures = Vec::new();
    let mut paths = 0;
    // Every pod and every node host → every pod (same node, other nodes).
    let sources: Vec<(String, &Netns)> = c
        .pods
        .iter()
        .map(|p| (format!("pod {}", p.ip), &p.ns))
        .chain(c.nodes.iter().map(|n| (format!("host {}", n.name), &n.ns)))
        .collect();
    for (label, ns) in &sources {
        for dst in &c.pods {
            paths += 1;
            let failed = reach(ns, dst.ip);
            if !failed.is_empty() {
                failures.push(format!("{label} → pod {}: {failed:?}", dst.ip));
            }
        }
    }
    // Every pod → every node (its own and the others).
    for p in &c.pods {
        for n in &c.nodes {
            paths += 1;
            let failed = reach(&p.ns, n.underlay_ip);
            if !failed.is_empty() {
                failures.push(format!("pod {} → host {}: {failed:?}", p.ip, n.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {paths} paths failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for i in 0..c.nodes.len() {
        for counter in ["encap", "decap_redirect", "local"] {
            assert!(
                c.counter(i, counter) > 0,
                "node {} forwarded nothing as {counter}",
                i + 1
            );
        }
        assert_eq!(
            total_drops(&c, i),
            0,
            "node {} dropped packets: {}",
            i + 1,
            c.status(i)["counters"]
        );
    }
}

/// A node set up exactly as flannel's vxlan backend does it: `flannel.1`
/// (nolearning), its address the subnet's network address, a permanent
/// neighbour and an FDB entry per remote node, an onlink route, and the
/// `cni0` bridge with veth pods.
struct FlannelNode {
    ns: Netns,
    pod: Netns,
    pod_ip: Ipv4Addr,
    vtep_mac: String,
}

fn flannel_node(lab: &mut Lab, c: &Cluster, host: u8, vni: u32, port: u16) -> FlannelNode {
    let ns = lab.netns(&format!("fl{host}"));
    let ip = c.underlay.plug(&ns, host);
    let subnet = format!("198.19.{host}");
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        &vni.to_string(),
        "local",
        &ip.to_string(),
        "dev",
        "und0",
        "dstport",
        &port.to_string(),
        "nolearning",
    ]);
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"]);
    ns.ip(&["addr", "add", &format!("{subnet}.0/32"), "dev", "flannel.1"]);
    ns.ip(&["link", "add", "cni0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", "cni0"]);
    ns.ip(&["link", "set", "cni0", "mtu", "1450", "up"]);
    let pod = lab.netns(&format!("fl{host}p1"));
    ns.ip(&[
        "link", "add", "vethfl", "mtu", "1450", "type", "veth", "peer", "name", "eth0", "mtu",
        "1450", "netns", &pod.name,
    ]);
    ns.ip(&["link", "set", "vethfl", "master", "cni0", "up"]);
    let pod_ip = Ipv4Addr::new(198, 19, host, 10);
    pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", &format!("{subnet}.1")]);
    let link = ns.ip(&["-o", "link", "show", "flannel.1"]);
    let vtep_mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("flannel.1 MAC")
        .to_string();
    FlannelNode {
        ns,
        pod,
        pod_ip,
        vtep_mac,
    }
}

/// What flanneld installs on `flannel` for a remote node.
fn flannel_add_remote(
    f: &FlannelNode,
    remote_ip: Ipv4Addr,
    remote_cidr_net: &str,
    remote_vtep: &str,
) {
    f.ns.ip(&[
        "neigh",
        "replace",
        remote_cidr_net,
        "lladdr",
        remote_vtep,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ]);
    f.ns.sh(
        "bridge",
        &[
            "fdb",
            "append",
            remote_vtep,
            "dev",
            "flannel.1",
            "dst",
            &remote_ip.to_string(),
        ],
    );
    let cidr = format!("{remote_cidr_net}/24");
    f.ns.ip(&[
        "route",
        "add",
        &cidr,
        "via",
        remote_cidr_net,
        "dev",
        "flannel.1",
        "onlink",
    ]);
}

fn iperf_gbps(
    server: &Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    lab: &mut Lab,
    name: &str,
    secs: u32,
    extra: &[&str],
) -> f64 {
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "--forceflush", "-B", &server_ip.to_string()]);
    lab.spawn(name, cmd);
    wait_for("iperf3 server", Duration::from_secs(5), || {
        lab.log(name).contains("listening").then_some(())
    });
    let mut args = vec![
        "-c".to_string(),
        server_ip.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client.try_sh("iperf3", &argv);
    lab.stop(name);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(v.get("error").is_none(), "iperf3 failed: {}", v["error"]);
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "iperf3 moved no data: {}", v["end"]);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn interop(vni: u32, port: u16) {
    let mut lab = Lab::new(&format!("fl{port}"));
    let mut c = Cluster::new(
        &mut lab,
        ClusterSpec {
            nodes: 1,
            pods_per_node: 1,
            vni,
            port,
        },
    );
    let fl = flannel_node(&mut lab, &c, 2, vni, port);
    let weft_vtep = "0e:77:c6:12:00:01"; // derived from 198.18.0.1, as the registry does
    flannel_add_remote(&fl, c.nodes[0].underlay_ip, "198.19.1.0", weft_vtep);
    c.foreign.push(ForeignNode {
        name: "flannel-node".into(),
        underlay_ip: Ipv4Addr::new(198, 18, 0, 2),
        pod_cidr: "198.19.2.0/24".into(),
        vtep_mac: fl.vtep_mac.clone(),
    });
    c.launch(&mut lab);
    let weft_pod = c.pods[0].clone();
    let _servers = [
        EchoServer::start(&weft_pod.ns, weft_pod.ip, ECHO_PORT),
        EchoServer::start(&fl.pod, fl.pod_ip, ECHO_PORT),
        EchoServer::start(&c.nodes[0].ns, c.nodes[0].underlay_ip, ECHO_PORT),
        EchoServer::start(&fl.ns, Ipv4Addr::new(198, 18, 0, 2), ECHO_PORT),
    ];
    let mut failures = Vec::new();
    for (label, from, to) in [
        ("weft pod → flannel pod", &weft_pod.ns, fl.pod_ip),
        ("flannel pod → weft pod", &fl.pod, weft_pod.ip),
        ("weft host → flannel pod", &c.nodes[0].ns, fl.pod_ip),
        ("flannel host → weft pod", &fl.ns, weft_pod.ip),
    ] {
        let failed = reach(from, to);
        if !failed.is_empty() {
            failures.push(format!("{label}: {failed:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "VNI {vni} port {port}: {}",
        failures.join("; ")
    );
    // Bulk TCP both ways: weft's tunnel GSO against the kernel's vxlan.
    let there = iperf_gbps(
        &fl.pod,
        fl.pod_ip,
        &weft_pod.ns,
        &mut lab,
        "iperf-a",
        2,
        &[],
    );
    let back = iperf_gbps(
        &fl.pod,
        fl.pod_ip,
        &weft_pod.ns,
        &mut lab,
        "iperf-b",
        2,
        &["-R"],
    );
    println!(
        "interop VNI {vni} port {port}: weft→flannel {there:.2} Gbit/s, flannel→weft {back:.2} Gbit/s"
    );
    assert_eq!(
        total_drops(&c, 0),
        0,
        "weft dropped packets: {}",
        c.status(0)["counters"]
    );
}

#[test]
fn flannel_vxlan_interop_default_vni_and_port() {
    if privileged("flannel_vxlan_interop_default_vni_and_port") {
        interop(1, 8472);
    }
}

#[test]
fn flannel_vxlan_interop_custom_vni_and_port() {
    if privileged("flannel_vxlan_interop_custom_vni_and_port") {
        interop(4242, 4789);
    }
}
