//! Start-up: the underlay is picked, the programs loaded and attached, the
//! node's devices, masquerade and `weft_gro` set up, the registry started.

use std::{net::Ipv4Addr, time::Duration};

use crate::{
    cidr::{Ipv4Cidr, Ipv6Cidr},
    daemon::{
        AgentError,
        config::{AgentConfig, DecapMode, RegistryKind},
    },
    dataplane::{self, Dataplane, Globals, Hook},
    host::{
        gro,
        netdev::{self, NetdevError},
        weft0::HOST_IFACE,
    },
    registry::{Published, Registry, file::FileRegistry},
};

/// The underlay interface, picked like flannel: --iface, else the first
/// interface matching --iface-regex, else the default route's interface
/// (on an IPv6-only node: the interface holding --public-ipv6, else the
/// IPv6 default route's); and this node's IPv4 underlay address (none on
/// an IPv6-only node, whose --public-ipv6, when not given, becomes the
/// interface's first global IPv6 address).
pub fn underlay(
    cfg: &mut AgentConfig,
) -> Result<(netdev::Interface, Option<Ipv4Addr>), NetdevError> {
    let ipv6_only = cfg.cluster_cidr.is_none();
    let name = match (&cfg.iface, &cfg.iface_regex, cfg.public_ipv6) {
        (Some(n), _, _) => n.clone(),
        (None, Some(re), _) => pick_by_pattern(re)?,
        (None, None, Some(ip6)) if ipv6_only => netdev::interface_with(ip6.into())?,
        (None, None, None) if ipv6_only => netdev::default_route_interface6()?,
        (None, None, _) => netdev::default_route_interface()?,
    };
    let iface = netdev::get(&name)?;
    if ipv6_only {
        if cfg.public_ipv6.is_none() {
            let ip6 = netdev::first_global_ipv6(iface.index)?
                .ok_or_else(|| NetdevError::NoIpv6(name.clone()))?;
            tracing::info!(iface = %name, ip6 = %ip6, "IPv6-only: the underlay interface's first global IPv6 address is this node's (set public-ipv6 for another)");
            cfg.public_ipv6 = Some(ip6);
        }
        return Ok((iface, None));
    }
    let ip = cfg
        .public_ip
        .or(iface.ipv4)
        .ok_or_else(|| NetdevError::NoIpv4(name.clone()))?;
    Ok((iface, Some(ip)))
}

/// `--iface-regex`: the first interface with an IPv4 address whose name
/// matches, in address-list order (flannel's `--iface-regex`).
fn pick_by_pattern(pattern: &str) -> Result<String, NetdevError> {
    let re = regex::Regex::new(pattern).map_err(|_| NetdevError::NoMatch(pattern.into()))?;
    let addrs = netdev::addresses().map_err(|source| NetdevError::Io {
        name: "getifaddrs".into(),
        source,
    })?;
    addrs
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| n != "lo" && re.is_match(n))
        .ok_or_else(|| NetdevError::NoMatch(pattern.into()))
}

/// Attaches the decap program where `mode` says, detaching the other one
/// (left pinned by a run in the other mode). Returns what is attached, for
/// the log: `xdp (Driver)`, `tc (underlay driver "veth")`, ...
pub(super) fn attach_decap(
    dp: &mut Dataplane,
    mode: DecapMode,
    iface: &str,
) -> Result<(Hook, String), AgentError> {
    let driver = netdev::driver(iface).unwrap_or_default();
    let xdp = match mode {
        DecapMode::Xdp => dp.attach_xdp(iface, false)?,
        // XDP on a veth makes its peer segment every GSO skb and the driver
        // copy each frame (drivers/net/veth.c): TC keeps the skb whole.
        DecapMode::Auto if driver == "veth" => None,
        DecapMode::Auto => dp.attach_xdp(iface, true)?,
        DecapMode::Tc => None,
    };
    dp.set_underlay_tc(iface, xdp.is_none())?;
    Ok(match xdp {
        Some(m) => (Hook::UnderlayXdp, format!("xdp ({m:?})")),
        None => {
            dp.detach_xdp();
            (Hook::UnderlayTc, format!("tc (underlay driver {driver:?})"))
        }
    })
}

/// Loads the programs with `globals` over the pinned maps and puts them in
/// place ([`load`], then [`attach`]). When the underlay is re-created.
pub(super) fn bring_up(
    cfg: &AgentConfig,
    globals: &Globals,
    underlay: &str,
    pod_cidr: Option<&Ipv4Cidr>,
    pod_cidr6: Option<&Ipv6Cidr>,
) -> Result<(Dataplane, Hook), AgentError> {
    let mut dp = load(cfg, globals)?;
    let hook = attach(&mut dp, cfg, underlay, pod_cidr, pod_cidr6)?;
    Ok((dp, hook))
}

