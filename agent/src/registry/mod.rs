//! Where the set of nodes comes from, and how it becomes map entries.
//!
//! A [`Registry`] reads the nodes (a [`Snapshot`], validated) and keeps
//! them in [`Published`], which remembers which names changed; the daemon's
//! reconcile ([`sync`]) turns what changed into map writes for those nodes
//! only, or a whole set into an idempotent diff on the maps. Two
//! registries: [`file`] (a TOML file) and [`kube`] (Node objects).
//! Bad entries are reported one line each and skipped; the rest stand.

pub mod file;
pub mod flannel;
pub mod kube;
pub mod sync;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Once,
};

use crate::{
    cidr::{Cidr, ClusterCidrs, Family, Ipv4Cidr, Ipv6Cidr},
    host::netdev,
};

/// A node as the dataplane needs it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    pub name: String,
    /// The node's IPv4 underlay address (none on an IPv6-only node, which
    /// has [`Node::underlay6`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<Ipv4Addr>,
    /// The node's IPv4 pod CIDR (none in an IPv6-only cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Cidr>,
    /// The node's IPv6 pod CIDR, in a dual-stack cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Cidr>,
    #[serde(serialize_with = "ser_mac")]
    pub vtep_mac: [u8; 6],
    /// The node's IPv6 underlay, where it has one: its IPv6 pods' VXLAN
    /// goes over IPv6 between two such nodes (as flannel's `flannel-v6.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay6: Option<Underlay6>,
}

/// A node's IPv6 VTEP: its underlay IPv6 address and the VTEP MAC its
/// VXLAN over IPv6 is addressed to (a weft node's one MAC; a flannel
/// node's `flannel-v6.1`'s, which differs from its `flannel.1`'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Underlay6 {
    pub ip: Ipv6Addr,
    #[serde(serialize_with = "ser_mac")]
    pub vtep_mac: [u8; 6],
}

impl Underlay6 {
    /// `ip` if it can be a node's underlay address (a unicast address that
    /// is not link-local, loopback or unspecified), else why not.
    pub fn check_ip(ip: Ipv6Addr) -> Result<Ipv6Addr, String> {
        if ip.is_unspecified()
            || ip.is_loopback()
            || ip.is_multicast()
            || ip.is_unicast_link_local()
        {
            return Err(format!(
                "{ip} cannot be an underlay address (give the node's global or unique-local IPv6 address, as routed between nodes)"
            ));
        }
        Ok(ip)
    }
}

/// A node's pod CIDRs as a registry lists them (`field` names the list in
/// problems): one of each family at most, at least one. Each entry is
/// parsed by its family; the problem says which entry is wrong and why.
pub fn pod_cidrs_of(
    list: &[String],
    field: &str,
) -> Result<(Option<Ipv4Cidr>, Option<Ipv6Cidr>), String> {
    let (mut v4, mut v6): (Option<Ipv4Cidr>, Option<Ipv6Cidr>) = (None, None);
    for text in list {
        let text = text.trim();
        if text.contains(':') {
            let c: Ipv6Cidr = text.parse().map_err(|e| format!("{field}: {e}"))?;
            if let Some(first) = v6 {
                return Err(format!(
                    "{field} has two IPv6 CIDRs ({first}, {c}): a node has one pod CIDR per family"
                ));
            }
            v6 = Some(c);
        } else {
            let c: Ipv4Cidr = text.parse().map_err(|e| format!("{field}: {e}"))?;
            if let Some(first) = v4 {
                return Err(format!(
                    "{field} has two IPv4 CIDRs ({first}, {c}): a node has one pod CIDR per family"
                ));
            }
            v4 = Some(c);
        }
    }
    if v4.is_none() && v6.is_none() {
        return Err(format!("{field} is empty: a node needs a pod CIDR"));
    }
    Ok((v4, v6))
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
    /// What `nodes` claim, as validation indexed it ([`Published`] keeps it).
    claims: Claims,
}

