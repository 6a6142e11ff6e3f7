//! The BPF dataplane's life cycle: load with per-node globals, pin maps,
//! programs and links under one bpffs directory, attach.
//!
//! Layout of the pin directory (default `/sys/fs/bpf/weft`):
//! - `WEFT_*`: the maps (see `weft_common::names`),
//! - `prog_from_pod`, `prog_to_pod`: the TC programs the CNI attaches to pod
//!   veths (ingress: from the pod; egress: what the stack delivers to it),
//! - `link_xdp` or `link_und`: the underlay's XDP or TC ingress link (decap),
//! - `link_host`: the `weft0` egress link,
//! - `pods/<ifname>`, `pods_to/<ifname>`: each pod veth's ingress and egress
//!   TC links.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, Link as _, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use weft_common::{Endpoint, FlowKey, FlowState, RemoteNode, Vtep, names};

use crate::cidr::Ipv4Cidr;

/// The BPF object, built from `dataplane-ebpf` by the build script.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-dataplane.o"));

/// Default pin directory.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/weft";
/// Pin of the pod veths' ingress program, relative to the pin directory.
pub const PIN_PROG_FROM_POD: &str = "prog_from_pod";
/// Pin of the pod veths' egress program, relative to the pin directory.
pub const PIN_PROG_TO_POD: &str = "prog_to_pod";
/// Pin of the underlay XDP link.
pub const PIN_LINK_XDP: &str = "link_xdp";
/// Pin of the `weft0` egress link.
pub const PIN_LINK_HOST: &str = "link_host";
/// Pin of the underlay TC ingress link (`tc` decap only).
pub const PIN_LINK_UNDERLAY: &str = "link_und";
/// Directory of per-pod TC ingress links.
pub const PIN_PODS_DIR: &str = "pods";
/// Directory of per-pod TC egress links.
pub const PIN_PODS_TO_DIR: &str = "pods_to";

/// A pod veth's two TC programs: (program, its pin, link directory, direction).
const POD_PROGRAMS: [(&str, &str, &str, TcAttachType); 2] = [
    (
        names::PROG_FROM_POD,
        PIN_PROG_FROM_POD,
        PIN_PODS_DIR,
        TcAttachType::Ingress,
    ),
    (
        names::PROG_TO_POD,
        PIN_PROG_TO_POD,
        PIN_PODS_TO_DIR,
        TcAttachType::Egress,
    ),
];

