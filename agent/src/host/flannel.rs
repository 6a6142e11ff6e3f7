//! What flannel leaves on a node, and weft taking it over
//! (`flannel-compat`, docs/MIGRATION.md).
//!
//! flannel's vxlan backend leaves, once flanneld is gone: `flannel.<VNI>`
//! (its VXLAN device, holding `<subnet>.0/32`, with a route, a neighbour and
//! an FDB entry per remote node), the `cni0` bridge (the gateway `.1/24`,
//! one veth per pod it wired), host-local's record of those pods' addresses
//! (`/var/lib/cni/networks/cbr0`), and its conflist in the runtime's
//! directory. weft, on such a node:
//!
//! - removes `flannel.<VNI>` once its own decap is attached and its maps
//!   hold the cluster: until then flannel's device and routes carry the
//!   node's traffic, from then on `weft0` does (its cluster-CIDR route is
//!   what remains once the more specific routes through flannel's device
//!   go with it). A device on another VNI or UDP port than weft's means the
//!   two cannot talk: it is left in place and reported;
//! - keeps `cni0`: the pods on it keep their addresses and connectivity.
//!   What arrives for them is decapsulated by weft and handed to the stack
//!   (an address of this node's pod CIDR without an endpoint), which
//!   delivers it through `cni0`; what they send is routed into `weft0` like
//!   the node's own traffic. They move to weft's fast path when re-created.
//!   They hold a /24 and ARP for the node's other pods directly, so the
//!   node answers on `cni0` for weft's pods (`proxy_arp`: it answers only
//!   for addresses routed elsewhere, the /32 of a weft pod's veth);
//! - reserves their addresses in weft's IPAM
//!   ([`crate::cni::ipam::Locked::adopt_host_local`]) before weft's conflist
//!   appears, and moves flannel's conflist aside once it has
//!   ([`crate::cni::conflist::CniConf::disable_others`]).

use crate::host::{
    netlink::{Link, Netlink, NetlinkError},
    sysctl,
};

/// The bridge flannel's CNI puts its pods on.
pub const BRIDGE: &str = "cni0";

/// Why flannel's device stays.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(
        "{device} (flannel's VXLAN device) uses VNI {vni} and UDP port {port}; weft's are VNI {our_vni}, port {our_port}: flannel nodes and weft nodes cannot reach each other. Set weft's vni and port to flannel's (net-conf.json Backend.VNI and Backend.Port, 1 and 8472 when unset) and restart the agent; {device} is left in place"
    )]
    Mismatch {
        device: String,
        vni: u32,
        port: u16,
        our_vni: u32,
        our_port: u16,
    },
    #[error("taking over flannel's devices: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("taking over flannel's bridge: {0}")]
    Sysctl(#[from] sysctl::SysctlError),
}

/// flannel's VXLAN devices on this node: links named `flannel.<N>` of kind
/// vxlan (its IPv6 one is `flannel-v6.<N>`).
fn devices(nl: &mut Netlink) -> Result<Vec<Link>, NetlinkError> {
    Ok(nl
        .links()?
        .into_iter()
        .filter(|l| {
            l.kind.as_deref() == Some("vxlan")
                && l.name
                    .strip_prefix("flannel.")
                    .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .collect())
}

/// Removes flannel's VXLAN device (its routes, neighbours and FDB entries
/// go with it) if it speaks weft's VNI and port; returns its name. Call it
/// once weft's decap is attached and its maps are filled.
pub fn remove_device(vni: u32, port: u16) -> Result<Option<String>, TakeoverError> {
    let mut nl = Netlink::open()?;
    let Some(dev) = devices(&mut nl)?.into_iter().next() else {
        return Ok(None);
    };
    let vx = dev.vxlan.unwrap_or_default();
    // The kernel's default port when flannel left it 0.
    let (their_vni, their_port) = (vx.vni.unwrap_or(0), vx.port.unwrap_or(8472));
    if their_vni != vni || their_port != port {
        return Err(TakeoverError::Mismatch {
            device: dev.name,
            vni: their_vni,
            port: their_port,
            our_vni: vni,
            our_port: port,
        });
    }
    // Its routes first, one at a time: each remote pod CIDR moves to weft0's
    // cluster route as its own route goes, while the device still carries
    // whatever is on its way out.
    for r in nl.routes(true)? {
        if r.oif == Some(dev.index) && r.gateway.is_some() {
            nl.del_route(&r)?;
        }
    }
    match nl.del_link(dev.index) {
        Err(e) if e.is_not_found() => Ok(None),
        r => r.map(|()| Some(dev.name)).map_err(Into::into),
    }
}

/// Lets the pods on flannel's bridge reach this node's weft pods: they are
/// on-link to them (a /24), so the node answers their ARP for those
/// addresses. True if there is such a bridge.
pub fn bridge_reaches_weft_pods() -> Result<bool, TakeoverError> {
    let mut nl = Netlink::open()?;
    match nl.link(BRIDGE)? {
        Some(l) if l.kind.as_deref() == Some("bridge") => {
            sysctl::set(&format!("net.ipv4.conf.{BRIDGE}.proxy_arp"), "1")?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_says_what_to_change() {
        let e = TakeoverError::Mismatch {
            device: "flannel.1".into(),
            vni: 1,
            port: 4789,
            our_vni: 1,
            our_port: 8472,
        };
        let m = e.to_string();
        assert!(
            m.contains("port 4789") && m.contains("Set weft's vni and port"),
            "{m}"
        );
    }
}
