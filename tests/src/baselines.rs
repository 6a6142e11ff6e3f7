//! What weft is measured and tested against: pods on a Linux bridge as
//! flannel's CNI makes them, and nodes set up exactly as flannel's vxlan
//! backend sets them up.

use std::net::Ipv4Addr;

use crate::lab::{Lab, Netns, sh};

/// A pod attached to a Linux bridge by a veth, as flannel's CNI (bridge +
/// host-local) does: `<ip>/24` on eth0, default route via the bridge.
pub fn bridge_pod(
    lab: &mut Lab,
    node: &Netns,
    bridge: &str,
    name: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Netns {
    let pod = lab.netns(name);
    let host = format!("v{}", &name[name.len().saturating_sub(10)..]);
    let mtu = mtu.to_string();
    node.ip(&[
        "link", "add", &host, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu,
        "netns", &pod.name,
    ]);
    node.ip(&["link", "set", &host, "master", bridge, "up"]);
    pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", &gateway.to_string()]);
    pod
}

/// A node set up exactly as flannel's vxlan backend does it: `flannel.1`
/// (nolearning, MTU underlay − 50), its address the subnet's network
/// address, and the `cni0` bridge (gateway `.1`) for pods. Remote nodes are
/// added with [`FlannelNode::add_remote`].
pub struct FlannelNode {
    pub ns: Netns,
    pub subnet: u8,
    pub vtep_mac: String,
}

impl FlannelNode {
    /// `ns` must already be plugged into the underlay as `und0`.
    pub fn new(ns: &Netns, underlay_ip: Ipv4Addr, subnet: u8, vni: u32, port: u16) -> Self {
        Self::with_mac(ns, underlay_ip, subnet, vni, port, None)
    }

    /// [`FlannelNode::new`] with `flannel.1`'s MAC given (a flanneld that
    /// restarts takes the one stored in its Node's `backend-data`), else the
    /// kernel's random one; a `cni0` already there (pods still on it) is kept.
    pub fn with_mac(
        ns: &Netns,
        underlay_ip: Ipv4Addr,
        subnet: u8,
        vni: u32,
        port: u16,
        mac: Option<&str>,
    ) -> Self {
        ns.sysctl("net.ipv4.ip_forward", "1");
        let (vni, port, local) = (vni.to_string(), port.to_string(), underlay_ip.to_string());
        let mut add = vec!["link", "add", "flannel.1"];
        if let Some(m) = mac {
            add.extend(["address", m]);
        }
        add.extend([
            "type",
            "vxlan",
            "id",
            &vni,
            "local",
            &local,
            "dev",
            "und0",
            "dstport",
            &port,
            "nolearning",
        ]);
        ns.ip(&add);
        ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("198.19.{subnet}.0/32"),
            "dev",
            "flannel.1",
        ]);
        if !ns.try_sh("ip", &["link", "show", "cni0"]).status.success() {
            ns.ip(&["link", "add", "cni0", "type", "bridge"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("198.19.{subnet}.1/24"),
                "dev",
                "cni0",
            ]);
            ns.ip(&["link", "set", "cni0", "mtu", "1450", "up"]);
        }
        let link = ns.ip(&["-o", "link", "show", "flannel.1"]);
        let vtep_mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("flannel.1 MAC")
            .to_string();
        Self {
            ns: ns.clone(),
            subnet,
            vtep_mac,
        }
    }

    /// What flanneld installs for a remote node: neighbour, FDB entry, onlink route.
    pub fn add_remote(&self, remote_ip: Ipv4Addr, remote_subnet: u8, remote_vtep: &str) {
        let net = format!("198.19.{remote_subnet}.0");
        self.ns.ip(&[
            "neigh",
            "replace",
            &net,
            "lladdr",
            remote_vtep,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ]);
        sh(
            "bridge",
            &[
                "-n",
                &self.ns.name,
                "fdb",
                "append",
                remote_vtep,
                "dev",
                "flannel.1",
                "dst",
                &remote_ip.to_string(),
            ],
        );
        self.ns.ip(&[
            "route",
            "add",
            &format!("{net}/24"),
            "via",
            &net,
            "dev",
            "flannel.1",
            "onlink",
        ]);
    }
}
