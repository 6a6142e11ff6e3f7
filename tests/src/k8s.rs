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
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    CLUSTER_CIDR, Lab, Netns,
    kube::{self, API_IP, ApiOptions, KubeApi, SERVICE_CIDR},
    sh, try_sh,
};

/// The sandbox image (containerd's `sandbox_image`), as e2e.test names it
/// (`gcRegistry` + pause:3.2).
pub const PAUSE_IMAGE: &str = "localhost/pause:3.2";
/// The cluster's DNS domain (kubelet `--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The `kube-dns` Service's ClusterIP (kubelet `--cluster-dns`).
pub const CLUSTER_DNS_IP: &str = "198.18.200.10";
/// The lab's DNS server image (tests/kube/dns; `cargo xtask` builds it).
pub const CLUSTER_DNS_IMAGE: &str = "localhost/weft-lab/cluster-dns:lab";

/// The cluster's DNS, as an add-on is installed: tests/kube/dns (what
/// CoreDNS's kubernetes plugin answers) behind the `kube-dns` Service, so
/// every lookup crosses the pod network.
const CLUSTER_DNS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: cluster-dns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: lab:cluster-dns}
rules:
  - apiGroups: [""]
    resources: ["services", "endpoints"]
    verbs: ["list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: lab:cluster-dns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: lab:cluster-dns}
subjects: [{kind: ServiceAccount, name: cluster-dns, namespace: kube-system}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cluster-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: cluster-dns
      dnsPolicy: Default
      priorityClassName: system-cluster-critical
      containers:
        - name: dns
          image: CLUSTER_DNS_IMAGE
          args: ["--domain=CLUSTER_DOMAIN"]
          ports:
            - {containerPort: 53, protocol: UDP, name: dns}
            - {containerPort: 53, protocol: TCP, name: dns-tcp}
          readinessProbe:
            tcpSocket: {port: 53}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: CLUSTER_DNS_IP
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
"#;

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
        }
    }
}

/// One node of a [`KubeCluster`].
#[derive(Clone, Debug)]
pub struct KubeNode {
    /// The Node object's name (and the node's hostname).
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The node's own files (containerd's root, configs, kubeconfigs).
    pub dir: PathBuf,
    /// Its mount namespace (a bind of the nsfs file).
    pub mnt: PathBuf,
    /// Its UTS namespace.
    pub uts: PathBuf,
    /// Its cgroup subtree's name, under every hierarchy's root (kubelet
    /// `--cgroup-root`).
    pub cgroup: String,
}