/// Errors loading, pinning or attaching the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the BPF object failed: {0}. Is this kernel ≥ 5.15 with BPF and BTF, and are we root?"
    )]
    Load(#[from] aya::EbpfError),
    #[error("BPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "BPF program `{0}` is missing from the object (stale build? run `cargo xtask build-ebpf`)"
    )]
    MissingProgram(&'static str),
    #[error("BPF map `{0}` is missing from the object (stale build? run `cargo xtask build-ebpf`)")]
    MissingMap(&'static str),
    #[error("reading the BPF object's map definitions: {0}")]
    Layout(String),
    #[error(
        "no weft map pinned at {}: the agent has not set up this node's dataplane (is `weft agent` running here, and is this its --bpffs-dir?)",
        path.display()
    )]
    NotPinned { path: PathBuf },
    #[error(
        "{} is not on a BPF filesystem, and pins can live only there: mount one (`mount -t bpf bpf DIR`) or pick a --bpffs-dir under /sys/fs/bpf, where the agent mounts one itself",
        path.display()
    )]
    NotBpffs { path: PathBuf },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning to {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("opening pinned link {path}: {source}. Is the agent running on this node?")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("{path}: {source}. Is bpffs mounted at /sys/fs/bpf (`mount -t bpf bpf /sys/fs/bpf`)?")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What must match for a pinned map to be reused by the programs of this
/// build: the kernel checks program accesses against the map it gets, not
/// against what the program was compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The pinned maps. Each is rebuilt when it is replaced: the registry's by
/// the next sync, the counters and recorded flows start empty, and the
/// endpoints (the CNI plugin's record of the node's pods) are restored from
/// the pods' routes and neighbours ([`crate::endpoint::restore`]).
const PINNED_MAPS: [&str; 6] = [
    names::ENDPOINTS,
    names::REMOTE_CIDRS,
    names::NODES,
    names::STACK_FLOWS,
    names::DROP_STATS,
    names::FWD_STATS,
];

/// Compares each pinned map under `pin_dir` with this build's definition.
/// A map of another layout (say an older version's counters, with fewer
/// reasons) is unpinned, so loading creates it anew — the programs still
/// attached keep the old one until they are replaced, so pods keep
/// forwarding meanwhile.
pub fn replace_stale_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    let object =
        aya_obj::Object::parse(OBJECT).map_err(|e| DataplaneError::Layout(e.to_string()))?;
    for name in PINNED_MAPS {
        let def = object
            .maps
            .get(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let wanted = MapLayout {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: def.max_entries(),
            flags: def.map_flags(),
        };
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let pinned = MapLayout {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        if pinned == wanted {
            continue;
        }
        fs::remove_file(&path).map_err(|source| DataplaneError::Io {
            path: path.clone(),
            source,
        })?;
        if name == names::ENDPOINTS {
            tracing::warn!(map = name, %pinned, %wanted, "the pinned endpoints map had another version's layout; replaced it, the node's pods are restored from their routes");
        } else {
            tracing::warn!(map = name, %pinned, %wanted, "a pinned map had another version's layout; replaced it with an empty one");
        }
    }
    Ok(())
}

/// Per-node constants written into the programs at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Globals {
    pub vni: u32,
    pub port: u16,
    pub local_ip: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub vtep_mac: [u8; 6],
    pub underlay_mac: [u8; 6],
    pub cluster_cidr: Ipv4Cidr,
    /// aya-log level compiled into the programs at load (0 = off; 4 = debug).
    /// A load-time constant: the verifier prunes log calls above it.
    pub bpf_log_level: u8,
}

/// A loaded dataplane: the programs and maps, pinned under `pin_dir`.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
}

