//! A real Kubernetes cluster in a lab, every part a real binary.
//!
//! - Control plane, in the underlay's namespace: etcd, kube-apiserver
//!   ([`KubeApi`], on 198.18.0.254), kube-controller-manager (it allocates the
//!   nodes' pod CIDRs: `--allocate-node-cidrs`) and kube-scheduler. No
//!   kubelet or weft runs there: it reaches pods (the API server's proxy to
//!   pods and Services, which e2e.test uses) through a route to each node's
//!   pod CIDR via the node, as a control plane outside the overlay does.
//! - N nodes: each a network namespace plugged into the underlay bridge
//!   (`und0`, default route towards the underlay's namespace, which routes
//!   nowhere), with its own mount and UTS namespaces and cgroup subtree,
//!   running containerd (Debian's, CRI), a kubelet and kube-proxy. The
//!   node's mount namespace has its own /run, /var/lib, /var/log, /opt,
//!   /etc/cni (tmpfs), /sys (a sysfs of its network namespace) and bpffs, so
//!   what a kubelet, a runtime or a hostPath volume writes lands on the node,
//!   never on this machine; kubelet's machine-wide sysctls are files bound
//!   over /proc/sys there, so it finds them already set.
//! - weft, installed as a user installs it: its image imported into each
//!   node's containerd, then `kubectl apply -f deploy/rbac.yaml -f
//!   deploy/weft.yaml` with the cluster CIDR set.
//!
//! Every client (kubectl, e2e.test) runs inside the lab's namespaces: this
//! machine's own routes would send 198.18.0.0/15 off the machine. The Kubernetes
//! components come from `tests/kube/build.sh`, the images from `cargo xtask`
//! (`image::kube_images`). Facts behind the recipe:
//! ../shared/notes/kubernetes.md.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

mod addons;
mod e2e;
mod node;

use serde_json::Value;

pub use addons::{CLUSTER_DNS_IMAGE, CLUSTER_DNS_IP, CLUSTER_DOMAIN};
pub use e2e::{CORE, E2E_REPO_LIST, NETWORK_CONFORMANCE, SKIP, ginkgo_summary};
pub use node::{KubeNode, clean_leftovers, release_node};

use crate::{
    CLUSTER_CIDR, CLUSTER_CIDR6, Lab, Netns,
    kube::{self, ApiOptions, KubeApi, SERVICE_CIDR, SERVICE_CIDR6},
};

/// The sandbox image (containerd's `sandbox_image`), as e2e.test names it
/// (`gcRegistry` + pause:3.2).
pub const PAUSE_IMAGE: &str = "localhost/pause:3.2";

/// A cached component of tests/kube/build.sh, or a panic saying how to get it.
pub fn bin(name: &str) -> PathBuf {
    kube::cached(name).unwrap_or_else(|| {
        panic!(
            "{name} {} is not built: `cargo xtask setup` builds it (tests/kube/build.sh, cached in {})",
            kube::VERSION,
            kube::cache_dir().display()
        )
    })
}

/// Whether every component the cluster needs is built.
pub fn built() -> bool {
    [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "kubectl",
    ]
    .iter()
    .all(|b| kube::cached(b).is_some())
}

/// What to build.
#[derive(Clone, Debug)]
pub struct KubeSpec {
    pub nodes: usize,
    /// `cargo xtask image`'s OCI archive of weft.
    pub weft_image: PathBuf,
    /// The directory with [`IMAGE_ARCHIVES`].
    pub images: PathBuf,
    /// Where deploy/rbac.yaml and deploy/weft.yaml are.
    pub manifests: PathBuf,
    /// Install weft (else the nodes stay NotReady: no network).
    pub install_weft: bool,
    /// Dual-stack (Kubernetes 1.20's alpha `IPv6DualStack` gate on every
    /// component): the controller manager allocates each node an IPv4 and
    /// an IPv6 pod CIDR ([`CLUSTER_CIDR6`], /64 each), Services may be
    /// IPv6 ([`SERVICE_CIDR6`]), weft's ConfigMap gets `cluster-cidr6`.
    pub dual_stack: bool,
}

