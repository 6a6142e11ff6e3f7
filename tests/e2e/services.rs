//! Traffic the node's own kernel NATs, through weft's dataplane: Services
//! and hostPorts as kube-proxy (iptables mode) and the portmap CNI plugin
//! program them (a DNAT rule in the node's `nat` table, conntrack doing the
//! rest), then Services programmed by a real kube-proxy from a real API
//! server, and weft's own masquerade of pods' traffic leaving the cluster.
//!
//! The client speaks to the Service address; the node's stack rewrites the
//! destination to a backend pod; the backend's reply must come back through
//! the same node's conntrack to get the Service address back as its source.
//! weft's fast paths would otherwise carry it straight to the client, which
//! would drop it (a TCP SYN-ACK from an address it never called; a UDP
//! answer from the wrong source). The round trips below check the reply's
//! source address, so any such shortcut fails them.

use std::{net::Ipv4Addr, time::Duration};

use serde_json::json;
use weft_tests::{
    CLUSTER_CIDR, Cluster, ClusterSpec, EchoServer, Lab, Netns, PodInfo, kube::KubeApi, privileged,
    tcp_roundtrip, udp_roundtrip, wait_for,
};

const ECHO_PORT: u16 = 7000;
/// A "ClusterIP" from the test block, outside the underlay's /24 and the
/// cluster CIDR, like a Service CIDR.
const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const SERVICE_PORT: u16 = 80;
const HOST_PORT: u16 = 8080;

/// DNAT rules, one for TCP and one for UDP, sending `dst:port` to
/// `to:7000`, added to `chain` of the `nat` table (`-A`, or `-I` first).
fn dnat(node: &Netns, verb: &str, chain: &str, dst: Ipv4Addr, port: u16, to: Ipv4Addr) {
    for proto in ["tcp", "udp"] {
        node.sh(
            "iptables",
            &[
                "-t",
                "nat",
                verb,
                chain,
                "-d",
                &dst.to_string(),
                "-p",
                proto,
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{to}:{ECHO_PORT}"),
            ],
        );
    }
}

/// kube-proxy's shape of a Service: its own chain in the `nat` table,
/// jumped to from PREROUTING (pods) and OUTPUT (the node itself), with a DNAT
/// of `SERVICE:80` (TCP and UDP) to `backend:7000`. Only that chain is
/// rewritten: weft's own rules (masquerade) stay, as they would next to
/// kube-proxy.
fn point_service_at(node: &Netns, backend: Ipv4Addr) {
    const CHAIN: &str = "TEST-SERVICES";
    if node
        .try_sh("iptables", &["-t", "nat", "-N", CHAIN])
        .status
        .success()
    {
        for hook in ["PREROUTING", "OUTPUT"] {
            node.sh("iptables", &["-t", "nat", "-I", hook, "-j", CHAIN]);
        }
    }
    node.sh("iptables", &["-t", "nat", "-F", CHAIN]);
    dnat(node, "-A", CHAIN, SERVICE, SERVICE_PORT, backend);
}

/// portmap's shape of a hostPort: DNAT of `node_ip:8080` to `pod:7000`.
fn host_port(node: &Netns, node_ip: Ipv4Addr, pod: Ipv4Addr) {
    dnat(node, "-I", "PREROUTING", node_ip, HOST_PORT, pod);
}

/// TCP and UDP round trips from `from` to `ip:port`; the protocols that failed.
fn round_trips(from: &Netns, ip: impl Into<std::net::IpAddr>, port: u16) -> Vec<&'static str> {
    let ip = ip.into();
    let mut failed = Vec::new();
    if !tcp_roundtrip(from, ip, port) {
        failed.push("tcp");
    }
    if !udp_roundtrip(from, ip, port) {
        failed.push("udp");
    }
    failed
}

#[test]
fn services_and_host_ports_nated_by_the_node_work_across_the_fast_paths() {
    if !privileged("services_and_host_ports_nated_by_the_node_work_across_the_fast_paths") {
        return;
    }
    // With weft's masquerade (the default) and without it: masquerading
    // changes which packets carry pod addresses (a pod calling another
    // node's hostPort arrives from that node's address), so each exercises
    // the replies' way back differently.
    nat_scenarios("svc", &[]);
    nat_scenarios("svn", &["--ip-masq=false"]);
}

