//! The `kube` registry: Node objects of the Kubernetes API.
//!
//! Shaped like kube-rs's reflector: a watcher (list, then watch; re-list on
//! every reconnect) feeds a store of what weft reads from each Node, and
//! every change to that publishes the full set; updates that leave it as it
//! was (status heartbeats, labels, taints: many a second in a large cluster)
//! publish nothing. On a (re)list, nodes the list does not contain are dropped —
//! delete events can be lost while disconnected. While the API server is
//! unreachable the watcher backs off and the last published set stands, so
//! the dataplane keeps forwarding.
//!
//! Each node's pod CIDR is `spec.podCIDR` (or the first IPv4 entry of
//! `spec.podCIDRs`). Its underlay address and VTEP MAC come from the
//! annotations below, which every agent writes on its own Node (a merge
//! patch: nothing else on the object is touched); a node without the address
//! annotation falls back to its first `InternalIP`.
//!
//! With `flannel-compat` ([`FlannelCompat`]) a Node carrying flanneld's
//! annotations is read as flannel does ([`flannel`]: its `public-ip` and
//! the VTEP MAC of its `backend-data`), and this node's own Node also gets
//! flanneld's annotations, so flannel nodes and weft nodes reach each other.
//!
//! When two Nodes claim one pod CIDR (or underlay address) the one created
//! first keeps it: a newcomer cannot take over what another node's pods use.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{api::core::v1::Node as KNode, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{
    cidr::{ClusterCidrs, Ipv4Cidr, Ipv6Cidr},
    host::netdev,
    registry::{
        BoxFuture, Node, Published, Registry, Snapshot, Underlay6, Vocabulary, flannel,
        pod_cidrs_of,
    },
};

/// Annotation with the node's underlay IPv4 address.
pub const ANNOTATION_UNDERLAY_IP: &str = "weft.dev/underlay-ip";
/// Annotation with the node's VTEP MAC.
pub const ANNOTATION_VTEP_MAC: &str = "weft.dev/vtep-mac";
/// A node's IPv6 underlay address, where it has one (its IPv6 pods' VXLAN
/// then goes over IPv6 to and from other such nodes).
pub const ANNOTATION_UNDERLAY_IP6: &str = "weft.dev/underlay-ip6";

/// Errors setting up the kube registry.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("finding the API server (no --kubeconfig, in-cluster config or $KUBECONFIG): {0}")]
    Infer(String),
    #[error("building the API client: {0}")]
    Client(String),
}

/// `flannel-compat`: flannel's annotations read and written too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlannelCompat {
    pub keys: flannel::Keys,
    /// This agent's VNI: what it writes in `backend-data`, and what a flannel
    /// node's must say.
    pub vni: u32,
}

/// The `kube` registry.
pub struct KubeRegistry {
    kubeconfig: Option<PathBuf>,
    node_name: String,
    cluster: ClusterCidrs,
    /// This node's IPv4 underlay address (none on an IPv6-only node) and
    /// VTEP MAC, filled in by the agent: what the registry says of this
    /// node, and what it publishes on its Node.
    pub own: Option<(Option<Ipv4Addr>, [u8; 6])>,
    /// This node's IPv6 underlay address (`public-ipv6`), published beside.
    pub own_ip6: Option<Ipv6Addr>,
    /// `flannel-compat`; none: weft's annotations only.
    pub flannel: Option<FlannelCompat>,
    /// Publishing waits until this says true (the agent: once its decap is
    /// attached, so no node addresses this one's VTEP MAC before it can
    /// take the frames — on a node taken over from flannel, frames for the
    /// new MAC would be dropped by flannel's device meanwhile). None: at once.
    pub publish_when: Option<tokio::sync::watch::Receiver<bool>>,
}

impl KubeRegistry {
    /// The registry as node `node_name` of cluster CIDR `cluster` sees it,
    /// through `kubeconfig` (default: in-cluster, then $KUBECONFIG).
    pub fn new(kubeconfig: Option<PathBuf>, node_name: String, cluster: ClusterCidrs) -> Self {
        Self {
            kubeconfig,
            node_name,
            cluster,
            own: None,
            own_ip6: None,
            flannel: None,
            publish_when: None,
        }
    }

