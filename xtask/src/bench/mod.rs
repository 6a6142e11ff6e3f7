//! `cargo xtask bench`: weft side by side with what it replaces, in one run,
//! on the same 2-node topology (two node namespaces on a veth underlay
//! through a bridge, one pod each; traffic pod on node-1 → pod on node-2).
//!
//! Modes: `weft` (agents, CNI plugin, BPF dataplane); `kernel-vxlan`
//! (flannel's vxlan backend: flannel.1, FDB, neighbour, onlink route, cni0
//! bridge + veth pods); `udp-userspace` (flannel's `udp` backend design:
//! TUN ↔ UDP in a userspace process, a reference written for the bench, see
//! udpfwd.rs); `host-gw` (routes via the other node, no encapsulation);
//! `underlay` (node to node, no pods: the ceiling); `weft-scale` (`weft`
//! with 5,000 nodes in the registry, 110 pods on the receiving node and
//! 100,000 live stack-flows entries: a cost that stays flat at scale).

mod cni;
mod measure;
mod report;
mod topology;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::{Lab, UnderlayKind};

pub use measure::{PIN_IPERF, can_pin};
pub use report::{docs, profile_lines, svg, table, targets};

use measure::{bpf_profile, measure, stats};
use topology::{Path2, build, serve};

pub const MODES: &[&str] = &[
    "weft",
    "weft-scale",
    "kernel-vxlan",
    "udp-userspace",
    "host-gw",
    "underlay",
];
/// What one TCP stream was up against, recorded per mode beside the figures
/// but not compared: (name, description).
pub const DIAGNOSTICS: &[(&str, &str)] = &[
    (
        "tcp1_busiest_cpu_pct",
        "TCP 1 stream: busy time of the busiest CPU (%)",
    ),
    (
        "tcp1_retrans_per_s",
        "TCP 1 stream: segments retransmitted per second",
    ),
];
/// Modes run only when named with --modes: weft with XDP decap (needs
/// `--underlay nic-like`: see [`UnderlayKind::NicLike`]); weft carrying the
/// pods' IPv6 (dual-stack, IPv6 inside the same IPv4 tunnel), measured
/// between the pods' IPv6 addresses; the same over an IPv6 underlay
/// (`weft-ipv6u`); and its baseline, kernel VXLAN over IPv6 as flannel's
/// `flannel-v6.1` (`kernel-vxlan6`).
pub const EXTRA_MODES: &[&str] = &["weft-xdp", "weft-ipv6", "weft-ipv6u", "kernel-vxlan6"];
/// The targets that are ratios: (baseline, figure, weft / baseline
/// at least, name). The bench prints each against the run and marks it on
/// the chart.
pub const RATIO_TARGETS: &[(&str, &str, f64, &str)] = &[
    (
        "kernel-vxlan",
        "tcp1_gbps",
        1.3,
        "weft ≥ 1.3 × kernel-vxlan, TCP 1 stream",
    ),
    (
        "kernel-vxlan",
        "udp64_kpps",
        1.3,
        "weft ≥ 1.3 × kernel-vxlan, 64-byte UDP pps",
    ),
    (
        "underlay",
        "tcp1_gbps",
        0.9,
        "weft ≥ 0.9 × underlay, TCP 1 stream",
    ),
];

/// Issue #23's targets: (mode, baseline, figure, bound, the bound is a
/// ceiling, name): mode's median / baseline's median against the bound.
pub const WIRE_TARGETS: &[(&str, &str, &str, f64, bool, &str)] = &[
    (
        "weft",
        "underlay",
        "tcp1_gbps",
        0.95,
        false,
        "weft ≥ 0.95 × underlay, TCP 1 stream",
    ),
    (
        "weft",
        "underlay",
        "udp64_kpps",
        0.90,
        false,
        "weft ≥ 0.90 × underlay, 64-byte UDP pps",
    ),
    (
        "weft",
        "underlay",
        "rr_p50_us",
        1.03,
        true,
        "weft ≤ 1.03 × underlay, TCP_RR p50",
    ),
    (
        "weft",
        "underlay",
        "cpu_s_per_gb",
        1.00,
        true,
        "weft ≤ 1.00 × underlay, CPU seconds per GB",
    ),
    (
        "weft-scale",
        "weft",
        "udp64_kpps",
        0.90,
        false,
        "at scale (5,000 nodes, 110 pods, 100,000 flows) ≥ 0.90 × weft, 64-byte UDP pps",
    ),
    (
        "weft-scale",
        "weft",
        "rr_p50_us",
        1.10,
        true,
        "at scale ≤ 1.10 × weft, TCP_RR p50",
    ),
];

