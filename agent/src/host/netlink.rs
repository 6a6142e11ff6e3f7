//! rtnetlink from the process itself: links (veth pairs, `weft_gro`'s
//! VXLAN device), addresses, routes, neighbours and qdiscs, as netavark and
//! youki do it, with `netlink-packet-route` for the messages and
//! `netlink-sys` for the socket. Every kernel answer is read as attributes,
//! never as a tool's text.
//!
//! A [`Netlink`] is a socket in the network namespace of the thread that
//! opened it: to work inside a pod's namespace, open one on a thread that
//! entered it ([`crate::host::netns::run_in`]).

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::RawFd,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    link::{
        InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
        LinkXdp,
    },
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
        RouteType,
    },
    tc::{TcAttribute, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(io::Error),
    #[error("{op}: {source}")]
    Kernel { op: String, source: io::Error },
    #[error("{op}: the kernel's answer could not be read: {message}")]
    Decode { op: String, message: String },
}

impl NetlinkError {
    /// The kernel's errno, when it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the kernel said the device (or entry) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH)
        )
    }
}

/// A link as weft reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    pub alias: Option<String>,
    /// The XDP program attached in any mode.
    pub xdp_prog_id: Option<u32>,
    /// `IFLA_INFO_KIND`: `veth`, `vxlan`, `bridge`, … (none for physical NICs).
    pub kind: Option<String>,
    /// For a VXLAN device, its settings.
    pub vxlan: Option<Vxlan>,
}

/// What weft reads of a VXLAN device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vxlan {
    /// `external` (collect metadata).
    pub external: bool,
    pub vnifilter: bool,
    pub port: Option<u16>,
    pub learning: bool,
    /// The VNI of a device that is not `external`.
    pub vni: Option<u32>,
}

/// A veth pair to create, its peer possibly in another namespace.
#[derive(Clone, Debug)]
pub struct Veth<'a> {
    pub name: &'a str,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub peer: &'a str,
    pub peer_mac: Option<[u8; 6]>,
    pub peer_mtu: Option<u32>,
    /// The namespace the peer is created in (an open nsfs file); none: here.
    pub peer_netns: Option<RawFd>,
}

/// What [`Netlink::set_link`] changes; `None` leaves a property as it is.
#[derive(Clone, Debug, Default)]
pub struct LinkChange<'a> {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    /// ARP off (`IFF_NOARP`).
    pub noarp: Option<bool>,
    pub alias: Option<&'a str>,
}

/// A route in the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    /// The preferred source address.
    pub src: Option<IpAddr>,
    /// `scope link` (reachable on the device, no gateway).
    pub scope_link: bool,
    pub mtu: Option<u32>,
}

impl Route {
    /// `dst/prefix dev oif scope link`.
    pub fn on_link(dst: IpAddr, prefix: u8, oif: u32) -> Self {
        Self {
            dst,
            prefix,
            oif: Some(oif),
            gateway: None,
            src: None,
            scope_link: true,
            mtu: None,
        }
    }
}

/// A neighbour entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub index: u32,
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

/// An rtnetlink socket (`NETLINK_ROUTE`) in the caller's network namespace.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

