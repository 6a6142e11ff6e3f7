//! `cargo xtask scale`: the agent against a registry of N nodes (default
//! 5,000, `file` registry): time from a full list to maps written, the
//! agent's memory, and the time for one node change to reach the map.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use weft_tests::{Cluster, ClusterSpec, Lab, wait_for};

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
    // Node 0 is the real node (198.18.0.1, 198.19.0.0/29); the others are
    // registry entries only: underlay 198.18.{64+i/256}.{i%256}, pods /29s of 198.19.0.0/16.
    let mut s = String::with_capacity(n * 100);
    for i in 0..n {
        let ip = if i == 0 {
            "198.18.0.1".to_string()
        } else {
            format!("198.18.{}.{}", 64 + i / 256, i % 256)
        };
        let block = if Some(i) == changed { n + i } else { i };
        let cidr = format!("198.19.{}.{}/29", block * 8 / 256, block * 8 % 256);
        let _ = write!(
            s,
            "[[node]]\nname = \"node-{}\"\nunderlay_ip = \"{ip}\"\npod_cidr = \"{cidr}\"\n\n",
            i + 1
        );
    }
    s
}

fn applied_us(log: &str, nth: usize) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("registry applied"))
        .nth(nth)?
        .split("elapsed_us=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(weft: &Path, count: usize) -> Result<String> {
    // SAFETY: single-threaded here.
    unsafe { std::env::set_var("WEFT_BIN", weft) };
    let mut lab = Lab::new("scale");
    let c = Cluster::new(&mut lab, ClusterSpec::nodes_only(1));
    std::fs::write(&c.nodes_file, nodes_file(count, None)).context("write nodes file")?;
    let started = Instant::now();
    c.start_agent(&mut lab, 0);
    let agent = Cluster::agent_name(0);
    wait_for("agent ready", Duration::from_secs(120), || {
        lab.log(&agent).contains("agent: ready").then_some(())
    });
    let to_ready = started.elapsed();
    let first_apply = applied_us(&lab.log(&agent), 0).context("no apply logged")?;
    let pid = lab.pid(&agent).context("agent pid")?;
    let rss = rss_kib(pid);
    let entries = c.status(0)["nodes"].as_array().map_or(0, Vec::len);

    // One node's pod CIDR changes.
    let target = count / 2;
    let new_cidr = {
        let block = count + target;
        format!("198.19.{}.{}/29", block * 8 / 256, block * 8 % 256)
    };
    let t = Instant::now();
    std::fs::write(&c.nodes_file, nodes_file(count, Some(target)))?;
    wait_for("the change in the map", Duration::from_secs(30), || {
        c.status(0)["nodes"]
            .as_array()
            .is_some_and(|v| v.iter().any(|n| n["pod_cidr"] == new_cidr.as_str()))
            .then_some(())
    });
    let change_wall = t.elapsed();
    let change_apply = applied_us(&lab.log(&agent), 1).unwrap_or(0);
    let rss_after = rss_kib(pid);

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "registry: file, {count} nodes ({entries} in the LPM map); machine: {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    let _ = writeln!(out, "| figure | value |\n| --- | --- |");
    let _ = writeln!(
        out,
        "| agent start → ready (parse, load, attach, first full sync) | {:.0} ms |",
        to_ready.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        out,
        "| first full sync: diff + {count} map writes | {:.1} ms |",
        first_apply as f64 / 1e3
    );
    let _ = writeln!(
        out,
        "| agent RSS after the first sync | {:.1} MiB |",
        rss as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| one node re-CIDR'd: file written → visible in the map | {:.0} ms |",
        change_wall.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        out,
        "| of which: re-read + diff + 2 map writes | {:.1} ms |",
        change_apply as f64 / 1e3
    );
    let _ = writeln!(
        out,
        "| agent RSS after the change | {:.1} MiB |",
        rss_after as f64 / 1024.0
    );
    Ok(out)
}
