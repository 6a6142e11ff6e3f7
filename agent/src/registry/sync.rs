//! Desired state → maps: an idempotent diff that never rewrites an entry that
//! did not change and removes what the registry no longer lists.

use std::collections::BTreeMap;

use aya::maps::lpm_trie::Key;
use weft_common::{RemoteNode, Vtep};

use crate::{
    cidr::Ipv4Cidr,
    dataplane::{DataplaneError, Maps, ip_from_key, ip_key},
    registry::Node,
};

/// What the node-facing maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Pod CIDR → owner. Our own CIDR maps to our own underlay address.
    pub remotes: BTreeMap<Ipv4Cidr, RemoteNode>,
    /// Underlay addresses of peers (not ourselves).
    pub vteps: BTreeMap<u32, Vtep>,
}

/// Builds the desired state from the registry's nodes; `local` is this node's
/// name. Collected rather than inserted one by one: a `BTreeMap` built from
/// an iterator is sorted once and bulk-built.
pub fn desired(nodes: &[Node], local: &str) -> Desired {
    Desired {
        remotes: nodes
            .iter()
            .map(|n| {
                let owner = RemoteNode {
                    underlay_ip: ip_key(n.underlay_ip),
                    vtep_mac: n.vtep_mac,
                    _pad: [0; 2],
                };
                (n.pod_cidr, owner)
            })
            .collect(),
        vteps: nodes
            .iter()
            .filter(|n| n.name != local)
            .map(|n| (ip_key(n.underlay_ip), Vtep::default()))
            .collect(),
    }
}

/// What turns `have` into `want`: the entries to write (new or changed)
/// and the keys to remove, found in one merged walk of the two sorted maps.
fn differences<K: Ord + Copy, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let (mut puts, mut dels) = (Vec::new(), Vec::new());
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some((hk, _)), None) => {
                dels.push(**hk);
                h.next();
            }
            (None, Some((wk, wv))) => {
                puts.push((**wk, **wv));
                w.next();
            }
            (Some((hk, hv)), Some((wk, wv))) => match hk.cmp(wk) {
                std::cmp::Ordering::Less => {
                    dels.push(**hk);
                    h.next();
                }
                std::cmp::Ordering::Greater => {
                    puts.push((**wk, **wv));
                    w.next();
                }
                std::cmp::Ordering::Equal => {
                    if hv != wv {
                        puts.push((**wk, **wv));
                    }
                    h.next();
                    w.next();
                }
            },
        }
    }
    (puts, dels)
}

/// The node-facing maps as [`apply`] reads and writes them: the pinned BPF
/// maps ([`Maps`]), or a store in memory in tests.
pub trait NodeMaps {
    /// Pod CIDR → owner, as the map holds it now.
    fn remotes(&self) -> BTreeMap<Ipv4Cidr, RemoteNode>;
    fn put_remote(&mut self, cidr: &Ipv4Cidr, node: RemoteNode) -> Result<(), DataplaneError>;
    fn del_remote(&mut self, cidr: &Ipv4Cidr) -> Result<(), DataplaneError>;
    /// Peers' underlay addresses, as the map holds them now.
    fn vteps(&self) -> BTreeMap<u32, Vtep>;
    fn put_vtep(&mut self, ip: u32, vtep: Vtep) -> Result<(), DataplaneError>;
    fn del_vtep(&mut self, ip: u32) -> Result<(), DataplaneError>;
}

fn lpm_key(cidr: &Ipv4Cidr) -> Key<[u8; 4]> {
    Key::new(u32::from(cidr.prefix()), cidr.addr().octets())
}

impl NodeMaps for Maps {
    fn remotes(&self) -> BTreeMap<Ipv4Cidr, RemoteNode> {
        self.remotes
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Cidr::new(k.data().into(), k.prefix_len() as u8), v))
            .collect()
    }

    fn put_remote(&mut self, cidr: &Ipv4Cidr, node: RemoteNode) -> Result<(), DataplaneError> {
        self.remotes
            .insert(&lpm_key(cidr), node, 0)
            .map_err(|source| DataplaneError::Map {
                name: weft_common::names::REMOTE_CIDRS,
                source,
            })
    }

    fn del_remote(&mut self, cidr: &Ipv4Cidr) -> Result<(), DataplaneError> {
        self.remotes
            .remove(&lpm_key(cidr))
            .map_err(|source| DataplaneError::Map {
                name: weft_common::names::REMOTE_CIDRS,
                source,
            })
    }

    fn vteps(&self) -> BTreeMap<u32, Vtep> {
        self.nodes.iter().filter_map(Result::ok).collect()
    }

    fn put_vtep(&mut self, ip: u32, vtep: Vtep) -> Result<(), DataplaneError> {
        self.nodes
            .insert(ip, vtep, 0)
            .map_err(|source| DataplaneError::Map {
                name: weft_common::names::NODES,
                source,
            })
    }

    fn del_vtep(&mut self, ip: u32) -> Result<(), DataplaneError> {
        self.nodes
            .remove(&ip)
            .map_err(|source| DataplaneError::Map {
                name: weft_common::names::NODES,
                source,
            })
    }
}

