//! weft and flannel in one cluster (`flannel-compat`), and a flannel node
//! moved to weft under traffic, against a real kube-apiserver.
//!
//! flannel nodes are made exactly as flanneld makes them: `flannel.1` and
//! `cni0` as its vxlan backend and CNI leave them (baselines.rs), their
//! routes, neighbours and FDB entries programmed from the Node annotations
//! by a test-side flanneld (support/flanneld.rs), their pods on `cni0` with
//! their addresses recorded as host-local records them. weft nodes run the
//! real agent with the `kube` registry in compat mode.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::json;
use weft_tests::{
    CLUSTER_CIDR, Cluster, ClusterSpec, EchoServer, FlannelNode, Lab, PodInfo, bridge_pod,
    bulk_tcp_intact,
    kube::{ADMIN_TOKEN, AGENT_TOKEN, KubeApi},
    ping, privileged, tcp_roundtrip,
    traffic::{TcpStream, UdpCount},
    udp_roundtrip, wait_for,
};

#[path = "support/api.rs"]
mod api;
#[path = "support/flanneld.rs"]
mod flanneld;

use api::{annotate, bind_agent_rbac, create, have_apiserver, label, node};
use flanneld::{Flanneld, key};

const ECHO_PORT: u16 = 7000;
/// The Service the test creates (in the API server's service range).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);

/// flannel's conflist, as kube-flannel.yml's install-cni step writes it.
const FLANNEL_CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Weft,
    Flannel,
}

/// A cluster of weft and flannel nodes on one underlay and API server.
struct Mixed {
    c: Cluster,
    api: KubeApi,
    kinds: Vec<Kind>,
    flannel: BTreeMap<usize, FlannelNode>,
    flanneld: BTreeMap<usize, Flanneld>,
    /// Every pod, of both kinds.
    pods: Vec<PodInfo>,
    admin: PathBuf,
    agent: PathBuf,
}

impl Mixed {
    fn start(lab: &mut Lab, kinds: &[Kind]) -> Self {
        let c = Cluster::new(lab, ClusterSpec::nodes_only(kinds.len()));
        let und = c.underlay.ns.clone();
        let api = KubeApi::start(lab, &und, "br0");
        bind_agent_rbac(&und, &api);
        for n in &c.nodes {
            create(&und, &api, node(&n.name, Some(&n.pod_cidr), &[]));
        }
        let mut m = Self {
            admin: api.kubeconfig("admin", ADMIN_TOKEN),
            agent: api.kubeconfig("agent", AGENT_TOKEN),
            c,
            api,
            kinds: kinds.to_vec(),
            flannel: BTreeMap::new(),
            flanneld: BTreeMap::new(),
            pods: Vec::new(),
        };
        for (i, k) in kinds.iter().enumerate() {
            if *k == Kind::Flannel {
                m.make_flannel(i, None);
            }
        }
        for (i, k) in kinds.iter().enumerate() {
            if *k == Kind::Weft {
                m.start_weft(lab, i);
            }
        }
        m.wait_converged();
        m
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.c.nodes[i].run_dir.clone()
    }

    /// The runtime's CNI configuration directory of node `i`.
    fn net_d(&self, i: usize) -> PathBuf {
        self.dir(i).join("net.d")
    }

    /// host-local's store of flannel's network (`/var/lib/cni/networks/cbr0`).
    fn cbr0(&self, i: usize) -> PathBuf {
        self.dir(i).join("cni-networks/cbr0")
    }

    /// Node `i` as flannel leaves it: `flannel.1`, `cni0`, its conflist,
    /// and flanneld running (with `mac`, the one a restarted flanneld
    /// takes from its Node).
    fn make_flannel(&mut self, i: usize, mac: Option<&str>) {
        let n = &self.c.nodes[i];
        let f = FlannelNode::with_mac(&n.ns, n.underlay_ip, (i + 1) as u8, 1, 8472, mac);
        std::fs::create_dir_all(self.net_d(i)).unwrap();
        std::fs::create_dir_all(self.cbr0(i)).unwrap();
        std::fs::write(self.net_d(i).join("10-flannel.conflist"), FLANNEL_CONFLIST).unwrap();
        let d = Flanneld::start(flanneld::Conf {
            node_name: n.name.clone(),
            ns: n.ns.clone(),
            public_ip: n.underlay_ip,
            vni: 1,
            kubeconfig: self.admin.clone(),
        });
        self.flannel.insert(i, f);
        self.flanneld.insert(i, d);
        self.kinds[i] = Kind::Flannel;
    }

