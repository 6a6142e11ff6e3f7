//! `weft agent`: brings the node's dataplane up and keeps its maps equal to
//! the registry's view of the cluster.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use weft_common::VXLAN_OVERHEAD;

use crate::{
    cidr::Ipv4Cidr,
    dataplane::{self, Dataplane, DataplaneError, Globals, Maps},
    ip::{self, CmdError},
    netdev::{self, NetdevError},
    node::{NodeConfig, NodeConfigError},
    registry::{self, Node, RegistryError},
    stats, sync,
};

/// The node's own device for host → remote pod traffic; holds the gateway
/// address. A veth pair (the peer is [`HOST_PEER`]) rather than a dummy, so it
/// exists on kernels built without the dummy driver.
pub const HOST_IFACE: &str = "weft0";
/// The other end of [`HOST_IFACE`]; the BPF program on weft0's egress
/// forwards or drops every packet, so nothing arrives here.
pub const HOST_PEER: &str = "weft0p";

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub iface: Option<String>,
    pub iface_regex: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub nodes_file: PathBuf,
    pub cluster_cidr: Ipv4Cidr,
    pub vni: u32,
    pub port: u16,
    pub bpffs_dir: PathBuf,
    pub run_dir: PathBuf,
    pub stats_interval: Option<Duration>,
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    NodeConfig(#[from] NodeConfigError),
    #[error("--vni {0} is out of range: VXLAN VNIs are 1 to 16777215")]
    Vni(u32),
    #[error("underlay MTU {0} is too small for VXLAN (needs at least {min})", min = 68 + VXLAN_OVERHEAD)]
    Mtu(u32),
}

/// The underlay interface, picked like flannel: --iface, else the first
/// interface matching --iface-regex, else the default route's interface.
pub fn underlay(cfg: &AgentConfig) -> Result<(netdev::Interface, Ipv4Addr), NetdevError> {
    let name = match (&cfg.iface, &cfg.iface_regex) {
        (Some(n), _) => n.clone(),
        (None, Some(re)) => pick_by_pattern(re)?,
        (None, None) => netdev::default_route_interface()?,
    };
    let iface = netdev::get(&name)?;
    let ip = cfg
        .public_ip
        .or(iface.ipv4)
        .ok_or_else(|| NetdevError::NoIpv4(name.clone()))?;
    Ok((iface, ip))
}

/// `--iface-regex`: a shell-style glob (`*`, `?`) over interface names that
/// have an IPv4 address, in address-list order.
fn pick_by_pattern(pattern: &str) -> Result<String, NetdevError> {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
            (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let addrs = netdev::addresses().map_err(|source| NetdevError::Io {
        name: "getifaddrs".into(),
        source,
    })?;
    addrs
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| glob(pattern.as_bytes(), n.as_bytes()))
        .ok_or_else(|| NetdevError::NoMatch(pattern.into()))
}

