//! `flannel-compat` at start: weft takes over what flannel left on this node
//! ([`crate::host::flannel`] says what and why in this order). Each step
//! logs what it did; none stops the agent: a node that keeps flannel's
//! device still forwards its pods' traffic, through flannel's kernel state.

use std::net::Ipv4Addr;

use crate::{
    cidr::Ipv4Cidr,
    cni::{conflist::CniConf, ipam::Ipam},
    daemon::config::FlannelSettings,
    host::flannel,
};

/// After weft's decap is attached and its maps hold the cluster: flannel's
/// VXLAN device goes (with its routes, neighbours and FDB), and the pods on
/// its bridge are let reach weft's.
pub(super) fn remove_device(vni: u32, port: u16) {
    match flannel::remove_device(vni, port) {
        Ok(Some(dev)) => tracing::info!(
            device = %dev,
            "removed flannel's VXLAN device: its routes to other nodes' pods are weft0's now"
        ),
        Ok(None) => {}
        Err(e) => tracing::error!("{e}"),
    }
    match flannel::bridge_reaches_weft_pods() {
        Ok(true) => tracing::info!(
            bridge = flannel::BRIDGE,
            "flannel's pods on this node keep running on its bridge; they reach weft's pods here through the node (proxy ARP on the bridge)"
        ),
        Ok(false) => {}
        Err(e) => tracing::error!(
            "{e}: flannel's pods left on {} cannot reach weft's pods on this node until they are re-created",
            flannel::BRIDGE
        ),
    }
}

/// Before weft's conflist appears (and again once flannel's is moved aside,
/// for an ADD of flannel's that raced): the addresses flannel's host-local
/// IPAM gave this node's pods are reserved in weft's store, so the pods
/// keep them. Without an installed conflist weft does not know its store.
pub(super) fn adopt_addresses(
    f: &FlannelSettings,
    conf: Option<&CniConf>,
    subnet: &Ipv4Cidr,
    gateway: Ipv4Addr,
) {
    let Some(conf) = conf else {
        if f.ipam_dir.is_dir() {
            tracing::warn!(dir = %f.ipam_dir.display(), "flannel's pods' addresses are not reserved in weft's IPAM: without write-cni-conf-when-ready the agent does not know where weft's store is. Drain this node before pods are created on it through weft");
        }
        return;
    };
    let ipam = Ipam::new(conf.ipam_dir.clone(), *subnet, gateway);
    match ipam.lock().and_then(|l| l.adopt_host_local(&f.ipam_dir)) {
        Ok(ips) if ips.is_empty() => {}
        Ok(ips) => tracing::info!(
            from = %f.ipam_dir.display(),
            to = %conf.ipam_dir.display(),
            count = ips.len(),
            addresses = ?ips,
            "reserved the addresses of flannel's pods on this node: they keep running on cni0 with them until re-created"
        ),
        Err(e) => tracing::error!(
            "could not reserve flannel's pods' addresses ({e}): weft's IPAM may hand one of them to a new pod; drain this node"
        ),
    }
}

/// Once weft's conflist is in place: flannel's is moved aside (the runtime
/// takes the first conflist by name, and `10-flannel` sorts before
/// `10-weft`).
pub(super) fn disable_flannel_conflist(conf: &CniConf) -> bool {
    let moved = conf.disable_others("flannel");
    for m in &moved {
        tracing::info!(now = %m.display(), "moved flannel's CNI configuration aside: new pods on this node are weft's");
    }
    !moved.is_empty()
}