impl KubeSpec {
    /// `nodes` nodes with weft, images from the environment the tests get
    /// from `cargo xtask test` (`WEFT_IMAGE`, `WEFT_KUBE_IMAGES`).
    pub fn from_env(nodes: usize) -> Self {
        let path = |var: &str| {
            std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
                panic!("{var} is not set: `cargo xtask test` builds the images and sets it")
            })
        };
        Self {
            nodes,
            weft_image: path("WEFT_IMAGE"),
            images: path("WEFT_KUBE_IMAGES"),
            manifests: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy")),
            install_weft: true,
            dual_stack: false,
        }
    }
}

/// A running cluster; dropping it tears everything down, in the order that
/// leaves nothing: kubelets, every container (by cgroup), kube-proxy and
/// containerd, what is left in the nodes' mount namespaces (the shims),
/// cgroups, namespaces, the control plane.
pub struct KubeCluster {
    pub spec: KubeSpec,
    pub nodes: Vec<KubeNode>,
    pub underlay: Netns,
    pub api: KubeApi,
    /// The admin's kubeconfig (kubectl, e2e.test).
    pub kubeconfig: PathBuf,
    /// How many Nodes were Ready once registered, before weft was installed
    /// (none should be: no network yet).
    pub ready_before_weft: usize,
    /// Declared last: dropped after [`Drop::drop`] has stopped the nodes.
    pub lab: Lab,
}

/// The static token of a cluster component.
fn token(who: &str) -> String {
    format!("weft-lab-{}", who.replace([':', '/'], "-"))
}