    async fn client(&self) -> Result<Client, KubeError> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    KubeError::Kubeconfig {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    }
                })?;
                kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Infer(e.to_string()))?,
        };
        Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
    }
}

/// Converts one Node object; `Err` is the one-line problem to log. With
/// `flannel`, a Node carrying flannel's annotations is read as flannel reads
/// it (those win over weft's: a node rolled back to flannel has weft's
/// annotations left over from its weft days).
pub fn convert(n: &KNode, flannel: Option<&FlannelCompat>) -> Result<Node, String> {
    let name = n.metadata.name.clone().unwrap_or_default();
    let (pod_cidr, pod_cidr6) = pod_cidr_of(n, &name)?;
    let annotations = n.metadata.annotations.clone().unwrap_or_default();
    if let Some(f) = flannel
        && let Some(lease) = flannel::lease(&name, &annotations, &f.keys, f.vni)
    {
        let lease = lease?;
        return Ok(Node {
            name,
            underlay_ip: Some(lease.public_ip),
            pod_cidr,
            pod_cidr6,
            vtep_mac: lease.vtep_mac,
            underlay6: lease.v6.map(|(ip, vtep_mac)| Underlay6 { ip, vtep_mac }),
        });
    }
    let underlay_ip = match annotations.get(ANNOTATION_UNDERLAY_IP) {
        Some(v) => Some(v.parse::<Ipv4Addr>().map_err(|_| format!("Node {name}: annotation {ANNOTATION_UNDERLAY_IP}=`{v}` is not an IPv4 address; skipped"))?),
        None => internal_ip(n),
    };
    let ip6 = match annotations.get(ANNOTATION_UNDERLAY_IP6) {
        Some(v) => Some(
            v.parse()
                .map_err(|_| format!("Node {name}: annotation {ANNOTATION_UNDERLAY_IP6}=`{v}` is not an IPv6 address; skipped"))
                .and_then(|ip| {
                    Underlay6::check_ip(ip).map_err(|e| {
                        format!("Node {name}: annotation {ANNOTATION_UNDERLAY_IP6}: {e}; skipped")
                    })
                })?,
        ),
        // An IPv6-only Node (no IPv4 address at all): its IPv6 InternalIP.
        None if underlay_ip.is_none() => internal_ip(n).and_then(|a| Underlay6::check_ip(a).ok()),
        None => None,
    };
    if underlay_ip.is_none() && ip6.is_none() {
        return Err(format!(
            "Node {name}: no {ANNOTATION_UNDERLAY_IP} or {ANNOTATION_UNDERLAY_IP6} annotation and no InternalIP yet; skipped until its agent publishes one"
        ));
    }
    let vtep_mac = match annotations.get(ANNOTATION_VTEP_MAC) {
        Some(v) => netdev::parse_mac(v)
            .filter(|m| m[0] & 1 == 0)
            .ok_or_else(|| format!("Node {name}: annotation {ANNOTATION_VTEP_MAC}=`{v}` is not a unicast MAC; skipped"))?,
        None => netdev::node_vtep_mac(underlay_ip, ip6).unwrap_or_default(),
    };
    let underlay6 = ip6.map(|ip| Underlay6 { ip, vtep_mac });
    Ok(Node {
        name,
        underlay_ip,
        pod_cidr,
        pod_cidr6,
        vtep_mac,
        underlay6,
    })
}

/// The Node's first InternalIP of family `A` (a dual-stack Node lists one
/// of each).
fn internal_ip<A: std::str::FromStr>(n: &KNode) -> Option<A> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// This node's entry: its pod CIDR from `n`, the rest as the agent says.
fn own_node(
    n: &KNode,
    underlay_ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    vtep_mac: [u8; 6],
) -> Result<Node, String> {
    let name = n.metadata.name.clone().unwrap_or_default();
    let (pod_cidr, pod_cidr6) = pod_cidr_of(n, &name)?;
    Ok(Node {
        pod_cidr,
        pod_cidr6,
        name,
        underlay_ip,
        vtep_mac,
        underlay6: ip6.map(|ip| Underlay6 { ip, vtep_mac }),
    })
}

