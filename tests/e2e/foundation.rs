//! The foundation: the BPF object carries BTF, the agent loads and attaches
//! the programs, and their counters move by exactly the packets sent.

#[path = "../../xtask/src/ebpf.rs"]
#[expect(
    dead_code,
    reason = "shared with xtask; these tests use the ELF reader"
)]
mod ebpf;

use std::time::Duration;

use weft_tests::{InNetns, Lab, Netns, privileged, sh, wait_for, weft_bin};

#[test]
fn bpf_object_has_btf_and_every_program() {
    let object = weft_agent::dataplane::OBJECT;
    let sections = ebpf::section_names(object).expect("the embedded object is an ELF64 LE file");
    assert!(
        ebpf::has_btf_section(object),
        "no .BTF section in {sections:?}"
    );
    assert!(
        sections.iter().any(|s| s == "xdp"),
        "no xdp section in {sections:?}"
    );
    assert!(
        sections.iter().any(|s| s == "classifier"),
        "no classifier section in {sections:?}"
    );
    // bpftool reads the BTF back (it is on the machine after `cargo xtask setup`).
    let path = std::env::temp_dir().join(format!("weft-btf-{}.o", std::process::id()));
    std::fs::write(&path, object).expect("write object");
    let out = std::process::Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    match out {
        Ok(o) => {
            assert!(
                o.status.success(),
                "bpftool btf dump: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                text.contains("weft_xdp_decap") && text.contains("__sk_buff"),
                "BTF lacks the program types"
            );
        }
        Err(e) => eprintln!("SKIP bpftool part: {e}"),
    }
}

/// `weft status --json` counter by name.
fn counter(node: &Netns, bpffs: &std::path::Path, run: &std::path::Path, name: &str) -> u64 {
    let out = node
        .command(weft_bin())
        .args(["status", "--json", "--bpffs-dir"])
        .arg(bpffs)
        .arg("--run-dir")
        .arg(run)
        .output()
        .expect("weft status");
    assert!(
        out.status.success(),
        "weft status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    for list in ["forwards", "drops"] {
        if let Some(pair) = v["counters"][list]
            .as_array()
            .and_then(|l| l.iter().find(|p| p[0] == name))
        {
            return pair[1].as_u64().expect("number");
        }
    }
    panic!("no counter {name} in {v}");
}

