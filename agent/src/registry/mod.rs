//! Where the set of nodes comes from, and how it becomes map entries.
//!
//! A [`Registry`] yields the full list of nodes, as [`Snapshot`]s; the
//! daemon's reconcile ([`sync`]) turns each into an idempotent diff on the
//! maps. Two registries: [`file`] (a TOML file) and [`kube`] (Node objects).
//! Bad entries are reported one line each and skipped; the rest stand.

pub mod file;
pub mod flannel;
pub mod kube;
pub mod sync;

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::{cidr::Ipv4Cidr, host::netdev};

/// A node as the dataplane needs it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Cidr,
    #[serde(serialize_with = "ser_mac")]
    pub vtep_mac: [u8; 6],
}

fn ser_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&netdev::mac_to_string(mac))
}

/// The outcome of reading a registry: the usable nodes and one message per
/// skipped entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub problems: Vec<String>,
}

/// How a registry names what it reads, for the problems [`validate`]
/// reports: `node \`a\`: pod_cidr` in a file, `Node a: spec.podCIDR` in the
/// API.
#[derive(Clone, Copy, Debug)]
pub struct Vocabulary {
    pub node: &'static str,
    pub pod_cidr: &'static str,
    pub underlay_ip: &'static str,
    /// Whether names are quoted (`node \`a\``) or not (`Node a`).
    pub quoted: bool,
}

impl Vocabulary {
    /// The `file` registry's words.
    pub const FILE: Self = Self {
        node: "node",
        pod_cidr: "pod_cidr",
        underlay_ip: "underlay_ip",
        quoted: true,
    };
    /// The `kube` registry's words.
    pub const KUBE: Self = Self {
        node: "Node",
        pod_cidr: "spec.podCIDR",
        underlay_ip: "underlay address",
        quoted: false,
    };

    fn name(&self, n: &str) -> String {
        if self.quoted {
            format!("{} `{n}`", self.node)
        } else {
            format!("{} {n}", self.node)
        }
    }
}

/// Drops nodes that cannot be used together: pod CIDR outside the cluster
/// CIDR, duplicate names or underlay addresses, overlapping pod CIDRs. The
/// first node (in registry order) keeps what it claims; the one that comes
/// later is skipped, and whatever the first one has in the maps stands.
pub fn validate(
    nodes: Vec<Node>,
    cluster: &Ipv4Cidr,
    words: Vocabulary,
    problems: &mut Vec<String>,
) -> Vec<Node> {
    let w = words;
    let mut kept: Vec<Node> = Vec::new();
    let mut names = BTreeMap::new();
    for n in nodes {
        let this = w.name(&n.name);
        if !cluster.contains(n.pod_cidr.addr()) || n.pod_cidr.prefix() < cluster.prefix() {
            problems.push(format!(
                "{this}: {} {} is outside the cluster CIDR {}; skipped",
                w.pod_cidr, n.pod_cidr, cluster
            ));
            continue;
        }
        if names.contains_key(&n.name) {
            problems.push(format!(
                "{this} is listed twice; the second entry is skipped"
            ));
            continue;
        }
        if let Some(other) = kept.iter().find(|k| k.underlay_ip == n.underlay_ip) {
            problems.push(format!(
                "{this}: {} {} is already {}'s; skipped",
                w.underlay_ip,
                n.underlay_ip,
                w.name(&other.name)
            ));
            continue;
        }
        if let Some(other) = kept.iter().find(|k| k.pod_cidr.overlaps(&n.pod_cidr)) {
            problems.push(format!(
                "{this}: {} {} overlaps {}'s {}; skipped",
                w.pod_cidr,
                n.pod_cidr,
                w.name(&other.name),
                other.pod_cidr
            ));
            continue;
        }
        names.insert(n.name.clone(), ());
        kept.push(n);
    }
    kept
}

/// A boxed future, for object-safe async trait methods.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A source of the cluster's nodes (the `file` registry, the `kube` registry,
/// later others). An implementation publishes the *full* current set of nodes
/// whenever it changes; the agent diffs each snapshot into the maps, so a
/// registry never has to describe deletions.
pub trait Registry: Send + 'static {
    /// Runs until the process ends, publishing snapshots on `tx`. On errors
    /// it keeps the last snapshot published (the dataplane keeps forwarding
    /// on it), logs, and retries with backoff.
    fn run(self: Box<Self>, tx: tokio::sync::watch::Sender<Option<Snapshot>>) -> BoxFuture<()>;
}
