//! Developer entry points: `cargo xtask setup | build-ebpf | lint | test | demo | cluster |
//! conformance | bench | image`.

mod bench;
mod cluster;
mod demo;
mod ebpf;
mod image;
mod running;
mod scale;
mod setup;
mod udpfwd;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "weft developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the BPF toolchain and test tools (idempotent).
    Setup,
    /// Build the BPF object (with BTF) and print its path.
    BuildEbpf {
        /// Release profile (the default; what the agent embeds).
        #[arg(long, conflicts_with = "debug")]
        release: bool,
        /// Debug profile.
        #[arg(long)]
        debug: bool,
    },
    /// cargo fmt --check and clippy -D warnings, host and BPF target.
    Lint,
    /// Set up, lint, then run every test; the privileged suite needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run weft on another kernel in an emulated QEMU guest (both decap
    /// modes on a veth underlay; on two virtio-net NICs `--decap auto`,
    /// `tc`, a jumbo MTU and a VLAN; restart, down, a new agent after down);
    /// also part of `test`, on every kernel.
    VmCheck {
        /// Which kernel: Debian 12's 6.1 LTS (cloud) or Ubuntu 22.04's 5.15
        /// (generic, from archive.ubuntu.com).
        #[arg(long, default_value = "debian-6.1", value_parser = VM_KERNELS)]
        kernel: String,
    },
    /// Measure the agent against a registry of many nodes (see docs/SCALE.md).
    Scale {
        /// Number of nodes in the registry.
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Where the nodes come from: `file`, or `kube` (Node objects in a
        /// real kube-apiserver and etcd started for the run).
        #[arg(long, default_value = "file", value_parser = ["file", "kube"])]
        registry: String,
    },
    /// Measure weft side by side with kernel vxlan, userspace UDP, host-gw and the underlay.
    Bench {
        /// Repeats of each figure (median and spread are reported).
        #[arg(long, default_value_t = 3,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
        runs: usize,
        /// Seconds per figure.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
        seconds: u32,
        /// About a minute: 1 run, 2 s per figure.
        #[arg(long)]
        quick: bool,
        /// Comma-separated modes [default: all].
        #[arg(long, value_delimiter = ',')]
        modes: Option<Vec<String>>,
        /// The underlay's bridge ports: `veth` (offloads on: GSO skbs cross
        /// whole) or `nic-like` (transmit checksum and segmentation done in
        /// software at the port, as a NIC does in hardware; XDP decap needs it).
        #[arg(long, default_value = "veth", value_parser = ["veth", "nic-like"])]
        underlay: String,
        /// Let the scheduler place the client and server instead of pinning
        /// the client to CPU 0 and the server to CPU 1 (needs 2 cores).
        #[arg(long)]
        no_pin: bool,
        /// TCP congestion control for the iperf3 tests (iperf3 `-C`), e.g.
        /// `cubic`; by default the machine's (recorded in the results).
        #[arg(long)]
        cc: Option<String>,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the ratio chart (SVG) here.
        #[arg(long, default_value = "target/bench-ratios.svg")]
        svg: PathBuf,
        /// Regenerate docs/BENCHMARKS.md (and docs/bench-ratios.svg) from this run.
        #[arg(long)]
        docs: bool,
        /// Do not measure: render the table, chart and (with --docs) the docs
        /// from a results JSON an earlier run wrote.
        #[arg(long)]
        render: Option<PathBuf>,
        /// Measure pod set-up by the CNI plugins (ADD/DEL latency, pods/s at
        /// concurrency 1 and 20; weft vs bridge+host-local): only that, unless
        /// --modes is given too. A run without --modes measures it as well.
        #[arg(long)]
        cni: bool,
    },
    /// (internal) The userspace TUN↔UDP reference forwarder the bench runs.
    #[command(hide = true)]
    UdpForwarder {
        #[arg(long)]
        tun: String,
        #[arg(long)]
        listen: std::net::SocketAddrV4,
        /// SUBNET/PREFIX=PEER_IP:PORT, repeatable.
        #[arg(long)]
        route: Vec<String>,
    },
    /// Build the agent's container image (Debian base, weft, weft-cni) as an
    /// OCI archive, for deploy/weft.yaml.
    Image {
        /// Where to write the archive.
        #[arg(long, default_value = "target/weft-image.tar")]
        output: PathBuf,
    },
    /// Bring up a 3-node weft cluster in network namespaces on this machine.
    Demo {
        /// Tear down a demo cluster left by an earlier run.
        #[arg(long)]
        down: bool,
    },
    /// Bring up a real Kubernetes cluster on this machine (etcd, API server,
    /// controller manager, scheduler; per node containerd, kubelet and
    /// kube-proxy in its own namespaces) with weft installed from deploy/
    /// by kubectl; stays up until Ctrl-C or `--down`.
    Cluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Tear down a cluster left by an earlier run (also one that was killed).
        #[arg(long)]
        down: bool,
    },
    /// Kubernetes' own e2e.test against such a cluster: the [sig-network]
    /// conformance specs that need no DNS add-on (or --focus); prints
    /// Ginkgo's summary.
    Conformance {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// A Ginkgo focus regular expression instead of the network
        /// conformance specs.
        #[arg(long)]
        focus: Option<String>,
    },
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag that long-running tasks check, so they return
/// normally and their labs clean up.
pub fn install_stop_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether SIGINT/SIGTERM arrived.
pub fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is in the workspace")
        .to_path_buf()
}

