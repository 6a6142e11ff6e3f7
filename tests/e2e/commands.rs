//! The README's main job and its proof, run as a user runs them:
//! `cargo xtask demo` (up, then `--down`) and `cargo xtask bench` (a quick
//! run's JSON; an interrupted run). Both must leave no namespace behind.
//! The xtask binary is the one `cargo build --workspace` made; `WEFT_BIN`
//! points it at the already-built `weft`, so nothing is compiled here.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use weft_tests::{Lab, privileged, sh, wait_for, weft_bin};

fn xtask() -> PathBuf {
    let bin = weft_bin().with_file_name("xtask");
    assert!(bin.is_file(), "no xtask binary at {}", bin.display());
    bin
}

fn xtask_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(xtask());
    cmd.args(args).env("WEFT_BIN", weft_bin());
    cmd
}

fn namespaces() -> BTreeSet<String> {
    sh("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Runs `cargo xtask demo --down` when dropped, so a failing test leaves no
/// demo behind either.
struct DemoDown;

impl Drop for DemoDown {
    fn drop(&mut self) {
        let _ = xtask_cmd(&["demo", "--down"]).output();
    }
}

#[test]
fn demo_comes_up_connected_and_down_leaves_nothing() {
    if !privileged("demo_comes_up_connected_and_down_leaves_nothing") {
        return;
    }
    let before = namespaces();
    let mut lab = Lab::new("cmd");
    let _down = DemoDown;
    lab.spawn("demo", xtask_cmd(&["demo"]));
    wait_for("the demo to be up", Duration::from_secs(180), || {
        let log = lab.log("demo");
        assert!(!log.contains("Error"), "demo failed:\n{log}");
        log.contains("Ctrl-C").then_some(())
    });
    let log = lab.log("demo");
    assert!(
        log.contains("(54 paths, 0 failed)"),
        "full connectivity matrix:\n{log}"
    );
    assert!(log.contains("Gbit/s"), "an iperf3 figure:\n{log}");
    assert!(
        namespaces().len() > before.len(),
        "the demo's namespaces exist while it is up"
    );
    let out = xtask_cmd(&["demo", "--down"]).output().unwrap();
    assert!(
        out.status.success(),
        "demo --down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the demo to exit", Duration::from_secs(30), || {
        lab.log("demo").contains("demo: done").then_some(())
    });
    wait_for(
        "the demo's namespaces to go",
        Duration::from_secs(30),
        || (namespaces() == before).then_some(()),
    );
    assert!(
        !std::path::Path::new("/run/weft-demo.json").exists(),
        "demo state removed"
    );

    // A demo killed outright (no handler runs): its agents stop with it,
    // and `--down` removes what it left.
    lab.spawn("demo-killed", xtask_cmd(&["demo"]));
    wait_for("the second demo to be up", Duration::from_secs(180), || {
        lab.log("demo-killed").contains("Ctrl-C").then_some(())
    });
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("/run/weft-demo.json").unwrap()).unwrap();
    let prefix = format!("{}-", state["prefix"].as_str().unwrap());
    let inside: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .flat_map(|n| {
            sh("ip", &["netns", "pids", &n])
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        inside.len() >= 3,
        "the demo's agents run in its namespaces: {inside:?}"
    );
    let pid = lab.pid("demo-killed").unwrap() as i32;
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for(
        "the killed demo's agents to exit",
        Duration::from_secs(20),
        || {
            let alive: Vec<&String> = inside
                .iter()
                .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
                .collect();
            alive.is_empty().then_some(())
        },
    );
    let out = xtask_cmd(&["demo", "--down"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cleaned up what the last demo left"),
        "demo --down after a killed demo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(namespaces(), before, "nothing of the killed demo is left");
    assert!(!std::path::Path::new("/run/weft-demo.json").exists());
}

#[test]
fn bench_json_has_every_figure_and_an_interrupted_bench_leaves_nothing() {
    if !privileged("bench_json_has_every_figure_and_an_interrupted_bench_leaves_nothing") {
        return;
    }
    let before = namespaces();
    let mut lab = Lab::new("cmd");
    let json = lab.dir.join("bench.json");
    let svg = lab.dir.join("bench.svg");
    let out = xtask_cmd(&[
        "bench",
        "--quick",
        "--modes",
        "weft,underlay",
        "--cc",
        "reno",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("weft/underlay"),
        "ratio column in the table:\n{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for mode in ["weft", "underlay"] {
        for fig in [
            "tcp1_gbps",
            "tcp4_gbps",
            "udp64_kpps",
            "rr_p50_us",
            "rr_p99_us",
            "cpu_s_per_gb",
        ] {
            let f = &v["modes"][mode][fig];
            for k in ["median", "min", "max"] {
                assert!(
                    f[k].as_f64().is_some_and(|x| x > 0.0),
                    "{mode}.{fig}.{k} is a positive number: {f}"
                );
            }
        }
    }
    assert!(v["ratios"]["weft/underlay"]["tcp1_gbps"].as_f64().is_some());
    // The readings beside the figures: recorded per mode, never a ratio.
    for mode in ["weft", "underlay"] {
        let busiest = &v["modes"][mode]["tcp1_busiest_cpu_pct"]["median"];
        assert!(
            busiest.as_f64().is_some_and(|x| x > 0.0 && x <= 100.0),
            "{mode}: the busiest CPU's busy % during one stream: {busiest}"
        );
        let retrans = &v["modes"][mode]["tcp1_retrans_per_s"]["median"];
        assert!(
            retrans.as_f64().is_some_and(|x| x >= 0.0),
            "{mode}: retransmits per second: {retrans}"
        );
    }
    assert!(
        v["ratios"]["weft/underlay"]
            .get("tcp1_retrans_per_s")
            .is_none()
    );
    assert!(
        text.contains("busiest CPU"),
        "the readings are in the table:\n{text}"
    );
    // `weft profile` (kernel run-time statistics) under each load: both
    // programs of the path ran and took time; no profile for the baseline.
    for load in ["tcp1", "udp64"] {
        let p = &v["bpf_profile"]["weft"][load];
        for prog in ["weft_from_pod", "weft_from_und"] {
            let row = p["programs"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["name"] == prog))
                .unwrap_or_else(|| panic!("{load}: no {prog} in the profile: {p}"));
            assert!(
                row["runs"].as_u64().is_some_and(|n| n > 100)
                    && row["ns_per_run"].as_f64().is_some_and(|ns| ns > 0.0),
                "{load}: {prog} ran, and took time: {row}"
            );
        }
        assert!(
            p["total_cpu_pct"]
                .as_f64()
                .is_some_and(|x| x > 0.0 && x < 100.0)
        );
    }
    assert!(v["bpf_profile"].get("underlay").is_none());
    assert!(
        text.contains("weft's BPF programs took"),
        "the profile is printed:\n{text}"
    );
    assert!(
        v["machine"]["kernel"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    assert!(v["machine"]["cores"].as_u64().is_some_and(|c| c > 0));
    assert!(v["date"].as_str().is_some_and(|d| d.starts_with("20")));
    assert_eq!(v["underlay"], "veth");
    // `--cc` reaches iperf3 (reno: built into every kernel, and no
    // machine's default): the JSON records what its sender ran with.
    assert_eq!(v["tcp_congestion_control"], "reno");
    assert_eq!(v["tcp_congestion_control_chosen"], true);
    // Client and server pinned apart by default, where there are two CPUs.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(v["pinned"], cores >= 2);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    assert_eq!(namespaces(), before, "a finished bench leaves no namespace");

    // A congestion control the kernel does not offer is refused up front,
    // naming the ones it does.
    let out = xtask_cmd(&["bench", "--quick", "--cc", "no-such-cc"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--cc no-such-cc") && err.contains("reno"),
        "bench --cc no-such-cc: {err}"
    );
    assert_eq!(namespaces(), before, "a refused bench builds nothing");
    // So are unknown or repeated modes and empty runs, naming what to pick.
    for (args, says) in [
        (
            &["--modes", "weft,flannel"][..],
            "unknown mode `flannel`; pick from weft,",
        ),
        (
            &["--modes", "weft,underlay,weft"][..],
            "`weft` is named twice",
        ),
        (&["--modes", "weft-xdp"][..], "needs `--underlay nic-like`"),
        (&["--runs", "0"][..], "0 is not in 1..=100"),
    ] {
        let out = xtask_cmd(&[&["bench"][..], args].concat())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says) && !err.contains("panicked"),
            "bench {args:?}: {err}"
        );
    }
    assert_eq!(namespaces(), before, "a refused bench builds nothing");

    // Interrupted in the middle of a mode: it stops and removes everything.
    lab.spawn(
        "bench",
        xtask_cmd(&[
            "bench",
            "--modes",
            "underlay",
            "--runs",
            "3",
            "--seconds",
            "5",
        ]),
    );
    wait_for("the bench to measure", Duration::from_secs(60), || {
        lab.log("bench")
            .contains("run 1/3: mode underlay")
            .then_some(())
    });
    assert!(namespaces().len() > before.len(), "the bench's lab is up");
    let pid = lab.pid("bench").unwrap();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    wait_for("the bench to stop", Duration::from_secs(60), || {
        let log = lab.log("bench");
        (log.contains("interrupted") || log.contains("Error")).then_some(())
    });
    wait_for(
        "the bench's namespaces to go",
        Duration::from_secs(30),
        || (namespaces() == before).then_some(()),
    );
}
