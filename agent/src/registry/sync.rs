//! Desired state → maps: an idempotent diff that never rewrites an entry that
//! did not change and removes what the registry no longer lists.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::lpm_trie::Key;
use weft_common::{Ipv6Key, RemoteNode, Vtep, names};

use crate::{
    cidr::{AnyCidr, Ipv4Cidr, Ipv6Cidr},
    dataplane::{DataplaneError, Maps, ip_from_key, ip_key},
    registry::Node,
};

/// What the node-facing maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Pod CIDR (either family) → owner. Our own CIDRs map to our own
    /// underlay address.
    pub remotes: BTreeMap<AnyCidr, RemoteNode>,
    /// Underlay addresses of peers (not ourselves), either family.
    pub vteps: BTreeMap<VtepKey, Vtep>,
}

/// A peer's underlay address as the VTEP maps key it: `NODES` (IPv4,
/// network order) or `NODES6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VtepKey {
    V4(u32),
    V6(Ipv6Key),
}

impl std::fmt::Display for VtepKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VtepKey::V4(k) => ip_from_key(*k).fmt(f),
            VtepKey::V6(k) => Ipv6Addr::from(*k).fmt(f),
        }
    }
}

/// A node's VTEP keys: its IPv4 underlay address, and its IPv6 one when
/// VXLAN over IPv6 is taken with it (none for this node itself). The IPv4
/// one is taken only where both have one.
pub type Vteps = [Option<VtepKey>; 2];

/// This node as the maps see it: its name, and its IPv4 underlay address
/// (the detected one, which wins over the registry's; none on an IPv6-only
/// node); its IPv6 underlay address, if it has one (VXLAN over IPv6 is
/// taken in from peers that have one too), and whether it also sends over
/// IPv6 (its tunnel device is in place).
#[derive(Clone, Copy, Debug)]
pub struct Local<'a> {
    pub name: &'a str,
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub send6: bool,
}

/// One node's entries: each pod CIDR's owner, and (for a peer) its
/// underlay addresses as VTEP keys. Its IPv6 pods' VXLAN goes over IPv6
/// when both it and this node have an IPv6 underlay (as flannel's
/// `flannel-v6.1`) and this node can send over it; everything else over
/// IPv4, where both have an IPv4 underlay. VXLAN over IPv6 from it is
/// accepted whenever both have one (it sends so, as this node's entry
/// tells it). A peer's pod CIDR that no underlay of this node reaches (an
/// IPv6-only peer seen from a node that cannot send over IPv6) gets no
/// entry: its packets are dropped as `no_route`, not sent to 0.0.0.0.
/// This node's own entries are flagged [`RemoteNode::FLAG_OWN`].
fn entries(n: &Node, local: Local<'_>) -> (NodeOwners, Vteps) {
    let me = n.name == local.name;
    let both6 = n.underlay6.filter(|_| !me && local.ip6.is_some());
    let both4 = n.underlay_ip.filter(|_| !me && local.ip.is_some());
    let owner = RemoteNode {
        underlay_ip: ip_key(match (me, local.ip, n.underlay_ip) {
            (true, Some(ip), _) | (false, _, Some(ip)) => ip,
            _ => Ipv4Addr::UNSPECIFIED,
        }),
        vtep_mac: n.vtep_mac,
        flags: if me { RemoteNode::FLAG_OWN } else { 0 },
        ..RemoteNode::default()
    };
    let owner4 = (me || both4.is_some()).then_some(owner);
    let owner6 = match both6.filter(|_| local.send6) {
        Some(u6) => Some(RemoteNode {
            vtep_mac: u6.vtep_mac,
            flags: RemoteNode::FLAG_UNDERLAY6,
            underlay_ip6: u6.ip.octets(),
            ..owner
        }),
        None => owner4,
    };
    let owners = n
        .pod_cidr
        .zip(owner4)
        .map(|(c, o)| (AnyCidr::V4(c), o))
        .into_iter()
        .chain(n.pod_cidr6.zip(owner6).map(|(c, o)| (AnyCidr::V6(c), o)));
    let vteps = [
        both4.map(|ip| VtepKey::V4(ip_key(ip))),
        both6.map(|u6| VtepKey::V6(u6.ip.octets())),
    ];
    (owners, vteps)
}