    /// A pod on flannel node `i`: a veth on `cni0`, its address recorded
    /// as host-local records it.
    fn flannel_pod(&mut self, lab: &mut Lab, i: usize, j: usize) -> PodInfo {
        let name = format!("n{}f{}", i + 1, j + 1);
        let ip = Ipv4Addr::new(198, 19, (i + 1) as u8, 10 + j as u8);
        let gw = Ipv4Addr::new(198, 19, (i + 1) as u8, 1);
        let ns = bridge_pod(lab, &self.c.nodes[i].ns, "cni0", &name, ip, gw, 1450);
        std::fs::write(
            self.cbr0(i).join(ip.to_string()),
            format!("{}\r\neth0", ns.name),
        )
        .unwrap();
        let pod = PodInfo {
            name: ns.name.clone(),
            ns,
            ip,
            ip6: None,
            node: i,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// A pod on weft node `i`, through the CNI plugin.
    fn weft_pod(&mut self, lab: &mut Lab, i: usize, j: usize) -> PodInfo {
        let pod = self.c.add_pod(lab, i, j);
        self.pods.push(pod.clone());
        pod
    }

    /// The conflist the agent installs on node `i` (the lab's CNI calls use
    /// the same network name and store).
    fn weft_conflist(&self, i: usize) -> PathBuf {
        let n = &self.c.nodes[i];
        let path = self.dir(i).join("weft.conflist");
        let conf = json!({"cniVersion": "1.1.0", "name": "weft", "plugins": [
            {"type": "weft", "runDir": n.run_dir, "dataDir": n.run_dir.join("ipam")}
        ]});
        std::fs::create_dir_all(self.dir(i)).unwrap();
        std::fs::write(&path, conf.to_string()).unwrap();
        path
    }

    /// Starts the real agent on node `i`: kube registry, flannel-compat,
    /// its conflist installed into the node's net.d once ready.
    fn start_weft(&mut self, lab: &mut Lab, i: usize) {
        std::fs::create_dir_all(self.net_d(i)).unwrap();
        let mut cmd = self.c.agent_command(i);
        cmd.args(["--registry", "kube", "--flannel-compat"])
            .arg("--kubeconfig")
            .arg(&self.agent)
            .arg("--read-cni-conf")
            .arg(self.weft_conflist(i))
            .arg("--write-cni-conf-when-ready")
            .arg(self.net_d(i).join("10-weft.conflist"))
            .arg("--flannel-ipam-dir")
            .arg(self.cbr0(i));
        lab.spawn(&Cluster::agent_name(i), cmd);
        self.c.wait_ready(lab, i);
        self.kinds[i] = Kind::Weft;
    }

    /// The VTEP MAC node `i` answers to: flannel.1's — on a node taken
    /// over from flannel too, whose agent keeps it — or weft's stable one.
    fn vtep_mac(&self, i: usize) -> String {
        match self.flannel.get(&i) {
            Some(f) => f.vtep_mac.clone(),
            None => {
                let o = self.c.nodes[i].underlay_ip.octets();
                format!("0e:77:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
            }
        }
    }

    /// What node `i` has for node `j`'s pod CIDR: (underlay IP, VTEP MAC),
    /// from weft's map or flannel.1's FDB and neighbours.
    fn entry_for(&self, i: usize, j: usize) -> Option<(String, String)> {
        let gw = format!("198.19.{}.0", j + 1);
        match self.kinds[i] {
            Kind::Weft => {
                let cidr = format!("198.19.{}.0/24", j + 1);
                self.c.status(i)["nodes"]
                    .as_array()?
                    .iter()
                    .find(|n| n["pod_cidr"] == cidr.as_str())
                    .map(|n| {
                        (
                            n["underlay_ip"].as_str().unwrap_or_default().to_string(),
                            n["vtep_mac"].as_str().unwrap_or_default().to_string(),
                        )
                    })
            }
            Kind::Flannel => {
                let ns = &self.c.nodes[i].ns;
                let neigh = ns.ip(&["neigh", "show", &gw, "dev", "flannel.1"]);
                let mac = neigh
                    .split_whitespace()
                    .skip_while(|w| *w != "lladdr")
                    .nth(1)?
                    .to_string();
                let fdb = ns.sh("bridge", &["fdb", "show", "dev", "flannel.1"]);
                let ip = fdb
                    .lines()
                    .find(|l| l.starts_with(&mac) && l.contains(" dst "))?
                    .split_whitespace()
                    .skip_while(|w| *w != "dst")
                    .nth(1)?
                    .to_string();
                let routed = ns
                    .ip(&["route", "show", &format!("198.19.{}.0/24", j + 1)])
                    .contains(&format!("via {gw} dev flannel.1"));
                routed.then_some((ip, mac))
            }
        }
    }

    /// Waits until every node has every other node right.
    fn wait_converged(&self) {
        let n = self.kinds.len();
        let (mut last, t) = (String::new(), Instant::now());
        while t.elapsed() < Duration::from_secs(20) {
            let wrong: Vec<String> = (0..n)
                .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
                .filter_map(|(i, j)| {
                    let want = (self.c.nodes[j].underlay_ip.to_string(), self.vtep_mac(j));
                    let have = self.entry_for(i, j);
                    (have.as_ref() != Some(&want)).then(|| {
                        format!(
                            "node-{} has {have:?} for node-{}, not {want:?}",
                            i + 1,
                            j + 1
                        )
                    })
                })
                .collect();
            if wrong.is_empty() {
                return;
            }
            last = wrong.join("\n");
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "not converged in 20 s:\n{last}\nflanneld logs:\n{}",
            self.flanneld
                .values()
                .map(|d| format!("{}: {:?}", d.node_name, d.log()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// The address node `i`'s own traffic to pods comes from: flannel.1's
    /// `<subnet>.0`, or weft0's gateway `.1`.
    fn host_ip(&self, i: usize) -> Ipv4Addr {
        let last = if self.kinds[i] == Kind::Flannel { 0 } else { 1 };
        Ipv4Addr::new(198, 19, (i + 1) as u8, last)
    }
}

/// Pings from every pod (and node) in `from` to every pod on another node;
/// the pairs that failed.
fn unreachable_pairs(m: &Mixed, from: &[PodInfo], to: &[PodInfo]) -> Vec<String> {
    let mut failed = Vec::new();
    for a in from {
        for b in to.iter().filter(|b| b.ip != a.ip) {
            if !ping(&a.ns, b.ip, 2) {
                failed.push(format!(
                    "{} ({:?} node-{}) → {} ({:?} node-{})",
                    a.ip,
                    m.kinds[a.node],
                    a.node + 1,
                    b.ip,
                    m.kinds[b.node],
                    b.node + 1
                ));
            }
        }
    }
    failed
}

#[test]
fn flannel_and_weft_nodes_are_one_network() {
    let test = "flannel_and_weft_nodes_are_one_network";
    if !privileged(test) || !have_apiserver(test) {
        return;
    }
    let mut lab = Lab::new("flm");
    let mut m = Mixed::start(
        &mut lab,
        &[Kind::Weft, Kind::Weft, Kind::Flannel, Kind::Flannel],
    );
    // flanneld wrote flannel's annotations with its random MAC; weft wrote
    // flanneld's (its own MAC, its VNI) next to its own.
    let nodes = api::with_client(&m.c.underlay.ns, &m.api, async |c| {
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(c)
            .list(&Default::default())
            .await
            .unwrap()
            .items
    });
    for (i, n) in nodes.iter().enumerate() {
        let a = n.metadata.annotations.clone().unwrap_or_default();
        let want = format!("{{\"VNI\":1,\"VtepMAC\":\"{}\"}}", m.vtep_mac(i));
        assert_eq!(a.get(&key("backend-data")), Some(&want), "node-{}", i + 1);
        assert_eq!(
            a.get(&key("kube-subnet-manager")).map(String::as_str),
            Some("true")
        );
        assert_eq!(
            a.get(&key("backend-type")).map(String::as_str),
            Some("vxlan")
        );
        assert_eq!(
            a.get(&key("public-ip")),
            Some(&m.c.nodes[i].underlay_ip.to_string())
        );
    }
    for i in 0..4 {
        if m.kinds[i] == Kind::Weft {
            m.weft_pod(&mut lab, i, 0);
        } else {
            m.flannel_pod(&mut lab, i, 0);
        }
    }
    let pods = m.pods.clone();
    let _echo: Vec<EchoServer> = pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, p.ip, ECHO_PORT))
        .collect();

    // Pod ↔ pod, every pair.
    let failed = unreachable_pairs(&m, &pods, &pods);
    assert!(failed.is_empty(), "pod → pod:\n{}", failed.join("\n"));
    // TCP bulk both ways between the kinds, byte for byte.
    let mut port = 9000;
    for a in pods.iter().filter(|p| m.kinds[p.node] == Kind::Weft) {
        for b in pods.iter().filter(|p| m.kinds[p.node] == Kind::Flannel) {
            for (from, to) in [(a, b), (b, a)] {
                port += 1;
                bulk_tcp_intact(&to.ns, to.ip, port, &from.ns, 64 << 20)
                    .unwrap_or_else(|e| panic!("64 MiB {} → {}: {e}", from.ip, to.ip));
            }
        }
    }
    // Host ↔ pod: each node's own traffic (from flannel.1's .0 on a
    // flannel node, weft0's .1 on a weft node) to the pods of the others,
    // and the pods to each node's overlay address.
    let hosts: Vec<EchoServer> = (0..4)
        .map(|i| EchoServer::start(&m.c.nodes[i].ns, m.host_ip(i), ECHO_PORT))
        .collect();
    let mut failed = Vec::new();
    for i in 0..4 {
        let host = &m.c.nodes[i].ns;
        for p in pods.iter().filter(|p| p.node != i) {
            if !tcp_roundtrip(host, p.ip, ECHO_PORT) || !udp_roundtrip(host, p.ip, ECHO_PORT) {
                failed.push(format!("node-{} ({:?}) → pod {}", i + 1, m.kinds[i], p.ip));
            }
            if !tcp_roundtrip(&p.ns, m.host_ip(i), ECHO_PORT) {
                failed.push(format!(
                    "pod {} → node-{} ({:?}) at {}",
                    p.ip,
                    i + 1,
                    m.kinds[i],
                    m.host_ip(i)
                ));
            }
        }
    }
    drop(hosts);
    assert!(failed.is_empty(), "host ↔ pod:\n{}", failed.join("\n"));

    services_across_kinds(&mut lab, &m, &pods);
    bad_flannel_nodes_are_skipped(&mut lab, &mut m, &pods);
}

/// A Service with a backend on one kind of node, called from pods and
/// nodes of the other kind, through real kube-proxies.
fn services_across_kinds(lab: &mut Lab, m: &Mixed, pods: &[PodInfo]) {
    let (weft_node, flannel_node) = (0, 2);
    for i in [weft_node, flannel_node] {
        let n = &m.c.nodes[i];
        m.api
            .start_proxy(lab, &n.ns, &n.name, n.underlay_ip, CLUSTER_CIDR);
        // As on a real node, the service range is routable.
        n.ns.ip(&["route", "add", "198.18.200.0/24", "dev", "und0"]);
    }
    m.api.create_service("echo", CLUSTER_IP, ECHO_PORT);
    let on = |i: usize| pods.iter().find(|p| p.node == i).unwrap();
    let mut failures = Vec::new();
    for (n, (backend, client_node)) in [(on(3), weft_node), (on(1), flannel_node)]
        .into_iter()
        .enumerate()
    {
        let subsets = json!([{"addresses": [{"ip": backend.ip.to_string()}],
            "ports": [{"name": "tcp", "port": ECHO_PORT, "protocol": "TCP"},
                      {"name": "udp", "port": ECHO_PORT, "protocol": "UDP"}]}]);
        if n == 0 {
            m.api.request(
                "POST",
                "/api/v1/namespaces/default/endpoints",
                &json!({"apiVersion": "v1", "kind": "Endpoints",
                        "metadata": {"name": "echo"}, "subsets": subsets}),
            );
        } else {
            m.api.request(
                "PATCH",
                "/api/v1/namespaces/default/endpoints/echo",
                &json!({"subsets": subsets}),
            );
        }
        let node = &m.c.nodes[client_node].ns;
        let want = format!("--to-destination {}:{ECHO_PORT}", backend.ip);
        wait_for("kube-proxy's DNAT", Duration::from_secs(30), || {
            node.sh("iptables", &["-t", "nat", "-S"])
                .contains(&want)
                .then_some(())
        });
        let client = on(client_node);
        for (who, ns) in [("pod", &client.ns), ("node", node)] {
            for (proto, ok) in [
                ("tcp", tcp_roundtrip(ns, CLUSTER_IP, 80)),
                ("udp", udp_roundtrip(ns, CLUSTER_IP, 80)),
            ] {
                if !ok {
                    failures.push(format!(
                        "{who} on node-{} ({:?}) → ClusterIP → {} on node-{} ({:?}): {proto}",
                        client_node + 1,
                        m.kinds[client_node],
                        backend.ip,
                        backend.node + 1,
                        m.kinds[backend.node]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "Services:\n{}", failures.join("\n"));
}

/// flannel annotations weft cannot use, and a Node claiming another's pod
/// CIDR: one line naming the Node and the field each, that Node skipped,
/// the rest of the dataplane as it was.
fn bad_flannel_nodes_are_skipped(lab: &mut Lab, m: &mut Mixed, pods: &[PodInfo]) {
    let und = m.c.underlay.ns.clone();
    let flannel_node = |name: &str, cidr: &str, ip: &str, data: &str| {
        node(
            name,
            Some(cidr),
            &[
                (&key("kube-subnet-manager"), "true"),
                (&key("backend-type"), "vxlan"),
                (&key("backend-data"), data),
                (&key("public-ip"), ip),
            ],
        )
    };
    let before = m.c.remote_nodes(0);
    for n in [
        flannel_node(
            "fl-json",
            "198.19.51.0/24",
            "198.18.0.51",
            r#"{"VNI":1,"VtepMAC":"#,
        ),
        flannel_node(
            "fl-mcast",
            "198.19.52.0/24",
            "198.18.0.52",
            r#"{"VNI":1,"VtepMAC":"01:00:5e:00:00:42"}"#,
        ),
        flannel_node(
            "fl-ip",
            "198.19.53.0/24",
            "198.18.0.999",
            r#"{"VNI":1,"VtepMAC":"6a:00:00:00:00:53"}"#,
        ),
        flannel_node(
            "fl-vni",
            "198.19.54.0/24",
            "198.18.0.54",
            r#"{"VNI":2,"VtepMAC":"6a:00:00:00:00:54"}"#,
        ),
        // weft's own annotations, flannel's node-4's subnet.
        node(
            "dup",
            Some("198.19.4.0/24"),
            &[("weft.dev/underlay-ip", "198.18.0.55")],
        ),
    ] {
        create(&und, &m.api, n);
    }
    let expected = [
        "Node fl-json: annotation flannel.alpha.coreos.com/backend-data=`{\"VNI\":1,\"VtepMAC\":` is not a JSON object",
        "Node fl-mcast: annotation flannel.alpha.coreos.com/backend-data: VtepMAC 01:00:5e:00:00:42 is not a unicast MAC; skipped",
        "Node fl-ip: annotation flannel.alpha.coreos.com/public-ip=`198.18.0.999` is not an IPv4 address; skipped",
        "Node fl-vni: annotation flannel.alpha.coreos.com/backend-data says VNI 2, this agent's VNI is 1: set weft's `vni` to flannel's Backend.VNI (2)",
        "Node dup: spec.podCIDR 198.19.4.0/24 overlaps Node node-4's 198.19.4.0/24; skipped",
    ];
    let log = || lab.log("agent-1");
    wait_for("each bad Node reported", Duration::from_secs(10), || {
        expected.iter().all(|e| log().contains(e)).then_some(())
    });
    assert_eq!(m.c.remote_nodes(0), before, "node-1's map is as it was");
    let failed = unreachable_pairs(m, &pods[..1], pods);
    assert!(
        failed.is_empty(),
        "after the bad Nodes:\n{}",
        failed.join("\n")
    );

    // A VNI mismatch is said once, not at every later change.
    create(
        &und,
        &m.api,
        node(
            "late",
            Some("198.19.56.0/24"),
            &[("weft.dev/underlay-ip", "198.18.0.56")],
        ),
    );
    label(&und, &m.api, "fl-vni", "touched");
    wait_for("node `late` applied", Duration::from_secs(5), || {
        m.c.remote_nodes(0)
            .contains(&"198.19.56.0/24@198.18.0.56".to_string())
            .then_some(())
    });
    assert_eq!(
        log().matches("Node fl-vni: ").count(),
        1,
        "said once:\n{}",
        log()
    );

    // A flannel node whose lease turns unreadable keeps its last good entry
    // (flanneld keeps its routes too); fixed, it is read again.
    annotate(&und, &m.api, "node-4", &key("public-ip"), "not-an-ip");
    wait_for("the broken lease reported", Duration::from_secs(5), || {
        log()
            .contains("Node node-4: annotation flannel.alpha.coreos.com/public-ip=`not-an-ip` is not an IPv4 address; skipped (its last good entry, underlay 198.18.0.4")
            .then_some(())
    });
    let to_node4: Vec<PodInfo> = pods.iter().filter(|p| p.node == 3).cloned().collect();
    let failed = unreachable_pairs(m, &pods[..2], &to_node4);
    assert!(
        failed.is_empty(),
        "while node-4's lease is broken:\n{}",
        failed.join("\n")
    );
    annotate(&und, &m.api, "node-4", &key("public-ip"), "198.18.0.4");
    m.wait_converged();
}

#[test]
fn a_flannel_node_moves_to_weft_under_traffic() {
    let test = "a_flannel_node_moves_to_weft_under_traffic";
    if !privileged(test) || !have_apiserver(test) {
        return;
    }
    let mut lab = Lab::new("flv");
    // node-2 is converted; node-1 (weft) and node-3 (flannel) carry the
    // streams that must not notice.
    let mut m = Mixed::start(&mut lab, &[Kind::Weft, Kind::Flannel, Kind::Flannel]);
    let w1 = m.weft_pod(&mut lab, 0, 0);
    let f2 = m.flannel_pod(&mut lab, 1, 0);
    let f2b = m.flannel_pod(&mut lab, 1, 1);
    let f3 = m.flannel_pod(&mut lab, 2, 0);
    let failed = unreachable_pairs(&m, &m.pods.clone(), &m.pods.clone());
    assert!(failed.is_empty(), "before: {failed:?}");

    let udp = UdpCount::start(
        f3.ns.path(),
        w1.ns.path(),
        w1.ip,
        9100,
        Duration::from_millis(1),
    );
    let tcp = TcpStream::start(w1.ns.path(), f3.ns.path(), f3.ip, 9101, 20 << 20);
    // The pod flannel wired on the node being converted keeps running.
    let adopted_out = UdpCount::start(
        f2.ns.path(),
        w1.ns.path(),
        w1.ip,
        9102,
        Duration::from_millis(1),
    );
    let adopted_in = UdpCount::start(
        w1.ns.path(),
        f2.ns.path(),
        f2.ip,
        9103,
        Duration::from_millis(1),
    );
    let adopted_tcp = TcpStream::start(f3.ns.path(), f2.ns.path(), f2.ip, 9104, 10 << 20);
    std::thread::sleep(Duration::from_secs(2));

    // The conversion, as MIGRATION.md does it: flannel's pod leaves the
    // node (its kernel state stays), weft's agent starts there.
    let flannel_mac = m.flannel[&1].vtep_mac.clone();
    let t = Instant::now();
    m.flanneld.remove(&1).unwrap().stop();
    m.start_weft(&mut lab, 1);
    let ready = t.elapsed();
    m.wait_converged();
    let converged = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let report = udp.finish();
    let sent = tcp.sent();
    let tcp_result = tcp.finish();
    let out_report = adopted_out.finish();
    let in_report = adopted_in.finish();
    let adopted_tcp_result = adopted_tcp.finish();
    println!(
        "node-2 converted: agent ready in {ready:?}, every node updated in {converged:?}; \
         node-3 → node-1 UDP {}/{}, node-1 → node-3 TCP {sent} bytes; \
         node-2's flannel pod: out {}/{}, in {}/{} datagrams, TCP from node-3 {:?}",
        report.received,
        report.sent,
        out_report.received,
        out_report.sent,
        in_report.received,
        in_report.sent,
        adopted_tcp_result
    );
    report.assert_lossless(3000, "between node-3 and node-1 while node-2 moved to weft");
    tcp_result.unwrap_or_else(|e| panic!("node-1 → node-3 TCP while node-2 moved: {e}"));
    out_report.assert_lossless(
        3000,
        "from node-2's flannel pod while its node moved to weft",
    );
    in_report.assert_lossless(3000, "to node-2's flannel pod while its node moved to weft");
    adopted_tcp_result
        .unwrap_or_else(|e| panic!("node-3 → node-2's flannel pod TCP while node-2 moved: {e}"));

    // What weft did with flannel's leftovers on node-2.
    let n2 = &m.c.nodes[1].ns;
    assert!(
        !n2.try_sh("ip", &["link", "show", "flannel.1"])
            .status
            .success(),
        "flannel.1 removed"
    );
    assert!(
        n2.try_sh("ip", &["link", "show", "cni0"]).status.success(),
        "cni0 kept"
    );
    let net_d = m.net_d(1);
    assert!(net_d.join("10-flannel.conflist.weft-disabled").exists());
    assert!(!net_d.join("10-flannel.conflist").exists());
    assert!(net_d.join("10-weft.conflist").exists());
    let store = m.c.nodes[1].run_dir.join("ipam/weft");
    assert!(
        store.join(f2.ip.to_string()).exists(),
        "flannel's pod's address is reserved"
    );

    // A pod weft wires on the converted node reaches every pod (the one
    // still on cni0 included) and gets none of flannel's addresses.
    let w2 = m.weft_pod(&mut lab, 1, 0);
    assert_ne!(w2.ip, f2.ip);
    let pods = m.pods.clone();
    let failed = unreachable_pairs(&m, &pods, &pods);
    assert!(failed.is_empty(), "after the move:\n{}", failed.join("\n"));
    for to in [&w1, &f3, &f2] {
        bulk_tcp_intact(&to.ns, to.ip, 9200 + to.node as u16, &w2.ns, 32 << 20)
            .unwrap_or_else(|e| panic!("{} → {}: {e}", w2.ip, to.ip));
    }
    // The runtime deletes a pod flannel wired through weft's plugin now:
    // its address is released.
    let conf = m.c.cni_conf(1, "1.1.0");
    let out =
        m.c.cni(1, "DEL", &f2b.name, f2b.ns.path().to_str().unwrap(), &conf);
    assert!(
        out.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!store.join(f2b.ip.to_string()).exists(), "released by DEL");
    m.pods.retain(|p| p.ip != f2b.ip);

    // Roll node-2 back, as MIGRATION.md does: weft's pods drained, its
    // agent gone, `weft down`, flannel's conflist back, flanneld again —
    // which takes the VTEP MAC its Node stores (weft's), so no other node
    // has anything to change.
    let back_in = UdpCount::start(
        w1.ns.path(),
        f2.ns.path(),
        f2.ip,
        9105,
        Duration::from_millis(1),
    );
    let out =
        m.c.cni(1, "DEL", &w2.name, w2.ns.path().to_str().unwrap(), &conf);
    assert!(
        out.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    m.pods.retain(|p| p.ip != w2.ip);
    let t = Instant::now();
    lab.stop(&Cluster::agent_name(1));
    let out = m.c.weft(1, &["down"]);
    assert!(
        out.status.success(),
        "weft down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(net_d.join("10-weft.conflist")).unwrap();
    std::fs::remove_file(net_d.join("10-flannel.conflist.weft-disabled")).unwrap();
    let stored = api::with_client(&m.c.underlay.ns, &m.api, async |c| {
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(c)
            .get("node-2")
            .await
            .unwrap()
    })
    .metadata
    .annotations
    .unwrap_or_default()[&key("backend-data")]
        .clone();
    let mac: String = serde_json::from_str::<serde_json::Value>(&stored).unwrap()["VtepMAC"]
        .as_str()
        .unwrap()
        .into();
    assert_eq!(
        mac, flannel_mac,
        "node-2 still stores flannel.1's MAC, which weft kept"
    );
    m.make_flannel(1, Some(&mac));
    m.wait_converged();
    let back = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let gap = back_in.finish();
    println!(
        "node-2 rolled back to flannel in {back:?}; into its flannel pod meanwhile: {}/{} datagrams (a pod on the node sees the gap between `weft down` and flanneld's routes)",
        gap.received, gap.sent
    );
    let pods = m.pods.clone();
    let failed = unreachable_pairs(&m, &pods, &pods);
    assert!(
        failed.is_empty(),
        "after the roll-back:\n{}",
        failed.join("\n")
    );
}