/// How a registry names what it reads, for the problems [`Snapshot::validated`]
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

impl Snapshot {
    /// The usable nodes among `nodes`, with `problems` (the registry's own,
    /// from reading them) and one more per node dropped for not fitting
    /// with the others: pod CIDR outside the cluster CIDR, duplicate names
    /// or underlay addresses, overlapping pod CIDRs. The first node (in
    /// registry order) keeps what it claims; the one that comes later is
    /// skipped, and whatever the first one has in the maps stands.
    pub fn validated(
        nodes: Vec<Node>,
        mut problems: Vec<String>,
        cluster: &ClusterCidrs,
        words: Vocabulary,
    ) -> Self {
        let mut claims = Claims::default();
        let nodes = nodes
            .into_iter()
            .map(|n| for_cluster(n, cluster))
            .filter(|n| match claims.check(n, cluster, words) {
                Ok(()) => {
                    claims.insert(n);
                    true
                }
                Err(p) => {
                    problems.push(p);
                    false
                }
            })
            .collect();
        Self {
            nodes,
            problems,
            claims,
        }
    }
}

/// `n` as this agent's cluster carries it: an IPv6 pod CIDR is dropped when
/// the agent runs IPv4 only (no `cluster-cidr6`), as flannel without
/// `EnableIPv6` ignores a dual-stack Node's, and an IPv4 one when it runs
/// IPv6 only (`enable-ipv4 = false`): the other side still works, and that
/// one side is not carried is said once, at the first such node.
fn for_cluster(mut n: Node, cluster: &ClusterCidrs) -> Node {
    static SAID6: Once = Once::new();
    static SAID4: Once = Once::new();
    not_carried(
        &mut n.pod_cidr6,
        cluster.v6.is_some(),
        &SAID6,
        &n.name,
        "nodes list IPv6 pod CIDRs, but this agent has no cluster-cidr6: it carries their IPv4 pods only (set cluster-cidr6 for dual-stack)",
    );
    not_carried(
        &mut n.pod_cidr,
        cluster.v4.is_some(),
        &SAID4,
        &n.name,
        "nodes list IPv4 pod CIDRs, but this agent runs IPv6 only (enable-ipv4 = false): it carries their IPv6 pods only",
    );
    n
}

/// Drops node `name`'s pod CIDR `cidr` of a family the cluster does not
/// carry, saying `why` (once, by `said`) at the first such node.
fn not_carried<C: std::fmt::Display>(
    cidr: &mut Option<C>,
    carried: bool,
    said: &'static Once,
    name: &str,
    why: &'static str,
) {
    if carried {
        return;
    }
    if let Some(c) = cidr.take() {
        said.call_once(|| tracing::info!(node = %name, pod_cidr = %c, "{why}"));
    }
}

/// What one kept node claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    ip: Option<Ipv4Addr>,
    cidr: Option<Ipv4Cidr>,
    cidr6: Option<Ipv6Cidr>,
    ip6: Option<Ipv6Addr>,
}

impl Claim {
    fn of(n: &Node) -> Self {
        Self {
            ip: n.underlay_ip,
            cidr: n.pod_cidr,
            cidr6: n.pod_cidr6,
            ip6: n.underlay6.map(|u| u.ip),
        }
    }
}

/// What the nodes kept so far claim: their names, underlay addresses and
/// pod CIDRs (as disjoint address ranges, by first address, one set per
/// family). One node is checked against them in O(log n).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Claims {
    names: HashMap<String, Claim>,
    ips: HashMap<Ipv4Addr, String>,
    ips6: HashMap<Ipv6Addr, String>,
    /// First address → (last address, the owner's name).
    ranges: Ranges,
    /// The same for IPv6 pod CIDRs.
    ranges6: Ranges,
}