impl Netlink {
    /// Opens a socket in this thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind_auto().map_err(NetlinkError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends `msg` with `flags` and collects the kernel's answers: until its
    /// ACK for a request, until DONE for a dump.
    fn exchange(
        &mut self,
        op: &dyn Fn() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.header.length as usize];
        req.serialize(&mut buf);
        let kernel = |source| NetlinkError::Kernel { op: op(), source };
        self.sock.send(&buf, 0).map_err(kernel)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(kernel)?;
            let mut at = 0;
            while at + 16 <= data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..]).map_err(
                    |e| NetlinkError::Decode {
                        op: op(),
                        message: e.to_string(),
                    },
                )?;
                let len = msg.header.length as usize;
                at += (len.max(16) + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(kernel(io::Error::from_raw_os_error(-code.get()))),
                            // The ACK.
                            None => Ok(out),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    fn request(
        &mut self,
        op: &dyn Fn() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetlinkError> {
        self.exchange(op, msg, flags | NLM_F_ACK).map(drop)
    }

    fn dump(
        &mut self,
        op: &dyn Fn() -> String,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.exchange(op, msg, NLM_F_DUMP)
    }

    // ---- links

    /// The link named `name`; `None` when there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        match self.exchange(
            &|| format!("reading link {name}"),
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_ACK,
        ) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link in this namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        Ok(self
            .dump(
                &|| "listing links".into(),
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair; the peer goes straight into `peer_netns` when
    /// given, named and addressed as asked.
    pub fn add_veth(&mut self, v: &Veth) -> Result<(), NetlinkError> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(v.peer.into()));
        if let Some(mac) = v.peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = v.peer_mtu {
            peer.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(fd) = v.peer_netns {
            peer.attributes.push(LinkAttribute::NetNsFd(fd));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(v.name.into()));
        if let Some(mac) = v.mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = v.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            &|| format!("creating veth {} (peer {})", v.name, v.peer),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Creates `name`, a VXLAN device in `external` (collect-metadata) mode
    /// on UDP `port` without learning, with VNI filtering when `vnifilter`.
    /// A kernel that does not know VNI filtering ignores the attribute:
    /// read it back ([`Link::vxlan`]) to know.
    pub fn add_vxlan_external(
        &mut self,
        name: &str,
        port: u16,
        vnifilter: bool,
    ) -> Result<(), NetlinkError> {
        let mut data = vec![
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Port(port),
            InfoVxlan::Learning(false),
        ];
        if vnifilter {
            data.push(InfoVxlan::Vnifilter(true));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        self.request(
            &|| format!("creating VXLAN device {name} on port {port}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Changes link `index` as `c` says.
    pub fn set_link(&mut self, index: u32, c: &LinkChange) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if let Some(up) = c.up {
            msg.header.change_mask |= LinkFlags::Up;
            if up {
                msg.header.flags |= LinkFlags::Up;
            }
        }
        if let Some(noarp) = c.noarp {
            msg.header.change_mask |= LinkFlags::Noarp;
            if noarp {
                msg.header.flags |= LinkFlags::Noarp;
            }
        }
        if let Some(mtu) = c.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(alias) = c.alias {
            msg.attributes.push(LinkAttribute::IfAlias(alias.into()));
        }
        self.request(
            &|| format!("changing link {index} ({c:?})"),
            RouteNetlinkMessage::NewLink(msg),
            0,
        )
    }

    /// Deletes link `index` (a veth takes its peer with it).
    pub fn del_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(
            &|| format!("deleting link {index}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        )
    }

    /// Deletes the link named `name` in one request (ENODEV when there is
    /// none).
    pub fn del_link_by_name(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        self.request(
            &|| format!("deleting link {name}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        )
    }

    /// Deletes the link named `name`; true if there was one. One that goes
    /// meanwhile (its namespace removed, another deletion) is not an error.
    pub fn del_link_named(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name)? else {
            return Ok(false);
        };
        match self.del_link(link.index) {
            Err(e) if e.is_not_found() => Ok(false),
            r => r.map(|()| true),
        }
    }

    // ---- addresses

    /// Gives link `index` the address `ip/prefix` (replacing it if there).
    /// An IPv6 address skips duplicate address detection (`nodad`): it is
    /// weft's own on a link weft made, and usable at once rather than
    /// tentative for a second.
    pub fn replace_address(
        &mut self,
        index: u32,
        ip: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(&ip);
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip));
        msg.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv6() {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            &|| format!("adding address {ip}/{prefix} to link {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Every address: (link index, address, prefix length).
    pub fn addresses(&mut self) -> Result<Vec<(u32, IpAddr, u8)>, NetlinkError> {
        Ok(self
            .dump(
                &|| "listing addresses".into(),
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        a.attributes.iter().find_map(|at| match at {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some((a.header.index, ip, a.header.prefix_len))
                }
                _ => None,
            })
            .collect())
    }

    // ---- routes

    fn route_message(r: &Route) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(&r.dst);
        msg.header.destination_prefix_length = r.prefix;
        msg.header.table = libc::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if r.scope_link {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        if r.prefix > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_addr(r.dst)));
        }
        if let Some(oif) = r.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        if let Some(gw) = r.gateway {
            msg.attributes.push(RouteAttribute::Gateway(route_addr(gw)));
        }
        if let Some(src) = r.src {
            msg.attributes
                .push(RouteAttribute::PrefSource(route_addr(src)));
        }
        if let Some(mtu) = r.mtu {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        msg
    }

    /// Adds `r`, replacing a route to the same destination.
    pub fn replace_route(&mut self, r: &Route) -> Result<(), NetlinkError> {
        self.request(
            &|| format!("adding route {}/{} ({r:?})", r.dst, r.prefix),
            RouteNetlinkMessage::NewRoute(Self::route_message(r)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes `r`; gone already is no error.
    pub fn del_route(&mut self, r: &Route) -> Result<(), NetlinkError> {
        match self.request(
            &|| format!("deleting route {}/{}", r.dst, r.prefix),
            RouteNetlinkMessage::DelRoute(Self::route_message(r)),
            0,
        ) {
            Err(e) if e.errno() == Some(libc::ESRCH) || e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// The main table's routes of `v4` (else IPv6) destinations.
    pub fn routes(&mut self, v4: bool) -> Result<Vec<Route>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        Ok(self
            .dump(
                &|| "listing routes".into(),
                RouteNetlinkMessage::GetRoute(req),
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_from(r),
                _ => None,
            })
            .collect())
    }

    // ---- neighbours

    /// A permanent neighbour `ip → mac` on link `index` (replacing one there).
    pub fn replace_neighbour(
        &mut self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(&ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            &|| format!("adding neighbour {ip} on link {index}"),
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Every neighbour entry (ARP and NDP).
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>, NetlinkError> {
        Ok(self
            .dump(
                &|| "listing neighbours".into(),
                RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => {
                    let ip = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            Some(IpAddr::V4(*ip))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                            Some(IpAddr::V6(*ip))
                        }
                        _ => None,
                    })?;
                    let mac = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::LinkLayerAddress(m) => mac_of(m),
                        _ => None,
                    });
                    Some(Neighbour {
                        index: n.header.ifindex,
                        ip,
                        mac,
                        permanent: n.header.state == NeighbourState::Permanent,
                    })
                }
                _ => None,
            })
            .collect())
    }

    // ---- qdiscs

    /// Every qdisc: (link index, kind).
    pub fn qdiscs(&mut self) -> Result<Vec<(u32, String)>, NetlinkError> {
        Ok(self
            .dump(
                &|| "listing qdiscs".into(),
                RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) => {
                    let kind = q.attributes.iter().find_map(|a| match a {
                        TcAttribute::Kind(k) => Some(k.clone()),
                        _ => None,
                    })?;
                    Some((u32::try_from(q.header.index).ok()?, kind))
                }
                _ => None,
            })
            .collect())
    }
}

fn link_from(l: LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        ..Link::default()
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(m) => link.mac = mac_of(&m),
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::IfAlias(s) => link.alias = Some(s),
            LinkAttribute::Xdp(xdp) => {
                link.xdp_prog_id = xdp.iter().find_map(|x| match x {
                    LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                    _ => None,
                });
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut x = Vxlan {
                                learning: true,
                                ..Vxlan::default()
                            };
                            for a in v {
                                match a {
                                    InfoVxlan::CollectMetadata(b) => x.external = b,
                                    InfoVxlan::Vnifilter(b) => x.vnifilter = b,
                                    InfoVxlan::Port(p) => x.port = Some(p),
                                    InfoVxlan::Learning(b) => x.learning = b,
                                    InfoVxlan::Id(id) => x.vni = Some(id),
                                    _ => {}
                                }
                            }
                            link.vxlan = Some(x);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn route_from(r: RouteMessage) -> Option<Route> {
    if r.header.table != libc::RT_TABLE_MAIN {
        let in_attr = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        });
        if in_attr != Some(u32::from(libc::RT_TABLE_MAIN)) {
            return None;
        }
    }
    let ip_of = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    let unspecified = match r.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let mut route = Route {
        dst: unspecified,
        prefix: r.header.destination_prefix_length,
        oif: None,
        gateway: None,
        src: None,
        scope_link: r.header.scope == RouteScope::Link,
        mtu: None,
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => route.dst = ip_of(d)?,
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            RouteAttribute::Gateway(g) => route.gateway = ip_of(g),
            RouteAttribute::PrefSource(s) => route.src = ip_of(s),
            RouteAttribute::Metrics(m) => {
                route.mtu = m.iter().find_map(|m| match m {
                    RouteMetric::Mtu(v) => Some(*v),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(route)
}
