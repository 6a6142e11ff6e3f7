//! The keeper: every few seconds, puts back what something else removed
//! (devices, hooks, the conflist) and follows the pods' shaping.

use std::{net::Ipv4Addr, time::Duration};

use crate::{
    daemon::{AgentError, bringup::bring_up, config::AgentConfig, metrics::AgentMetrics},
    dataplane::{Dataplane, DataplaneError, Globals, Hook, Maps},
    host::{
        gro, netdev,
        weft0::{self, HOST_IFACE},
    },
};

/// How often the agent checks that its programs are still attached.
pub const HOOK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What the hook check needs to know, and what it said last (so that a
/// lasting problem is logged once, not every few seconds).
pub(super) struct Keeper {
    /// What the programs were loaded with.
    pub(super) globals: Globals,
    pub(super) underlay: String,
    pub(super) underlay_index: u32,
    /// The address VXLAN leaves from, when it is the interface's own (not
    /// `--public-ip`): the programs carry it as a load-time constant.
    pub(super) local_ip: Option<Ipv4Addr>,
    pub(super) decap: Hook,
    /// This node's IPv4 network (none on an IPv6-only node).
    pub(super) v4: Option<crate::node::NodeV4>,
    /// This node's IPv6 network, on a dual-stack or IPv6-only node.
    pub(super) v6: Option<crate::node::NodeV6>,
    pub(super) pod_mtu: u32,
    pub(super) last_problem: Option<String>,
    /// Set (for `/healthz`) when only a restart can help.
    pub(super) unhealthy: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Endpoints flagged shaped whose veth had no qdisc at the last check
    /// ([`crate::endpoint::sync_shaping`]).
    pub(super) unshaped: std::collections::BTreeSet<u32>,
    /// The UDP port [`gro::GRO_IFACE`] holds, when it could be made
    /// at start (then it is put back if removed).
    pub(super) gro_port: Option<u16>,
    /// The CNI conflist the agent installed (put back if removed).
    pub(super) cni_conf: Option<crate::cni::conflist::CniConf>,
    /// flannel-compat: flannel's conflist is kept aside too.
    pub(super) flannel_compat: bool,
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
    pub(super) fn check(
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
                    match weft0::setup(
                        self.v4.as_ref(),
                        self.v6.as_ref(),
                        self.pod_mtu,
                        &self.underlay,
                    ) {
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
                    .filter(|_| netdev::is_up(gro::GRO_IFACE) != Some(true))
                {
                    match gro::ensure(port) {
                        Ok(gro::Ensured::Present) => {}
                        Ok(gro::Ensured::Created) => {
                            tracing::warn!("{} was gone or changed (by something else?); made it again", gro::GRO_IFACE);
                            repaired(gro::GRO_IFACE);
                            // It sends VXLAN over IPv6: its new index is a
                            // load-time constant of the programs.
                            if self.globals.underlay6.is_some()
                                && let Err(e) = self.reload(dp, cfg)
                            {
                                restart.push(format!("{} was made again and reloading the dataplane for its new index failed: {e}; restart the agent", gro::GRO_IFACE));
                            }
                        }
                        // Deleted just now, the old socket may still hold
                        // the port for a moment: the next check retries.
                        Err(e) => problems.push(format!("re-creating {}: {e}", gro::GRO_IFACE)),
                    }
                }
                if let Some(conf) = &self.cni_conf {
                    match conf.ensure() {
                        Ok(crate::cni::conflist::Ensured::Present) => {}
                        Ok(crate::cni::conflist::Ensured::Written) => {
                            tracing::warn!(path = %conf.dest.display(), "the CNI configuration was removed or changed (by something else?); wrote it again");
                            repaired("cni-conf");
                        }
                        Err(e) => problems.push(e.to_string()),
                    }
                    if self.flannel_compat && super::takeover::disable_flannel_conflist(conf) {
                        repaired("flannel-conf");
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
        weft0::setup(
            self.v4.as_ref(),
            self.v6.as_ref(),
            self.pod_mtu,
            &self.underlay,
        )?;
        let globals = Globals {
            underlay_ifindex: iface.index,
            underlay_mac: iface.mac,
            underlay6: self
                .globals
                .underlay6
                .map(|(ip, index)| (ip, netdev::index(gro::GRO_IFACE).unwrap_or(index))),
            ..self.globals.clone()
        };
        let subnet = self.v4.map(|v| v.subnet);
        let subnet6 = self.v6.map(|v| v.subnet);
        let (new, decap) = bring_up(
            cfg,
            &globals,
            &self.underlay,
            subnet.as_ref(),
            subnet6.as_ref(),
        )?;
        *dp = new;
        self.globals = globals;
        self.decap = decap;
        Ok(())
    }

    /// The same for every pod in the endpoints map: both of its veth's
    /// programs. A pod is in the map only once the plugin has attached them
    /// (so the two never attach at once), and leaves it before its veth
    /// goes: errors (its veth just went) are not problems.
    fn check_pods(&self, dp: &mut Dataplane, maps: &Maps, repaired: &dyn Fn(&str)) {
        let ifaces: Vec<String> = maps
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, ep)| netdev::name(ep.ifindex))
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
