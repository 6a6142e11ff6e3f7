//! The topologies the bench measures: one per mode, each two nodes on a
//! bridged underlay with one pod each (node to node for `underlay`;
//! `weft-scale` is `weft` with a large cluster's state in the maps).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Result, bail};
use weft_tests::{
    Cluster, ClusterSpec, FlannelNode, FlannelNode6, ForeignNode, Lab, Netns, Underlay,
    UnderlayKind, bridge_pod, wait_for,
};

use super::measure::on_cpu;

/// The measured path: a client namespace, a server namespace and address.
pub(super) struct Path2 {
    pub(super) client: Netns,
    pub(super) server: Netns,
    pub(super) server_ip: IpAddr,
}

fn two_nodes(lab: &mut Lab, kind: UnderlayKind) -> (Underlay, Netns, Netns) {
    let und = Underlay::with_kind(lab, kind);
    let a = lab.netns("n1");
    let b = lab.netns("n2");
    und.plug(&a, 1);
    und.plug(&b, 2);
    (und, a, b)
}

/// One pod on each node's `cni0` (198.19.N.10, gateway .1), as flannel's CNI.
fn pods_on_cni0(lab: &mut Lab, a: &Netns, b: &Netns, mtu: u32) -> Path2 {
    let [pa, pb] = [(a, 1u8), (b, 2u8)].map(|(node, i)| {
        bridge_pod(
            lab,
            node,
            "cni0",
            &format!("p{i}"),
            Ipv4Addr::new(198, 19, i, 10),
            Ipv4Addr::new(198, 19, i, 1),
            mtu,
        )
    });
    Path2 {
        client: pa,
        server: pb,
        server_ip: Ipv4Addr::new(198, 19, 2, 10).into(),
    }
}