/// A node's pod CIDRs with their owner entries, as [`entries`] gives them.
type NodeOwners = std::iter::Chain<
    std::option::IntoIter<(AnyCidr, RemoteNode)>,
    std::option::IntoIter<(AnyCidr, RemoteNode)>,
>;

/// A node's pod CIDRs: the IPv4 one, the IPv6 one, or both.
pub fn cidrs(n: &Node) -> NodeCidrs {
    n.pod_cidr
        .map(AnyCidr::V4)
        .into_iter()
        .chain(n.pod_cidr6.map(AnyCidr::V6))
}

/// Builds the desired state from the registry's nodes. Collected rather
/// than inserted one by one: a `BTreeMap` built from an iterator is sorted
/// once and bulk-built.
pub fn desired<'a>(nodes: impl IntoIterator<Item = &'a Node>, local: Local<'_>) -> Desired {
    let all: Vec<_> = nodes.into_iter().map(|n| entries(n, local)).collect();
    Desired {
        remotes: all.iter().flat_map(|(o, _)| o.clone()).collect(),
        vteps: all
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().map(|k| (*k, Vtep::default())))
            .collect(),
    }
}

/// The keys whose entry differs between the two sorted maps, with the entry
/// `want` has (`None`: gone), found in one merged walk.
pub(crate) fn changed<'a, K: Ord, V: PartialEq>(
    have: &'a BTreeMap<K, V>,
    want: &'a BTreeMap<K, V>,
) -> Vec<(&'a K, Option<&'a V>)> {
    let mut out = Vec::new();
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        let order = match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((hk, _)), Some((wk, _))) => hk.cmp(wk),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (k, _) = h.next().expect("peeked");
                out.push((k, None));
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = w.next().expect("peeked");
                out.push((k, Some(v)));
            }
            std::cmp::Ordering::Equal => {
                let ((k, hv), (_, wv)) = (h.next().expect("peeked"), w.next().expect("peeked"));
                if hv != wv {
                    out.push((k, Some(wv)));
                }
            }
        }
    }
    out
}

/// What turns `have` into `want`: the entries to write (new or changed)
/// and the keys to remove.
fn differences<K: Ord + Copy, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> Diff<K, V> {
    let (mut puts, mut dels) = (Vec::new(), Vec::new());
    for (k, v) in changed(have, want) {
        match v {
            Some(v) => puts.push((*k, *v)),
            None => dels.push(*k),
        }
    }
    (puts, dels)
}

/// The node-facing maps as [`apply`] reads and writes them: the pinned BPF
/// maps ([`Maps`]), or a store in memory in tests.
pub trait NodeMaps {
    /// Pod CIDR → owner, as the maps (one per family) hold it now.
    fn remotes(&self) -> BTreeMap<AnyCidr, RemoteNode>;
    fn put_remote(&mut self, cidr: &AnyCidr, node: RemoteNode) -> Result<(), DataplaneError>;
    fn del_remote(&mut self, cidr: &AnyCidr) -> Result<(), DataplaneError>;
    /// Peers' underlay addresses, as the maps (one per family) hold them now.
    fn vteps(&self) -> BTreeMap<VtepKey, Vtep>;
    fn put_vtep(&mut self, ip: VtepKey, vtep: Vtep) -> Result<(), DataplaneError>;
    fn del_vtep(&mut self, ip: VtepKey) -> Result<(), DataplaneError>;
}