/// The Node's pod CIDRs: `spec.podCIDRs` (one per family, as the
/// controller-manager allocates them in a dual-stack cluster), or
/// `spec.podCIDR` alone.
fn pod_cidr_of(n: &KNode, name: &str) -> Result<(Option<Ipv4Cidr>, Option<Ipv6Cidr>), String> {
    let spec = n.spec.as_ref();
    let list: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()).filter(|l| !l.is_empty()) {
        Some(list) => list,
        None => spec
            .and_then(|s| s.pod_cidr.clone())
            .map(|c| vec![c])
            .ok_or_else(|| format!("Node {name}: no spec.podCIDR (is the controller-manager allocating node CIDRs?); skipped"))?,
    };
    pod_cidrs_of(&list, "spec.podCIDRs").map_err(|e| format!("Node {name}: {e}; skipped"))
}

/// What weft reads from one Node object: when it was created (the older of
/// two Nodes claiming one pod CIDR keeps it), and the node or the problem
/// with it. Events that leave this unchanged (status heartbeats, labels,
/// taints) are ignored: with thousands of nodes they arrive many times a
/// second.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    created: Option<Time>,
    node: Result<Node, String>,
    /// While `node` is a problem: what the Node said when it last made
    /// sense. Its pods stay reachable on that (as flanneld, which ignores a
    /// lease it cannot read and keeps the routes it had) until it is fixed
    /// or deleted. Boxed: kept for every Node, rarely set.
    last_good: Option<Box<Node>>,
}

/// What one watch event changed.
enum Change {
    /// A (re)list: the whole set.
    All,
    /// One Node, as read before and after (`None`: absent).
    One {
        name: String,
        before: Option<Box<Seen>>,
        after: Option<Box<Seen>>,
    },
}

impl Seen {
    /// The Node reads well: no problem to report, its entry is its own.
    fn is_clean(&self) -> bool {
        self.node.is_ok()
    }

    /// `n` as read now; `before` is what was read of it last.
    fn of(n: &KNode, flannel: Option<&FlannelCompat>, before: Option<&Seen>) -> Self {
        let node = convert(n, flannel);
        let last_good = match &node {
            Ok(_) => None,
            Err(_) => before.and_then(|b| {
                b.node
                    .clone()
                    .ok()
                    .map(Box::new)
                    .or_else(|| b.last_good.clone())
            }),
        };
        Self {
            created: n.metadata.creation_timestamp.clone(),
            node,
            last_good,
        }
    }
}

fn snapshot(store: &BTreeMap<String, Seen>, cluster: &ClusterCidrs) -> Snapshot {
    let mut problems = Vec::new();
    let mut seen: Vec<&Seen> = store.values().collect();
    // Oldest first (then by name, as the store is): what a Node claims first
    // it keeps.
    seen.sort_by(|a, b| a.created.cmp(&b.created));
    let nodes = seen
        .into_iter()
        .filter_map(|s| match (&s.node, &s.last_good) {
            (Ok(n), _) => Some(n.clone()),
            (Err(p), Some(good)) => {
                let underlay = match (good.underlay_ip, good.underlay6) {
                    (Some(ip), _) => ip.to_string(),
                    (None, Some(u6)) => u6.ip.to_string(),
                    (None, None) => "none".into(),
                };
                problems.push(format!(
                    "{p} (its last good entry, underlay {underlay} VTEP MAC {}, stays until the Node is fixed or deleted)",
                    netdev::mac_to_string(&good.vtep_mac)
                ));
                Some(Node::clone(good))
            }
            (Err(p), None) => {
                problems.push(p.clone());
                None
            }
        })
        .collect();
    Snapshot::validated(nodes, problems, cluster, Vocabulary::KUBE)
}

impl KubeRegistry {
    /// What the registry reads of `n` now (`before`: what it read last).
    /// This node is what the agent says it is (its pod CIDR from the Node):
    /// its annotations are what it publishes, or, before it has, whatever an
    /// earlier run or flanneld left there.
    fn read(&self, n: &KNode, before: Option<&Seen>) -> Seen {
        let mut seen = Seen::of(n, self.flannel.as_ref(), before);
        if let Some((ip, _)) = self.own
            && n.metadata.name.as_deref() == Some(self.node_name.as_str())
        {
            seen.node = own_node(n, ip, self.own_ip6, self.own_mac(n));
            seen.last_good = None;
        }
        seen
    }

