//! `cargo xtask scale`: the agent against a registry of N nodes (default
//! 5,000; the `file` registry, or with `--registry kube` Node objects in a
//! real kube-apiserver and etcd): time from a full list to maps written, the
//! agent's memory, and the time for one node change to reach the map.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use weft_tests::{
    Cluster, ClusterSpec, Lab, Netns,
    kube::{ADMIN_TOKEN, API_IP, API_PORT, KubeApi},
    wait_for,
};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn nodes_file(n: usize, changed: Option<usize>) -> String {
    let mut s = String::with_capacity(n * 100);
    for i in 0..n {
        let (ip, cidr) = node_addrs(i, n, changed);
        let _ = write!(
            s,
            "[[node]]\nname = \"node-{}\"\nunderlay_ip = \"{ip}\"\npod_cidr = \"{cidr}\"\n\n",
            i + 1
        );
    }
    s
}

/// A field of the `nth` "registry applied" line of the agent's log.
fn applied_field(log: &str, nth: usize, field: &str) -> Option<String> {
    Some(
        log.lines()
            .filter(|l| l.contains("registry applied"))
            .nth(nth)?
            .split(&format!("{field}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string(),
    )
}

/// The agent's own time for the `nth` apply, in µs.
fn applied_us(log: &str, nth: usize) -> Option<u64> {
    applied_field(log, nth, "elapsed_us")?.parse().ok()
}

/// The `nth` apply as a table cell: "registry R ms + apply A ms
/// (incremental)", R the registry's read, validation and publishing of the
/// change, A the agent's map work.
fn applied_cell(log: &str, nth: usize) -> Option<String> {
    let time = |f: &str| -> Option<String> {
        let us: f64 = applied_field(log, nth, f)?.parse().ok()?;
        Some(if us < 1000.0 {
            format!("{us:.0} µs")
        } else {
            format!("{:.1} ms", us / 1e3)
        })
    };
    let how = match applied_field(log, nth, "incremental")?.as_str() {
        "true" => "that node's entries only",
        _ => "diff of the whole set",
    };
    Some(format!(
        "registry {} + apply {} ({how})",
        time("registry_us")?,
        time("elapsed_us")?
    ))
}

/// Node `i` of the registry: (underlay IP, pod CIDR). Node 0 is the real
/// node (198.18.0.1, 198.19.0.0/29); the others are registry entries only.
/// Up to [`WIDE`] nodes: underlay 198.18.{64+i/256}.{i%256}, pods /29s of
/// 198.19.0.0/16. More (the 50,000 of docs/SCALE.md): underlays from
/// 198.18.1.0 on and /32 "pod CIDRs" after the real node's /29, so that
/// every address stays in 198.18.0.0/15. `changed` moves that node to a
/// block no other node has.
fn node_addrs(i: usize, n: usize, changed: Option<usize>) -> (String, String) {
    let wide = n > WIDE;
    let ip = match i {
        0 => "198.18.0.1".to_string(),
        _ if wide => format!("198.18.{}.{}", 1 + i / 256, i % 256),
        _ => format!("198.18.{}.{}", 64 + i / 256, i % 256),
    };
    let block = if Some(i) == changed { n + i } else { i };
    let cidr = if !wide {
        format!("198.19.{}.{}/29", block * 8 / 256, block * 8 % 256)
    } else if block == 0 {
        "198.19.0.0/29".to_string()
    } else {
        // After the real node's 8 addresses; the changed node past them all.
        let a = 8 + if Some(i) == changed { n } else { i };
        format!("198.19.{}.{}/32", a / 256, a % 256)
    };
    (ip, cidr)
}

/// The most nodes the /29 address plan holds (8,192 /29s, twice: the
/// changed node moves to `n + i`).
const WIDE: usize = 4000;

/// The Node object of registry entry `i` (`name`), as JSON.
fn node_json(name: &str, i: usize, n: usize, changed: Option<usize>) -> String {
    let (ip, cidr) = node_addrs(i, n, changed);
    // Node 0 is the real one: its agent publishes its own annotations.
    let annotations = if i == 0 {
        serde_json::json!({})
    } else {
        serde_json::json!({
            "weft.dev/underlay-ip": ip,
            "weft.dev/vtep-mac": format!("0e:77:c6:12:{:02x}:{:02x}", i / 256, i % 256),
        })
    };
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    })
    .to_string()
}

/// One curl config block: a request to the API server as admin.
fn curl_block(method: &str, path: &str, body: Option<&str>) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut b = format!(
        "url = \"https://{API_IP}:{API_PORT}{path}\"\nrequest = \"{method}\"\ninsecure\nsilent\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"\nheader = \"Authorization: Bearer {ADMIN_TOKEN}\"\n"
    );
    if let Some(body) = body {
        let kind = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        b += &format!("header = \"Content-Type: {kind}\"\n");
        b += &format!("data-binary = \"{}\"\n", quote(body));
    }
    b
}

