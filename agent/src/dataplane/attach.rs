//! Attaching programs: TCX links (pinned, replaced atomically) on 6.6 and
//! later, weft's own netlink `cls_bpf` filter before; the pods' two links.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, Link as _, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use weft_common::names;

use super::{
    DataplaneError, PIN_LINK_HOST, PIN_LINK_UNDERLAY, PIN_LINK_XDP, PIN_PODS_DIR, PIN_PODS_TO_DIR,
    POD_PROGRAMS,
};

/// Netlink (pre-TCX) filters weft owns have this priority and handle ("weft"
/// in ASCII), one per device and direction, so a restart or `weft down` can
/// find them again: netlink filters are not BPF links and cannot be pinned.
pub const NL_PRIORITY: u16 = 0x7765;
pub const NL_HANDLE: (u16, u16) = (0x7765, 0x6674);

/// weft's netlink filter: its own priority and handle.
pub(super) fn nl_options() -> TcAttachOptions {
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

    pub(super) fn program(self) -> &'static str {
        match self {
            Hook::UnderlayXdp => names::PROG_XDP_DECAP,
            Hook::UnderlayTc => names::PROG_FROM_UNDERLAY,
            Hook::Host => names::PROG_FROM_HOST,
            Hook::PodIngress => names::PROG_FROM_POD,
            Hook::PodEgress => names::PROG_TO_POD,
        }
    }

    /// Where the hook's link is pinned (TCX and XDP) on `iface`.
    pub(super) fn pin(self, pin_dir: &Path, iface: &str) -> PathBuf {
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
    static TCX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TCX.get_or_init(|| {
        aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
    })
}

/// How a TC program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// A TCX link (6.6+), pinned, replaced atomically. Attaching and
    /// detaching one on a live device each wait for an RCU grace period
    /// with the RTNL held (kernel/bpf/tcx.c, `tcx_entry_sync`): several
    /// milliseconds, during which every other netlink request on the node
    /// waits too.
    Tcx,
    /// weft's own netlink `cls_bpf` filter under a `clsact` qdisc
    /// ([`NL_PRIORITY`], [`NL_HANDLE`]), replaced in place. Its first filter
    /// waits at most for an expedited grace period (`mini_qdisc_pair_swap`).
    /// `clsact` cannot share a device with an `ingress` qdisc (the
    /// `bandwidth` plugin's, for a pod's egress limit).
    Netlink,
}

impl TcMode {
    /// The node's own hooks (the underlay, `weft0`): TCX where the kernel
    /// has it.
    pub fn node() -> Self {
        if has_tcx() { Self::Tcx } else { Self::Netlink }
    }

    /// A new pod's veth: netlink filters, which cost no full grace period
    /// (a pod starts in a fraction of the time), except where the
    /// `bandwidth` plugin will add its `ingress` qdisc for an egress limit,
    /// which only TCX leaves room for.
    pub fn pod(egress_limited: bool) -> Self {
        if egress_limited && has_tcx() {
            Self::Tcx
        } else {
            Self::Netlink
        }
    }

    /// An existing pod's veth: TCX when its links are pinned, else netlink.
    pub fn of_pod(pin_dir: &Path, iface: &str) -> Self {
        if pod_attached(pin_dir, iface) {
            Self::Tcx
        } else {
            Self::Netlink
        }
    }
}

pub(super) fn nl_link(iface: &str, dir: TcAttachType) -> std::io::Result<SchedClassifierLink> {
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
/// instead. In netlink mode the program goes in as weft's netlink filter
/// ([`NL_PRIORITY`], [`NL_HANDLE`]), replacing weft's filter already there
/// (also atomic); it stays attached when the agent exits, like a pin.
pub(super) fn attach_tc(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    dir: TcAttachType,
    pin: &Path,
    mode: TcMode,
) -> Result<(), DataplaneError> {
    let err = |source| DataplaneError::Program { name, source };
    if mode == TcMode::Netlink {
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
/// egress), in `mode`; TCX links are pinned under `pods/<iface>` and
/// `pods_to/<iface>`. Used by the CNI plugin. On failure nothing stays
/// attached.
pub fn attach_pod(pin_dir: &Path, iface: &str, mode: TcMode) -> Result<(), DataplaneError> {
    for (name, prog_pin, dir, direction) in POD_PROGRAMS {
        let attached = SchedClassifier::from_pin(pin_dir.join(prog_pin))
            .map_err(|source| DataplaneError::Program { name, source })
            .and_then(|mut prog| {
                let pin = pin_dir.join(dir).join(iface);
                let _ = fs::remove_file(&pin);
                attach_tc(&mut prog, name, iface, direction, &pin, mode)
            });
        if let Err(e) = attached {
            detach_pod(pin_dir, iface);
            return Err(e);
        }
    }
    Ok(())
}

/// Whether `iface` has weft's pod programs as pinned TCX links; with
/// netlink filters (not pinned) `false`, so the caller attaches (which
/// replaces weft's filter in place).
pub fn pod_attached(pin_dir: &Path, iface: &str) -> bool {
    has_tcx()
        && POD_PROGRAMS
            .iter()
            .all(|(_, _, dir, _)| pin_dir.join(dir).join(iface).exists())
}

/// Removes a pod's programs from its veth: its link pins (removing a TCX
/// link's pin detaches it) and weft's netlink filters.
pub fn detach_pod(pin_dir: &Path, iface: &str) {
    for (_, _, dir, direction) in POD_PROGRAMS {
        let _ = fs::remove_file(pin_dir.join(dir).join(iface));
        detach_nl(iface, direction);
    }
}

/// Removes a pod's link pins only, once its veth is gone: the kernel took
/// the links and filters down with the device (no grace period of their
/// own, unlike detaching a TCX link from a live device).
pub fn forget_pod(pin_dir: &Path, iface: &str) {
    for (_, _, dir, _) in POD_PROGRAMS {
        let _ = fs::remove_file(pin_dir.join(dir).join(iface));
    }
}
