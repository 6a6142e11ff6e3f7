//! Facts about network interfaces in the current network namespace.
//!
//! Read with `getifaddrs`/`ioctl` and `/proc/self/net`, which follow the
//! caller's network namespace (unlike `/sys/class/net`, which follows the
//! mount that `/sys` came from).

use std::{ffi::CString, fs, io, net::Ipv4Addr};

/// Errors finding or reading an interface.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error(
        "interface `{0}` does not exist in this network namespace; check the name with `ip link`"
    )]
    NotFound(String),
    #[error("interface `{0}` has no IPv4 address; give it one, or pass --public-ip")]
    NoIpv4(String),
    #[error("no default route to pick the underlay interface from; pass --iface NAME")]
    NoDefaultRoute,
    #[error("no interface matches --iface-regex `{0}`")]
    NoMatch(String),
    #[error("no interface has {0} (public-ipv6): give the node that address, or pass --iface NAME")]
    NoInterfaceWith(std::net::IpAddr),
    #[error(
        "interface `{0}` has no global IPv6 address for an IPv6-only node's underlay; give it one, or pass --public-ipv6"
    )]
    NoIpv6(String),
    #[error("no IPv6 default route to pick the underlay interface from; pass --iface NAME")]
    NoDefaultRoute6,
    #[error("reading interface `{name}`: {source}")]
    Io { name: String, source: io::Error },
}

/// One interface as weft needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// First IPv4 address, if any.
    pub ipv4: Option<Ipv4Addr>,
}

/// ifindex of `name`, or `None` if there is no such interface.
pub fn index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// `name`'s link as netlink reports it; `None` when there is none or it
/// cannot be read.
fn link(name: &str) -> Option<crate::host::netlink::Link> {
    crate::host::netlink::Netlink::open()
        .ok()?
        .link(name)
        .ok()?
}

/// `name`'s alias (`IFLA_IFALIAS`), if it has one.
pub fn alias(name: &str) -> Option<String> {
    link(name)?.alias
}

/// The id of the XDP program attached to `name` (any mode); `None` when
/// there is none or it cannot be read.
pub fn xdp_prog_id(name: &str) -> Option<u32> {
    link(name)?.xdp_prog_id
}

/// The interfaces with a qdisc other than `noqueue` (a veth's own) and
/// `clsact` (weft's, where TCX is missing): something shapes or filters
/// their traffic, e.g. the `bandwidth` CNI plugin (`tbf` at the root for
/// what goes into the pod, `ingress` with a filter to an `ifb` for what comes
/// out of it). From a netlink qdisc dump; `None` when it cannot be read.
pub fn shaped_interfaces() -> Option<std::collections::BTreeSet<String>> {
    let mut nl = crate::host::netlink::Netlink::open().ok()?;
    let qdiscs = nl.qdiscs().ok()?;
    let names: std::collections::HashMap<u32, String> = nl
        .links()
        .ok()?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    Some(shaped_in(&qdiscs, &names))
}

fn shaped_in(
    qdiscs: &[(u32, String)],
    names: &std::collections::HashMap<u32, String>,
) -> std::collections::BTreeSet<String> {
    qdiscs
        .iter()
        .filter(|(_, kind)| !matches!(kind.as_str(), "noqueue" | "clsact"))
        .filter_map(|(index, _)| names.get(index).cloned())
        .collect()
}

/// Reads `name`'s index, MAC, MTU and first IPv4 address.
pub fn get(name: &str) -> Result<Interface, NetdevError> {
    let index = index(name).ok_or_else(|| NetdevError::NotFound(name.into()))?;
    let io_err = |source| NetdevError::Io {
        name: name.into(),
        source,
    };
    let (mac, mtu) = mac_and_mtu(name).map_err(io_err)?;
    let ipv4 = addresses()
        .map_err(io_err)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a);
    Ok(Interface {
        name: name.into(),
        index,
        mac,
        mtu,
        ipv4,
    })
}

/// All (interface, IPv4 address) pairs.
pub fn addresses() -> io::Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr; family says which kind.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means it is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                // SAFETY: ifa_name is a NUL-terminated string.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
                out.push((
                    name.to_string_lossy().into_owned(),
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                ));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// An `ifreq` naming an interface, with a socket to ask the kernel about it
/// (the SIOCGIF* and SIOCETHTOOL ioctls). The socket closes when dropped.
struct IfReq {
    fd: std::os::fd::OwnedFd,
    req: libc::ifreq,
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new socket that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        Ok(Self { fd, req })
    }

    /// `ioctl(request)` on the ifreq, which the kernel reads and fills in.
    fn ioctl(&mut self, request: libc::Ioctl) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fd is a socket, req a valid ifreq; any pointer in it is the
        // caller's to keep valid for the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), request, &mut self.req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn mac_and_mtu(name: &str) -> io::Result<([u8; 6], u32)> {
    let mut q = IfReq::new(name)?;
    q.ioctl(libc::SIOCGIFHWADDR)?;
    let mut mac = [0u8; 6];
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let data = unsafe { q.req.ifr_ifru.ifru_hwaddr.sa_data };
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    q.ioctl(libc::SIOCGIFMTU)?;
    // SAFETY: SIOCGIFMTU filled ifru_mtu.
    let mtu = unsafe { q.req.ifr_ifru.ifru_mtu } as u32;
    Ok((mac, mtu))
}