impl NodeMaps for Maps {
    fn remotes(&self) -> BTreeMap<AnyCidr, RemoteNode> {
        let v4 = self.remotes.iter().filter_map(Result::ok).map(|(k, v)| {
            let c = Ipv4Cidr::new(k.data().into(), k.prefix_len() as u8);
            (AnyCidr::V4(c), v)
        });
        let v6 = self.remotes6.iter().filter_map(Result::ok).map(|(k, v)| {
            let c = Ipv6Cidr::new(k.data().into(), k.prefix_len() as u8);
            (AnyCidr::V6(c), v)
        });
        v4.chain(v6).collect()
    }

    fn put_remote(&mut self, cidr: &AnyCidr, node: RemoteNode) -> Result<(), DataplaneError> {
        match cidr {
            AnyCidr::V4(c) => self
                .remotes
                .insert(&Key::new(c.prefix().into(), c.addr().octets()), node, 0)
                .map_err(map_error(names::REMOTE_CIDRS)),
            AnyCidr::V6(c) => self
                .remotes6
                .insert(&Key::new(c.prefix().into(), c.addr().octets()), node, 0)
                .map_err(map_error(names::REMOTE_CIDRS6)),
        }
    }

    fn del_remote(&mut self, cidr: &AnyCidr) -> Result<(), DataplaneError> {
        match cidr {
            AnyCidr::V4(c) => self
                .remotes
                .remove(&Key::new(c.prefix().into(), c.addr().octets()))
                .map_err(map_error(names::REMOTE_CIDRS)),
            AnyCidr::V6(c) => self
                .remotes6
                .remove(&Key::new(c.prefix().into(), c.addr().octets()))
                .map_err(map_error(names::REMOTE_CIDRS6)),
        }
    }

    fn vteps(&self) -> BTreeMap<VtepKey, Vtep> {
        let v4 = self.nodes.iter().filter_map(Result::ok);
        let v6 = self.nodes6.iter().filter_map(Result::ok);
        v4.map(|(k, v)| (VtepKey::V4(k), v))
            .chain(v6.map(|(k, v)| (VtepKey::V6(k), v)))
            .collect()
    }

    fn put_vtep(&mut self, ip: VtepKey, vtep: Vtep) -> Result<(), DataplaneError> {
        match ip {
            VtepKey::V4(k) => self
                .nodes
                .insert(k, vtep, 0)
                .map_err(map_error(names::NODES)),
            VtepKey::V6(k) => self
                .nodes6
                .insert(k, vtep, 0)
                .map_err(map_error(names::NODES6)),
        }
    }

    fn del_vtep(&mut self, ip: VtepKey) -> Result<(), DataplaneError> {
        match ip {
            VtepKey::V4(k) => self.nodes.remove(&k).map_err(map_error(names::NODES)),
            VtepKey::V6(k) => self.nodes6.remove(&k).map_err(map_error(names::NODES6)),
        }
    }
}

/// A node's pod CIDRs as [`cidrs`] lists them.
pub type NodeCidrs =
    std::iter::Chain<std::option::IntoIter<AnyCidr>, std::option::IntoIter<AnyCidr>>;

/// The map error of a failed write to map `name`.
fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// What one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserts: usize,
    pub removals: usize,
}

/// What the node-facing maps hold, as [`apply`] or [`apply_changes`] last
/// made them. Only the agent writes those maps, so after the first apply the
/// diff runs against this copy in memory instead of reading both maps back
/// through the BPF syscalls (two per entry: 35–60 ms an apply at 5,000
/// nodes, docs/SCALE.md). Unknown at start (the pinned maps of an earlier
/// run are read back once) and after a failed write (read back again).
#[derive(Debug, Default)]
pub struct Written(Option<State>);

#[derive(Debug)]
struct State {
    desired: Desired,
    /// Each node's entries: pod CIDRs and VTEP keys (none for this node).
    owners: HashMap<String, (NodeCidrs, Vteps)>,
    /// The registry's generation these are (`Published::generation`).
    generation: u64,
}

