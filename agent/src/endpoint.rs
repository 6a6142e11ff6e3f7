//! Pod plumbing: a veth pair between the pod's network namespace and the
//! node, addresses and routes, the TC program on the host side and the
//! endpoint map entry. The CNI plugin and the tests both come through here.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use weft_common::Endpoint;

use crate::{
    cidr::{Ipv4Cidr, Ipv6Cidr},
    dataplane::{self, DataplaneError, Maps, TcMode, ip_key},
    host::{
        netdev,
        netlink::{LinkChange, Neighbour, Netlink, NetlinkError, Route, Veth},
        netns::{self, NetnsError},
    },
    node::NodeConfig,
};

/// Errors setting up or tearing down a pod's interface.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("network namespace {0} does not exist (was the pod deleted?)")]
    NetnsGone(PathBuf),
    #[error("{ip} is outside this node's pod CIDR {subnet}")]
    OutsideSubnet { ip: IpAddr, subnet: String },
    #[error(
        "{ip} is IPv6, but this node has no IPv6 pod CIDR (is the agent running with cluster-cidr6, and does the node have an IPv6 pod CIDR?)"
    )]
    NoIpv6 { ip: Ipv6Addr },
    #[error(
        "{ip} is IPv4, but this node has no IPv4 pod CIDR (its agent runs IPv6 only: enable-ipv4 = false)"
    )]
    NoIpv4 { ip: Ipv4Addr },
    #[error("turning IPv6 on for the pod's interface: {0}")]
    Ipv6Off(crate::host::sysctl::SysctlError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{ifname} is not in {netns} after it was created there")]
    PodSideMissing { ifname: String, netns: String },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("could not read the pod interface's MAC: {0}")]
    Mac(String),
    #[error("could not read the node's {what}: {source}")]
    KernelState {
        what: &'static str,
        source: NetlinkError,
    },
}

/// One pod attachment.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    /// Path of the pod's network namespace (e.g. /var/run/netns/x or /proc/PID/ns/net).
    pub netns: PathBuf,
    /// Interface name inside the pod (CNI_IFNAME, usually eth0).
    pub ifname: String,
    /// Host-side veth name.
    pub host_ifname: String,
    /// The pod's IPv4 address (none on an IPv6-only node).
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address, on a dual-stack or IPv6-only node.
    pub ip6: Option<Ipv6Addr>,
    /// Whether its veth is about to be shaped (the runtime passed bandwidth
    /// limits, which a `bandwidth` plugin after weft applies as qdiscs on the
    /// veth): its traffic then takes the node's stack from the first packet
    /// ([`Endpoint::FLAG_SHAPED`]). Without it the agent still finds the
    /// qdiscs, within [`crate::daemon::keeper::HOOK_CHECK_INTERVAL`].
    pub shaped: bool,
    /// How the pod's programs go on its veth ([`TcMode::pod`]: netlink
    /// filters, unless the `bandwidth` plugin will limit its egress).
    pub tc: TcMode,
}

/// What was set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub host_ifname: String,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
    pub host_ifindex: u32,
}

/// Host-side veth name for a container, like Cilium's `lxc<hash>`: stable per
/// (container, interface) and within IFNAMSIZ.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("weft{:010x}", h & 0xff_ffff_ffff)
}