/// Two nodes with two pods each, an echo server in every pod; node-1's
/// first pod is the client, its second and node-2's first the backends.
struct TwoByTwo {
    c: Cluster,
    _servers: Vec<EchoServer>,
}

impl TwoByTwo {
    fn start(lab: &mut Lab, agent_args: &[&str]) -> Self {
        let c = Cluster::start(
            lab,
            ClusterSpec {
                nodes: 2,
                pods_per_node: 2,
                agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
                ..ClusterSpec::default()
            },
        );
        let _servers = c
            .pods
            .iter()
            .map(|p| EchoServer::start(&p.ns, p.ip, ECHO_PORT))
            .collect();
        Self { c, _servers }
    }

    fn on(&self, node: usize) -> Vec<&PodInfo> {
        self.c.pods.iter().filter(|p| p.node == node).collect()
    }

    /// (client, backend on the same node, backend on the other node).
    fn roles(&self) -> (&PodInfo, &PodInfo, &PodInfo) {
        let (local, remote) = (self.on(0), self.on(1));
        (local[0], local[1], remote[0])
    }
}

fn nat_scenarios(tag: &str, agent_args: &[&str]) {
    let mut lab = Lab::new(tag);
    let t = TwoByTwo::start(&mut lab, agent_args);
    let c = &t.c;
    let (client, local_backend, remote_backend) = t.roles();
    let remote = t.on(1);
    let node = &c.nodes[0].ns;
    let to_stack = |i: usize| c.counter(i, "to_stack");

    let mut failures = Vec::new();
    let mut check = |case: &str, failed: Vec<&str>| {
        if !failed.is_empty() {
            failures.push(format!("{case}: {failed:?}"));
        }
    };
    // A pod calls a Service whose backend runs on another node: the reply
    // arrives in VXLAN and must go up node-1's stack, not into the pod.
    point_service_at(node, remote_backend.ip);
    let before = to_stack(0);
    check(
        "pod → Service → backend on another node",
        round_trips(&client.ns, SERVICE, SERVICE_PORT),
    );
    let handed_to_stack = to_stack(0) > before;
    // ... whose backend runs on the same node: the backend's reply leaves
    // through its own veth and must not be short-cut into the client.
    point_service_at(node, local_backend.ip);
    check(
        "pod → Service → backend on the same node",
        round_trips(&client.ns, SERVICE, SERVICE_PORT),
    );
    // The node itself calls the Service (kube-proxy's OUTPUT rule). The
    // Service address must be routable before the DNAT (a real node has a
    // default route; the lab's nodes have only the underlay's /24).
    point_service_at(node, remote_backend.ip);
    node.ip(&["route", "add", &format!("{SERVICE}/32"), "dev", "und0"]);
    check(
        "node → Service → backend on another node",
        round_trips(node, SERVICE, SERVICE_PORT),
    );
    // A pod on another node calls a hostPort on node-1: the DNAT is node-1's,
    // so the local pod's reply must go back through node-1's stack.
    host_port(node, c.nodes[0].underlay_ip, local_backend.ip);
    check(
        "pod on another node → hostPort → pod",
        round_trips(&remote[1].ns, c.nodes[0].underlay_ip, HOST_PORT),
    );

    // Pod to pod flows keep the fast paths both ways: nothing of them goes
    // to either node's stack.
    let before = [to_stack(0), to_stack(1)];
    check(
        "pod → pod on another node (direct)",
        round_trips(&client.ns, remote_backend.ip, ECHO_PORT),
    );
    check(
        "pod → pod on the same node (direct)",
        round_trips(&client.ns, local_backend.ip, ECHO_PORT),
    );
    let direct_detoured = [to_stack(0), to_stack(1)] != before;
    assert!(
        failures.is_empty(),
        "agent flags {agent_args:?}: failed:\n{}",
        failures.join("\n")
    );
    assert!(
        handed_to_stack,
        "the remote backend's replies were handed to node-1's stack"
    );
    assert!(
        !direct_detoured,
        "direct pod to pod traffic takes no detour through the stack"
    );
}

