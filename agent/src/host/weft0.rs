//! `weft0`: the node's own device for host → remote pod traffic. It holds
//! the pods' gateway address, and the cluster CIDR is routed into it, so the
//! node's traffic to pods on other nodes meets `weft_from_host` on its egress
//! (which encapsulates or drops every packet). A veth pair rather than a
//! dummy, so that it exists on kernels built without the dummy driver. ARP
//! is off on it: the program writes every MAC itself.

use std::net::IpAddr;

use crate::{
    host::{
        netlink::{LinkChange, Netlink, NetlinkError, Route, Veth},
        sysctl::{self, SysctlError},
    },
    node::{NodeV4, NodeV6},
};

/// The node's own device for host → remote pod traffic; holds the gateway
/// address. A veth pair (the peer is [`HOST_PEER`]) rather than a dummy, so it
/// exists on kernels built without the dummy driver.
pub const HOST_IFACE: &str = "weft0";
/// The other end of [`HOST_IFACE`]; the BPF program on weft0's egress
/// forwards or drops every packet, so nothing arrives here.
pub const HOST_PEER: &str = "weft0p";

/// Setting up `weft0` failed.
#[derive(Debug, thiserror::Error)]
pub enum Weft0Error {
    #[error("setting up {HOST_IFACE}: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("setting up {HOST_IFACE}: {0}")]
    Sysctl(#[from] SysctlError),
    #[error(
        "setting up {HOST_IFACE}: it vanished while being set up; the agent's next check makes it again"
    )]
    Gone,
}

/// Sets up `weft0` for the node's pod CIDRs (`v4`'s, `v6`'s or both's:
/// the gateway addresses, the routes to the cluster networks), with pod MTU
/// `mtu`, and the forwarding sysctls (`underlay`'s reverse-path filter
/// included). Idempotent: also what puts it back when something removed
/// it.
pub fn setup(
    v4: Option<&NodeV4>,
    v6: Option<&NodeV6>,
    mtu: u32,
    underlay: &str,
) -> Result<(), Weft0Error> {
    let mut nl = Netlink::open()?;
    if nl.link(HOST_IFACE)?.is_none() {
        nl.add_veth(&Veth {
            name: HOST_IFACE,
            mac: None,
            mtu: Some(mtu),
            peer: HOST_PEER,
            peer_mac: None,
            peer_mtu: Some(mtu),
            peer_netns: None,
        })?;
    }
    let mut host_index = 0;
    for dev in [HOST_IFACE, HOST_PEER] {
        // IPv6 only where it carries the node's IPv6 pod traffic.
        let off = if dev == HOST_IFACE && v6.is_some() {
            "0"
        } else {
            "1"
        };
        let _ = sysctl::set(&format!("net.ipv6.conf.{dev}.disable_ipv6"), off);
        let link = nl.link(dev)?.ok_or(Weft0Error::Gone)?;
        nl.set_link(
            link.index,
            &LinkChange {
                up: Some(true),
                mtu: Some(mtu),
                noarp: Some(true),
                alias: None,
            },
        )?;
        if dev == HOST_IFACE {
            host_index = link.index;
        }
    }
    if let Some(v4) = v4 {
        nl.replace_address(host_index, IpAddr::V4(v4.gateway), 32)?;
        nl.replace_route(&Route {
            dst: IpAddr::V4(v4.network.addr()),
            prefix: v4.network.prefix(),
            oif: Some(host_index),
            gateway: None,
            src: Some(IpAddr::V4(v4.gateway)),
            scope_link: true,
            mtu: Some(mtu),
        })?;
    }
    if let Some(v6) = v6 {
        nl.replace_address(host_index, IpAddr::V6(v6.gateway), 128)?;
        nl.replace_route(&Route {
            dst: IpAddr::V6(v6.network.addr()),
            prefix: v6.network.prefix(),
            oif: Some(host_index),
            gateway: None,
            src: Some(IpAddr::V6(v6.gateway)),
            scope_link: false,
            mtu: Some(mtu),
        })?;
        sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
        // Decapsulated IPv6 for the node itself (its gateway address) goes
        // up the stack on the underlay device, which drops IPv6 where it
        // is turned off.
        sysctl::set(&format!("net.ipv6.conf.{underlay}.disable_ipv6"), "0")?;
    }
    sysctl::set("net.ipv4.ip_forward", "1")?;
    // Decapsulated packets arrive on the underlay from pod sources routed via
    // weft0: loose reverse-path filtering accepts them.
    for dev in [underlay, HOST_IFACE] {
        sysctl::set(&format!("net.ipv4.conf.{dev}.rp_filter"), "2")?;
    }
    Ok(())
}

/// Deletes `weft0` (its routes go with it); true if there was one.
pub fn remove() -> bool {
    Netlink::open()
        .and_then(|mut nl| nl.del_link_named(HOST_IFACE))
        .unwrap_or(false)
}