fn stage(msg: &str) {
    eprintln!("\n==> {msg}");
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace()).args(args);
    c
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn lint() -> Result<()> {
    stage("lint: cargo fmt --check");
    run(
        cargo(&["fmt", "--all", "--", "--check"]),
        "cargo fmt --check (run `cargo fmt --all`)",
    )?;
    stage("lint: cargo clippy --workspace --all-targets -D warnings");
    run(
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "clippy",
    )?;
    stage("lint: clippy on the BPF crate for bpfel-unknown-none");
    let mut c = Command::new("rustup");
    c.current_dir(workspace())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            ebpf::PACKAGE,
            "--target",
            ebpf::TARGET,
            "-Z",
            "build-std=core",
            "--release",
        ])
        .arg("--target-dir")
        .arg(workspace().join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"]);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    run(c, "clippy (BPF target)")
}

/// Runs a `cargo test` command, echoing its output, and adds up its
/// "test result:" lines into `total` (passed, failed, ignored).
fn run_tests(mut cmd: Command, what: &str, total: &mut [u64; 3]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for (i, key) in [" passed", " failed", " ignored"].iter().enumerate() {
                let n = rest
                    .split(';')
                    .find(|part| part.ends_with(key))
                    .and_then(|part| {
                        part.trim()
                            .trim_end_matches(key)
                            .rsplit(' ')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                    });
                total[i] += n.unwrap_or(0);
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    stage("setup");
    setup::setup()?;
    lint()?;
    stage("build: workspace (embeds the BPF object)");
    run(
        cargo(&["build", "--workspace", "--all-targets"]),
        "cargo build",
    )?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("note: not root: privileged tests will be skipped (each prints SKIP)");
    }
    // The agent's container image, from the binaries under test, for
    // tests/e2e/daemonset.rs (beside, not over, `cargo xtask image`'s).
    let image = workspace().join("target/weft-image-test.tar");
    let mut kube_images = None;
    if root {
        image::build(&workspace().join("target/debug/weft"), &image)?;
        // pause, agnhost and busybox for the real cluster (tests/e2e/k8s.rs).
        kube_images = Some(image::kube_images()?);
    }
    let mut total = [0u64; 3];
    stage("test: unit tests (no privileges needed)");
    let mut unit = cargo(&["test", "--workspace", "--exclude", "weft-tests"]);
    unit.args(extra);
    let unit_result = run_tests(unit, "unit tests", &mut total);
    stage("test: privileged suite (real programs, real namespaces)");
    let mut e2e = cargo(&["test", "-p", "weft-tests"]);
    e2e.args(extra).args(["--", "--test-threads=1"]);
    if root {
        e2e.env("WEFT_REQUIRE_PRIVILEGED", "1")
            .env("WEFT_IMAGE", &image);
        if let Some(dir) = &kube_images {
            e2e.env("WEFT_KUBE_IMAGES", dir);
        }
    }
    let e2e_result = run_tests(e2e, "privileged tests", &mut total);
    let mut vm_result = Ok(());
    for kernel in VM_KERNELS {
        if !root {
            println!("SKIP vm-check on {kernel}: needs root");
            total[2] += 1;
            continue;
        }
        stage(&format!(
            "test: another kernel ({kernel} in an emulated QEMU guest)"
        ));
        match vm_check(&workspace().join("target/debug/weft"), kernel) {
            Ok(VmOutcome::Checked) => total[0] += 1,
            Ok(VmOutcome::NoKernel) => {
                println!("SKIP vm-check on {kernel}: its kernel could not be downloaded");
                total[2] += 1;
            }
            Err(e) => {
                total[1] += 1;
                vm_result = vm_result.and(Err(e));
            }
        }
    }
    stage("summary");
    println!(
        "{} passed, {} failed, {} skipped",
        total[0], total[1], total[2]
    );
    unit_result.and(e2e_result).and(vm_result)
}

