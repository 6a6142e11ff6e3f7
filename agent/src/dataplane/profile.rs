//! `weft profile`: how much CPU weft's BPF programs take, measured by the
//! kernel (BPF_ENABLE_STATS: run count and run time per program), over a
//! window of live traffic.
//!
//! The statistics are on only while `weft profile` holds the file descriptor
//! the kernel gives back, so nothing stays switched on after it exits (unlike
//! the `kernel.bpf_stats_enabled` sysctl). Counting costs two clock reads per
//! program run, so a profile is taken apart from any throughput measurement.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use serde::Serialize;

/// Programs whose name starts with this are weft's.
const PREFIX: &str = "weft_";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "could not switch on BPF run-time statistics (BPF_ENABLE_STATS): {0}; \
         this needs root (CAP_SYS_ADMIN) and a kernel ≥ 5.8"
    )]
    Enable(#[source] aya::sys::SyscallError),
    #[error("could not list the loaded BPF programs: {0}; run as root")]
    List(#[source] aya::programs::ProgramError),
    #[error(
        "no weft BPF program is loaded on this machine; start `weft agent` \
         (or `cargo xtask demo`) first"
    )]
    NothingLoaded,
    #[error("the window must be longer than 0 s")]
    EmptyWindow,
}

/// One program name's totals over the window (all loaded copies summed: on a
/// machine running several nodes, as the demo and the bench do, every node
/// loads its own copy).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProgramRow {
    pub name: String,
    /// Loaded copies of this program.
    pub copies: usize,
    pub runs: u64,
    pub run_ns: u64,
    pub runs_per_s: f64,
    /// Mean time per run; `None` when it did not run.
    pub ns_per_run: Option<f64>,
    /// Share of all CPU time on the machine in the window.
    pub cpu_pct: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Profile {
    pub seconds: f64,
    pub cpus: usize,
    pub programs: Vec<ProgramRow>,
    /// All of weft's programs together, as a share of all CPU time.
    pub total_cpu_pct: f64,
}

/// Run count and run time of every loaded weft program, by program id.
fn snapshot() -> Result<BTreeMap<u32, (String, u64, u64)>, ProfileError> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.map_err(ProfileError::List)?;
        let Some(name) = info.name_as_str().filter(|n| n.starts_with(PREFIX)) else {
            continue;
        };
        let run_ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        out.insert(info.id(), (name.to_string(), info.run_count(), run_ns));
    }
    Ok(out)
}

/// Switches statistics on, waits `window`, and reports what weft's programs
/// did in between. Programs loaded or unloaded during the window count from
/// when they are first or last seen.
pub fn profile(window: Duration) -> Result<Profile, ProfileError> {
    if window.is_zero() {
        return Err(ProfileError::EmptyWindow);
    }
    let _stats = enable_stats(Stats::RunTime).map_err(ProfileError::Enable)?;
    let before = snapshot()?;
    if before.is_empty() {
        return Err(ProfileError::NothingLoaded);
    }
    std::thread::sleep(window);
    let after = snapshot()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(summarize(&before, &after, window, cpus))
}

fn summarize(
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: &BTreeMap<u32, (String, u64, u64)>,
    window: Duration,
    cpus: usize,
) -> Profile {
    let secs = window.as_secs_f64();
    let all_ns = secs * 1e9 * cpus as f64;
    let mut by_name: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
    for (id, (name, runs, ns)) in after {
        let (runs0, ns0) = before.get(id).map_or((0, 0), |(_, r, n)| (*r, *n));
        let e = by_name.entry(name).or_default();
        e.0 += 1;
        e.1 += runs.saturating_sub(runs0);
        e.2 += ns.saturating_sub(ns0);
    }
    let programs: Vec<ProgramRow> = by_name
        .into_iter()
        .map(|(name, (copies, runs, run_ns))| ProgramRow {
            name: name.to_string(),
            copies,
            runs,
            run_ns,
            runs_per_s: runs as f64 / secs,
            ns_per_run: (runs > 0).then(|| run_ns as f64 / runs as f64),
            cpu_pct: run_ns as f64 / all_ns * 100.0,
        })
        .collect();
    let total_cpu_pct = programs.iter().map(|p| p.cpu_pct).sum();
    Profile {
        seconds: secs,
        cpus,
        programs,
        total_cpu_pct,
    }
}

/// The table `weft profile` prints.
pub fn format(p: &Profile) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "weft BPF programs over {:.1} s ({} CPUs; all loaded copies summed)",
        p.seconds, p.cpus
    );
    let _ = writeln!(
        s,
        "{:<16} {:>6} {:>12} {:>10} {:>8}",
        "program", "copies", "runs/s", "ns/run", "CPU %"
    );
    for r in &p.programs {
        let per = r.ns_per_run.map_or("-".to_string(), |n| format!("{n:.0}"));
        let _ = writeln!(
            s,
            "{:<16} {:>6} {:>12.0} {:>10} {:>8.3}",
            r.name, r.copies, r.runs_per_s, per, r.cpu_pct
        );
    }
    let _ = writeln!(s, "{:<16} {:>38} {:>8.3}", "total", "", p.total_cpu_pct);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_summed_and_new_programs_count_from_zero() {
        let before = BTreeMap::from([
            (1, ("weft_from_pod".to_string(), 10, 1_000)),
            (2, ("weft_from_pod".to_string(), 5, 500)),
        ]);
        let after = BTreeMap::from([
            (1, ("weft_from_pod".to_string(), 110, 11_000)),
            (2, ("weft_from_pod".to_string(), 105, 10_500)),
            (3, ("weft_from_und".to_string(), 50, 25_000)),
        ]);
        let p = summarize(&before, &after, Duration::from_secs(2), 2);
        assert_eq!(p.programs.len(), 2);
        let pod = &p.programs[0];
        assert_eq!(
            (pod.name.as_str(), pod.copies, pod.runs, pod.run_ns),
            ("weft_from_pod", 2, 200, 20_000)
        );
        assert_eq!(pod.ns_per_run, Some(100.0));
        assert_eq!(pod.runs_per_s, 100.0);
        // 20 µs of 4 CPU-seconds.
        assert!((pod.cpu_pct - 20_000.0 / 4e9 * 100.0).abs() < 1e-12);
        let und = &p.programs[1];
        assert_eq!((und.runs, und.ns_per_run), (50, Some(500.0)));
        assert!((p.total_cpu_pct - 45_000.0 / 4e9 * 100.0).abs() < 1e-12);
        assert!(format(&p).contains("weft_from_und"));
    }

    #[test]
    fn an_idle_program_has_no_time_per_run() {
        let snap = BTreeMap::from([(1, ("weft_from_host".to_string(), 7, 70))]);
        let p = summarize(&snap, &snap, Duration::from_secs(1), 1);
        assert_eq!(p.programs[0].ns_per_run, None);
        assert_eq!(p.total_cpu_pct, 0.0);
        assert!(format(&p).contains(" - "), "{}", format(&p));
    }
}
