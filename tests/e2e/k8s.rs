//! weft in a real Kubernetes cluster ([`weft_tests::k8s`]): real kubelets
//! start weft's DaemonSet and call `weft-cni` through containerd's CRI, the
//! controller manager hands out the pod CIDRs, kube-proxy programs the
//! Services, and Kubernetes' own e2e.test checks the network.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_tests::{
    Lab,
    k8s::{CORE, KubeCluster, KubeNode, KubeSpec, SKIP, name_of, pod_ip},
    privileged,
    traffic::{TcpStream, UdpCount},
};

#[path = "support/flanneld.rs"]
mod flanneld;

fn cluster(tag: &str) -> KubeCluster {
    let started = Instant::now();
    let c = KubeCluster::up(Lab::new(tag), KubeSpec::from_env(3), |m| {
        eprintln!("==> cluster: {m}")
    });
    eprintln!(
        "==> cluster: up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    c
}

#[test]
fn kubernetes_network_conformance_core() {
    if !privileged("kubernetes_network_conformance_core") {
        return;
    }
    let c = cluster("kc");
    let log = c.lab.dir.join("e2e.log");
    let (summary, ok) = c.e2e(CORE, SKIP, &log, &|| false);
    println!("{summary}");
    assert!(
        ok && summary.contains("SUCCESS! -- 7 Passed | 0 Failed"),
        "e2e.test (the four Granular Checks: Pods, three basic Services specs):\n{summary}\n--- the log's end:\n{}",
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(80)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Two agnhost pods of one Deployment, each on its own node (required
/// anti-affinity), with the kubelet's HTTP probes on.
const PAIR: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: pair}
spec:
  replicas: 2
  selector: {matchLabels: {app: pair}}
  template:
    metadata: {labels: {app: pair}}
    spec:
      terminationGracePeriodSeconds: 1
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - labelSelector: {matchLabels: {app: pair}}
              topologyKey: kubernetes.io/hostname
      containers:
        - name: netexec
          image: localhost/e2e-test-images/agnhost:2.21
          args: ["netexec", "--http-port=8080", "--udp-port=8081"]
          readinessProbe:
            httpGet: {path: /healthz, port: 8080}
            periodSeconds: 1
            failureThreshold: 2
          livenessProbe:
            httpGet: {path: /healthz, port: 8080}
            periodSeconds: 1
            failureThreshold: 3
"#;

/// When each pod last became Ready, and how often its container restarted.
fn readiness(pods: &[Value]) -> Vec<(String, String, u64)> {
    let mut out: Vec<(String, String, u64)> = pods
        .iter()
        .map(|p| {
            let ready = p["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| format!("{}@{}", c["status"], c["lastTransitionTime"]))
                .unwrap_or_default();
            let restarts = p["status"]["containerStatuses"][0]["restartCount"]
                .as_u64()
                .unwrap_or(0);
            (name_of(p), ready, restarts)
        })
        .collect();
    out.sort();
    out
}

fn node_of(p: &Value) -> String {
    p["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// An HTTP GET through `kubectl exec` of curl in `pod`; the body.
fn curl(c: &KubeCluster, pod: &str, url: &str) -> Option<String> {
    let out = c.exec("default", pod, &["curl", "-s", "-m", "5", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn weft_life_cycle_under_real_kubelets() {
    if !privileged("weft_life_cycle_under_real_kubelets") {
        return;
    }
    let c = cluster("kl");
    // The runtime reports a node's network only once weft's agent installed
    // the conflist, ready: before that no Node was Ready.
    assert_eq!(
        c.ready_before_weft, 0,
        "Nodes Ready before weft was installed"
    );

    // kubelet probes (node → pod, through weft) make the pair Ready.
    c.apply("pair", PAIR);
    let pair = c.wait_pods_ready("default", "app=pair", 2, Duration::from_secs(90));
    let (a, b) = (&pair[0], &pair[1]);
    assert_ne!(node_of(a), node_of(b), "the pair is on two nodes");
    let before = readiness(&pair);

    // `kubectl rollout restart` of weft while a counted UDP stream and a
    // TCP stream run between the pair.
    let old_agents: Vec<String> = c
        .pods("kube-system", "app=weft")
        .iter()
        .map(name_of)
        .collect();
    let (from, to) = (
        c.pod_netns("default", &name_of(a)),
        c.pod_netns("default", &name_of(b)),
    );
    let udp = UdpCount::start(
        from.clone(),
        to.clone(),
        pod_ip(b),
        9100,
        Duration::from_millis(1),
    );
    let tcp = TcpStream::start(from, to, pod_ip(b), 9101, 20 << 20);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    c.kubectl_ok(&["-n", "kube-system", "rollout", "restart", "daemonset/weft"]);
    c.kubectl_ok(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/weft",
        "--timeout=180s",
    ]);
    let rollout = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let report = udp.finish();
    let tcp_bytes = tcp.finish();
    println!(
        "rollout restart of weft in {:.1} s: UDP sent {}, received {}; TCP {:?} bytes intact",
        rollout.as_secs_f64(),
        report.sent,
        report.received,
        tcp_bytes
    );
    let new_agents: Vec<String> = c
        .pods("kube-system", "app=weft")
        .iter()
        .map(name_of)
        .collect();
    assert!(
        new_agents.iter().all(|n| !old_agents.contains(n)) && new_agents.len() == 3,
        "every agent pod was replaced: {old_agents:?} → {new_agents:?}"
    );
    report.assert_lossless(2000, "during the rollout");
    let tcp_bytes = tcp_bytes.unwrap_or_else(|e| panic!("TCP across the rollout: {e}"));
    assert!(
        tcp_bytes > 20 << 20,
        "the TCP stream ran: {tcp_bytes} bytes"
    );
    // The kubelet's probes kept passing: no pod left Ready or restarted.
    let after = readiness(&c.pods("default", "app=pair"));
    assert_eq!(
        before, after,
        "the pair's readiness and restarts across the rollout"
    );
    // Nor did a Node: the conflist stays while an agent is replaced.
    c.wait_nodes_ready(Duration::from_secs(1));

    // A conflist removed by something else is put back by the agent.
    let conflist = "/etc/cni/net.d/10-weft.conflist";
    let node = &c.nodes[0];
    node.sh("rm", &[conflist]);
    c.wait_for(
        "the agent to put the conflist back",
        Duration::from_secs(15),
        |_| {
            node.run("test", &["-s", conflist])
                .status
                .success()
                .then_some(())
        },
    );

    // A node whose agent cannot start (a bad setting) reports no network:
    // its Node goes NotReady, and Ready again once the agent starts.
    let manifest = c.lab.dir.join("weft.yaml");
    let good = std::fs::read_to_string(&manifest).unwrap();
    let bad = good.replace("registry = \"kube\"", "registry = \"kube\"\n    vni = 0");
    assert_ne!(
        good, bad,
        "the ConfigMap's agent.toml has registry = \"kube\""
    );
    c.apply("weft-bad", &bad);
    let agent_on = |node: &str| {
        c.pods("kube-system", "app=weft")
            .into_iter()
            .find(|p| node_of(p) == node)
            .map(|p| name_of(&p))
    };
    node.sh("rm", &[conflist]);
    c.kubectl_ok(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        &agent_on(&node.name).unwrap(),
        "--wait=true",
    ]);
    let broken = c.wait_for(
        "the new agent pod to fail on the bad setting",
        Duration::from_secs(60),
        |c| {
            let name = agent_on(&node.name)?;
            let log = c.kubectl(&["-n", "kube-system", "logs", &name, "-c", "weft"]);
            let log = String::from_utf8_lossy(&log.stdout).into_owned();
            log.contains("--vni 0 is out of range").then_some(log)
        },
    );
    println!("the agent with vni = 0: {}", broken.trim());
    c.wait_for(
        &format!("{} NotReady without weft's conflist", node.name),
        Duration::from_secs(60),
        |c| {
            let n = c.kubectl_json(&["get", "node", &node.name]);
            (!weft_tests::k8s::node_ready(&n)).then_some(())
        },
    );
    c.apply("weft", &good);
    c.kubectl_ok(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        &agent_on(&node.name).unwrap(),
        "--wait=true",
    ]);
    c.wait_nodes_ready(Duration::from_secs(60));

    // A hostPort pod on the first pair pod's node, and a hostNetwork pod on
    // the second's.
    let (node_a, node_b) = (c.node(&node_of(a)).clone(), c.node(&node_of(b)).clone());
    c.apply(
        "hostport",
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: hostport, labels: {{app: hostport}}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
    - name: netexec
      image: localhost/e2e-test-images/agnhost:2.21
      args: ["netexec", "--http-port=8080"]
      ports: [{{containerPort: 8080, hostPort: 30880}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: hostnet, labels: {{app: hostnet}}}}
spec:
  nodeName: {other}
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: netexec
      image: localhost/e2e-test-images/agnhost:2.21
      args: ["netexec", "--http-port=8085", "--udp-port=8086"]
"#,
            node = node_a.name,
            other = node_b.name
        ),
    );
    c.wait_pods_ready("default", "app=hostport", 1, Duration::from_secs(60));
    c.wait_pods_ready("default", "app=hostnet", 1, Duration::from_secs(60));
    let hostport_url = format!("http://{}:30880/hostname", node_a.ip);
    // From the other node's host, and from a pod on it, to the hostPort.
    let from_host = node_b.sh("curl", &["-s", "-m", "5", &hostport_url]);
    assert_eq!(
        from_host, "hostport",
        "{} host → {hostport_url}",
        node_b.name
    );
    assert_eq!(
        curl(&c, &name_of(b), &hostport_url).as_deref(),
        Some("hostport"),
        "pod on {} → {hostport_url}",
        node_b.name
    );
    // A pod reaches the hostNetwork pod at its node's address, and the
    // hostNetwork pod (the node's stack) reaches a pod on another node.
    let hostnet_url = format!("http://{}:8085/hostname", node_b.ip);
    assert_eq!(
        curl(&c, &name_of(a), &hostnet_url).as_deref(),
        Some(node_b.name.as_str()),
        "pod on {} → hostNetwork pod {hostnet_url}",
        node_a.name
    );
    let to_pod = format!("http://{}:8080/hostname", pod_ip(a));
    let out = c.exec("default", "hostnet", &["curl", "-s", "-m", "5", &to_pod]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        name_of(a),
        "hostNetwork pod on {} → pod {to_pod}: {}",
        node_b.name,
        String::from_utf8_lossy(&out.stderr)
    );
    c.kubectl_ok(&["delete", "pod", "hostport", "hostnet", "--wait=true"]);

    // Drain the node of the pair's second pod: it moves to the third node
    // (anti-affinity), Ready and reachable; the drained node keeps no
    // pod's veth or address. Then uncordon.
    c.kubectl_ok(&[
        "drain",
        &node_b.name,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=120s",
    ]);
    let moved = c.wait_pods_ready("default", "app=pair", 2, Duration::from_secs(90));
    let nodes: Vec<String> = moved.iter().map(node_of).collect();
    assert!(
        !nodes.contains(&node_b.name),
        "no pair pod left on the drained {}: {nodes:?}",
        node_b.name
    );
    let new_b = moved
        .iter()
        .find(|p| name_of(p) != name_of(a))
        .expect("the moved pod");
    assert_eq!(
        curl(
            &c,
            &name_of(a),
            &format!("http://{}:8080/hostname", pod_ip(new_b))
        )
        .as_deref(),
        Some(name_of(new_b).as_str()),
        "the pair reaches its moved pod"
    );
    c.wait_for(
        "the drained node's pod veths and addresses released",
        Duration::from_secs(30),
        |_| (node_b.pod_veths().is_empty() && node_b.ipam_allocations().is_empty()).then_some(()),
    );
    c.kubectl_ok(&["uncordon", &node_b.name]);
    let node = c.kubectl_json(&["get", "node", &node_b.name]);
    assert!(
        node["spec"]["unschedulable"].is_null(),
        "{} schedulable again",
        node_b.name
    );

    // 100 pods across the nodes, then deleted: every address released, no
    // veth left.
    c.apply(
        "many",
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: many}
spec:
  replicas: 100
  selector: {matchLabels: {app: many}}
  template:
    metadata: {labels: {app: many}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
        - name: pause
          image: localhost/pause:3.2
"#,
    );
    let started = Instant::now();
    let many = c.wait_pods_ready("default", "app=many", 100, Duration::from_secs(300));
    let created = started.elapsed();
    let mut ips: Vec<_> = many.iter().map(pod_ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 100, "100 distinct addresses");
    let nodes_json = c.kubectl_json(&["get", "nodes"]);
    for p in &many {
        let node = nodes_json["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["metadata"]["name"] == p["spec"]["nodeName"])
            .expect("the pod's node");
        let cidr: weft_agent::cidr::Ipv4Cidr =
            node["spec"]["podCIDR"].as_str().unwrap().parse().unwrap();
        assert!(
            cidr.contains(pod_ip(p)),
            "{} has {} outside its node's {cidr}",
            name_of(p),
            pod_ip(p)
        );
    }
    let per_node: Vec<(String, usize)> = c
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                many.iter().filter(|p| node_of(p) == n.name).count(),
            )
        })
        .collect();
    println!(
        "100 pods Running and Ready in {:.1} s: {per_node:?}",
        created.as_secs_f64()
    );
    // Per node: a veth and an address for each of its pods (the pair's too).
    let all_pods = c.kubectl_json(&["get", "pods", "-A"]);
    let pods_on = |node: &str| {
        all_pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| node_of(p) == node && p["spec"]["hostNetwork"] != true)
            .count()
    };
    for n in &c.nodes {
        assert_eq!(
            n.pod_veths().len(),
            pods_on(&n.name),
            "{}'s pod veths",
            n.name
        );
        assert_eq!(
            n.ipam_allocations().len(),
            pods_on(&n.name),
            "{}'s addresses",
            n.name
        );
    }
    c.kubectl_ok(&["delete", "deployment", "many"]);
    let started = Instant::now();
    c.wait_for("the 100 pods gone", Duration::from_secs(300), |c| {
        c.pods("default", "app=many").is_empty().then_some(())
    });
    println!(
        "100 pods deleted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // What is left on each node: the pair, the cluster DNS.
    let all_pods = c.kubectl_json(&["get", "pods", "-A"]);
    for n in &c.nodes {
        let left = all_pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| node_of(p) == n.name && p["spec"]["hostNetwork"] != true)
            .count();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (veths, addrs) = (n.pod_veths(), n.ipam_allocations());
            if veths.len() == left && addrs.len() == left {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {left} pods, but veths {veths:?} and addresses {addrs:?} are left",
                n.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // containerd logged no failed DEL: a DEL that fails leaves the pod's
    // veth and address until the kubelet's sandbox GC retries it.
    for i in 0..c.nodes.len() {
        let log = c.lab.log(&format!("containerd-node-{}", i + 1));
        let failed: Vec<&str> = log
            .lines()
            // containerd's logfmt escapes the quotes.
            .filter(|l| l.replace('\\', "").contains("plugin type=\"weft\" failed"))
            .take(3)
            .collect();
        assert!(
            failed.is_empty(),
            "node-{}: weft's CNI failed: {failed:#?}",
            i + 1
        );
    }
}

/// flannel's DaemonSet as kube-flannel.yml has it, each pod standing for
/// flanneld on its node: hostNetwork, tolerating everything, linux only
/// (MIGRATION.md patches this affinity). Its container is `pause`; the
/// test follows the pods ([`FlannelFollower`]) and does flanneld's part for
/// each.
const FLANNEL_DS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: kube-flannel}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: kube-flannel-ds, namespace: kube-flannel, labels: {app: flannel}}
spec:
  selector: {matchLabels: {app: flannel}}
  template:
    metadata: {labels: {app: flannel}}
    spec:
      hostNetwork: true
      priorityClassName: system-node-critical
      terminationGracePeriodSeconds: 1
      tolerations: [{operator: Exists, effect: NoSchedule}]
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions:
                  - {key: kubernetes.io/os, operator: In, values: [linux]}
      containers:
        - name: kube-flannel
          image: localhost/pause:3.2
"#;

/// flannel's CNI plugin as the test's nodes have it: what flannel's
/// `flannel` plugin does on ADD and DEL — read /run/flannel/subnet.env and
/// delegate to `bridge` (cni0, gateway, hairpin, no masquerade, the node's
/// MTU) with `host-local` over the node's subnet (its store
/// /var/lib/cni/networks/cbr0) — in a few lines of sh.
const FLANNEL_CNI_SHIM: &str = r#"#!/bin/sh
. /run/flannel/subnet.env
# host-local takes the network, not flanneld's gateway address (the test's
# subnets are /24s).
SUBNET=$(echo "$FLANNEL_SUBNET" | sed 's#[.][0-9]*/#.0/#')
exec /opt/cni/bin/bridge <<END_OF_CONF
{"cniVersion":"0.3.1","name":"cbr0","type":"bridge","bridge":"cni0","isGateway":true,"isDefaultGateway":true,"ipMasq":false,"hairpinMode":true,"mtu":$FLANNEL_MTU,"ipam":{"type":"host-local","subnet":"$SUBNET","routes":[{"dst":"$FLANNEL_NETWORK"}]}}
END_OF_CONF
"#;

/// kube-flannel.yml's cni-conf.json, as its install-cni step writes it.
const FLANNEL_CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

/// Follows kube-flannel-ds's pods: when one runs on a node, that node gets
/// what flanneld and flannel's install-cni give it (flannel.1 — with the
/// VTEP MAC its Node stores, if any, as a restarted flanneld takes it —
/// subnet.env, the CNI plugin and conflist, then flanneld's annotations,
/// routes, neighbours and FDB entries); when the pod is gone, flanneld
/// stops and its kernel state stays, as when flannel's pod leaves a node.
struct FlannelFollower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    running: Arc<Mutex<Vec<String>>>,
}

impl FlannelFollower {
    fn start(c: &KubeCluster) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(Mutex::new(Vec::new()));
        let (flag, list) = (stop.clone(), running.clone());
        let nodes = c.nodes.clone();
        let (und, kubeconfig) = (c.underlay.clone(), c.kubeconfig.clone());
        let kubectl = move |args: &[&str]| -> Value {
            let out = und
                .command(weft_tests::k8s::bin("kubectl"))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(args)
                .args(["-o", "json"])
                .output()
                .expect("kubectl");
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
        };
        let kubeconfig = c.kubeconfig.clone();
        let thread = std::thread::spawn(move || {
            let mut daemons: BTreeMap<String, flanneld::Flanneld> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                let pods = kubectl(&["-n", "kube-flannel", "get", "pods", "-l", "app=flannel"]);
                let on: Vec<String> = pods["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter(|p| {
                        p["status"]["phase"] == "Running"
                            && p["metadata"]["deletionTimestamp"].is_null()
                    })
                    .map(node_of)
                    .collect();
                let gone: Vec<String> = daemons
                    .keys()
                    .filter(|n| !on.contains(n))
                    .cloned()
                    .collect();
                for n in gone {
                    daemons.remove(&n).unwrap().stop();
                }
                let new: Vec<String> = on
                    .iter()
                    .filter(|n| !daemons.contains_key(*n))
                    .cloned()
                    .collect();
                for name in &new {
                    let node = nodes.iter().find(|k| &k.name == name).unwrap();
                    let obj = kubectl(&["get", "node", name]);
                    let cidr = obj["spec"]["podCIDR"].as_str().unwrap_or_default();
                    let third: u8 = cidr
                        .split('.')
                        .nth(2)
                        .and_then(|o| o.parse().ok())
                        .expect("a pod CIDR");
                    let stored =
                        obj["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"]
                            .as_str()
                            .and_then(|d| serde_json::from_str::<Value>(d).ok())
                            .and_then(|d| d["VtepMAC"].as_str().map(str::to_string));
                    if !node
                        .ns
                        .try_sh("ip", &["link", "show", "flannel.1"])
                        .status
                        .success()
                    {
                        weft_tests::FlannelNode::with_mac(
                            &node.ns,
                            node.ip,
                            third,
                            1,
                            8472,
                            stored.as_deref(),
                        );
                    }
                    let env = format!(
                        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET=198.19.{third}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
                        weft_tests::CLUSTER_CIDR
                    );
                    for (path, text, mode) in [
                        ("/run/flannel/subnet.env", env.as_str(), "644"),
                        ("/opt/cni/bin/flannel", FLANNEL_CNI_SHIM, "755"),
                        (
                            "/etc/cni/net.d/10-flannel.conflist",
                            FLANNEL_CONFLIST,
                            "644",
                        ),
                    ] {
                        write_on(node, path, text, mode);
                    }
                    daemons.insert(
                        name.clone(),
                        flanneld::Flanneld::start(flanneld::Conf {
                            node_name: name.clone(),
                            ns: node.ns.clone(),
                            public_ip: node.ip,
                            vni: 1,
                            kubeconfig: kubeconfig.clone(),
                        }),
                    );
                }
                *list.lock().unwrap() = daemons.keys().cloned().collect();
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
            running,
        }
    }

    /// The nodes flanneld runs on now.
    fn running(&self) -> Vec<String> {
        self.running.lock().unwrap().clone()
    }
}

