//! One reconcile: a registry snapshot becomes the node-facing maps, in the
//! shape of kube-rs's controller-rs: the desired state is computed from what
//! the registry says, applied as an idempotent diff, and the outcome handed
//! back for the caller to log and count.

use std::net::Ipv4Addr;

use crate::{
    cidr::Ipv4Cidr,
    dataplane::{DataplaneError, ip_key},
    registry::{
        Node, Snapshot,
        sync::{self, Changes, NodeMaps, Written},
    },
};

/// Why a snapshot was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "this node is missing from the registry (node {0}); keeping the current dataplane state"
    )]
    NotListed(String),
    #[error("applying the registry: {0}")]
    Maps(#[from] DataplaneError),
}

/// What a reconcile did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconciled {
    pub changes: Changes,
    /// The registry now gives this node another pod CIDR than the one its
    /// pods have: only a restart applies it.
    pub pod_cidr_changed: Option<Ipv4Cidr>,
}

/// Makes `maps` hold what `snap` says about the other nodes, and this node
/// `me` (as the agent started with it) at its detected `local_ip`, which
/// wins over the registry's. A snapshot that does not list `me` changes
/// nothing: the registry may be mid-update, and an empty map would cut
/// every pod off.
pub fn reconcile(
    snap: &Snapshot,
    me: &Node,
    local_ip: Ipv4Addr,
    maps: &mut impl NodeMaps,
    written: &mut Written,
) -> Result<Reconciled, ReconcileError> {
    let listed = snap
        .nodes
        .iter()
        .find(|n| n.name == me.name)
        .ok_or_else(|| ReconcileError::NotListed(me.name.clone()))?;
    let pod_cidr_changed = (listed.pod_cidr != me.pod_cidr).then_some(listed.pod_cidr);
    let mut want = sync::desired(&snap.nodes, &me.name);
    // This node at its detected address, which wins over the registry's.
    if let Some(own) = want.remotes.get_mut(&listed.pod_cidr) {
        own.underlay_ip = ip_key(local_ip);
    }
    let changes = sync::apply(maps, written, want)?;
    Ok(Reconciled {
        changes,
        pod_cidr_changed,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_common::{RemoteNode, Vtep};

    use super::*;
    use crate::dataplane::{ip_from_key, ip_key};

    /// The maps in memory, counting reads and writes; `fail` makes writes
    /// fail as a full map does.
    #[derive(Default)]
    struct Fake {
        remotes: BTreeMap<Ipv4Cidr, RemoteNode>,
        vteps: BTreeMap<u32, Vtep>,
        writes: usize,
        reads: std::cell::Cell<usize>,
        fail: bool,
    }

    impl NodeMaps for Fake {
        fn remotes(&self) -> BTreeMap<Ipv4Cidr, RemoteNode> {
            self.reads.set(self.reads.get() + 1);
            self.remotes.clone()
        }
        fn put_remote(&mut self, cidr: &Ipv4Cidr, node: RemoteNode) -> Result<(), DataplaneError> {
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
        fn del_remote(&mut self, cidr: &Ipv4Cidr) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.remotes.remove(cidr);
            Ok(())
        }
        fn vteps(&self) -> BTreeMap<u32, Vtep> {
            self.reads.set(self.reads.get() + 1);
            self.vteps.clone()
        }
        fn put_vtep(&mut self, ip: u32, vtep: Vtep) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.vteps.insert(ip, vtep);
            Ok(())
        }
        fn del_vtep(&mut self, ip: u32) -> Result<(), DataplaneError> {
            self.writes += 1;
            self.vteps.remove(&ip);
            Ok(())
        }
    }

    fn node(name: &str, ip: &str, cidr: &str) -> Node {
        let underlay_ip: Ipv4Addr = ip.parse().unwrap();
        Node {
            name: name.into(),
            underlay_ip,
            pod_cidr: cidr.parse().unwrap(),
            vtep_mac: crate::host::netdev::vtep_mac_for(underlay_ip),
        }
    }

    fn snap(nodes: Vec<Node>) -> Snapshot {
        Snapshot {
            nodes,
            problems: Vec::new(),
        }
    }

    #[test]
    fn a_snapshot_becomes_the_maps_and_a_repeat_writes_nothing() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let s = snap(vec![me.clone(), node("b", "198.18.0.2", "198.19.2.0/24")]);
        let mut maps = Fake::default();
        let mut w = Written::default();
        let local: Ipv4Addr = "198.18.0.9".parse().unwrap();
        let r = reconcile(&s, &me, local, &mut maps, &mut w).unwrap();
        assert_eq!(
            (r.changes.upserts, r.changes.removals),
            (3, 0),
            "two CIDRs, one peer"
        );
        assert_eq!(r.pod_cidr_changed, None);
        let own = maps.remotes[&me.pod_cidr];
        assert_eq!(
            ip_from_key(own.underlay_ip),
            local,
            "this node at its detected address"
        );
        assert_eq!(
            maps.vteps.keys().copied().collect::<Vec<_>>(),
            [ip_key("198.18.0.2".parse().unwrap())]
        );
        let writes = maps.writes;
        let r = reconcile(&s, &me, local, &mut maps, &mut w).unwrap();
        assert_eq!(r.changes, Changes::default());
        assert_eq!(maps.writes, writes, "nothing rewritten");
    }

    #[test]
    fn a_node_gone_from_the_registry_is_removed_and_one_moved_is_rewritten() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let local = me.underlay_ip;
        let mut maps = Fake::default();
        let mut w = Written::default();
        let all = snap(vec![
            me.clone(),
            node("b", "198.18.0.2", "198.19.2.0/24"),
            node("c", "198.18.0.3", "198.19.3.0/24"),
        ]);
        reconcile(&all, &me, local, &mut maps, &mut w).unwrap();
        let moved = snap(vec![me.clone(), node("b", "198.18.0.22", "198.19.2.0/24")]);
        let r = reconcile(&moved, &me, local, &mut maps, &mut w).unwrap();
        // c's CIDR and VTEP go; b's CIDR entry is rewritten, its old VTEP
        // replaced by the new one.
        assert_eq!((r.changes.upserts, r.changes.removals), (2, 3));
        assert_eq!(maps.remotes.len(), 2);
        assert_eq!(
            maps.vteps.keys().copied().collect::<Vec<_>>(),
            [ip_key("198.18.0.22".parse().unwrap())]
        );
    }

    #[test]
    fn the_maps_are_read_back_once_then_diffed_in_memory() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let b = node("b", "198.18.0.2", "198.19.2.0/24");
        let run = |nodes: &[&Node], maps: &mut Fake, w: &mut Written| {
            let nodes = nodes.iter().map(|&n| n.clone()).collect();
            reconcile(&snap(nodes), &me, me.underlay_ip, maps, w)
        };
        let mut maps = Fake::default();
        // What an earlier run left in the pinned maps: b, and a node gone
        // since.
        let c = node("c", "198.18.0.3", "198.19.3.0/24");
        run(&[&me, &b, &c], &mut maps, &mut Written::default()).unwrap();
        let mut w = Written::default();
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
            [ip_key(b.underlay_ip)]
        );
    }

    #[test]
    fn a_snapshot_without_this_node_changes_nothing() {
        let me = node("a", "198.18.0.1", "198.19.1.0/24");
        let mut maps = Fake::default();
        let mut w = Written::default();
        reconcile(
            &snap(vec![me.clone(), node("b", "198.18.0.2", "198.19.2.0/24")]),
            &me,
            me.underlay_ip,
            &mut maps,
            &mut w,
        )
        .unwrap();
        let writes = maps.writes;
        let e = reconcile(
            &snap(vec![node("b", "198.18.0.2", "198.19.2.0/24")]),
            &me,
            me.underlay_ip,
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
        let mut w = Written::default();
        let r = reconcile(
            &snap(vec![node("a", "198.18.0.1", "198.19.7.0/24")]),
            &me,
            me.underlay_ip,
            &mut maps,
            &mut w,
        )
        .unwrap();
        assert_eq!(r.pod_cidr_changed, Some("198.19.7.0/24".parse().unwrap()));
    }
}