/// Runs the curl config `blocks` in `ns` (32 requests in flight) and fails
/// unless every status is 2xx.
fn curl_all(ns: &Netns, dir: &Path, blocks: &[String]) -> Result<()> {
    let cfg = dir.join("requests.curlrc");
    std::fs::write(&cfg, blocks.join("next\n"))?;
    let out = ns
        .command("curl")
        .args(["-s", "--parallel", "--parallel-max", "32", "-K"])
        .arg(&cfg)
        .output()
        .context("curl")?;
    let codes = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = codes.lines().filter(|c| !c.starts_with('2')).collect();
    if codes.lines().count() != blocks.len() || !bad.is_empty() {
        anyhow::bail!(
            "API requests: {} of {} answered, failures {:?}: {}",
            codes.lines().count(),
            blocks.len(),
            &bad[..bad.len().min(5)],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn run(weft: &Path, count: usize, registry: &str) -> Result<String> {
    // SAFETY: single-threaded here.
    unsafe { std::env::set_var("WEFT_BIN", weft) };
    match registry {
        "file" => run_file(count),
        "kube" => run_kube(count),
        other => anyhow::bail!("unknown registry `{other}`; use file or kube"),
    }
}

/// Node 0's agent, started and through its first full sync.
struct Started {
    agent: String,
    pid: u32,
    to_ready: Duration,
    first_apply: u64,
    rss: u64,
    entries: usize,
}

fn start(lab: &mut Lab, c: &Cluster) -> Result<Started> {
    let started = Instant::now();
    c.start_agent(lab, 0);
    let agent = Cluster::agent_name(0);
    wait_for("agent ready", Duration::from_secs(120), || {
        lab.log(&agent).contains("ready run_dir=").then_some(())
    });
    let to_ready = started.elapsed();
    let first_apply = applied_us(&lab.log(&agent), 0).context("no apply logged")?;
    let pid = lab.pid(&agent).context("agent pid")?;
    Ok(Started {
        rss: rss_kib(pid),
        entries: c.status(0)["nodes"].as_array().map_or(0, Vec::len),
        agent,
        pid,
        to_ready,
        first_apply,
    })
}

/// Waits until node 0's map has `cidr`: first, cheaply, until `agent` has
/// logged `applies` applies in all (reading its log: a `weft status` dump
/// of 50,000 entries every few ms would compete with the agent for the two
/// CPUs and be measured with it), then by its map.
fn wait_for_cidr(c: &Cluster, lab: &Lab, agent: &str, applies: usize, cidr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.log(agent).matches("registry applied").count() < applies && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    wait_for("the change in the map", Duration::from_secs(30), || {
        c.status(0)["nodes"]
            .as_array()
            .is_some_and(|v| v.iter().any(|n| n["pod_cidr"] == cidr))
            .then_some(())
    });
}

fn run_file(count: usize) -> Result<String> {
    let mut lab = Lab::new("scale");
    let c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1));
    std::fs::write(&c.nodes_file, nodes_file(count, None)).context("write nodes file")?;
    let st = start(&mut lab, &c)?;
    let (agent, pid) = (&st.agent, st.pid);

    // One node's pod CIDR changes.
    let target = count / 2;
    let (_, new_cidr) = node_addrs(target, count, Some(target));
    let t = Instant::now();
    // Replaced whole (write, then rename), as an editor or a config tool
    // does: the agent never reads half a file.
    let tmp = c.nodes_file.with_extension("tmp");
    std::fs::write(&tmp, nodes_file(count, Some(target)))?;
    std::fs::rename(&tmp, &c.nodes_file)?;
    wait_for_cidr(&c, &lab, agent, 2, &new_cidr);
    let change_wall = t.elapsed();
    let change_apply = applied_cell(&lab.log(agent), 1).unwrap_or_default();
    let rss_after = rss_kib(pid);

    Ok(report(&Figures {
        registry: "file",
        count,
        entries: st.entries,
        setup: None,
        to_ready: st.to_ready,
        first_apply_us: st.first_apply,
        rss: st.rss,
        change: "one node re-CIDR'd: file written → visible in the map",
        change_wall,
        change_apply: format!(
            "| of which: the agent's work (re-reading the whole file; 2 map writes) | {change_apply} |"
        ),
        rss_after,
    }))
}

struct Figures {
    registry: &'static str,
    count: usize,
    entries: usize,
    /// What it took to fill the registry, if worth saying.
    setup: Option<String>,
    to_ready: Duration,
    first_apply_us: u64,
    rss: u64,
    change: &'static str,
    change_wall: Duration,
    change_apply: String,
    rss_after: u64,
}

fn report(f: &Figures) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "registry: {}, {} nodes ({} in the LPM map); machine: {} cores, kernel {}",
        f.registry,
        f.count,
        f.entries,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    if let Some(s) = &f.setup {
        let _ = writeln!(out, "{s}");
    }
    let _ = writeln!(out, "| figure | value |\n| --- | --- |");
    let _ = writeln!(
        out,
        "| agent start → ready (parse, load, attach, first full sync) | {:.0} ms |",
        f.to_ready.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        out,
        "| first full sync: diff + {} map writes | {:.1} ms |",
        f.count,
        f.first_apply_us as f64 / 1e3
    );
    let _ = writeln!(
        out,
        "| agent RSS after the first sync | {:.1} MiB |",
        f.rss as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| {} | {:.0} ms |",
        f.change,
        f.change_wall.as_secs_f64() * 1e3
    );
    let _ = writeln!(out, "{}", f.change_apply);
    let _ = writeln!(
        out,
        "| agent RSS after the change | {:.1} MiB |",
        f.rss_after as f64 / 1024.0
    );
    out
}

