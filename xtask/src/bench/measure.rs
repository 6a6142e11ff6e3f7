//! One run's figures on a path: iperf3 (TCP, 64-byte UDP), sockperf
//! (request/response), CPU time from /proc/stat, and `weft profile`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::{Netns, weft_bin};

use super::{Opts, topology::Path2};

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
pub(super) fn on_cpu(ns: &Netns, pin: bool, cpu: &str, program: &str) -> std::process::Command {
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
pub(super) fn measure(p: &Path2, o: &Opts) -> Result<(BTreeMap<String, f64>, Option<String>)> {
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
pub(super) const PROFILED: &[(&str, &[&str])] = &[("tcp1", &[]), ("udp64", UDP64)];

/// What weft's BPF programs cost during one TCP stream and during 64-byte
/// UDP: `weft profile` (the kernel's per-program run count and run time)
/// over a window inside an iperf3 run. An extra pass after the measured runs:
/// counting adds two clock reads per program run, so no figure above is
/// taken with it on.
pub(super) fn bpf_profile(p: &Path2, o: &Opts) -> Result<Value> {
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

pub(super) fn stats(xs: &[f64]) -> Value {
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
