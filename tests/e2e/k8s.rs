//! weft in a real Kubernetes cluster ([`weft_tests::k8s`]): real kubelets
//! start weft's DaemonSet and call `weft-cni` through containerd's CRI, the
//! controller manager hands out the pod CIDRs, kube-proxy programs the
//! Services, and Kubernetes' own e2e.test checks the network.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::{
    Lab,
    k8s::{CORE, KubeCluster, KubeSpec, SKIP, name_of, pod_ip},
    privileged,
    traffic::{TcpStream, UdpCount},
};

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