/// Disjoint address ranges, first address → (last address, owner), of
/// either family (an address as its number).
type Ranges = BTreeMap<u128, (u128, String)>;

fn range<A: Family>(c: &Cidr<A>) -> (u128, u128) {
    (c.addr().to_bits(), c.broadcast().to_bits())
}

/// The owner of a range in `ranges` that overlaps `c`'s, if any. The ranges
/// are disjoint: if any overlaps [lo, hi], the last one that starts at or
/// before hi does.
fn overlapping<'a, A: Family>(ranges: &'a Ranges, c: &Cidr<A>) -> Option<&'a str> {
    let (lo, hi) = range(c);
    ranges
        .range(..=hi)
        .next_back()
        .filter(|(_, (end, _))| *end >= lo)
        .map(|(_, (_, owner))| owner.as_str())
}

/// Whether pod CIDR `c` fits in cluster CIDR `cluster` (inside it, with a
/// prefix at least as long); the problem if not.
fn fits<A: Family>(c: &Cidr<A>, cluster: &Cidr<A>, field: &str) -> Result<(), String> {
    let family = if A::BITS == 128 { "IPv6 " } else { "" };
    if c.prefix() < cluster.prefix() {
        return Err(format!(
            "{field} {c} is wider than the {family}cluster CIDR {cluster} (a node's pod CIDR lies inside it, with a longer prefix)"
        ));
    }
    if !cluster.contains(c.addr()) {
        return Err(format!(
            "{field} {c} is outside the {family}cluster CIDR {cluster}"
        ));
    }
    Ok(())
}

impl Claims {
    /// Whether `n` can join the nodes kept so far; the problem if not.
    fn check(&self, n: &Node, clusters: &ClusterCidrs, w: Vocabulary) -> Result<(), String> {
        let this = w.name(&n.name);
        let skipped = |p: String| format!("{this}: {p}; skipped");
        if let (Some(c), Some(cluster)) = (&n.pod_cidr, &clusters.v4) {
            fits(c, cluster, w.pod_cidr).map_err(skipped)?;
        }
        if let (Some(c6), Some(cluster6)) = (&n.pod_cidr6, &clusters.v6) {
            fits(c6, cluster6, w.pod_cidr).map_err(skipped)?;
        }
        if n.pod_cidr.is_none() && n.pod_cidr6.is_none() {
            let families = match (clusters.v4, clusters.v6) {
                (Some(_), Some(_)) => "IPv4 or IPv6",
                (Some(_), None) => "IPv4",
                _ => "IPv6",
            };
            return Err(skipped(format!(
                "no {families} {} (this cluster's pods are {families})",
                w.pod_cidr
            )));
        }
        if n.pod_cidr.is_some() && n.underlay_ip.is_none() {
            return Err(skipped(format!(
                "an IPv4 {} but no IPv4 {}: IPv4 pods go over an IPv4 underlay; give the node's IPv4 address",
                w.pod_cidr, w.underlay_ip
            )));
        }
        if n.underlay_ip.is_none() && n.underlay6.is_none() {
            return Err(skipped(format!("no {} of either family", w.underlay_ip)));
        }
        if self.names.contains_key(&n.name) {
            return Err(format!(
                "{this} is listed twice; the second entry is skipped"
            ));
        }
        if let Some(ip) = &n.underlay_ip
            && let Some(other) = self.ips.get(ip)
        {
            return Err(skipped(format!(
                "{} {ip} is already {}'s",
                w.underlay_ip,
                w.name(other)
            )));
        }
        if let Some(u6) = &n.underlay6
            && let Some(other) = self.ips6.get(&u6.ip)
        {
            return Err(skipped(format!(
                "IPv6 {} {} is already {}'s",
                w.underlay_ip,
                u6.ip,
                w.name(other)
            )));
        }
        if let Some(c) = &n.pod_cidr
            && let Some(other) = overlapping(&self.ranges, c)
        {
            let theirs = self.names[other]
                .cidr
                .map(|c| c.to_string())
                .unwrap_or_default();
            return Err(skipped(format!(
                "{} {c} overlaps {}'s {theirs}",
                w.pod_cidr,
                w.name(other),
            )));
        }
        if let Some(c6) = &n.pod_cidr6
            && let Some(other) = overlapping(&self.ranges6, c6)
        {
            let theirs = self.names[other]
                .cidr6
                .map(|c| c.to_string())
                .unwrap_or_default();
            return Err(skipped(format!(
                "{} {c6} overlaps {}'s {theirs}",
                w.pod_cidr,
                w.name(other),
            )));
        }
        Ok(())
    }