/// Forwards the programs' aya-log records to the agent's log until dropped.
pub fn spawn_bpf_logger(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let logger = aya_log::EbpfLogger::init(ebpf).map_err(|e| DataplaneError::Io {
        path: "AYA_LOGS".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // SAFETY: the logger owns its ring buffer's fd and neither closes nor
    // replaces it while the AsyncFd holds it.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| DataplaneError::Io {
        path: "AYA_LOGS".into(),
        source: e.into(),
    })?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

impl Dataplane {
    /// Loads the object with `globals`. Maps are pinned in (and, when already
    /// there, re-used from) `pin_dir`, so their contents survive a restart.
    pub fn load(globals: &Globals, pin_dir: &Path) -> Result<Self, DataplaneError> {
        for dir in [PIN_PODS_DIR, PIN_PODS_TO_DIR] {
            fs::create_dir_all(pin_dir.join(dir)).map_err(|source| DataplaneError::Io {
                path: pin_dir.to_path_buf(),
                source,
            })?;
        }
        let local_ip = globals.local_ip.octets();
        let cluster_net = globals.cluster_cidr.addr().octets();
        let cluster_mask = globals.cluster_cidr.netmask().octets();
        replace_stale_pins(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .override_global(names::GLOBAL_VNI, &globals.vni, true)
            .override_global(names::GLOBAL_VXLAN_PORT, &globals.port, true)
            .override_global(names::GLOBAL_LOCAL_IP, &local_ip, true)
            .override_global(
                names::GLOBAL_UNDERLAY_IFINDEX,
                &globals.underlay_ifindex,
                true,
            )
            .override_global(names::GLOBAL_VTEP_MAC, &globals.vtep_mac, true)
            .override_global(names::GLOBAL_UNDERLAY_MAC, &globals.underlay_mac, true)
            .override_global(names::GLOBAL_CLUSTER_NET, &cluster_net, true)
            .override_global(names::GLOBAL_CLUSTER_MASK, &cluster_mask, true)
            .override_global(aya_log::LEVEL, &globals.bpf_log_level, false);
        let mut ebpf = loader.load(OBJECT)?;
        for name in [
            names::PROG_FROM_POD,
            names::PROG_TO_POD,
            names::PROG_FROM_HOST,
            names::PROG_FROM_UNDERLAY,
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, names::PROG_XDP_DECAP)?;
        xdp.load().map_err(|source| DataplaneError::Program {
            name: names::PROG_XDP_DECAP,
            source,
        })?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Attaches XDP decap to the underlay interface, natively when the driver
    /// supports it; else, unless `native_only`, in generic (skb) mode with a
    /// warning. Replaces a program already attached through a pinned link
    /// atomically. With `native_only` and no native XDP, returns `Ok(None)`.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        native_only: bool,
    ) -> Result<Option<XdpMode>, DataplaneError> {
        let pin = self.pin_dir.join(PIN_LINK_XDP);
        let name = names::PROG_XDP_DECAP;
        let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            let link =
                aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned)).map_err(|source| {
                    DataplaneError::Link {
                        path: pin.clone(),
                        source,
                    }
                })?;
            match xdp.attach_to_link(link) {
                Ok(_) => return Ok(Some(XdpMode::Default)),
                // Its device is gone (see attach_tc): replace it.
                Err(e) => {
                    tracing::info!(%iface, pin = %pin.display(), "the pinned XDP link cannot be updated ({e}); attaching anew");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let (id, mode) = match xdp.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, XdpMode::Driver),
            Err(e) if native_only => {
                tracing::info!(%iface, error = %e, "no native XDP on the underlay");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(%iface, error = %e, "native XDP not available; falling back to generic (skb) XDP, which is slower (`--decap tc` avoids it)");
                let id = xdp
                    .attach(iface, XdpMode::Skb)
                    .map_err(|source| DataplaneError::Program { name, source })?;
                (id, XdpMode::Skb)
            }
        };
        let link = xdp
            .take_link(id)
            .map_err(|source| DataplaneError::Program { name, source })?;
        let fd: FdLink = link.try_into().map_err(|source| DataplaneError::Link {
            path: pin.clone(),
            source,
        })?;
        fd.pin(&pin)
            .map_err(|source| DataplaneError::Pin { path: pin, source })?;
        Ok(Some(mode))
    }

    /// Checks that weft's program is still at `hook` on `iface` and, if it
    /// is not, attaches it again; returns whether it had to. Programs go
    /// missing when something else removes them: `tc qdisc del dev X
    /// clsact` takes netlink filters (kernels before 6.6) with it, `bpftool
    /// link detach` ends a link, and a deleted device ends every link on it.
    pub fn ensure(&mut self, hook: Hook, iface: &str) -> Result<bool, DataplaneError> {
        let name = hook.program();
        let err = |source| DataplaneError::Program { name, source };
        // Attaching replaces a pinned link that is defunct (attach_tc,
        // attach_xdp): what a removed program leaves behind.
        let dir = match hook {
            Hook::UnderlayXdp => {
                let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
                let ours = xdp.info().map_err(err)?.id();
                if crate::netdev::xdp_prog_id(iface) == Some(ours) {
                    return Ok(false);
                }
                self.attach_xdp(iface, false)?;
                return Ok(true);
            }
            Hook::UnderlayTc | Hook::PodIngress => TcAttachType::Ingress,
            Hook::Host | Hook::PodEgress => TcAttachType::Egress,
        };
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if has_tcx() {
            let ours = prog.info().map_err(err)?.id();
            let (_, attached) = SchedClassifier::query_tcx(iface, dir).map_err(err)?;
            if attached.iter().any(|p| p.id() == ours) {
                return Ok(false);
            }
            attach_tc(prog, name, iface, dir, &hook.pin(&self.pin_dir, iface))?;
            return Ok(true);
        }
        // Netlink filters cannot be listed through aya, but adding weft's
        // anew fails (NLM_F_EXCL) exactly while it is there.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        match prog.attach_with_options(iface, dir, nl_options()) {
            Ok(id) => {
                std::mem::forget(prog.take_link(id).map_err(err)?);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Detaches XDP decap from the underlay (after a switch to `tc`).
    pub fn detach_xdp(&mut self) {
        // Removing the pin detaches the link: nothing else holds it.
        let _ = fs::remove_file(self.pin_dir.join(PIN_LINK_XDP));
    }

    /// Attaches the host program to `iface` (weft0) egress, pinned.
    pub fn attach_host(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let pin = self.pin_dir.join(PIN_LINK_HOST);
        attach_tc(
            program(&mut self.ebpf, names::PROG_FROM_HOST)?,
            names::PROG_FROM_HOST,
            iface,
            TcAttachType::Egress,
            &pin,
        )
    }

    /// Attaches (or, with `attach == false`, detaches) the underlay's TC
    /// ingress program: VXLAN decap in `tc` mode.
    pub fn set_underlay_tc(&mut self, iface: &str, attach: bool) -> Result<(), DataplaneError> {
        let pin = self.pin_dir.join(PIN_LINK_UNDERLAY);
        if !attach {
            // Removing the pin detaches the link (nothing else holds it).
            let _ = fs::remove_file(&pin);
            if !has_tcx() {
                detach_nl(iface, TcAttachType::Ingress);
            }
            return Ok(());
        }
        attach_tc(
            program(&mut self.ebpf, names::PROG_FROM_UNDERLAY)?,
            names::PROG_FROM_UNDERLAY,
            iface,
            TcAttachType::Ingress,
            &pin,
        )
    }

    /// Pins the pod programs so the CNI plugin can attach them to new pods.
    pub fn pin_pod_programs(&mut self) -> Result<(), DataplaneError> {
        for (name, pin, _, _) in POD_PROGRAMS {
            let pin = self.pin_dir.join(pin);
            let _ = fs::remove_file(&pin);
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            prog.pin(&pin)
                .map_err(|source| DataplaneError::Pin { path: pin, source })?;
        }
        Ok(())
    }

    /// Points every pod veth's links at the freshly loaded pod programs
    /// (atomically, per link): after an upgrade, existing pods run the new
    /// code without a moment of detachment; a link the older version did not
    /// have (the egress one) is attached. Returns how many pods were updated.
    pub fn repoint_pods(&mut self) -> Result<usize, DataplaneError> {
        let ifaces = if has_tcx() {
            self.pinned_pod_ifaces()?
        } else {
            // Netlink filters are not pinned: the endpoints map names every
            // pod's host-side veth.
            Maps::open(&self.pin_dir)?
                .endpoints
                .iter()
                .filter_map(Result::ok)
                // A pod that is gone: the CNI DEL removes its entry.
                .filter_map(|(_, ep)| crate::netdev::name(ep.ifindex))
                .collect()
        };
        let mut updated = vec![true; ifaces.len()];
        for (name, _, dir, direction) in POD_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            for (iface, ok) in ifaces.iter().zip(&mut updated) {
                let pin = self.pin_dir.join(dir).join(iface);
                if let Err(e) = attach_tc(prog, name, iface, direction, &pin) {
                    tracing::warn!(%iface, "could not re-point the pod's {name} link: {e}");
                    *ok = false;
                }
            }
        }
        Ok(updated.into_iter().filter(|ok| *ok).count())
    }

    /// The pod veths with a live pinned ingress link (TCX); the pins of links
    /// whose veth is gone are removed.
    fn pinned_pod_ifaces(&self) -> Result<Vec<String>, DataplaneError> {
        let dir = self.pin_dir.join(PIN_PODS_DIR);
        let entries = fs::read_dir(&dir).map_err(|source| DataplaneError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut ifaces = Vec::new();
        for entry in entries.flatten() {
            let iface = entry.file_name().to_string_lossy().into_owned();
            if crate::netdev::index(&iface).is_some() {
                ifaces.push(iface);
            } else {
                tracing::info!(%iface, "removing the pins of a pod whose veth is gone");
                detach_pod(&self.pin_dir, &iface);
            }
        }
        Ok(ifaces)
    }

    /// The pod program, for tests that run it directly.
    pub fn program_mut<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, DataplaneError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        program(&mut self.ebpf, name)
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Netlink (pre-TCX) filters weft owns have this priority and handle ("weft"
/// in ASCII), one per device and direction, so a restart or `weft down` can
/// find them again: netlink filters are not BPF links and cannot be pinned.
pub const NL_PRIORITY: u16 = 0x7765;
pub const NL_HANDLE: (u16, u16) = (0x7765, 0x6674);

/// weft's netlink filter: its own priority and handle.
fn nl_options() -> TcAttachOptions {
    TcAttachOptions::Netlink(NlOptions {
        priority: NL_PRIORITY,
        handle: TcHandle::new(NL_HANDLE.0, NL_HANDLE.1),
        ..Default::default()
    })
}

/// The attachment points the agent keeps in place: the node's, and each
/// pod's (which the CNI plugin made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP decap on the underlay.
    UnderlayXdp,
    /// TC ingress decap on the underlay.
    UnderlayTc,
    /// TC egress on `weft0`.
    Host,
    /// TC ingress on a pod's host-side veth (what the pod sends).
    PodIngress,
    /// TC egress on a pod's host-side veth (what the stack delivers to it).
    PodEgress,
}

impl Hook {
    /// As in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Hook::UnderlayXdp => "underlay_xdp",
            Hook::UnderlayTc => "underlay_tc",
            Hook::Host => "host",
            Hook::PodIngress => "pod_ingress",
            Hook::PodEgress => "pod_egress",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::UnderlayXdp => names::PROG_XDP_DECAP,
            Hook::UnderlayTc => names::PROG_FROM_UNDERLAY,
            Hook::Host => names::PROG_FROM_HOST,
            Hook::PodIngress => names::PROG_FROM_POD,
            Hook::PodEgress => names::PROG_TO_POD,
        }
    }

    /// Where the hook's link is pinned (TCX and XDP) on `iface`.
    fn pin(self, pin_dir: &Path, iface: &str) -> PathBuf {
        match self {
            Hook::UnderlayXdp => pin_dir.join(PIN_LINK_XDP),
            Hook::UnderlayTc => pin_dir.join(PIN_LINK_UNDERLAY),
            Hook::Host => pin_dir.join(PIN_LINK_HOST),
            Hook::PodIngress => pin_dir.join(PIN_PODS_DIR).join(iface),
            Hook::PodEgress => pin_dir.join(PIN_PODS_TO_DIR).join(iface),
        }
    }
}

/// Whether this kernel has TCX links (6.6+); before, TC programs are
/// attached as netlink `cls_bpf` filters under a `clsact` qdisc.
pub fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

fn nl_link(iface: &str, dir: TcAttachType) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        iface,
        dir,
        NL_PRIORITY,
        TcHandle::new(NL_HANDLE.0, NL_HANDLE.1),
        None,
    )
}

