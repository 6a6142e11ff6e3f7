//! `cargo xtask cluster` and `cargo xtask conformance`: a real multi-node
//! Kubernetes on this machine with weft as its pod network (see
//! [`weft_tests::k8s`]), and Kubernetes' own network conformance tests
//! against it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use weft_tests::{
    Lab,
    k8s::{KubeCluster, KubeSpec, NETWORK_CONFORMANCE, SKIP},
};

use crate::{image, running::Running, workspace};

const RUNNING: Running = Running { name: "cluster" };

/// What a killed cluster left: the namespaces and their processes, the
/// nodes' cgroups, mount namespaces and shims, the lab directory.
fn clean(record: &serde_json::Value) {
    weft_tests::k8s::clean_leftovers(
        record["prefix"].as_str().unwrap_or_default(),
        Path::new(record["dir"].as_str().unwrap_or_default()),
        record["nodes"].as_u64().unwrap_or(0) as usize,
    );
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
        dual_stack: false,
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
    RUNNING.claim(
        serde_json::json!({"prefix": lab.prefix, "dir": lab.dir, "nodes": nodes}),
        clean,
    )
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
    RUNNING.release();
    say("done: every namespace, process, cgroup and mount the cluster made is gone");
    Ok(())
}

/// `cargo xtask cluster --down`: stops a running cluster, or cleans up
/// after one that was killed.
pub fn down() -> Result<()> {
    RUNNING.down(Duration::from_secs(60), clean, say)
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
    RUNNING.release();
    if !ok {
        bail!("e2e.test failed: see {}", log.display());
    }
    Ok(())
}