    fn insert(&mut self, n: &Node) {
        self.put(n.name.clone(), Claim::of(n));
    }

    fn put(&mut self, name: String, c: Claim) {
        if let Some(ip) = c.ip {
            self.ips.insert(ip, name.clone());
        }
        if let Some(ip6) = c.ip6 {
            self.ips6.insert(ip6, name.clone());
        }
        if let Some(cidr) = &c.cidr {
            let (lo, hi) = range(cidr);
            self.ranges.insert(lo, (hi, name.clone()));
        }
        if let Some(c6) = &c.cidr6 {
            let (lo, hi) = range(c6);
            self.ranges6.insert(lo, (hi, name.clone()));
        }
        self.names.insert(name, c);
    }

    fn remove(&mut self, name: &str) {
        if let Some(c) = self.names.remove(name) {
            if let Some(ip) = c.ip {
                self.ips.remove(&ip);
            }
            if let Some(ip6) = c.ip6 {
                self.ips6.remove(&ip6);
            }
            if let Some(cidr) = c.cidr {
                self.ranges.remove(&range(&cidr).0);
            }
            if let Some(c6) = c.cidr6 {
                self.ranges6.remove(&range(&c6).0);
            }
        }
    }
}

/// How many changed names [`Published`] remembers: an agent that fell
/// further behind (or has applied nothing yet) takes the whole set.
const JOURNAL: usize = 4096;

/// What a registry publishes, in the agent's `watch` channel: the usable
/// nodes by name, the problems, and which names changed in the latest
/// generations, so that the agent applies a change to one node by touching
/// that node's entries only (as kube-rs's reflector store and its events).
/// The registry changes it in place (`send_modify`): nothing is copied per
/// change.
#[derive(Debug, Default)]
pub struct Published {
    /// 0 until the registry has read its source; +1 per change.
    pub generation: u64,
    pub nodes: BTreeMap<String, Node>,
    pub problems: Vec<String>,
    /// The registry's own work for the latest generation: reading what
    /// changed, validating, publishing.
    pub took: std::time::Duration,
    claims: Claims,
    /// (generation, name), oldest first, at most [`JOURNAL`].
    journal: VecDeque<(u64, String)>,
    /// The journal holds every change after this generation.
    horizon: u64,
}

impl Published {
    /// Publishes a full set ([`Snapshot::validated`]): a file re-read, a
    /// re-list. The names whose entry differs from before go in the journal.
    pub fn replace(&mut self, snap: Snapshot) {
        let new: BTreeMap<String, Node> = snap
            .nodes
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let changed: Vec<String> = sync::changed(&self.nodes, &new)
            .into_iter()
            .map(|(name, _)| name.clone())
            .collect();
        self.generation += 1;
        self.nodes = new;
        self.problems = snap.problems;
        self.claims = snap.claims;
        self.journal(changed);
    }

    /// Every node read is published: no problem, no conflict.
    pub fn settled(&self) -> bool {
        self.generation > 0 && self.problems.is_empty()
    }