/// Attaches `prog` to `iface`. With TCX the link is pinned at `pin`, and if
/// `pin` already holds a link, the program behind it is replaced atomically
/// instead. Without TCX (before 6.6) the program goes in as weft's netlink
/// filter ([`NL_PRIORITY`], [`NL_HANDLE`]), replacing weft's filter already
/// there (also atomic); it stays attached when the agent exits, like a pin.
fn attach_tc(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    dir: TcAttachType,
    pin: &Path,
) -> Result<(), DataplaneError> {
    let err = |source| DataplaneError::Program { name, source };
    if !has_tcx() {
        // clsact is needed only for the netlink path; with TCX no qdisc is
        // added, leaving the ingress qdisc to others (e.g. the bandwidth
        // CNI plugin).
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        let id = match prog.attach_with_options(iface, dir, nl_options()) {
            Ok(id) => id,
            // weft's filter is there (an earlier agent): replace its program.
            // If that fails too, the first error is the one that says why.
            Err(created) => nl_link(iface, dir)
                .ok()
                .and_then(|link| prog.attach_to_link(link).ok())
                .ok_or_else(|| err(created))?,
        };
        // Owned by the device from now on: do not detach when dropped.
        std::mem::forget(prog.take_link(id).map_err(err)?);
        return Ok(());
    }
    if let Ok(pinned) = PinnedLink::from_pin(pin) {
        let link = aya::programs::tc::SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(
            |source| DataplaneError::Link {
                path: pin.to_path_buf(),
                source,
            },
        )?;
        match prog.attach_to_link(link) {
            Ok(_) => return Ok(()),
            // A link whose device is gone (deleted, or deleted and made
            // again under the same name) cannot be updated: replace it.
            Err(e) => {
                tracing::info!(%iface, pin = %pin.display(), "the pinned link cannot be updated ({e}); attaching anew");
                let _ = fs::remove_file(pin);
            }
        }
    }
    let id = prog.attach(iface, dir).map_err(err)?;
    let link = prog.take_link(id).map_err(err)?;
    let fd: FdLink = link.try_into().map_err(|source| DataplaneError::Link {
        path: pin.to_path_buf(),
        source,
    })?;
    fd.pin(pin).map_err(|source| DataplaneError::Pin {
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Removes weft's netlink filter (pre-TCX kernels) from `iface` in `dir`,
/// if there is one. Returns whether one was removed.
pub fn detach_nl(iface: &str, dir: TcAttachType) -> bool {
    nl_link(iface, dir).is_ok_and(|link| link.detach().is_ok())
}

/// Attaches the pinned pod programs to a pod's host-side veth (ingress and
/// egress) and pins the links under `pods/<iface>` and `pods_to/<iface>`.
/// Used by the CNI plugin. On failure nothing stays attached.
pub fn attach_pod(pin_dir: &Path, iface: &str) -> Result<(), DataplaneError> {
    for (name, prog_pin, dir, direction) in POD_PROGRAMS {
        let attached = SchedClassifier::from_pin(pin_dir.join(prog_pin))
            .map_err(|source| DataplaneError::Program { name, source })
            .and_then(|mut prog| {
                let pin = pin_dir.join(dir).join(iface);
                let _ = fs::remove_file(&pin);
                attach_tc(&mut prog, name, iface, direction, &pin)
            });
        if let Err(e) = attached {
            detach_pod(pin_dir, iface);
            return Err(e);
        }
    }
    Ok(())
}

/// Whether `iface` has weft's pod programs: with TCX, whether its ingress
/// link is pinned; with netlink filters (not pinned) always `false`, so the
/// caller attaches (which replaces weft's filter in place).
pub fn pod_attached(pin_dir: &Path, iface: &str) -> bool {
    has_tcx()
        && POD_PROGRAMS
            .iter()
            .all(|(_, _, dir, _)| pin_dir.join(dir).join(iface).exists())
}

/// Removes a pod's link pins (with TCX that detaches them; netlink filters
/// go with the veth).
pub fn detach_pod(pin_dir: &Path, iface: &str) {
    for (_, _, dir, direction) in POD_PROGRAMS {
        let _ = fs::remove_file(pin_dir.join(dir).join(iface));
        if !has_tcx() {
            detach_nl(iface, direction);
        }
    }
}

/// The dataplane's maps, opened from their pins (by the agent, the CNI
/// plugin, `weft status`, tests).
pub struct Maps {
    pub remotes: LpmTrie<MapData, [u8; 4], RemoteNode>,
    pub endpoints: HashMap<MapData, u32, Endpoint>,
    pub nodes: HashMap<MapData, u32, Vtep>,
    pub drops: PerCpuArray<MapData, u64>,
    pub fwds: PerCpuArray<MapData, u64>,
}

impl Maps {
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            pin_dir: &Path,
            name: &'static str,
            wrap: fn(MapData) -> aya::maps::Map,
        ) -> Result<T, DataplaneError> {
            T::try_from(wrap(open_pinned(pin_dir, name)?))
                .map_err(|source| DataplaneError::Map { name, source })
        }
        Ok(Self {
            remotes: open(pin_dir, names::REMOTE_CIDRS, aya::maps::Map::LpmTrie)?,
            endpoints: open(pin_dir, names::ENDPOINTS, aya::maps::Map::HashMap)?,
            nodes: open(pin_dir, names::NODES, aya::maps::Map::HashMap)?,
            drops: open(pin_dir, names::DROP_STATS, aya::maps::Map::PerCpuArray)?,
            fwds: open(pin_dir, names::FWD_STATS, aya::maps::Map::PerCpuArray)?,
        })
    }
}

/// The map of flows whose replies take the stack (see
/// dataplane-ebpf/src/flows.rs), opened from its pin. Not part of [`Maps`]:
/// the CNI plugin has no use for it.
pub fn stack_flows(pin_dir: &Path) -> Result<HashMap<MapData, FlowKey, FlowState>, DataplaneError> {
    let name = names::STACK_FLOWS;
    HashMap::try_from(aya::maps::Map::LruHashMap(open_pinned(pin_dir, name)?))
        .map_err(|source| DataplaneError::Map { name, source })
}

/// The map pinned as `name` in `pin_dir`; [`DataplaneError::NotPinned`]
/// when there is no such pin.
fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<MapData, DataplaneError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DataplaneError::NotPinned { path });
    }
    MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })
}

