//! A test-side flanneld: the kube subnet manager and vxlan backend of
//! flannel (`pkg/subnet/kube`, `pkg/backend/vxlan`), doing to a lab node
//! exactly what flanneld does to a real one, so weft's compat mode meets
//! flannel nodes as they are in a cluster running `kube-flannel.yml`.
//!
//! On start (`AcquireLease`) it writes flannel's annotations on its own
//! Node: `kube-subnet-manager: "true"`, `backend-type: vxlan`,
//! `backend-data: {"VNI":1,"VtepMAC":"<flannel.1's MAC>"}` (random, as the
//! kernel made it), `public-ip` (`public-ip-overwrite` when set). Then it
//! watches Nodes and, for every other Node carrying those annotations,
//! programs `flannel.1` as `handleSubnetEvents` does: a permanent neighbour
//! `<subnet>.0 → VtepMAC`, an FDB entry `VtepMAC → public-ip`, and a route
//! `<subnet> via <subnet>.0 dev flannel.1 onlink` (last, as flannel does);
//! on deletion it removes the three. Like flanneld it re-programs a Node
//! only when its `backend-data`, `backend-type` or `public-ip` changed, skips
//! Nodes it cannot read (with a log line) and its own subnet, and leaves
//! the old FDB entry behind when a MAC changes. Stopping it is flanneld's
//! pod going away: the kernel state it made stays.
//!
//! The kernel is programmed with `ip` and `bridge` in the node's namespace
//! (flanneld uses netlink; the entries are the same).
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use weft_tests::{InNetns, Netns};

pub const PREFIX: &str = "flannel.alpha.coreos.com";

/// `<PREFIX>/<name>`.
pub fn key(name: &str) -> String {
    format!("{PREFIX}/{name}")
}

/// What flanneld needs to know about its node.
#[derive(Clone, Debug)]
pub struct Conf {
    pub node_name: String,
    pub ns: Netns,
    /// The node's address (flanneld's `--public-ip`, or its interface's).
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    /// An admin kubeconfig for the lab's API server.
    pub kubeconfig: PathBuf,
}

/// A running test-side flanneld.
pub struct Flanneld {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    log: Arc<Mutex<Vec<String>>>,
    pub node_name: String,
}

/// A lease as flanneld's `nodeToLease` reads it, with what
/// `handleUpdateLeaseEvent` compares.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    subnet: (Ipv4Addr, u8),
    public_ip: Ipv4Addr,
    backend_type: String,
    backend_data: String,
}

impl Flanneld {
    /// Acquires the lease (its annotations are on the Node when this
    /// returns), then watches in the background.
    pub fn start(conf: Conf) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let node_name = conf.node_name.clone();
        let l = log.clone();
        let thread = std::thread::spawn(move || {
            // Its API connection leaves from the node, as flanneld's does.
            let _inside = InNetns::enter(&conf.ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(conf, l, ready_tx, stop_rx));
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("flanneld acquired its lease");
        Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            log,
            node_name,
        }
    }

    /// What it did and what it skipped, one line each.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// flanneld's pod goes away; what it programmed stays in the kernel.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flanneld {
    fn drop(&mut self) {
        self.shut();
    }
}

fn say(log: &Mutex<Vec<String>>, line: String) {
    log.lock().unwrap().push(line);
}

/// flannel.1's MAC, as the kernel chose it (flanneld asks for a random one).
fn vtep_mac(ns: &Netns, vni: u32) -> String {
    let link = ns.ip(&["-o", "link", "show", &format!("flannel.{vni}")]);
    link.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("flannel.1 MAC")
        .to_string()
}

async fn client(kubeconfig: &PathBuf) -> Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn subnet_of(n: &Node) -> Option<(Ipv4Addr, u8)> {
    let spec = n.spec.as_ref()?;
    let text = spec.pod_cidr.clone().or_else(|| {
        spec.pod_cidrs
            .as_ref()?
            .iter()
            .find(|c| !c.contains(':'))
            .cloned()
    })?;
    let (ip, len) = text.split_once('/')?;
    Some((ip.parse().ok()?, len.parse().ok()?))
}

/// flanneld's `nodeToLease`: `None` for a Node that is not flannel's
/// (`kube-subnet-manager` not `"true"`), else the lease or why not.
fn lease_of(n: &Node) -> Option<Result<Lease, String>> {
    let a = n.metadata.annotations.clone().unwrap_or_default();
    if a.get(&key("kube-subnet-manager")).map(String::as_str) != Some("true") {
        return None;
    }
    let name = n.metadata.name.clone().unwrap_or_default();
    let public_ip = match a.get(&key("public-ip")).map(|s| s.parse::<Ipv4Addr>()) {
        Some(Ok(ip)) => ip,
        _ => {
            return Some(Err(format!(
                "Error turning node {name:?} to lease: public-ip"
            )));
        }
    };
    let Some(subnet) = subnet_of(n) else {
        return Some(Err(format!(
            "Error turning node {name:?} to lease: podCIDR"
        )));
    };
    Some(Ok(Lease {
        subnet,
        public_ip,
        backend_type: a.get(&key("backend-type")).cloned().unwrap_or_default(),
        backend_data: a.get(&key("backend-data")).cloned().unwrap_or_default(),
    }))
}

/// The VtepMAC of a `backend-data`, as flannel's `vxlanLeaseAttrs` decodes it.
fn vtep_of(data: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v["VNI"].as_u64()?;
    let mac = v["VtepMAC"].as_str()?;
    let ok = mac.split(':').count() == 6
        && mac
            .split(':')
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
    ok.then(|| mac.to_lowercase())
}