/// Creates and wires the pod's interface. On any failure, what was created
/// is removed again, so a failed ADD leaves nothing behind.
pub fn add(spec: &EndpointSpec, node: &NodeConfig) -> Result<Attached, EndpointError> {
    if !spec.netns.exists() {
        return Err(EndpointError::NetnsGone(spec.netns.clone()));
    }
    if let Some(ip) = spec.ip {
        let v4 = node.v4.ok_or(EndpointError::NoIpv4 { ip })?;
        if !v4.subnet.contains(ip)
            || ip == v4.gateway
            || ip == v4.subnet.addr()
            || ip == v4.subnet.broadcast()
        {
            return Err(EndpointError::OutsideSubnet {
                ip: ip.into(),
                subnet: v4.subnet.to_string(),
            });
        }
    }
    if let Some(ip6) = spec.ip6 {
        let v6 = node.v6.ok_or(EndpointError::NoIpv6 { ip: ip6 })?;
        if !v6.subnet.contains(ip6) || ip6 == v6.gateway || ip6 == v6.subnet.addr() {
            return Err(EndpointError::OutsideSubnet {
                ip: ip6.into(),
                subnet: v6.subnet.to_string(),
            });
        }
    }
    let result = wire(spec, node);
    if result.is_err() {
        let _ = delete_link(&spec.host_ifname);
        dataplane::detach_pod(&node.bpffs, &spec.host_ifname);
    }
    result
}

fn wire(spec: &EndpointSpec, node: &NodeConfig) -> Result<Attached, EndpointError> {
    let host = spec.host_ifname.as_str();
    let mut nl = Netlink::open()?;
    // Stale leftovers of a crashed ADD for the same container.
    nl.del_link_named(host)?;
    // Both MACs are chosen here: each side's neighbour entry for the other
    // is written without reading anything back.
    let (host_mac, pod_mac) = (netdev::random_mac(), netdev::random_mac());
    let netns = std::fs::File::open(&spec.netns)
        .map_err(|_| EndpointError::NetnsGone(spec.netns.clone()))?;
    nl.add_veth(&Veth {
        name: host,
        mac: Some(host_mac),
        mtu: Some(node.mtu),
        peer: &spec.ifname,
        peer_mac: Some(pod_mac),
        peer_mtu: Some(node.mtu),
        peer_netns: Some(netns.as_raw_fd()),
    })?;
    // The pod side, from a thread inside its namespace: address, routes via
    // the gateway, and a permanent neighbour for the gateway (the host
    // veth's MAC), so no ARP is needed; the same for IPv6 on a dual-stack
    // node (no neighbour discovery either); GRO on, which gives its veth
    // NAPI, which XDP redirects into it need.
    let xdp_ok = netns::run_in(&spec.netns, || -> Result<bool, EndpointError> {
        let mut nl = Netlink::open()?;
        let eth = nl
            .link(&spec.ifname)?
            .ok_or_else(|| EndpointError::PodSideMissing {
                ifname: spec.ifname.clone(),
                netns: spec.netns.display().to_string(),
            })?;
        let up = LinkChange {
            up: Some(true),
            ..LinkChange::default()
        };
        nl.set_link(eth.index, &up)?;
        if let Some(lo) = nl.link("lo")? {
            nl.set_link(lo.index, &up)?;
        }
        if let (Some(ip), Some(v4)) = (spec.ip, &node.v4) {
            let gw = IpAddr::V4(v4.gateway);
            nl.replace_address(eth.index, IpAddr::V4(ip), 32)?;
            nl.replace_route(&Route::on_link(gw, 32, eth.index))?;
            nl.replace_route(&Route {
                dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                prefix: 0,
                oif: Some(eth.index),
                gateway: Some(gw),
                src: None,
                scope_link: false,
                mtu: None,
            })?;
            nl.replace_neighbour(eth.index, gw, host_mac)?;
        }
        if let (Some(ip6), Some(v6)) = (spec.ip6, &node.v6) {
            let gw6 = IpAddr::V6(v6.gateway);
            // A runtime may create the namespace with IPv6 off (as the
            // bridge plugin does, turned on for the interface it gives an
            // IPv6 address).
            enable_ipv6(&spec.ifname)?;
            // The pod's traffic to its own address takes `lo`.
            enable_ipv6("lo")?;
            nl.replace_address(eth.index, IpAddr::V6(ip6), 128)?;
            nl.replace_route(&Route::on_link(gw6, 128, eth.index))?;
            nl.replace_route(&Route {
                dst: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                prefix: 0,
                oif: Some(eth.index),
                gateway: Some(gw6),
                src: None,
                scope_link: false,
                mtu: None,
            })?;
            nl.replace_neighbour(eth.index, gw6, host_mac)?;
        }
        Ok(netdev::set_gro(&spec.ifname, true).is_ok())
    })??;
    let host_if = netdev::get(host).map_err(|e| EndpointError::Mac(e.to_string()))?;
    // The veth's alias says what it is, to people (`ip link`) and to
    // [`restore`], which cannot see the pod's side.
    nl.set_link(
        host_if.index,
        &LinkChange {
            up: Some(true),
            alias: Some(if xdp_ok { ALIAS_XDP } else { ALIAS }),
            ..LinkChange::default()
        },
    )?;
    // The node side: a /32 route to the pod through its veth, and the pod's
    // MAC as a permanent neighbour (no ARP on either side of the veth).
    if let Some(ip) = spec.ip {
        nl.replace_route(&Route::on_link(IpAddr::V4(ip), 32, host_if.index))?;
        nl.replace_neighbour(host_if.index, IpAddr::V4(ip), pod_mac)?;
    }
    if let Some(ip6) = spec.ip6 {
        enable_ipv6(host)?;
        nl.replace_route(&Route::on_link(IpAddr::V6(ip6), 128, host_if.index))?;
        nl.replace_neighbour(host_if.index, IpAddr::V6(ip6), pod_mac)?;
    }
    // The programs go in before the endpoint: the keeper checks the hooks
    // of every pod in the endpoints map, and must not find one half-wired.
    // Nothing runs in the pod yet (its containers start after ADD), so
    // `weft_from_pod` has nothing to drop meanwhile.
    let mut maps = Maps::open(&node.bpffs)?;
    dataplane::attach_pod(&node.bpffs, host, spec.tc)?;
    let flags = flags(xdp_ok, spec.shaped);
    if let Some(ip6) = spec.ip6 {
        put_endpoint(&mut maps, ip6.into(), &host_if, pod_mac, flags)?;
    }
    if let Some(ip) = spec.ip {
        put_endpoint(&mut maps, ip.into(), &host_if, pod_mac, flags)?;
    }
    Ok(Attached {
        host_ifname: host.into(),
        host_mac,
        pod_mac,
        host_ifindex: host_if.index,
    })
}