pub(super) fn build(mode: &str, lab: &mut Lab, xtask: &Path, kind: UnderlayKind) -> Result<Path2> {
    Ok(match mode {
        "weft" | "weft-xdp" | "weft-ipv6" | "weft-ipv6u" => {
            // `weft` runs the agent's defaults (`--decap auto`: TC on a veth
            // underlay); `weft-xdp` forces XDP decap; `weft-ipv6` is
            // dual-stack and measured over the pods' IPv6 addresses;
            // `weft-ipv6u` too, its nodes with IPv6 underlay addresses.
            let mut spec = ClusterSpec {
                underlay: kind,
                ..ClusterSpec::pair()
            };
            if mode == "weft-xdp" {
                spec.agent_args = vec!["--decap".into(), "xdp".into()];
            }
            if mode == "weft-ipv6" {
                spec = spec.dual_stack();
            }
            if mode == "weft-ipv6u" {
                spec = spec.underlay6();
            }
            let c = Cluster::start(lab, spec);
            let server = &c.pods[1];
            // The lab owns every namespace and process the cluster made.
            Path2 {
                client: c.pods[0].ns.clone(),
                server: server.ns.clone(),
                server_ip: server.ip6.map_or(server.ip.into(), IpAddr::V6),
            }
        }
        "weft-scale" => {
            let mut c = Cluster::new(
                lab,
                ClusterSpec {
                    underlay: kind,
                    ..ClusterSpec::pair()
                },
            );
            c.foreign = (0..SCALE_NODES - 2).map(remote_node).collect();
            c.launch(lab);
            for j in 1..SCALE_PODS {
                c.add_pod(lab, 1, j);
            }
            for i in 0..2 {
                let batch = lab.dir.join(format!("flows-{i}.batch"));
                fill_stack_flows(&c.nodes[i].bpffs, &c.pods, &batch)?;
            }
            let nodes = c.status(0)["nodes"].as_array().map_or(0, Vec::len);
            let pods = c.status(1)["endpoints"].as_array().map_or(0, Vec::len);
            if nodes != SCALE_NODES || pods != SCALE_PODS {
                bail!(
                    "weft-scale: node-1 knows {nodes} nodes (want {SCALE_NODES}), node-2 has {pods} pods (want {SCALE_PODS})"
                );
            }
            Path2 {
                client: c.pods[0].ns.clone(),
                server: c.pods[1].ns.clone(),
                server_ip: c.pods[1].ip.into(),
            }
        }
        "kernel-vxlan" => {
            let (_u, a, b) = two_nodes(lab, kind);
            let fa = FlannelNode::new(&a, Ipv4Addr::new(198, 18, 0, 1), 1, 1, 8472);
            let fb = FlannelNode::new(&b, Ipv4Addr::new(198, 18, 0, 2), 2, 1, 8472);
            fa.add_remote(Ipv4Addr::new(198, 18, 0, 2), 2, &fb.vtep_mac);
            fb.add_remote(Ipv4Addr::new(198, 18, 0, 1), 1, &fa.vtep_mac);
            pods_on_cni0(lab, &a, &b, 1450)
        }
        "kernel-vxlan6" => {
            // flannel with EnableIPv6: flannel-v6.1 over the IPv6 underlay
            // (flannel.1 beside it, as flanneld makes both).
            let (u, a, b) = two_nodes(lab, kind);
            let (a6, b6) = (u.plug6(&a, 1), u.plug6(&b, 2));
            let _fa = FlannelNode::new(&a, Ipv4Addr::new(198, 18, 0, 1), 1, 1, 8472);
            let _fb = FlannelNode::new(&b, Ipv4Addr::new(198, 18, 0, 2), 2, 1, 8472);
            let fa = FlannelNode6::new(&a, a6, 1, 1, 8472);
            let fb = FlannelNode6::new(&b, b6, 2, 1, 8472);
            fa.add_remote(b6, 2, &fb.vtep_mac);
            fb.add_remote(a6, 1, &fa.vtep_mac);
            let mut path = pods_on_cni0(lab, &a, &b, 1430);
            fa.pod_address(&path.client, 1, 0x10);
            path.server_ip = fb.pod_address(&path.server, 2, 0x10).into();
            path
        }
        "udp-userspace" | "host-gw" => {
            let (_u, a, b) = two_nodes(lab, kind);
            let mtu = if mode == "host-gw" { 1500 } else { 1472 };
            for (ns, i) in [(&a, 1u8), (&b, 2u8)] {
                ns.sysctl("net.ipv4.ip_forward", "1");
                ns.ip(&["link", "add", "cni0", "type", "bridge"]);
                ns.ip(&["addr", "add", &format!("198.19.{i}.1/24"), "dev", "cni0"]);
                ns.ip(&["link", "set", "cni0", "mtu", &mtu.to_string(), "up"]);
            }
            let path = pods_on_cni0(lab, &a, &b, mtu);
            if mode == "host-gw" {
                a.ip(&["route", "add", "198.19.2.0/24", "via", "198.18.0.2"]);
                b.ip(&["route", "add", "198.19.1.0/24", "via", "198.18.0.1"]);
            } else {
                for (ns, me, other) in [(&a, 1u8, 2u8), (&b, 2u8, 1u8)] {
                    let mut cmd = ns.command(xtask);
                    cmd.args([
                        "udp-forwarder",
                        "--tun",
                        "flannel0",
                        "--listen",
                        &format!("198.18.0.{me}:8285"),
                        "--route",
                        &format!("198.19.{other}.0/24=198.18.0.{other}:8285"),
                    ]);
                    let name = format!("udpfwd-{me}");
                    lab.spawn(&name, cmd);
                    wait_for("the UDP forwarder", Duration::from_secs(10), || {
                        lab.log(&name).contains("ready").then_some(())
                    });
                    ns.ip(&["link", "set", "flannel0", "mtu", "1472", "up"]);
                    ns.ip(&[
                        "addr",
                        "add",
                        &format!("198.19.{me}.0/16"),
                        "dev",
                        "flannel0",
                    ]);
                }
            }
            path
        }
        "underlay" => {
            let (_u, a, b) = two_nodes(lab, kind);
            Path2 {
                client: a,
                server: b,
                server_ip: Ipv4Addr::new(198, 18, 0, 2).into(),
            }
        }
        other => bail!("unknown mode `{other}`"),
    })
}

