//! The agent's life cycle: restarts under load, live registry changes, bad
//! input, config file, metrics and readiness, clean removal.

use std::{
    io::{Read, Write},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use weft_tests::{
    Cluster, ClusterSpec, ForeignNode, InNetns, Lab, Netns, UnderlayKind, ping, privileged,
    traffic::UdpCount, wait_for, weft_bin,
};

/// GET `path` from the agent's HTTP port inside `ns`: (status code, body).
fn http_get(ns: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
    let _inside = InNetns::enter(ns);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    ))
}

fn wait_log(lab: &Lab, name: &str, needle: &str) {
    wait_for(
        &format!("`{needle}` in {name}'s log"),
        Duration::from_secs(20),
        || lab.log(name).contains(needle).then_some(()),
    );
}

#[test]
fn restarting_the_agent_twice_under_load_loses_nothing() {
    if !privileged("restarting_the_agent_twice_under_load_loses_nothing") {
        return;
    }
    // Pods with weft's netlink filters (the default) and with TCX links.
    restart_twice_under_load("rst", None);
    if weft_agent::dataplane::has_tcx() {
        restart_twice_under_load("rstx", Some("tcx"));
    }
}

fn restart_twice_under_load(tag: &str, tc_attach: Option<&'static str>) {
    let mut lab = Lab::new(tag);
    let c = Cluster::start(
        &mut lab,
        ClusterSpec {
            tc_attach,
            ..ClusterSpec::pair()
        },
    );
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    let host_if = weft_agent::endpoint::host_ifname(&a.name, "eth0");

    // A counted UDP stream a → b, one datagram per millisecond.
    let udp = UdpCount::start(
        a.ns.path(),
        b.ns.path(),
        b.ip,
        9100,
        Duration::from_millis(1),
    );
    // And a TCP bulk transfer over the same path.
    let mut server = b.ns.command("iperf3");
    server.args(["-s", "-1", "--forceflush", "-B", &b.ip.to_string()]);
    lab.spawn("iperf-server", server);
    wait_log(&lab, "iperf-server", "listening");
    let (ans, bip) = (a.ns.clone(), b.ip);
    let client = std::thread::spawn(move || {
        ans.command("iperf3")
            .args(["-c", &bip.to_string(), "-t", "9", "-b", "500M", "-J"])
            .output()
            .unwrap()
    });

    for round in 1..=2 {
        std::thread::sleep(Duration::from_millis(1500));
        lab.stop(&Cluster::agent_name(0));
        if round == 1 {
            // As if the pod had been attached by a version without the
            // egress program: its pin removed (which detaches a TCX link),
            // or weft's egress filter deleted.
            let _ = std::fs::remove_file(c.nodes[0].bpffs.join("pods_to").join(&host_if));
            let _ = c.nodes[0].ns.try_sh(
                "tc",
                &["filter", "del", "dev", &host_if, "egress", "pref", "30565"],
            );
            assert_eq!(c.pod_programs(0, &host_if), (true, false));
        }
        std::thread::sleep(Duration::from_millis(300));
        c.start_agent(&mut lab, 0);
        wait_log(&lab, &Cluster::agent_name(0), "ready run_dir=");
        assert!(
            lab.log(&Cluster::agent_name(0)).contains("pods=1"),
            "round {round}: the pod links were re-pointed: {}",
            lab.log(&Cluster::agent_name(0))
        );
        assert_eq!(
            c.pod_programs(0, &host_if),
            (true, true),
            "round {round}: the pod's egress program is there"
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    let report = udp.finish();
    println!(
        "UDP across two agent restarts ({}): sent {}, received {}",
        tc_attach.unwrap_or("auto"),
        report.sent,
        report.received
    );
    report.assert_lossless(3000, "across two agent restarts");
    let out = client.join().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        v.get("error").is_none(),
        "TCP across restarts: {}",
        v["error"]
    );
    assert!(
        v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0) > 0,
        "TCP moved data"
    );
}