/// Turns IPv6 on for interface `ifname` of the caller's namespace.
fn enable_ipv6(ifname: &str) -> Result<(), EndpointError> {
    crate::host::sysctl::set(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "0")
        .map_err(EndpointError::Ipv6Off)
}

/// An entry's flags: whether XDP decap may redirect into the pod's veth,
/// and whether the veth is shaped.
fn flags(xdp_ok: bool, shaped: bool) -> u32 {
    let mut flags = 0;
    if xdp_ok {
        flags |= Endpoint::FLAG_XDP_REDIRECT;
    }
    if shaped {
        flags |= Endpoint::FLAG_SHAPED;
    }
    flags
}

/// Writes pod `ip`'s entry (in its family's map): behind `host_if`, with
/// MAC `pod_mac`.
fn put_endpoint(
    maps: &mut Maps,
    ip: IpAddr,
    host_if: &netdev::Interface,
    pod_mac: [u8; 6],
    flags: u32,
) -> Result<(), EndpointError> {
    let ep = Endpoint {
        ifindex: host_if.index,
        pod_mac,
        host_mac: host_if.mac,
        flags,
    };
    let (name, r) = match ip {
        IpAddr::V4(ip) => (
            weft_common::names::ENDPOINTS,
            maps.endpoints.insert(ip_key(ip), ep, 0),
        ),
        IpAddr::V6(ip) => (
            weft_common::names::ENDPOINTS6,
            maps.endpoints6.insert(ip.octets(), ep, 0),
        ),
    };
    r.map_err(|source| DataplaneError::Map { name, source })?;
    Ok(())
}