    /// This node's VTEP MAC. With `flannel-compat`, on a node flanneld ran
    /// on, the one its lease holds (flannel.1's, kept by the agent after
    /// it): flannel's nodes then have nothing to re-learn when the node
    /// moves to weft — their neighbour and FDB entries for it stay right
    /// while the Node's annotations change hands. weft's decap does not
    /// check the inner destination MAC, so any unicast MAC serves.
    fn own_mac(&self, n: &KNode) -> [u8; 6] {
        let derived = self.own.map(|(_, mac)| mac).unwrap_or_default();
        let Some(f) = &self.flannel else {
            return derived;
        };
        let annotations = n.metadata.annotations.clone().unwrap_or_default();
        match flannel::lease(&self.node_name, &annotations, &f.keys, f.vni) {
            Some(Ok(lease)) => lease.vtep_mac,
            _ => derived,
        }
    }

    /// The annotations this agent wants on its own Node `n`: weft's, and
    /// with `flannel-compat` flanneld's.
    fn own_annotations(&self, n: &KNode) -> Option<BTreeMap<String, String>> {
        let (ip, _) = self.own?;
        let mac = self.own_mac(n);
        let mut want =
            BTreeMap::from([(ANNOTATION_VTEP_MAC.to_string(), netdev::mac_to_string(&mac))]);
        if let Some(ip) = ip {
            want.insert(ANNOTATION_UNDERLAY_IP.to_string(), ip.to_string());
        }
        if let Some(ip6) = self.own_ip6 {
            want.insert(ANNOTATION_UNDERLAY_IP6.to_string(), ip6.to_string());
        }
        // flannel-compat needs an IPv4 underlay (checked at start).
        if let (Some(f), Some(ip)) = (&self.flannel, ip) {
            let have = n.metadata.annotations.clone().unwrap_or_default();
            want.extend(flannel::own(&f.keys, &have, ip, self.own_ip6, &mac, f.vni));
        }
        Some(want)
    }

    /// Annotations on this node's Node `n` that say it has an IPv6 underlay
    /// when it no longer has (`public-ipv6` turned off): other nodes would
    /// send VXLAN over IPv6 that this node's decap no longer takes.
    fn stale_annotations(&self, n: &KNode) -> Vec<String> {
        if self.own_ip6.is_some() {
            return Vec::new();
        }
        let have = n.metadata.annotations.clone().unwrap_or_default();
        let mut keys = vec![ANNOTATION_UNDERLAY_IP6.to_string()];
        if let Some(f) = &self.flannel {
            keys.extend([f.keys.public_ipv6.clone(), f.keys.backend_v6_data.clone()]);
        }
        keys.retain(|k| have.contains_key(k));
        keys
    }

    /// Publishes `want` on this node's Node (a merge patch: nothing else on
    /// it changes); the patched object when that worked.
    async fn publish_own(
        &self,
        api: &Api<KNode>,
        want: &BTreeMap<String, String>,
        stale: &[String],
    ) -> Option<KNode> {
        let mut annotations = serde_json::json!(want);
        for k in stale {
            annotations[k] = serde_json::Value::Null;
        }
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        match api
            .patch(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(patched) => {
                let flannel = self.flannel.is_some();
                let shown = |k: &str| want.get(k).map_or("none", String::as_str);
                tracing::info!(node = %self.node_name, ip = %shown(ANNOTATION_UNDERLAY_IP), ip6 = %shown(ANNOTATION_UNDERLAY_IP6), flannel, "published underlay IP and VTEP MAC on this Node");
                Some(patched)
            }
            Err(e) => {
                tracing::warn!(node = %self.node_name, "could not annotate this Node (will retry on its next update): {e}");
                None
            }
        }
    }

