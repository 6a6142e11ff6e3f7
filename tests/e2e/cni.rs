//! The CNI plugin, invoked exactly as a runtime does (CNI_* environment,
//! configuration on stdin) against real namespaces.

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use serde_json::{Value, json};
use weft_tests::{
    Cluster, ClusterSpec, EchoServer, Lab, Netns, iperf_gbps, ping, privileged, tcp_roundtrip,
    wait_for,
};

fn one_node(lab: &mut Lab, cidr: &str) -> Cluster {
    let mut c = Cluster::new(lab, ClusterSpec::nodes_only(1));
    c.nodes[0].pod_cidr = cidr.into();
    c.launch(lab);
    c
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "JSON on stdout: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Asserts `out` is a spec error with `code`, and returns it.
fn spec_error(out: &std::process::Output, code: u64, version: &str) -> Value {
    assert!(!out.status.success(), "must exit non-zero");
    let v = json_of(out);
    assert_eq!(v["code"], code, "error code in {v}");
    assert_eq!(v["cniVersion"], version, "{v}");
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()) && v.get("details").is_some(),
        "msg and details: {v}"
    );
    v
}

fn ipam_files(c: &Cluster) -> Vec<String> {
    let dir = c.nodes[0].run_dir.join("ipam/weft");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pod host-side veths on node-1: `weft` + 10 hex digits (not weft0/weft0p).
fn host_veths(c: &Cluster) -> usize {
    c.nodes[0]
        .ns
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1)?.split('@').next())
        .filter(|name| {
            name.len() == 14
                && name.starts_with("weft")
                && name[4..].chars().all(|c| c.is_ascii_hexdigit())
        })
        .count()
}

fn endpoints(c: &Cluster) -> usize {
    c.status(0)["endpoints"].as_array().unwrap().len()
}

/// weft's programs on node-1's pod veths, ingress and egress: pinned TCX
/// links (pods with an egress limit) and weft's netlink filters (the rest).
fn pod_links(c: &Cluster) -> (usize, usize) {
    let count = |dir| {
        std::fs::read_dir(c.nodes[0].bpffs.join(dir))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let node = &c.nodes[0].ns;
    let veths: Vec<String> = node
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.len() == 14 && n.starts_with("weft"))
        .collect();
    let filters = |dir: &str, prog: &str| {
        veths
            .iter()
            .filter(|v| {
                node.sh("tc", &["filter", "show", "dev", v, dir])
                    .contains(prog)
            })
            .count()
    };
    (
        count("pods") + filters("ingress", "weft_from_pod"),
        count("pods_to") + filters("egress", "weft_to_pod"),
    )
}

