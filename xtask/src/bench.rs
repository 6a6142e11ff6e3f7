//! `cargo xtask bench`: weft side by side with what it replaces, in one run,
//! on the same 2-node topology (two node namespaces on a veth underlay
//! through a bridge, one pod each; traffic pod on node-1 → pod on node-2).
//!
//! Modes: `weft` (agents, CNI plugin, BPF dataplane); `kernel-vxlan`
//! (flannel's vxlan backend: flannel.1, FDB, neighbour, onlink route, cni0
//! bridge + veth pods); `udp-userspace` (flannel's `udp` backend design:
//! TUN ↔ UDP in a userspace process, a reference written for the bench, see
//! udpfwd.rs); `host-gw` (routes via the other node, no encapsulation);
//! `underlay` (node to node, no pods: the ceiling).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::{
    Cluster, ClusterSpec, FlannelNode, Lab, Netns, Underlay, UnderlayKind, bridge_pod, wait_for,
    weft_bin,
};

pub const MODES: &[&str] = &[
    "weft",
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
/// `--underlay nic-like`: see [`UnderlayKind::NicLike`]).
pub const EXTRA_MODES: &[&str] = &["weft-xdp"];
/// The issue's targets that are ratios: (baseline, figure, weft / baseline
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
}

/// The measured path: a client namespace, a server namespace and address.
struct Path2 {
    client: Netns,
    server: Netns,
    server_ip: Ipv4Addr,
}

fn say(msg: &str) {
    eprintln!("==> bench: {msg}");
}

fn two_nodes(lab: &mut Lab, kind: UnderlayKind) -> (Underlay, Netns, Netns) {
    let und = Underlay::with_kind(lab, kind);
    let a = lab.netns("n1");
    let b = lab.netns("n2");
    und.plug(&a, 1);
    und.plug(&b, 2);
    (und, a, b)
}

/// One pod on each node's `cni0` (198.19.N.10, gateway .1), as flannel's CNI.
fn pods_on_cni0(lab: &mut Lab, a: &Netns, b: &Netns, mtu: u32) -> Path2 {
    let [pa, pb] = [(a, 1u8), (b, 2u8)].map(|(node, i)| {
        bridge_pod(
            lab,
            node,
            "cni0",
            &format!("p{i}"),
            Ipv4Addr::new(198, 19, i, 10),
            Ipv4Addr::new(198, 19, i, 1),
            mtu,
        )
    });
    Path2 {
        client: pa,
        server: pb,
        server_ip: Ipv4Addr::new(198, 19, 2, 10),
    }
}

