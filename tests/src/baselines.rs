//! What weft is measured and tested against: pods on a Linux bridge as
//! flannel's CNI makes them, and nodes set up exactly as flannel's vxlan
//! backend sets them up.

use std::net::{Ipv4Addr, Ipv6Addr};

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
        fdb_append(&self.ns, remote_vtep, "flannel.1", &remote_ip.to_string());
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

/// What flanneld adds to a VXLAN device for a remote node: frames for its
/// VTEP MAC go to its underlay address.
fn fdb_append(ns: &Netns, mac: &str, dev: &str, dst: &str) {
    sh(
        "bridge",
        &["-n", &ns.name, "fdb", "append", mac, "dev", dev, "dst", dst],
    );
}

/// The IPv6 subnet of a flannel-style node's `subnet`: 2001:2:0:`subnet`::/64
/// (the labs' IPv6 pod CIDRs), as its network address.
fn subnet6(subnet: u8) -> String {
    format!("2001:2:0:{subnet:x}::")
}

/// flannel's IPv6 side (`EnableIPv6`) on a node [`FlannelNode`] set up:
/// `flannel-v6.<vni>` (VXLAN over the IPv6 underlay, nolearning, MTU
/// underlay − 70, UDP checksums as the kernel defaults them: sent, and
/// required on receive) holding the IPv6 subnet's network address, and
/// `cni0` the IPv6 gateway (`<subnet>::1`). Remote nodes are added with
/// [`FlannelNode6::add_remote`].
pub struct FlannelNode6 {
    pub ns: Netns,
    pub device: String,
    pub vtep_mac: String,
}

impl FlannelNode6 {
    /// `ns` must have `und0` with `underlay_ip6` and `cni0` already.
    pub fn new(ns: &Netns, underlay_ip6: Ipv6Addr, subnet: u8, vni: u32, port: u16) -> Self {
        let device = format!("flannel-v6.{vni}");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        let (vni, port, local) = (vni.to_string(), port.to_string(), underlay_ip6.to_string());
        ns.ip(&[
            "link",
            "add",
            &device,
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
        for dev in [device.as_str(), "cni0"] {
            ns.sysctl(
                &format!("net.ipv6.conf.{}.disable_ipv6", dev.replace('.', "/")),
                "0",
            );
        }
        ns.ip(&["link", "set", &device, "mtu", "1430", "up"]);
        let net = subnet6(subnet);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{net}/128"),
            "dev",
            &device,
            "nodad",
        ]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{net}1/64"),
            "dev",
            "cni0",
            "nodad",
        ]);
        ns.ip(&["link", "set", "cni0", "mtu", "1430"]);
        let link = ns.ip(&["-o", "link", "show", &device]);
        let vtep_mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("flannel-v6 device MAC")
            .to_string();
        Self {
            ns: ns.clone(),
            device,
            vtep_mac,
        }
    }

    /// What flanneld installs for a remote node's IPv6 side: an onlink route
    /// to its IPv6 subnet via the subnet's network address, a permanent
    /// neighbour for that address with its IPv6 VTEP MAC, and an FDB entry
    /// sending that MAC to its IPv6 underlay address.
    pub fn add_remote(&self, remote_ip6: Ipv6Addr, remote_subnet: u8, remote_vtep: &str) {
        let net = subnet6(remote_subnet);
        let dev = self.device.as_str();
        self.ns.ip(&[
            "-6",
            "neigh",
            "replace",
            &net,
            "lladdr",
            remote_vtep,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
        fdb_append(&self.ns, remote_vtep, dev, &remote_ip6.to_string());
        self.ns.ip(&[
            "-6",
            "route",
            "replace",
            &format!("{net}/64"),
            "via",
            &net,
            "dev",
            dev,
            "onlink",
        ]);
    }

    /// Gives `pod` (on this node's `cni0`) IPv6 address `<subnet>::<host>`
    /// and a default route via the gateway; returns the address.
    pub fn pod_address(&self, pod: &Netns, subnet: u8, host: u16) -> Ipv6Addr {
        for dev in ["all", "default", "eth0", "lo"] {
            pod.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0");
        }
        let net = subnet6(subnet);
        let ip: Ipv6Addr = format!("{net}{host:x}").parse().expect("IPv6 address");
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.ip(&["-6", "route", "add", "default", "via", &format!("{net}1")]);
        ip
    }
}
