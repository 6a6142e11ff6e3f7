//! Kubernetes' own end-to-end suite (e2e.test, built from the same tree)
//! against a [`KubeCluster`]: which specs, and Ginkgo's summary.

use std::{path::Path, time::Duration};

use super::{KubeCluster, addons::CLUSTER_DOMAIN, bin};

/// The registries e2e.test 1.20.2 takes its images from
/// (`KUBE_TEST_REPO_LIST`): all local, under the names the images were
/// built with.
pub const E2E_REPO_LIST: &str = "gcAuthenticatedRegistry: localhost/authenticated
dockerLibraryRegistry: localhost/library
dockerGluster: localhost/gluster
e2eRegistry: localhost/e2e
e2eVolumeRegistry: localhost/e2e-volume
promoterE2eRegistry: localhost/e2e-test-images
buildImageRegistry: localhost/build-image
invalidRegistry: invalid.invalid
gcRegistry: localhost
sigStorageRegistry: localhost/sig-storage
gcrReleaseRegistry: localhost/gcr-release
privateRegistry: localhost/private
sampleRegistry: localhost/sample
";

/// Kubernetes 1.20.2's `[sig-network]` conformance specs
/// (test/conformance/testdata/conformance.yaml lists 32, eight of them DNS
/// specs, which the lab's cluster DNS serves).
pub const NETWORK_CONFORMANCE: &str = r"\[sig-network\].*\[Conformance\]";
/// What no run here selects: SCTP (the Granular Checks' SCTP variants are
/// `[Feature:SCTPConnectivity]`, needing the sctp module), and disruptive
/// or serial specs.
pub const SKIP: &str = r"sctp|SCTP|\[Disruptive\]|\[Serial\]|\[Feature:";
/// The core subset `cargo xtask test` runs every time: the four "Networking
/// Granular Checks: Pods" and the three basic Services specs.
pub const CORE: &str = r"Granular Checks: Pods|Services should (provide secure master service|serve a basic endpoint from pods|serve multiport endpoints from pods)";

impl KubeCluster {
    /// Runs e2e.test (Kubernetes' own end-to-end suite, built from the same
    /// tree) inside the underlay's namespace with `focus` and `skip`
    /// (regular expressions over spec names); its whole output goes to
    /// `log`. Returns Ginkgo's summary lines and whether every spec passed;
    /// `stop` returning true ends it early (a failure).
    pub fn e2e(
        &self,
        focus: &str,
        skip: &str,
        log: &Path,
        stop: &dyn Fn() -> bool,
    ) -> (String, bool) {
        let repo_list = self.lab.dir.join("e2e-repo-list.yaml");
        std::fs::write(&repo_list, E2E_REPO_LIST).unwrap();
        let out = std::fs::File::create(log).expect("e2e log");
        let mut child = self
            .underlay
            .command(bin("e2e.test"))
            .env("KUBE_TEST_REPO_LIST", &repo_list)
            .args([
                format!("--kubeconfig={}", self.kubeconfig.display()),
                "--provider=skeleton".into(),
                format!("--kubectl-path={}", bin("kubectl").display()),
                format!("--repo-root={}", bin("e2e-repo").display()),
                format!("--ginkgo.focus={focus}"),
                format!("--ginkgo.skip={skip}"),
                "--ginkgo.noColor".into(),
                "--ginkgo.progress".into(),
                // The pods e2e.test waits for at start: weft's, on every node.
                "--minStartupPods=1".into(),
                format!("--dns-domain={CLUSTER_DOMAIN}"),
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run e2e.test");
        let ok = loop {
            if let Some(status) = child.try_wait().expect("wait for e2e.test") {
                break status.success();
            }
            if stop() {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        (ginkgo_summary(&text), ok)
    }
}

/// Ginkgo's closing lines ("Ran N of M Specs…", "SUCCESS!/FAIL! -- …") and
/// the names of failed specs, from e2e.test's output.
pub fn ginkgo_summary(text: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    let mut in_failures = false;
    for l in text.lines() {
        if l.starts_with("Summarizing") {
            in_failures = true;
        }
        if in_failures && l.trim_start().starts_with("[Fail]") {
            lines.push(l);
        }
        if l.starts_with("Ran ") && l.contains(" Specs in ")
            || l.starts_with("SUCCESS! --")
            || l.starts_with("FAIL! --")
        {
            lines.push(l);
        }
    }
    lines.join("\n")
}