/// The `weft` binary (with `weft-cni` beside it) for demo, bench, scale and
/// vm-check: built
/// now (release or debug), or the one `WEFT_BIN` names (the tests set it, to
/// run the demo and bench without a cargo build inside `cargo test`).
fn weft_binary(release: bool) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        stage(&format!("using WEFT_BIN={}", bin.to_string_lossy()));
        return Ok(bin.into());
    }
    let (args, dir): (&[&str], _) = if release {
        (&["build", "--release", "-p", "weft-agent"], "release")
    } else {
        (&["build", "-p", "weft-agent"], "debug")
    };
    stage(&format!("build: weft and weft-cni ({dir})"));
    run(cargo(args), &format!("cargo {}", args.join(" ")))?;
    Ok(workspace().join("target").join(dir).join("weft"))
}

/// The kernels `tests/vm/run.sh` knows (its `WEFT_VM_KERNEL`).
const VM_KERNELS: [&str; 2] = ["debian-6.1", "ubuntu-5.15"];

enum VmOutcome {
    Checked,
    /// The kernel could not be downloaded: nothing was checked.
    NoKernel,
}

/// Runs `tests/vm/run.sh`: weft in a QEMU guest on `kernel` (netlink TC
/// attachments, no TCX: both are older than 6.6), both decap modes on a
/// veth underlay and on virtio-net NICs.
fn vm_check(weft: &std::path::Path, kernel: &str) -> Result<VmOutcome> {
    let mut cmd = Command::new(workspace().join("tests/vm/run.sh"));
    cmd.env("WEFT_BIN", weft).env("WEFT_VM_KERNEL", kernel);
    let status = cmd.status().context("starting tests/vm/run.sh")?;
    match status.code() {
        Some(0) => Ok(VmOutcome::Checked),
        Some(3) => Ok(VmOutcome::NoKernel),
        _ => bail!("tests/vm/run.sh on {kernel} failed ({status})"),
    }
}