/// Whether pod `ip`'s entry is in its family's map.
fn has_endpoint(maps: &Maps, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => maps.endpoints.get(&ip_key(ip), 0).is_ok(),
        IpAddr::V6(ip) => maps.endpoints6.get(&ip.octets(), 0).is_ok(),
    }
}

/// Removes pod `ip`'s entry from its family's map, if there.
fn remove_endpoint(maps: &mut Maps, ip: IpAddr) {
    let _ = match ip {
        IpAddr::V4(ip) => maps.endpoints.remove(&ip_key(ip)),
        IpAddr::V6(ip) => maps.endpoints6.remove(&ip.octets()),
    };
}

/// Removes a pod's endpoint entries (`ips`: its addresses, either family),
/// link pin, routes and veth. Idempotent: whatever is already gone is
/// skipped.
pub fn del(host_ifname: &str, ips: &[IpAddr], node: &NodeConfig) -> Result<(), EndpointError> {
    // The pod's routes go with its veth. Only the endpoint maps a pod's
    // addresses are in are opened (a DEL is on the pod-deletion path).
    for ip in ips {
        let _ = match ip {
            IpAddr::V4(ip) => {
                dataplane::maps::endpoints(&node.bpffs).map(|mut m| m.remove(&ip_key(*ip)))
            }
            IpAddr::V6(ip) => {
                dataplane::maps::endpoints6(&node.bpffs).map(|mut m| m.remove(&ip.octets()))
            }
        };
    }
    // The veth first: its programs go down with it. Detaching a TCX link
    // from a live device would wait for a grace period, twice.
    delete_link(host_ifname)?;
    dataplane::forget_pod(&node.bpffs, host_ifname);
    Ok(())
}

/// Deletes `name` if it is there. A link gone meanwhile is no error: a
/// runtime may run two DELs of one pod at once (containerd did, for pods
/// deleted with no grace period), and the pod's namespace going takes its
/// veth with it.
pub fn delete_link(name: &str) -> Result<(), EndpointError> {
    match Netlink::open()?.del_link_by_name(name) {
        Err(e) if !e.is_not_found() => Err(e.into()),
        _ => Ok(()),
    }
}

/// The alias of a pod's host-side veth.
pub const ALIAS: &str = "weft pod";
/// The same, when the pod's side has NAPI (GRO on), so that XDP decap can
/// redirect into it ([`Endpoint::FLAG_XDP_REDIRECT`]).
pub const ALIAS_XDP: &str = "weft pod, xdp-redirect";

/// A pod address as the node's kernel shows it: the /32 (or /128) route
/// and the permanent neighbour [`add`] put on its host-side veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub ip: IpAddr,
    pub host_ifname: String,
    pub pod_mac: [u8; 6],
}

/// What [`restore`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Pods whose entry was missing and was put back.
    pub restored: usize,
    /// Pods whose entry was already there.
    pub present: usize,
}