impl KubeCluster {
    /// Builds the cluster, telling `say` each step.
    pub fn up(mut lab: Lab, spec: KubeSpec, mut say: impl FnMut(&str)) -> Self {
        assert!(built(), "{}", missing_message());
        let underlay = crate::Underlay::new(&mut lab);
        let und = underlay.ns.clone();
        let names: Vec<String> = (1..=spec.nodes).map(|i| format!("node-{i}")).collect();
        let mut tokens = vec![
            (
                token("kube-controller-manager"),
                "system:kube-controller-manager".to_string(),
                String::new(),
            ),
            (
                token("kube-scheduler"),
                "system:kube-scheduler".to_string(),
                String::new(),
            ),
            (
                token("kube-proxy"),
                "system:kube-proxy".to_string(),
                String::new(),
            ),
        ];
        for n in &names {
            tokens.push((
                token(&format!("system:node:{n}")),
                format!("system:node:{n}"),
                "system:nodes".into(),
            ));
        }
        say("control plane: etcd and kube-apiserver on 198.18.0.254:6443 (underlay namespace)");
        let api = KubeApi::start_with(
            &mut lab,
            &und,
            "br0",
            ApiOptions {
                tokens,
                cluster: true,
                dual_stack: spec.dual_stack,
                ipv6: false,
            },
        );
        let kubeconfig = api.kubeconfig("admin", kube::ADMIN_TOKEN);
        let dir = api.dir.clone();
        let d = |f: &str| dir.join(f).display().to_string();
        let mut cm = und.command(bin("kube-controller-manager"));
        cm.args([
            format!(
                "--kubeconfig={}",
                api.kubeconfig("kube-controller-manager", &token("kube-controller-manager"))
                    .display()
            ),
            "--allocate-node-cidrs=true".into(),
            format!("--service-account-private-key-file={}", d("sa.key")),
            format!("--root-ca-file={}", d("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            "--v=1".into(),
        ]);
        if spec.dual_stack {
            cm.args([
                "--feature-gates=IPv6DualStack=true".to_string(),
                format!("--cluster-cidr={CLUSTER_CIDR},{CLUSTER_CIDR6}"),
                "--node-cidr-mask-size-ipv4=24".into(),
                "--node-cidr-mask-size-ipv6=64".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}"),
            ]);
        } else {
            cm.args([
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--node-cidr-mask-size=24".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            ]);
        }
        lab.spawn("kube-controller-manager", cm);
        let mut sched = und.command(bin("kube-scheduler"));
        sched.args([
            format!(
                "--kubeconfig={}",
                api.kubeconfig("kube-scheduler", &token("kube-scheduler"))
                    .display()
            ),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
        ]);
        lab.spawn("kube-scheduler", sched);
        say("control plane: kube-controller-manager (--allocate-node-cidrs) and kube-scheduler");

        let mut cluster = Self {
            spec,
            nodes: Vec::new(),
            underlay: und.clone(),
            api,
            kubeconfig,
            ready_before_weft: 0,
            lab,
        };
        for (i, name) in names.iter().enumerate() {
            let node = cluster.make_node(&underlay, i, name);
            cluster.nodes.push(node);
            cluster.start_node(i);
            say(&format!(
                "{name}: netns {} on the underlay at {}; containerd, kubelet and kube-proxy started, images imported",
                cluster.nodes[i].ns.name, cluster.nodes[i].ip
            ));
        }
        cluster.wait_for(
            "every Node registered with a pod CIDR from the controller manager",
            Duration::from_secs(90),
            |c| {
                let nodes = c.kubectl_json(&["get", "nodes"]);
                let items = nodes["items"].as_array().cloned().unwrap_or_default();
                (items.len() == c.nodes.len()
                    && items.iter().all(|n| n["spec"]["podCIDR"].is_string()))
                .then_some(())
            },
        );
        for n in cluster.kubectl_json(&["get", "nodes"])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let ready = node_ready(&n);
            cluster.ready_before_weft += usize::from(ready);
            // The control plane runs no kubelet and no weft here: like a
            // control plane outside the overlay, it reaches a pod (the API
            // server's proxy to pods and Services) through the pod's node.
            if let (Some(cidr), Some(ip)) = (
                n["spec"]["podCIDR"].as_str(),
                n["status"]["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
                    .and_then(|a| a["address"].as_str()),
            ) {
                und.ip(&["route", "replace", cidr, "via", ip]);
            }
            say(&format!(
                "{}: registered, pod CIDR {} (from kube-controller-manager), {}",
                n["metadata"]["name"].as_str().unwrap_or("?"),
                n["spec"]["podCIDR"].as_str().unwrap_or("?"),
                if ready {
                    "Ready"
                } else {
                    "NotReady (no network yet)"
                }
            ));
        }
        if cluster.spec.install_weft {
            cluster.install_weft(&mut say);
            cluster.install_dns(&mut say);
        }
        cluster
    }

    /// `kubectl apply` of deploy/rbac.yaml and deploy/weft.yaml, with the
    /// ConfigMap's cluster CIDR set to the lab's (the one setting a user
    /// edits: the underlay is the default route's interface, the image is
    /// the archive's name); then waits for weft on every node and every
    /// node Ready.
    pub fn install_weft(&mut self, say: &mut impl FnMut(&str)) {
        let rbac = self.spec.manifests.join("rbac.yaml");
        let weft = std::fs::read_to_string(self.spec.manifests.join("weft.yaml"))
            .expect("deploy/weft.yaml");
        let from = "cluster-cidr = \"10.244.0.0/16\"";
        assert!(
            weft.contains(from),
            "deploy/weft.yaml's agent.toml no longer has {from:?}"
        );
        let edited = self.lab.dir.join("weft.yaml");
        let mut cidrs = format!("cluster-cidr = \"{CLUSTER_CIDR}\"");
        if self.spec.dual_stack {
            cidrs += &format!("\n    cluster-cidr6 = \"{CLUSTER_CIDR6}\"");
        }
        std::fs::write(&edited, weft.replace(from, &cidrs)).unwrap();
        self.kubectl_ok(&[
            "apply",
            "-f",
            rbac.to_str().unwrap(),
            "-f",
            edited.to_str().unwrap(),
        ]);
        say(
            "weft: `kubectl apply -f deploy/rbac.yaml -f deploy/weft.yaml` (cluster-cidr set in the ConfigMap)",
        );
        self.wait_for(
            "weft's DaemonSet Ready on every node",
            Duration::from_secs(120),
            |c| {
                let ds = c.kubectl_json(&["-n", "kube-system", "get", "daemonset", "weft"]);
                let s = &ds["status"];
                (s["desiredNumberScheduled"].as_u64() == Some(c.nodes.len() as u64)
                    && s["numberReady"] == s["desiredNumberScheduled"]
                    && s["updatedNumberScheduled"] == s["desiredNumberScheduled"])
                    .then_some(())
            },
        );
        self.wait_nodes_ready(Duration::from_secs(60));
        say("weft: an agent Ready on every node, every node Ready");
    }

    /// Waits until every Node is Ready.
    pub fn wait_nodes_ready(&self, timeout: Duration) {
        self.wait_for("every Node Ready", timeout, |c| {
            let nodes = c.kubectl_json(&["get", "nodes"]);
            let items = nodes["items"].as_array().cloned().unwrap_or_default();
            (items.len() == c.nodes.len() && items.iter().all(node_ready)).then_some(())
        });
    }

    /// Polls `f` every 500 ms until it returns `Some`; on timeout panics
    /// with what the cluster shows (nodes, pods, the logs' last lines).
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What the cluster looks like, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        ] {
            let out = self.kubectl(args);
            s += &format!(
                "$ kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tail = |name: &str| {
            let log = self.lab.log(name);
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        for i in 0..self.nodes.len() {
            s += &format!(
                "--- {} (last lines)\n{}\n",
                Self::kubelet_name(i),
                tail(&Self::kubelet_name(i))
            );
            s += &format!(
                "--- {}\n{}\n",
                Self::containerd_name(i),
                tail(&Self::containerd_name(i))
            );
        }
        s
    }

    /// kubectl as admin, inside the underlay's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.underlay
            .command(bin("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl, panicking unless it succeeds; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl ARGS -o json`, parsed (null when it fails).
    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `kubectl apply` of a manifest given as text.
    pub fn apply(&self, name: &str, yaml: &str) {
        let path = self.lab.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        self.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    }

    /// The pods in `namespace` matching label `selector` (e.g. `app=x`).
    pub fn pods(&self, namespace: &str, selector: &str) -> Vec<Value> {
        self.kubectl_json(&["-n", namespace, "get", "pods", "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `count` pods match `selector`, every one Running and
    /// Ready (none terminating); returns them.
    pub fn wait_pods_ready(
        &self,
        namespace: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        self.wait_for(
            &format!("{count} pods {selector} in {namespace} Running and Ready"),
            timeout,
            |c| {
                let pods = c.pods(namespace, selector);
                (pods.len() == count
                    && pods
                        .iter()
                        .all(|p| p["metadata"]["deletionTimestamp"].is_null() && pod_ready(p)))
                .then_some(pods)
            },
        )
    }

    /// `kubectl exec` of `cmd` in a pod's first container.
    pub fn exec(&self, namespace: &str, pod: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["-n", namespace, "exec", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    /// The node a Node name belongs to.
    pub fn node(&self, name: &str) -> &KubeNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The network namespace of a running pod, as /proc/PID/ns/net of its
    /// first container's process (found through its node's containerd).
    pub fn pod_netns(&self, namespace: &str, pod: &str) -> PathBuf {
        let p = self.kubectl_json(&["-n", namespace, "get", "pod", pod]);
        let node = p["spec"]["nodeName"]
            .as_str()
            .unwrap_or_else(|| panic!("pod {pod} is not scheduled"));
        let id = p["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("containerd://"))
            .unwrap_or_else(|| panic!("pod {pod} has no running container: {}", p["status"]))
            .to_string();
        let tasks = self.node(node).ctr(&["tasks", "ls"]);
        let pid = tasks
            .lines()
            .find(|l| l.starts_with(&id))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no task {id} on {node}: {tasks}"));
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Whether a Pod object says Ready.
pub fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// A pod's name.
pub fn name_of(p: &Value) -> String {
    p["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A pod's address.
pub fn pod_ip(p: &Value) -> Ipv4Addr {
    p["status"]["podIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("pod {} has no IPv4 address: {}", name_of(p), p["status"]))
}

/// Whether a Node object says Ready.
pub fn node_ready(n: &Value) -> bool {
    n["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Says which components are missing.
fn missing_message() -> String {
    format!(
        "the Kubernetes {} components are not all built in {}: `cargo xtask setup` builds them (tests/kube/build.sh)",
        kube::VERSION,
        kube::cache_dir().display()
    )
}