impl Written {
    /// The registry generation last applied, if the maps are known.
    pub fn generation(&self) -> Option<u64> {
        self.0.as_ref().map(|s| s.generation)
    }

    /// Marks what is written as registry generation `g`.
    pub fn set_generation(&mut self, g: u64) {
        if let Some(s) = &mut self.0 {
            s.generation = g;
        }
    }
}

/// What one map needs: the entries to put and the keys to remove.
type Diff<K, V> = (Vec<(K, V)>, Vec<K>);

/// Writes both maps' differences, each map's puts before its removals (a
/// node whose pod CIDR moves is never without an entry).
fn write(
    maps: &mut impl NodeMaps,
    (put_r, del_r): Diff<AnyCidr, RemoteNode>,
    (put_v, del_v): Diff<VtepKey, Vtep>,
) -> Result<Changes, DataplaneError> {
    let mut c = Changes::default();
    for (cidr, node) in put_r {
        maps.put_remote(&cidr, node)?;
        c.upserts += 1;
    }
    for cidr in del_r {
        maps.del_remote(&cidr)?;
        c.removals += 1;
    }
    for (ip, v) in put_v {
        maps.put_vtep(ip, v)?;
        c.upserts += 1;
    }
    for ip in del_v {
        maps.del_vtep(ip)?;
        c.removals += 1;
    }
    Ok(c)
}

/// Makes the maps equal to `want` (the whole node set, `nodes`' entries),
/// touching only entries that differ.
pub fn apply<'a>(
    maps: &mut impl NodeMaps,
    written: &mut Written,
    nodes: impl IntoIterator<Item = &'a Node> + Clone,
    local: Local<'_>,
) -> Result<Changes, DataplaneError> {
    let want = desired(nodes.clone(), local);
    // Taken: if a write below fails, the next apply reads the maps back.
    let (have_remotes, have_vteps) = match written.0.take() {
        Some(s) => (s.desired.remotes, s.desired.vteps),
        None => (maps.remotes(), maps.vteps()),
    };
    let c = write(
        maps,
        differences(&have_remotes, &want.remotes),
        differences(&have_vteps, &want.vteps),
    )?;
    if c.upserts + c.removals > 0 {
        tracing::debug!(?c, vteps = ?want.vteps.keys().map(ToString::to_string).collect::<Vec<_>>(), "maps reconciled");
    }
    let owners = nodes
        .into_iter()
        .map(|n| (n.name.clone(), (cidrs(n), entries(n, local).1)))
        .collect();
    written.0 = Some(State {
        desired: want,
        owners,
        generation: 0,
    });
    Ok(c)
}