fn run_kube(count: usize) -> Result<String> {
    let mut lab = Lab::new("scale");
    let mut c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1));
    let und = c.underlay.ns.clone();
    let api = KubeApi::start(&mut lab, &und, "br0");
    let name = |i: usize| {
        if i == 0 {
            c.nodes[0].name.clone()
        } else {
            format!("scale-{i}")
        }
    };
    let t = Instant::now();
    let blocks: Vec<String> = (0..count)
        .map(|i| {
            curl_block(
                "POST",
                "/api/v1/nodes",
                Some(&node_json(&name(i), i, count, None)),
            )
        })
        .collect();
    curl_all(&und, &lab.dir, &blocks)?;
    let created = t.elapsed();

    // The agent authenticates as admin here: RBAC is the kube test's business.
    c.spec.agent_args = vec![
        "--registry".into(),
        "kube".into(),
        "--kubeconfig".into(),
        api.kubeconfig("admin", ADMIN_TOKEN).display().to_string(),
    ];
    let st = start(&mut lab, &c)?;
    let (agent, pid) = (&st.agent, st.pid);

    // One node's pod CIDR changes: podCIDR is immutable, so the Node is
    // deleted and created again with the new one (two watch events).
    let target = count / 2;
    let (_, new_cidr) = node_addrs(target, count, Some(target));
    let applies_before = lab.log(agent).matches("registry applied").count();
    let t = Instant::now();
    curl_all(
        &und,
        &lab.dir,
        &[curl_block(
            "DELETE",
            &format!("/api/v1/nodes/{}", name(target)),
            None,
        )],
    )?;
    curl_all(
        &und,
        &lab.dir,
        &[curl_block(
            "POST",
            "/api/v1/nodes",
            Some(&node_json(&name(target), target, count, Some(target))),
        )],
    )?;
    wait_for_cidr(&c, &lab, agent, applies_before + 2, &new_cidr);
    let change_wall = t.elapsed();
    let log = lab.log(agent);
    let change_applies: Vec<String> = (applies_before..)
        .map_while(|k| applied_cell(&log, k))
        .collect();
    let rss_after = rss_kib(pid);

    // Updates that change nothing weft reads, as kubelets' status updates
    // do all the time: a label on 500 Nodes.
    let reconciles = || -> Result<u64> {
        let text = c.nodes[0]
            .ns
            .command("curl")
            .args(["-s", "http://127.0.0.1:9807/metrics"])
            .output()?
            .stdout;
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.strip_prefix("weft_reconciles_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .context("weft_reconciles_total in /metrics")
    };
    let before = reconciles()?;
    let labelled = count.saturating_sub(1).min(500);
    let blocks: Vec<String> = (1..=labelled)
        .map(|i| {
            curl_block(
                "PATCH",
                &format!("/api/v1/nodes/{}", name(i)),
                Some(r#"{"metadata":{"labels":{"weft-scale":"touched"}}}"#),
            )
        })
        .collect();
    curl_all(&und, &lab.dir, &blocks)?;
    std::thread::sleep(Duration::from_secs(1));
    let label_applies = reconciles()? - before;
    Ok(report(&Figures {
        registry: "kube",
        count,
        entries: st.entries,
        setup: Some(format!(
            "({count} Node objects created through the API in {:.1} s, 32 requests in flight, before the agent starts)",
            created.as_secs_f64()
        )),
        to_ready: st.to_ready,
        first_apply_us: st.first_apply,
        rss: st.rss,
        change: "one node re-CIDR'd: Node deleted and created again → visible in the map",
        change_wall,
        change_apply: format!(
            "| of which: the agent's work for each of the {} watch events | {} |",
            change_applies.len(),
            change_applies.join("; ")
        ),
        rss_after,
    }) + &format!(
        "| label changed on {labelled} Nodes (nothing weft reads) → snapshots applied | {label_applies} |\n"
    ))
}