#[test]
fn add_check_del_round_trips_in_every_version() {
    if !privileged("add_check_del_round_trips_in_every_version") {
        return;
    }
    let mut lab = Lab::new("cni");
    let c = one_node(&mut lab, "198.19.1.0/24");
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let pod = lab.netns(&format!("p{}", version.replace('.', "")));
        let netns = pod.path().display().to_string();
        let id = format!("ctr-{version}");
        let conf = c.cni_conf(0, version);
        let out = c.cni(0, "ADD", &id, &netns, &conf);
        assert!(
            out.status.success(),
            "ADD {version}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let r = json_of(&out);
        assert_eq!(r["cniVersion"], version);
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 2, "host veth and the pod's eth0: {r}");
        assert_eq!(ifs[1]["name"], "eth0");
        assert_eq!(ifs[1]["sandbox"], netns.as_str());
        let ip = &r["ips"][0];
        assert_eq!(ip["gateway"], "198.19.1.1");
        assert_eq!(ip["interface"], 1);
        assert_eq!(
            ip.get("version").is_some(),
            version == "0.4.0",
            "the 0.4.0 result format: {r}"
        );
        assert_eq!(
            r["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "198.19.1.1"})
        );
        assert_eq!(
            r["dns"]["nameservers"][0], "198.18.0.53",
            "dns from the config"
        );
        let addr: Ipv4Addr = ip["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .parse()
            .unwrap();
        assert!(
            pod.ip(&["-o", "link", "show", "eth0"]).contains("mtu 1450"),
            "pod MTU from the node config"
        );
        assert_eq!(
            pod_links(&c),
            (1, 1),
            "both of the pod veth's programs are attached"
        );
        assert!(
            ping(&pod, Ipv4Addr::new(198, 18, 0, 1), 1),
            "the pod reaches its node"
        );

        // CHECK passes on what ADD made...
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = r.clone();
        let out = c.cni(0, "CHECK", &id, &netns, &with_prev);
        assert!(
            out.status.success(),
            "CHECK {version}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // ...and reports drift.
        pod.ip(&["addr", "del", &format!("{addr}/32"), "dev", "eth0"]);
        let v = spec_error(&c.cni(0, "CHECK", &id, &netns, &with_prev), 101, version);
        assert!(
            v["details"].as_str().unwrap().contains(&addr.to_string()),
            "{v}"
        );

        // DEL releases everything; a second DEL succeeds too.
        for round in ["DEL", "DEL again"] {
            let out = c.cni(0, "DEL", &id, &netns, &conf);
            assert!(
                out.status.success(),
                "{round} {version}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(
            ipam_files(&c).is_empty(),
            "address released: {:?}",
            ipam_files(&c)
        );
        assert_eq!(host_veths(&c), 0, "host veth removed");
        assert_eq!(endpoints(&c), 0, "endpoint entry removed");
        assert_eq!(pod_links(&c), (0, 0), "programs and pins removed");
    }
}

#[test]
fn thirty_concurrent_adds_then_dels() {
    if !privileged("thirty_concurrent_adds_then_dels") {
        return;
    }
    let mut lab = Lab::new("c30");
    let c = one_node(&mut lab, "198.19.1.0/24");
    let pods: Vec<Netns> = (0..30).map(|i| lab.netns(&format!("q{i}"))).collect();
    let run_all = |cmd: &'static str| -> Vec<std::process::Output> {
        std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|p| {
                    s.spawn(|| {
                        c.cni(
                            0,
                            cmd,
                            &p.name,
                            p.path().to_str().unwrap(),
                            &c.cni_conf(0, "1.1.0"),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let adds = run_all("ADD");
    let mut ips = HashSet::new();
    for (i, out) in adds.iter().enumerate() {
        assert!(
            out.status.success(),
            "ADD {i}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        ips.insert(
            json_of(out)["ips"][0]["address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(ips.len(), 30, "30 distinct addresses");
    assert_eq!(ipam_files(&c).len(), 30);
    assert_eq!(endpoints(&c), 30);
    assert!(
        ping(&pods[0], pods[29].ip_of_eth0(), 1),
        "pods reach each other"
    );
    for (i, out) in run_all("DEL").iter().enumerate() {
        assert!(
            out.status.success(),
            "DEL {i}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        ipam_files(&c).is_empty(),
        "no leaked address: {:?}",
        ipam_files(&c)
    );
    assert_eq!(host_veths(&c), 0, "no leaked veth");
    assert_eq!(endpoints(&c), 0, "no leaked endpoint");
    assert_eq!(pod_links(&c), (0, 0), "no leaked link pin or filter");
}

trait Eth0 {
    fn ip_of_eth0(&self) -> Ipv4Addr;
}

impl Eth0 for Netns {
    fn ip_of_eth0(&self) -> Ipv4Addr {
        let out = self.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
            .expect("eth0 address")
    }
}

#[test]
fn add_after_a_crash_mid_add_reuses_the_address() {
    if !privileged("add_after_a_crash_mid_add_reuses_the_address") {
        return;
    }
    let mut lab = Lab::new("crs");
    let c = one_node(&mut lab, "198.19.1.0/24");
    let pod = lab.netns("p");
    let netns = pod.path().display().to_string();
    // What a plugin killed after allocating and creating the veth leaves:
    // an address held by the container and a host veth without a program.
    let dir = c.nodes[0].run_dir.join("ipam/weft");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("198.19.1.2"), format!("{}\neth0\n", "ctr-crash")).unwrap();
    let host = weft_agent::endpoint::host_ifname("ctr-crash", "eth0");
    c.nodes[0].ns.ip(&[
        "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    let out = c.cni(0, "ADD", "ctr-crash", &netns, &c.cni_conf(0, "1.1.0"));
    assert!(
        out.status.success(),
        "ADD after the crash: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        json_of(&out)["ips"][0]["address"],
        "198.19.1.2/32",
        "the held address, not a second one"
    );
    assert_eq!(ipam_files(&c), ["198.19.1.2"]);
    assert_eq!(host_veths(&c), 1);
    // Another container never gets that address.
    let other = lab.netns("o");
    let out = c.cni(
        0,
        "ADD",
        "ctr-other",
        other.path().to_str().unwrap(),
        &c.cni_conf(0, "1.1.0"),
    );
    assert_eq!(json_of(&out)["ips"][0]["address"], "198.19.1.3/32");
    assert!(ping(&pod, Ipv4Addr::new(198, 19, 1, 3), 1));
}

#[test]
fn pool_exhaustion_and_errors_follow_the_spec() {
    if !privileged("pool_exhaustion_and_errors_follow_the_spec") {
        return;
    }
    let mut lab = Lab::new("exh");
    let c = one_node(&mut lab, "198.19.1.0/29"); // .2-.6: five pods
    for i in 0..5 {
        let p = lab.netns(&format!("x{i}"));
        assert!(
            c.cni(
                0,
                "ADD",
                &p.name,
                p.path().to_str().unwrap(),
                &c.cni_conf(0, "1.1.0")
            )
            .status
            .success()
        );
    }
    let sixth = lab.netns("x5");
    let v = spec_error(
        &c.cni(
            0,
            "ADD",
            "x5",
            sixth.path().to_str().unwrap(),
            &c.cni_conf(0, "1.1.0"),
        ),
        100,
        "1.1.0",
    );
    assert!(
        v["details"].as_str().unwrap().contains("198.19.1.0/29"),
        "{v}"
    );
    assert!(
        !sixth.ip(&["link", "show"]).contains("eth0"),
        "no half-built pod"
    );
    assert_eq!(host_veths(&c), 5, "no extra veth");
    assert_eq!(ipam_files(&c).len(), 5);

    // Bad JSON, unknown version, missing environment, netns gone.
    let path = sixth.path().display().to_string();
    let mut bad = c.cni_conf(0, "1.1.0");
    bad["cniVersion"] = json!("0.1.0");
    spec_error(&c.cni(0, "ADD", "y", &path, &bad), 1, "0.1.0");
    let mut garbage = c.cni_conf(0, "1.1.0");
    garbage["type"] = json!(42);
    spec_error(&c.cni(0, "ADD", "y", &path, &garbage), 6, "1.1.0");
    let out = c.nodes[0]
        .ns
        .command(weft_tests::cni_bin())
        .env("CNI_COMMAND", "ADD")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    spec_error(&out, 6, "1.1.0");
    spec_error(
        &c.cni(0, "ADD", "", &path, &c.cni_conf(0, "1.0.0")),
        4,
        "1.0.0",
    );
    spec_error(
        &c.cni(
            0,
            "ADD",
            "y",
            "/run/netns/weft-no-such-ns",
            &c.cni_conf(0, "1.0.0"),
        ),
        3,
        "1.0.0",
    );
    let v = json_of(&c.cni(0, "VERSION", "", "", &json!({"cniVersion": "1.1.0"})));
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn status_and_gc() {
    if !privileged("status_and_gc") {
        return;
    }
    let mut lab = Lab::new("gc");
    let mut c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1));
    let conf = c.cni_conf(0, "1.1.0");
    spec_error(&c.cni(0, "STATUS", "", "", &conf), 50, "1.1.0");
    c.launch(&mut lab);
    assert!(
        c.cni(0, "STATUS", "", "", &conf).status.success(),
        "STATUS once the agent is ready"
    );
    let pods: Vec<Netns> = (0..3).map(|i| lab.netns(&format!("g{i}"))).collect();
    for p in &pods {
        assert!(
            c.cni(0, "ADD", &p.name, p.path().to_str().unwrap(), &conf)
                .status
                .success()
        );
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": pods[1].name, "ifname": "eth0"}]);
    let out = c.cni(0, "GC", "", "", &gc);
    assert!(
        out.status.success(),
        "GC: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        ipam_files(&c).len(),
        1,
        "only the valid attachment keeps its address"
    );
    assert_eq!(host_veths(&c), 1);
    assert_eq!(endpoints(&c), 1);
    assert!(
        ping(&pods[1], Ipv4Addr::new(198, 18, 0, 1), 1),
        "the kept pod still works"
    );
}

#[test]
fn chained_with_debian_portmap_and_bandwidth() {
    if !privileged("chained_with_debian_portmap_and_bandwidth") {
        return;
    }
    let plugins = std::path::Path::new("/usr/lib/cni");
    assert!(
        plugins.join("portmap").exists() && plugins.join("bandwidth").exists(),
        "containernetworking-plugins is installed by `cargo xtask setup`"
    );
    let mut lab = Lab::new("chn");
    let mut c = Cluster::start(&mut lab, ClusterSpec::nodes_only(2));
    let peer = c.add_pod(&mut lab, 1, 0);
    let pod = lab.netns("web");
    let netns = pod.path().display().to_string();
    // The conflist a runtime would run: weft, then portmap, then bandwidth
    // (Debian's plugins speak up to CNI 1.0.0). The runtime hands the
    // pod's limits (100 Mbit/s each way) to every plugin that declares the
    // `bandwidth` capability: weft too, so that the pod takes the stack
    // from its first packet.
    let version = "1.0.0";
    let limits = json!({"ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000, "egressBurst": 1_000_000});
    let mut weft = c.cni_conf(0, version);
    weft["capabilities"] = json!({"bandwidth": true});
    weft["runtimeConfig"] = json!({"bandwidth": limits});
    let out = c.cni(0, "ADD", "web", &netns, &weft);
    assert!(out.status.success());
    let mut prev = json_of(&out);
    let pod_ip = pod.ip_of_eth0();
    let shaped = |c: &Cluster| {
        c.status(0)["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["ip"] == pod_ip.to_string())
            .map(|e| e["shaped"] == true)
            .expect("the pod's endpoint")
    };
    assert!(shaped(&c), "weft's ADD marked the pod shaped");
    let chain = [
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 7000, "protocol": "tcp"}]}}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}, "runtimeConfig": {"bandwidth": limits}}),
    ];
    let run_plugin = |conf: &Value, command: &str| {
        let plugin = plugins.join(conf["type"].as_str().unwrap());
        weft_tests::run_cni_plugin(&c.nodes[0].ns, &plugin, command, "web", &netns, conf, None)
    };
    for link in &chain {
        let mut conf = link.clone();
        conf["cniVersion"] = json!(version);
        conf["name"] = json!("weft");
        conf["prevResult"] = prev.clone();
        let out = run_plugin(&conf, "ADD");
        assert!(
            out.status.success(),
            "{} ADD on weft's result: {}{}",
            link["type"],
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        prev = json_of(&out);
    }
    // portmap: node-2's host reaches the pod through node-1's port 8080.
    let _echo = EchoServer::start(&pod, pod_ip, 7000);
    let mut ok = false;
    for _ in 0..20 {
        if tcp_roundtrip(&c.nodes[1].ns, c.nodes[0].underlay_ip, 8080) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "portmap's DNAT to the weft pod works");
    // bandwidth: a token bucket on weft's host-side veth.
    let host = prev["interfaces"][0]["name"].as_str().unwrap().to_string();
    let qdisc = c.nodes[0].ns.ip(&["link", "show", &host]);
    assert!(
        qdisc.contains("tbf")
            || c.nodes[0]
                .ns
                .sh("tc", &["qdisc", "show", "dev", &host])
                .contains("tbf"),
        "bandwidth shaped {host}"
    );
    // The limits hold for traffic to and from a pod on the other node (weft's
    // fast paths would bypass the bandwidth plugin's qdiscs): 100 Mbit/s
    // each way, where the overlay moves gigabits.
    let mut rate = |reverse: bool| {
        let extra: &[&str] = if reverse { &["-R"] } else { &[] };
        iperf_gbps(&peer.ns, peer.ip, &pod, &mut lab, "iperf", 2, extra)
    };
    let (out_of_pod, into_pod) = (rate(false), rate(true));
    for (way, gbps) in [("out of", out_of_pod), ("into", into_pod)] {
        assert!(
            gbps < 0.15,
            "bandwidth's 100 Mbit/s limit holds {way} the pod: {:.0} Mbit/s",
            gbps * 1000.0
        );
    }
    // Without the qdiscs (removed by hand: bandwidth's DEL leaves them to go
    // with the veth) the agent sees the veth unshaped and the pod is back on
    // the fast paths, beyond the old limit.
    for q in ["root", "ingress"] {
        c.nodes[0].ns.sh("tc", &["qdisc", "del", "dev", &host, q]);
    }
    wait_for(
        "the agent to see the veth unshaped",
        Duration::from_secs(15),
        || (!shaped(&c)).then_some(()),
    );
    assert!(
        rate(true) > 0.3,
        "no limit once bandwidth's qdiscs are gone"
    );
    // A qdisc an operator adds by hand counts the same (no CNI involved).
    c.nodes[0].ns.sh(
        "tc",
        &[
            "qdisc", "add", "dev", &host, "root", "tbf", "rate", "50mbit", "burst", "64kb",
            "latency", "50ms",
        ],
    );
    wait_for(
        "the agent to see the veth shaped",
        Duration::from_secs(15),
        || shaped(&c).then_some(()),
    );
    let gbps = rate(true);
    assert!(
        gbps < 0.075,
        "a hand-made 50 Mbit/s token bucket holds into the pod: {:.0} Mbit/s",
        gbps * 1000.0
    );
    // DEL in reverse order.
    for link in chain.iter().rev() {
        let mut conf = link.clone();
        conf["cniVersion"] = json!(version);
        conf["name"] = json!("weft");
        conf["prevResult"] = prev.clone();
        assert!(
            run_plugin(&conf, "DEL").status.success(),
            "{} DEL",
            link["type"]
        );
    }
    assert!(c.cni(0, "DEL", "web", &netns, &weft).status.success());
}

/// Addresses in node-1's IPv6 IPAM store (`v6/` in the IPv4 one).
fn ipam6_files(c: &Cluster) -> Vec<String> {
    let dir = c.nodes[0].run_dir.join("ipam/weft/v6");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn dual_stack_add_check_del_gc_in_every_version() {
    if !privileged("dual_stack_add_check_del_gc_in_every_version") {
        return;
    }
    let mut lab = Lab::new("cn6");
    let mut c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1).dual_stack());
    c.launch(&mut lab);
    for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let pod = lab.netns(&format!("q{}", version.replace('.', "")));
        let netns = pod.path().display().to_string();
        let id = format!("ds-{version}");
        let conf = c.cni_conf(0, version);
        let out = c.cni(0, "ADD", &id, &netns, &conf);
        assert!(
            out.status.success(),
            "ADD {version}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let r = json_of(&out);
        let ips = r["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 2, "an address of each family: {r}");
        let v6 = &ips[1];
        let addr6 = v6["address"].as_str().unwrap().to_string();
        assert!(
            addr6.starts_with("2001:2:0:1::") && addr6.ends_with("/128"),
            "{r}"
        );
        assert_eq!(v6["gateway"], "2001:2:0:1::1");
        assert_eq!(v6["interface"], 1);
        assert_eq!(
            v6.get("version").map(|v| v == "6"),
            version.starts_with("0.").then_some(true),
            "the 0.x result format: {r}"
        );
        assert!(
            r["routes"]
                .as_array()
                .unwrap()
                .contains(&json!({"dst": "::/0", "gw": "2001:2:0:1::1"})),
            "{r}"
        );
        let ip6 = addr6.trim_end_matches("/128");
        assert!(
            pod.ip(&["-6", "-o", "addr", "show", "dev", "eth0"])
                .contains(&addr6),
            "the pod has {addr6}"
        );
        assert!(
            ping(
                &pod,
                "2001:2:0:1::1".parse::<std::net::Ipv6Addr>().unwrap(),
                1
            ),
            "the pod reaches its IPv6 gateway"
        );
        assert_eq!(ipam6_files(&c), [ip6.to_string()]);
        if version != "0.3.1" {
            let mut with_prev = conf.clone();
            with_prev["prevResult"] = r.clone();
            let out = c.cni(0, "CHECK", &id, &netns, &with_prev);
            assert!(
                out.status.success(),
                "CHECK {version}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            pod.ip(&["-6", "route", "del", "default", "dev", "eth0"]);
            let v = spec_error(&c.cni(0, "CHECK", &id, &netns, &with_prev), 101, version);
            assert!(v["details"].as_str().unwrap().contains(&addr6), "{v}");
        }
        for round in ["DEL", "DEL again"] {
            let out = c.cni(0, "DEL", &id, &netns, &conf);
            assert!(
                out.status.success(),
                "{round} {version}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(
            ipam_files(&c).is_empty() && ipam6_files(&c).is_empty(),
            "both addresses released"
        );
        assert_eq!(
            endpoints(&c),
            0,
            "both endpoint entries removed: {}",
            c.status(0)["endpoints"]
        );
        assert_eq!(host_veths(&c), 0, "host veth removed");
    }

    // GC: what no valid attachment holds goes, in both stores.
    let conf = c.cni_conf(0, "1.1.0");
    let pods: Vec<Netns> = (0..2).map(|i| lab.netns(&format!("h{i}"))).collect();
    for p in &pods {
        assert!(
            c.cni(0, "ADD", &p.name, p.path().to_str().unwrap(), &conf)
                .status
                .success()
        );
    }
    assert_eq!(
        (ipam_files(&c).len(), ipam6_files(&c).len(), endpoints(&c)),
        (2, 2, 4)
    );
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": pods[1].name, "ifname": "eth0"}]);
    assert!(c.cni(0, "GC", "", "", &gc).status.success());
    assert_eq!(
        (ipam_files(&c).len(), ipam6_files(&c).len(), endpoints(&c)),
        (1, 1, 2)
    );
    assert!(
        ping(
            &pods[1],
            "2001:2:0:1::1".parse::<std::net::Ipv6Addr>().unwrap(),
            1
        ),
        "the kept pod still works over IPv6"
    );
}
