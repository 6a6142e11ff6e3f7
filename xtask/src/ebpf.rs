//! Building the BPF object. Shared by `cargo xtask build-ebpf` and the
//! agent's build script (included there with `#[path]`), so there is one way
//! to build it. Only `std`: build scripts have no other dependencies.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF crate's package (and binary) name.
pub const PACKAGE: &str = "weft-dataplane";
/// Target triple of the BPF object.
pub const TARGET: &str = "bpfel-unknown-none";

/// Which cargo profile to build the BPF object with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// Why the BPF object could not be built; each says what to do about it.
#[derive(Debug)]
pub enum BuildError {
    /// A piece of the BPF toolchain is missing.
    Missing {
        what: &'static str,
        fix: &'static str,
    },
    /// cargo ran and failed (its output has already been printed).
    Cargo(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { what, fix } => write!(
                f,
                "the eBPF toolchain is incomplete: {what} is missing. Fix: {fix} \
                 (or run `cargo xtask setup`, which installs everything)"
            ),
            Self::Cargo(msg) => write!(f, "building the BPF object failed: {msg}"),
        }
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Checks nightly, rust-src and bpf-linker, naming the first one missing.
pub fn check_toolchain() -> Result<(), BuildError> {
    if !succeeds(Command::new("rustup").arg("--version")) {
        return Err(BuildError::Missing {
            what: "rustup",
            fix: "install rustup (https://rustup.rs)",
        });
    }
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        return Err(BuildError::Missing {
            what: "the nightly Rust toolchain",
            fix: "`rustup toolchain install nightly`",
        });
    }
    if !has_rust_src() {
        return Err(BuildError::Missing {
            what: "rust-src for nightly",
            fix: "`rustup component add rust-src --toolchain nightly`",
        });
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        return Err(BuildError::Missing {
            what: "bpf-linker",
            fix: "`apt-get install llvm-22-dev libzstd-dev zlib1g-dev` then \
                  `LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22`",
        });
    }
    Ok(())
}

/// Whether the nightly toolchain has the rust-src component.
pub fn has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false)
}

/// Builds the BPF object with BTF and returns its path.
///
/// Uses its own target directory so it can run from inside another cargo
/// invocation (the agent's build script) without waiting on its lock.
pub fn build(workspace: &Path, profile: Profile) -> Result<PathBuf, BuildError> {
    check_toolchain()?;
    let target_dir = workspace.join("target").join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace)
        .args(["run", "nightly", "cargo", "build", "--package", PACKAGE])
        .args(["--bin", PACKAGE, "--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    // An outer cargo (build script, clippy) leaks settings meant for the host
    // build; the BPF build must not inherit them.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    // BTF: debug info for the linker to turn into a .BTF section.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    let status = cmd
        .status()
        .map_err(|e| BuildError::Cargo(format!("could not run rustup: {e}")))?;
    if !status.success() {
        return Err(BuildError::Cargo(format!(
            "`cargo +nightly build --package {PACKAGE} --target {TARGET}` exited with {status}"
        )));
    }
    Ok(target_dir.join(TARGET).join(profile.dir()).join(PACKAGE))
}

/// True when `elf` (the bytes of an ELF file) has a section named `.BTF`.
pub fn has_btf_section(elf: &[u8]) -> bool {
    section_names(elf).is_some_and(|names| names.iter().any(|n| n == ".BTF"))
}

/// Names of an ELF64 little-endian file's sections, or None if it is not one.
pub fn section_names(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = usize::try_from(u64_at(sh(shstrndx) + 0x18)?).ok()?;
    (0..shnum)
        .map(|i| {
            let name_off = u32::from_le_bytes(elf.get(sh(i)..sh(i) + 4)?.try_into().ok()?) as usize;
            let bytes = elf.get(strtab + name_off..)?;
            let len = bytes.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&bytes[..len]).into_owned())
        })
        .collect()
}