#[test]
fn service_replies_take_the_stack_with_xdp_decap_too() {
    if !privileged("service_replies_take_the_stack_with_xdp_decap_too") {
        return;
    }
    let mut lab = Lab::new("svx");
    let c = Cluster::start(&mut lab, ClusterSpec::pair().xdp_decap());
    let (client, backend) = (&c.pods[0], &c.pods[1]);
    let _server = EchoServer::start(&backend.ns, backend.ip, ECHO_PORT);
    point_service_at(&c.nodes[0].ns, backend.ip);
    let before = c.counter(0, "to_stack");
    let failed = round_trips(&client.ns, SERVICE, SERVICE_PORT);
    assert!(
        failed.is_empty(),
        "pod → Service → remote backend: {failed:?}"
    );
    assert!(
        c.counter(0, "to_stack") > before,
        "XDP decap passed the replies to the stack"
    );
}

/// Restarts node `i`'s agent with `extra` flags and waits until it is ready.
fn restart_agent(lab: &mut Lab, c: &Cluster, i: usize, extra: &[&str]) {
    let name = Cluster::agent_name(i);
    lab.stop(&name);
    let mut cmd = c.agent_command(i);
    cmd.args(extra);
    lab.spawn(&name, cmd);
    wait_for("the agent to be ready", Duration::from_secs(20), || {
        lab.log(&name).contains("ready run_dir=").then_some(())
    });
}

/// Whether weft's masquerade chain is in `node`'s nat table, as `iptables`
/// (the system's, or a flavour such as `iptables-legacy`) lists it.
fn masquerade_rules_in(node: &Netns, iptables: &str) -> bool {
    node.sh(iptables, &["-t", "nat", "-S"])
        .contains(weft_agent::host::masq::CHAIN)
}

fn masquerade_rules(node: &Netns) -> bool {
    masquerade_rules_in(node, "iptables")
}

/// A host outside the cluster, on the underlay, with no route to the pods
/// (only an answer to a node's own address can come back), echoing on
/// [`ECHO_PORT`]: its address and server.
fn outside_host(lab: &mut Lab, c: &Cluster) -> (Ipv4Addr, EchoServer) {
    let outside = lab.netns("out");
    let ip = c.underlay.plug(&outside, 200);
    let echo = EchoServer::start(&outside, ip, ECHO_PORT);
    (ip, echo)
}