/// Whether `name` is administratively up (`IFF_UP`, SIOCGIFFLAGS); `None`
/// when there is no such interface.
pub fn is_up(name: &str) -> Option<bool> {
    let mut q = IfReq::new(name).ok()?;
    q.ioctl(libc::SIOCGIFFLAGS).ok()?;
    // SAFETY: SIOCGIFFLAGS filled in ifru_flags.
    let flags = unsafe { q.req.ifr_ifru.ifru_flags };
    Some(flags & libc::IFF_UP as libc::c_short != 0)
}

/// The kernel driver behind `name` (`ethtool -i`'s "driver"), e.g. `veth`,
/// `virtio_net`, `mlx5_core`; `None` when the device does not say.
pub fn driver(name: &str) -> Option<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 4 * 5],
    };
    let mut q = IfReq::new(name).ok()?;
    q.req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // ifr_data points at `info`, which outlives the call.
    q.ioctl(libc::SIOCETHTOOL).ok()?;
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    let driver = String::from_utf8_lossy(&info.driver[..len]).into_owned();
    (!driver.is_empty()).then_some(driver)
}

/// Turns GRO on or off on `name` (the `ETHTOOL_SGRO` ioctl, as `ethtool -K
/// NAME gro on` does), in the caller's network namespace. On a veth it
/// gives the device NAPI, which XDP redirects into it need.
pub fn set_gro(name: &str, on: bool) -> io::Result<()> {
    /// `struct ethtool_value` (linux/ethtool.h).
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_SGRO: u32 = 0x2c;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: u32::from(on),
    };
    let mut q = IfReq::new(name)?;
    q.req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // ifr_data points at `value`, which outlives the call.
    q.ioctl(libc::SIOCETHTOOL)
}

/// A random locally administered unicast MAC, as the kernel gives a veth
/// (`eth_hw_addr_random`), chosen here so that it is known before the
/// device exists.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != 6 {
        // Not expected on Linux ≥ 3.17; a clock-derived value still works.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Every interface name in this network namespace (from /proc/self/net/dev,
/// which, unlike /sys/class/net, follows the caller's namespace).
pub fn names() -> Vec<String> {
    std::fs::read_to_string("/proc/self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The name of interface `index` in this network namespace.
pub fn name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The interface of the IPv4 default route, as flannel picks its underlay.
pub fn default_route_interface() -> Result<String, NetdevError> {
    let table = fs::read_to_string("/proc/self/net/route").map_err(|source| NetdevError::Io {
        name: "/proc/self/net/route".into(),
        source,
    })?;
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .next()
        .ok_or(NetdevError::NoDefaultRoute)
}

/// The interface of the IPv6 default route (an IPv6-only node's
/// underlay, as flannel picks it with IPv6 only).
pub fn default_route_interface6() -> Result<String, NetdevError> {
    let table =
        fs::read_to_string("/proc/self/net/ipv6_route").map_err(|source| NetdevError::Io {
            name: "/proc/self/net/ipv6_route".into(),
            source,
        })?;
    default_route6_in(&table).ok_or(NetdevError::NoDefaultRoute6)
}

/// The device of the first default route in `/proc/net/ipv6_route` text:
/// destination ::/0, not the kernel's unreachable entries on `lo`.
fn default_route6_in(table: &str) -> Option<String> {
    const ANY: &str = "00000000000000000000000000000000";
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 10 && f[0] == ANY && f[1] == "00" && f[9] != "lo").then(|| f[9].to_string())
        })
        .next()
}

/// The first global IPv6 address of interface `index` (not link-local,
/// loopback or multicast), in the kernel's order.
pub fn first_global_ipv6(index: u32) -> Result<Option<std::net::Ipv6Addr>, NetdevError> {
    let io = |e: crate::host::netlink::NetlinkError| NetdevError::Io {
        name: "address dump".into(),
        source: io::Error::other(e.to_string()),
    };
    let mut nl = crate::host::netlink::Netlink::open().map_err(io)?;
    Ok(nl
        .addresses()
        .map_err(io)?
        .into_iter()
        .filter(|(i, _, _)| *i == index)
        .find_map(|(_, a, _)| match a {
            std::net::IpAddr::V6(a) => crate::registry::Underlay6::check_ip(a).ok(),
            std::net::IpAddr::V4(_) => None,
        }))
}

