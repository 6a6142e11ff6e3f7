//! `cargo xtask image`: the agent's container image, as an OCI archive, with
//! no registry involved.
//!
//! The base is Debian (this machine's release, so the binaries' glibc
//! matches) with iptables and iproute2, made by mmdebstrap from the apt
//! mirror and cached under `$WEFT_CACHE_DIR/image`. `weft` and `weft-cni` go
//! in /usr/local/bin. podman (with a private storage under target/, the
//! machine's own image store is not touched) turns the root filesystem into an
//! image and saves it as an OCI archive a user can load or push:
//! `skopeo copy oci-archive:target/weft-image.tar docker://REGISTRY/weft:TAG`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{run, stage, workspace};

/// What the base adds to Debian's essential packages.
const BASE_PACKAGES: &str = "iptables,iproute2";

/// The image's name inside the archive (deploy/weft.yaml's `image:`).
pub fn tag() -> String {
    format!("localhost/weft:{}", env!("CARGO_PKG_VERSION"))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("WEFT_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/weft"), PathBuf::from)
        .join("image")
}

/// This machine's Debian release (`VERSION_CODENAME` of /etc/os-release).
fn codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME: the image is built on Debian")
}

/// The cached base root filesystem (a tar), made when missing.
fn base(codename: &str) -> Result<PathBuf> {
    let dir = cache_dir();
    let tar = dir.join(format!(
        "base-{codename}-{}.tar",
        BASE_PACKAGES.replace(',', "+")
    ));
    if tar.is_file() {
        return Ok(tar);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    stage(&format!(
        "image: Debian {codename} base with {BASE_PACKAGES} (mmdebstrap, cached in {})",
        dir.display()
    ));
    let partial = tar.with_extension("partial");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--variant=essential",
        &format!("--include={BASE_PACKAGES}"),
        "--mode=root",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--format=tar",
        codename,
    ])
    .arg(&partial);
    run(cmd, "mmdebstrap (is the apt mirror reachable?)")?;
    std::fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// podman with a private storage, runtime directory and network
/// configuration under `dir` (the machine's own are left alone).
fn podman(dir: &Path) -> Command {
    let conf = dir.join("containers.conf");
    if !conf.exists() {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(
            &conf,
            format!(
                "[engine]\ntmp_dir = \"{}\"\nevents_logger = \"file\"\n[network]\nnetwork_config_dir = \"{}\"\n",
                dir.join("tmp").display(),
                dir.join("net.d").display()
            ),
        );
    }
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .args(["--storage-driver", "vfs"]);
    cmd
}

/// Builds the image from `weft` (with `weft-cni` beside it) and writes it
/// as an OCI archive to `out`. Debug symbols are stripped from the copies.
pub fn build(weft: &Path, out: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "building the image needs root (mmdebstrap --mode=root, podman import): run `sudo cargo xtask image`"
        );
    }
    let codename = codename()?;
    let base = base(&codename)?;
    let work = workspace().join("target/image");
    let _ = std::fs::remove_dir_all(&work);
    let bin = work.join("stage/usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    stage(&format!("image: {} from {}", tag(), weft.display()));
    let cni = weft.with_file_name("weft-cni");
    for (from, name) in [(weft, "weft"), (cni.as_path(), "weft-cni")] {
        if !from.is_file() {
            bail!("{} is missing: build weft-agent first", from.display());
        }
        let mut strip = Command::new("strip");
        strip
            .args(["--strip-debug", "-o"])
            .arg(bin.join(name))
            .arg(from);
        run(strip, "strip (binutils)")?;
    }
    let rootfs = work.join("rootfs.tar");
    std::fs::copy(&base, &rootfs).with_context(|| format!("copying {}", base.display()))?;
    let mut append = Command::new("tar");
    append
        .arg("--append")
        .arg("-f")
        .arg(&rootfs)
        .arg("-C")
        .arg(work.join("stage"))
        .args([
            "--owner=0",
            "--group=0",
            "./usr/local/bin/weft",
            "./usr/local/bin/weft-cni",
        ]);
    run(append, "tar --append")?;
    let store = work.join("podman");
    let mut import = podman(&store);
    import
        .args([
            "import",
            "--quiet",
            // `podman import` sets no PATH; the agent runs iptables-restore.
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENTRYPOINT [\"/usr/local/bin/weft\"]",
            "--change",
            "CMD [\"agent\"]",
            "--change",
            &format!("LABEL org.opencontainers.image.title=weft org.opencontainers.image.version={} org.opencontainers.image.base.name=debian:{codename}", env!("CARGO_PKG_VERSION")),
        ])
        .arg(&rootfs)
        .arg(tag())
        .stdout(std::process::Stdio::null());
    run(import, "podman import")?;
    let _ = std::fs::remove_file(out);
    let mut save = podman(&store);
    save.args(["save", "--quiet", "--format", "oci-archive", "-o"])
        .arg(out)
        .arg(tag());
    run(save, "podman save")?;
    // vfs layers are plain directories: drop them, the archive is the product.
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