#[test]
fn agent_attaches_and_counts_exactly_the_packets_sent() {
    if !privileged("agent_attaches_and_counts_exactly_the_packets_sent") {
        return;
    }
    let mut lab = Lab::new("fd");
    let node = lab.netns("node");
    let peer = lab.netns("peer");
    node.ip(&[
        "link", "add", "und0", "type", "veth", "peer", "name", "und0", "netns", &peer.name,
    ]);
    for (ns, me, other, other_mac) in [
        (&node, "198.18.0.1", "198.18.0.2", "02:00:00:00:00:02"),
        (&peer, "198.18.0.2", "198.18.0.1", "02:00:00:00:00:01"),
    ] {
        let my_mac = if me.ends_with(".1") {
            "02:00:00:00:00:01"
        } else {
            "02:00:00:00:00:02"
        };
        ns.ip(&["link", "set", "und0", "address", my_mac]);
        ns.ip(&["addr", "add", &format!("{me}/24"), "dev", "und0"]);
        ns.ip(&["link", "set", "und0", "up"]);
        // Static neighbours: no ARP, so every packet on the wire is one we sent.
        ns.ip(&[
            "neigh",
            "replace",
            other,
            "lladdr",
            other_mac,
            "dev",
            "und0",
            "nud",
            "permanent",
        ]);
    }
    peer.ip(&["route", "add", "198.19.0.0/16", "via", "198.18.0.1"]);
    let nodes_file = lab.dir.join("nodes.toml");
    std::fs::write(
        &nodes_file,
        "[[node]]\nname = \"n1\"\nunderlay_ip = \"198.18.0.1\"\npod_cidr = \"198.19.1.0/24\"\n",
    )
    .unwrap();
    let bpffs = lab.bpffs().join("n1");
    let run = lab.dir.join("run");
    let mut cmd = node.command(weft_bin());
    cmd.args([
        "agent",
        "--node-name",
        "n1",
        "--iface",
        "und0",
        // XDP, not the TC decap `auto` picks on a veth: this test counts
        // what passes through XDP.
        "--decap",
        "xdp",
        "--cluster-cidr",
        "198.19.0.0/16",
        "--nodes-file",
    ])
    .arg(&nodes_file)
    .arg("--bpffs-dir")
    .arg(&bpffs)
    .arg("--run-dir")
    .arg(&run);
    lab.spawn("agent", cmd);
    wait_for("agent ready", Duration::from_secs(20), || {
        run.join("subnet.env").exists().then_some(())
    });
    let ip_link = node.ip(&["link", "show", "und0"]);
    assert!(
        ip_link.contains("prog/xdp"),
        "no XDP program on und0: {ip_link}"
    );

    // XDP on the underlay: 50 echo requests in, each passes through once.
    let before = counter(&node, &bpffs, &run, "passthrough");
    peer.sh("ping", &["-c", "50", "-i", "0.01", "-q", "198.18.0.1"]);
    assert_eq!(
        counter(&node, &bpffs, &run, "passthrough") - before,
        50,
        "XDP passthrough count"
    );

    // TC on weft0 egress: 20 UDP datagrams from the node into the cluster
    // CIDR where no node lives: each dropped once, as no_route. (Not ping:
    // it retries sends the device refused.)
    let before = counter(&node, &bpffs, &run, "no_route");
    {
        let _inside = InNetns::enter(&node);
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..20 {
            let _ = sock.send_to(b"nobody home", "198.19.77.1:9");
        }
    }
    assert_eq!(
        counter(&node, &bpffs, &run, "no_route") - before,
        20,
        "TC no_route count"
    );

    // TC on a pod's veth: 30 echo requests out of the pod (TC passthrough),
    // 30 replies back in on the underlay (XDP passthrough).
    let pod = lab.netns("pod");
    let out = node
        .command(weft_bin())
        .args(["endpoint", "add", "--netns"])
        .arg(pod.path())
        .args(["--id", "pod1", "--ip", "198.19.1.10", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "endpoint add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = counter(&node, &bpffs, &run, "passthrough");
    pod.sh("ping", &["-c", "30", "-i", "0.01", "-q", "198.18.0.2"]);
    assert_eq!(
        counter(&node, &bpffs, &run, "passthrough") - before,
        60,
        "TC + XDP passthrough count"
    );
    lab.stop("agent");
    let log = lab.log("agent");
    assert!(log.contains("ready"), "agent log: {log}");
}

#[test]
fn lab_leaves_nothing_behind_even_on_panic() {
    if !privileged("lab_leaves_nothing_behind_even_on_panic") {
        return;
    }
    let (prefix, bpffs) = std::panic::catch_unwind(|| {
        let mut lab = Lab::new("lk");
        let ns = lab.netns("x");
        ns.ip(&[
            "link", "add", "name", "leak-a", "type", "veth", "peer", "name", "leak-b",
        ]);
        let bpffs = lab.bpffs();
        let prefix = lab.prefix.clone();
        // Unwinding out of here must still run the lab's clean-up.
        std::panic::panic_any((prefix, bpffs));
    })
    .expect_err("the closure panics")
    .downcast::<(String, std::path::PathBuf)>()
    .map(|b| *b)
    .expect("payload");
    let netns = sh("ip", &["netns", "list"]);
    assert!(!netns.contains(&prefix), "namespaces left behind: {netns}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(bpffs.to_str().unwrap()),
        "bpffs left mounted at {}",
        bpffs.display()
    );
}
