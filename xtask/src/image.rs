//! Container images, as archives, with no registry involved.
//!
//! - `cargo xtask image`: the agent's image (Debian base with iptables and
//!   iproute2, `weft` and `weft-cni` in /usr/local/bin) as an OCI archive a
//!   user can load or push:
//!   `skopeo copy oci-archive:target/weft-image.tar docker://REGISTRY/weft:TAG`.
//! - [`kube_images`]: the images a real Kubernetes cluster and its e2e tests
//!   need and no registry here serves — the sandbox `pause` and the test image
//!   `agnhost`, from binaries built from Debian's kubernetes source
//!   (`tests/kube/build.sh`) — as docker archives `ctr images import` takes,
//!   under the names e2e.test asks for.
//!
//! Bases are made by mmdebstrap from the machine's apt mirror (this machine's
//! release, so the binaries' glibc matches) and cached under
//! `$WEFT_CACHE_DIR/image`. podman, with a private storage (the machine's own
//! image store is not touched), turns a root filesystem into an image and
//! saves it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use weft_tests::k8s::{CLUSTER_DNS_IMAGE, PAUSE_IMAGE};

use crate::{run, stage, workspace};

/// What the agent's base adds to Debian's essential packages.
const WEFT_PACKAGES: &str = "iptables,iproute2";

/// What the e2e image's base adds: upstream's agnhost Dockerfile installs
/// curl, nc (OpenBSD's: the tests run `nc -u`), iproute2 (`ss`), iperf and
/// bash; Debian's `sh` is dash, as the tests need (busybox's ash runs its own
/// `nc`).
/// `dig` (bind9-dnsutils) for the DNS specs, which upstream's image also has.
const AGNHOST_PACKAGES: &str =
    "curl,netcat-openbsd,iproute2,iperf,iperf3,bash,iputils-ping,bind9-dnsutils";

/// The image's name inside the archive (deploy/weft.yaml's `image:`).
pub fn tag() -> String {
    format!("localhost/weft:{}", env!("CARGO_PKG_VERSION"))
}

fn cache_root() -> PathBuf {
    std::env::var_os("WEFT_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/weft"), PathBuf::from)
}

fn cache_dir() -> PathBuf {
    cache_root().join("image")
}

fn need_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "building {what} needs root (mmdebstrap --mode=root, podman import): run it with sudo"
        );
    }
    Ok(())
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

/// The cached base root filesystem (a tar) with `packages`, made when missing.
fn base(codename: &str, packages: &str) -> Result<PathBuf> {
    let dir = cache_dir();
    let tar = dir.join(format!(
        "base-{codename}-{}.tar",
        packages.replace(',', "+")
    ));
    if tar.is_file() {
        return Ok(tar);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    stage(&format!(
        "image: Debian {codename} base with {packages} (mmdebstrap, cached in {})",
        dir.display()
    ));
    let partial = tar.with_extension("partial");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--variant=essential",
        &format!("--include={packages}"),
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

/// An image to make from a root filesystem.
struct Spec<'a> {
    /// The name and tag it gets.
    tag: &'a str,
    /// A root filesystem tar to start from, if any.
    base: Option<&'a Path>,
    /// A directory whose contents go on top (owned by root).
    stage: &'a Path,
    /// Dockerfile-style `--change`s for `podman import`.
    changes: &'a [&'a str],
    /// `oci-archive` or `docker-archive`.
    format: &'a str,
}

/// Every path under `dir`, as `./relative`, parents before children.
fn entries(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let path = format!("{rel}/{}", e.file_name().to_string_lossy());
        out.push(path.clone());
        if e.file_type()?.is_dir() {
            entries(&e.path(), &path, out)?;
        }
    }
    Ok(())
}

/// Makes the image `spec` says and saves it to `out`.
fn make(spec: &Spec, work: &Path, out: &Path) -> Result<()> {
    let rootfs = work.join("rootfs.tar");
    let mut files = Vec::new();
    entries(spec.stage, ".", &mut files)?;
    let mut tar = Command::new("tar");
    match spec.base {
        Some(base) => {
            std::fs::copy(base, &rootfs).with_context(|| format!("copying {}", base.display()))?;
            // Only what the base lacks: an image layer must not hold a path twice.
            let listed = Command::new("tar").arg("-tf").arg(base).output()?;
            let have: std::collections::HashSet<String> = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .map(|l| l.trim_end_matches('/').to_string())
                .collect();
            files.retain(|f| !have.contains(f));
            tar.arg("--append");
        }
        None => {
            tar.arg("--create");
        }
    }
    tar.arg("-f")
        .arg(&rootfs)
        .arg("-C")
        .arg(spec.stage)
        .args(["--owner=0", "--group=0", "--no-recursion"])
        .args(&files);
    run(tar, "tar")?;
    let store = work.join("podman");
    let mut import = podman(&store);
    import.args(["import", "--quiet"]);
    for change in spec.changes {
        import.args(["--change", change]);
    }
    import
        .arg(&rootfs)
        .arg(spec.tag)
        .stdout(std::process::Stdio::null());
    run(import, "podman import")?;
    // podman will not write over an archive.
    let _ = std::fs::remove_file(out);
    let mut save = podman(&store);
    save.args(["save", "--quiet", "--format", spec.format, "-o"])
        .arg(out)
        .arg(spec.tag);
    run(save, "podman save")?;
    // vfs layers are plain directories: drop them, the archive is the product.
    let _ = std::fs::remove_dir_all(work);
    Ok(())
}

