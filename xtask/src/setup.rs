//! `cargo xtask setup`: installs everything weft needs to build and test, on
//! a fresh Debian machine, idempotently (a second run only checks).

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the tools tests, demo and
/// bench drive.
pub const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "tcpdump",
    "iperf3",
    "sockperf",
    "bpftool",
    "util-linux",
    "curl",
    "openssl",
    "containernetworking-plugins",
    "iptables",
    "nftables",
    "containerd",
    "conntrack",
    "podman",
    "runc",
    "catatonit",
    "busybox-static",
    "mmdebstrap",
    "qemu-system-x86",
    "cpio",
    "binutils",
];

fn step(msg: &str) {
    eprintln!("==> setup: {msg}");
}

fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Makes `$CARGO_HOME/bin` visible to child processes (bpf-linker lives there).
pub fn cargo_bin_on_path() {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    if let Some(bin) = home.map(|h| h.join("bin")) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        if !std::env::split_paths(&path).any(|p| p == bin) {
            let joined =
                std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
                    .expect("valid PATH");
            // SAFETY: single-threaded at this point (xtask start-up).
            unsafe { std::env::set_var("PATH", joined) };
        }
    }
}

pub fn setup() -> Result<()> {
    cargo_bin_on_path();
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("Debian packages: all present");
    } else {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "missing Debian packages {missing:?}; run as root (or `apt-get install {}`)",
                missing.join(" ")
            );
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    if ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        step("nightly toolchain: present");
    } else {
        step("installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if crate::ebpf::has_rust_src() {
        step("rust-src for nightly: present");
    } else {
        step("adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if ok(Command::new("bpf-linker").arg("--version")) {
        step("bpf-linker: present");
    } else {
        step("building bpf-linker against LLVM 22 (about 2 minutes)");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    step(
        "the Kubernetes components and etcd for the Kubernetes tests and `cargo xtask cluster` (built once from Debian's source, then cached)",
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/kube/build.sh");
    run(Command::new("bash").arg(script))?;
    step("done");
    Ok(())
}
