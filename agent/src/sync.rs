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
/// name.
pub fn desired(nodes: &[Node], local: &str) -> Desired {
    let mut d = Desired::default();
    for n in nodes {
        d.remotes.insert(
            n.pod_cidr,
            RemoteNode {
                underlay_ip: ip_key(n.underlay_ip),
                vtep_mac: n.vtep_mac,
                _pad: [0; 2],
            },
        );
        if n.name != local {
            d.vteps.insert(ip_key(n.underlay_ip), Vtep::default());
        }
    }
    d
}

/// What one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserts: usize,
    pub removals: usize,
}

/// Makes the maps equal to `want`, touching only entries that differ.
pub fn apply(maps: &mut Maps, want: &Desired) -> Result<Changes, DataplaneError> {
    let map_err = |name| move |source| DataplaneError::Map { name, source };
    let mut c = Changes::default();

    let have: BTreeMap<Ipv4Cidr, RemoteNode> = maps
        .remotes
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (Ipv4Cidr::new(k.data().into(), k.prefix_len() as u8), v))
        .collect();
    for (cidr, node) in &want.remotes {
        if have.get(cidr) != Some(node) {
            let key = Key::new(u32::from(cidr.prefix()), cidr.addr().octets());
            maps.remotes
                .insert(&key, *node, 0)
                .map_err(map_err(weft_common::names::REMOTE_CIDRS))?;
            c.upserts += 1;
        }
    }
    for cidr in have.keys().filter(|k| !want.remotes.contains_key(k)) {
        let key = Key::new(u32::from(cidr.prefix()), cidr.addr().octets());
        maps.remotes
            .remove(&key)
            .map_err(map_err(weft_common::names::REMOTE_CIDRS))?;
        c.removals += 1;
    }

    let have: BTreeMap<u32, Vtep> = maps.nodes.iter().filter_map(Result::ok).collect();
    for (ip, v) in &want.vteps {
        if have.get(ip) != Some(v) {
            maps.nodes
                .insert(ip, v, 0)
                .map_err(map_err(weft_common::names::NODES))?;
            c.upserts += 1;
        }
    }
    for ip in have.keys().filter(|k| !want.vteps.contains_key(k)) {
        maps.nodes
            .remove(ip)
            .map_err(map_err(weft_common::names::NODES))?;
        c.removals += 1;
    }
    tracing::debug!(?c, vteps = ?want.vteps.keys().map(|k| ip_from_key(*k)).collect::<Vec<_>>(), "maps reconciled");
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

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
