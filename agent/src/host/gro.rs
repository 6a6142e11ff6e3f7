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

use crate::host::ip::{self, CmdError};

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
    Cmd { port: u16, source: CmdError },
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
    let err = |source| GroError::Cmd { port, source };
    match describe() {
        Some(d) if d.is_ok_for(port) => return Ok(Ensured::Present),
        Some(_) => {
            ip::ip(&["link", "del", GRO_IFACE]).map_err(err)?;
        }
        None => {}
    }
    let port_s = port.to_string();
    if let Err(e) = ip::ip(&[
        "link",
        "add",
        GRO_IFACE,
        "type",
        "vxlan",
        "external",
        "vnifilter",
        "dstport",
        &port_s,
        "nolearning",
    ]) {
        // An iproute2 without the keyword fails here; a kernel without the
        // attribute may ignore it (checked below).
        return Err(match e {
            CmdError::Failed { ref stderr, .. } if stderr.contains("vnifilter") => {
                GroError::Unsupported { port }
            }
            e => err(e),
        });
    }
    if !describe().is_some_and(|d| d.vnifilter) {
        remove();
        return Err(GroError::Unsupported { port });
    }
    // No IPv6 link-local address (nothing is ever sent through it).
    let _ = ip::sysctl(&format!("net.ipv6.conf.{GRO_IFACE}.disable_ipv6"), "1");
    // Up opens the socket: fails if another socket holds the port.
    if let Err(e) = ip::ip(&["link", "set", GRO_IFACE, "arp", "off", "up"]) {
        remove();
        return Err(err(e));
    }
    Ok(Ensured::Created)
}

/// The port [`GRO_IFACE`] holds for GRO, if it is there as [`ensure`]
/// makes it (for `weft status`).
pub fn held_port() -> Option<u16> {
    describe()?.held()
}

/// Deletes [`GRO_IFACE`]; true if there was one.
pub fn remove() -> bool {
    crate::host::netdev::index(GRO_IFACE).is_some() && ip::ip(&["link", "del", GRO_IFACE]).is_ok()
}

/// [`GRO_IFACE`] as `ip -d -j link show` describes it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Described {
    vxlan: bool,
    external: bool,
    vnifilter: bool,
    port: Option<u16>,
    up: bool,
}

impl Described {
    /// The port, if the device is as [`ensure`] makes it.
    fn held(&self) -> Option<u16> {
        (self.vxlan && self.external && self.vnifilter && self.up)
            .then_some(self.port)
            .flatten()
    }

    fn is_ok_for(&self, port: u16) -> bool {
        self.held() == Some(port)
    }
}

fn describe() -> Option<Described> {
    crate::host::netdev::index(GRO_IFACE)?;
    parse(&ip::ip(&["-d", "-j", "link", "show", "dev", GRO_IFACE]).ok()?)
}

fn parse(json: &str) -> Option<Described> {
    let links: serde_json::Value = serde_json::from_str(json).ok()?;
    let link = links.get(0)?;
    let info = &link["linkinfo"];
    let data = &info["info_data"];
    Some(Described {
        vxlan: info["info_kind"] == "vxlan",
        external: data["external"] == true,
        vnifilter: data["vnifilter"] == true,
        port: data["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
        up: link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_ip_says_of_the_device() {
        // `ip -d -j link show dev weft_gro` on Linux 6.18, iproute2 6.1.
        let held = r#"[{"ifindex":9,"ifname":"weft_gro","flags":["BROADCAST","MULTICAST","NOARP","UP","LOWER_UP"],"mtu":1500,"linkinfo":{"info_kind":"vxlan","info_data":{"external":true,"vnifilter":true,"port_range":{"low":0,"high":0},"port":8472,"learning":false}}}]"#;
        let d = parse(held).unwrap();
        assert!(d.is_ok_for(8472));
        assert!(!d.is_ok_for(4789), "another port must be replaced");
        // A kernel that ignored `vnifilter`, or a device left down.
        let plain = held.replace(r#""vnifilter":true,"#, "");
        assert!(!parse(&plain).unwrap().is_ok_for(8472));
        let down = held.replace(r#""UP","#, "");
        assert!(!parse(&down).unwrap().is_ok_for(8472));
        let other_kind = held.replace(r#""info_kind":"vxlan""#, r#""info_kind":"veth""#);
        assert!(!parse(&other_kind).unwrap().is_ok_for(8472));
        assert_eq!(parse("[]"), None);
    }
}