fn build(mode: &str, lab: &mut Lab, xtask: &Path, kind: UnderlayKind) -> Result<Path2> {
    Ok(match mode {
        "weft" | "weft-xdp" => {
            // `weft` runs the agent's defaults (`--decap auto`: TC on a veth
            // underlay); `weft-xdp` forces XDP decap.
            let mut spec = ClusterSpec {
                underlay: kind,
                ..ClusterSpec::pair()
            };
            if mode == "weft-xdp" {
                spec.agent_args = vec!["--decap".into(), "xdp".into()];
            }
            let c = Cluster::start(lab, spec);
            // The lab owns every namespace and process the cluster made.
            Path2 {
                client: c.pods[0].ns.clone(),
                server: c.pods[1].ns.clone(),
                server_ip: c.pods[1].ip,
            }
        }
        "kernel-vxlan" => {
            let (_u, a, b) = two_nodes(lab, kind);
            let fa = FlannelNode::new(&a, Ipv4Addr::new(198, 18, 0, 1), 1, 1, 8472);
            let fb = FlannelNode::new(&b, Ipv4Addr::new(198, 18, 0, 2), 2, 1, 8472);
            fa.add_remote(Ipv4Addr::new(198, 18, 0, 2), 2, &fb.vtep_mac);
            fb.add_remote(Ipv4Addr::new(198, 18, 0, 1), 1, &fa.vtep_mac);
            pods_on_cni0(lab, &a, &b, 1450)
        }
        "udp-userspace" | "host-gw" => {
            let (_u, a, b) = two_nodes(lab, kind);
            let mtu = if mode == "host-gw" { 1500 } else { 1472 };
            for (ns, i) in [(&a, 1u8), (&b, 2u8)] {
                ns.sysctl("net.ipv4.ip_forward", "1");
                ns.ip(&["link", "add", "cni0", "type", "bridge"]);
                ns.ip(&["addr", "add", &format!("198.19.{i}.1/24"), "dev", "cni0"]);
                ns.ip(&["link", "set", "cni0", "mtu", &mtu.to_string(), "up"]);
            }
            let path = pods_on_cni0(lab, &a, &b, mtu);
            if mode == "host-gw" {
                a.ip(&["route", "add", "198.19.2.0/24", "via", "198.18.0.2"]);
                b.ip(&["route", "add", "198.19.1.0/24", "via", "198.18.0.1"]);
            } else {
                for (ns, me, other) in [(&a, 1u8, 2u8), (&b, 2u8, 1u8)] {
                    let mut cmd = ns.command(xtask);
                    cmd.args([
                        "udp-forwarder",
                        "--tun",
                        "flannel0",
                        "--listen",
                        &format!("198.18.0.{me}:8285"),
                        "--route",
                        &format!("198.19.{other}.0/24=198.18.0.{other}:8285"),
                    ]);
                    let name = format!("udpfwd-{me}");
                    lab.spawn(&name, cmd);
                    wait_for("the UDP forwarder", Duration::from_secs(10), || {
                        lab.log(&name).contains("ready").then_some(())
                    });
                    ns.ip(&["link", "set", "flannel0", "mtu", "1472", "up"]);
                    ns.ip(&[
                        "addr",
                        "add",
                        &format!("198.19.{me}.0/16"),
                        "dev",
                        "flannel0",
                    ]);
                }
            }
            path
        }
        "underlay" => {
            let (_u, a, b) = two_nodes(lab, kind);
            Path2 {
                client: a,
                server: b,
                server_ip: Ipv4Addr::new(198, 18, 0, 2),
            }
        }
        other => bail!("unknown mode `{other}`"),
    })
}

/// Busy and total CPU time so far (in USER_HZ ticks) of the whole machine
/// (index 0) and of each CPU (1 onwards), from /proc/stat.
fn cpu_ticks() -> Vec<(f64, f64)> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu"))
        .map(|l| {
            let f: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
            let total = f.iter().take(8).sum();
            (busy, total)
        })
        .collect()
}

/// Between two [`cpu_ticks`]: the whole machine's busy seconds, and the busy
/// percentage of its busiest CPU.
fn cpu_use(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    let delta = |i: usize| match (before.get(i), after.get(i)) {
        (Some(b), Some(a)) => (a.0 - b.0, a.1 - b.1),
        _ => (f64::NAN, f64::NAN),
    };
    let busy_s = delta(0).0 / 100.0; // USER_HZ
    let busiest = (1..after.len())
        .map(delta)
        .filter(|(_, total)| *total > 0.0)
        .map(|(busy, total)| busy / total * 100.0)
        .fold(f64::NAN, f64::max);
    (busy_s, busiest)
}

/// iperf3's own placement flag: the client on CPU 0, the server on CPU 1.
pub const PIN_IPERF: [&str; 2] = ["-A", "0,1"];

/// Whether client and server can be placed on CPUs of their own.
pub fn can_pin() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

/// `program` in `ns`, on `cpu` when pinning (`--no-pin` leaves placement to
/// the scheduler).
fn on_cpu(ns: &Netns, pin: bool, cpu: &str, program: &str) -> std::process::Command {
    if pin {
        let mut c = ns.command("taskset");
        c.args(["-c", cpu, program]);
        c
    } else {
        ns.command(program)
    }
}

