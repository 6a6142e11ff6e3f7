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
//!
//! Here: loading ([`Dataplane::load`]) and the node's attachments; in
//! [`attach`] the TC/TCX/XDP mechanics and the pods' links, in [`maps`] the
//! pinned maps as user space opens them, in [`nexthops`] the next-hop
//! cache's invalidation, in [`bpffs`] the pin directory and
//! stale pins, in [`stats`] the counters, in [`profile`] `weft profile`.

pub mod attach;
pub mod bpffs;
pub mod maps;
pub mod nexthops;
pub mod profile;
pub mod stats;

pub use attach::{
    Hook, TcMode, attach_pod, detach_nl, detach_pod, forget_pod, has_tcx, pod_attached,
};
use attach::{attach_tc, nl_options};
pub use bpffs::{ensure_bpffs, is_bpffs, replace_stale_pins};
pub use maps::{Maps, ip_from_key, ip_key, stack_flows, stack_flows6};

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use weft_common::names;

use crate::cidr::{Ipv4Cidr, Ipv6Cidr};

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
    #[error(
        "following rtnetlink for the next-hop cache: {0}. The agent needs CAP_NET_ADMIN in the node's network namespace"
    )]
    Netlink(std::io::Error),
}

/// Per-node constants written into the programs at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Globals {
    pub vni: u32,
    pub port: u16,
    /// This node's IPv4 underlay address (none on an IPv6-only node: the
    /// programs then take no VXLAN over IPv4).
    pub local_ip: Option<Ipv4Addr>,
    pub underlay_ifindex: u32,
    pub vtep_mac: [u8; 6],
    pub underlay_mac: [u8; 6],
    /// The IPv4 cluster CIDR (`None`: IPv6 only; the programs then forward
    /// no IPv4).
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// The IPv6 cluster CIDR, for IPv6 pods (`None`: IPv4 only; the
    /// programs then forward no IPv6).
    pub cluster_cidr6: Option<Ipv6Cidr>,
    /// This node's IPv6 underlay address and the ifindex of the VXLAN
    /// device that sends over it (`weft_gro`), when IPv6 pods' VXLAN goes
    /// over IPv6 (`None`: over the IPv4 underlay only).
    pub underlay6: Option<(std::net::Ipv6Addr, u32)>,
    /// The pods' MTU on this node: an IPv6 packet from a pod larger than
    /// it takes the stack, which answers packet too big (0: unchecked).
    pub pod_mtu: u32,
    /// aya-log level compiled into the programs at load (0 = off; 4 = debug).
    /// A load-time constant: the verifier prunes log calls above it.
    pub bpf_log_level: u8,
}

/// How TC decap retypes a stripped IPv6 frame (`WEFT_DECAP_RETYPE`,
/// dataplane-ebpf/src/maps.rs): 2, with `BPF_F_ADJ_ROOM_DECAP_L3_IPV6` (Linux
/// 6.3 and later have it); 1, through the pod veth's ingress (measured to
/// work on 6.1); 0, through its egress (5.15, where the ingress way
/// delivers nothing; the pod's replies then take the stack).
/// `WEFT_DECAP_RETYPE=0|1|2` in the environment forces one, so that each
/// is tested on a new kernel too.
pub fn decap_retype() -> u8 {
    if let Some(way) = std::env::var("WEFT_DECAP_RETYPE")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|w| *w <= 2)
    {
        return way;
    }
    let at_least = |major, minor| {
        aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(major, minor, 0))
    };
    if at_least(6, 3) {
        2
    } else if at_least(6, 0) {
        1
    } else {
        0
    }
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
        let local_ip = globals.local_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets();
        // No IPv4 cluster: as for IPv6 below, 0.0.0.0/32 matches nothing
        // the programs forward.
        let (cluster_net, cluster_mask) = match globals.cluster_cidr {
            Some(c) => (c.addr().octets(), c.netmask().octets()),
            None => ([0; 4], [0xff; 4]),
        };
        // No IPv6 cluster: net :: with an all-ones mask matches only ::,
        // which no packet the programs forward carries.
        let (cluster6_net, cluster6_mask) = match globals.cluster_cidr6 {
            Some(c) => (c.addr().octets(), c.netmask().octets()),
            None => ([0; 16], [0xff; 16]),
        };
        let decap_retype = decap_retype();
        let (local_ip6, tunnel6_ifindex) = match globals.underlay6 {
            Some((ip, ifindex)) => (ip.octets(), ifindex),
            None => ([0; 16], 0),
        };
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
            .override_global(names::GLOBAL_CLUSTER6_NET, &cluster6_net, true)
            .override_global(names::GLOBAL_CLUSTER6_MASK, &cluster6_mask, true)
            .override_global(names::GLOBAL_DECAP_RETYPE, &decap_retype, true)
            .override_global(names::GLOBAL_LOCAL_IP6, &local_ip6, true)
            .override_global(names::GLOBAL_TUNNEL6_IFINDEX, &tunnel6_ifindex, true)
            .override_global(names::GLOBAL_POD_MTU, &globals.pod_mtu, true)
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
                if crate::host::netdev::xdp_prog_id(iface) == Some(ours) {
                    return Ok(false);
                }
                self.attach_xdp(iface, false)?;
                return Ok(true);
            }
            Hook::UnderlayTc | Hook::PodIngress => TcAttachType::Ingress,
            Hook::Host | Hook::PodEgress => TcAttachType::Egress,
        };
        let mode = match hook {
            Hook::PodIngress | Hook::PodEgress => TcMode::of_pod(&self.pin_dir, iface),
            _ => TcMode::node(),
        };
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if mode == TcMode::Tcx {
            let ours = prog.info().map_err(err)?.id();
            let (_, attached) = SchedClassifier::query_tcx(iface, dir).map_err(err)?;
            if attached.iter().any(|p| p.id() == ours) {
                return Ok(false);
            }
            attach_tc(
                prog,
                name,
                iface,
                dir,
                &hook.pin(&self.pin_dir, iface),
                mode,
            )?;
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
            TcMode::node(),
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
            TcMode::node(),
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
        // Pods with pinned TCX links, and every other pod the endpoints map
        // names (netlink filters are not pinned).
        let mut ifaces = if has_tcx() {
            self.pinned_pod_ifaces()?
        } else {
            Vec::new()
        };
        for iface in Maps::open(&self.pin_dir)?
            .endpoints
            .iter()
            .filter_map(Result::ok)
            // A pod that is gone: the CNI DEL removes its entry.
            .filter_map(|(_, ep)| crate::host::netdev::name(ep.ifindex))
        {
            if !ifaces.contains(&iface) {
                ifaces.push(iface);
            }
        }
        let modes: Vec<TcMode> = ifaces
            .iter()
            .map(|i| TcMode::of_pod(&self.pin_dir, i))
            .collect();
        let mut updated = vec![true; ifaces.len()];
        for (name, _, dir, direction) in POD_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            for ((iface, ok), mode) in ifaces.iter().zip(&mut updated).zip(&modes) {
                let pin = self.pin_dir.join(dir).join(iface);
                if let Err(e) = attach_tc(prog, name, iface, direction, &pin, *mode) {
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
            if crate::host::netdev::index(&iface).is_some() {
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