/// Builds the image from `weft` (with `weft-cni` beside it) and writes it
/// as an OCI archive to `out`. Debug symbols are stripped from the copies.
pub fn build(weft: &Path, out: &Path) -> Result<()> {
    need_root("the image")?;
    let codename = codename()?;
    let base = base(&codename, WEFT_PACKAGES)?;
    let work = workspace().join("target/image");
    let _ = std::fs::remove_dir_all(&work);
    let stage_dir = work.join("stage");
    let bin = stage_dir.join("usr/local/bin");
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
    let label = format!(
        "LABEL org.opencontainers.image.title=weft org.opencontainers.image.version={} org.opencontainers.image.base.name=debian:{codename}",
        env!("CARGO_PKG_VERSION")
    );
    make(
        &Spec {
            tag: &tag(),
            base: Some(&base),
            stage: &stage_dir,
            changes: &[
                // `podman import` sets no PATH; the agent runs iptables-restore.
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENTRYPOINT [\"/usr/local/bin/weft\"]",
                "CMD [\"agent\"]",
                &label,
            ],
            format: "oci-archive",
        },
        &work,
        out,
    )
}

/// The Kubernetes version the cluster's components come from.
pub const KUBE_VERSION: &str = "1.20.2";
/// The test image e2e.test 1.20.2 names (`promoterE2eRegistry` +
/// agnhost:2.21); built from the tree's agnhost (2.25), which passes the
/// tests that ask for 2.21.
pub const AGNHOST_IMAGE: &str = "localhost/e2e-test-images/agnhost:2.21";

/// The shell image e2e.test 1.20.2 names (`dockerLibraryRegistry` +
/// busybox:1.29): Debian's static busybox.
pub const BUSYBOX_IMAGE: &str = "localhost/library/busybox:1.29";

/// The DNS querier image of e2e.test 1.20.2's DNS specs (`e2eRegistry` +
/// jessie-dnsutils:1.0): the agnhost base, which has `dig`.
pub const JESSIE_IMAGE: &str = "localhost/e2e/jessie-dnsutils:1.0";

/// The directory of the cached Kubernetes components (tests/kube/build.sh).
pub fn kube_bin_dir() -> PathBuf {
    cache_root().join("kube")
}

/// Builds (once, then cached) the images a lab cluster and e2e.test need,
/// as docker archives in `$WEFT_CACHE_DIR/kube/images` (every archive there
/// is imported into every node): pause, agnhost, busybox, jessie-dnsutils
/// and the lab's cluster DNS. Returns that directory.
pub fn kube_images() -> Result<PathBuf> {
    let bins = kube_bin_dir();
    let dir = bins.join("images");
    std::fs::create_dir_all(&dir)?;
    // Archives made by another recipe (other packages, versions) go.
    let recipe =
        format!("kubernetes {KUBE_VERSION}; agnhost and jessie-dnsutils on {AGNHOST_PACKAGES}\n");
    let recipe_file = dir.join("recipe");
    if std::fs::read_to_string(&recipe_file).ok().as_deref() != Some(recipe.as_str()) {
        for e in std::fs::read_dir(&dir)?.flatten() {
            std::fs::remove_file(e.path())?;
        }
    }
    let file = |image: &str| {
        dir.join(format!(
            "{}.tar",
            image.rsplit('/').next().unwrap_or(image).replace(':', "-")
        ))
    };
    let pause = file(PAUSE_IMAGE);
    let agnhost = file(AGNHOST_IMAGE);
    let busybox = file(BUSYBOX_IMAGE);
    let jessie = file(JESSIE_IMAGE);
    // The DNS binary's name carries its source's hash; so does its archive.
    let dns_bin = std::fs::read_dir(&bins)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cluster-dns-") && !n.ends_with(".new"))
        })
        .context(
            "cluster-dns is not built: tests/kube/build.sh builds it (`cargo xtask setup` runs it)",
        )?;
    let dns = dir.join(format!(
        "{}.tar",
        dns_bin.file_name().unwrap_or_default().to_string_lossy()
    ));
    if [&pause, &agnhost, &busybox, &jessie, &dns]
        .iter()
        .all(|f| f.is_file())
    {
        return Ok(dir);
    }
    need_root("the Kubernetes test images")?;
    let bin = |name: &str| {
        let p = bins.join(format!("{name}-{KUBE_VERSION}"));
        if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow::anyhow!(
                "{} is missing: tests/kube/build.sh builds it (`cargo xtask setup` runs it)",
                p.display()
            ))
        }
    };
    let work = workspace().join("target/kube-image");
    if !dns.is_file() {
        stage(&format!("image: {CLUSTER_DNS_IMAGE} (tests/kube/dns)"));
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("cluster-dns-") {
                std::fs::remove_file(e.path())?;
            }
        }
        let _ = std::fs::remove_dir_all(&work);
        let stage_dir = work.join("stage");
        std::fs::create_dir_all(&stage_dir)?;
        std::fs::copy(&dns_bin, stage_dir.join("cluster-dns"))?;
        make(
            &Spec {
                tag: CLUSTER_DNS_IMAGE,
                base: None,
                stage: &stage_dir,
                changes: &["ENTRYPOINT [\"/cluster-dns\"]"],
                format: "docker-archive",
            },
            &work,
            &dns,
        )?;
    }
    if !jessie.is_file() {
        let base = base(&codename()?, AGNHOST_PACKAGES)?;
        stage(&format!("image: {JESSIE_IMAGE} (Debian with dig)"));
        let _ = std::fs::remove_dir_all(&work);
        let stage_dir = work.join("stage");
        std::fs::create_dir_all(&stage_dir)?;
        make(
            &Spec {
                tag: JESSIE_IMAGE,
                base: Some(&base),
                stage: &stage_dir,
                changes: &["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                format: "docker-archive",
            },
            &work,
            &jessie,
        )?;
    }
    if !pause.is_file() {
        stage(&format!(
            "image: {PAUSE_IMAGE} (static pause from the kubernetes {KUBE_VERSION} tree)"
        ));
        let _ = std::fs::remove_dir_all(&work);
        let stage_dir = work.join("stage");
        std::fs::create_dir_all(&stage_dir)?;
        std::fs::copy(bin("pause")?, stage_dir.join("pause"))?;
        make(
            &Spec {
                tag: PAUSE_IMAGE,
                base: None,
                stage: &stage_dir,
                changes: &["ENTRYPOINT [\"/pause\"]"],
                format: "docker-archive",
            },
            &work,
            &pause,
        )?;
    }
    if !busybox.is_file() {
        stage(&format!("image: {BUSYBOX_IMAGE} (Debian's static busybox)"));
        let _ = std::fs::remove_dir_all(&work);
        let stage_dir = work.join("stage");
        std::fs::create_dir_all(stage_dir.join("bin"))?;
        std::fs::copy("/bin/busybox", stage_dir.join("bin/busybox"))
            .context("/bin/busybox (Debian's busybox-static; `cargo xtask setup` installs it)")?;
        let list = Command::new("/bin/busybox").arg("--list").output()?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", stage_dir.join("bin").join(applet))?;
            }
        }
        make(
            &Spec {
                tag: BUSYBOX_IMAGE,
                base: None,
                stage: &stage_dir,
                changes: &["ENV PATH=/bin", "CMD [\"sh\"]"],
                format: "docker-archive",
            },
            &work,
            &busybox,
        )?;
    }
    if !agnhost.is_file() {
        let base = base(&codename()?, AGNHOST_PACKAGES)?;
        stage(&format!(
            "image: {AGNHOST_IMAGE} (agnhost from the kubernetes {KUBE_VERSION} tree)"
        ));
        let _ = std::fs::remove_dir_all(&work);
        let stage_dir = work.join("stage");
        std::fs::create_dir_all(stage_dir.join("uploads"))?;
        std::fs::copy(bin("agnhost")?, stage_dir.join("agnhost"))?;
        std::os::unix::fs::symlink("agnhost", stage_dir.join("agnhost-2"))?;
        // The porter's TLS pair, as upstream's Dockerfile adds it.
        let porter = bins.join(format!(
            "e2e-repo-{KUBE_VERSION}/test/images/agnhost/porter"
        ));
        for f in ["localhost.crt", "localhost.key"] {
            std::fs::copy(porter.join(f), stage_dir.join(f)).with_context(|| {
                format!(
                    "{} (tests/kube/build.sh keeps it)",
                    porter.join(f).display()
                )
            })?;
        }
        make(
            &Spec {
                tag: AGNHOST_IMAGE,
                base: Some(&base),
                stage: &stage_dir,
                changes: &[
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "ENTRYPOINT [\"/agnhost\"]",
                    "CMD [\"pause\"]",
                ],
                format: "docker-archive",
            },
            &work,
            &agnhost,
        )?;
    }
    std::fs::write(&recipe_file, recipe)?;
    Ok(dir)
}