/// iperf3 arguments for 64-byte UDP at unlimited rate.
const UDP64: &[&str] = &["-u", "-l", "64", "-b", "0"];

/// An iperf3 client on `p` for `secs` seconds, JSON output, placed and with
/// the congestion control `o` asks for.
fn iperf_command(p: &Path2, o: &Opts, secs: u32, extra: &[&str]) -> std::process::Command {
    let mut c = p.client.command("iperf3");
    c.args([
        "-c",
        &p.server_ip.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ])
    .args(if o.pin { &PIN_IPERF[..] } else { &[] })
    .args(extra);
    if let Some(cc) = &o.cc {
        c.args(["-C", cc]);
    }
    c
}

fn iperf(p: &Path2, o: &Opts, extra: &[&str]) -> Result<Value> {
    let out = iperf_command(p, o, o.secs, extra).output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 {extra:?}: {e}");
    }
    Ok(v)
}

fn sockperf_percentiles(text: &str) -> (Option<f64>, Option<f64>) {
    let pick = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    (pick("50.000"), pick("99.000"))
}

/// How long an iperf3 summary (`end.sum`, `end.sum_sent`) says it ran; the
/// asked-for time where it does not say.
fn ran_for(sum: &Value, o: &Opts) -> f64 {
    sum["seconds"]
        .as_f64()
        .filter(|s| *s > 0.0)
        .unwrap_or(f64::from(o.secs))
}

/// One run of every figure on `p`, and the congestion control the TCP
/// sender used (iperf3's `sender_tcp_congestion`).
fn measure(p: &Path2, o: &Opts) -> Result<(BTreeMap<String, f64>, Option<String>)> {
    let mut m = BTreeMap::new();
    let before = cpu_ticks();
    let v = iperf(p, o, &[])?;
    let (cpu, busiest) = cpu_use(&before, &cpu_ticks());
    let cc = v["end"]["sender_tcp_congestion"]
        .as_str()
        .map(str::to_string);
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    m.insert(
        "tcp1_gbps".into(),
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9,
    );
    m.insert(
        "cpu_s_per_gb".into(),
        if bytes > 0.0 {
            cpu / (bytes / 1e9)
        } else {
            f64::NAN
        },
    );
    m.insert("tcp1_busiest_cpu_pct".into(), busiest);
    let seconds = ran_for(&v["end"]["sum_sent"], o);
    m.insert(
        "tcp1_retrans_per_s".into(),
        v["end"]["sum_sent"]["retransmits"]
            .as_f64()
            .map_or(f64::NAN, |r| r / seconds),
    );
    let v = iperf(p, o, &["-P", "4"])?;
    m.insert(
        "tcp4_gbps".into(),
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9,
    );
    let v = iperf(p, o, UDP64)?;
    let sum = &v["end"]["sum"];
    let sent = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = ran_for(sum, o);
    m.insert("udp64_kpps".into(), (sent - lost) / seconds / 1e3);
    m.insert(
        "udp64_loss_pct".into(),
        if sent > 0.0 {
            lost / sent * 100.0
        } else {
            f64::NAN
        },
    );
    let out = on_cpu(&p.client, o.pin, "0", "sockperf")
        .args([
            "ping-pong",
            "--tcp",
            "-i",
            &p.server_ip.to_string(),
            "-p",
            "11111",
            "-t",
            &o.secs.to_string(),
        ])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (p50, p99) = sockperf_percentiles(&text);
    m.insert("rr_p50_us".into(), p50.unwrap_or(f64::NAN));
    m.insert("rr_p99_us".into(), p99.unwrap_or(f64::NAN));
    Ok((m, cc))
}

/// Load for the BPF profile: (name, iperf3 arguments).
const PROFILED: &[(&str, &[&str])] = &[("tcp1", &[]), ("udp64", UDP64)];