/// Whether `name` is a host-side veth name from [`host_ifname`].
fn is_pod_ifname(name: &str) -> bool {
    name.len() == 14 && name.starts_with("weft") && name[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The node's pods in `subnet` (and, on a dual-stack node, `subnet6`),
/// from its routes and neighbours (`names` maps link indexes to names): a
/// pod address is one with both a host route (/32, /128) and a permanent
/// neighbour on the same weft host-side veth.
pub fn pods_in(
    routes: &[Route],
    neighbours: &[Neighbour],
    names: &std::collections::HashMap<u32, String>,
    subnet: Option<&Ipv4Cidr>,
    subnet6: Option<&Ipv6Cidr>,
) -> Vec<Found> {
    let pod_address = |ip: &IpAddr| match ip {
        IpAddr::V4(a) => subnet.is_some_and(|s| s.contains(*a)),
        IpAddr::V6(a) => subnet6.is_some_and(|s| s.contains(*a)),
    };
    let host_prefix = |ip: &IpAddr| if ip.is_ipv4() { 32 } else { 128 };
    let mut found: Vec<Found> = neighbours
        .iter()
        .filter_map(|n| {
            let ip = n.ip;
            let dev = names.get(&n.index)?;
            let routed = routes
                .iter()
                .any(|r| r.prefix == host_prefix(&ip) && r.dst == ip && r.oif == Some(n.index));
            (n.permanent && is_pod_ifname(dev) && pod_address(&ip) && routed).then(|| {
                Some(Found {
                    ip,
                    pod_mac: n.mac?,
                    host_ifname: dev.clone(),
                })
            })?
        })
        .collect();
    found.sort_by_key(|f| f.ip);
    found
}

/// Puts back the endpoint entry (and the pod programs) of every pod on
/// this node whose entry is missing from the endpoints map: after the map
/// was replaced (another version's layout) or its pin lost (bpffs
/// remounted), the node's routes and neighbours still say where each pod
/// is. Entries already there are left as they are. The XDP-redirect flag
/// comes from the veth's alias ([`ALIAS_XDP`]); a veth without one (made
/// by a version before the alias) gets it off: XDP decap then hands that
/// pod's packets to the stack, which delivers them by the pod's route.
pub fn restore(
    pin_dir: &Path,
    subnet: Option<&Ipv4Cidr>,
    subnet6: Option<&Ipv6Cidr>,
) -> Result<Restored, EndpointError> {
    let mut nl = Netlink::open()?;
    let kernel = |what: &'static str| move |source| EndpointError::KernelState { what, source };
    let mut routes = match subnet {
        Some(_) => nl.routes(true).map_err(kernel("routes"))?,
        None => Vec::new(),
    };
    if subnet6.is_some() {
        routes.extend(nl.routes(false).map_err(kernel("IPv6 routes"))?);
    }
    let neighbours = nl.neighbours().map_err(kernel("neighbours"))?;
    let names: std::collections::HashMap<u32, String> = nl
        .links()
        .map_err(kernel("links"))?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut maps = Maps::open(pin_dir)?;
    let shaped = netdev::shaped_interfaces().unwrap_or_default();
    // Veths with an `ingress` qdisc (the bandwidth plugin's) take TCX links.
    let with_ingress: BTreeSet<u32> = nl
        .qdiscs()
        .map_err(kernel("qdiscs"))?
        .into_iter()
        .filter(|(_, kind)| kind == "ingress")
        .map(|(index, _)| index)
        .collect();
    let mut done = Restored::default();
    for pod in pods_in(&routes, &neighbours, &names, subnet, subnet6) {
        if has_endpoint(&maps, pod.ip) {
            done.present += 1;
            continue;
        }
        let host_if = match netdev::get(&pod.host_ifname) {
            Ok(i) => i,
            // Gone since the listing (a DEL in between): nothing to restore.
            Err(e) => {
                tracing::info!(pod = %pod.ip, iface = %pod.host_ifname, "not restored: {e}");
                continue;
            }
        };
        let xdp_ok = netdev::alias(&pod.host_ifname).as_deref() == Some(ALIAS_XDP);
        let flags = flags(xdp_ok, shaped.contains(&pod.host_ifname));
        put_endpoint(&mut maps, pod.ip, &host_if, pod.pod_mac, flags)?;
        let mode = TcMode::pod(with_ingress.contains(&host_if.index));
        if !dataplane::pod_attached(pin_dir, &pod.host_ifname)
            && let Err(e) = dataplane::attach_pod(pin_dir, &pod.host_ifname, mode)
        {
            // Say a DEL removed the veth meanwhile; the others still count.
            remove_endpoint(&mut maps, pod.ip);
            tracing::warn!(pod = %pod.ip, iface = %pod.host_ifname, "not restored: {e}");
            continue;
        }
        tracing::info!(pod = %pod.ip, iface = %pod.host_ifname, "restored the pod's endpoint from its route and neighbour");
        done.restored += 1;
    }
    Ok(done)
}

/// A pod whose veth became shaped or unshaped, as [`sync_shaping`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapingChange {
    pub ip: IpAddr,
    pub host_ifname: String,
    pub shaped: bool,
}

/// Makes every entry's [`Endpoint::FLAG_SHAPED`] say whether its veth has a
/// qdisc other than its own ([`netdev::shaped_interfaces`]): the `bandwidth`
/// plugin's limits (or an operator's `tc qdisc add`) then apply, since the
/// pod's traffic takes the stack, and once they are removed the pod is back
/// on the fast paths. The flag is set at once but cleared only when two
/// checks in a row found no qdisc (`unshaped_before`: the veths, by
/// ifindex, the previous check found so, kept by the caller): the plugin
/// sets the flag at ADD, before the `bandwidth` plugin after it has made its
/// qdiscs. Each pod is decided by its IPv4 entry, or an IPv6-only pod by its
/// IPv6 one; a dual-stack pod's IPv6 entry follows its IPv4 one (same
/// veth). Returns what changed; nothing when the qdiscs cannot be read.
pub fn sync_shaping(maps: &mut Maps, unshaped_before: &mut BTreeSet<u32>) -> Vec<ShapingChange> {
    let Some(shaped) = netdev::shaped_interfaces() else {
        return Vec::new();
    };
    let entries: Vec<(IpAddr, Endpoint)> = maps
        .endpoints
        .iter()
        .filter_map(Result::ok)
        .map(|(k, ep)| (IpAddr::V4(dataplane::ip_from_key(k)), ep))
        .collect();
    let with_v4: BTreeSet<u32> = entries.iter().map(|(_, ep)| ep.ifindex).collect();
    let entries6: Vec<(IpAddr, Endpoint)> = maps
        .endpoints6
        .iter()
        .filter_map(Result::ok)
        .map(|(k, ep)| (IpAddr::V6(k.into()), ep))
        .collect();
    let (dual6, only6): (Vec<_>, Vec<_>) = entries6
        .into_iter()
        .partition(|(_, ep)| with_v4.contains(&ep.ifindex));
    let mut unshaped_now = BTreeSet::new();
    let mut changes = Vec::new();
    // Each IPv4 entry's flag as this check leaves it, by veth: what a
    // dual-stack pod's IPv6 entry follows.
    let mut shaped_by_veth = std::collections::HashMap::new();
    for (ip, mut ep) in entries.into_iter().chain(only6) {
        if let Some(host_ifname) = netdev::name(ep.ifindex) {
            let now = shaped.contains(&host_ifname);
            if ep.shaped() && !now {
                unshaped_now.insert(ep.ifindex);
            }
            if flip_shaped(ep.shaped(), now, unshaped_before.contains(&ep.ifindex)) {
                ep.flags ^= Endpoint::FLAG_SHAPED;
                // Only over an entry that is still there (BPF_EXIST): a DEL
                // since the listing must not be undone.
                if !put_existing(maps, ip, ep) {
                    continue;
                }
                changes.push(ShapingChange {
                    ip,
                    host_ifname,
                    shaped: now,
                });
            }
        }
        if ip.is_ipv4() {
            shaped_by_veth.insert(ep.ifindex, ep.shaped());
        }
    }
    *unshaped_before = unshaped_now;
    for (ip, mut ep) in dual6 {
        if let Some(&shaped) = shaped_by_veth.get(&ep.ifindex)
            && shaped != ep.shaped()
        {
            ep.flags ^= Endpoint::FLAG_SHAPED;
            put_existing(maps, ip, ep);
        }
    }
    changes
}

/// Rewrites pod `ip`'s entry (in its family's map) if it is still there;
/// whether it was.
fn put_existing(maps: &mut Maps, ip: IpAddr, ep: Endpoint) -> bool {
    match ip {
        IpAddr::V4(ip) => maps.endpoints.insert(ip_key(ip), ep, BPF_EXIST).is_ok(),
        IpAddr::V6(ip) => maps.endpoints6.insert(ip.octets(), ep, BPF_EXIST).is_ok(),
    }
}

/// Whether [`sync_shaping`] flips an entry's flag: set at once when its veth
/// has a qdisc, cleared when it has none now and had none at the check
/// before.
fn flip_shaped(flagged: bool, has_qdisc: bool, no_qdisc_before: bool) -> bool {
    match (flagged, has_qdisc) {
        (false, true) => true,
        (true, false) => no_qdisc_before,
        _ => false,
    }
}

/// `BPF_EXIST` (linux/bpf.h): update an element only if it exists.
const BPF_EXIST: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shaped_flag_is_set_at_once_and_cleared_after_two_checks() {
        // (flagged, qdisc now, no qdisc at the check before) → flip?
        assert!(flip_shaped(false, true, false), "a qdisc appeared: set");
        assert!(!flip_shaped(false, false, true), "nothing to do");
        assert!(!flip_shaped(true, true, true), "still shaped");
        // Flagged at ADD, the bandwidth plugin's qdiscs not there yet.
        assert!(
            !flip_shaped(true, false, false),
            "first check without: kept"
        );
        assert!(
            flip_shaped(true, false, true),
            "second check without: cleared"
        );
    }

    #[test]
    fn host_names_are_stable_and_short() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        assert!(a.len() < 16, "{a}");
        assert!(is_pod_ifname(&a), "{a}");
        assert!(!is_pod_ifname("weft0"));
    }

    #[test]
    fn pods_are_found_from_routes_and_permanent_neighbours() {
        let subnet: Ipv4Cidr = "198.19.1.0/24".parse().unwrap();
        let names: std::collections::HashMap<u32, String> = [
            (2, "und0"),
            (5, "weft00000000a5"),
            (6, "weft00000000a6"),
            (7, "weft00000000a7"),
            (8, "weft00000000a8"),
            (9, "eth9"),
            (15, "weft00000000ff"),
        ]
        .into_iter()
        .map(|(i, n)| (i, n.to_string()))
        .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let routes: Vec<Route> = [
            ("198.19.1.5", 5),
            ("198.19.1.6", 6),
            ("198.19.1.7", 7),
            ("198.19.2.8", 8),
            ("198.19.1.9", 9),
        ]
        .into_iter()
        .map(|(a, i)| Route::on_link(ip(a), 32, i))
        .chain([Route {
            dst: ip("0.0.0.0"),
            prefix: 0,
            oif: Some(2),
            gateway: Some(ip("198.18.0.254")),
            src: None,
            scope_link: false,
            mtu: None,
        }])
        .collect();
        let n = |a: &str, index: u32, last: u8, permanent: bool| Neighbour {
            index,
            ip: ip(a),
            mac: Some([2, 0, 0, 0, 0, last]),
            permanent,
        };
        let neighbours = [
            n("198.19.1.5", 5, 5, true),
            n("198.19.1.6", 6, 6, false),
            n("198.19.1.7", 15, 7, true),
            n("198.19.2.8", 8, 8, true),
            n("198.19.1.9", 9, 9, true),
        ];
        // Only .5 is a pod: .6's neighbour is not permanent, .7's is on
        // another device than its route, .8 is outside the subnet, .9 is
        // not behind a weft veth.
        assert_eq!(
            pods_in(&routes, &neighbours, &names, Some(&subnet), None),
            vec![Found {
                ip: "198.19.1.5".parse().unwrap(),
                host_ifname: "weft00000000a5".into(),
                pod_mac: [2, 0, 0, 0, 0, 5],
            }]
        );
        assert!(pods_in(&[], &[], &names, Some(&subnet), None).is_empty());
    }
}