impl KubeNode {
    /// `program args…` in the node's network, mount and UTS namespaces.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.mnt.display()))
            .arg(format!("--uts={}", self.uts.display()))
            .arg(format!("--net={}", self.ns.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `program args…` on the node; its output whatever happened.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {program}: {e}"))
    }

    /// Runs `program args…` on the node; panics unless it succeeds.
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "`{program} {}` on {} failed ({}): {}{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr` against the node's containerd, in the CRI's namespace.
    pub fn ctr(&self, args: &[&str]) -> String {
        let mut all = vec![
            "--address",
            "/run/containerd/containerd.sock",
            "-n",
            "k8s.io",
        ];
        all.extend_from_slice(args);
        self.sh("ctr", &all)
    }

    /// The host-side veths weft made for pods on this node.
    pub fn pod_veths(&self) -> Vec<String> {
        let out = self.sh("ip", &["-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.len() == 14 && n.starts_with("weft"))
            .collect()
    }

    /// The addresses weft's IPAM holds on this node (its store's files).
    pub fn ipam_allocations(&self) -> Vec<Ipv4Addr> {
        let out = self.run("ls", &["/var/lib/weft/ipam/weft"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
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

/// kubelet's machine-wide sysctls (pkg/kubelet/cm's setupKernelTunables)
/// with the values it wants: bound over /proc/sys in each node's mount
/// namespace, so that it finds them set and writes nothing.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

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
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            "--node-cidr-mask-size=24".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-account-private-key-file={}", d("sa.key")),
            format!("--root-ca-file={}", d("ca.crt")),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            "--v=1".into(),
        ]);
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

    /// A node's namespaces, directories and cgroups.
    fn make_node(&mut self, underlay: &crate::Underlay, i: usize, name: &str) -> KubeNode {
        let ns = self.lab.netns(&format!("k{}", i + 1));
        let ip = underlay.plug(&ns, (i + 1) as u8);
        // Towards the underlay's namespace, which routes nowhere: ClusterIPs
        // need a route before kube-proxy's DNAT, and weft finds its
        // underlay as flannel does, by the default route.
        ns.ip(&["route", "add", "default", "via", API_IP, "dev", "und0"]);
        let dir = self.lab.dir.join(name);
        let ns_dir = dir.join("ns");
        std::fs::create_dir_all(&ns_dir).unwrap();
        // A persistent namespace is a bind mount of its nsfs file, which
        // must not sit on a shared mount.
        let nd = ns_dir.to_str().unwrap();
        sh("mount", &["--bind", nd, nd]);
        sh("mount", &["--make-private", nd]);
        let (mnt, uts) = (ns_dir.join("mnt"), ns_dir.join("uts"));
        std::fs::write(&mnt, "").unwrap();
        std::fs::write(&uts, "").unwrap();
        sh(
            "unshare",
            &[
                &format!("--mount={}", mnt.display()),
                &format!("--uts={}", uts.display()),
                "--propagation",
                "private",
                "true",
            ],
        );
        let node = KubeNode {
            name: name.into(),
            ns,
            ip,
            dir: dir.clone(),
            mnt,
            uts,
            cgroup: format!("{}-{name}", self.lab.prefix),
        };
        for h in cgroup_hierarchies() {
            let cg = h.join(&node.cgroup);
            std::fs::create_dir_all(&cg).unwrap_or_else(|e| panic!("cgroup {}: {e}", cg.display()));
            // cpuset children start empty: give it its parent's.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                    let _ = std::fs::write(cg.join(f), v.trim());
                }
            }
        }
        std::fs::create_dir_all(dir.join("containerd")).unwrap();
        std::fs::create_dir_all(dir.join("sysctl")).unwrap();
        let mut binds = String::new();
        for (key, value) in KUBELET_SYSCTLS {
            let f = dir.join("sysctl").join(key.replace('/', "."));
            std::fs::write(&f, format!("{value}\n")).unwrap();
            binds += &format!("mount --bind {} /proc/sys/{key}\n", f.display());
        }
        let aside = dir.join("cgroup-aside");
        std::fs::create_dir_all(&aside).unwrap();
        let script = format!(
            "hostname {name}
            # A sysfs of the node's network namespace, keeping the cgroup mounts.
            mount --rbind /sys/fs/cgroup {aside}
            mount -t sysfs sysfs /sys
            mount --rbind {aside} /sys/fs/cgroup
            umount -R {aside}
            # bpffs, shared: weft's DaemonSet mounts it Bidirectional.
            mount -t bpf bpf /sys/fs/bpf
            mount --make-shared /sys/fs/bpf
            for d in /run /var/lib /var/log /etc/cni /opt; do mount -t tmpfs -o mode=0755 weft-node $d; done
            mkdir -p /var/lib/containerd /opt/cni/bin /etc/cni/net.d /run/containerd
            mount --bind {containerd} /var/lib/containerd
            # The standard plugins, as a node's packages install them (weft's
            # DaemonSet adds its own; containerd runs loopback, weft chains portmap).
            cp /usr/lib/cni/* /opt/cni/bin/
            {binds}",
            aside = aside.display(),
            containerd = dir.join("containerd").display(),
        );
        node.sh("sh", &["-ec", &script]);
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: without this every sandbox fails.
  restrict_oom_score_adj = true
  # Pods' network namespaces under the node's /run, not the machine's.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            // An address of the lab's underlay that nothing answers on: a
            // pod's lookups never leave the lab.
            "nameserver 198.18.0.253\n",
        )
        .unwrap();
        node
    }

    fn containerd_name(i: usize) -> String {
        format!("containerd-node-{}", i + 1)
    }

    fn kubelet_name(i: usize) -> String {
        format!("kubelet-node-{}", i + 1)
    }

    fn proxy_name(i: usize) -> String {
        format!("kube-proxy-node-{}", i + 1)
    }

    /// Starts node `i`'s containerd (and imports the images), kubelet and
    /// kube-proxy.
    fn start_node(&mut self, i: usize) {
        let node = self.nodes[i].clone();
        let mut containerd = node.command("containerd");
        containerd
            .arg("--config")
            .arg(node.dir.join("containerd.toml"));
        self.lab.spawn(&Self::containerd_name(i), containerd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node
            .run(
                "ctr",
                &["--address", "/run/containerd/containerd.sock", "version"],
            )
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "containerd on {} did not start:\n{}",
                node.name,
                self.lab.log(&Self::containerd_name(i))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut archives: Vec<PathBuf> = std::fs::read_dir(&self.spec.images)
            .unwrap_or_else(|e| panic!("{}: {e}", self.spec.images.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        archives.sort();
        archives.push(self.spec.weft_image.clone());
        for a in &archives {
            assert!(
                a.is_file(),
                "{} is missing: `cargo xtask test` and `cargo xtask cluster` build it",
                a.display()
            );
            node.ctr(&["images", "import", a.to_str().unwrap()]);
        }

        let kubelet_kubeconfig = self.api.kubeconfig(
            &format!("kubelet-{}", node.name),
            &token(&format!("system:node:{}", node.name)),
        );
        let mut kubelet = node.command(bin("kubelet"));
        kubelet.args([
            format!("--kubeconfig={}", kubelet_kubeconfig.display()),
            "--container-runtime=remote".into(),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
            "--cgroup-driver=cgroupfs".into(),
            format!("--cgroup-root=/{}", node.cgroup),
            "--fail-swap-on=false".into(),
            format!("--hostname-override={}", node.name),
            format!("--node-ip={}", node.ip),
            format!("--address={}", node.ip),
            "--healthz-bind-address=127.0.0.1".into(),
            "--read-only-port=0".into(),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            format!("--resolv-conf={}", node.dir.join("resolv.conf").display()),
            format!("--cluster-domain={CLUSTER_DOMAIN}"),
            format!("--cluster-dns={CLUSTER_DNS_IP}"),
            // The API server's requests (logs, exec, port-forward): the
            // lab's kubelets serve anyone, as in kubeadm's early days.
            "--anonymous-auth=true".into(),
            "--authorization-mode=AlwaysAllow".into(),
            // Under the node's own /var/lib, not the machine's /usr.
            "--volume-plugin-dir=/var/lib/kubelet/volumeplugins".into(),
            // Nothing can be pulled here: never collect an image, and no
            // eviction for the machine's disk, which the lab shares.
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--eviction-hard=memory.available<100Mi".into(),
            "--serialize-image-pulls=false".into(),
            "--v=1".into(),
        ]);
        self.lab.spawn(&Self::kubelet_name(i), kubelet);
        let proxy_kubeconfig = self.api.kubeconfig("kube-proxy", &token("kube-proxy"));
        let mut proxy = node.command(bin("kube-proxy"));
        proxy.args(kube::proxy_args(
            &proxy_kubeconfig,
            &node.name,
            node.ip,
            CLUSTER_CIDR,
        ));
        self.lab.spawn(&Self::proxy_name(i), proxy);
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
        std::fs::write(
            &edited,
            weft.replace(from, &format!("cluster-cidr = \"{CLUSTER_CIDR}\"")),
        )
        .unwrap();
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

    /// The cluster's DNS add-on ([`CLUSTER_DNS`]); it needs the pod network.
    pub fn install_dns(&mut self, say: &mut impl FnMut(&str)) {
        self.apply(
            "cluster-dns",
            &CLUSTER_DNS
                .replace("CLUSTER_DNS_IMAGE", CLUSTER_DNS_IMAGE)
                .replace("CLUSTER_DOMAIN", CLUSTER_DOMAIN)
                .replace("CLUSTER_DNS_IP", CLUSTER_DNS_IP),
        );
        self.wait_pods_ready(
            "kube-system",
            "k8s-app=kube-dns",
            1,
            Duration::from_secs(90),
        );
        say(&format!(
            "cluster DNS: tests/kube/dns behind the kube-dns Service ({CLUSTER_DNS_IP}), {CLUSTER_DOMAIN}"
        ));
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

    /// Tears down what [`KubeCluster::up`] made beyond the lab's own
    /// (which the lab's drop removes next).
    fn teardown(&mut self) {
        for i in 0..self.nodes.len() {
            self.lab.stop(&Self::kubelet_name(i));
        }
        for node in &self.nodes {
            kill_cgroup_tree(&node.cgroup);
        }
        for i in 0..self.nodes.len() {
            self.lab.stop(&Self::proxy_name(i));
            self.lab.stop(&Self::containerd_name(i));
        }
        for node in &self.nodes {
            release_node(node.dir.as_path(), &node.cgroup);
        }
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

/// The cgroup hierarchies a node's subtree is made in: every cgroup mount
/// under /sys/fs/cgroup (v1 controllers, name=systemd, the unified one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let point = left.split_whitespace().nth(4)?;
            (matches!(fstype, "cgroup" | "cgroup2") && point.starts_with("/sys/fs/cgroup"))
                .then(|| PathBuf::from(point))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every process in the cgroup subtree `name` (of any hierarchy), killed
/// until none is left (up to 10 s): the node's containers.
fn kill_cgroup_tree(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        for h in cgroup_hierarchies() {
            collect_procs(&h.join(name), &mut pids);
        }
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) of a process in the lab's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn collect_procs(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_procs(&e.path(), pids);
        }
    }
}

/// Removes a cgroup subtree, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The inode of a namespace file (what /proc/PID/ns/* links name).
fn ns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// What is left of a node once its kubelet, containerd and kube-proxy are
/// stopped: processes in its mount namespace (containerd's shims) or cgroup,
/// the cgroups, the namespace files. Also what `cargo xtask cluster --down`
/// runs for a cluster whose process was killed.
pub fn release_node(dir: &Path, cgroup: &str) {
    let mnt = dir.join("ns/mnt");
    if let Some(ino) = ns_inode(&mnt) {
        let link = format!("mnt:[{ino}]");
        for _ in 0..50 {
            let mut left = 0;
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if std::fs::read_link(e.path().join("ns/mnt"))
                    .is_ok_and(|l| l.to_string_lossy() == link)
                {
                    left += 1;
                    // SAFETY: kill(2) of a process in the lab node's mount namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    kill_cgroup_tree(cgroup);
    for h in cgroup_hierarchies() {
        let cg = h.join(cgroup);
        for _ in 0..20 {
            remove_cgroup_tree(&cg);
            if !cg.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let ns_dir = dir.join("ns");
    for f in ["mnt", "uts"] {
        let _ = try_sh("umount", &[ns_dir.join(f).to_str().unwrap_or_default()]);
    }
    let _ = try_sh("umount", &[ns_dir.to_str().unwrap_or_default()]);
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

/// Says which components are missing.
fn missing_message() -> String {
    format!(
        "the Kubernetes {} components are not all built in {}: `cargo xtask setup` builds them (tests/kube/build.sh)",
        kube::VERSION,
        kube::cache_dir().display()
    )
}

/// Removes what a cluster whose process was killed left (no drop ran):
/// every process in its namespaces, cgroups and nodes' mount namespaces, the
/// cgroups, the namespace files, the namespaces and the lab directory.
/// `cargo xtask cluster --down` runs it with what the cluster recorded.
pub fn clean_leftovers(prefix: &str, dir: &Path, nodes: usize) {
    if prefix.is_empty() {
        return;
    }
    let list = try_sh("ip", &["netns", "list"]);
    let namespaces: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    for name in &namespaces {
        let pids = try_sh("ip", &["netns", "pids", name]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) of a process inside the lab's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for i in 1..=nodes {
        let name = format!("node-{i}");
        release_node(&dir.join(&name), &format!("{prefix}-{name}"));
    }
    for name in namespaces.iter().rev() {
        let _ = try_sh("ip", &["netns", "del", name]);
    }
    let _ = std::fs::remove_dir_all(dir);
}