/// Issue #23's per-packet budgets: (program, ns per 64-byte packet at most).
pub const PROFILE_TARGETS: &[(&str, f64)] = &[("weft_from_pod", 350.0), ("weft_from_und", 150.0)];

pub const FIGURES: &[(&str, &str, bool)] = &[
    // (name, unit/description, higher is better)
    ("tcp1_gbps", "TCP, 1 stream (Gbit/s)", true),
    ("tcp4_gbps", "TCP, 4 streams (Gbit/s)", true),
    ("udp64_kpps", "UDP 64-byte, received (kpps)", true),
    ("udp64_loss_pct", "UDP 64-byte, loss (%)", false),
    ("rr_p50_us", "TCP request/response p50 (µs)", false),
    ("rr_p99_us", "TCP request/response p99 (µs)", false),
    (
        "cpu_s_per_gb",
        "CPU seconds per GB moved, TCP 1 stream",
        false,
    ),
];

pub struct Opts {
    pub runs: usize,
    pub secs: u32,
    pub modes: Vec<String>,
    pub json: Option<PathBuf>,
    pub svg: PathBuf,
    pub docs: Option<PathBuf>,
    pub xtask: PathBuf,
    pub underlay: UnderlayKind,
    /// Client on CPU 0, server on CPU 1 (iperf3 `-A`, `taskset` for sockperf).
    pub pin: bool,
    /// TCP congestion control for the iperf3 tests (iperf3 `-C`); `None`
    /// leaves the machine's default.
    pub cc: Option<String>,
    /// Measure the CNI plugins too ([`cni`]).
    pub cni: bool,
}

fn say(msg: &str) {
    eprintln!("==> bench: {msg}");
}

/// A congestion control the kernel offers, or an error listing those it does.
fn check_cc(cc: &str) -> Result<()> {
    let available = std::fs::read_to_string(CC_AVAILABLE).unwrap_or_default();
    if available.split_whitespace().any(|c| c == cc) {
        return Ok(());
    }
    bail!(
        "--cc {cc}: this kernel offers only `{}` ({CC_AVAILABLE}); load another with \
         `modprobe tcp_{cc}` or pick one of those",
        available.trim()
    )
}

const CC_AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";

/// Refuses options the run could not honour, before anything is built.
pub fn check(o: &Opts) -> Result<()> {
    if o.modes.is_empty() && !o.cni {
        bail!("--modes: no mode given; pick from {}", MODES.join(", "));
    }
    let mut seen = std::collections::BTreeSet::new();
    for mode in &o.modes {
        if !MODES.contains(&mode.as_str()) && !EXTRA_MODES.contains(&mode.as_str()) {
            bail!(
                "--modes: unknown mode `{mode}`; pick from {} (and {}), comma-separated",
                MODES.join(", "),
                EXTRA_MODES.join(", ")
            );
        }
        if !seen.insert(mode) {
            bail!("--modes: `{mode}` is named twice; name each mode once");
        }
    }
    if o.underlay == UnderlayKind::Veth && o.modes.iter().any(|m| m == "weft-xdp") {
        bail!(
            "mode weft-xdp needs `--underlay nic-like`: an XDP redirect drops the sender's \
             checksum-offload state, which a veth underlay with offloads on carries to the receiver"
        );
    }
    if let Some(cc) = &o.cc {
        check_cc(cc)?;
    }
    Ok(())
}