fn run_cmd(ns: &Netns, log: &Mutex<Vec<String>>, program: &str, args: &[&str]) {
    let out = ns.try_sh(program, args);
    if !out.status.success() {
        say(
            log,
            format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
    }
}

/// `handleSubnetEvents` for an added (or changed) lease.
fn add(ns: &Netns, vni: u32, log: &Mutex<Vec<String>>, name: &str, l: &Lease) {
    if l.backend_type != "vxlan" {
        say(
            log,
            format!(
                "ignoring non-vxlan subnet of {name}: type={}",
                l.backend_type
            ),
        );
        return;
    }
    let Some(mac) = vtep_of(&l.backend_data) else {
        say(
            log,
            format!(
                "error decoding subnet lease JSON of {name}: {}",
                l.backend_data
            ),
        );
        return;
    };
    let dev = format!("flannel.{vni}");
    let gw = l.subnet.0.to_string();
    let ip = l.public_ip.to_string();
    run_cmd(
        ns,
        log,
        "ip",
        &[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            &dev,
            "nud",
            "permanent",
        ],
    );
    run_cmd(
        ns,
        log,
        "bridge",
        &[
            "fdb",
            "replace",
            &mac,
            "dev",
            &dev,
            "dst",
            &ip,
            "self",
            "permanent",
        ],
    );
    let dst = format!("{}/{}", l.subnet.0, l.subnet.1);
    run_cmd(
        ns,
        log,
        "ip",
        &["route", "replace", &dst, "via", &gw, "dev", &dev, "onlink"],
    );
    say(
        log,
        format!("adding subnet of {name}: {dst} PublicIP: {ip} VtepMAC: {mac}"),
    );
}

/// `handleSubnetEvents` for a removed lease.
fn remove(ns: &Netns, vni: u32, log: &Mutex<Vec<String>>, name: &str, l: &Lease) {
    let dev = format!("flannel.{vni}");
    let gw = l.subnet.0.to_string();
    let dst = format!("{}/{}", l.subnet.0, l.subnet.1);
    let _ = ns.try_sh("ip", &["neigh", "del", &gw, "dev", &dev]);
    if let Some(mac) = vtep_of(&l.backend_data) {
        let _ = ns.try_sh(
            "bridge",
            &[
                "fdb",
                "del",
                &mac,
                "dev",
                &dev,
                "dst",
                &l.public_ip.to_string(),
                "self",
            ],
        );
    }
    let _ = ns.try_sh(
        "ip",
        &["route", "del", &dst, "via", &gw, "dev", &dev, "onlink"],
    );
    say(log, format!("removing subnet of {name}: {dst}"));
}

async fn run(
    conf: Conf,
    log: Arc<Mutex<Vec<String>>>,
    ready: std::sync::mpsc::Sender<()>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let api: Api<Node> = Api::all(client(&conf.kubeconfig).await);
    // AcquireLease.
    let me = api.get(&conf.node_name).await.expect("flanneld: its Node");
    let own_subnet = subnet_of(&me).expect("flanneld: node pod cidr not assigned");
    let have = me.metadata.annotations.clone().unwrap_or_default();
    let public_ip = have
        .get(&key("public-ip-overwrite"))
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| conf.public_ip.to_string());
    let data = format!(
        "{{\"VNI\":{},\"VtepMAC\":\"{}\"}}",
        conf.vni,
        vtep_mac(&conf.ns, conf.vni)
    );
    let patch = serde_json::json!({"metadata": {"annotations": {
        key("backend-type"): "vxlan",
        key("backend-data"): data,
        key("public-ip"): public_ip,
        key("kube-subnet-manager"): "true",
    }}});
    api.patch(
        &conf.node_name,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .expect("flanneld: annotate its Node");
    say(&log, format!("acquired lease {own_subnet:?} {data}"));
    let _ = ready.send(());

    let mut programmed: BTreeMap<String, Lease> = BTreeMap::new();
    let mut listing: Option<Vec<String>> = None;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let ev = tokio::select! {
            _ = &mut stop => return,
            ev = events.next() => match ev { Some(ev) => ev, None => return },
        };
        let n = match ev {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                // The informer's relist: what is gone was deleted.
                let seen = listing.take().unwrap_or_default();
                let gone: Vec<String> = programmed
                    .keys()
                    .filter(|k| !seen.contains(k))
                    .cloned()
                    .collect();
                for name in gone {
                    let l = programmed.remove(&name).unwrap();
                    remove(&conf.ns, conf.vni, &log, &name, &l);
                }
                continue;
            }
            Ok(watcher::Event::Delete(n)) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                if let Some(l) = programmed.remove(&name) {
                    remove(&conf.ns, conf.vni, &log, &name, &l);
                }
                continue;
            }
            Ok(watcher::Event::InitApply(n)) => {
                if let Some(l) = listing.as_mut() {
                    l.push(n.metadata.name.clone().unwrap_or_default());
                }
                n
            }
            Ok(watcher::Event::Apply(n)) => n,
            Err(e) => {
                say(&log, format!("watch: {e}"));
                continue;
            }
        };
        let name = n.metadata.name.clone().unwrap_or_default();
        let Some(lease) = lease_of(&n) else {
            continue;
        };
        let lease = match lease {
            Ok(l) => l,
            Err(e) => {
                say(&log, e);
                continue;
            }
        };
        // WatchLeases leaves its own lease out.
        if lease.subnet == own_subnet {
            continue;
        }
        // handleUpdateLeaseEvent: nothing relevant changed.
        if programmed.get(&name) == Some(&lease) {
            continue;
        }
        add(&conf.ns, conf.vni, &log, &name, &lease);
        programmed.insert(name, lease);
    }
}