/// What weft's BPF programs cost during one TCP stream and during 64-byte
/// UDP: `weft profile` (the kernel's per-program run count and run time)
/// over a window inside an iperf3 run. An extra pass after the measured runs:
/// counting adds two clock reads per program run, so no figure above is
/// taken with it on.
fn bpf_profile(p: &Path2, o: &Opts) -> Result<Value> {
    let window = o.secs.max(2) - 1;
    let mut out = serde_json::Map::new();
    for (load, extra) in PROFILED {
        let client = iperf_command(p, o, window + 2, extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("iperf3 for the BPF profile")?;
        std::thread::sleep(Duration::from_secs(1));
        let prof = std::process::Command::new(weft_bin())
            .args(["profile", "--json", "--seconds", &window.to_string()])
            .output()
            .context("running `weft profile`")?;
        let iperf = client.wait_with_output()?;
        if !prof.status.success() {
            bail!(
                "weft profile ({load}): {}",
                String::from_utf8_lossy(&prof.stderr).trim()
            );
        }
        if !iperf.status.success() {
            bail!(
                "iperf3 during the BPF profile ({load}): {}",
                String::from_utf8_lossy(&iperf.stdout)
            );
        }
        let v: Value = serde_json::from_slice(&prof.stdout).context("weft profile JSON")?;
        out.insert(load.to_string(), v);
    }
    Ok(Value::Object(out))
}

/// One line per profiled load: weft's programs' share of all CPU time and
/// each program's time per run.
pub fn profile_lines(r: &Value) -> String {
    let mut s = String::new();
    let Some(modes) = r["bpf_profile"].as_object() else {
        return s;
    };
    for (mode, loads) in modes {
        for (load, _) in PROFILED {
            let p = &loads[*load];
            let per: Vec<String> = p["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|row| {
                    Some(format!(
                        "{} {:.0} ns × {:.0}/s",
                        row["name"].as_str()?,
                        row["ns_per_run"].as_f64()?,
                        row["runs_per_s"].as_f64()?
                    ))
                })
                .collect();
            let _ = writeln!(
                s,
                "- `{mode}`, {load}: weft's BPF programs took {:.2} % of all CPU time ({})",
                p["total_cpu_pct"].as_f64().unwrap_or(f64::NAN),
                per.join("; ")
            );
        }
    }
    s
}

fn stats(xs: &[f64]) -> Value {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return json!({"median": null, "min": null, "max": null});
    }
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    json!({"median": median, "min": v[0], "max": v[v.len() - 1]})
}