/// An IPv4 address as the maps store it (network order bytes in a `u32`).
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_key`].
pub fn ip_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// True when `path` (which must exist) is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is valid; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `pin_dir` can hold pins: mounts bpffs at /sys/fs/bpf when the
/// directory is under it and nothing is mounted there yet (as Cilium does).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let root = Path::new("/sys/fs/bpf");
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    if !pin_dir.starts_with(root) {
        return Err(DataplaneError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    fs::create_dir_all(root).map_err(|source| DataplaneError::Io {
        path: root.into(),
        source,
    })?;
    // SAFETY: static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::Io {
            path: root.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_where_nothing_is_pinned_say_so_and_what_to_check() {
        let dir = std::env::temp_dir().join(format!("weft-no-pins-{}", std::process::id()));
        let Err(e) = Maps::open(&dir) else {
            panic!("opened maps from {}", dir.display())
        };
        assert!(matches!(e, DataplaneError::NotPinned { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains(&dir.display().to_string())
                && m.contains("weft agent")
                && m.contains("--bpffs-dir"),
            "{m}"
        );
        assert!(matches!(
            stack_flows(&dir),
            Err(DataplaneError::NotPinned { .. })
        ));
    }

    #[test]
    fn pins_outside_bpffs_are_refused_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("weft-not-bpffs-{}", std::process::id()));
        let Err(e) = ensure_bpffs(&dir) else {
            panic!("{} taken for a bpffs", dir.display())
        };
        let m = e.to_string();
        assert!(matches!(e, DataplaneError::NotBpffs { .. }), "{e:?}");
        assert!(
            m.contains("mount -t bpf") && m.contains("/sys/fs/bpf"),
            "{m}"
        );
    }
}
