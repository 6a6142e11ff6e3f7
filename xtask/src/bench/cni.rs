//! The CNI figures: how fast a pod is wired. weft's plugin against
//! flannel's own path, Debian's `bridge` with `host-local` IPAM (what
//! flannel's plugin delegates to), on the same node: ADD and DEL latency,
//! and pods per second when ADDs come one at a time and 20 at once, as a
//! kubelet starting a Deployment sends them.
//!
//! Each plugin is run the way a runtime runs it: a fresh process with the
//! `CNI_*` environment and the configuration on stdin, from a thread in the
//! node's network namespace (containerd runs plugins in its own), into a
//! network namespace made beforehand (the runtime's sandbox). Creating that
//! namespace is not counted, for either plugin.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::{Cluster, ClusterSpec, InNetns, Lab, Netns};

use super::{measure::stats, say};

/// The figures: (name, description, higher is better).
pub const CNI_FIGURES: &[(&str, &str, bool)] = &[
    ("add_p50_ms", "CNI ADD latency p50 (ms)", false),
    ("add_p99_ms", "CNI ADD latency p99 (ms)", false),
    ("del_p50_ms", "CNI DEL latency p50 (ms)", false),
    ("del_p99_ms", "CNI DEL latency p99 (ms)", false),
    ("pods_per_s_c1", "pods/s, one ADD at a time", true),
    ("pods_per_s_c20", "pods/s, 20 ADDs at once", true),
];

/// The plugins, as the JSON and the table name them.
pub const PLUGINS: [&str; 2] = ["weft", "bridge+host-local"];

/// The targets: (figure, weft / bridge+host-local bound, whether the
/// bound is a ceiling, name).
pub const CNI_TARGETS: &[(&str, f64, bool, &str)] = &[
    (
        "add_p50_ms",
        0.5,
        true,
        "weft ADD p50 ≤ 0.5 × bridge+host-local",
    ),
    (
        "del_p50_ms",
        1.0,
        true,
        "weft DEL p50 ≤ 1.0 × bridge+host-local",
    ),
    (
        "pods_per_s_c20",
        2.0,
        false,
        "weft pods/s at 20 concurrent ADDs ≥ 2 × bridge+host-local",
    ),
];

/// Pods per sequential round.
const SEQUENTIAL: usize = 30;
/// ADDs at once in a concurrent round.
const CONCURRENT: usize = 20;

/// The node both plugins wire pods on: a weft node (its agent running, for
/// the weft plugin's subnet.env and pinned maps), and the bridge plugin's
/// configuration for another pod CIDR on the same node.
struct Node {
    /// Owns the node and the sandboxes (removed when the run is done).
    _lab: Lab,
    cluster: Cluster,
    /// Sandboxes made for the rounds.
    sandboxes: Vec<Netns>,
    bridge_conf: Value,
    weft_conf: Value,
    bridge: PathBuf,
}

impl Node {
    fn new() -> Result<Self> {
        let mut lab = Lab::new("cnib");
        let cluster = Cluster::start(&mut lab, ClusterSpec::nodes_only(1));
        let sandboxes = (0..SEQUENTIAL.max(CONCURRENT))
            .map(|i| lab.netns(&format!("s{i}")))
            .collect();
        let bridge = PathBuf::from("/usr/lib/cni/bridge");
        if !bridge.is_file() {
            bail!(
                "{} is missing: install containernetworking-plugins (`cargo xtask setup` does)",
                bridge.display()
            );
        }
        // What flannel's plugin hands the bridge plugin (its `delegate`).
        let bridge_conf = json!({
            "cniVersion": "1.0.0",
            "name": "cbr",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "isDefaultGateway": true,
            "hairpinMode": true,
            "ipMasq": false,
            "mtu": 1450,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "198.19.128.0/24"}]],
                "routes": [{"dst": weft_tests::CLUSTER_CIDR}],
                "dataDir": lab.dir.join("host-local"),
            },
        });
        let mut weft_conf = cluster.cni_conf(0, "1.0.0");
        weft_conf["dns"] = json!({});
        Ok(Self {
            _lab: lab,
            cluster,
            sandboxes,
            bridge_conf,
            weft_conf,
            bridge,
        })
    }

    fn plugin(&self, which: &str) -> (PathBuf, &Value) {
        match which {
            "weft" => (weft_tests::cni_bin(), &self.weft_conf),
            _ => (self.bridge.clone(), &self.bridge_conf),
        }
    }
}

