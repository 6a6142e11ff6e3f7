//! `weft agent`: brings the node's dataplane up and keeps its maps equal to
//! the registry's view of the cluster.
//!
//! - [`bringup`]: the underlay, the programs loaded and attached, the node's
//!   devices, the registry started;
//! - [`reconcile`]: a registry snapshot → the node-facing maps;
//! - [`keeper`]: every few seconds, puts back what something else removed;
//! - [`takeover`]: with `flannel-compat`, what flannel left on the node;
//! - [`config`]: the settings; [`metrics`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`down`]: `weft down`.

pub mod bringup;
pub mod config;
pub mod down;
pub mod keeper;
pub mod metrics;
pub mod reconcile;
pub mod takeover;

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::atomic::Ordering,
    time::Duration,
};

use weft_common::{VXLAN_OVERHEAD, VXLAN6_OVERHEAD};

use crate::{
    cni::conflist::{CniConf, CniConfError},
    daemon::{
        config::AgentConfig,
        keeper::{HOOK_CHECK_INTERVAL, Keeper},
        metrics::{AgentMetrics, Server},
        reconcile::{ReconcileError, Update, reconcile},
    },
    dataplane::{self, DataplaneError, Globals, Maps, stats},
    host::{
        gro::GroError,
        netdev::{self, NetdevError},
        weft0,
    },
    node::{NodeConfig, NodeConfigError, NodeV4, NodeV6},
    registry::{Published, file::RegistryError},
};

