//! `cargo xtask cluster` and `cargo xtask conformance`: a real multi-node
//! Kubernetes on this machine with weft as its pod network (see
//! [`weft_tests::k8s`]), and Kubernetes' own network conformance tests
//! against it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use weft_tests::{
    Lab,
    k8s::{KubeCluster, KubeSpec, NETWORK_CONFORMANCE, SKIP},
};

use crate::{image, workspace};

fn state_file() -> PathBuf {
    PathBuf::from("/run/weft-cluster.json")
}

fn say(msg: &str) {
    eprintln!("==> cluster: {msg}");
}

/// Builds what a cluster needs that `setup` does not: the weft image from
/// `weft` and the test images. Returns (weft image, images dir).
pub fn images(weft: &Path) -> Result<(PathBuf, PathBuf)> {
    let weft_image = workspace().join("target/weft-image-cluster.tar");
    image::build(weft, &weft_image)?;
    Ok((weft_image, image::kube_images()?))
}

fn spec(nodes: usize, weft_image: PathBuf, images: PathBuf) -> KubeSpec {
    KubeSpec {
        nodes,
        weft_image,
        images,
        manifests: workspace().join("deploy"),
        install_weft: true,
    }
}

/// Refuses to start over a live cluster, cleans up after a dead one, and
/// records this one for `--down`.
fn claim(lab: &Lab, nodes: usize) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(state_file()) {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let pid = v["pid"].as_i64().unwrap_or(0) as i32;
        // SAFETY: kill with signal 0 only checks the process exists.
        if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
            bail!(
                "a cluster is already running (pid {pid}); stop it with `cargo xtask cluster --down`"
            );
        }
        down()?;
    }
    std::fs::write(
        state_file(),
        serde_json::json!({
            "pid": std::process::id(),
            "prefix": lab.prefix,
            "dir": lab.dir,
            "nodes": nodes,
        })
        .to_string(),
    )
    .context("writing /run/weft-cluster.json")
}

/// `cargo xtask cluster`: up until Ctrl-C.
pub fn up(weft: &Path, nodes: usize) -> Result<()> {
    if nodes == 0 {
        bail!("--nodes 0: a cluster needs at least one node");
    }
    let (weft_image, images) = images(weft)?;
    crate::install_stop_handler();
    let lab = Lab::new("k8s");
    claim(&lab, nodes)?;
    let started = Instant::now();
    let cluster = KubeCluster::up(lab, spec(nodes, weft_image, images), say);
    say(&format!("up in {:.0} s", started.elapsed().as_secs_f64()));
    println!("\n{}", cluster.kubectl_ok(&["get", "nodes", "-o", "wide"]));
    println!(
        "{}",
        cluster.kubectl_ok(&["get", "pods", "-A", "-o", "wide"])
    );
    let kubectl = weft_tests::k8s::bin("kubectl");
    println!(
        "The cluster is up. kubectl runs inside the lab (this machine's routes send 198.18.0.0/15 elsewhere):\n  \
         ip netns exec {und} {kubectl} --kubeconfig {kc} get pods -A\n  \
         ip netns exec {und} {kubectl} --kubeconfig {kc} -n kube-system exec ds/weft -c weft -- weft status\n\
         A node's shell (its network, mount and UTS namespaces):\n  \
         nsenter --mount={mnt} --uts={uts} --net={net} bash\n\n\
         Ctrl-C here, or `cargo xtask cluster --down` elsewhere, tears it all down.",
        und = cluster.underlay.name,
        kubectl = kubectl.display(),
        kc = cluster.kubeconfig.display(),
        mnt = cluster.nodes[0].mnt.display(),
        uts = cluster.nodes[0].uts.display(),
        net = cluster.nodes[0].ns.path().display(),
    );
    while !crate::stopped() {
        std::thread::sleep(Duration::from_millis(200));
    }
    say("tearing down");
    drop(cluster);
    let _ = std::fs::remove_file(state_file());
    say("done: every namespace, process, cgroup and mount the cluster made is gone");
    Ok(())
}

/// `cargo xtask cluster --down`: stops a running cluster, or cleans up
/// after one that was killed.
pub fn down() -> Result<()> {
    let Ok(text) = std::fs::read_to_string(state_file()) else {
        say("no cluster is running");
        return Ok(());
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).context("reading /run/weft-cluster.json")?;
    let pid = v["pid"].as_i64().unwrap_or(0) as i32;
    // SAFETY: kill(2) with our own stored pid.
    if pid > 0 && unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        say(&format!("asked the cluster (pid {pid}) to tear down"));
        for _ in 0..600 {
            // SAFETY: as above; signal 0 checks existence.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let prefix = v["prefix"].as_str().unwrap_or_default().to_string();
    let dir = PathBuf::from(v["dir"].as_str().unwrap_or_default());
    let nodes = v["nodes"].as_u64().unwrap_or(0) as usize;
    weft_tests::k8s::clean_leftovers(&prefix, &dir, nodes);
    let _ = std::fs::remove_file(state_file());
    say("cleaned up what the last cluster left");
    Ok(())
}

/// `cargo xtask conformance`: a cluster, e2e.test's `[sig-network]`
/// conformance specs against it (or `focus`), Ginkgo's summary. Ctrl-C or
/// `cargo xtask cluster --down` stops it and tears the cluster down.
pub fn conformance(weft: &Path, nodes: usize, focus: Option<String>) -> Result<()> {
    let (weft_image, images) = images(weft)?;
    crate::install_stop_handler();
    let lab = Lab::new("k8s");
    claim(&lab, nodes)?;
    let cluster = KubeCluster::up(lab, spec(nodes, weft_image, images), say);
    let log = workspace().join("target/conformance.log");
    let focus = focus.unwrap_or_else(|| NETWORK_CONFORMANCE.into());
    say(&format!(
        "e2e.test --ginkgo.focus='{focus}' --ginkgo.skip='{SKIP}' (output in {})",
        log.display()
    ));
    let started = Instant::now();
    let (summary, ok) = cluster.e2e(&focus, SKIP, &log, &crate::stopped);
    say(&format!(
        "e2e.test took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    println!("\n{summary}");
    drop(cluster);
    let _ = std::fs::remove_file(state_file());
    if !ok {
        bail!("e2e.test failed: see {}", log.display());
    }
    Ok(())
}
