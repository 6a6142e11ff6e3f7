//! The `kube` node registry against a real kube-apiserver and etcd.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use weft_tests::{
    Cluster, ClusterSpec, Lab, Netns,
    kube::{AGENT_TOKEN, KubeApi},
    ping, privileged, wait_for,
};

#[path = "support/api.rs"]
mod api;
use api::{annotate, bind_agent_rbac, create, delete, have_apiserver, label, node, with_client};

/// A counter from the agent's /metrics in `ns` (the default address).
fn metric(ns: &Netns, name: &str) -> u64 {
    let text = ns.sh("curl", &["-s", "http://127.0.0.1:9807/metrics"]);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}")) as u64
}

fn within_a_second(what: &str, f: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    wait_for(what, Duration::from_secs(1), || f().then_some(()));
    t.elapsed()
}

#[test]
fn nodes_from_the_kubernetes_api() {
    if !privileged("nodes_from_the_kubernetes_api") {
        return;
    }
    if !have_apiserver("nodes_from_the_kubernetes_api") {
        return;
    }
    let mut lab = Lab::new("kube");
    let mut c = Cluster::new(&mut lab, ClusterSpec::pair());
    let und = c.underlay.ns.clone();
    let api = KubeApi::start(&mut lab, &und, "br0");

    bind_agent_rbac(&und, &api);
    for (i, n) in c.nodes.iter().enumerate() {
        let cidr = format!("198.19.{}.0/24", i + 1);
        create(&und, &api, node(&n.name, Some(&cidr), &[]));
    }
    let kubeconfig = api.kubeconfig("agent", AGENT_TOKEN);
    c.spec.agent_args = vec![
        "--registry".into(),
        "kube".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    c.launch(&mut lab);
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    assert!(
        ping(&a.ns, b.ip, 3),
        "pods reach each other with nodes from the API"
    );

    // Each agent published its underlay IP and VTEP MAC on its own Node.
    let annotations = with_client(&und, &api, async |client| {
        let nodes = Api::<Node>::all(client)
            .list(&Default::default())
            .await
            .unwrap();
        nodes
            .items
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap(),
                    n.metadata.annotations.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    });
    for (name, ann) in &annotations {
        let i: u8 = name.trim_start_matches("node-").parse().unwrap();
        assert_eq!(
            ann.get("weft.dev/underlay-ip").map(String::as_str),
            Some(format!("198.18.0.{i}").as_str()),
            "{name}'s annotation"
        );
        assert!(
            ann.contains_key("weft.dev/vtep-mac"),
            "{name} has a VTEP MAC annotation"
        );
    }

    // Add, re-CIDR (delete + create, as podCIDR is immutable), delete.
    let peer = [
        ("weft.dev/underlay-ip", "198.18.0.9"),
        ("weft.dev/vtep-mac", "0e:77:c6:12:00:09"),
    ];
    create(&und, &api, node("node-9", Some("198.19.9.0/24"), &peer));
    let t = within_a_second("node-9 added", || {
        c.remote_nodes(0)
            .contains(&"198.19.9.0/24@198.18.0.9".to_string())
    });
    println!("a Node created through the API reached the map in {t:?}");
    delete(&und, &api, "node-9");
    create(&und, &api, node("node-9", Some("198.19.10.0/24"), &peer));
    within_a_second("node-9 re-CIDR'd", || {
        let r = c.remote_nodes(0);
        r.contains(&"198.19.10.0/24@198.18.0.9".to_string())
            && !r.contains(&"198.19.9.0/24@198.18.0.9".to_string())
    });
    // Bad objects: skipped with one line each naming the object.
    create(
        &und,
        &api,
        node("no-cidr", None, &[("weft.dev/underlay-ip", "198.18.0.20")]),
    );
    create(
        &und,
        &api,
        node(
            "bad-ip",
            Some("198.19.21.0/24"),
            &[("weft.dev/underlay-ip", "not-an-ip")],
        ),
    );
    create(
        &und,
        &api,
        node(
            "overlap",
            Some("198.19.2.0/25"),
            &[("weft.dev/underlay-ip", "198.18.0.22")],
        ),
    );
    wait_for("problems logged", Duration::from_secs(5), || {
        let log = lab.log("agent-1");
        (log.contains("Node no-cidr: no spec.podCIDR")
            && log.contains("Node bad-ip: annotation weft.dev/underlay-ip=`not-an-ip`")
            && log.contains("Node overlap: spec.podCIDR 198.19.2.0/25 overlaps Node node-2"))
        .then_some(())
    });
    assert!(
        ping(&a.ns, b.ip, 2),
        "bad objects leave the dataplane intact"
    );
    delete(&und, &api, "node-9");
    within_a_second("node-9 deleted", || {
        !c.remote_nodes(0).iter().any(|e| e.contains("198.18.0.9"))
    });

    // Updates that change nothing weft reads (labels here; kubelet status
    // heartbeats alike) are not applied again: with thousands of Nodes they
    // come many times a second.
    let reconciles = || metric(&c.nodes[0].ns, "weft_reconciles_total");
    let before = reconciles();
    for i in 0..5 {
        label(&und, &api, "node-2", &format!("v{i}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reconciles(), before, "label updates applied nothing");
    // ...while one that does (a new underlay address) still is.
    annotate(&und, &api, "overlap", "weft.dev/underlay-ip", "198.18.0.23");
    wait_for(
        "the changed annotation applied",
        Duration::from_secs(5),
        || (reconciles() > before).then_some(()),
    );

    // The API server goes away: forwarding goes on, no hot loop; it comes
    // back: the agent converges (a node created meanwhile shows up).
    api.stop_apiserver(&mut lab);
    let before = lab.log("agent-1").lines().count();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ping(&a.ns, b.ip, 3),
        "forwarding on the last known state while the API is down"
    );
    let noise = lab.log("agent-1").lines().count() - before;
    assert!(
        noise < 30,
        "backoff, not a hot loop: {noise} log lines in 3 s"
    );
    api.start_apiserver(&mut lab);
    create(
        &und,
        &api,
        node(
            "node-11",
            Some("198.19.11.0/24"),
            &[("weft.dev/underlay-ip", "198.18.0.11")],
        ),
    );
    wait_for(
        "node-11 after the API server restart",
        Duration::from_secs(30),
        || {
            c.remote_nodes(0)
                .contains(&"198.19.11.0/24@198.18.0.11".to_string())
                .then_some(())
        },
    );
    assert!(ping(&a.ns, b.ip, 2));
}

/// A cluster of `spec` on the kube registry of a fresh API server (`opts`)
/// on its underlay: a Node per node with its pod CIDRs (as the controller
/// manager leaves them), the agents started on a kubeconfig to the server's
/// IPv4 address, or with `ipv6` its IPv6 one.
fn kube_cluster(
    lab: &mut Lab,
    spec: ClusterSpec,
    opts: weft_tests::kube::ApiOptions,
) -> (Cluster, Netns, KubeApi) {
    let mut c = Cluster::new(lab, spec);
    let und = c.underlay.ns.clone();
    let ipv6 = opts.ipv6;
    let api = KubeApi::start_with(lab, &und, "br0", opts);
    bind_agent_rbac(&und, &api);
    for n in &c.nodes {
        let cidrs: Vec<String> = (!c.spec.ipv6_only)
            .then(|| n.pod_cidr.clone())
            .into_iter()
            .chain(n.pod_cidr6.clone())
            .collect();
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": n.name},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
        }))
        .unwrap();
        create(&und, &api, node);
    }
    let kubeconfig = if ipv6 {
        api.kubeconfig6("agent", AGENT_TOKEN)
    } else {
        api.kubeconfig("agent", AGENT_TOKEN)
    };
    c.spec.agent_args = vec![
        "--registry".into(),
        "kube".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    c.launch(lab);
    (c, und, api)
}

/// Node `name`'s annotations.
fn annotations_of(
    und: &Netns,
    api: &KubeApi,
    name: &str,
) -> std::collections::BTreeMap<String, String> {
    let name = name.to_string();
    with_client(und, api, async move |client| {
        Api::<Node>::all(client)
            .get(&name)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
    })
}

/// Waits until node-1's `weft status` has node-2's IPv6 pod CIDR over the
/// IPv6 underlay, to its address, verified; and (`rows`) that many rows.
fn wait_for_peer_over_ipv6(c: &Cluster, rows: Option<usize>) {
    let peer = &c.nodes[1];
    wait_for(
        "node-1 to carry node-2's IPv6 pods over the IPv6 underlay",
        Duration::from_secs(10),
        || {
            let all = c.status(0)["nodes"].as_array().unwrap().clone();
            (rows.is_none_or(|n| all.len() == n)
                && all.iter().any(|r| {
                    r["pod_cidr"] == peer.pod_cidr6.as_deref().unwrap()
                        && r["underlay"] == "ipv6"
                        && r["underlay_ip"] == peer.underlay_ip6.unwrap().to_string()
                        && r["state"] == "remote"
                }))
            .then_some(())
        },
    );
}

#[test]
fn ipv6_underlay_addresses_through_the_kubernetes_api() {
    if !privileged("ipv6_underlay_addresses_through_the_kubernetes_api") {
        return;
    }
    if !have_apiserver("ipv6_underlay_addresses_through_the_kubernetes_api") {
        return;
    }
    let mut lab = Lab::new("kube6");
    let (c, und, api) = kube_cluster(
        &mut lab,
        ClusterSpec::pair().underlay6(),
        weft_tests::kube::ApiOptions {
            dual_stack: true,
            ..Default::default()
        },
    );
    // Each agent published its IPv6 underlay address; the other took it:
    // the peer's IPv6 pod CIDR goes over the IPv6 underlay, and VXLAN over
    // IPv6 is accepted from it.
    for (i, n) in c.nodes.iter().enumerate() {
        let ann = annotations_of(&und, &api, &n.name);
        assert_eq!(
            ann.get("weft.dev/underlay-ip6").map(String::as_str),
            Some(n.underlay_ip6.unwrap().to_string().as_str()),
            "node {i}'s annotations: {ann:?}"
        );
    }
    wait_for_peer_over_ipv6(&c, None);
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    assert!(ping(&a.ns, b.ip6.unwrap(), 3), "IPv6 pods reach each other");
    assert!(ping(&a.ns, b.ip, 3), "IPv4 pods too");
}

#[test]
fn an_ipv6_only_cluster_through_the_kubernetes_api() {
    if !privileged("an_ipv6_only_cluster_through_the_kubernetes_api") {
        return;
    }
    if !have_apiserver("an_ipv6_only_cluster_through_the_kubernetes_api") {
        return;
    }
    let mut lab = Lab::new("kubev6o");
    // The nodes have no IPv4 address: they reach the API over IPv6. Their
    // Nodes have one IPv6 pod CIDR, as an IPv6-only cluster's controller
    // manager leaves them.
    let (c, und, api) = kube_cluster(
        &mut lab,
        ClusterSpec::pair().ipv6_only(),
        weft_tests::kube::ApiOptions {
            ipv6: true,
            ..Default::default()
        },
    );
    // Each agent published its IPv6 underlay address and no IPv4 one; the
    // other node is known by it alone.
    for (i, n) in c.nodes.iter().enumerate() {
        let ann = annotations_of(&und, &api, &n.name);
        let ip6 = n.underlay_ip6.unwrap();
        assert_eq!(
            (
                ann.get("weft.dev/underlay-ip6").map(String::as_str),
                ann.get("weft.dev/underlay-ip"),
                ann.get("weft.dev/vtep-mac").cloned(),
            ),
            (
                Some(ip6.to_string().as_str()),
                None,
                Some(weft_agent::host::netdev::mac_to_string(
                    &weft_agent::host::netdev::vtep_mac_for6(ip6)
                ))
            ),
            "node {i}'s annotations: {ann:?}"
        );
    }
    wait_for_peer_over_ipv6(&c, Some(2));
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    assert!(a.ip.is_unspecified() && b.ip.is_unspecified());
    assert!(ping(&a.ns, b.ip6.unwrap(), 3), "IPv6 pods reach each other");
    assert!(ping(&b.ns, a.ip6.unwrap(), 3), "both ways");
}