/// The interface that holds address `ip` (an IPv6-only node's underlay,
/// picked by its --public-ipv6).
pub fn interface_with(ip: std::net::IpAddr) -> Result<String, NetdevError> {
    let io = |e: crate::host::netlink::NetlinkError| NetdevError::Io {
        name: "address dump".into(),
        source: io::Error::other(e.to_string()),
    };
    let mut nl = crate::host::netlink::Netlink::open().map_err(io)?;
    nl.addresses()
        .map_err(io)?
        .into_iter()
        .find(|(_, a, _)| *a == ip)
        .and_then(|(index, _, _)| name(index))
        .ok_or(NetdevError::NoInterfaceWith(ip))
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_to_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// The VTEP MAC weft uses for a node: locally administered, derived from the
/// underlay address so every node computes the same value for a peer.
pub fn vtep_mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0e, 0x77, o[0], o[1], o[2], o[3]]
}

/// [`vtep_mac_for`] an IPv6-only node: from the last four bytes of its
/// IPv6 underlay address (unique among nodes numbered in one subnet).
pub fn vtep_mac_for6(ip: std::net::Ipv6Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0e, 0x77, o[12], o[13], o[14], o[15]]
}

/// The VTEP MAC of a node that names none: from its IPv4 underlay address,
/// or on an IPv6-only node from its IPv6 one; none without either.
pub fn node_vtep_mac(ip: Option<Ipv4Addr>, ip6: Option<std::net::Ipv6Addr>) -> Option<[u8; 6]> {
    ip.map(vtep_mac_for).or(ip6.map(vtep_mac_for6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_default_route_s_device() {
        // As /proc/net/ipv6_route lists them: a link route, the default
        // route via a router, the kernel's unreachable default on lo.
        let table = "\
20010002000000ff0000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     und0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010002000000ff00000000000000fe 00000400 00000001 00000000 00000003     und0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(default_route6_in(table).as_deref(), Some("und0"));
        assert_eq!(default_route6_in(table.lines().last().unwrap()), None);
    }

    #[test]
    fn shaped_interfaces_from_the_qdisc_dump() {
        // After the bandwidth plugin shaped one pod both ways (tbf at the
        // root, ingress), with weft's clsact (no TCX) on another and a
        // veth's default elsewhere.
        let names: std::collections::HashMap<u32, String> = [
            (1, "lo"),
            (5, "weft00000000a1"),
            (6, "weft00000000a2"),
            (7, "weft00000000a3"),
            (8, "bwp1234"),
        ]
        .into_iter()
        .map(|(i, n)| (i, n.to_string()))
        .collect();
        let qdiscs: Vec<(u32, String)> = [
            (1, "noqueue"),
            (5, "tbf"),
            (5, "ingress"),
            (6, "noqueue"),
            (6, "clsact"),
            (7, "ingress"),
            (8, "tbf"),
            // A device gone since the links were listed.
            (9, "tbf"),
        ]
        .into_iter()
        .map(|(i, k)| (i, k.to_string()))
        .collect();
        assert_eq!(
            shaped_in(&qdiscs, &names).into_iter().collect::<Vec<_>>(),
            ["bwp1234", "weft00000000a1", "weft00000000a3"]
        );
    }

    #[test]
    fn mac_round_trip() {
        let mac = [0x0e, 0x77, 198, 18, 0, 1];
        assert_eq!(mac_to_string(&mac), "0e:77:c6:12:00:01");
        assert_eq!(parse_mac("0e:77:c6:12:00:01"), Some(mac));
        assert_eq!(parse_mac("0e:77:c6:12:00"), None);
        assert_eq!(parse_mac("0e:77:c6:12:00:zz"), None);
        assert_eq!(vtep_mac_for(Ipv4Addr::new(198, 18, 0, 1)), mac);
        // Locally administered, unicast.
        assert_eq!(mac[0] & 0x03, 0x02);
    }

    #[test]
    fn random_macs_are_local_unicast() {
        let a = random_mac();
        assert_eq!(a[0] & 0x03, 0x02, "{a:?}");
        assert_ne!(a, random_mac());
    }

    #[test]
    fn loopback_is_found() {
        let lo = get("lo").expect("every namespace has lo");
        assert_eq!(lo.index, 1);
        assert!(index("no-such-if0").is_none());
        assert!(matches!(get("no-such-if0"), Err(NetdevError::NotFound(_))));
    }
}