/// Runs `plugin` once as a runtime does, from the calling thread (which is
/// in the node's namespace); how long it took, or what it said.
fn invoke(plugin: &Path, command: &str, sandbox: &Netns, conf: &Value) -> Result<Duration, String> {
    let stdin = conf.to_string();
    let started = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.name)
        .env("CNI_NETNS", sandbox.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", plugin.display()))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{} {command}: {}{}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile of `xs` (nearest rank).
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

/// One run of one plugin: a sequential round (ADDs, then DELs) and a
/// concurrent one; the run's figures.
fn one_run(node: &Node, which: &str) -> Result<Vec<(&'static str, f64)>> {
    let (plugin, conf) = node.plugin(which);
    let _inside = InNetns::enter(&node.cluster.nodes[0].ns);
    let seq = &node.sandboxes[..SEQUENTIAL];
    let started = Instant::now();
    let mut adds = Vec::new();
    for s in seq {
        adds.push(ms(
            invoke(&plugin, "ADD", s, conf).map_err(anyhow::Error::msg)?
        ));
    }
    let c1 = SEQUENTIAL as f64 / started.elapsed().as_secs_f64();
    let mut dels = Vec::new();
    for s in seq {
        dels.push(ms(
            invoke(&plugin, "DEL", s, conf).map_err(anyhow::Error::msg)?
        ));
    }
    // 20 ADDs released at once, each from its own thread in the node.
    let conc = &node.sandboxes[..CONCURRENT];
    let gate = Arc::new(Barrier::new(CONCURRENT + 1));
    let node_ns = node.cluster.nodes[0].ns.clone();
    let (wall, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = conc
            .iter()
            .map(|s| {
                let (gate, node_ns, plugin) = (gate.clone(), node_ns.clone(), plugin.clone());
                scope.spawn(move || {
                    let _inside = InNetns::enter(&node_ns);
                    gate.wait();
                    let r = invoke(&plugin, "ADD", s, conf);
                    (Instant::now(), r)
                })
            })
            .collect();
        gate.wait();
        let released = Instant::now();
        let done: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect();
        let last = done.iter().map(|(t, _)| *t).max().unwrap_or(released);
        (
            last - released,
            done.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
        )
    });
    for r in results {
        r.map_err(anyhow::Error::msg)?;
    }
    for s in conc {
        invoke(&plugin, "DEL", s, conf).map_err(anyhow::Error::msg)?;
    }
    Ok(vec![
        ("add_p50_ms", quantile(&mut adds, 0.5)),
        ("add_p99_ms", quantile(&mut adds, 0.99)),
        ("del_p50_ms", quantile(&mut dels, 0.5)),
        ("del_p99_ms", quantile(&mut dels, 0.99)),
        ("pods_per_s_c1", c1),
        ("pods_per_s_c20", CONCURRENT as f64 / wall.as_secs_f64()),
    ])
}

/// `runs` runs, the plugins taking turns (as the dataplane modes do); the
/// JSON's `cni` section: per plugin each figure's stats, and weft's ratios.
pub fn run(runs: usize) -> Result<Value> {
    say("cni: a weft node, its agent running; bridge+host-local on the same node");
    let node = Node::new()?;
    let mut got: std::collections::BTreeMap<&str, Vec<Vec<(&str, f64)>>> = Default::default();
    // One warm-up round each: the first exec of a binary pays its page-in.
    for which in PLUGINS {
        one_run(&node, which).with_context(|| format!("cni warm-up: {which}"))?;
    }
    for r in 0..runs {
        for which in PLUGINS {
            if crate::stopped() {
                bail!("interrupted; the labs are removed");
            }
            say(&format!(
                "cni run {}/{runs}: {which} ({SEQUENTIAL} ADDs and DELs one at a time, {CONCURRENT} ADDs at once)",
                r + 1
            ));
            got.entry(which)
                .or_default()
                .push(one_run(&node, which).with_context(|| format!("cni: {which}"))?);
        }
    }
    let mut plugins = serde_json::Map::new();
    for which in PLUGINS {
        let figs: serde_json::Map<String, Value> = CNI_FIGURES
            .iter()
            .map(|(f, _, _)| {
                let xs: Vec<f64> = got[which]
                    .iter()
                    .map(|run| {
                        run.iter()
                            .find(|(n, _)| n == f)
                            .map_or(f64::NAN, |(_, v)| *v)
                    })
                    .collect();
                (f.to_string(), stats(&xs))
            })
            .collect();
        plugins.insert(which.into(), Value::Object(figs));
    }
    let ratios: serde_json::Map<String, Value> = CNI_FIGURES
        .iter()
        .filter_map(|(f, _, _)| {
            let w = plugins["weft"][f]["median"].as_f64()?;
            let b = plugins["bridge+host-local"][f]["median"]
                .as_f64()
                .filter(|b| *b != 0.0)?;
            Some((f.to_string(), json!(w / b)))
        })
        .collect();
    Ok(json!({
        "sequential_pods": SEQUENTIAL,
        "concurrent_adds": CONCURRENT,
        "plugins": plugins,
        "ratios": {"weft/bridge+host-local": ratios},
    }))
}
