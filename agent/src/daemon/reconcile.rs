//! One reconcile: what the registry published becomes the node-facing
//! maps, in the shape of kube-rs's controller-rs: the desired state is
//! computed from what the registry says, applied as an idempotent diff, and
//! the outcome handed back for the caller to log and count. When the
//! registry's journal says which nodes changed since the last reconcile,
//! only theirs are looked at and written.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{
    dataplane::DataplaneError,
    registry::{
        Node, Published,
        sync::{self, Changes, Local, NodeMaps, Written},
    },
};

/// Why an update was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "this node is missing from the registry (node {0}); keeping the current dataplane state"
    )]
    NotListed(String),
    #[error("applying the registry: {0}")]
    Maps(#[from] DataplaneError),
    /// [`Update::read`] against another [`Written`] than this one.
    #[error(
        "the registry's changes were read for maps in an unknown state; the next change applies the whole set"
    )]
    Unknown,
}

/// What a reconcile did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconciled {
    pub changes: Changes,
    /// The registry now gives this node other pod CIDRs than the ones its
    /// pods have (what it lists now): only a restart applies them.
    pub pod_cidr_changed: Option<String>,
    /// Only the changed nodes were looked at (not the whole set).
    pub incremental: bool,
}

/// What the agent takes from [`Published`] for one reconcile, copied out
/// so that the registry is not held up while the maps are written.
#[derive(Clone, Debug)]
pub struct Update {
    pub generation: u64,
    /// This node's entry, if listed.
    pub me: Option<Node>,
    pub work: Work,
    /// How many nodes and problems the registry has.
    pub nodes: usize,
    pub problems: usize,
    /// The registry's own time for its latest change.
    pub registry_took: std::time::Duration,
}

/// The nodes to look at.
#[derive(Clone, Debug)]
pub enum Work {
    /// The whole set.
    All(Vec<Node>),
    /// The nodes named changed since what is written (`None`: gone).
    Changed(Vec<(String, Option<Node>)>),
}

impl Update {
    /// What `published` holds for an agent `me` that has written `written`.
    pub fn read(published: &Published, written: &Written, me: &str) -> Self {
        let changed = written
            .generation()
            .and_then(|g| published.changed_since(g));
        let work = match changed {
            Some(names) => Work::Changed(
                names
                    .into_iter()
                    .map(|n| (n.to_string(), published.nodes.get(n).cloned()))
                    .collect(),
            ),
            None => Work::All(published.nodes.values().cloned().collect()),
        };
        Self {
            generation: published.generation,
            me: published.nodes.get(me).cloned(),
            work,
            nodes: published.nodes.len(),
            problems: published.problems.len(),
            registry_took: published.took,
        }
    }
}

/// Makes `maps` hold what `update` says about the other nodes, and this
/// node `me` (as the agent started with it) at its detected `local_ip`,
/// which wins over the registry's (and its IPv6 underlay address
/// `local_ip6`, if it has one, and whether it sends VXLAN over it, `send6`). An update that does not list `me`
/// changes nothing: the registry may be mid-update, and an empty map would
/// cut every pod off (what changed meanwhile is applied once it lists `me`
/// again).
pub fn reconcile(
    update: &Update,
    me: &Node,
    local_ip: Option<Ipv4Addr>,
    local_ip6: Option<Ipv6Addr>,
    send6: bool,
    maps: &mut impl NodeMaps,
    written: &mut Written,
) -> Result<Reconciled, ReconcileError> {
    let listed = update
        .me
        .as_ref()
        .ok_or_else(|| ReconcileError::NotListed(me.name.clone()))?;
    let pod_cidr_changed = (listed.pod_cidr != me.pod_cidr || listed.pod_cidr6 != me.pod_cidr6)
        .then(|| pod_cidrs(listed));
    let local = Local {
        name: &me.name,
        ip: local_ip,
        ip6: local_ip6,
        send6,
    };
    let (changes, incremental) = match &update.work {
        Work::Changed(c) => match sync::apply_changes(maps, written, c, local)? {
            Some(changes) => (changes, true),
            None => return Err(ReconcileError::Unknown),
        },
        Work::All(nodes) => (sync::apply(maps, written, nodes, local)?, false),
    };
    written.set_generation(update.generation);
    Ok(Reconciled {
        changes,
        pod_cidr_changed,
        incremental,
    })
}

