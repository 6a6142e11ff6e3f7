//! `weft agent`: brings the node's dataplane up and keeps its maps equal to
//! the registry's view of the cluster.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use weft_common::VXLAN_OVERHEAD;

use crate::{
    cidr::Ipv4Cidr,
    config::{AgentSettings, DecapMode, RegistryKind},
    dataplane::{self, Dataplane, DataplaneError, Globals, Hook, Maps},
    ip::{self, CmdError},
    metrics::{AgentMetrics, Server},
    netdev::{self, NetdevError},
    node::{NodeConfig, NodeConfigError},
    registry::{FileRegistry, Node, Registry, RegistryError, Snapshot},
    stats, sync,
};

/// The node's own device for host → remote pod traffic; holds the gateway
/// address. A veth pair (the peer is [`HOST_PEER`]) rather than a dummy, so it
/// exists on kernels built without the dummy driver.
pub const HOST_IFACE: &str = "weft0";
/// The other end of [`HOST_IFACE`]; the BPF program on weft0's egress
/// forwards or drops every packet, so nothing arrives here.
pub const HOST_PEER: &str = "weft0p";

/// Everything the agent needs to run, with defaults applied.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub iface: Option<String>,
    pub iface_regex: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub registry: RegistryKind,
    pub nodes_file: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub cluster_cidr: Ipv4Cidr,
    pub vni: u32,
    pub port: u16,
    pub bpffs_dir: PathBuf,
    pub run_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    pub stats_interval: Option<Duration>,
    /// Compile the programs' debug logging in (when the agent logs at debug).
    pub bpf_debug_log: bool,
    pub decap: DecapMode,
    /// Masquerade pods' traffic leaving the cluster CIDR (crate::masq).
    pub ip_masq: bool,
    /// The conflist to install once ready: (source, destination).
    pub read_cni_conf: Option<PathBuf>,
    pub write_cni_conf_when_ready: Option<PathBuf>,
}