impl Drop for FlannelFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `text` to `path` on `node` (its mount namespace), atomically, with
/// `mode`.
fn write_on(node: &KubeNode, path: &str, text: &str, mode: &str) {
    use std::io::Write as _;
    let tmp = format!("{path}.tmp");
    let mut child = node
        .command("sh")
        .args([
            "-ec",
            &format!(
                "mkdir -p \"$(dirname {path})\"; cat > {tmp}; chmod {mode} {tmp}; mv {tmp} {path}"
            ),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sh on the node");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "writing {path} on {}",
        node.name
    );
}

/// One agnhost pod per node (required anti-affinity; so a restart replaces
/// them one at a time, with no surge).
const SPREAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: spread}
spec:
  replicas: 3
  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      terminationGracePeriodSeconds: 1
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - labelSelector: {matchLabels: {app: spread}}
              topologyKey: kubernetes.io/hostname
      containers:
        - name: netexec
          image: localhost/e2e-test-images/agnhost:2.21
          args: ["netexec", "--http-port=8080", "--udp-port=8081"]
"#;

/// Every pod of `from` curls every other pod of `to` by address (agnhost's
/// /hostname answers its name); the pairs that failed.
fn unreachable(c: &KubeCluster, from: &[Value], to: &[Value]) -> Vec<String> {
    let mut failed = Vec::new();
    for a in from {
        for b in to.iter().filter(|b| name_of(b) != name_of(a)) {
            let url = format!("http://{}:8080/hostname", pod_ip(b));
            if curl(c, &name_of(a), &url).as_deref() != Some(name_of(b).as_str()) {
                failed.push(format!(
                    "{} ({}, {}) → {} ({}, {})",
                    name_of(a),
                    node_of(a),
                    pod_ip(a),
                    name_of(b),
                    node_of(b),
                    pod_ip(b)
                ));
            }
        }
    }
    failed
}