/// What one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserts: usize,
    pub removals: usize,
}

/// What the node-facing maps hold, as [`apply`] last made them. Only the
/// agent writes those maps, so after the first apply the diff runs against
/// this copy in memory instead of reading both maps back through the BPF
/// syscalls (two per entry: 35–60 ms an apply at 5,000 nodes,
/// docs/SCALE.md). Unknown at start (the pinned maps of an earlier run are
/// read back once) and after a failed write (read back again).
#[derive(Debug, Default)]
pub struct Written(Option<Desired>);

/// Makes the maps equal to `want`, touching only entries that differ.
pub fn apply(
    maps: &mut impl NodeMaps,
    written: &mut Written,
    want: Desired,
) -> Result<Changes, DataplaneError> {
    let mut c = Changes::default();
    // Taken: if a write below fails, the next apply reads the maps back.
    let (have_remotes, have_vteps) = match written.0.take() {
        Some(d) => (d.remotes, d.vteps),
        None => (maps.remotes(), maps.vteps()),
    };
    // Within each map writes before removals: a node whose pod CIDR moves is
    // never without an entry.
    let (puts, dels) = differences(&have_remotes, &want.remotes);
    for (cidr, node) in puts {
        maps.put_remote(&cidr, node)?;
        c.upserts += 1;
    }
    for cidr in dels {
        maps.del_remote(&cidr)?;
        c.removals += 1;
    }
    let (puts, dels) = differences(&have_vteps, &want.vteps);
    for (ip, v) in puts {
        maps.put_vtep(ip, v)?;
        c.upserts += 1;
    }
    for ip in dels {
        maps.del_vtep(ip)?;
        c.removals += 1;
    }
    if c.upserts + c.removals > 0 {
        tracing::debug!(?c, vteps = ?want.vteps.keys().map(|k| ip_from_key(*k)).collect::<Vec<_>>(), "maps reconciled");
    }
    written.0 = Some(want);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_found_in_one_walk() {
        let have = BTreeMap::from([(1, 'a'), (2, 'b'), (4, 'd'), (6, 'f')]);
        let want = BTreeMap::from([(0, 'z'), (2, 'b'), (4, 'D'), (5, 'e')]);
        let (puts, dels) = differences(&have, &want);
        assert_eq!(puts, [(0, 'z'), (4, 'D'), (5, 'e')]);
        assert_eq!(dels, [1, 6]);
        assert_eq!(differences(&want, &want), (vec![], vec![]));
        assert_eq!(
            differences(&BTreeMap::new(), &want).0.len(),
            want.len(),
            "from nothing: every entry"
        );
        assert_eq!(differences(&have, &BTreeMap::new()).1, [1, 2, 4, 6]);
    }

    #[test]
    fn desired_marks_self_and_peers() {
        let nodes = vec![
            Node {
                name: "a".into(),
                underlay_ip: "198.18.0.1".parse().unwrap(),
                pod_cidr: "198.19.1.0/24".parse().unwrap(),
                vtep_mac: [2, 0, 0, 0, 0, 1],
            },
            Node {
                name: "b".into(),
                underlay_ip: "198.18.0.2".parse().unwrap(),
                pod_cidr: "198.19.2.0/24".parse().unwrap(),
                vtep_mac: [2, 0, 0, 0, 0, 2],
            },
        ];
        let d = desired(&nodes, "a");
        assert_eq!(d.remotes.len(), 2);
        assert_eq!(d.vteps.len(), 1);
        assert!(d.vteps.contains_key(&ip_key("198.18.0.2".parse().unwrap())));
        let own = d.remotes[&"198.19.1.0/24".parse().unwrap()];
        assert_eq!(
            ip_from_key(own.underlay_ip),
            "198.18.0.1".parse::<std::net::Ipv4Addr>().unwrap()
        );
    }
}