#[test]
fn restarting_in_the_other_decap_mode_swaps_xdp_and_tc() {
    if !privileged("restarting_in_the_other_decap_mode_swaps_xdp_and_tc") {
        return;
    }
    let mut lab = Lab::new("swp");
    // NIC-like: both modes deliver correctly on it.
    let mut c = Cluster::start(
        &mut lab,
        ClusterSpec {
            underlay: UnderlayKind::NicLike,
            agent_args: vec!["--decap".into(), "tc".into()],
            ..ClusterSpec::pair()
        },
    );
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    let n = c.nodes[1].clone();
    let attached = |n: &weft_tests::NodeInfo| {
        (
            n.bpffs.join("link_xdp").exists(),
            n.ns.ip(&["link", "show", "und0"]).contains("prog/xdp"),
            n.bpffs.join("link_und").exists(),
        )
    };
    assert_eq!(attached(&n), (false, false, true), "tc: TC link only");
    assert!(ping(&a.ns, b.ip, 2));
    for (mode, want) in [("xdp", (true, true, false)), ("tc", (false, false, true))] {
        lab.stop(&Cluster::agent_name(1));
        c.spec.agent_args = vec!["--decap".into(), mode.into()];
        c.start_agent(&mut lab, 1);
        wait_log(&lab, &Cluster::agent_name(1), "ready run_dir=");
        assert_eq!(
            attached(&n),
            want,
            "after a restart with --decap {mode}: (XDP pin, XDP on und0, TC pin)"
        );
        let name = if mode == "xdp" {
            "decap_redirect"
        } else {
            "decap_peer"
        };
        let before = c.counter(1, name);
        assert!(
            ping(&a.ns, b.ip, 2),
            "pods connected after switching to {mode}"
        );
        assert!(c.counter(1, name) > before, "{mode}: delivered as {name}");
    }
}

#[test]
fn registry_edits_apply_live_and_bad_input_never_wipes_the_dataplane() {
    if !privileged("registry_edits_apply_live_and_bad_input_never_wipes_the_dataplane") {
        return;
    }
    let mut lab = Lab::new("reg");
    let mut c = Cluster::start(&mut lab, ClusterSpec::pair());
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    let has = |c: &Cluster, entry: &str| c.remote_nodes(0).iter().any(|e| e == entry);

    // A node joins: in node-1's maps within a second.
    c.foreign.push(ForeignNode {
        name: "node-9".into(),
        underlay_ip: Ipv4Addr::new(198, 18, 0, 9),
        pod_cidr: "198.19.9.0/24".into(),
        vtep_mac: "0e:77:c6:12:00:09".into(),
        pod_cidr6: None,
        underlay6: None,
    });
    c.write_nodes_file();
    let t = Instant::now();
    wait_for("node-9 in node-1's maps", Duration::from_secs(1), || {
        has(&c, "198.19.9.0/24@198.18.0.9").then_some(())
    });
    println!(
        "a node added to the file reached the map in {:?}",
        t.elapsed()
    );
    // Re-CIDR'd: the old entry goes, the new one comes.
    c.foreign[0].pod_cidr = "198.19.10.0/24".into();
    c.write_nodes_file();
    wait_for("node-9 re-CIDR'd", Duration::from_secs(1), || {
        (has(&c, "198.19.10.0/24@198.18.0.9") && !has(&c, "198.19.9.0/24@198.18.0.9")).then_some(())
    });

    // Unparsable TOML: one clear error, the maps stay, traffic flows.
    let good = std::fs::read_to_string(&c.nodes_file).unwrap();
    std::fs::write(&c.nodes_file, "[[node]\nname = ").unwrap();
    wait_log(&lab, "agent-1", "is not valid TOML: line 1: ");
    assert!(
        has(&c, "198.19.10.0/24@198.18.0.9") && has(&c, "198.19.2.0/24@198.18.0.2"),
        "maps kept: {:?}",
        c.remote_nodes(0)
    );
    assert!(
        ping(&a.ns, b.ip, 2),
        "traffic still flows on the last good state"
    );

    // One bad entry (overlapping CIDR): it alone is skipped and named.
    std::fs::write(&c.nodes_file, format!("{good}\n[[node]]\nname = \"bad\"\nunderlay_ip = \"198.18.0.50\"\npod_cidr = \"198.19.2.128/25\"\n")).unwrap();
    wait_log(
        &lab,
        "agent-1",
        "node `bad`: pod_cidr 198.19.2.128/25 overlaps node `node-2`",
    );
    assert!(ping(&a.ns, b.ip, 2), "the rest of the dataplane is intact");
    assert!(
        !c.remote_nodes(0).iter().any(|e| e.contains("198.18.0.50")),
        "the bad node is not in the maps"
    );

    // This node missing from the registry: logged, nothing flushed.
    std::fs::write(
        &c.nodes_file,
        good.replace("name = \"node-1\"", "name = \"renamed\""),
    )
    .unwrap();
    wait_log(&lab, "agent-1", "this node is missing from the registry");
    assert!(ping(&a.ns, b.ip, 2), "traffic still flows");

    // A node leaves: removed (a full list drops what it does not contain).
    c.foreign.clear();
    c.write_nodes_file();
    wait_for("node-9 gone", Duration::from_secs(1), || {
        (!has(&c, "198.19.10.0/24@198.18.0.9")).then_some(())
    });
    assert!(ping(&a.ns, b.ip, 2));
}