#[test]
fn a_flannel_cluster_moves_to_weft_node_by_node() {
    if !privileged("a_flannel_cluster_moves_to_weft_node_by_node") {
        return;
    }
    let started = Instant::now();
    let mut spec = KubeSpec::from_env(3);
    spec.install_weft = false;
    let c = KubeCluster::up(Lab::new("kf"), spec, |m| eprintln!("==> cluster: {m}"));
    let say = |m: &str| {
        eprintln!(
            "==> migration ({:.0} s): {m}",
            started.elapsed().as_secs_f64()
        )
    };

    // A flannel cluster: flannel's DaemonSet, its pods' nodes made as
    // flanneld makes them; a workload on it.
    c.apply("kube-flannel", FLANNEL_DS);
    let flannel = FlannelFollower::start(&c);
    c.wait_nodes_ready(Duration::from_secs(90));
    c.apply("spread", SPREAD);
    let spread = c.wait_pods_ready("default", "app=spread", 3, Duration::from_secs(90));
    let failed = unreachable(&c, &spread, &spread);
    assert!(failed.is_empty(), "on flannel: {failed:?}");
    say("flannel on every node, one agnhost pod per node (on cni0)");

    // MIGRATION.md: keep flannel off the nodes labelled for weft; install
    // weft (flannel-compat on), only there.
    let patch = |name: &str| {
        std::fs::read_to_string(c.spec.manifests.join("flannel-migration").join(name)).unwrap()
    };
    c.kubectl_ok(&[
        "-n",
        "kube-flannel",
        "patch",
        "ds",
        "kube-flannel-ds",
        "-p",
        &patch("flannel-off-weft-nodes.yaml"),
    ]);
    let weft = std::fs::read_to_string(c.spec.manifests.join("weft.yaml")).unwrap();
    let shipped = weft.replace(
        "cluster-cidr = \"10.244.0.0/16\"",
        &format!("cluster-cidr = \"{}\"", weft_tests::CLUSTER_CIDR),
    );
    let edited = shipped
        .replace("# flannel-compat = true", "flannel-compat = true")
        .replace("# weft.dev/dataplane: weft", "weft.dev/dataplane: weft");
    assert!(
        edited.contains("\n    flannel-compat = true")
            && edited.contains("\n        weft.dev/dataplane: weft"),
        "deploy/weft.yaml has the flannel-compat and node selector lines"
    );
    c.kubectl_ok(&[
        "apply",
        "-f",
        c.spec.manifests.join("rbac.yaml").to_str().unwrap(),
    ]);
    c.apply("weft", &edited);
    let agents = |c: &KubeCluster| c.pods("kube-system", "app=weft");
    // MIGRATION.md's step 3: the label, then weft's agent Ready there and
    // flanneld gone.
    let to_weft = |name: &str| {
        c.kubectl_ok(&["label", "node", name, "weft.dev/dataplane=weft"]);
        c.wait_for(
            &format!("weft's agent Ready on {name}, flanneld gone"),
            Duration::from_secs(90),
            |c| {
                (agents(c)
                    .iter()
                    .any(|p| node_of(p) == name && weft_tests::k8s::pod_ready(p))
                    && !flannel.running().iter().any(|n| n == name))
                .then_some(())
            },
        );
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(agents(&c).is_empty(), "no node is labelled yet");

    for (k, node) in c.nodes.iter().enumerate() {
        let name = node.name.clone();
        let here = |p: &Value| node_of(p) == name;
        let pods = c.pods("default", "app=spread");
        let local = pods.iter().find(|p| here(p)).unwrap().clone();
        let others: Vec<Value> = pods.iter().filter(|p| !here(p)).cloned().collect();
        // Streams between the other nodes' pods, and to and from the pod on
        // this node (flannel wired it; it must keep running).
        let ns = |p: &Value| c.pod_netns("default", &name_of(p));
        let (a, b) = (&others[0], &others[1]);
        let port = 9100 + 10 * k as u16;
        let every = Duration::from_millis(1);
        let udp = UdpCount::start(ns(a), ns(b), pod_ip(b), port, every);
        let tcp = TcpStream::start(ns(b), ns(a), pod_ip(a), port + 1, 10 << 20);
        let out = UdpCount::start(ns(&local), ns(a), pod_ip(a), port + 2, every);
        let back = UdpCount::start(ns(b), ns(&local), pod_ip(&local), port + 3, every);
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        to_weft(&name);
        let took = t.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let (udp, tcp, out, back) = (udp.finish(), tcp.finish(), out.finish(), back.finish());
        say(&format!(
            "{name} moved to weft in {:.1} s (label → agent Ready); other nodes' pods: UDP {}/{}, TCP {:?} bytes; {name}'s flannel pod: out {}/{}, in {}/{}",
            took.as_secs_f64(),
            udp.received,
            udp.sent,
            tcp,
            out.received,
            out.sent,
            back.received,
            back.sent
        ));
        udp.assert_lossless(
            1000,
            &format!("between the other nodes' pods while {name} moved"),
        );
        tcp.unwrap_or_else(|e| panic!("TCP between the other nodes' pods while {name} moved: {e}"));
        out.assert_lossless(1000, &format!("from {name}'s flannel pod while it moved"));
        back.assert_lossless(1000, &format!("to {name}'s flannel pod while it moved"));
        // flannel's pod kept running, untouched, its address reserved.
        let kept = c
            .pods("default", "app=spread")
            .into_iter()
            .find(|p| name_of(p) == name_of(&local))
            .expect("flannel's pod still there");
        assert_eq!(pod_ip(&kept), pod_ip(&local));
        assert_eq!(kept["status"]["containerStatuses"][0]["restartCount"], 0);
        assert!(
            node.ipam_allocations().contains(&pod_ip(&local)),
            "flannel's pod's address is reserved in weft's IPAM: {:?}",
            node.ipam_allocations()
        );
        let conf_d = node.sh("ls", &["/etc/cni/net.d"]);
        assert!(
            conf_d.contains("10-flannel.conflist.weft-disabled")
                && conf_d.contains("10-weft.conflist")
                && !conf_d.contains("10-flannel.conflist\n"),
            "{name}'s /etc/cni/net.d: {conf_d}"
        );
        assert!(
            !node
                .ns
                .try_sh("ip", &["link", "show", "flannel.1"])
                .status
                .success()
        );
        // A new pod there is weft's and reaches every pod, both ways.
        let fresh = format!("fresh-{k}");
        c.apply(
            &fresh,
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {fresh}, labels: {{app: fresh}}}}\nspec:\n  nodeName: {name}\n  terminationGracePeriodSeconds: 1\n  containers:\n    - name: netexec\n      image: localhost/e2e-test-images/agnhost:2.21\n      args: [\"netexec\", \"--http-port=8080\"]\n"
            ),
        );
        let fresh_pods = c.wait_pods_ready("default", "app=fresh", k + 1, Duration::from_secs(60));
        let mine: Vec<Value> = fresh_pods
            .iter()
            .filter(|p| name_of(p) == fresh)
            .cloned()
            .collect();
        assert_ne!(pod_ip(&mine[0]), pod_ip(&local));
        assert!(!node.pod_veths().is_empty(), "the new pod has a weft veth");
        let all: Vec<Value> = c
            .pods("default", "app=spread")
            .into_iter()
            .chain(fresh_pods.clone())
            .collect();
        let mut failed = unreachable(&c, &mine, &all);
        failed.extend(unreachable(&c, &all, &mine));
        assert!(failed.is_empty(), "after {name} moved: {failed:?}");
    }

    // MIGRATION.md's roll-back, on the last node: weft's pod there drained,
    // weft gone (the Job's `weft down`), flannel's conflist back, flannel's
    // pod back — flanneld takes the VTEP MAC its Node stores.
    let node = c.nodes.last().unwrap();
    let name = node.name.clone();
    let here = |p: &Value| node_of(p) == name;
    let k = c.nodes.len() - 1;
    c.kubectl_ok(&["delete", "pod", &format!("fresh-{k}"), "--wait=true"]);
    let pods = c.pods("default", "app=spread");
    let local = pods.iter().find(|p| here(p)).unwrap().clone();
    let a = pods.iter().find(|p| !here(p)).unwrap().clone();
    let ns = |p: &Value| c.pod_netns("default", &name_of(p));
    let into = UdpCount::start(
        ns(&a),
        ns(&local),
        pod_ip(&local),
        9200,
        Duration::from_millis(1),
    );
    let t = Instant::now();
    c.kubectl_ok(&[
        "label",
        "node",
        &name,
        "weft.dev/dataplane=none",
        "--overwrite",
    ]);
    c.wait_for(
        &format!("weft's pod gone from {name}"),
        Duration::from_secs(60),
        |c| (!agents(c).iter().any(here)).then_some(()),
    );
    c.apply("weft-down", &patch("weft-down.yaml").replace("NODE", &name));
    c.kubectl_ok(&[
        "-n",
        "kube-system",
        "wait",
        "--for=condition=complete",
        &format!("job/weft-down-{name}"),
        "--timeout=90s",
    ]);
    node.sh(
        "mv",
        &[
            "/etc/cni/net.d/10-flannel.conflist.weft-disabled",
            "/etc/cni/net.d/10-flannel.conflist",
        ],
    );
    node.sh("rm", &["/etc/cni/net.d/10-weft.conflist"]);
    c.kubectl_ok(&["label", "node", &name, "weft.dev/dataplane-"]);
    c.wait_for(
        &format!("flanneld back on {name}"),
        Duration::from_secs(60),
        |_| flannel.running().contains(&name).then_some(()),
    );
    let back = t.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let into = into.finish();
    let stored = c.kubectl_json(&["get", "node", &name])["metadata"]["annotations"]
        ["flannel.alpha.coreos.com/backend-data"]
        .clone();
    let mac = node.sh("cat", &["/sys/class/net/flannel.1/address"]);
    say(&format!(
        "{name} rolled back to flannel in {:.1} s (label → flanneld running); into its flannel pod meanwhile {}/{} datagrams; flannel.1 {} (Node: {stored})",
        back.as_secs_f64(),
        into.received,
        into.sent,
        mac.trim()
    ));
    assert!(
        stored.as_str().unwrap_or_default().contains(mac.trim()),
        "flannel.1 has the MAC its Node stores: {} vs {stored}",
        mac.trim()
    );
    assert!(
        !node.run("ip", &["link", "show", "weft0"]).status.success(),
        "the Job's weft down removed weft0"
    );
    let all: Vec<Value> = c
        .pods("default", "app=spread")
        .into_iter()
        .chain(c.pods("default", "app=fresh"))
        .collect();
    let failed = unreachable(&c, &all, &all);
    assert!(failed.is_empty(), "after {name} rolled back: {failed:?}");
    // And forward again.
    to_weft(&name);

    // No flannel node left: flannel goes; weft goes everywhere, without the
    // affinity and without compat; the workload is re-created on weft.
    c.kubectl_ok(&[
        "-n",
        "kube-flannel",
        "delete",
        "daemonset",
        "kube-flannel-ds",
        "--wait=true",
    ]);
    // deploy/weft.yaml as shipped (with this cluster's CIDR): everywhere,
    // compat off; the changed selector rolls every agent.
    c.apply("weft", &shipped);
    c.kubectl_ok(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/weft",
        "--timeout=180s",
    ]);
    c.kubectl_ok(&["rollout", "restart", "deployment/spread"]);
    c.kubectl_ok(&["rollout", "status", "deployment/spread", "--timeout=180s"]);
    let spread = c.wait_pods_ready("default", "app=spread", 3, Duration::from_secs(90));
    let all: Vec<Value> = spread
        .iter()
        .cloned()
        .chain(c.pods("default", "app=fresh"))
        .collect();
    let failed = unreachable(&c, &all, &all);
    assert!(failed.is_empty(), "after the migration: {failed:?}");
    for n in &c.nodes {
        let on_cni0 = n.sh("ip", &["-o", "link", "show", "master", "cni0"]);
        assert!(
            on_cni0.trim().is_empty(),
            "{}: pods left on cni0: {on_cni0}",
            n.name
        );
    }
    say(&format!(
        "done: every pod on weft, flannel's DaemonSet gone, compat off; {:.0} s in all",
        started.elapsed().as_secs_f64()
    ));
}