/// `weft-scale`: the nodes in the registry (the two real ones and
/// registry entries), pods on the receiving node (Kubernetes' default
/// maximum) and live entries in each node's stack-flows map.
pub const SCALE_NODES: usize = 5000;
pub const SCALE_PODS: usize = 110;
pub const SCALE_FLOWS: usize = 100_000;

/// Registry entry `i` of `weft-scale`: a node nothing is sent to
/// (underlay 198.18.64.0 on, a /29 of 198.19.16.0 on).
fn remote_node(i: usize) -> ForeignNode {
    let block = 16 * 256 + i * 8;
    ForeignNode {
        name: format!("remote-{i}"),
        underlay_ip: Ipv4Addr::new(198, 18, 64 + (i / 256) as u8, (i % 256) as u8),
        pod_cidr: format!("198.19.{}.{}/29", block / 256, block % 256),
        vtep_mac: format!("0e:77:c6:12:{:02x}:{:02x}", 64 + i / 256, i % 256),
        pod_cidr6: None,
        underlay6: None,
    }
}

/// Fills the stack-flows map pinned under `bpffs` with [`SCALE_FLOWS`]
/// live entries, as kube-proxy's Service replies would leave them: from the
/// `pods`' addresses to off-node backends (198.18.128.0/17, which nothing
/// measured talks to: the measured flows never match one), valid for an
/// hour. One `bpftool batch` of the commands written to `file` (the
/// bench's own process holds no BPF code).
fn fill_stack_flows(bpffs: &Path, pods: &[weft_tests::PodInfo], file: &Path) -> Result<()> {
    let map = bpffs.join("WEFT_STACKFLOWS");
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let expires = (now.tv_sec as u64 + 3600) * 1_000_000_000;
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut batch = String::with_capacity(SCALE_FLOWS * 160);
    for i in 0..SCALE_FLOWS {
        let pod = pods[i % pods.len()].ip.octets();
        let backend = [
            198,
            18,
            128 + (i / 65536 % 128) as u8,
            (i / 256 % 256) as u8,
        ];
        let sport = (1024 + (i % 60000) as u16).to_be_bytes();
        let (dport, proto) = if i % 3 == 0 { (53u16, 17u8) } else { (443, 6) };
        let mut key = Vec::with_capacity(16);
        key.extend(pod);
        key.extend(backend);
        key.extend(dport.to_be_bytes());
        key.extend(sport);
        key.extend([proto, 0, 0, 0]);
        let mut value = Vec::with_capacity(16);
        value.extend(expires.to_ne_bytes());
        value.extend([0u8; 8]);
        let _ = writeln!(
            batch,
            "map update pinned {} key hex {} value hex {}",
            map.display(),
            hex(&key),
            hex(&value)
        );
    }
    std::fs::write(file, batch)?;
    let out = std::process::Command::new("bpftool")
        .args(["batch", "file"])
        .arg(file)
        .output()?;
    let _ = std::fs::remove_file(file);
    if !out.status.success() {
        bail!(
            "bpftool batch (filling {}): {}",
            map.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // bpftool's plain dump ends "Found N elements".
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()?;
    let text = String::from_utf8_lossy(&dump.stdout);
    let found = text.lines().rev().find_map(|l| {
        l.strip_prefix("Found ")?
            .strip_suffix(" elements")?
            .parse::<usize>()
            .ok()
    });
    if found != Some(SCALE_FLOWS) {
        bail!(
            "{} holds {found:?} entries after filling, not {SCALE_FLOWS}",
            map.display()
        );
    }
    Ok(())
}

/// Starts the iperf3 and sockperf servers of `p` (owned by `lab`).
pub(super) fn serve(lab: &mut Lab, p: &Path2, pin: bool) {
    let mut srv = p.server.command("iperf3");
    srv.args(["-s", "--forceflush", "-B", &p.server_ip.to_string()]);
    lab.spawn("iperf3-server", srv);
    let mut sp = on_cpu(&p.server, pin, "1", "sockperf");
    sp.args([
        "server",
        "--tcp",
        "-i",
        &p.server_ip.to_string(),
        "-p",
        "11111",
    ]);
    lab.spawn("sockperf-server", sp);
    wait_for("iperf3 server", Duration::from_secs(10), || {
        lab.log("iperf3-server").contains("listening").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
}
