//! The topologies the bench measures: one per mode, each two nodes on a
//! bridged underlay with one pod each (node to node for `underlay`).

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Result, bail};
use weft_tests::{
    Cluster, ClusterSpec, FlannelNode, Lab, Netns, Underlay, UnderlayKind, bridge_pod, wait_for,
};

use super::measure::on_cpu;

/// The measured path: a client namespace, a server namespace and address.
pub(super) struct Path2 {
    pub(super) client: Netns,
    pub(super) server: Netns,
    pub(super) server_ip: Ipv4Addr,
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
        server_ip: Ipv4Addr::new(198, 19, 2, 10),
    }
}

pub(super) fn build(mode: &str, lab: &mut Lab, xtask: &Path, kind: UnderlayKind) -> Result<Path2> {
    Ok(match mode {
        "weft" | "weft-xdp" => {
            // `weft` runs the agent's defaults (`--decap auto`: TC on a veth
            // underlay); `weft-xdp` forces XDP decap.
            let mut spec = ClusterSpec {
                underlay: kind,
                ..ClusterSpec::pair()
            };
            if mode == "weft-xdp" {
                spec.agent_args = vec!["--decap".into(), "xdp".into()];
            }
            let c = Cluster::start(lab, spec);
            // The lab owns every namespace and process the cluster made.
            Path2 {
                client: c.pods[0].ns.clone(),
                server: c.pods[1].ns.clone(),
                server_ip: c.pods[1].ip,
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
                server_ip: Ipv4Addr::new(198, 18, 0, 2),
            }
        }
        other => bail!("unknown mode `{other}`"),
    })
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
