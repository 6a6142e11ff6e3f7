//! A node of a [`KubeCluster`]: its namespaces, cgroups and directories,
//! containerd, kubelet and kube-proxy, and what tears it down.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use super::{
    KubeCluster, PAUSE_IMAGE,
    addons::{CLUSTER_DNS_IP, CLUSTER_DOMAIN},
    bin, token,
};
use crate::{
    CLUSTER_CIDR, Netns,
    kube::{self, API_IP},
    sh, try_sh,
};

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
    /// Tears down what [`KubeCluster::up`] made beyond the lab's own
    /// (which the lab's drop removes next).
    pub(super) fn teardown(&mut self) {
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

    /// A node's namespaces, directories and cgroups.
    pub(super) fn make_node(
        &mut self,
        underlay: &crate::Underlay,
        i: usize,
        name: &str,
    ) -> KubeNode {
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

    pub(super) fn containerd_name(i: usize) -> String {
        format!("containerd-node-{}", i + 1)
    }

    pub(super) fn kubelet_name(i: usize) -> String {
        format!("kubelet-node-{}", i + 1)
    }

    pub(super) fn proxy_name(i: usize) -> String {
        format!("kube-proxy-node-{}", i + 1)
    }

    /// Starts node `i`'s containerd (and imports the images), kubelet and
    /// kube-proxy.
    pub(super) fn start_node(&mut self, i: usize) {
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
        if self.spec.dual_stack {
            // Pods' status lists both of the CNI result's addresses.
            kubelet.arg("--feature-gates=IPv6DualStack=true");
        }
        self.lab.spawn(&Self::kubelet_name(i), kubelet);
        let proxy_kubeconfig = self.api.kubeconfig("kube-proxy", &token("kube-proxy"));
        let mut proxy = node.command(bin("kube-proxy"));
        if self.spec.dual_stack {
            proxy.args(kube::proxy_args(
                &proxy_kubeconfig,
                &node.name,
                node.ip,
                &format!("{CLUSTER_CIDR},{}", crate::CLUSTER_CIDR6),
            ));
            // Both families' proxier (ip6tables beside iptables).
            proxy.arg("--feature-gates=IPv6DualStack=true");
        } else {
            proxy.args(kube::proxy_args(
                &proxy_kubeconfig,
                &node.name,
                node.ip,
                CLUSTER_CIDR,
            ));
        }
        self.lab.spawn(&Self::proxy_name(i), proxy);
    }
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

/// Removes what a cluster whose process was killed left (no drop ran):
/// every process in its namespaces, cgroups and nodes' mount namespaces, the
/// cgroups, the namespace files, the namespaces and the lab directory.
/// `cargo xtask cluster --down` runs it with what the cluster recorded.
pub fn clean_leftovers(prefix: &str, dir: &Path, nodes: usize) {
    crate::lab::remove_leftovers(prefix, dir, || {
        for i in 1..=nodes {
            let name = format!("node-{i}");
            release_node(&dir.join(&name), &format!("{prefix}-{name}"));
        }
    });
}