#[test]
fn config_file_metrics_readiness_and_down() {
    if !privileged("config_file_metrics_readiness_and_down") {
        return;
    }
    let help = std::process::Command::new(weft_bin())
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--config",
        "--node-name",
        "--iface",
        "--iface-regex",
        "--public-ip",
        "--registry",
        "--nodes-file",
        "--kubeconfig",
        "--cluster-cidr",
        "--vni",
        "--port",
        "--bpffs-dir",
        "--run-dir",
        "--metrics-addr",
        "--stats-interval",
    ] {
        assert!(help.contains(flag), "`weft agent --help` documents {flag}");
    }

    let mut lab = Lab::new("cfg");
    let mut c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1));
    let n = c.nodes[0].clone();
    c.nodes[0].name = "not-yet".into(); // the registry does not list this node at first
    c.write_nodes_file();
    // Everything from the config file; one flag overrides it.
    let config = lab.dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "node-name = \"node-1\"\niface-regex = \"^und\"\ncluster-cidr = \"198.19.0.0/16\"\nnodes-file = \"{}\"\nbpffs-dir = \"{}\"\nrun-dir = \"{}\"\nvni = 99\nmetrics-addr = \"127.0.0.1:9999\"\ndecap = \"xdp\"\n",
            c.nodes_file.display(),
            n.bpffs.display(),
            n.run_dir.display()
        ),
    )
    .unwrap();
    let mut cmd = n.ns.command(weft_bin());
    cmd.args(["agent", "--config"])
        .arg(&config)
        .args(["--metrics-addr", "127.0.0.1:9808"]);
    lab.spawn("agent", cmd);
    let addr = "127.0.0.1:9808";
    wait_for("/healthz", Duration::from_secs(10), || {
        http_get(&n.ns, addr, "/healthz").filter(|(code, _)| *code == 200)
    });
    assert_eq!(
        http_get(&n.ns, addr, "/readyz").map(|r| r.0),
        Some(503),
        "not ready before the first sync"
    );
    {
        // A request head that arrives in two segments is read whole.
        let _inside = InNetns::enter(&n.ns);
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(b"GET /heal").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"thz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "split request: {text}");
    }
    assert!(
        http_get(&n.ns, "127.0.0.1:9999", "/healthz").is_none(),
        "the flag overrides the file's metrics-addr"
    );
    wait_log(&lab, "agent", "this node is not in the node registry yet");
    c.nodes[0].name = "node-1".into();
    c.write_nodes_file();
    wait_for("/readyz", Duration::from_secs(10), || {
        http_get(&n.ns, addr, "/readyz").filter(|(code, _)| *code == 200)
    });
    assert!(
        n.ns.ip(&["link", "show", "und0"]).contains("prog/xdp"),
        "XDP (the file's decap) attached via the file's iface-regex"
    );
    c.add_pod(&mut lab, 0, 0);
    assert!(ping(&c.pods[0].ns, n.underlay_ip, 2));
    let (code, metrics) = http_get(&n.ns, addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    for needle in [
        "weft_forwarded_packets_total{reason=\"passthrough\",family=\"ipv4\"}",
        "weft_forwarded_packets_total{reason=\"passthrough\",family=\"ipv6\"}",
        "weft_dropped_packets_total{reason=\"unknown_vtep\",family=\"ipv4\"} 0",
        "weft_map_entries{map=\"endpoints\"} 1",
        "weft_reconciles_total",
        "weft_known_nodes 1",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics has {needle}:\n{metrics}"
        );
    }

    assert!(
        n.ns.ip(&["link", "show", "dev", "weft_gro"]).contains("UP"),
        "the agent holds the VXLAN port for GRO"
    );
    // `weft down` leaves the node as it was.
    lab.stop("agent");
    let out =
        n.ns.command(weft_bin())
            .arg("down")
            .arg("--bpffs-dir")
            .arg(&n.bpffs)
            .arg("--run-dir")
            .arg(&n.run_dir)
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "weft down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !n.ns.ip(&["link", "show", "und0"]).contains("xdp"),
        "XDP detached"
    );
    for dev in ["weft0", "weft_gro"] {
        assert!(
            n.ns.try_sh("ip", &["link", "show", "dev", dev])
                .status
                .code()
                != Some(0),
            "{dev} removed"
        );
    }
    assert!(
        !n.ns.ip(&["route", "show"]).contains("198.19.0.0/16"),
        "cluster route removed"
    );
    assert!(!n.bpffs.exists(), "pins removed");
    assert!(!n.run_dir.join("subnet.env").exists(), "subnet.env removed");
    let links = n.ns.sh("bpftool", &["link", "show"]);
    assert!(
        !links.contains("tcx") && !links.contains("xdp"),
        "no BPF links left: {links}"
    );
}