#[test]
fn pods_reach_the_outside_behind_their_nodes_address() {
    if !privileged("pods_reach_the_outside_behind_their_nodes_address") {
        return;
    }
    let mut lab = Lab::new("msq");
    let c = Cluster::start(&mut lab, ClusterSpec::pair());
    let (outside_ip, _echo) = outside_host(&mut lab, &c);
    let (pod, node) = (&c.pods[0], &c.nodes[0].ns);

    assert!(masquerade_rules(node), "installed by default (--ip-masq)");
    let failed = round_trips(&pod.ns, outside_ip, ECHO_PORT);
    assert!(failed.is_empty(), "pod → outside host: {failed:?}");
    // Pod to pod is not masqueraded (and takes the fast path anyway).
    let _pod_echo = EchoServer::start(&c.pods[1].ns, c.pods[1].ip, ECHO_PORT);
    assert!(round_trips(&pod.ns, c.pods[1].ip, ECHO_PORT).is_empty());

    // --ip-masq=false removes the rules an earlier run installed, and with
    // them the way out.
    restart_agent(&mut lab, &c, 0, &["--ip-masq=false"]);
    assert!(!masquerade_rules(node), "removed with --ip-masq=false");
    assert_eq!(
        round_trips(&pod.ns, outside_ip, ECHO_PORT),
        ["tcp", "udp"],
        "without masquerade the outside host cannot answer the pod"
    );

    // Back on, then `weft down` removes them again.
    restart_agent(&mut lab, &c, 0, &[]);
    assert!(masquerade_rules(node), "installed again");
    assert!(round_trips(&pod.ns, outside_ip, ECHO_PORT).is_empty());
    lab.stop(&Cluster::agent_name(0));
    let out = c.weft(0, &["down"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("masquerade"),
        "weft down: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!masquerade_rules(node), "removed by weft down");
}

/// The Service the kube-proxy test creates: a ClusterIP from the API server's
/// service range (198.18.200.0/24), TCP and UDP port 80 → 7000.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);

/// Points Service `name`'s Endpoints at `backend` (created, or patched) and
/// waits until node `node`'s kube-proxy (log `proxy_log`) has written the
/// DNAT to it, in iptables or, for an IPv6 backend, ip6tables.
fn endpoints_at(
    api: &KubeApi,
    node: &Netns,
    name: &str,
    backend: std::net::IpAddr,
    create: bool,
    proxy_log: &dyn Fn() -> String,
) {
    let subsets = json!([{
        "addresses": [{"ip": backend.to_string()}],
        "ports": [
            {"name": "tcp", "port": ECHO_PORT, "protocol": "TCP"},
            {"name": "udp", "port": ECHO_PORT, "protocol": "UDP"},
        ],
    }]);
    if create {
        api.request(
            "POST",
            "/api/v1/namespaces/default/endpoints",
            &json!({"apiVersion": "v1", "kind": "Endpoints",
                    "metadata": {"name": name}, "subsets": subsets}),
        );
    } else {
        api.request(
            "PATCH",
            &format!("/api/v1/namespaces/default/endpoints/{name}"),
            &json!({"subsets": subsets}),
        );
    }
    let (iptables, want) = match backend {
        std::net::IpAddr::V4(b) => ("iptables", format!("--to-destination {b}:{ECHO_PORT}")),
        std::net::IpAddr::V6(b) => ("ip6tables", format!("--to-destination [{b}]:{ECHO_PORT}")),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !node.sh(iptables, &["-t", "nat", "-S"]).contains(&want) {
        assert!(
            std::time::Instant::now() < deadline,
            "kube-proxy did not program {backend} in 30 s; its log:\n{}",
            proxy_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_real_kube_proxy_serves_services_across_the_fast_paths() {
    if !privileged("a_real_kube_proxy_serves_services_across_the_fast_paths") {
        return;
    }
    let mut lab = Lab::new("kpx");
    let t = TwoByTwo::start(&mut lab, &[]);
    let c = &t.c;
    let (client, local_backend, remote_backend) = t.roles();
    let und = c.underlay.ns.clone();
    let api = KubeApi::start(&mut lab, &und, "br0");
    let node = &c.nodes[0].ns;
    api.start_proxy(
        &mut lab,
        node,
        "node-1",
        c.nodes[0].underlay_ip,
        CLUSTER_CIDR,
    );
    api.create_service("echo", CLUSTER_IP, ECHO_PORT);
    // As on a real node, the service range is routable before kube-proxy's
    // DNAT (the lab's nodes have no default route).
    node.ip(&["route", "add", "198.18.200.0/24", "dev", "und0"]);

    let mut failures = Vec::new();
    let mut check = |case: &str, failed: Vec<&str>| {
        if !failed.is_empty() {
            failures.push(format!("{case}: {failed:?}"));
        }
    };
    let before = c.counter(0, "to_stack");
    let proxy_log = || lab.log("kube-proxy-node-1");
    endpoints_at(
        &api,
        node,
        "echo",
        remote_backend.ip.into(),
        true,
        &proxy_log,
    );
    check(
        "pod → ClusterIP → backend on another node",
        round_trips(&client.ns, CLUSTER_IP, 80),
    );
    check(
        "node → ClusterIP → backend on another node",
        round_trips(node, CLUSTER_IP, 80),
    );
    let handed_to_stack = c.counter(0, "to_stack") > before;
    endpoints_at(
        &api,
        node,
        "echo",
        local_backend.ip.into(),
        false,
        &proxy_log,
    );
    check(
        "pod → ClusterIP → backend on the same node",
        round_trips(&client.ns, CLUSTER_IP, 80),
    );
    assert!(
        failures.is_empty(),
        "through kube-proxy's rules:\n{}\nkube-proxy log (tail):\n{}",
        failures.join("\n"),
        proxy_log()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        handed_to_stack,
        "the remote backend's replies were handed to node-1's stack"
    );
}

#[test]
fn masquerade_goes_where_kube_proxys_rules_are() {
    if !privileged("masquerade_goes_where_kube_proxys_rules_are") {
        return;
    }
    let mut lab = Lab::new("mlg");
    let c = Cluster::start(&mut lab, ClusterSpec::pair());
    let (outside_ip, _echo) = outside_host(&mut lab, &c);
    let (pod, node) = (&c.pods[0], &c.nodes[0].ns);
    let in_table = |iptables: &str| masquerade_rules_in(node, iptables);
    assert!(in_table("iptables") && !in_table("iptables-legacy"));

    // kube-proxy on this node uses iptables-legacy (its nat rules, as it
    // lays them out): the agent's rules follow on its next start, and the
    // ones it had in the other flavour go.
    for rule in [
        vec!["-N", "KUBE-SERVICES"],
        vec!["-N", "KUBE-POSTROUTING"],
        vec!["-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        vec!["-A", "OUTPUT", "-j", "KUBE-SERVICES"],
        vec!["-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"],
        vec![
            "-A",
            "KUBE-POSTROUTING",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x4000/0x4000",
            "-j",
            "RETURN",
        ],
    ] {
        let mut args = vec!["-t", "nat"];
        args.extend(rule);
        node.sh("iptables-legacy", &args);
    }
    restart_agent(&mut lab, &c, 0, &[]);
    assert!(
        in_table("iptables-legacy") && !in_table("iptables"),
        "the rules moved to iptables-legacy:\n{}",
        lab.log(&Cluster::agent_name(0))
    );
    assert!(
        round_trips(&pod.ns, outside_ip, ECHO_PORT).is_empty(),
        "pod → outside host, masqueraded by the legacy rules"
    );
    lab.stop(&Cluster::agent_name(0));
    let out = c.weft(0, &["down"]);
    assert!(out.status.success());
    assert!(
        !in_table("iptables-legacy") && !in_table("iptables"),
        "weft down removes them from either flavour"
    );
}

#[test]
fn a_node_with_only_nftables_gets_the_masquerade_too() {
    if !privileged("a_node_with_only_nftables_gets_the_masquerade_too") {
        return;
    }
    let mut lab = Lab::new("nft");
    let mut c = Cluster::new(&mut lab, ClusterSpec::pair());
    // Node 1 as RHEL 10 ships it: nft, and no iptables of any flavour.
    let (nft_only, _log) = weft_tests::logged_tools(&lab, "nft-only", &["nft"], &[]);
    c.path = Some(nft_only);
    c.launch(&mut lab);
    let (outside_ip, _echo) = outside_host(&mut lab, &c);
    let (pod, node) = (&c.pods[0], &c.nodes[0].ns);
    assert!(
        lab.log(&Cluster::agent_name(0)).contains("backend=Nft"),
        "detected without iptables: {}",
        lab.log(&Cluster::agent_name(0))
    );
    let table = node.sh(
        "nft",
        &["list", "table", "ip", weft_agent::host::masq::NFT_TABLE],
    );
    assert!(
        table.contains("masquerade") && table.contains("oifname \"weft0\""),
        "weft's nftables table: {table}"
    );
    assert!(!masquerade_rules(node), "and no iptables chain");
    let failed = round_trips(&pod.ns, outside_ip, ECHO_PORT);
    assert!(
        failed.is_empty(),
        "pod → outside host through nft's masquerade: {failed:?}"
    );
    lab.stop(&Cluster::agent_name(0));
    lab.stop(&Cluster::agent_name(1));
    let out = c.weft(0, &["down"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("masquerade"),
        "weft down: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !node
            .try_sh(
                "nft",
                &["list", "table", "ip", weft_agent::host::masq::NFT_TABLE]
            )
            .status
            .success(),
        "weft down removed the table"
    );
}

#[test]
fn dual_stack_pods_reach_the_outside_over_ipv6_behind_their_nodes_address() {
    if !privileged("dual_stack_pods_reach_the_outside_over_ipv6_behind_their_nodes_address") {
        return;
    }
    let mut lab = Lab::new("ms6");
    let c = Cluster::start(&mut lab, ClusterSpec::pair().dual_stack());
    // The underlay gets IPv6 too (outside the cluster's 2001:2::/48): an
    // outside host on it, and node-1 an address there. The outside host has
    // no route to the pods: only an answer to node-1's own address can come
    // back.
    let outside = lab.netns("out6");
    let outside4 = c.underlay.plug(&outside, 200);
    let (outside_ip, node_ip): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
        "2001:2:ff::c8".parse().unwrap(),
        "2001:2:ff::1".parse().unwrap(),
    );
    for (ns, dev) in [
        (&c.underlay.ns, "br0"),
        (&outside, "und0"),
        (&c.nodes[0].ns, "und0"),
    ] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0");
    }
    outside.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{outside_ip}/64"),
        "dev",
        "und0",
        "nodad",
    ]);
    c.nodes[0].ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{node_ip}/64"),
        "dev",
        "und0",
        "nodad",
    ]);
    let _echo = EchoServer::start(&outside, outside_ip, ECHO_PORT);
    let node = &c.nodes[0].ns;
    assert!(
        node.sh("ip6tables", &["-t", "nat", "-S"])
            .contains(weft_agent::host::masq::CHAIN),
        "IPv6 rules installed for the IPv6 cluster CIDR"
    );
    let pod = &c.pods[0];
    let failed = round_trips(&pod.ns, outside_ip, ECHO_PORT);
    assert!(
        failed.is_empty(),
        "pod → outside host over IPv6: {failed:?}"
    );
    // IPv4 beside it, as before.
    let _echo4 = EchoServer::start(&outside, outside4, ECHO_PORT);
    assert!(round_trips(&pod.ns, outside4, ECHO_PORT).is_empty());

    restart_agent(&mut lab, &c, 0, &["--ip-masq=false"]);
    assert!(
        !node
            .sh("ip6tables", &["-t", "nat", "-S"])
            .contains(weft_agent::host::masq::CHAIN),
        "removed with --ip-masq=false"
    );
    assert_eq!(
        round_trips(&pod.ns, outside_ip, ECHO_PORT),
        ["tcp", "udp"],
        "without masquerade the outside host cannot answer the pod over IPv6"
    );
}

/// [`TwoByTwo`], dual-stack, the echo servers on the pods' IPv6 addresses.
struct DualStackTwoByTwo {
    c: Cluster,
    _servers: Vec<EchoServer>,
}

impl DualStackTwoByTwo {
    fn start(lab: &mut Lab) -> Self {
        let spec = ClusterSpec {
            nodes: 2,
            pods_per_node: 2,
            ..ClusterSpec::default()
        };
        let c = Cluster::start(lab, spec.dual_stack());
        let _servers = c
            .pods
            .iter()
            .map(|p| EchoServer::start(&p.ns, p.ip6.unwrap(), ECHO_PORT))
            .collect();
        Self { c, _servers }
    }

    /// (client, backend on the same node, backend on the other node).
    fn roles(&self) -> (&PodInfo, &PodInfo, &PodInfo) {
        let on = |n: usize| self.c.pods.iter().filter(move |p| p.node == n);
        let mut local = on(0);
        let client = local.next().unwrap();
        (client, local.next().unwrap(), on(1).next().unwrap())
    }
}

/// An IPv6 Service address (outside the IPv6 cluster CIDR 2001:2::/48).
const SERVICE6: &str = "2001:2:100::10";

/// [`point_service_at`] in ip6tables: `[SERVICE6]:80` → `[backend]:7000`.
fn point_service6_at(node: &Netns, backend: std::net::Ipv6Addr) {
    const CHAIN: &str = "TEST-SERVICES6";
    if node
        .try_sh("ip6tables", &["-t", "nat", "-N", CHAIN])
        .status
        .success()
    {
        for hook in ["PREROUTING", "OUTPUT"] {
            node.sh("ip6tables", &["-t", "nat", "-I", hook, "-j", CHAIN]);
        }
    }
    node.sh("ip6tables", &["-t", "nat", "-F", CHAIN]);
    for proto in ["tcp", "udp"] {
        node.sh(
            "ip6tables",
            &[
                "-t",
                "nat",
                "-A",
                CHAIN,
                "-d",
                SERVICE6,
                "-p",
                proto,
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                &format!("[{backend}]:{ECHO_PORT}"),
            ],
        );
    }
}

#[test]
fn ipv6_services_nated_by_the_node_return_through_the_stack() {
    if !privileged("ipv6_services_nated_by_the_node_return_through_the_stack") {
        return;
    }
    let mut lab = Lab::new("sv6");
    let t = DualStackTwoByTwo::start(&mut lab);
    let (c, (client, local_backend, remote_backend)) = (&t.c, t.roles());
    let node = &c.nodes[0].ns;
    let service: std::net::Ipv6Addr = SERVICE6.parse().unwrap();
    let to_stack = || c.counter(0, "to_stack");

    let mut failures = Vec::new();
    let mut check = |case: &str, failed: Vec<&str>| {
        if !failed.is_empty() {
            failures.push(format!("{case}: {failed:?}"));
        }
    };
    // The backend on another node: its reply arrives in VXLAN and must go up
    // node-1's stack (recorded by weft_from_host), not into the pod.
    point_service6_at(node, remote_backend.ip6.unwrap());
    let before = to_stack();
    check(
        "pod → IPv6 Service → backend on another node",
        round_trips(&client.ns, service, 80),
    );
    let handed_to_stack = to_stack() > before;
    // The backend on the same node: its reply leaves through its own veth
    // and must not be short-cut into the client (recorded by weft_to_pod).
    point_service6_at(node, local_backend.ip6.unwrap());
    check(
        "pod → IPv6 Service → backend on the same node",
        round_trips(&client.ns, service, 80),
    );
    // The node itself calls the Service (OUTPUT), the address routable first.
    point_service6_at(node, remote_backend.ip6.unwrap());
    node.ip(&[
        "-6",
        "route",
        "add",
        &format!("{SERVICE6}/128"),
        "dev",
        "und0",
    ]);
    check(
        "node → IPv6 Service → backend on another node",
        round_trips(node, service, 80),
    );
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
    assert!(
        handed_to_stack,
        "the remote backend's IPv6 replies were handed to node-1's stack"
    );
}

#[test]
fn a_real_kube_proxy_serves_ipv6_services_across_the_fast_paths() {
    if !privileged("a_real_kube_proxy_serves_ipv6_services_across_the_fast_paths") {
        return;
    }
    let mut lab = Lab::new("kp6");
    let t = DualStackTwoByTwo::start(&mut lab);
    let (c, (client, local_backend, remote_backend)) = (&t.c, t.roles());
    let und = c.underlay.ns.clone();
    let api = KubeApi::start_with(
        &mut lab,
        &und,
        "br0",
        weft_tests::kube::ApiOptions {
            dual_stack: true,
            ..Default::default()
        },
    );
    let node = &c.nodes[0].ns;
    api.start_proxy(
        &mut lab,
        node,
        "node-1",
        c.nodes[0].underlay_ip,
        &format!("{CLUSTER_CIDR},{}", weft_tests::CLUSTER_CIDR6),
    );
    let cluster_ip: std::net::Ipv6Addr = "2001:2:200::10".parse().unwrap();
    api.request(
        "POST",
        "/api/v1/namespaces/default/services",
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo6"},
        "spec": {"clusterIP": cluster_ip.to_string(), "ipFamilies": ["IPv6"],
                 "ipFamilyPolicy": "SingleStack", "ports": [
            {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": ECHO_PORT},
            {"name": "udp", "protocol": "UDP", "port": 80, "targetPort": ECHO_PORT},
        ]}}),
    );
    node.ip(&[
        "-6",
        "route",
        "add",
        weft_tests::kube::SERVICE_CIDR6,
        "dev",
        "und0",
    ]);
    let proxy_log = || lab.log("kube-proxy-node-1");
    let mut failures = Vec::new();
    let mut check = |case: &str, failed: Vec<&str>| {
        if !failed.is_empty() {
            failures.push(format!("{case}: {failed:?}"));
        }
    };
    let before = c.counter(0, "to_stack");
    let ip6 = |p: &PodInfo| std::net::IpAddr::V6(p.ip6.unwrap());
    endpoints_at(&api, node, "echo6", ip6(remote_backend), true, &proxy_log);
    check(
        "pod → IPv6 ClusterIP → backend on another node",
        round_trips(&client.ns, cluster_ip, 80),
    );
    check(
        "node → IPv6 ClusterIP → backend on another node",
        round_trips(node, cluster_ip, 80),
    );
    let handed_to_stack = c.counter(0, "to_stack") > before;
    endpoints_at(&api, node, "echo6", ip6(local_backend), false, &proxy_log);
    check(
        "pod → IPv6 ClusterIP → backend on the same node",
        round_trips(&client.ns, cluster_ip, 80),
    );
    assert!(
        failures.is_empty(),
        "through kube-proxy's ip6tables rules:\n{}\nkube-proxy log (tail):\n{}",
        failures.join("\n"),
        proxy_log()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        handed_to_stack,
        "the remote backend's IPv6 replies went up node-1's stack"
    );
}