/// Runs the bench; `o` has passed [`check`].
pub fn run(o: &Opts) -> Result<Value> {
    // Every topology is built first and the modes take turns within each
    // run: this VM's speed drifts over minutes, and measuring one mode's
    // runs back to back would hand that drift to the ratios.
    let mut labs: Vec<(String, Lab, Path2)> = Vec::new();
    for mode in &o.modes {
        say(&format!("mode {mode}: building the topology"));
        let mut lab = Lab::new("bench");
        let p = build(mode, &mut lab, &o.xtask, o.underlay)?;
        serve(&mut lab, &p, o.pin);
        labs.push((mode.clone(), lab, p));
    }
    // The congestion control iperf3's senders ran with, as iperf3 reports
    // it: `--cc`, or the machine's default (bbr paces, and on this VM caps one
    // stream well below what cubic reaches: docs/PERFORMANCE.md).
    let mut cc_used = std::collections::BTreeSet::new();
    let mut runs: BTreeMap<&str, Vec<BTreeMap<String, f64>>> = BTreeMap::new();
    for r in 0..o.runs {
        for (mode, _, p) in &labs {
            if crate::stopped() {
                bail!("interrupted; the labs are removed");
            }
            say(&format!(
                "run {}/{}: mode {mode} ({} s per figure)",
                r + 1,
                o.runs,
                o.secs
            ));
            let (m, cc) = measure(p, o).with_context(|| format!("mode {mode}"))?;
            cc_used.extend(cc);
            runs.entry(mode).or_default().push(m);
        }
    }
    let mut modes = serde_json::Map::new();
    let mut profiles = serde_json::Map::new();
    for (mode, _, p) in &labs {
        let figs: serde_json::Map<String, Value> = FIGURES
            .iter()
            .map(|(f, _, _)| f)
            .chain(DIAGNOSTICS.iter().map(|(f, _)| f))
            .map(|f| {
                (
                    f.to_string(),
                    stats(
                        &runs[mode.as_str()]
                            .iter()
                            .map(|r| r.get(*f).copied().unwrap_or(f64::NAN))
                            .collect::<Vec<_>>(),
                    ),
                )
            })
            .collect();
        modes.insert(mode.clone(), Value::Object(figs));
        if mode.starts_with("weft") {
            say(&format!(
                "mode {mode}: BPF profile (weft profile, extra pass)"
            ));
            profiles.insert(
                mode.clone(),
                bpf_profile(p, o).with_context(|| format!("mode {mode}"))?,
            );
        }
    }
    drop(labs);
    let mut ratios = serde_json::Map::new();
    if modes.contains_key("weft") {
        for base in [
            "kernel-vxlan",
            "udp-userspace",
            "underlay",
            "host-gw",
            "weft-xdp",
        ] {
            if !modes.contains_key(base) {
                continue;
            }
            let r: serde_json::Map<String, Value> = FIGURES
                .iter()
                .filter_map(|(f, _, _)| {
                    let w = modes["weft"][f]["median"].as_f64()?;
                    let b = modes[base][f]["median"].as_f64().filter(|b| *b != 0.0)?;
                    Some((f.to_string(), json!(w / b)))
                })
                .collect();
            ratios.insert(format!("weft/{base}"), Value::Object(r));
        }
    }
    // IPv6 pods, over either underlay, against flannel's IPv6 (kernel VXLAN
    // over IPv6) in the same run.
    for variant in ["weft-ipv6", "weft-ipv6u"] {
        let base = "kernel-vxlan6";
        if !(modes.contains_key(base) && modes.contains_key(variant)) {
            continue;
        }
        let r: serde_json::Map<String, Value> = FIGURES
            .iter()
            .filter_map(|(f, _, _)| {
                let w = modes[variant][f]["median"].as_f64()?;
                let b = modes[base][f]["median"].as_f64().filter(|b| *b != 0.0)?;
                Some((f.to_string(), json!(w / b)))
            })
            .collect();
        ratios.insert(format!("{variant}/{base}"), Value::Object(r));
    }
    // The same dataplane with a large cluster's state (how flat it stays),
    // and carrying IPv6 pods: each against weft in the same run.
    for variant in ["weft-scale", "weft-ipv6", "weft-ipv6u"] {
        if !(modes.contains_key("weft") && modes.contains_key(variant)) {
            continue;
        }
        let r: serde_json::Map<String, Value> = FIGURES
            .iter()
            .filter_map(|(f, _, _)| {
                let s = modes[variant][f]["median"].as_f64()?;
                let w = modes["weft"][f]["median"].as_f64().filter(|w| *w != 0.0)?;
                Some((f.to_string(), json!(s / w)))
            })
            .collect();
        ratios.insert(format!("{variant}/weft"), Value::Object(r));
    }
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let date = String::from_utf8_lossy(
        &std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()?
            .stdout,
    )
    .trim()
    .to_string();
    let cni = if o.cni {
        cni::run(o.runs)?
    } else {
        Value::Null
    };
    Ok(json!({
        "cni": cni,
        "date": date,
        "machine": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "cpu": cpu_model,
        },
        "runs": o.runs,
        "seconds_per_figure": o.secs,
        "underlay": underlay_name(o.underlay),
        "pinned": o.pin,
        "tcp_congestion_control": cc_used.into_iter().collect::<Vec<_>>().join(","),
        "tcp_congestion_control_chosen": o.cc.is_some(),
        "modes": modes,
        "ratios": ratios,
        "bpf_profile": profiles,
    }))
}

/// `--underlay` values and the underlays they name.
pub const UNDERLAYS: [(&str, UnderlayKind); 2] = [
    ("veth", UnderlayKind::Veth),
    ("nic-like", UnderlayKind::NicLike),
];

/// The `--underlay` value naming `kind`.
pub fn underlay_name(kind: UnderlayKind) -> &'static str {
    UNDERLAYS
        .iter()
        .find(|(_, k)| *k == kind)
        .map_or("veth", |(n, _)| n)
}

/// The underlay an `--underlay` value names.
pub fn underlay_kind(name: &str) -> Option<UnderlayKind> {
    UNDERLAYS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}