pub use down::down;

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Weft0(#[from] weft0::Weft0Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    NodeConfig(#[from] NodeConfigError),
    #[error(transparent)]
    CniConf(#[from] CniConfError),
    #[error("--vni {0} is out of range: VXLAN VNIs are 1 to 16777215")]
    Vni(u32),
    #[error("underlay MTU {0} is too small for VXLAN (needs at least {min}, {min6} over IPv6)", min = 68 + VXLAN_OVERHEAD, min6 = 68 + VXLAN6_OVERHEAD)]
    Mtu(u32),
    #[error("--iface-regex `{0}` is not a valid regular expression: {1}")]
    Regex(String, String),
    #[error("the kube registry: {0}")]
    Kube(String),
    #[error(transparent)]
    Settings(#[from] config::SettingsError),
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until SIGINT/SIGTERM. The dataplane stays attached after
/// exit (it is pinned); `weft down` removes it.
pub async fn run(mut cfg: AgentConfig) -> Result<(), AgentError> {
    if !(1..=0xff_ffff).contains(&cfg.vni) {
        return Err(AgentError::Vni(cfg.vni));
    }
    if let Some(re) = &cfg.iface_regex {
        regex::Regex::new(re).map_err(|e| AgentError::Regex(re.clone(), e.to_string()))?;
    }
    // Checked before anything is changed on the node.
    let cni_conf = CniConf::from_settings(
        cfg.read_cni_conf.as_deref(),
        cfg.write_cni_conf_when_ready.as_deref(),
    )?;
    dataplane::ensure_bpffs(&cfg.bpffs_dir)?;
    let (iface, local_ip) = bringup::underlay(&mut cfg)?;
    // Over an IPv6 underlay the outer header is 20 bytes longer; the pod's
    // one MTU fits both (flannel's does too, for flannel-v6.1).
    let overhead = if cfg.public_ipv6.is_some() {
        VXLAN6_OVERHEAD
    } else {
        VXLAN_OVERHEAD
    };
    if iface.mtu < 68 + overhead {
        return Err(AgentError::Mtu(iface.mtu));
    }
    let pod_mtu = iface.mtu - overhead;
    let shown = |ip: Option<String>| ip.unwrap_or_else(|| "none".into());
    tracing::info!(
        iface = %iface.name,
        local_ip = %shown(local_ip.map(|i| i.to_string())),
        local_ip6 = %shown(cfg.public_ipv6.map(|i| i.to_string())),
        mtu = iface.mtu,
        registry = ?cfg.registry,
        "underlay"
    );

    let metrics = AgentMetrics::default();
    let server = Server::new(&metrics, cfg.bpffs_dir.clone());
    let listener =
        std::net::TcpListener::bind(cfg.metrics_addr).map_err(|source| AgentError::Metrics {
            addr: cfg.metrics_addr,
            source,
        })?;
    let ready = server.ready.clone();
    let unhealthy = server.unhealthy.clone();
    tokio::spawn(async move {
        if let Err(e) = server.serve(listener).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });

    let bringup::Started {
        snapshots: mut rx,
        publish,
    } = bringup::spawn_registry(&cfg, local_ip);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    // Wait until the registry lists this node: its pod CIDR comes from there.
    let me = loop {
        {
            let p = rx.borrow_and_update();
            if p.generation == 0 {
                // Nothing read yet.
            } else if let Some(me) = p.nodes.get(&cfg.node_name) {
                break me.clone();
            } else {
                tracing::error!(node = %cfg.node_name, "this node is not in the node registry yet; add it (name, underlay IP, pod CIDR). Waiting");
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return Ok(()); },
            _ = &mut shutdown => return Ok(()),
        }
    };
    if me.underlay_ip != local_ip {
        tracing::warn!(registry = ?me.underlay_ip, detected = ?local_ip, "the registry's IPv4 underlay address for this node differs from this node's address (the interface's, or --public-ip); using this node's");
    }

    // This node's side of each family it has pods of.
    let v4 = NodeV4::of(cfg.cluster_cidr, me.pod_cidr);
    let v6 = NodeV6::of(cfg.cluster_cidr6, me.pod_cidr6);
    weft0::setup(v4.as_ref(), v6.as_ref(), pod_mtu, &iface.name)?;
    bringup::set_up_masquerade(&cfg);
    // With flannel's device still on the node the port is flannel's (and
    // so is GRO on it) until the takeover below.
    let mut gro_port = gro_port(cfg.port).await;
    let underlay6 = underlay6(&cfg, gro_port);
    // Sent over IPv6 only with the device; taken in over IPv6 either way.
    let local_ip6 = underlay6.map(|(ip, _)| ip);
    let send6 = underlay6.is_some_and(|(_, i)| i != 0);
    let globals = Globals {
        vni: cfg.vni,
        port: cfg.port,
        local_ip,
        underlay_ifindex: iface.index,
        vtep_mac: me.vtep_mac,
        underlay_mac: iface.mac,
        cluster_cidr: cfg.cluster_cidr,
        cluster_cidr6: cfg.cluster_cidr6,
        underlay6,
        pod_mtu,
        bpf_log_level: if cfg.bpf_debug_log {
            aya_log::Level::Debug as u8
        } else {
            0
        },
    };
    let mut dp = bringup::load(&cfg, &globals)?;
    let mut maps = Maps::open(&cfg.bpffs_dir)?;
    // Cached next hops are dropped at every neighbour, route, address or
    // link change from here on (and once now).
    dataplane::nexthops::watch(&cfg.bpffs_dir)?;
    let mut written = crate::registry::sync::Written::default();
    let mut apply = |rx: &mut tokio::sync::watch::Receiver<Published>, maps: &mut Maps| {
        let started = std::time::Instant::now();
        let update = Update::read(&rx.borrow_and_update(), &written, &me.name);
        metrics.reconciles.inc();
        metrics.registry_problems.set(update.problems as i64);
        metrics.known_nodes.set(update.nodes as i64);
        match reconcile(&update, &me, local_ip, local_ip6, send6, maps, &mut written) {
            Ok(r) => {
                if let Some(new) = r.pod_cidr_changed {
                    tracing::error!(old = %reconcile::pod_cidrs(&me), %new, "this node's pod CIDR changed; restart the agent to apply it (pods keep their addresses until then)");
                }
                let c = r.changes;
                metrics.map_writes.inc_by((c.upserts + c.removals) as u64);
                if c.upserts + c.removals > 0 {
                    let elapsed_us = started.elapsed().as_micros() as u64;
                    let registry_us = update.registry_took.as_micros() as u64;
                    tracing::info!(
                        nodes = update.nodes,
                        upserts = c.upserts,
                        removals = c.removals,
                        incremental = r.incremental,
                        registry_us,
                        elapsed_us,
                        "registry applied"
                    );
                }
            }
            Err(e @ ReconcileError::NotListed(_)) => tracing::error!("{e}"),
            Err(e) => {
                metrics.reconcile_errors.inc();
                tracing::error!("{e}");
            }
        }
    };
    // The maps hold the cluster before decap is attached: VXLAN arriving the
    // moment it is (a node taken over from flannel carries traffic already)
    // comes from a known node.
    apply(&mut rx, &mut maps);
    let decap_hook = bringup::attach(
        &mut dp,
        &cfg,
        &iface.name,
        me.pod_cidr.as_ref(),
        me.pod_cidr6.as_ref(),
    )?;
    if cfg.flannel.is_some() {
        takeover::remove_device(cfg.vni, cfg.port);
        if gro_port.is_none() {
            gro_port = self::gro_port(cfg.port).await;
        }
    }
    // Other nodes may address this one now: its decap takes their frames.
    let _ = publish.send(true);
    // flannel-compat runs with IPv4 only (checked in the settings).
    if let (Some(f), Some(v4)) = (&cfg.flannel, &v4) {
        takeover::adopt_addresses(f, cni_conf.as_ref(), &v4.subnet, v4.gateway);
    }
    NodeConfig {
        node: me.name.clone(),
        v4,
        mtu: pod_mtu,
        bpffs: cfg.bpffs_dir.clone(),
        v6,
    }
    .write(&cfg.run_dir)?;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(run_dir = %cfg.run_dir.display(), "ready");
    if let Some(conf) = &cni_conf {
        match conf.ensure() {
            Ok(_) => {
                tracing::info!(path = %conf.dest.display(), "CNI configuration installed: the container runtime now reports this node's network ready")
            }
            // The keeper tries again every few seconds.
            Err(e) => tracing::error!("{e}"),
        }
        if let (Some(f), Some(v4)) = (&cfg.flannel, &v4)
            && takeover::disable_flannel_conflist(conf)
        {
            takeover::adopt_addresses(f, Some(conf), &v4.subnet, v4.gateway);
        }
    }

    let mut stats_tick =
        tokio::time::interval(cfg.stats_interval.unwrap_or(Duration::from_secs(3600)));
    let mut keeper = Keeper {
        globals,
        underlay: iface.name.clone(),
        underlay_index: iface.index,
        local_ip: local_ip.filter(|_| cfg.public_ip.is_none()),
        decap: decap_hook,
        v4,
        v6,
        pod_mtu,
        last_problem: None,
        unhealthy,
        unshaped: Default::default(),
        gro_port,
        cni_conf,
        flannel_compat: cfg.flannel.is_some(),
    };
    let mut hook_tick = tokio::time::interval(HOOK_CHECK_INTERVAL);
    hook_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            changed = rx.changed() => {
                if changed.is_err() {
                    tracing::error!("the node registry stopped; keeping the current dataplane state");
                    break;
                }
                apply(&mut rx, &mut maps);
            }
            _ = hook_tick.tick() => keeper.check(&mut dp, &mut maps, &cfg, &metrics),
            _ = stats_tick.tick(), if cfg.stats_interval.is_some() => {
                let c = stats::read(&maps.drops, &maps.fwds);
                println!("{}", crate::status::format_counters(&c));
            }
        }
    }
    tracing::info!("stopping; the dataplane stays attached (remove it with `weft down`)");
    Ok(())
}

/// This node's IPv6 underlay address and the device that sends VXLAN over
/// it (`weft_gro`, in external mode: the programs set each packet's tunnel
/// key; index 0 when there is none), when `public-ipv6` is set. Decap takes
/// VXLAN over IPv6 either way (other nodes send it as this node's Node or
/// file entry says).
fn underlay6(cfg: &AgentConfig, gro_port: Option<u16>) -> Option<(Ipv6Addr, u32)> {
    let ip = cfg.public_ipv6?;
    let device = crate::host::gro::GRO_IFACE;
    match gro_port.and_then(|_| netdev::index(device)) {
        Some(index) => {
            tracing::info!(%ip, device, "IPv6 pods' VXLAN goes over the IPv6 underlay to nodes that have one");
            Some((ip, index))
        }
        None => {
            tracing::error!(%ip, "public-ipv6 is set, but VXLAN over IPv6 is sent through {device}, which this node does not have (see the message about it above): this node takes VXLAN over IPv6 in, but sends its IPv6 pods' VXLAN over the IPv4 underlay, which flannel-v6.1 nodes do not take. Restart the agent once {device} can be made");
            Some((ip, 0))
        }
    }
}

/// Creates `weft_gro` on `port` ([`bringup::hold_gro_port`]); the port, if
/// it is held now.
async fn gro_port(port: u16) -> Option<u16> {
    match bringup::hold_gro_port(port).await {
        Ok(_) => {
            tracing::info!(
                port,
                device = crate::host::gro::GRO_IFACE,
                "holding the VXLAN port for the kernel's GRO (the device receives nothing itself)"
            );
            Some(port)
        }
        // Nothing to mend on this node: said once, not as a warning.
        Err(e @ GroError::Unsupported { .. }) => {
            tracing::info!("{e}");
            None
        }
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
