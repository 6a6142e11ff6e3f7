//! `weft_gro`: a kernel VXLAN device that exists only to hold weft's UDP
//! port, so that the kernel's GRO merges VXLAN before weft decapsulates it.
//!
//! A NIC's driver hands each received frame to GRO, which merges a TCP
//! flow's segments into one skb before anything else sees them. For UDP it
//! merges tunnel packets only when a UDP tunnel socket with a GRO handler is
//! bound to their port (net/ipv4/udp_offload.c `udp_gro_receive`): the
//! kernel's vxlan device has one (drivers/net/vxlan `vxlan_gro_receive`),
//! weft, having no vxlan device, had none. So on a NIC, TC decap and the
//! pod's TCP saw every wire frame on its own, while kernel vxlan gets its
//! frames merged. With this socket, GRO merges VXLAN frames of one inner
//! flow into a GSO skb, which `weft_from_und` decapsulates once, as it does
//! the whole GSO skbs a veth underlay delivers. XDP decap runs before GRO
//! and gains nothing; a veth underlay without NAPI has no GRO at all. The
//! kernel also tells NIC drivers about the port (udp_tunnel_nic), as for any
//! vxlan device.
//!
//! The device must not receive anything itself: `external vnifilter` with no
//! VNI added, so `vxlan_rcv` finds no VNI and drops whatever reaches the
//! socket (VXLAN weft's decap leaves alone: outer fragments, another address
//! of the node) — as the closed port did before. A plain `external` device
//! would decapsulate those into the node's stack, past weft's checks of the
//! sender. VNI filtering needs Linux 5.18; where the kernel lacks it, there
//! is no such device and decap works per frame, as before.

use crate::host::{
    netlink::{LinkChange, Netlink, NetlinkError},
    sysctl,
};

/// The device's name (no dot: sysctl paths split on dots).
pub const GRO_IFACE: &str = "weft_gro";

/// Why there is no [`GRO_IFACE`].
#[derive(Debug, thiserror::Error)]
pub enum GroError {
    #[error(
        "this kernel cannot filter VXLAN VNIs (Linux 5.18 or later can); without that a device holding UDP port {port} would decapsulate into the node's stack, so there is none, and decap handles every received frame on its own"
    )]
    Unsupported { port: u16 },
    #[error(
        "could not hold UDP port {port} for VXLAN GRO ({source}); decap still works, per received frame. If another VXLAN device (flannel.1?) holds the port, it provides the GRO instead"
    )]
    Netlink { port: u16, source: NetlinkError },
}

/// What [`ensure`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    /// The device was there, as it should be.
    Present,
    /// It was missing (or wrong) and is now in place.
    Created,
}

/// Makes [`GRO_IFACE`] exist, up, holding `port`, with VNI filtering and no
/// VNIs. Replaces a device of that name that differs.
pub fn ensure(port: u16) -> Result<Ensured, GroError> {
    let err = |source| GroError::Netlink { port, source };
    let mut nl = Netlink::open().map_err(err)?;
    match nl.link(GRO_IFACE).map_err(err)? {
        Some(l) if held(&l) == Some(port) => return Ok(Ensured::Present),
        Some(l) => nl.del_link(l.index).map_err(err)?,
        None => {}
    }
    nl.add_vxlan_external(GRO_IFACE, port, true).map_err(err)?;
    // A kernel without VNI filtering (before 5.18) ignores the attribute:
    // the device would then decapsulate into the stack, so it goes again.
    let Some(link) = nl.link(GRO_IFACE).map_err(err)? else {
        return Err(GroError::Unsupported { port });
    };
    if !link.vxlan.is_some_and(|v| v.vnifilter) {
        let _ = nl.del_link(link.index);
        return Err(GroError::Unsupported { port });
    }
    // No IPv6 link-local address (nothing is ever sent through it).
    let _ = sysctl::set(&format!("net.ipv6.conf.{GRO_IFACE}.disable_ipv6"), "1");
    // Up opens the socket: fails if another socket holds the port.
    let up = LinkChange {
        up: Some(true),
        noarp: Some(true),
        ..LinkChange::default()
    };
    if let Err(e) = nl.set_link(link.index, &up) {
        let _ = nl.del_link(link.index);
        return Err(err(e));
    }
    Ok(Ensured::Created)
}

/// The port [`GRO_IFACE`] holds for GRO, if it is there as [`ensure`]
/// makes it (for `weft status`).
pub fn held_port() -> Option<u16> {
    held(&Netlink::open().ok()?.link(GRO_IFACE).ok()??)
}

/// Deletes [`GRO_IFACE`]; true if there was one.
pub fn remove() -> bool {
    Netlink::open()
        .and_then(|mut nl| nl.del_link_named(GRO_IFACE))
        .unwrap_or(false)
}

/// The port `link` holds, if it is a device as [`ensure`] makes it: VXLAN,
/// external, VNI filtering, up.
fn held(link: &crate::host::netlink::Link) -> Option<u16> {
    let v = link.vxlan?;
    (link.kind.as_deref() == Some("vxlan") && v.external && v.vnifilter && link.up)
        .then_some(v.port)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::netlink::{Link, Vxlan};

    #[test]
    fn only_a_device_as_ensure_makes_it_holds_the_port() {
        let ok = Link {
            name: GRO_IFACE.into(),
            up: true,
            kind: Some("vxlan".into()),
            vxlan: Some(Vxlan {
                external: true,
                vnifilter: true,
                port: Some(8472),
                learning: false,
                vni: None,
            }),
            ..Link::default()
        };
        assert_eq!(held(&ok), Some(8472));
        let mut plain = ok.clone();
        plain.vxlan.as_mut().unwrap().vnifilter = false;
        assert_eq!(held(&plain), None, "a kernel that ignored vnifilter");
        let mut down = ok.clone();
        down.up = false;
        assert_eq!(held(&down), None);
        let mut veth = ok.clone();
        veth.kind = Some("veth".into());
        assert_eq!(held(&veth), None);
        let mut not_external = ok;
        not_external.vxlan.as_mut().unwrap().external = false;
        assert_eq!(held(&not_external), None);
    }
}