/// An IPv6 Service in front of [`PAIR`] (1.20's alpha field names).
const PAIR6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pair6}
spec:
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  selector: {app: pair}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

#[test]
fn a_dual_stack_cluster_under_real_kubelets() {
    if !privileged("a_dual_stack_cluster_under_real_kubelets") {
        return;
    }
    let started = Instant::now();
    let mut spec = KubeSpec::from_env(2);
    spec.dual_stack = true;
    let c = KubeCluster::up(Lab::new("kd"), spec, |m| eprintln!("==> cluster: {m}"));
    eprintln!(
        "==> cluster: up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // The controller manager gave each Node a pod CIDR of each family.
    for n in c.kubectl_json(&["get", "nodes"])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let cidrs = n["spec"]["podCIDRs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            cidrs.len() == 2 && cidrs[1].as_str().is_some_and(|c| c.starts_with("2001:2:")),
            "{}: podCIDRs {cidrs:?}",
            name_of(&n)
        );
    }
    // Pods get an address of each family from weft's plugin, which the
    // kubelet reports; the kubelet's probes (node → pod) make them Ready.
    c.apply("pair", PAIR);
    let pair = c.wait_pods_ready("default", "app=pair", 2, Duration::from_secs(90));
    let (a, b) = (&pair[0], &pair[1]);
    assert_ne!(node_of(a), node_of(b), "the pair is on two nodes");
    let ip6 = |p: &Value| {
        let ips = p["status"]["podIPs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(ips.len(), 2, "{}: podIPs {ips:?}", name_of(p));
        ips[1]["ip"]
            .as_str()
            .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
            .unwrap_or_else(|| panic!("{}: no IPv6 in podIPs {ips:?}", name_of(p)))
    };
    let (a6, b6) = (ip6(a), ip6(b));
    // Pod to pod across nodes over IPv6, and IPv4 beside it.
    for (what, url) in [
        ("IPv6", format!("http://[{b6}]:8080/hostname")),
        ("IPv4", format!("http://{}:8080/hostname", pod_ip(b))),
    ] {
        assert_eq!(
            curl(&c, &name_of(a), &url).as_deref(),
            Some(name_of(b).as_str()),
            "{what}: {} → {}",
            name_of(a),
            url
        );
    }
    assert_eq!(
        curl(&c, &name_of(b), &format!("http://[{a6}]:8080/hostname")).as_deref(),
        Some(name_of(a).as_str()),
        "IPv6 back"
    );
    // An IPv6 Service through the nodes' kube-proxy (ip6tables): both
    // backends answer a client pod, on its node and across.
    c.apply("pair6", PAIR6);
    let svc = c.kubectl_json(&["get", "service", "pair6"]);
    let vip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(vip.starts_with("2001:2:200::"), "IPv6 ClusterIP: {vip:?}");
    let seen = c.wait_for(
        "both pods answering through the IPv6 Service",
        Duration::from_secs(60),
        |c| {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                if let Some(h) = curl(c, &name_of(a), &format!("http://[{vip}]/hostname")) {
                    seen.insert(h);
                }
            }
            (seen.len() == 2).then_some(seen)
        },
    );
    println!("IPv6 Service {vip} answered by {seen:?}");
    // weft counted the IPv6 pods' traffic as IPv6's (`weft status` in each
    // agent's pod).
    for agent in c.pods("kube-system", "app=weft") {
        let out = c.exec(
            "kube-system",
            &name_of(&agent),
            &["/usr/local/bin/weft", "status", "--json"],
        );
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "weft status in {}: {e}: {}",
                name_of(&agent),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let six = status["counters"]["forwards_ipv6"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let encap6 = six
            .iter()
            .find(|p| p[0] == "encap")
            .and_then(|p| p[1].as_u64())
            .unwrap_or(0);
        assert!(
            encap6 > 0,
            "{}: no IPv6 encap: {}",
            node_of(&agent),
            status["counters"]
        );
    }
}