/// Starts the iperf3 and sockperf servers of `p` (owned by `lab`).
fn serve(lab: &mut Lab, p: &Path2, pin: bool) {
    let mut srv = p.server.command("iperf3");
    srv.args(["-s", "--forceflush", "-B", &p.server_ip.to_string()]);
    lab.spawn("iperf3-server", srv);
    let mut sp = on_cpu(&p.server, pin, "1", "sockperf");
    sp.args([
        "server",
        "--tcp",
        "-i",
        &p.server_ip.to_string(),
        "-p",
        "11111",
    ]);
    lab.spawn("sockperf-server", sp);
    wait_for("iperf3 server", Duration::from_secs(10), || {
        lab.log("iperf3-server").contains("listening").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
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
    if o.modes.is_empty() {
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
    Ok(json!({
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

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "—".into(),
    }
}

/// One table cell: median (min–max).
fn cell(c: &Value) -> String {
    format!(
        "{} ({}–{})",
        fmt(&c["median"]),
        fmt(&c["min"]),
        fmt(&c["max"])
    )
}

/// The results table (Markdown, also readable on a terminal).
pub fn table(r: &Value) -> String {
    let modes: Vec<&String> = r["modes"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let order: Vec<&String> = MODES
        .iter()
        .chain(EXTRA_MODES)
        .filter_map(|m| modes.iter().find(|x| x.as_str() == *m).copied())
        .collect();
    let mut s = String::new();
    let _ = write!(s, "| figure |");
    for m in &order {
        let _ = write!(s, " {m} |");
    }
    let ratio_keys: Vec<String> = r["ratios"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for k in &ratio_keys {
        let _ = write!(s, " {k} |");
    }
    let _ = write!(s, "\n|---|");
    for _ in 0..order.len() + ratio_keys.len() {
        let _ = write!(s, "---:|");
    }
    s.push('\n');
    for (f, desc, _) in FIGURES {
        let _ = write!(s, "| {desc} |");
        for m in &order {
            let _ = write!(s, " {} |", cell(&r["modes"][m.as_str()][*f]));
        }
        for k in &ratio_keys {
            let _ = write!(s, " {}× |", fmt(&r["ratios"][k][*f]));
        }
        s.push('\n');
    }
    for (f, desc) in DIAGNOSTICS {
        let _ = write!(s, "| {desc} |");
        for m in &order {
            let _ = write!(s, " {} |", cell(&r["modes"][m.as_str()][*f]));
        }
        s.push_str(&" |".repeat(ratio_keys.len()));
        s.push('\n');
    }
    s
}

/// A bar chart of the ratios (SVG): one group of bars per figure, one bar
/// per baseline, each drawn from 1 × on a log scale (so 0.5 × and 2 × are
/// as long), with the side where weft is better shaded.
pub fn svg(r: &Value) -> String {
    let keys: Vec<String> = r["ratios"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];
    // log2 of the ratio, clamped to the axis: 1/16 × to 32 ×.
    let (lo, hi) = (-4.0f64, 5.0f64);
    let (w, label_w, right, top, bar_h, gap) = (900.0, 290.0, 20.0, 56.0, 14.0, 4.0);
    let plot_w = w - label_w - right;
    let x = |log: f64| label_w + plot_w * (log.clamp(lo, hi) - lo) / (hi - lo);
    let group_h = 20.0 + keys.len() as f64 * (bar_h + gap) + 12.0;
    let plot_bottom = top + FIGURES.len() as f64 * group_h;
    let h = plot_bottom + 84.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">weft / each baseline, median of runs (log scale; shaded: the side where weft is better)</text>\n"
    );
    // Axis: a grid line and a label per power of two; 1 × drawn solid.
    let mut log = lo;
    while log <= hi {
        let gx = x(log);
        let v = 2f64.powf(log);
        let text = if v < 1.0 {
            format!("1/{}×", 1.0 / v)
        } else {
            format!("{v}×")
        };
        let style = if log == 0.0 {
            "stroke=\"black\""
        } else {
            "stroke=\"#ccc\" stroke-dasharray=\"3\""
        };
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{plot_bottom:.1}\" {style}/>\
             <text x=\"{gx:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{text}</text>",
            top - 12.0,
            top - 16.0
        );
        log += 1.0;
    }
    for (gi, (f, desc, higher_better)) in FIGURES.iter().enumerate() {
        let gy = top + gi as f64 * group_h;
        let (bx0, bx1) = if *higher_better {
            (x(0.0), x(hi))
        } else {
            (x(lo), x(0.0))
        };
        let _ = writeln!(
            s,
            "<rect x=\"{bx0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#e6f4e6\"/>\
             <text x=\"10\" y=\"{:.1}\" font-weight=\"bold\">{desc}</text>\
             <text x=\"10\" y=\"{:.1}\" font-size=\"9\" fill=\"#555\">{} is better</text>",
            gy + 4.0,
            bx1 - bx0,
            group_h - 8.0,
            gy + 18.0,
            gy + 30.0,
            if *higher_better { "higher" } else { "lower" }
        );
        for (ki, k) in keys.iter().enumerate() {
            let Some(v) = r["ratios"][k][*f]
                .as_f64()
                .filter(|v| *v >= 0.0 && v.is_finite())
            else {
                continue;
            };
            let by = gy + 20.0 + ki as f64 * (bar_h + gap);
            let (x0, x1) = (x(0.0), x(v.log2()));
            let (bx, bw) = (x0.min(x1), (x1 - x0).abs().max(1.0));
            // The issue's target for this ratio, if it has one.
            let target = RATIO_TARGETS
                .iter()
                .find(|(base, fig, _, _)| fig == f && *k == format!("weft/{base}"))
                .map(|(_, _, at_least, _)| x(at_least.log2()));
            // The value beyond the bar's end (and its target mark); inside
            // the bar, in white, where it reaches an edge of the chart.
            let (tx, anchor, fill) = if x1 >= x(hi) - 40.0 {
                (x1 - 4.0, "end", "white")
            } else if x1 >= x0 {
                (x1.max(target.unwrap_or(x1)) + 4.0, "start", "black")
            } else if x1 <= x(lo) + 40.0 {
                (x1 + 4.0, "start", "white")
            } else {
                (x1.min(target.unwrap_or(x1)) - 4.0, "end", "black")
            };
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{by:.1}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"{}\"/>\
                 <text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"{anchor}\" fill=\"{fill}\">{v:.2}×</text>",
                colors[ki % 4],
                by + bar_h - 3.0
            );
            if let Some(t) = target {
                let _ = writeln!(
                    s,
                    "<line x1=\"{t:.1}\" y1=\"{:.1}\" x2=\"{t:.1}\" y2=\"{:.1}\" stroke=\"#c00\" stroke-width=\"2\"/>",
                    by - 2.0,
                    by + bar_h + 2.0
                );
            }
        }
    }
    for (ki, k) in keys.iter().enumerate() {
        let lx = 10.0 + ki as f64 * 220.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{:.1}\">{k}</text>",
            h - 40.0,
            colors[ki % 4],
            lx + 16.0,
            h - 30.0
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"16\" y1=\"{0:.1}\" x2=\"16\" y2=\"{1:.1}\" stroke=\"#c00\" stroke-width=\"2\"/><text x=\"26\" y=\"{1:.1}\">the issue's target for that ratio</text>",
        h - 24.0,
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}

/// docs/BENCHMARKS.md, generated from a run.
pub fn docs(r: &Value, runs: usize, secs: u32) -> String {
    let m = &r["machine"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Benchmarks\n\n<!-- Generated by `cargo xtask bench --docs` from a real run; do not edit by hand. -->\n"
    );
    let _ = writeln!(
        s,
        "## How to run\n\n```sh\ncargo xtask bench                 # all modes, 3 runs × 5 s per figure\ncargo xtask bench --quick         # about a minute: 1 run × 2 s\ncargo xtask bench --modes weft,kernel-vxlan --json out.json\ncargo xtask bench --cc cubic       # TCP with cubic instead of the machine's default congestion control\ncargo xtask bench --docs          # regenerate this page, docs/bench-ratios.svg and docs/bench-results.json\n```\n"
    );
    let _ = writeln!(
        s,
        "## This run\n\n{}, {} runs × {} s per figure, `{}` underlay, {}, TCP congestion control {}, on {} ({} cores, kernel {}).\n",
        r["date"].as_str().unwrap_or(""),
        runs,
        secs,
        r["underlay"].as_str().unwrap_or("nic-like"),
        if r["pinned"].as_bool() == Some(true) {
            "client on CPU 0 and server on CPU 1"
        } else {
            "client and server placed by the scheduler (`--no-pin`)"
        },
        match (
            r["tcp_congestion_control"].as_str(),
            r["tcp_congestion_control_chosen"].as_bool()
        ) {
            (Some(cc), Some(true)) if !cc.is_empty() => format!("`{cc}` (`--cc`)"),
            (Some(cc), _) if !cc.is_empty() => format!("`{cc}` (the machine's default)"),
            _ => "not recorded".to_string(),
        },
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "Each cell: median (min–max). Ratios are weft's median over the baseline's.\n\n{}",
        table(r)
    );
    let _ = writeln!(s, "![ratios](bench-ratios.svg)\n");
    let _ = writeln!(s, "{}", targets(r));
    let prof = profile_lines(r);
    if !prof.is_empty() {
        let _ = writeln!(
            s,
            "## weft's BPF programs in this run\n\nMeasured by `weft profile` (the kernel's run count and run time per program, BPF_ENABLE_STATS) during an extra iperf3 pass per load, after the figures above; both nodes' copies summed; time per run × runs per second:\n\n{prof}"
        );
    }
    let _ = writeln!(s, "{}", METHOD);
    s
}

/// The project's targets (issue #6) against this run's medians.
pub fn targets(r: &Value) -> String {
    let med = |mode: &str, fig: &str| r["modes"][mode][fig]["median"].as_f64();
    let mut s = String::from(
        "## Targets against this run\n\nComputed from the medians above; why and where the time goes: docs/PERFORMANCE.md.\n\n| target | measured | met |\n|---|---|---|\n",
    );
    let rr_row = || match med("weft", "rr_p50_us").zip(med("kernel-vxlan", "rr_p50_us")) {
        Some((w, k)) => format!(
            "| weft TCP_RR p50 below kernel-vxlan's | {w:.1} vs {k:.1} µs | {} |\n",
            if w < k { "yes" } else { "no" }
        ),
        None => "| weft TCP_RR p50 below kernel-vxlan's | not measured in this run | — |\n".into(),
    };
    for (i, (base, fig, at_least, name)) in RATIO_TARGETS.iter().enumerate() {
        // (The latency target, not a ratio, stands third as in the issue.)
        if i == 2 {
            s += &rr_row();
        }
        s += &match med("weft", fig).zip(med(base, fig)) {
            Some((w, b)) => format!(
                "| {name} | {:.2} × | {} |\n",
                w / b,
                if w / b >= *at_least { "yes" } else { "no" }
            ),
            None => format!("| {name} | not measured in this run | — |\n"),
        };
    }
    s
}

const METHOD: &str = r#"## What is measured, and how

Every mode is the same 2-node topology built from scratch in network
namespaces: two node namespaces, each with a veth (`und0`) into a bridge
in a third namespace (the underlay), one pod per node; traffic goes from
the pod on node-1 to the pod on node-2 (in `underlay` mode, node to
node). Every mode's topology is built before the first measurement and
the modes take turns within each run (run 1 of every mode, then run 2 of
every mode, ...), so a slow drift in the machine's speed is spread over all
modes instead of landing on whichever ran last. All modes of one run share
the underlay's settings (`--underlay`, recorded in the JSON as `underlay`):

- `veth` (default): the bridge ports keep veth's offloads, so a 64 KiB GSO
  skb crosses the underlay whole in every mode — what a kind-style, nested
  or container-based cluster has.
- `nic-like`: transmit checksum off on the bridge ports, so the bridge
  checksums and segments in software what a NIC would do in hardware, and
  receivers get wire-sized frames, with GRO on each node's `und0` as a NIC
  driver has. XDP decap on a veth needs this (see docs/DATAPLANE.md, "XDP
  or TC"; results in docs/PERFORMANCE.md).

Modes:

- `weft`: the real agents with their defaults (file registry; `--decap
  auto`, which picks TC decap on a veth underlay), pods through the CNI
  plugin, the BPF dataplane.
- `weft-xdp` (only when named, and only with `--underlay nic-like`): the same
  with `--decap xdp`.
- `kernel-vxlan`: flannel's vxlan backend as flanneld sets it up:
  `flannel.1` (nolearning, MTU 1450), permanent neighbour, FDB entry,
  onlink route, `cni0` bridge with veth pods.
- `udp-userspace`: flannel's `udp` backend design (TUN `flannel0`, MTU
  1472, a userspace process per node moving packets between the TUN device
  and a UDP socket, one thread). A reference written for this benchmark
  (`xtask/src/udpfwd.rs`), not a product backend.
- `host-gw`: pods on `cni0`, routed via the other node, no encapsulation.
- `underlay`: node to node on the underlay: the ceiling of this machine.

Placement: by default the client (iperf3, sockperf) runs on CPU 0 and the
server on CPU 1 (iperf3 `-A 0,1`; `taskset` for sockperf), in every mode
alike: on a veth path the sender's CPU also carries the whole forwarding
path (each veth hands the skb to the backlog of the CPU that sent it), so
this is "one CPU per end". Left to the scheduler (`--no-pin`), the two
sometimes share a CPU, and one-stream TCP then varies by up to a third from
run to run in every mode.

Congestion control: iperf3's TCP runs with the machine's default unless
`--cc` names another; the sender's choice, as iperf3 reports it, is in
"This run" and in the JSON (`tcp_congestion_control`). It matters for one
stream: bbr paces its sender (with hrtimers, there being no fq qdisc), which
on this VM holds one stream below what the path can carry in every mode,
while cubic sends as fast as the sender's CPU allows (docs/PERFORMANCE.md
has both).

Figures: iperf3 TCP with 1 and 4 streams (received Gbit/s); iperf3 UDP
with 64-byte payloads at unlimited rate (received kpps and loss);
sockperf TCP ping-pong (p50 and p99 round-trip latency, µs); CPU seconds
per GB during the 1-stream TCP test (whole machine, from /proc/stat: it
includes iperf3 itself on both ends, identically in every mode).

Below the figures, two readings of the 1-stream TCP test that are recorded
per mode but not compared: the busy time of the busiest CPU (near 100 %
says that one CPU is the limit; on a veth path that is the sender's, which
also carries the whole forwarding path), and the segments iperf3's sender
retransmitted per second (on this VM mostly spurious, after reordering:
docs/PERFORMANCE.md).

Caveats: this is one 2-core VM with both "nodes" on it, so sender and
receiver compete for the same two cores, and the underlay is veth, not a
NIC; runs vary by 10–20 % from one to the next. Profiles and what they
mean for the targets: docs/PERFORMANCE.md.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// (x, width) of every bar in a chart: the rects `height="14"`.
    fn bars(svg: &str) -> Vec<(f64, f64)> {
        let attr = |line: &str, name: &str| -> f64 {
            let rest = &line[line.find(&format!(" {name}=\"")).unwrap() + name.len() + 3..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        };
        svg.lines()
            .filter(|l| l.starts_with("<rect") && l.contains("height=\"14\""))
            .map(|l| (attr(l, "x"), attr(l, "width")))
            .collect()
    }

    #[test]
    fn chart_draws_ratios_from_one_on_a_log_scale_and_marks_the_targets() {
        let r = json!({"ratios": {"weft/a": {
            "tcp1_gbps": 2.0, "rr_p50_us": 0.5, "tcp4_gbps": null, "udp64_loss_pct": 0.0
        }}});
        let svg = svg(&r);
        let b = bars(&svg);
        assert_eq!(b.len(), 3, "one bar per ratio present, 0 too: {svg}");
        assert!(svg.contains("0.00×"), "0 labelled");
        let (up, down) = (b[0], b[2]);
        assert!((up.1 - down.1).abs() < 0.2, "2 × and 0.5 × as long: {b:?}");
        assert!(
            (up.0 - (down.0 + down.1)).abs() < 0.2,
            "2 × starts at 1 ×, where 0.5 × ends: {b:?}"
        );
        for label in [
            "2.00×",
            "0.50×",
            "higher is better",
            "lower is better",
            "weft/a",
        ] {
            assert!(svg.contains(label), "{label} in the chart");
        }
        let marks = |svg: &str| svg.matches("stroke=\"#c00\"").count() - 1; // less the legend's
        assert_eq!(marks(&svg), 0, "no target for weft/a");
        let r = json!({"ratios": {"weft/kernel-vxlan": {"tcp1_gbps": 1.2, "tcp4_gbps": 1.2}}});
        assert_eq!(marks(&super::svg(&r)), 1, "the 1-stream target alone");
    }
}
