//! `weft0`: the node's own device for host → remote pod traffic. It holds
//! the pods' gateway address, and the cluster CIDR is routed into it, so the
//! node's traffic to pods on other nodes meets `weft_from_host` on its egress
//! (which encapsulates or drops every packet). A veth pair rather than a
//! dummy, so that it exists on kernels built without the dummy driver. ARP
//! is off on it: the program writes every MAC itself.

use crate::{
    cidr::Ipv4Cidr,
    host::{
        ip::{self, CmdError},
        netdev,
    },
    node::NodeConfig,
};

/// The node's own device for host → remote pod traffic; holds the gateway
/// address. A veth pair (the peer is [`HOST_PEER`]) rather than a dummy, so it
/// exists on kernels built without the dummy driver.
pub const HOST_IFACE: &str = "weft0";
/// The other end of [`HOST_IFACE`]; the BPF program on weft0's egress
/// forwards or drops every packet, so nothing arrives here.
pub const HOST_PEER: &str = "weft0p";

/// Sets up `weft0` for pod CIDR `subnet` in `cluster`, with pod MTU `mtu`,
/// and the forwarding sysctls (`underlay`'s reverse-path filter included).
/// Idempotent: also what puts it back when something removed it.
pub fn setup(
    cluster: &Ipv4Cidr,
    subnet: &Ipv4Cidr,
    mtu: u32,
    underlay: &str,
) -> Result<(), CmdError> {
    if netdev::index(HOST_IFACE).is_none() {
        ip::ip(&[
            "link", "add", HOST_IFACE, "type", "veth", "peer", "name", HOST_PEER,
        ])?;
    }
    for dev in [HOST_IFACE, HOST_PEER] {
        let _ = ip::sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1");
        ip::ip(&[
            "link",
            "set",
            dev,
            "mtu",
            &mtu.to_string(),
            "arp",
            "off",
            "up",
        ])?;
    }
    let gw = NodeConfig::gateway_of(subnet);
    ip::ip(&["addr", "replace", &format!("{gw}/32"), "dev", HOST_IFACE])?;
    ip::ip(&[
        "route",
        "replace",
        &cluster.to_string(),
        "dev",
        HOST_IFACE,
        "src",
        &gw.to_string(),
        "mtu",
        &mtu.to_string(),
    ])?;
    ip::sysctl("net.ipv4.ip_forward", "1")?;
    // Decapsulated packets arrive on the underlay from pod sources routed via
    // weft0: loose reverse-path filtering accepts them.
    for dev in [underlay, HOST_IFACE] {
        ip::sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "2")?;
    }
    Ok(())
}

/// Deletes `weft0` (its routes go with it); true if there was one.
pub fn remove() -> bool {
    netdev::index(HOST_IFACE).is_some() && ip::ip(&["link", "del", HOST_IFACE]).is_ok()
}