#[test]
fn bpf_debug_logs_appear_at_debug_level_and_cost_nothing_when_off() {
    if !privileged("bpf_debug_logs_appear_at_debug_level_and_cost_nothing_when_off") {
        return;
    }
    let mut lab = Lab::new("log");
    let mut c = Cluster::new(&mut lab, ClusterSpec::nodes_only(2).xdp_decap());
    c.launch(&mut lab);
    // Restart node-1's agent at debug level (the other stays at info).
    lab.stop(&Cluster::agent_name(0));
    let mut cmd = c.agent_command(0);
    cmd.env("WEFT_LOG", "info,weft_dataplane=debug,weft_agent=debug");
    lab.spawn("debug-agent", cmd);
    wait_log(&lab, "debug-agent", "ready run_dir=");
    // Packets from the node to a cluster address nobody owns: dropped on weft0.
    for (ns, agent) in [
        (&c.nodes[0].ns, "debug-agent"),
        (&c.nodes[1].ns, &Cluster::agent_name(1) as &str),
    ] {
        let _inside = InNetns::enter(ns);
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let _ = sock.send_to(b"x", "198.19.77.1:9");
        drop(_inside);
        if agent == "debug-agent" {
            wait_log(&lab, agent, "weft tc: drop no_route");
        } else {
            // Give a log line time to show up if one were (wrongly) coming.
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                !lab.log(agent).contains("weft tc: drop"),
                "no BPF logs at info level"
            );
        }
    }
    // Off means absent: the verifier pruned the log calls, so node-2's
    // programs (level 0) are smaller than node-1's (debug).
    let xlated = |ns: &Netns| -> u64 {
        let out = ns.sh("bpftool", &["-j", "net", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let id = v[0]["xdp"][0]["id"]
            .as_u64()
            .expect("an XDP program on und0");
        let prog: serde_json::Value =
            serde_json::from_str(&ns.sh("bpftool", &["-j", "prog", "show", "id", &id.to_string()]))
                .unwrap();
        prog["bytes_xlated"].as_u64().unwrap()
    };
    let (debug, off) = (xlated(&c.nodes[0].ns), xlated(&c.nodes[1].ns));
    println!("XDP program after verification: {debug} bytes with debug logging, {off} without");
    assert!(
        off < debug,
        "logging off must remove the log code ({off} vs {debug} bytes)"
    );
}

#[test]
fn underlay_from_the_default_route_and_public_ip_override() {
    if !privileged("underlay_from_the_default_route_and_public_ip_override") {
        return;
    }
    let mut lab = Lab::new("dfr");
    let c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1));
    c.write_nodes_file();
    let n = c.nodes[0].clone();
    // A second interface first in the address list, so "the first interface" would be wrong.
    n.ns.ip(&[
        "link", "add", "aaa0", "type", "veth", "peer", "name", "aaa1",
    ]);
    n.ns.ip(&["addr", "add", "198.18.9.1/24", "dev", "aaa0"]);
    n.ns.ip(&["link", "set", "aaa0", "up"]);
    n.ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.18.0.254",
        "dev",
        "und0",
    ]);
    for (name, extra, want) in [
        ("agent-default", vec![], "iface=und0 local_ip=198.18.0.1"),
        (
            "agent-public",
            vec!["--public-ip", "198.18.0.77"],
            "iface=und0 local_ip=198.18.0.77",
        ),
    ] {
        let mut cmd = n.ns.command(weft_bin());
        cmd.args([
            "agent",
            "--node-name",
            &n.name,
            "--cluster-cidr",
            weft_tests::CLUSTER_CIDR,
            "--nodes-file",
        ])
        .arg(&c.nodes_file)
        .arg("--bpffs-dir")
        .arg(&n.bpffs)
        .arg("--run-dir")
        .arg(&n.run_dir)
        .args(&extra);
        lab.spawn(name, cmd);
        wait_log(&lab, name, "ready run_dir=");
        let log = lab.log(name);
        assert!(log.contains(want), "{name}: {want}:\n{log}");
        if name == "agent-public" {
            assert!(
                log.contains("differs from this node's address"),
                "the mismatch with the registry is logged:\n{log}"
            );
        }
        lab.stop(name);
    }
}