/// Sets up `weft0`: a device holding the gateway address, with the cluster
/// CIDR routed into it, so the node reaches remote pods through the BPF encap
/// on its egress. ARP is off on it: the program writes every MAC itself.
fn setup_host_iface(
    cfg: &AgentConfig,
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
        &cfg.cluster_cidr.to_string(),
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

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn log_problems(snap: &registry::Snapshot) {
    for p in &snap.problems {
        tracing::error!("node registry: {p}");
    }
}

/// Runs the agent until SIGINT/SIGTERM. The dataplane stays attached after
/// exit (it is pinned); `weft down` removes it.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    if !(1..=0xff_ffff).contains(&cfg.vni) {
        return Err(AgentError::Vni(cfg.vni));
    }
    dataplane::ensure_bpffs(&cfg.bpffs_dir)?;
    let (iface, local_ip) = underlay(&cfg)?;
    if iface.mtu < 68 + VXLAN_OVERHEAD {
        return Err(AgentError::Mtu(iface.mtu));
    }
    let pod_mtu = iface.mtu - VXLAN_OVERHEAD;
    tracing::info!(iface = %iface.name, %local_ip, mtu = iface.mtu, "underlay");

    // Wait until the registry lists this node: its pod CIDR comes from there.
    let (me, mut snap, mut seen) = loop {
        let seen = mtime(&cfg.nodes_file);
        match registry::read_file(&cfg.nodes_file, &cfg.cluster_cidr) {
            Ok(snap) => {
                log_problems(&snap);
                if let Some(me) = snap.nodes.iter().find(|n| n.name == cfg.node_name).cloned() {
                    break (me, snap, seen);
                }
                tracing::error!(node = %cfg.node_name, file = %cfg.nodes_file.display(), "this node is not in the node registry; add it (name, underlay_ip, pod_cidr). Retrying");
            }
            Err(e) => tracing::error!("{e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown_signal() => return Ok(()),
        }
    };
    if me.underlay_ip != local_ip {
        tracing::warn!(registry = %me.underlay_ip, detected = %local_ip, "the registry's underlay_ip for this node differs from the interface address; using the interface address");
    }
    let vtep_mac = me.vtep_mac;

    setup_host_iface(&cfg, &me.pod_cidr, pod_mtu, &iface.name)?;
    let globals = Globals {
        vni: cfg.vni,
        port: cfg.port,
        local_ip,
        underlay_ifindex: iface.index,
        vtep_mac,
        underlay_mac: iface.mac,
        cluster_cidr: cfg.cluster_cidr,
    };
    let mut dp = Dataplane::load(&globals, &cfg.bpffs_dir)?;
    let mode = dp.attach_xdp(&iface.name)?;
    dp.attach_host(HOST_IFACE)?;
    dp.pin_pod_program()?;
    tracing::info!(?mode, pins = %cfg.bpffs_dir.display(), "dataplane attached");

    let mut maps = Maps::open(&cfg.bpffs_dir)?;
    let c = sync::apply(
        &mut maps,
        &sync::desired(&with_local_ip(&snap.nodes, &me.name, local_ip), &me.name),
    )?;
    tracing::info!(
        nodes = snap.nodes.len(),
        upserts = c.upserts,
        removals = c.removals,
        "first sync written"
    );
    NodeConfig {
        node: me.name.clone(),
        network: cfg.cluster_cidr,
        subnet: me.pod_cidr,
        gateway: NodeConfig::gateway_of(&me.pod_cidr),
        mtu: pod_mtu,
        bpffs: cfg.bpffs_dir.clone(),
    }
    .write(&cfg.run_dir)?;
    tracing::info!(run_dir = %cfg.run_dir.display(), "ready");

    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut stats_tick =
        tokio::time::interval(cfg.stats_interval.unwrap_or(Duration::from_secs(3600)));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = poll.tick() => {
                let now = mtime(&cfg.nodes_file);
                if now == seen { continue; }
                seen = now;
                match registry::read_file(&cfg.nodes_file, &cfg.cluster_cidr) {
                    Ok(next) => {
                        log_problems(&next);
                        if !next.nodes.iter().any(|n| n.name == me.name) {
                            tracing::error!(node = %me.name, "this node disappeared from the registry; keeping the current dataplane state");
                            continue;
                        }
                        if let Some(n) = next.nodes.iter().find(|n| n.name == me.name) && n.pod_cidr != me.pod_cidr {
                            tracing::error!(old = %me.pod_cidr, new = %n.pod_cidr, "this node's pod CIDR changed; restart the agent to apply it");
                        }
                        snap = next;
                        match sync::apply(&mut maps, &sync::desired(&with_local_ip(&snap.nodes, &me.name, local_ip), &me.name)) {
                            Ok(c) => tracing::info!(nodes = snap.nodes.len(), upserts = c.upserts, removals = c.removals, "registry change applied"),
                            Err(e) => tracing::error!("applying registry change: {e}"),
                        }
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            }
            _ = stats_tick.tick(), if cfg.stats_interval.is_some() => {
                let c = stats::read(&maps.drops, &maps.fwds);
                println!("{}", crate::status::format_counters(&c));
            }
        }
    }
    tracing::info!("stopping; the dataplane stays attached (remove it with `weft down`)");
    Ok(())
}

/// The registry's nodes with this node's underlay address as detected.
fn with_local_ip(nodes: &[Node], me: &str, ip: Ipv4Addr) -> Vec<Node> {
    nodes
        .iter()
        .cloned()
        .map(|mut n| {
            if n.name == me {
                n.underlay_ip = ip;
            }
            n
        })
        .collect()
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `weft down`: detaches everything weft attached and removes its pins,
/// device, routes and files.
pub fn down(bpffs_dir: &Path, run_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    if bpffs_dir.exists() {
        // Removing a link's pin detaches it; maps go with their last reference.
        match std::fs::remove_dir_all(bpffs_dir) {
            Ok(()) => done.push(format!("removed pins under {}", bpffs_dir.display())),
            Err(e) => done.push(format!("could not remove {}: {e}", bpffs_dir.display())),
        }
    }
    if netdev::index(HOST_IFACE).is_some() && ip::ip(&["link", "del", HOST_IFACE]).is_ok() {
        done.push(format!("deleted {HOST_IFACE} and its routes"));
    }
    let env = run_dir.join(crate::node::SUBNET_ENV);
    if std::fs::remove_file(&env).is_ok() {
        done.push(format!("removed {}", env.display()));
    }
    done
}