/// Loads the programs with `globals` over the pinned maps (created and
/// pinned if missing); attaches nothing.
pub(super) fn load(cfg: &AgentConfig, globals: &Globals) -> Result<Dataplane, AgentError> {
    let mut dp = Dataplane::load(globals, &cfg.bpffs_dir)?;
    if cfg.bpf_debug_log {
        dataplane::spawn_bpf_logger(&mut dp.ebpf)?;
        tracing::debug!("BPF debug logging is on");
    }
    Ok(dp)
}

/// Puts the loaded programs in place: decap on `underlay`, `weft0`'s, the
/// pod programs (with the node's pods restored into the endpoints map
/// first, then their links re-pointed).
pub(super) fn attach(
    dp: &mut Dataplane,
    cfg: &AgentConfig,
    underlay: &str,
    pod_cidr: Option<&Ipv4Cidr>,
    pod_cidr6: Option<&Ipv6Cidr>,
) -> Result<Hook, AgentError> {
    let (decap_hook, decap) = attach_decap(dp, cfg.decap, underlay)?;
    dp.attach_host(HOST_IFACE)?;
    dp.pin_pod_programs()?;
    // Before re-pointing: the pods' links then run programs whose endpoints
    // map knows them (it may be new: replaced, or its pin lost).
    match crate::endpoint::restore(&cfg.bpffs_dir, pod_cidr, pod_cidr6) {
        Ok(r) if r.restored > 0 => {
            tracing::warn!(
                restored = r.restored,
                present = r.present,
                "the endpoints map was missing pods (new, replaced or its pin lost); restored them from the node's routes"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(
                "could not restore the node's pods into the endpoints map: {e}. Pods without an entry cannot send until they are re-created"
            );
        }
    }
    let repointed = dp.repoint_pods()?;
    tracing::info!(decap = %decap, pins = %cfg.bpffs_dir.display(), pods = repointed, "dataplane attached");
    Ok(decap_hook)
}

/// Masquerades pods' traffic leaving the cluster (or, with it off, removes
/// rules an earlier run installed). A failure is logged, not fatal: pods
/// still reach each other, only the way out is missing.
pub(super) fn set_up_masquerade(cfg: &AgentConfig) {
    if !cfg.ip_masq {
        if crate::host::masq::remove() {
            tracing::info!("--ip-masq=false: removed the masquerade rules of an earlier run");
        }
        return;
    }
    match crate::host::masq::install(&cfg.clusters()) {
        Ok(backend) => {
            tracing::info!(cluster = %cfg.clusters(), chain = crate::host::masq::CHAIN, ?backend, "masquerading pods' traffic leaving the cluster")
        }
        Err(e) => tracing::error!(
            "could not install the masquerade rules ({e}): pods cannot reach addresses outside the cluster; install iptables (with iptables-restore) or nftables (nft), or pass --ip-masq=false if something else masquerades"
        ),
    }
}

/// A started registry: what it publishes arrives on `snapshots`; `publish`
/// lets the `kube` registry publish this node's annotations (once the
/// dataplane is attached).
pub(super) struct Started {
    pub snapshots: tokio::sync::watch::Receiver<Published>,
    pub publish: tokio::sync::watch::Sender<bool>,
}

/// Starts the configured registry.
pub(super) fn spawn_registry(cfg: &AgentConfig, local_ip: Option<Ipv4Addr>) -> Started {
    let (publish, gate) = tokio::sync::watch::channel(false);
    let registry: Box<dyn Registry> = match cfg.registry {
        RegistryKind::File => Box::new(FileRegistry {
            path: cfg.nodes_file.clone(),
            cluster: cfg.clusters(),
            poll: Duration::from_millis(200),
        }),
        RegistryKind::Kube => {
            let mut r = crate::registry::kube::KubeRegistry::new(
                cfg.kubeconfig.clone(),
                cfg.node_name.clone(),
                cfg.clusters(),
            );
            // A node has an underlay address of one family at least.
            let mac = netdev::node_vtep_mac(local_ip, cfg.public_ipv6).unwrap_or_default();
            r.own = Some((local_ip, mac));
            r.own_ip6 = cfg.public_ipv6;
            r.flannel = cfg
                .flannel
                .as_ref()
                .map(|f| crate::registry::kube::FlannelCompat {
                    keys: f.keys.clone(),
                    vni: cfg.vni,
                });
            r.publish_when = Some(gate);
            Box::new(r)
        }
    };
    let (tx, snapshots) = tokio::sync::watch::channel(Published::default());
    tokio::spawn(registry.run(tx));
    Started { snapshots, publish }
}

/// [`gro::ensure`], tried for up to 2 s: a socket on the port that
/// was just closed (`weft down` and a new agent, a changed `--port`) may
/// hold it for a moment after its device is gone.
pub(super) async fn hold_gro_port(port: u16) -> Result<gro::Ensured, gro::GroError> {
    let mut tries = 0;
    loop {
        match gro::ensure(port) {
            Err(gro::GroError::Netlink { .. }) if tries < 4 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}