    /// Publishes one node's new entry (`Some`) or its removal (`None`),
    /// when that cannot change any other node's or the problems: the set is
    /// [`settled`](Published::settled), and the new entry claims nothing
    /// another node has and lies in the cluster CIDR. `false` (nothing
    /// changed): publish a full set with [`Published::replace`] instead.
    pub fn update(&mut self, name: &str, node: Option<Node>, cluster: &ClusterCidrs) -> bool {
        // With a problem listed, the node it names may be this one (a
        // problem that would then go away): only a full set says.
        if !self.settled() {
            return false;
        }
        let node = node.map(|n| for_cluster(n, cluster));
        if let Some(n) = &node {
            let mut claims = std::mem::take(&mut self.claims);
            let before = claims.names.get(name).copied();
            claims.remove(name);
            let ok = claims.check(n, cluster, Vocabulary::FILE).is_ok();
            if ok {
                claims.insert(n);
            } else if let Some(c) = before {
                // Put back what was there.
                claims.put(name.to_string(), c);
            }
            self.claims = claims;
            if !ok {
                return false;
            }
        } else {
            self.claims.remove(name);
        }
        let changed = match node {
            Some(n) => self.nodes.insert(name.to_string(), n.clone()) != Some(n),
            None => self.nodes.remove(name).is_some(),
        };
        if changed {
            self.generation += 1;
            self.journal(vec![name.to_string()]);
        }
        true
    }

    fn journal(&mut self, names: Vec<String>) {
        if names.len() > JOURNAL {
            self.journal.clear();
            self.horizon = self.generation;
            return;
        }
        self.journal
            .extend(names.into_iter().map(|n| (self.generation, n)));
        while self.journal.len() > JOURNAL {
            if let Some((g, _)) = self.journal.pop_front() {
                // Generation g is no longer complete.
                self.horizon = self.horizon.max(g);
            }
        }
    }

    /// The names whose entry changed after generation `since`, or `None`
    /// when the journal does not reach back that far (then: all of them).
    pub fn changed_since(&self, since: u64) -> Option<BTreeSet<&str>> {
        if since < self.horizon || since > self.generation {
            return None;
        }
        Some(
            self.journal
                .iter()
                .rev()
                .take_while(|(g, _)| *g > since)
                .map(|(_, n)| n.as_str())
                .collect(),
        )
    }
}