/// Applies what changed for the nodes named in `changes` (`None`: gone from
/// the registry) against what is written, with map writes for their
/// entries only: the work of one node's change does not grow with the
/// cluster. `None` when nothing is known to be written yet ([`apply`]
/// first). The registry has validated both sets (no two nodes share a pod
/// CIDR or underlay address), so an entry a changed node gave up is no
/// other node's.
pub fn apply_changes(
    maps: &mut impl NodeMaps,
    written: &mut Written,
    changes: &[(String, Option<Node>)],
    local: Local<'_>,
) -> Result<Option<Changes>, DataplaneError> {
    let Some(mut s) = written.0.take() else {
        return Ok(None);
    };
    // What each touched key held before, recorded before it changes.
    let mut before_r: BTreeMap<AnyCidr, Option<RemoteNode>> = BTreeMap::new();
    let mut before_v: BTreeMap<VtepKey, Option<Vtep>> = BTreeMap::new();
    let d = &mut s.desired;
    for (name, _) in changes {
        if let Some((cidrs, vtep)) = s.owners.remove(name) {
            for cidr in cidrs {
                before_r
                    .entry(cidr)
                    .or_insert_with(|| d.remotes.get(&cidr).copied());
                d.remotes.remove(&cidr);
            }
            for ip in vtep.into_iter().flatten() {
                before_v
                    .entry(ip)
                    .or_insert_with(|| d.vteps.get(&ip).copied());
                d.vteps.remove(&ip);
            }
        }
    }
    for (name, node) in changes {
        let Some(n) = node else { continue };
        let (owners, vtep) = entries(n, local);
        for (cidr, owner) in owners {
            before_r
                .entry(cidr)
                .or_insert_with(|| d.remotes.get(&cidr).copied());
            d.remotes.insert(cidr, owner);
        }
        for ip in vtep.into_iter().flatten() {
            before_v
                .entry(ip)
                .or_insert_with(|| d.vteps.get(&ip).copied());
            d.vteps.insert(ip, Vtep::default());
        }
        s.owners.insert(name.clone(), (cidrs(n), vtep));
    }
    fn split<K: Ord + Copy, V: PartialEq + Copy>(
        before: BTreeMap<K, Option<V>>,
        now: &BTreeMap<K, V>,
    ) -> Diff<K, V> {
        let (mut puts, mut dels) = (Vec::new(), Vec::new());
        for (k, was) in before {
            match (was, now.get(&k)) {
                (was, Some(v)) if was.as_ref() != Some(v) => puts.push((k, *v)),
                (Some(_), None) => dels.push(k),
                _ => {}
            }
        }
        (puts, dels)
    }
    let c = write(maps, split(before_r, &d.remotes), split(before_v, &d.vteps))?;
    // Only now, with every write done: after a failure `written` stays
    // unknown and the next apply reads the maps back.
    written.0 = Some(s);
    Ok(Some(c))
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
                underlay_ip: Some("198.18.0.1".parse().unwrap()),
                pod_cidr: Some("198.19.1.0/24".parse().unwrap()),
                pod_cidr6: None,
                vtep_mac: [2, 0, 0, 0, 0, 1],
                underlay6: None,
            },
            Node {
                name: "b".into(),
                underlay_ip: Some("198.18.0.2".parse().unwrap()),
                pod_cidr: Some("198.19.2.0/24".parse().unwrap()),
                pod_cidr6: None,
                vtep_mac: [2, 0, 0, 0, 0, 2],
                underlay6: None,
            },
        ];
        let d = desired(
            &nodes,
            Local {
                name: "a",
                ip: Some("198.18.0.1".parse().unwrap()),
                ip6: None,
                send6: false,
            },
        );
        assert_eq!(d.remotes.len(), 2);
        assert_eq!(d.vteps.len(), 1);
        assert!(
            d.vteps
                .contains_key(&VtepKey::V4(ip_key("198.18.0.2".parse().unwrap())))
        );
        let own = d.remotes[&AnyCidr::V4("198.19.1.0/24".parse().unwrap())];
        assert_eq!(
            ip_from_key(own.underlay_ip),
            "198.18.0.1".parse::<std::net::Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn an_ipv6_only_node_maps_its_peers_over_ipv6_and_marks_its_own_cidr() {
        let node = |name: &str, i: u16, ip4: Option<u8>| Node {
            name: name.into(),
            underlay_ip: ip4.map(|l| Ipv4Addr::new(198, 18, 0, l)),
            pod_cidr: None,
            pod_cidr6: Some(format!("2001:2:0:{i}::/64").parse().unwrap()),
            vtep_mac: [2, 0, 0, 0, 0, i as u8],
            underlay6: Some(crate::registry::Underlay6 {
                ip: std::net::Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, i),
                vtep_mac: [2, 0, 0, 0, 6, i as u8],
            }),
        };
        let nodes = [
            node("a", 1, None),
            node("b", 2, None),
            node("c", 3, Some(3)),
        ];
        let v6 = |i: u16| AnyCidr::V6(format!("2001:2:0:{i}::/64").parse().unwrap());
        let local = |send6| Local {
            name: "a",
            ip: None,
            ip6: Some(std::net::Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 1)),
            send6,
        };
        let d = desired(&nodes, local(true));
        let own = d.remotes[&v6(1)];
        assert_eq!(
            own.flags,
            RemoteNode::FLAG_OWN,
            "own CIDR, no IPv4 address to tell it by"
        );
        for i in [2, 3] {
            let r = d.remotes[&v6(i)];
            assert!(r.over_underlay6() && r.flags & RemoteNode::FLAG_OWN == 0);
        }
        assert!(
            d.vteps.keys().all(|k| matches!(k, VtepKey::V6(_))),
            "no IPv4 VTEP on a node without an IPv4 underlay: {:?}",
            d.vteps
        );
        assert_eq!(d.vteps.len(), 2);
        // Unable to send over IPv6: no entry rather than one to 0.0.0.0
        // (the packets are dropped as no_route); taken in from them still.
        let d = desired(&nodes, local(false));
        assert_eq!(d.remotes.keys().copied().collect::<Vec<_>>(), [v6(1)]);
        assert_eq!(d.vteps.len(), 2);
    }

    #[test]
    fn ipv6_pods_go_over_the_ipv6_underlay_only_between_nodes_that_both_have_one() {
        let u6 = |last: u16, mac: u8| crate::registry::Underlay6 {
            ip: std::net::Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, last),
            vtep_mac: [2, 0, 0, 0, 6, mac],
        };
        let node = |name: &str, i: u8, under6| Node {
            name: name.into(),
            underlay_ip: Some(Ipv4Addr::new(198, 18, 0, i)),
            pod_cidr: Some(format!("198.19.{i}.0/24").parse().unwrap()),
            pod_cidr6: Some(format!("2001:2:0:{i}::/64").parse().unwrap()),
            vtep_mac: [2, 0, 0, 0, 0, i],
            underlay6: under6,
        };
        let nodes = [
            node("a", 1, Some(u6(1, 1))),
            node("b", 2, Some(u6(2, 2))),
            node("c", 3, None),
        ];
        let v6 = |i: u8| AnyCidr::V6(format!("2001:2:0:{i}::/64").parse().unwrap());
        let local = |ip6, send6| Local {
            name: "a",
            ip: Some(Ipv4Addr::new(198, 18, 0, 1)),
            ip6,
            send6,
        };
        let d = desired(&nodes, local(Some(u6(1, 1).ip), true));
        let b6 = d.remotes[&v6(2)];
        assert!(b6.over_underlay6(), "b's IPv6 pods over IPv6");
        assert_eq!(b6.underlay_ip6, u6(2, 2).ip.octets());
        assert_eq!(b6.vtep_mac, [2, 0, 0, 0, 6, 2], "b's IPv6 VTEP MAC");
        assert!(
            !d.remotes[&v6(3)].over_underlay6(),
            "c has no IPv6 underlay"
        );
        assert!(!d.remotes[&v6(1)].over_underlay6(), "our own CIDR");
        let b4 = d.remotes[&AnyCidr::V4("198.19.2.0/24".parse().unwrap())];
        assert!(!b4.over_underlay6(), "IPv4 pods over IPv4");
        assert_eq!(b4.vtep_mac, [2, 0, 0, 0, 0, 2]);
        assert!(d.vteps.contains_key(&VtepKey::V6(u6(2, 2).ip.octets())));
        assert_eq!(d.vteps.len(), 3, "b and c over IPv4, b over IPv6");
        // Without an IPv6 underlay here, nothing goes over IPv6.
        let d = desired(&nodes, local(None, false));
        assert!(d.remotes.values().all(|r| !r.over_underlay6()));
        assert_eq!(d.vteps.len(), 2);
        // With one but no device to send through: sent over IPv4, and b's
        // VXLAN over IPv6 still taken in.
        let d = desired(&nodes, local(Some(u6(1, 1).ip), false));
        assert!(d.remotes.values().all(|r| !r.over_underlay6()));
        assert!(d.vteps.contains_key(&VtepKey::V6(u6(2, 2).ip.octets())));
    }
}