fn main() -> Result<()> {
    setup::cargo_bin_on_path();
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf { release: _, debug } => {
            let profile = if debug {
                ebpf::Profile::Debug
            } else {
                ebpf::Profile::Release
            };
            let object = ebpf::build(&workspace(), profile).map_err(|e| anyhow::anyhow!("{e}"))?;
            let bytes =
                std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
            if !ebpf::has_btf_section(&bytes) {
                bail!(
                    "{} has no .BTF section; is bpf-linker too old?",
                    object.display()
                );
            }
            println!("{}", object.display());
            Ok(())
        }
        Cmd::Lint => lint(),
        Cmd::Test { args } => test(&args),
        Cmd::VmCheck { kernel } => {
            setup::setup()?;
            match vm_check(&weft_binary(true)?, &kernel)? {
                VmOutcome::Checked => Ok(()),
                VmOutcome::NoKernel => {
                    bail!("vm-check: the {kernel} kernel could not be downloaded")
                }
            }
        }
        Cmd::Scale { nodes, registry } => {
            setup::setup()?;
            let report = scale::run(&weft_binary(true)?, nodes, &registry)?;
            println!("{report}");
            Ok(())
        }
        Cmd::Bench {
            runs,
            seconds,
            quick,
            modes,
            underlay,
            no_pin,
            cc,
            json,
            svg,
            docs,
            render,
            cni,
        } => {
            if let Some(path) = render {
                let result: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                let runs = result["runs"].as_u64().unwrap_or(0) as usize;
                let secs = result["seconds_per_figure"].as_u64().unwrap_or(0) as u32;
                println!("{}", bench::table(&result));
                let chart = bench::svg(&result);
                std::fs::write(workspace().join(&svg), &chart)?;
                if docs {
                    let dir = workspace().join("docs");
                    std::fs::write(dir.join("bench-ratios.svg"), &chart)?;
                    std::fs::write(dir.join("BENCHMARKS.md"), bench::docs(&result, runs, secs))?;
                    println!(
                        "docs: {} (from {})",
                        dir.join("BENCHMARKS.md").display(),
                        path.display()
                    );
                }
                return Ok(());
            }
            let (runs, seconds) = if quick { (1, 2) } else { (runs, seconds) };
            let opts = bench::Opts {
                runs,
                secs: seconds,
                cni: cni || modes.is_none(),
                modes: match (modes, cni) {
                    (Some(m), _) => m,
                    (None, true) => Vec::new(),
                    (None, false) => bench::MODES.iter().map(|m| m.to_string()).collect(),
                },
                json,
                svg,
                docs: docs.then(|| workspace().join("docs")),
                xtask: std::env::current_exe()?,
                underlay: bench::underlay_kind(&underlay).context("--underlay")?,
                pin: !no_pin && bench::can_pin(),
                cc,
            };
            // Refused before anything is installed, built or created.
            bench::check(&opts)?;
            setup::setup()?;
            let weft = weft_binary(true)?;
            // SAFETY: single-threaded here.
            unsafe { std::env::set_var("WEFT_BIN", weft) };
            install_stop_handler();
            let result = bench::run(&opts)?;
            println!("\n{}", bench::table(&result));
            println!("{}", bench::targets(&result));
            print!("{}", bench::profile_lines(&result));
            let chart = bench::svg(&result);
            std::fs::write(workspace().join(&opts.svg), &chart)
                .with_context(|| format!("writing {}", opts.svg.display()))?;
            println!("chart: {}", opts.svg.display());
            if let Some(path) = &opts.json {
                std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
                println!("JSON: {}", path.display());
            }
            if let Some(dir) = &opts.docs {
                std::fs::write(dir.join("bench-ratios.svg"), &chart)?;
                std::fs::write(
                    dir.join("BENCHMARKS.md"),
                    bench::docs(&result, runs, seconds),
                )?;
                std::fs::write(
                    dir.join("bench-results.json"),
                    serde_json::to_string_pretty(&result)?,
                )?;
                println!("docs: {}", dir.join("BENCHMARKS.md").display());
            }
            Ok(())
        }
        Cmd::UdpForwarder { tun, listen, route } => {
            let routes = route
                .iter()
                .map(|r| {
                    let (net, peer) = r.split_once('=').context("--route SUBNET/PREFIX=IP:PORT")?;
                    let (addr, prefix) = net
                        .split_once('/')
                        .context("--route SUBNET/PREFIX=IP:PORT")?;
                    Ok((addr.parse()?, prefix.parse()?, peer.parse()?))
                })
                .collect::<Result<Vec<_>>>()?;
            udpfwd::run(&tun, listen, &routes)
        }
        Cmd::Image { output } => {
            setup::setup()?;
            let out = workspace().join(output);
            image::build(&weft_binary(true)?, &out)?;
            println!("{} ({})", out.display(), image::tag());
            Ok(())
        }
        Cmd::Cluster { nodes, down } => {
            if down {
                cluster::down()
            } else {
                setup::setup()?;
                cluster::up(&weft_binary(true)?, nodes)
            }
        }
        Cmd::Conformance { nodes, focus } => {
            setup::setup()?;
            cluster::conformance(&weft_binary(true)?, nodes, focus)
        }
        Cmd::Demo { down } => {
            if down {
                demo::down()
            } else {
                setup::setup()?;
                demo::up(&weft_binary(false)?)
            }
        }
    }
}
