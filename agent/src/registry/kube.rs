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

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node as KNode;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{
    cidr::Ipv4Cidr,
    host::netdev,
    registry::{BoxFuture, Node, Registry, Snapshot, validate},
};

/// Annotation with the node's underlay IPv4 address.
pub const ANNOTATION_UNDERLAY_IP: &str = "weft.dev/underlay-ip";
/// Annotation with the node's VTEP MAC.
pub const ANNOTATION_VTEP_MAC: &str = "weft.dev/vtep-mac";

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

/// The `kube` registry.
pub struct KubeRegistry {
    kubeconfig: Option<PathBuf>,
    node_name: String,
    cluster: Ipv4Cidr,
    /// What this agent publishes on its own Node; filled in by the agent.
    pub own: Option<(Ipv4Addr, [u8; 6])>,
}

impl KubeRegistry {
    /// The registry as node `node_name` of cluster CIDR `cluster` sees it,
    /// through `kubeconfig` (default: in-cluster, then $KUBECONFIG).
    pub fn new(kubeconfig: Option<PathBuf>, node_name: String, cluster: Ipv4Cidr) -> Self {
        Self {
            kubeconfig,
            node_name,
            cluster,
            own: None,
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

/// Converts one Node object; `Err` is the one-line problem to log.
pub fn convert(n: &KNode) -> Result<Node, String> {
    let name = n.metadata.name.clone().unwrap_or_default();
    let spec = n.spec.as_ref();
    let cidr_text = spec
        .and_then(|s| s.pod_cidr.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidrs.as_ref()).and_then(|v| v.iter().find(|c| !c.contains(':')).cloned()))
        .ok_or_else(|| format!("Node {name}: no spec.podCIDR (is the controller-manager allocating node CIDRs?); skipped"))?;
    let pod_cidr: Ipv4Cidr = cidr_text
        .parse()
        .map_err(|e| format!("Node {name}: spec.podCIDR: {e}; skipped"))?;
    let annotations = n.metadata.annotations.clone().unwrap_or_default();
    let underlay_ip = match annotations.get(ANNOTATION_UNDERLAY_IP) {
        Some(v) => v.parse::<Ipv4Addr>().map_err(|_| format!("Node {name}: annotation {ANNOTATION_UNDERLAY_IP}=`{v}` is not an IPv4 address; skipped"))?,
        None => n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP").and_then(|a| a.address.parse().ok()))
            .ok_or_else(|| format!("Node {name}: no {ANNOTATION_UNDERLAY_IP} annotation and no InternalIP yet; skipped until its agent publishes one"))?,
    };
    let vtep_mac = match annotations.get(ANNOTATION_VTEP_MAC) {
        Some(v) => netdev::parse_mac(v)
            .filter(|m| m[0] & 1 == 0)
            .ok_or_else(|| format!("Node {name}: annotation {ANNOTATION_VTEP_MAC}=`{v}` is not a unicast MAC; skipped"))?,
        None => netdev::vtep_mac_for(underlay_ip),
    };
    Ok(Node {
        name,
        underlay_ip,
        pod_cidr,
        vtep_mac,
    })
}

/// What weft reads from one Node object: the node, or the problem with it.
/// Events that leave this unchanged (status heartbeats, labels, taints) are
/// ignored: with thousands of nodes they arrive many times a second.
type Seen = Result<Node, String>;

fn snapshot(store: &BTreeMap<String, Seen>, cluster: &Ipv4Cidr) -> Snapshot {
    let mut problems = Vec::new();
    let nodes = store
        .values()
        .filter_map(|n| n.clone().map_err(|p| problems.push(p)).ok())
        .collect();
    let nodes = validate(nodes, cluster, &mut problems);
    Snapshot { nodes, problems }
}

impl KubeRegistry {
    /// Publishes this node's underlay IP and VTEP MAC on its Node; the
    /// patched object when that worked.
    async fn publish_own(&self, api: &Api<KNode>) -> Option<KNode> {
        let (ip, mac) = self.own?;
        let patch = serde_json::json!({"metadata": {"annotations": {
            ANNOTATION_UNDERLAY_IP: ip.to_string(),
            ANNOTATION_VTEP_MAC: netdev::mac_to_string(&mac),
        }}});
        match api
            .patch(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(patched) => {
                tracing::info!(node = %self.node_name, %ip, "published underlay IP and VTEP MAC on this Node");
                Some(patched)
            }
            Err(e) => {
                tracing::warn!(node = %self.node_name, "could not annotate this Node (will retry on its next update): {e}");
                None
            }
        }
    }

    /// `n`, annotated first when it is this node's Node and lacks (or has
    /// stale) annotations: then the patched object, so the registry does not
    /// report this node as unannotated until the patch's own event arrives.
    async fn annotated(&self, api: &Api<KNode>, n: KNode) -> KNode {
        if !self.wants_annotations(&n) {
            return n;
        }
        self.publish_own(api).await.unwrap_or(n)
    }

    /// Whether `n` is this node's Node and lacks (or has stale) annotations.
    fn wants_annotations(&self, n: &KNode) -> bool {
        let Some((ip, mac)) = self.own else {
            return false;
        };
        if n.metadata.name.as_deref() != Some(self.node_name.as_str()) {
            return false;
        }
        let a = n.metadata.annotations.clone().unwrap_or_default();
        a.get(ANNOTATION_UNDERLAY_IP) != Some(&ip.to_string())
            || a.get(ANNOTATION_VTEP_MAC) != Some(&netdev::mac_to_string(&mac))
    }
}

impl Registry for KubeRegistry {
    fn run(self: Box<Self>, tx: tokio::sync::watch::Sender<Option<Snapshot>>) -> BoxFuture<()> {
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
            // The watcher re-lists after every disconnect and backs off on errors.
            let mut events = watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = events.next().await {
                let changed = match ev {
                    Ok(watcher::Event::Init) => {
                        listing = Some(BTreeMap::new());
                        false
                    }
                    Ok(watcher::Event::InitApply(n)) => {
                        let n = self.annotated(&api, n).await;
                        if let (Some(l), Some(name)) = (listing.as_mut(), n.metadata.name.clone()) {
                            l.insert(name, convert(&n));
                        }
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        // A full list: whatever it does not contain is gone.
                        store = listing.take().unwrap_or_default();
                        tracing::info!(nodes = store.len(), "listed Node objects");
                        true
                    }
                    Ok(watcher::Event::Apply(n)) => {
                        let n = self.annotated(&api, n).await;
                        match n.metadata.name.clone() {
                            Some(name) => {
                                let seen = convert(&n);
                                store.insert(name, seen.clone()) != Some(seen)
                            }
                            None => false,
                        }
                    }
                    Ok(watcher::Event::Delete(n)) => n
                        .metadata
                        .name
                        .as_ref()
                        .is_some_and(|name| store.remove(name).is_some()),
                    Err(e) => {
                        tracing::warn!(
                            "watching Node objects: {e}; keeping the last known state and retrying"
                        );
                        false
                    }
                };
                if !changed {
                    continue;
                }
                let snap = snapshot(&store, &self.cluster);
                if snap.problems != last_problems {
                    for p in &snap.problems {
                        tracing::error!("node registry: {p}");
                    }
                    last_problems = snap.problems.clone();
                }
                tx.send_replace(Some(snap));
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
        let n = convert(&ok).unwrap();
        assert_eq!(
            (n.name.as_str(), n.underlay_ip, n.pod_cidr.to_string()),
            ("a", Ipv4Addr::new(198, 18, 0, 1), "198.19.1.0/24".into())
        );
        let internal = node(serde_json::json!({
            "metadata": {"name": "b"},
            "spec": {"podCIDRs": ["fd00::/64", "198.19.2.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "b"}, {"type": "InternalIP", "address": "198.18.0.2"}]}
        }));
        let n = convert(&internal).unwrap();
        assert_eq!(
            (n.underlay_ip, n.vtep_mac),
            (
                Ipv4Addr::new(198, 18, 0, 2),
                netdev::vtep_mac_for(Ipv4Addr::new(198, 18, 0, 2))
            )
        );
        for (json, needle) in [
            (
                serde_json::json!({"metadata": {"name": "c"}, "spec": {}}),
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
            let e = convert(&node(json)).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