/// A boxed future, for object-safe async trait methods.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A source of the cluster's nodes (the `file` registry, the `kube` registry,
/// later others). An implementation keeps [`Published`] equal to the
/// current set of nodes: a full set when it reads everything
/// ([`Published::replace`], which finds what changed), one node when it
/// knows only that one changed ([`Published::update`]). The agent applies
/// what changed since it last looked.
pub trait Registry: Send + 'static {
    /// Runs until the process ends, publishing on `tx`. On errors it keeps
    /// what it published last (the dataplane keeps forwarding on it), logs,
    /// and retries with backoff.
    fn run(self: Box<Self>, tx: tokio::sync::watch::Sender<Published>) -> BoxFuture<()>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn node(name: &str, ip: &str, cidr: &str) -> Node {
        Node {
            name: name.into(),
            underlay_ip: Some(ip.parse().unwrap()),
            pod_cidr: Some(cidr.parse().unwrap()),
            pod_cidr6: None,
            underlay6: None,
            vtep_mac: [2, 0, 0, 0, 0, 1],
        }
    }

    fn cluster() -> ClusterCidrs {
        ClusterCidrs {
            v4: Some("198.19.0.0/16".parse().unwrap()),
            v6: Some("2001:2::/48".parse().unwrap()),
        }
    }

    /// The rule as first written: each node against every one kept.
    fn quadratic(nodes: &[Node], clusters: &ClusterCidrs) -> Vec<String> {
        let (cluster, cluster6) = (clusters.v4.unwrap(), clusters.v6.unwrap());
        let mut kept: Vec<&Node> = Vec::new();
        for n in nodes {
            let c = n.pod_cidr.unwrap();
            let fits = cluster.contains(c.addr())
                && c.prefix() >= cluster.prefix()
                && n.pod_cidr6.is_none_or(|c| {
                    cluster6.contains(c.addr()) && c.prefix() >= cluster6.prefix()
                })
                && !kept.iter().any(|k| {
                    k.name == n.name
                        || k.underlay_ip == n.underlay_ip
                        || k.pod_cidr.unwrap().overlaps(&c)
                        || matches!((k.pod_cidr6, n.pod_cidr6), (Some(a), Some(b)) if a.overlaps(&b))
                });
            if fits {
                kept.push(n);
            }
        }
        kept.iter().map(|n| n.name.clone()).collect()
    }

    /// A small deterministic generator (no dependency for a few tests):
    /// each call a number below its argument.
    pub(crate) fn rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        }
    }

    fn random_node(r: &mut impl FnMut(u64) -> u64) -> Node {
        let prefix = 22 + r(9) as u8; // /22 … /30
        let addr = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (r(1 << 12) << 4) as u32;
        let addr = addr & (u32::MAX << (32 - prefix));
        // Now and then outside the cluster.
        let addr = if r(20) == 0 { addr ^ 0x0100_0000 } else { addr };
        // Half of them dual-stack: an IPv6 CIDR /58 … /66 in 2001:2::/48,
        // now and then outside it.
        let pod_cidr6 = (r(2) == 0).then(|| {
            let prefix = 58 + r(9) as u8;
            let base = u128::from("2001:2::".parse::<std::net::Ipv6Addr>().unwrap());
            let addr = base + (u128::from(r(1 << 12)) << 62);
            let addr = if r(20) == 0 { addr ^ (1 << 80) } else { addr };
            Ipv6Cidr::new(addr.into(), prefix)
        });
        Node {
            name: format!("n{}", r(200)),
            underlay_ip: Some(Ipv4Addr::new(198, 18, 0, r(250) as u8)),
            pod_cidr: Some(Ipv4Cidr::new(addr.into(), prefix)),
            pod_cidr6,
            underlay6: None,
            vtep_mac: [2, 0, 0, 0, 0, 1],
        }
    }

    #[test]
    fn validation_keeps_what_the_pairwise_rule_keeps() {
        let mut r = rng(7);
        for round in 0..200 {
            let nodes: Vec<Node> = (0..1 + r(60)).map(|_| random_node(&mut r)).collect();
            let snap = Snapshot::validated(nodes.clone(), vec![], &cluster(), Vocabulary::FILE);
            let got: Vec<String> = snap.nodes.iter().map(|n| n.name.clone()).collect();
            assert_eq!(
                got,
                quadratic(&nodes, &cluster()),
                "round {round}: {nodes:#?}"
            );
            assert_eq!(snap.problems.len(), nodes.len() - got.len());
        }
    }

    #[test]
    fn problems_name_the_node_and_what_it_clashes_with() {
        let snap = Snapshot::validated(
            vec![
                node("a", "198.18.0.1", "198.19.1.0/24"),
                node("b", "198.18.0.1", "198.19.2.0/24"),
                node("c", "198.18.0.3", "198.19.1.128/25"),
                node("d", "198.18.0.4", "198.19.0.0/23"),
                node("e", "198.18.0.5", "10.0.0.0/24"),
            ],
            vec![],
            &cluster(),
            Vocabulary::FILE,
        );
        assert_eq!(snap.nodes.len(), 1);
        assert_eq!(
            snap.problems,
            [
                "node `b`: underlay_ip 198.18.0.1 is already node `a`'s; skipped",
                "node `c`: pod_cidr 198.19.1.128/25 overlaps node `a`'s 198.19.1.0/24; skipped",
                "node `d`: pod_cidr 198.19.0.0/23 overlaps node `a`'s 198.19.1.0/24; skipped",
                "node `e`: pod_cidr 10.0.0.0/24 is outside the cluster CIDR 198.19.0.0/16; skipped",
            ]
        );
    }

    fn publish(p: &mut Published, nodes: Vec<Node>) {
        p.replace(Snapshot::validated(
            nodes,
            vec![],
            &cluster(),
            Vocabulary::FILE,
        ));
    }

    #[test]
    fn the_journal_names_what_changed_since_a_generation() {
        let mut p = Published::default();
        let (a, b) = (
            node("a", "198.18.0.1", "198.19.1.0/24"),
            node("b", "198.18.0.2", "198.19.2.0/24"),
        );
        publish(&mut p, vec![a.clone(), b.clone()]);
        assert_eq!(p.generation, 1);
        let g1 = p.generation;
        assert_eq!(p.changed_since(g1), Some(BTreeSet::new()));
        // A full set with only b moved: b is journalled.
        let b2 = node("b", "198.18.0.22", "198.19.2.0/24");
        publish(&mut p, vec![a.clone(), b2.clone()]);
        assert_eq!(p.changed_since(g1), Some(BTreeSet::from(["b"])));
        // One node added through update: O(log n), journalled.
        let c = node("c", "198.18.0.3", "198.19.3.0/24");
        assert!(p.update("c", Some(c.clone()), &cluster()));
        assert_eq!(p.changed_since(g1), Some(BTreeSet::from(["b", "c"])));
        assert_eq!(
            p.changed_since(p.generation - 1),
            Some(BTreeSet::from(["c"]))
        );
        // An update that claims another node's CIDR or address is refused
        // and changes nothing: the caller validates the whole set.
        let before = p.generation;
        for clash in [
            node("d", "198.18.0.4", "198.19.3.128/25"),
            node("d", "198.18.0.1", "198.19.4.0/24"),
            node("c", "198.18.0.3", "198.19.1.0/24"),
            node("d", "198.18.0.4", "10.0.0.0/24"),
        ] {
            let name = clash.name.clone();
            assert!(!p.update(&name, Some(clash), &cluster()));
            assert_eq!(p.generation, before);
        }
        assert_eq!(p.nodes["c"], c, "c keeps its entry after a refused change");
        assert!(
            !p.update(
                "d",
                Some(node("d", "198.18.0.4", "198.19.3.0/25")),
                &cluster()
            ),
            "c's claims still stand"
        );
        // Removal, and a node moving into what another gave up.
        assert!(p.update("a", None, &cluster()));
        assert!(p.update(
            "d",
            Some(node("d", "198.18.0.1", "198.19.1.0/24")),
            &cluster()
        ));
        assert_eq!(p.nodes.len(), 3);
        // Behind the journal: everything.
        assert_eq!(
            p.changed_since(0),
            Some(BTreeSet::from(["a", "b", "c", "d"])),
            "from the start, a removed"
        );
        for i in 0..JOURNAL + 1 {
            let n = node("e", "198.18.1.1", &format!("198.19.{}.0/24", 10 + i % 2));
            assert!(p.update("e", Some(n), &cluster()));
        }
        assert_eq!(p.changed_since(before), None);
        assert_eq!(
            p.changed_since(p.generation - 1),
            Some(BTreeSet::from(["e"]))
        );
    }

    #[test]
    fn a_set_with_a_problem_takes_full_sets_only() {
        let mut p = Published::default();
        publish(
            &mut p,
            vec![
                node("a", "198.18.0.1", "198.19.1.0/24"),
                node("b", "198.18.0.1", "198.19.2.0/24"),
            ],
        );
        assert_eq!(p.problems.len(), 1);
        // a going away lets b in: only a full validation sees that.
        assert!(!p.update("a", None, &cluster()));
        publish(&mut p, vec![node("b", "198.18.0.1", "198.19.2.0/24")]);
        assert!(p.problems.is_empty());
        assert!(p.update(
            "a",
            Some(node("a", "198.18.0.9", "198.19.1.0/24")),
            &cluster()
        ));
    }
}