#[test]
fn pinned_maps_of_another_layout_are_replaced_and_pods_restored() {
    if !privileged("pinned_maps_of_another_layout_are_replaced_and_pods_restored") {
        return;
    }
    let mut lab = Lab::new("lay");
    let c = Cluster::start(&mut lab, ClusterSpec::pair());
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    let n = c.nodes[0].clone();
    let agent = Cluster::agent_name(0);
    // Pins an empty map `name` of the given shape in node-1's pin directory,
    // in place of the agent's (whose programs still hold the old one).
    let pin_other = |name: &str, shape: &[&str]| {
        let path = n.bpffs.join(name);
        std::fs::remove_file(&path).unwrap();
        let mut args = vec!["map", "create", path.to_str().unwrap()];
        args.extend_from_slice(shape);
        args.extend_from_slice(&["name", name]);
        weft_tests::sh("bpftool", &args);
    };
    let max_entries = |name: &str| {
        let out = weft_tests::sh(
            "bpftool",
            &[
                "-j",
                "map",
                "show",
                "pinned",
                n.bpffs.join(name).to_str().unwrap(),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["max_entries"].as_u64().unwrap()
    };

    // An older version's counters, with fewer reasons (as before
    // `not_local` and `to_stack` existed): replaced, not reused with the
    // new reasons silently uncounted.
    const OLD_DROPS: &[&str] = &[
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "2",
    ];
    lab.stop(&agent);
    pin_other("WEFT_DROPS", OLD_DROPS);
    c.start_agent(&mut lab, 0);
    wait_log(&lab, &agent, "ready run_dir=");
    assert!(
        lab.log(&agent).contains("another version's layout"),
        "the replacement is logged:\n{}",
        lab.log(&agent)
    );
    assert_eq!(
        max_entries("WEFT_DROPS"),
        u64::from(weft_common::DropReason::SLOTS),
        "the pin has this build's reasons, once per family"
    );
    assert!(ping(&a.ns, b.ip, 2), "pods connected after the replacement");
    assert!(ping(&b.ns, a.ip, 2));

    // The endpoints map of another layout (the CNI plugin's record of the
    // pods) is replaced too, and the node's pod is put back into it from its
    // route and neighbour: the re-pointed pod programs drop everything a pod
    // sends without its entry (as spoofed), so the pings need it.
    lab.stop(&agent);
    pin_other(
        "WEFT_ENDPOINTS",
        &["type", "hash", "key", "4", "value", "4", "entries", "16"],
    );
    c.start_agent(&mut lab, 0);
    wait_log(&lab, &agent, "ready run_dir=");
    let log = lab.log(&agent);
    assert!(
        log.contains("pinned endpoints map had another version's layout")
            && log.contains("restored the pod's endpoint"),
        "{log}"
    );
    assert_eq!(
        max_entries("WEFT_ENDPOINTS"),
        16384,
        "the pin has this build's layout (dataplane-ebpf/src/maps.rs)"
    );
    assert_eq!(local_endpoints(&c, 0), vec![a.ip.to_string()]);
    assert!(ping(&a.ns, b.ip, 2), "the restored pod sends");
    assert!(ping(&b.ns, a.ip, 2), "and receives");
}

/// The IPs in node `i`'s endpoints map.
fn local_endpoints(c: &Cluster, i: usize) -> Vec<String> {
    c.status(i)["endpoints"]
        .as_array()
        .expect("endpoints list")
        .iter()
        .map(|e| e["ip"].as_str().expect("ip").to_string())
        .collect()
}

#[test]
fn pods_survive_weft_down_and_a_new_agent() {
    if !privileged("pods_survive_weft_down_and_a_new_agent") {
        return;
    }
    // `weft down` removes every pin (maps and links) and weft0, as does a
    // node whose bpffs is lost, but not the pods: their veths, routes and
    // neighbours stay. The next agent puts them back in the dataplane.
    let mut lab = Lab::new("down");
    let c = Cluster::start(&mut lab, ClusterSpec::pair());
    let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
    let n = c.nodes[0].clone();
    let agent = Cluster::agent_name(0);
    let host_if = weft_agent::endpoint::host_ifname(&a.name, "eth0");
    let before = c.status(0)["endpoints"].clone();
    assert_eq!(
        before[0]["xdp_redirect"], true,
        "the CNI turned GRO on in the pod: {before}"
    );
    assert!(
        n.ns.ip(&["link", "show", &host_if])
            .contains("alias weft pod, xdp-redirect"),
        "the veth says what it is"
    );
    lab.stop(&agent);
    let out = c.weft(0, &["down"]);
    assert!(
        out.status.success(),
        "weft down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!n.bpffs.exists(), "every pin removed");
    assert!(!ping(&a.ns, b.ip, 1), "no dataplane on node 1");

    c.start_agent(&mut lab, 0);
    wait_log(&lab, &agent, "ready run_dir=");
    assert!(
        lab.log(&agent)
            .contains("restored them from the node's routes"),
        "{}",
        lab.log(&agent)
    );
    assert_eq!(
        c.status(0)["endpoints"],
        before,
        "the entry is restored as the CNI made it (interface, MAC, XDP flag)"
    );
    assert_eq!(
        c.pod_programs(0, &host_if),
        (true, true),
        "the pod's programs are attached again"
    );
    let spoofed_before = c.counter(0, "spoofed_source");
    assert!(ping(&a.ns, b.ip, 2), "the pod sends again");
    assert!(ping(&b.ns, a.ip, 2), "and receives");
    assert_eq!(
        c.counter(0, "spoofed_source"),
        spoofed_before,
        "its packets pass weft_from_pod's source check"
    );
    // A pod created after the restart sits next to the restored one.
    let mut c = c;
    let p = c.add_pod(&mut lab, 0, 1);
    assert!(ping(&p.ns, a.ip, 2), "new pod to restored pod, same node");
    assert!(ping(&p.ns, b.ip, 2), "new pod to remote pod");
}

#[test]
fn programs_removed_by_others_are_put_back() {
    if !privileged("programs_removed_by_others_are_put_back") {
        return;
    }
    let repairs = |n: &weft_tests::NodeInfo, hook: &str| -> u64 {
        let (_, metrics) = http_get(&n.ns, "127.0.0.1:9807", "/metrics").expect("metrics");
        let needle = format!("weft_dataplane_repairs_total{{hook=\"{hook}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |v| v.trim().parse().expect("a count"))
    };
    // Ends the link pinned at `pin` as `bpftool link detach` does: the pin
    // stays, the program is off the device.
    let detach = |n: &weft_tests::NodeInfo, pin: &str| {
        let out = weft_tests::sh(
            "bpftool",
            &[
                "-j",
                "link",
                "show",
                "pinned",
                n.bpffs.join(pin).to_str().unwrap(),
            ],
        );
        let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
            .as_u64()
            .unwrap()
            .to_string();
        weft_tests::sh("bpftool", &["link", "detach", "id", &id]);
    };
    // TC decap with pods on weft's netlink filters (the default), XDP decap
    // with pods on TCX links.
    let tcx_pods = weft_agent::dataplane::has_tcx().then_some("tcx");
    for (lab_name, spec, decap_pin, decap_hook) in [
        ("keep", ClusterSpec::pair(), "link_und", "underlay_tc"),
        (
            "keepx",
            ClusterSpec {
                tc_attach: tcx_pods,
                ..ClusterSpec::pair().xdp_decap()
            },
            "link_xdp",
            "underlay_xdp",
        ),
    ] {
        let mut lab = Lab::new(lab_name);
        let c = Cluster::start(&mut lab, spec);
        let (a, b) = (c.pods[0].clone(), c.pods[1].clone());
        let n = c.nodes[0].clone();
        let agent = Cluster::agent_name(0);
        // A check has run (the first at once, then every 5 s): with nothing
        // removed it puts nothing back.
        std::thread::sleep(Duration::from_secs(6));
        assert!(
            !lab.log(&agent).contains("attached it again"),
            "{}",
            lab.log(&agent)
        );
        assert_eq!(repairs(&n, decap_hook), 0);

        // The decap program: without it, node-1 drops every VXLAN packet.
        detach(&n, decap_pin);
        wait_for(
            &format!("{decap_hook} put back"),
            Duration::from_secs(15),
            || (repairs(&n, decap_hook) == 1).then_some(()),
        );
        assert!(ping(&b.ns, a.ip, 2), "decap works again");
        assert!(ping(&a.ns, b.ip, 2));

        // A pod's programs (what it sends, what the stack delivers to it):
        // its TCX links detached, or its clsact qdisc (with weft's filters)
        // deleted.
        let host_if = weft_agent::endpoint::host_ifname(&a.name, "eth0");
        if n.bpffs.join("pods").join(&host_if).exists() {
            detach(&n, &format!("pods/{host_if}"));
            detach(&n, &format!("pods_to/{host_if}"));
        } else {
            n.ns.sh("tc", &["qdisc", "del", "dev", &host_if, "clsact"]);
            assert_eq!(
                c.pod_programs(0, &host_if),
                (false, false),
                "the pod's programs are off"
            );
        }
        wait_for(
            "the pod's programs put back",
            Duration::from_secs(15),
            || (repairs(&n, "pod_ingress") == 1 && repairs(&n, "pod_egress") == 1).then_some(()),
        );
        assert!(ping(&a.ns, b.ip, 2), "the pod sends through weft again");
        assert_eq!(c.counter(0, "spoofed_source"), 0);

        // weft0's program (node → remote pods), then weft0 itself.
        detach(&n, "link_host");
        wait_for("host put back", Duration::from_secs(15), || {
            (repairs(&n, "host") == 1).then_some(())
        });
        n.ns.ip(&["link", "del", "weft0"]);
        wait_for("weft0 put back", Duration::from_secs(15), || {
            (repairs(&n, "weft0") == 1 && repairs(&n, "host") == 2).then_some(())
        });
        assert!(
            ping(&n.ns, b.ip, 2),
            "node-1 reaches the remote pod through weft0 again"
        );
        assert!(ping(&a.ns, b.ip, 2), "and its pod still does");
        let log = lab.log(&agent);
        assert!(
            log.contains("no longer attached") && log.contains("weft0 is gone"),
            "{log}"
        );

        // The underlay's address changed: VXLAN would leave from an address
        // the node no longer has. /healthz says so until it is back.
        let healthz = || http_get(&n.ns, "127.0.0.1:9807", "/healthz");
        n.ns.ip(&["addr", "del", "198.18.0.1/24", "dev", "und0"]);
        n.ns.ip(&["addr", "add", "198.18.0.11/24", "dev", "und0"]);
        let body = wait_for("/healthz failing", Duration::from_secs(15), || {
            healthz()
                .filter(|(code, _)| *code == 503)
                .map(|(_, body)| body)
        });
        assert!(body.contains("no longer has 198.18.0.1"), "{body}");
        n.ns.ip(&["addr", "del", "198.18.0.11/24", "dev", "und0"]);
        n.ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "und0"]);
        wait_for("/healthz passing", Duration::from_secs(15), || {
            healthz().filter(|(code, _)| *code == 200)
        });
        assert!(ping(&a.ns, b.ip, 2), "pod to pod with the address back");

        // The underlay re-created (same name and address, new index and
        // MAC): load-time constants of the programs, so the agent loads them
        // anew for it, over the same pins, without a restart.
        n.ns.ip(&["link", "del", "und0"]);
        c.underlay.plug(&n.ns, 1);
        wait_for("the dataplane reloaded", Duration::from_secs(15), || {
            (repairs(&n, "underlay") == 1).then_some(())
        });
        assert!(
            lab.log(&agent)
                .contains("the underlay interface was re-created; reloaded"),
            "{}",
            lab.log(&agent)
        );
        wait_for("/healthz passing", Duration::from_secs(15), || {
            healthz().filter(|(code, _)| *code == 200)
        });
        assert!(ping(&a.ns, b.ip, 2), "pod to pod over the new underlay");
        assert!(ping(&b.ns, a.ip, 2));
        assert!(ping(&n.ns, b.ip, 2), "node to remote pod");
        assert_eq!(c.counter(0, "spoofed_source"), 0);

        lab.stop(&agent);
        // weft0 gone while no agent runs, too: its pinned link is defunct.
        n.ns.ip(&["link", "del", "weft0"]);
        c.start_agent(&mut lab, 0);
        wait_log(&lab, &agent, "ready run_dir=");
        assert_eq!(healthz().map(|(code, _)| code), Some(200));
        assert!(ping(&a.ns, b.ip, 2), "pod to pod over the new underlay");
        assert!(ping(&b.ns, a.ip, 2));
        assert!(
            ping(&n.ns, b.ip, 2),
            "node to remote pod over the new weft0"
        );
    }
}

#[test]
fn no_process_but_the_masquerade_transaction_and_no_ip_tc_ethtool_or_nsenter() {
    if !privileged("no_process_but_the_masquerade_transaction_and_no_ip_tc_ethtool_or_nsenter") {
        return;
    }
    let mut lab = Lab::new("nop");
    let mut c = Cluster::new(&mut lab, ClusterSpec::nodes_only(2));
    // A PATH with only what the masquerade ruleset may run (each call
    // logged), and ip, tc, ethtool, nsenter … as traps that record any
    // attempt to run them and fail, as if absent.
    let masq_tools = [
        "iptables",
        "iptables-restore",
        "iptables-legacy",
        "iptables-legacy-restore",
        "iptables-legacy-save",
        "iptables-nft-save",
        "nft",
    ];
    let traps = [
        "ip", "tc", "ethtool", "nsenter", "sysctl", "bridge", "modprobe",
    ];
    let (bin, spawned) = weft_tests::logged_tools(&lab, "masq-only", &masq_tools, &traps);
    c.path = Some(bin);
    c.launch(&mut lab);
    let log = || std::fs::read_to_string(&spawned).unwrap();
    let at_start = log();
    assert!(
        at_start
            .lines()
            .all(|l| masq_tools.contains(&l.split(' ').next().unwrap_or_default())),
        "at start only the masquerade's tools ran:\n{at_start}"
    );
    assert!(
        at_start.contains("iptables-restore"),
        "the ruleset went in: {at_start}"
    );
    std::fs::write(&spawned, "").unwrap();

    // The CNI plugin's ADD and CHECK, pods reaching each other.
    let a = c.add_pod(&mut lab, 0, 0);
    let b = c.add_pod(&mut lab, 1, 0);
    assert!(ping(&a.ns, b.ip, 2), "pods reach each other");
    for p in [&a, &b] {
        let out = c.cni(
            p.node,
            "CHECK",
            &p.name,
            p.ns.path().to_str().unwrap(),
            &c.cni_conf(p.node, "1.1.0"),
        );
        assert!(
            out.status.success(),
            "CHECK: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The keeper puts back weft0 and weft_gro, removed by something else.
    let node = &c.nodes[0].ns;
    node.ip(&["link", "del", "weft0"]);
    node.ip(&["link", "del", "weft_gro"]);
    wait_log(
        &lab,
        &Cluster::agent_name(0),
        "weft0 is gone (deleted by something else?); creating it again",
    );
    wait_log(
        &lab,
        &Cluster::agent_name(0),
        "weft_gro was gone or changed",
    );
    wait_for("weft0 back", Duration::from_secs(10), || {
        node.try_sh("ip", &["link", "show", "weft0"])
            .status
            .success()
            .then_some(())
    });
    assert!(
        ping(&c.nodes[0].ns, b.ip, 2),
        "the node reaches a remote pod through weft0 again"
    );
    // Two more checks of every hook, then a DEL.
    std::thread::sleep(weft_agent::daemon::keeper::HOOK_CHECK_INTERVAL * 2);
    let out = c.cni(
        1,
        "DEL",
        &b.name,
        b.ns.path().to_str().unwrap(),
        &c.cni_conf(1, "1.1.0"),
    );
    assert!(
        out.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        log(),
        "",
        "no process ran after start: not for ADD, CHECK, DEL, nor the agent's checks and repairs"
    );

    // A new agent over the same pins restores the pod; `weft down` removes all.
    lab.stop(&Cluster::agent_name(0));
    c.start_agent(&mut lab, 0);
    wait_log(&lab, &Cluster::agent_name(0), "ready run_dir=");
    assert!(
        lab.log(&Cluster::agent_name(0)).contains("pods=1"),
        "{}",
        lab.log(&Cluster::agent_name(0))
    );
    assert!(
        ping(&a.ns, c.nodes[1].underlay_ip, 2) || ping(&c.nodes[0].ns, a.ip, 2),
        "the pod is wired"
    );
    lab.stop(&Cluster::agent_name(0));
    let out = c.weft(0, &["down"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("removed pins") && said.contains("weft0"),
        "weft down: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !node
            .try_sh("ip", &["link", "show", "weft0"])
            .status
            .success(),
        "weft0 is gone"
    );
}