/// `n`'s pod CIDRs, for the log: `198.18.1.0/24, 2001:2:0:1::/64`.
pub fn pod_cidrs(n: &Node) -> String {
    sync::cidrs(n)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_common::{RemoteNode, Vtep};

    use super::*;
    use crate::dataplane::{ip_from_key, ip_key};
    use crate::registry::Snapshot;
    use crate::{
        cidr::{AnyCidr, ClusterCidrs},
        registry::sync::VtepKey,
    };

    /// The maps in memory, counting reads and writes; `fail` makes writes
    /// fail as a full map does.
    #[derive(Default)]
    struct Fake {
        remotes: BTreeMap<AnyCidr, RemoteNode>,
        vteps: BTreeMap<VtepKey, Vtep>,
        writes: usize,
        reads: std::cell::Cell<usize>,
        fail: bool,
    }

    impl NodeMaps for Fake {
        fn remotes(&self) -> BTreeMap<AnyCidr, RemoteNode> {
            self.reads.set(self.reads.get() + 1);
            self.remotes.clone()
        }
        fn put_remote(&mut self, cidr: &AnyCidr, node: RemoteNode) -> Result<(), DataplaneError> {
            if self.fail {
                return Err(DataplaneError::Map {
                    name: weft_common::names::REMOTE_CIDRS,
                    source: aya::maps::MapError::KeyNotFound,
                });
            }
            self.writes += 1;
            self.remotes.insert(*cidr, node);
            Ok(())
        }
        fn del_remote(&mut self, cidr: &AnyCidr) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.remotes.remove(cidr);
            Ok(())
        }
        fn vteps(&self) -> BTreeMap<VtepKey, Vtep> {
            self.reads.set(self.reads.get() + 1);
            self.vteps.clone()
        }
        fn put_vtep(&mut self, ip: VtepKey, vtep: Vtep) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.vteps.insert(ip, vtep);
            Ok(())
        }
        fn del_vtep(&mut self, ip: VtepKey) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.vteps.remove(&ip);
            Ok(())
        }
    }

    fn node(name: &str, ip: &str, cidr: &str) -> Node {
        let underlay_ip: Ipv4Addr = ip.parse().unwrap();
        Node {
            name: name.into(),
            underlay_ip: Some(underlay_ip),
            pod_cidr: Some(cidr.parse().unwrap()),
            pod_cidr6: None,
            vtep_mac: crate::host::netdev::vtep_mac_for(underlay_ip),
            underlay6: None,
        }
    }

    fn clusters() -> ClusterCidrs {
        ClusterCidrs {
            v4: Some("198.19.0.0/16".parse().unwrap()),
            v6: Some("2001:2::/48".parse().unwrap()),
        }
    }

    fn snap(nodes: Vec<Node>) -> Snapshot {
        Snapshot::validated(
            nodes,
            Vec::new(),
            &clusters(),
            crate::registry::Vocabulary::FILE,
        )
    }

    /// An agent's side: what it wrote, and the registry it reads.
    #[derive(Default)]
    struct Agent {
        written: Written,
        published: Published,
    }

    /// The registry publishes `s` (a full set); the agent reconciles it.
    fn run_snap(
        s: &Snapshot,
        me: &Node,
        local: Ipv4Addr,
        maps: &mut Fake,
        a: &mut Agent,
    ) -> Result<Reconciled, ReconcileError> {
        a.published.replace(s.clone());
        let u = Update::read(&a.published, &a.written, &me.name);
        reconcile(&u, me, Some(local), None, false, maps, &mut a.written)
    }

    #[test]
    fn a_snapshot_becomes_the_maps_and_a_repeat_writes_nothing() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let s = snap(vec![me.clone(), node("b", "198.18.0.2", "198.19.2.0/24")]);
        let mut maps = Fake::default();
        let mut w = Agent::default();
        let local: Ipv4Addr = "198.18.0.9".parse().unwrap();
        let r = run_snap(&s, &me, local, &mut maps, &mut w).unwrap();
        assert_eq!(
            (r.changes.upserts, r.changes.removals),
            (3, 0),
            "two CIDRs, one peer"
        );
        assert_eq!(r.pod_cidr_changed, None);
        let own = maps.remotes[&AnyCidr::V4(me.pod_cidr.unwrap())];
        assert_eq!(
            ip_from_key(own.underlay_ip),
            local,
            "this node at its detected address"
        );
        assert_eq!(
            maps.vteps.keys().copied().collect::<Vec<_>>(),
            [VtepKey::V4(ip_key("198.18.0.2".parse().unwrap()))]
        );
        let writes = maps.writes;
        let r = run_snap(&s, &me, local, &mut maps, &mut w).unwrap();
        assert_eq!(r.changes, Changes::default());
        assert_eq!(maps.writes, writes, "nothing rewritten");
    }

    #[test]
    fn a_node_gone_from_the_registry_is_removed_and_one_moved_is_rewritten() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let local = me.underlay_ip.unwrap();
        let mut maps = Fake::default();
        let mut w = Agent::default();
        let all = snap(vec![
            me.clone(),
            node("b", "198.18.0.2", "198.19.2.0/24"),
            node("c", "198.18.0.3", "198.19.3.0/24"),
        ]);
        run_snap(&all, &me, local, &mut maps, &mut w).unwrap();
        let moved = snap(vec![me.clone(), node("b", "198.18.0.22", "198.19.2.0/24")]);
        let r = run_snap(&moved, &me, local, &mut maps, &mut w).unwrap();
        // c's CIDR and VTEP go; b's CIDR entry is rewritten, its old VTEP
        // replaced by the new one.
        assert_eq!((r.changes.upserts, r.changes.removals), (2, 3));
        assert_eq!(maps.remotes.len(), 2);
        assert_eq!(
            maps.vteps.keys().copied().collect::<Vec<_>>(),
            [VtepKey::V4(ip_key("198.18.0.22".parse().unwrap()))]
        );
    }

    #[test]
    fn the_maps_are_read_back_once_then_diffed_in_memory() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let b = node("b", "198.18.0.2", "198.19.2.0/24");
        let run = |nodes: &[&Node], maps: &mut Fake, w: &mut Agent| {
            let nodes = nodes.iter().map(|&n| n.clone()).collect();
            run_snap(&snap(nodes), &me, me.underlay_ip.unwrap(), maps, w)
        };
        let mut maps = Fake::default();
        // What an earlier run left in the pinned maps: b, and a node gone
        // since.
        let c = node("c", "198.18.0.3", "198.19.3.0/24");
        run(&[&me, &b, &c], &mut maps, &mut Agent::default()).unwrap();
        let mut w = Agent::default();
        maps.reads.set(0);
        let r = run(&[&me, &b], &mut maps, &mut w).unwrap();
        assert_eq!(maps.reads.get(), 2, "both maps read back at start");
        assert_eq!((r.changes.upserts, r.changes.removals), (0, 2), "c removed");
        // One node changes: its entries written, nothing read.
        let moved = node("b", "198.18.0.22", "198.19.2.0/24");
        let writes = maps.writes;
        let r = run(&[&me, &moved], &mut maps, &mut w).unwrap();
        assert_eq!(maps.reads.get(), 2, "no read-back");
        assert_eq!((r.changes.upserts, r.changes.removals), (2, 1));
        assert_eq!(maps.writes - writes, 3, "b's entries only");
        // A failed write: the next apply reads back, and finishes the job.
        maps.fail = true;
        let e = run(&[&me, &b], &mut maps, &mut w);
        assert!(matches!(e, Err(ReconcileError::Maps(_))), "{e:?}");
        maps.fail = false;
        let r = run(&[&me, &b], &mut maps, &mut w).unwrap();
        assert_eq!(maps.reads.get(), 4, "read back after the failure");
        assert_eq!((r.changes.upserts, r.changes.removals), (2, 1));
        assert_eq!(
            maps.vteps.keys().copied().collect::<Vec<_>>(),
            [VtepKey::V4(ip_key(b.underlay_ip.unwrap()))]
        );
    }

    #[test]
    fn a_snapshot_without_this_node_changes_nothing() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let mut maps = Fake::default();
        let mut w = Agent::default();
        run_snap(
            &snap(vec![me.clone(), node("b", "198.18.0.2", "198.19.2.0/24")]),
            &me,
            me.underlay_ip.unwrap(),
            &mut maps,
            &mut w,
        )
        .unwrap();
        let writes = maps.writes;
        let e = run_snap(
            &snap(vec![node("b", "198.18.0.2", "198.19.2.0/24")]),
            &me,
            me.underlay_ip.unwrap(),
            &mut maps,
            &mut w,
        )
        .unwrap_err();
        assert!(
            matches!(e, ReconcileError::NotListed(ref n) if n == "a"),
            "{e}"
        );
        assert_eq!(maps.writes, writes);
        assert_eq!(maps.remotes.len(), 2, "the dataplane keeps forwarding");
    }

    #[test]
    fn a_changed_own_pod_cidr_is_reported() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let mut maps = Fake::default();
        let mut w = Agent::default();
        let r = run_snap(
            &snap(vec![node("a", "198.18.0.1", "198.19.7.0/24")]),
            &me,
            me.underlay_ip.unwrap(),
            &mut maps,
            &mut w,
        )
        .unwrap();
        assert_eq!(r.pod_cidr_changed.as_deref(), Some("198.19.7.0/24"));
    }

    #[test]
    fn changes_applied_node_by_node_leave_what_a_full_apply_would() {
        let me = node("a", "198.18.0.1", "198.19.0.0/24");
        let local: Ipv4Addr = "198.18.0.200".parse().unwrap();
        let cluster = clusters();
        let mut next = crate::registry::tests::rng(11);
        let mut a = Agent::default();
        let mut maps = Fake::default();
        // What the registry's source says (validated on publishing).
        let mut source: BTreeMap<String, Node> = BTreeMap::from([(me.name.clone(), me.clone())]);
        let mut incremental = 0;
        for round in 0..400 {
            for _ in 0..1 + next(3) {
                let name = format!("n{}", next(25));
                if next(3) == 0 {
                    source.remove(&name);
                    if a.published.update(&name, None, &cluster) {
                        continue;
                    }
                } else {
                    let mut n = node(
                        &name,
                        &format!("198.18.0.{}", 2 + next(40)),
                        &format!("198.19.{}.0/24", 1 + next(40)),
                    );
                    // Dual-stack nodes among IPv4-only ones: their IPv6
                    // entries come and go with them.
                    if next(2) == 0 {
                        n.pod_cidr6 =
                            Some(format!("2001:2:0:{:x}::/64", 1 + next(40)).parse().unwrap());
                    }
                    source.insert(name.clone(), n.clone());
                    if next(2) == 0 && a.published.update(&name, Some(n), &cluster) {
                        continue;
                    }
                }
                a.published
                    .replace(snap(source.values().cloned().collect()));
            }
            let u = Update::read(&a.published, &a.written, &me.name);
            let r =
                reconcile(&u, &me, Some(local), None, false, &mut maps, &mut a.written).unwrap();
            incremental += usize::from(r.incremental);
            let want = sync::desired(
                a.published.nodes.values(),
                Local {
                    name: &me.name,
                    ip: Some(local),
                    ip6: None,
                    send6: false,
                },
            );
            assert_eq!(maps.remotes, want.remotes, "round {round}");
            assert_eq!(maps.vteps, want.vteps, "round {round}");
        }
        assert!(incremental > 300, "mostly node by node: {incremental}");
    }
}