impl AgentConfig {
    /// Applies the defaults to settings merged from flags and file.
    pub fn from_settings(s: AgentSettings, hostname: impl FnOnce() -> String) -> Self {
        Self {
            node_name: s.node_name.unwrap_or_else(hostname),
            iface: s.iface,
            iface_regex: s.iface_regex,
            public_ip: s.public_ip,
            registry: s.registry.unwrap_or(RegistryKind::File),
            nodes_file: s
                .nodes_file
                .unwrap_or_else(|| "/etc/weft/nodes.toml".into()),
            kubeconfig: s.kubeconfig,
            cluster_cidr: s
                .cluster_cidr
                .unwrap_or_else(|| Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16)),
            vni: s.vni.unwrap_or(1),
            port: s.port.unwrap_or(8472),
            bpffs_dir: s
                .bpffs_dir
                .unwrap_or_else(|| dataplane::DEFAULT_BPFFS_DIR.into()),
            run_dir: s
                .run_dir
                .unwrap_or_else(|| crate::node::DEFAULT_RUN_DIR.into()),
            metrics_addr: s
                .metrics_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9807))),
            stats_interval: s.stats_interval.filter(|n| *n > 0).map(Duration::from_secs),
            bpf_debug_log: false,
            decap: s.decap.unwrap_or(DecapMode::Auto),
            ip_masq: s.ip_masq.unwrap_or(true),
            read_cni_conf: s.read_cni_conf,
            write_cni_conf_when_ready: s.write_cni_conf_when_ready,
        }
    }
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
    #[error(transparent)]
    CniConf(#[from] crate::cniconf::CniConfError),
    #[error("--vni {0} is out of range: VXLAN VNIs are 1 to 16777215")]
    Vni(u32),
    #[error("underlay MTU {0} is too small for VXLAN (needs at least {min})", min = 68 + VXLAN_OVERHEAD)]
    Mtu(u32),
    #[error("--iface-regex `{0}` is not a valid regular expression: {1}")]
    Regex(String, String),
    #[error("the kube registry: {0}")]
    Kube(String),
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
fn attach_decap(
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

/// How often the agent checks that its programs are still attached.
pub const HOOK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What the hook check needs to know, and what it said last (so that a
/// lasting problem is logged once, not every few seconds).
struct Keeper {
    /// What the programs were loaded with.
    globals: Globals,
    underlay: String,
    underlay_index: u32,
    /// The address VXLAN leaves from, when it is the interface's own (not
    /// `--public-ip`): the programs carry it as a load-time constant.
    local_ip: Option<Ipv4Addr>,
    decap: Hook,
    subnet: Ipv4Cidr,
    pod_mtu: u32,
    last_problem: Option<String>,
    /// Set (for `/healthz`) when only a restart can help.
    unhealthy: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Endpoints flagged shaped whose veth had no qdisc at the last check
    /// ([`crate::endpoint::sync_shaping`]).
    unshaped: std::collections::BTreeSet<u32>,
    /// The UDP port [`crate::gro::GRO_IFACE`] holds, when it could be made
    /// at start (then it is put back if removed).
    gro_port: Option<u16>,
    /// The CNI conflist the agent installed (put back if removed).
    cni_conf: Option<crate::cniconf::CniConf>,
}

impl Keeper {
    /// Puts back what something else removed: `weft0` (with its address and
    /// routes), `weft_gro`, the decap program on the underlay, the host
    /// program on `weft0`, the pods' programs. Flannel's vxlan device cannot
    /// lose its hooks this way; weft's programs can (`tc qdisc del dev X
    /// clsact` before 6.6, `bpftool link detach`), and a node whose decap is gone
    /// drops every packet for its pods without a word. A re-created
    /// underlay gets the programs loaded anew; what only a restart can mend
    /// (the underlay gone, or its address, a load-time constant and the
    /// node's address in the registry, changed) is reported through
    /// `/healthz`.
    fn check(
        &mut self,
        dp: &mut Dataplane,
        maps: &mut Maps,
        cfg: &AgentConfig,
        metrics: &AgentMetrics,
    ) {
        let repaired = |what: &str| {
            metrics
                .repairs
                .get_or_create(&vec![("hook".into(), what.into())])
                .inc();
        };
        // What is wrong now, and of that what needs a restart.
        let mut problems = Vec::new();
        let mut restart = Vec::new();
        let has_local_ip = |ip: Ipv4Addr| {
            netdev::addresses()
                .map(|all| all.iter().any(|(n, a)| *n == self.underlay && *a == ip))
                // Unreadable: say nothing rather than something wrong.
                .unwrap_or(true)
        };
        match netdev::index(&self.underlay) {
            Some(i) if i == self.underlay_index => {
                if let Some(ip) = self.local_ip.filter(|ip| !has_local_ip(*ip)) {
                    restart.push(format!(
                        "the underlay interface {} no longer has {ip}, the address this node's VXLAN leaves from (a load-time constant of the programs, and this node's address in the registry): restart the agent once the address is final",
                        self.underlay
                    ));
                }
                if netdev::index(HOST_IFACE).is_none() {
                    tracing::warn!(
                        "{HOST_IFACE} is gone (deleted by something else?); creating it again"
                    );
                    match setup_host_iface(cfg, &self.subnet, self.pod_mtu, &self.underlay) {
                        Ok(()) => repaired("weft0"),
                        Err(e) => problems.push(format!("re-creating {HOST_IFACE}: {e}")),
                    }
                }
                for (hook, iface) in [
                    (self.decap, self.underlay.as_str()),
                    (Hook::Host, HOST_IFACE),
                ] {
                    if let Err(e) = ensure_hook(dp, hook, iface, &repaired) {
                        problems.push(format!(
                            "checking the {} program on {iface}: {e}",
                            hook.name()
                        ));
                    }
                }
                // Present and up: one ioctl; anything else: `ensure` looks
                // closer (and replaces a device that differs).
                if let Some(port) = self
                    .gro_port
                    .filter(|_| netdev::is_up(crate::gro::GRO_IFACE) != Some(true))
                {
                    match crate::gro::ensure(port) {
                        Ok(crate::gro::Ensured::Present) => {}
                        Ok(crate::gro::Ensured::Created) => {
                            tracing::warn!("{} was gone or changed (by something else?); made it again", crate::gro::GRO_IFACE);
                            repaired(crate::gro::GRO_IFACE);
                        }
                        // Deleted just now, the old socket may still hold
                        // the port for a moment: the next check retries.
                        Err(e) => problems.push(format!("re-creating {}: {e}", crate::gro::GRO_IFACE)),
                    }
                }
                if let Some(conf) = &self.cni_conf {
                    match conf.ensure() {
                        Ok(crate::cniconf::Ensured::Present) => {}
                        Ok(crate::cniconf::Ensured::Written) => {
                            tracing::warn!(path = %conf.dest.display(), "the CNI configuration was removed or changed (by something else?); wrote it again");
                            repaired("cni-conf");
                        }
                        Err(e) => problems.push(e.to_string()),
                    }
                }
                self.check_pods(dp, maps, &repaired);
                for c in crate::endpoint::sync_shaping(maps, &mut self.unshaped) {
                    if c.shaped {
                        tracing::info!(pod = %c.ip, iface = %c.host_ifname, "a qdisc shapes the pod's veth (the bandwidth plugin?); its traffic now takes the node's stack, where the qdisc applies");
                    } else {
                        tracing::info!(pod = %c.ip, iface = %c.host_ifname, "the pod's veth is no longer shaped; its traffic is back on the fast paths");
                    }
                }
            }
            // Deleted and made again: its index and MAC are load-time
            // constants of the programs, so they are loaded anew for it.
            Some(i) => match self.reload(dp, cfg) {
                Ok(()) => {
                    tracing::warn!(iface = %self.underlay, old = self.underlay_index, new = i, "the underlay interface was re-created; reloaded the dataplane for it");
                    self.underlay_index = i;
                    repaired("underlay");
                }
                Err(e) => restart.push(format!(
                    "the underlay interface {} was re-created (index {} → {i}) and reloading the dataplane for it failed: {e}; restart the agent",
                    self.underlay, self.underlay_index
                )),
            },
            None => restart.push(format!(
                "the underlay interface {} is gone; pods on this node are cut off from other nodes until it is back and the agent restarted",
                self.underlay
            )),
        }
        *self.unhealthy.lock().expect("health lock") =
            (!restart.is_empty()).then(|| restart.join("; "));
        problems.extend(restart);
        let problem = (!problems.is_empty()).then(|| problems.join("; "));
        if problem != self.last_problem {
            if let Some(p) = &problem {
                tracing::error!("{p}");
            } else {
                tracing::info!("the dataplane's hooks are all in place again");
            }
            self.last_problem = problem;
        }
    }

    /// Loads the programs again for the underlay as it is now (a new index
    /// and MAC), over the same pins, and swaps them in.
    fn reload(&mut self, dp: &mut Dataplane, cfg: &AgentConfig) -> Result<(), AgentError> {
        let iface = netdev::get(&self.underlay)?;
        // rp_filter on the new device, as at start.
        setup_host_iface(cfg, &self.subnet, self.pod_mtu, &self.underlay)?;
        let globals = Globals {
            underlay_ifindex: iface.index,
            underlay_mac: iface.mac,
            ..self.globals.clone()
        };
        let (new, decap) = bring_up(cfg, &globals, &self.underlay, &self.subnet)?;
        *dp = new;
        self.globals = globals;
        self.decap = decap;
        Ok(())
    }

    /// The same for every pod in the endpoints map: both of its veth's
    /// programs. A pod whose ADD or DEL is under way may look half-wired for
    /// a moment: with TCX, a pod is checked only once the plugin has pinned
    /// its links (so the two never attach at once), and errors (its veth
    /// just went) are not problems.
    fn check_pods(&self, dp: &mut Dataplane, maps: &Maps, repaired: &dyn Fn(&str)) {
        let tcx = dataplane::has_tcx();
        let ifaces: Vec<String> = maps
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, ep)| netdev::name(ep.ifindex))
            .filter(|iface| !tcx || dataplane::pod_attached(&dp.pin_dir, iface))
            .collect();
        for iface in ifaces {
            for hook in [Hook::PodIngress, Hook::PodEgress] {
                if let Err(e) = ensure_hook(dp, hook, &iface, repaired) {
                    tracing::debug!(hook = hook.name(), %iface, "not checked: {e}");
                }
            }
        }
    }
}

/// [`Dataplane::ensure`], with a warning and a count when it had to attach.
fn ensure_hook(
    dp: &mut Dataplane,
    hook: Hook,
    iface: &str,
    repaired: &dyn Fn(&str),
) -> Result<(), DataplaneError> {
    if dp.ensure(hook, iface)? {
        tracing::warn!(hook = hook.name(), %iface, "weft's program was no longer attached (removed by something else?); attached it again");
        repaired(hook.name());
    }
    Ok(())
}

/// Loads the programs with `globals` over the pinned maps and puts them in
/// place: decap on `underlay`, `weft0`'s, the pod programs (with the node's
/// pods restored into the endpoints map first, then their links re-pointed).
/// At start, and again when the underlay is re-created.
fn bring_up(
    cfg: &AgentConfig,
    globals: &Globals,
    underlay: &str,
    pod_cidr: &Ipv4Cidr,
) -> Result<(Dataplane, Hook), AgentError> {
    let mut dp = Dataplane::load(globals, &cfg.bpffs_dir)?;
    if cfg.bpf_debug_log {
        dataplane::spawn_bpf_logger(&mut dp.ebpf)?;
        tracing::debug!("BPF debug logging is on");
    }
    let (decap_hook, decap) = attach_decap(&mut dp, cfg.decap, underlay)?;
    dp.attach_host(HOST_IFACE)?;
    dp.pin_pod_programs()?;
    // Before re-pointing: the pods' links then run programs whose endpoints
    // map knows them (it may be new: replaced, or its pin lost).
    match crate::endpoint::restore(&cfg.bpffs_dir, pod_cidr) {
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
    Ok((dp, decap_hook))
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

/// Masquerades pods' traffic leaving the cluster (or, with it off, removes
/// rules an earlier run installed). A failure is logged, not fatal: pods
/// still reach each other, only the way out is missing.
fn set_up_masquerade(cfg: &AgentConfig) {
    if !cfg.ip_masq {
        if crate::masq::remove() {
            tracing::info!("--ip-masq=false: removed the masquerade rules of an earlier run");
        }
        return;
    }
    match crate::masq::install(&cfg.cluster_cidr) {
        Ok(backend) => {
            tracing::info!(cluster = %cfg.cluster_cidr, chain = crate::masq::CHAIN, iptables = ?backend, "masquerading pods' traffic leaving the cluster")
        }
        Err(e) => tracing::error!(
            "could not install the masquerade rules ({e}): pods cannot reach addresses outside the cluster; install iptables (with iptables-restore) or pass --ip-masq=false if something else masquerades"
        ),
    }
}

/// Starts the configured registry; its snapshots arrive on the receiver.
fn spawn_registry(
    cfg: &AgentConfig,
    local_ip: Ipv4Addr,
) -> Result<tokio::sync::watch::Receiver<Option<Snapshot>>, AgentError> {
    let registry: Box<dyn Registry> = match cfg.registry {
        RegistryKind::File => Box::new(FileRegistry {
            path: cfg.nodes_file.clone(),
            cluster: cfg.cluster_cidr,
            poll: Duration::from_millis(200),
        }),
        RegistryKind::Kube => {
            let mut r =
                crate::kube::KubeRegistry::new(cfg).map_err(|e| AgentError::Kube(e.to_string()))?;
            r.own = Some((local_ip, netdev::vtep_mac_for(local_ip)));
            Box::new(r)
        }
    };
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(registry.run(tx));
    Ok(rx)
}

/// Runs the agent until SIGINT/SIGTERM. The dataplane stays attached after
/// exit (it is pinned); `weft down` removes it.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    if !(1..=0xff_ffff).contains(&cfg.vni) {
        return Err(AgentError::Vni(cfg.vni));
    }
    if let Some(re) = &cfg.iface_regex {
        regex::Regex::new(re).map_err(|e| AgentError::Regex(re.clone(), e.to_string()))?;
    }
    // Checked before anything is changed on the node.
    let cni_conf = crate::cniconf::CniConf::from_settings(
        cfg.read_cni_conf.as_deref(),
        cfg.write_cni_conf_when_ready.as_deref(),
    )?;
    dataplane::ensure_bpffs(&cfg.bpffs_dir)?;
    let (iface, local_ip) = underlay(&cfg)?;
    if iface.mtu < 68 + VXLAN_OVERHEAD {
        return Err(AgentError::Mtu(iface.mtu));
    }
    let pod_mtu = iface.mtu - VXLAN_OVERHEAD;
    tracing::info!(iface = %iface.name, %local_ip, mtu = iface.mtu, registry = ?cfg.registry, "underlay");

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

    let mut rx = spawn_registry(&cfg, local_ip)?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    // Wait until the registry lists this node: its pod CIDR comes from there.
    let me = loop {
        if let Some(snap) = rx.borrow_and_update().as_ref() {
            if let Some(me) = snap.nodes.iter().find(|n| n.name == cfg.node_name) {
                break me.clone();
            }
            tracing::error!(node = %cfg.node_name, "this node is not in the node registry yet; add it (name, underlay IP, pod CIDR). Waiting");
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return Ok(()); },
            _ = &mut shutdown => return Ok(()),
        }
    };
    if me.underlay_ip != local_ip {
        tracing::warn!(registry = %me.underlay_ip, detected = %local_ip, "the registry's underlay IP for this node differs from this node's address (the interface's, or --public-ip); using this node's");
    }

    setup_host_iface(&cfg, &me.pod_cidr, pod_mtu, &iface.name)?;
    set_up_masquerade(&cfg);
    let gro_port = match hold_gro_port(cfg.port).await {
        Ok(_) => {
            tracing::info!(
                port = cfg.port,
                device = crate::gro::GRO_IFACE,
                "holding the VXLAN port for the kernel's GRO (the device receives nothing itself)"
            );
            Some(cfg.port)
        }
        // Nothing to mend on this node: said once, not as a warning.
        Err(e @ crate::gro::GroError::Unsupported { .. }) => {
            tracing::info!("{e}");
            None
        }
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    let globals = Globals {
        vni: cfg.vni,
        port: cfg.port,
        local_ip,
        underlay_ifindex: iface.index,
        vtep_mac: me.vtep_mac,
        underlay_mac: iface.mac,
        cluster_cidr: cfg.cluster_cidr,
        bpf_log_level: if cfg.bpf_debug_log {
            aya_log::Level::Debug as u8
        } else {
            0
        },
    };
    let (mut dp, decap_hook) = bring_up(&cfg, &globals, &iface.name, &me.pod_cidr)?;

    let mut maps = Maps::open(&cfg.bpffs_dir)?;
    let apply = |snap: &Snapshot, maps: &mut Maps| {
        let started = std::time::Instant::now();
        metrics.reconciles.inc();
        metrics.registry_problems.set(snap.problems.len() as i64);
        metrics.known_nodes.set(snap.nodes.len() as i64);
        if !snap.nodes.iter().any(|n| n.name == me.name) {
            tracing::error!(node = %me.name, "this node is missing from the registry; keeping the current dataplane state");
            return;
        }
        if let Some(n) = snap.nodes.iter().find(|n| n.name == me.name)
            && n.pod_cidr != me.pod_cidr
        {
            tracing::error!(old = %me.pod_cidr, new = %n.pod_cidr, "this node's pod CIDR changed; restart the agent to apply it (pods keep their addresses until then)");
        }
        match sync::apply(
            maps,
            &sync::desired(&with_local_ip(&snap.nodes, &me.name, local_ip), &me.name),
        ) {
            Ok(c) => {
                metrics.map_writes.inc_by((c.upserts + c.removals) as u64);
                if c.upserts + c.removals > 0 {
                    let elapsed_us = started.elapsed().as_micros() as u64;
                    tracing::info!(
                        nodes = snap.nodes.len(),
                        upserts = c.upserts,
                        removals = c.removals,
                        elapsed_us,
                        "registry applied"
                    );
                }
            }
            Err(e) => {
                metrics.reconcile_errors.inc();
                tracing::error!("applying the registry: {e}");
            }
        }
    };
    let first = rx
        .borrow_and_update()
        .clone()
        .expect("a snapshot arrived above");
    apply(&first, &mut maps);
    NodeConfig {
        node: me.name.clone(),
        network: cfg.cluster_cidr,
        subnet: me.pod_cidr,
        gateway: NodeConfig::gateway_of(&me.pod_cidr),
        mtu: pod_mtu,
        bpffs: cfg.bpffs_dir.clone(),
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
    }

    let mut stats_tick =
        tokio::time::interval(cfg.stats_interval.unwrap_or(Duration::from_secs(3600)));
    let mut keeper = Keeper {
        globals,
        underlay: iface.name.clone(),
        underlay_index: iface.index,
        local_ip: cfg.public_ip.is_none().then_some(local_ip),
        decap: decap_hook,
        subnet: me.pod_cidr,
        pod_mtu,
        last_problem: None,
        unhealthy,
        unshaped: Default::default(),
        gro_port,
        cni_conf,
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
                let snap = rx.borrow_and_update().clone();
                if let Some(snap) = snap {
                    apply(&snap, &mut maps);
                }
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

/// [`crate::gro::ensure`], tried for up to 2 s: a socket on the port that
/// was just closed (`weft down` and a new agent, a changed `--port`) may
/// hold it for a moment after its device is gone.
async fn hold_gro_port(port: u16) -> Result<crate::gro::Ensured, crate::gro::GroError> {
    let mut tries = 0;
    loop {
        match crate::gro::ensure(port) {
            Err(crate::gro::GroError::Cmd { .. }) if tries < 4 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
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
/// devices, routes and files.
pub fn down(bpffs_dir: &Path, run_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    if bpffs_dir.exists() {
        // Removing a link's pin detaches it; maps go with their last reference.
        match std::fs::remove_dir_all(bpffs_dir) {
            Ok(()) => done.push(format!("removed pins under {}", bpffs_dir.display())),
            Err(e) => done.push(format!("could not remove {}: {e}", bpffs_dir.display())),
        }
    }
    if !dataplane::has_tcx() {
        // Netlink filters are not pinned: find weft's (its own priority and
        // handle) on the underlay's ingress and pod veths' both sides. weft0
        // takes its own with it when deleted.
        use aya::programs::TcAttachType::{Egress, Ingress};
        for iface in netdev::names() {
            for (dir, name) in [(Ingress, "ingress"), (Egress, "egress")] {
                if dataplane::detach_nl(&iface, dir) {
                    done.push(format!("removed weft's TC filter from {iface} {name}"));
                }
            }
        }
    }
    if crate::masq::remove() {
        done.push(format!(
            "removed the masquerade rules (nat table, chain {})",
            crate::masq::CHAIN
        ));
    }
    if netdev::index(HOST_IFACE).is_some() && ip::ip(&["link", "del", HOST_IFACE]).is_ok() {
        done.push(format!("deleted {HOST_IFACE} and its routes"));
    }
    if crate::gro::remove() {
        done.push(format!("deleted {}", crate::gro::GRO_IFACE));
    }
    let env = run_dir.join(crate::node::SUBNET_ENV);
    if std::fs::remove_file(&env).is_ok() {
        done.push(format!("removed {}", env.display()));
    }
    done
}