    /// This node's Node `n`, annotated when it lacks (or has stale)
    /// annotations: then the patched object.
    async fn annotated(&self, api: &Api<KNode>, n: KNode) -> KNode {
        if n.metadata.name.as_deref() != Some(self.node_name.as_str()) {
            return n;
        }
        let Some(want) = self.own_annotations(&n) else {
            return n;
        };
        let have = n.metadata.annotations.clone().unwrap_or_default();
        if let Some(f) = &self.flannel
            && let Some(theirs) = have.get(&f.keys.node_public_ip)
            && Some(theirs) != want.get(ANNOTATION_UNDERLAY_IP)
        {
            tracing::warn!(node = %self.node_name, "this Node's {}={theirs} is the address flanneld would use here; weft uses {}: set weft's public-ip to {theirs} if that is where this node's VXLAN must go", f.keys.node_public_ip, want.get(ANNOTATION_UNDERLAY_IP).map_or("none", String::as_str));
        }
        let stale = self.stale_annotations(&n);
        if stale.is_empty() && want.iter().all(|(k, v)| have.get(k) == Some(v)) {
            return n;
        }
        self.publish_own(api, &want, &stale).await.unwrap_or(n)
    }
}

impl Registry for KubeRegistry {
    fn run(self: Box<Self>, tx: tokio::sync::watch::Sender<Published>) -> BoxFuture<()> {
        Box::pin(async move {
            let mut backoff = Duration::from_millis(500);
            let client = loop {
                match self.client().await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::error!("{e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            };
            let api: Api<KNode> = Api::all(client);
            let mut store: BTreeMap<String, Seen> = BTreeMap::new();
            let mut listing: Option<BTreeMap<String, Seen>> = None;
            let mut last_problems: Vec<String> = Vec::new();
            // This node's Node as last seen, annotated once publishing may start.
            let mut own_node: Option<KNode> = None;
            let mut gate = self.publish_when.clone();
            let mut may_publish = gate.as_ref().is_none_or(|g| *g.borrow());
            // The watcher re-lists after every disconnect and backs off on errors.
            let mut events = watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .boxed();
            loop {
                let ev = tokio::select! {
                    ev = events.next() => match ev {
                        Some(ev) => ev,
                        None => break,
                    },
                    opened = async { gate.as_mut().expect("guarded").changed().await }, if gate.is_some() && !may_publish => {
                        if opened.is_err() {
                            gate = None;
                            continue;
                        }
                        may_publish = *gate.as_ref().expect("guarded").borrow();
                        if may_publish && let Some(n) = own_node.take() {
                            own_node = Some(self.annotated(&api, n).await);
                        }
                        continue;
                    }
                };
                let mut own = |n: KNode| {
                    let mine = n.metadata.name.as_deref() == Some(self.node_name.as_str());
                    if mine {
                        own_node = Some(n.clone());
                    }
                    (n, mine && may_publish)
                };
                let started = std::time::Instant::now();
                // What changed: everything (a list), one Node, or nothing.
                let change = match ev {
                    Ok(watcher::Event::Init) => {
                        listing = Some(BTreeMap::new());
                        None
                    }
                    Ok(watcher::Event::InitApply(n)) => {
                        let (n, publish) = own(n);
                        if publish {
                            self.annotated(&api, n.clone()).await;
                        }
                        if let (Some(l), Some(name)) = (listing.as_mut(), n.metadata.name.clone()) {
                            let seen = self.read(&n, store.get(&name));
                            l.insert(name, seen);
                        }
                        None
                    }
                    Ok(watcher::Event::InitDone) => {
                        // A full list: whatever it does not contain is gone.
                        store = listing.take().unwrap_or_default();
                        tracing::info!(nodes = store.len(), "listed Node objects");
                        Some(Change::All)
                    }
                    Ok(watcher::Event::Apply(n)) => {
                        let (n, publish) = own(n);
                        if publish {
                            self.annotated(&api, n.clone()).await;
                        }
                        n.metadata.name.clone().and_then(|name| {
                            let seen = self.read(&n, store.get(&name));
                            let before = store.insert(name.clone(), seen.clone());
                            (before.as_ref() != Some(&seen)).then_some(Change::One {
                                name,
                                before: before.map(Box::new),
                                after: Some(Box::new(seen)),
                            })
                        })
                    }
                    Ok(watcher::Event::Delete(n)) => n.metadata.name.and_then(|name| {
                        let before = store.remove(&name)?;
                        Some(Change::One {
                            name,
                            before: Some(Box::new(before)),
                            after: None,
                        })
                    }),
                    Err(e) => {
                        tracing::warn!(
                            "watching Node objects: {e}; keeping the last known state and retrying"
                        );
                        None
                    }
                };
                let Some(change) = change else {
                    continue;
                };
                // One Node that read well before and after (no problem
                // appears or goes away) changes that node only, unless it
                // now claims what another has: then, as for a list, the
                // whole set is validated again.
                if let Change::One {
                    name,
                    before,
                    after,
                } = &change
                    && before.as_deref().is_none_or(Seen::is_clean)
                    && after.as_deref().is_none_or(Seen::is_clean)
                {
                    let node = after.as_ref().and_then(|s| s.node.clone().ok());
                    let mut done = false;
                    tx.send_if_modified(|p| {
                        done = p.update(name, node, &self.cluster);
                        if done {
                            p.took = started.elapsed();
                        }
                        done
                    });
                    if done {
                        continue;
                    }
                }
                let snap = snapshot(&store, &self.cluster);
                // Each problem once, when it appears (a VNI mismatch is not
                // repeated at every change of another Node).
                for p in snap.problems.iter().filter(|p| !last_problems.contains(p)) {
                    tracing::error!("node registry: {p}");
                }
                last_problems = snap.problems.clone();
                tx.send_modify(|p| {
                    p.replace(snap);
                    p.took = started.elapsed();
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> KNode {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn converts_and_explains() {
        let ok = node(serde_json::json!({
            "metadata": {"name": "a", "annotations": {ANNOTATION_UNDERLAY_IP: "198.18.0.1", ANNOTATION_VTEP_MAC: "0e:77:c6:12:00:01"}},
            "spec": {"podCIDR": "198.19.1.0/24"}
        }));
        let n = convert(&ok, None).unwrap();
        assert_eq!(
            (
                n.name.as_str(),
                n.underlay_ip,
                n.pod_cidr.map(|c| c.to_string())
            ),
            (
                "a",
                Some(Ipv4Addr::new(198, 18, 0, 1)),
                Some("198.19.1.0/24".into())
            )
        );
        let internal = node(serde_json::json!({
            "metadata": {"name": "b"},
            "spec": {"podCIDRs": ["fd00::/64", "198.19.2.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "b"}, {"type": "InternalIP", "address": "198.18.0.2"}]}
        }));
        let n = convert(&internal, None).unwrap();
        assert_eq!(
            (n.underlay_ip, n.vtep_mac),
            (
                Some(Ipv4Addr::new(198, 18, 0, 2)),
                netdev::vtep_mac_for(Ipv4Addr::new(198, 18, 0, 2))
            )
        );
        // Dual-stack: spec.podCIDRs, one per family, in either order.
        assert_eq!(
            (
                n.pod_cidr.map(|c| c.to_string()),
                n.pod_cidr6.map(|c| c.to_string())
            ),
            (Some("198.19.2.0/24".into()), Some("fd00::/64".into()))
        );
        // IPv6-only: an IPv6 pod CIDR, an IPv6 InternalIP as the underlay
        // (and the VTEP MAC from it), no IPv4 anywhere.
        let v6_only = node(serde_json::json!({
            "metadata": {"name": "c"},
            "spec": {"podCIDR": "2001:2:0:3::/64"},
            "status": {"addresses": [{"type": "InternalIP", "address": "2001:2:ff::3"}]}
        }));
        let n = convert(&v6_only, None).unwrap();
        let ip6: Ipv6Addr = "2001:2:ff::3".parse().unwrap();
        assert_eq!(
            (n.underlay_ip, n.pod_cidr, n.underlay6),
            (
                None,
                None,
                Some(Underlay6 {
                    ip: ip6,
                    vtep_mac: netdev::vtep_mac_for6(ip6)
                })
            )
        );
        assert_eq!(n.vtep_mac, netdev::vtep_mac_for6(ip6));
        // A dual-stack Node's IPv6 InternalIP is not its underlay: its
        // IPv6 underlay is what its agent publishes.
        let dual = node(serde_json::json!({
            "metadata": {"name": "d"},
            "spec": {"podCIDRs": ["198.19.4.0/24", "2001:2:0:4::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "2001:2:ff::4"},
                {"type": "InternalIP", "address": "198.18.0.4"}
            ]}
        }));
        let n = convert(&dual, None).unwrap();
        assert_eq!(
            (n.underlay_ip, n.underlay6),
            (Some(Ipv4Addr::new(198, 18, 0, 4)), None)
        );
        for (json, needle) in [
            (
                serde_json::json!({"metadata": {"name": "c"}, "spec": {}}),
                "no spec.podCIDR",
            ),
            (
                serde_json::json!({"metadata": {"name": "c6"}, "spec": {"podCIDRs": ["fd00::/64", "fd00:1::/64"]}}),
                "spec.podCIDRs has two IPv6 CIDRs",
            ),
            (
                serde_json::json!({"metadata": {"name": "c7"}, "spec": {"podCIDRs": []}, "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.7"}]}}),
                "no spec.podCIDR",
            ),
            (
                serde_json::json!({"metadata": {"name": "d", "annotations": {ANNOTATION_UNDERLAY_IP: "nope"}}, "spec": {"podCIDR": "198.19.4.0/24"}}),
                "is not an IPv4",
            ),
            (
                serde_json::json!({"metadata": {"name": "e", "annotations": {ANNOTATION_UNDERLAY_IP: "198.18.0.5", ANNOTATION_VTEP_MAC: "zz"}}, "spec": {"podCIDR": "198.19.5.0/24"}}),
                "not a unicast MAC",
            ),
            (
                serde_json::json!({"metadata": {"name": "f"}, "spec": {"podCIDR": "198.19.6.0/24"}}),
                "no InternalIP",
            ),
        ] {
            let e = convert(&node(json), None).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    fn compat() -> FlannelCompat {
        FlannelCompat {
            keys: flannel::Keys::default(),
            vni: 1,
        }
    }

    #[test]
    fn flannel_nodes_are_read_as_flannel_reads_them() {
        let f = compat();
        let json = serde_json::json!({
            "metadata": {"name": "fl", "annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"6a:1b:2c:3d:4e:5f"}"#,
                "flannel.alpha.coreos.com/public-ip": "198.18.0.7",
                // Left over from the node's weft days: flannel's win.
                ANNOTATION_UNDERLAY_IP: "198.18.0.99",
                ANNOTATION_VTEP_MAC: "0e:77:c6:12:00:63",
            }},
            "spec": {"podCIDR": "198.19.7.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.77"}]}
        });
        let n = convert(&node(json.clone()), Some(&f)).unwrap();
        assert_eq!(
            (n.underlay_ip, n.vtep_mac),
            (
                Some(Ipv4Addr::new(198, 18, 0, 7)),
                [0x6a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]
            )
        );
        // Without compat the same Node is weft's.
        let n = convert(&node(json), None).unwrap();
        assert_eq!(n.underlay_ip, Some(Ipv4Addr::new(198, 18, 0, 99)));
        // A bad flannel lease is a problem, not a fall-back to InternalIP.
        let bad = serde_json::json!({
            "metadata": {"name": "fl", "annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": "{}",
                "flannel.alpha.coreos.com/public-ip": "198.18.0.7",
            }},
            "spec": {"podCIDR": "198.19.7.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.77"}]}
        });
        let e = convert(&node(bad), Some(&f)).unwrap_err();
        assert!(
            e.contains("Node fl: annotation flannel.alpha.coreos.com/backend-data"),
            "{e}"
        );
    }

    #[test]
    fn a_node_taken_over_from_flannel_keeps_flannel_s_vtep_mac() {
        let ip = Ipv4Addr::new(198, 18, 0, 7);
        let mut r = KubeRegistry::new(
            None,
            "fl".into(),
            "198.19.0.0/16".parse::<Ipv4Cidr>().unwrap().into(),
        );
        r.own = Some((Some(ip), netdev::vtep_mac_for(ip)));
        let flanneld_s = node(serde_json::json!({
            "metadata": {"name": "fl", "annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"6a:1b:2c:3d:4e:5f"}"#,
                "flannel.alpha.coreos.com/public-ip": "198.18.0.7",
            }},
            "spec": {"podCIDR": "198.19.7.0/24"},
        }));
        // Without compat: weft's own MAC.
        assert_eq!(r.own_mac(&flanneld_s), netdev::vtep_mac_for(ip));
        r.flannel = Some(compat());
        let flannel_mac = [0x6a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f];
        assert_eq!(r.own_mac(&flanneld_s), flannel_mac);
        assert_eq!(
            r.read(&flanneld_s, None).node.unwrap().vtep_mac,
            flannel_mac
        );
        let want = r.own_annotations(&flanneld_s).unwrap();
        assert_eq!(want[ANNOTATION_VTEP_MAC], "6a:1b:2c:3d:4e:5f");
        assert_eq!(
            want["flannel.alpha.coreos.com/backend-data"],
            r#"{"VNI":1,"VtepMAC":"6a:1b:2c:3d:4e:5f"}"#
        );
        // A node flanneld never ran on, or whose lease is not one weft can
        // use (another VNI): weft's own.
        let fresh = node(
            serde_json::json!({"metadata": {"name": "fl"}, "spec": {"podCIDR": "198.19.7.0/24"}}),
        );
        assert_eq!(r.own_mac(&fresh), netdev::vtep_mac_for(ip));
        let mut other_vni = flanneld_s.clone();
        other_vni.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/backend-data".into(),
            r#"{"VNI":2,"VtepMAC":"6a:1b:2c:3d:4e:5f"}"#.into(),
        );
        assert_eq!(r.own_mac(&other_vni), netdev::vtep_mac_for(ip));
    }

    #[test]
    fn a_node_that_turns_bad_keeps_its_last_good_entry() {
        let mk = |ip: &str| {
            node(serde_json::json!({
                "metadata": {"name": "n", "annotations": {ANNOTATION_UNDERLAY_IP: ip}},
                "spec": {"podCIDR": "198.19.1.0/24"}
            }))
        };
        let cluster: ClusterCidrs = "198.19.0.0/16".parse::<Ipv4Cidr>().unwrap().into();
        let good = Seen::of(&mk("198.18.0.1"), None, None);
        let bad = Seen::of(&mk("nope"), None, Some(&good));
        let worse = Seen::of(&mk("still nope"), None, Some(&bad));
        for s in [&bad, &worse] {
            let snap = snapshot(&BTreeMap::from([("n".to_string(), s.clone())]), &cluster);
            assert_eq!(snap.nodes, vec![good.node.clone().unwrap()]);
            assert!(
                snap.problems[0].contains("its last good entry, underlay 198.18.0.1"),
                "{:?}",
                snap.problems
            );
        }
        // Never good: skipped.
        let never = Seen::of(&mk("nope"), None, None);
        let snap = snapshot(&BTreeMap::from([("n".to_string(), never)]), &cluster);
        assert!(snap.nodes.is_empty());
        // Fixed: the new entry.
        let fixed = Seen::of(&mk("198.18.0.2"), None, Some(&worse));
        assert_eq!(fixed.last_good, None);
    }

    #[test]
    fn the_older_node_keeps_a_contested_subnet() {
        let mk = |name: &str, ip: &str, created: &str| {
            node(serde_json::json!({
                "metadata": {"name": name, "creationTimestamp": created,
                    "annotations": {ANNOTATION_UNDERLAY_IP: ip}},
                "spec": {"podCIDR": "198.19.1.0/24"}
            }))
        };
        // "a-new" sorts first by name but came later.
        let store = BTreeMap::from([
            (
                "a-new".to_string(),
                Seen::of(
                    &mk("a-new", "198.18.0.9", "2026-12-02T10:00:00Z"),
                    None,
                    None,
                ),
            ),
            (
                "z-old".to_string(),
                Seen::of(
                    &mk("z-old", "198.18.0.1", "2026-01-01T00:00:00Z"),
                    None,
                    None,
                ),
            ),
        ]);
        let snap = snapshot(&store, &"198.19.0.0/16".parse::<Ipv4Cidr>().unwrap().into());
        assert_eq!(snap.nodes.len(), 1);
        assert_eq!(snap.nodes[0].name, "z-old");
        assert_eq!(
            snap.problems,
            vec!["Node a-new: spec.podCIDR 198.19.1.0/24 overlaps Node z-old's 198.19.1.0/24; skipped".to_string()]
        );
    }
}
