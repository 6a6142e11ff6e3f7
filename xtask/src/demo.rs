//! `cargo xtask demo`: a 3-node weft cluster in network namespaces on this
//! machine, running the real agents; stays up until Ctrl-C or
//! `cargo xtask demo --down`.

use std::{path::Path, time::Duration};

use anyhow::Result;
use serde_json::Value;
use weft_tests::{Cluster, ClusterSpec, Lab, Netns, ping};

use crate::running::Running;

const RUNNING: Running = Running { name: "demo" };

fn say(msg: &str) {
    eprintln!("==> demo: {msg}");
}

/// What a killed demo left: its namespaces (with their processes), its
/// bpffs and directory.
fn clean(record: &Value) {
    weft_tests::lab::remove_leftovers(
        record["prefix"].as_str().unwrap_or_default(),
        Path::new(record["dir"].as_str().unwrap_or_default()),
        || {},
    );
}

pub fn up(weft: &Path) -> Result<()> {
    crate::install_stop_handler();
    // SAFETY: still single-threaded.
    unsafe { std::env::set_var("WEFT_BIN", weft) };

    let mut lab = Lab::new("demo");
    RUNNING.claim(
        serde_json::json!({"prefix": lab.prefix, "dir": lab.dir}),
        clean,
    )?;
    let spec = ClusterSpec::default();
    say(&format!(
        "creating the underlay bridge and {} nodes (network namespaces, each with a veth `und0`)",
        spec.nodes
    ));
    let mut cluster = Cluster::new(&mut lab, spec);
    cluster.launch_saying(&mut lab, say);

    println!(
        "\nTopology (underlay bridge in netns {}):",
        cluster.underlay.ns.name
    );
    for (i, n) in cluster.nodes.iter().enumerate() {
        let pods: Vec<String> = cluster
            .pods
            .iter()
            .filter(|p| p.node == i)
            .map(|p| format!("{} ({})", p.ip, p.ns.name))
            .collect();
        println!(
            "  {:<7} netns {:<14} underlay {:<11} pods {}  →  {}",
            n.name,
            n.ns.name,
            n.underlay_ip,
            n.pod_cidr,
            pods.join(", ")
        );
    }

    say("connectivity matrix (ping, 1 packet each)");
    let mut rows: Vec<(String, Netns)> = cluster
        .nodes
        .iter()
        .map(|n| (format!("{} host", n.name), n.ns.clone()))
        .collect();
    rows.extend(
        cluster
            .pods
            .iter()
            .map(|p| (p.ip.to_string(), p.ns.clone())),
    );
    print!("\n  {:<14}", "from \\ to");
    for p in &cluster.pods {
        print!(" {:>12}", p.ip.to_string());
    }
    println!();
    let mut failures = 0;
    for (label, ns) in &rows {
        print!("  {label:<14}");
        for p in &cluster.pods {
            let ok = ping(ns, p.ip, 1);
            failures += usize::from(!ok);
            print!(" {:>12}", if ok { "ok" } else { "FAIL" });
        }
        println!();
    }
    println!(
        "  ({} paths, {failures} failed)",
        rows.len() * cluster.pods.len()
    );

    say("iperf3 TCP, 3 s, pod on node-1 → pod on node-2");
    let server = cluster
        .pods
        .iter()
        .find(|p| p.node == 1)
        .expect("a pod on node-2")
        .clone();
    let client = cluster
        .pods
        .iter()
        .find(|p| p.node == 0)
        .expect("a pod on node-1")
        .clone();
    let mut cmd = server.ns.command("iperf3");
    cmd.args(["-s", "-1"]);
    lab.spawn("iperf3-server", cmd);
    std::thread::sleep(Duration::from_millis(300));
    // Placed as `cargo xtask bench` places it: left to the scheduler, client
    // and server sometimes share a CPU and the figure varies by a third.
    let pin = crate::bench::can_pin();
    let server_ip = server.ip.to_string();
    let mut args = vec!["-c", &server_ip, "-t", "3", "-J"];
    if pin {
        args.extend(crate::bench::PIN_IPERF);
    }
    let out = client.ns.try_sh("iperf3", &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => println!(
            "\n  {:.2} Gbit/s received{}\n  (`cargo xtask bench` measures weft against kernel vxlan and the bare underlay on this machine)",
            bps / 1e9,
            if pin {
                " (client on CPU 0, server on CPU 1)"
            } else {
                ""
            }
        ),
        None => println!(
            "\n  iperf3 failed: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
    }

    let n1 = &cluster.nodes[0];
    println!(
        "\nThe cluster is up. Try:\n  ip netns exec {pod} ping {ip}          # a pod pinging a pod on another node\n  ip netns exec {pod} bash                # a shell in a pod\n  nsenter --net=/run/netns/{node} {weft} status --bpffs-dir {bpffs} --run-dir {run}\n  ip netns exec {und} tcpdump -ni p1 udp port 8472    # VXLAN on node-1's underlay link\n\nCtrl-C here, or `cargo xtask demo --down` elsewhere, tears it all down.",
        pod = client.ns.name,
        ip = server.ip,
        node = n1.ns.name,
        weft = weft.display(),
        bpffs = n1.bpffs.display(),
        run = n1.run_dir.display(),
        und = cluster.underlay.ns.name,
    );
    while !crate::stopped() {
        std::thread::sleep(Duration::from_millis(200));
    }
    say("tearing down");
    drop(cluster);
    drop(lab);
    RUNNING.release();
    say("done: every namespace, process and pin the demo made is gone");
    Ok(())
}

/// Stops a running demo, or cleans up after one that died.
pub fn down() -> Result<()> {
    RUNNING.down(Duration::from_secs(30), clean, say)
}
