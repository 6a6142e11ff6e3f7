//! Harness for weft's privileged end-to-end tests (and the demo/bench).
//!
//! A [`Lab`] owns everything it creates — network namespaces (their veths
//! go with them), child processes, a private bpffs mount, a scratch
//! directory — and removes all of it on drop, including when a test panics.
//! Nothing is created in the caller's network namespace. Addresses come from
//! 198.18.0.0/15: underlay 198.18.0.0/24, pods 198.19.0.0/16.

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Underlay network of a lab.
pub const UNDERLAY_PREFIX: &str = "198.18.0";
/// Cluster CIDR used by labs.
pub const CLUSTER_CIDR: &str = "198.19.0.0/16";

/// Whether we can do privileged things (root). Privileged tests skip with a
/// printed reason otherwise — unless `WEFT_REQUIRE_PRIVILEGED=1` (set by
/// `cargo xtask test`), where skipping is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("WEFT_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
        panic!("{test}: needs root, and WEFT_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIP {test}: needs root (run `cargo xtask test` as root)");
    false
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output whatever happened.
pub fn try_sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"))
}

/// Path of the `weft` binary next to the running test/xtask executable.
pub fn weft_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("weft");
        if cand.is_file() {
            return cand;
        }
    }
    panic!(
        "no `weft` binary near {}; build it first (`cargo build -p weft-agent`) or set WEFT_BIN",
        exe.display()
    );
}

/// Runs CNI plugin `plugin` inside `ns` the way a runtime does (CNI_* from
/// the arguments, CNI_IFNAME=eth0, CNI_PATH = the plugin's directory,
/// `conf` on stdin), with `path` as its PATH if given.
pub fn run_cni_plugin(
    ns: &Netns,
    plugin: &std::path::Path,
    command: &str,
    container: &str,
    netns: &str,
    conf: &serde_json::Value,
    path: Option<&std::path::Path>,
) -> Output {
    use std::io::Write as _;
    let mut cmd = ns.command(plugin);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin.parent().expect("plugin dir"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write conf");
    child.wait_with_output().expect("plugin output")
}

/// A container image (a root filesystem tar for `podman import`) made here
/// from Debian's static busybox, no registry involved: `sh`, `ping`,
/// `sleep`, `ip`, `cat`. Written to `<lab>/busybox.tar`.
pub fn busybox_image(lab: &Lab) -> PathBuf {
    let rootfs = lab.dir.join("busybox-rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs dir");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (Debian's busybox-static; `cargo xtask setup` installs it)");
    for applet in ["sh", "ping", "sleep", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .expect("applet link");
    }
    let image = lab.dir.join("busybox.tar");
    sh(
        "tar",
        &[
            "-C",
            rootfs.to_str().expect("utf-8 path"),
            "-cf",
            image.to_str().expect("utf-8 path"),
            ".",
        ],
    );
    image
}

/// podman's flags for a private store under `dir` (images, containers,
/// runtime state; vfs works on any filesystem): nothing of the machine's
/// own podman is used.
pub fn podman_store_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--root".into(),
        dir.join("storage").display().to_string(),
        "--runroot".into(),
        dir.join("runroot").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ]
}

/// Path of the `weft-cni` plugin binary, next to `weft`.
pub fn cni_bin() -> PathBuf {
    weft_bin().with_file_name("weft-cni")
}

/// A network namespace owned by a [`Lab`].
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `program args…` inside the namespace (panics on failure).
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Like [`Netns::sh`] but returns the output whatever happened.
    pub fn try_sh(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        try_sh("ip", &all)
    }

    /// `ip ARGS` in the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// A command that runs in this namespace's network stack only (nsenter
    /// keeps the mount namespace, so bpffs pins stay visible). nsenter is
    /// found by this process's PATH, so the command may be given another.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(nsenter());
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.sh("sysctl", &["-qw", &format!("{key}={value}")]);
    }
}

/// `nsenter`, as this process's PATH finds it.
fn nsenter() -> &'static std::path::Path {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join("nsenter"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("/usr/bin/nsenter"))
    })
}

/// A directory to put on a PATH instead of the machine's, holding only
/// `programs` (each found on this process's PATH), as wrappers that append
/// `NAME ARGS…` to the returned log before running the real one, and
/// `traps`, which append to the log and fail as if absent: a PATH without
/// `ip`, `tc`, `ethtool`, `nsenter` …, that records every process run or
/// tried through it.
pub fn logged_tools(lab: &Lab, tag: &str, programs: &[&str], traps: &[&str]) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = lab.dir.join(format!("{tag}-bin"));
    std::fs::create_dir_all(&dir).expect("tools dir");
    let log = lab.dir.join(format!("{tag}-spawned.log"));
    std::fs::write(&log, "").expect("spawn log");
    let path = std::env::var_os("PATH").unwrap_or_default();
    for p in programs {
        let Some(real) = std::env::split_paths(&path)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
        else {
            continue;
        };
        let wrapper = dir.join(p);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"{p} $*\" >> '{}'\nexec '{}' \"$@\"\n",
                log.display(),
                real.display()
            ),
        )
        .expect("wrapper");
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for t in traps {
        let trap = dir.join(t);
        std::fs::write(
            &trap,
            format!(
                "#!/bin/sh\necho \"{t} $* (not on this PATH)\" >> '{}'\nexit 127\n",
                log.display()
            ),
        )
        .expect("trap");
        std::fs::set_permissions(&trap, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    (dir, log)
}

/// A child process killed (SIGTERM, then SIGKILL) when the lab goes away.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// Owner of everything a test creates.
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    netns: Vec<Netns>,
    procs: Vec<Proc>,
    bpffs_mounted: bool,
}

impl Lab {
    /// A new lab named `wf<pid><seq>`-something, unique on this machine.
    pub fn new(tag: &str) -> Self {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wf{}{}{tag}", std::process::id() % 100_000, seq);
        let dir = std::env::temp_dir().join(format!("{prefix}.lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab dir");
        Self {
            bpffs: dir.join("bpffs"),
            prefix,
            dir,
            netns: Vec::new(),
            procs: Vec::new(),
            bpffs_mounted: false,
        }
    }

    /// A private bpffs instance for this lab's pins (never /sys/fs/bpf).
    pub fn bpffs(&mut self) -> PathBuf {
        if !self.bpffs_mounted {
            std::fs::create_dir_all(&self.bpffs).expect("bpffs dir");
            sh(
                "mount",
                &["-t", "bpf", "bpf", self.bpffs.to_str().expect("utf-8 path")],
            );
            self.bpffs_mounted = true;
        }
        self.bpffs.clone()
    }

    /// Creates a network namespace `<prefix>-<name>` with lo up and IPv6 off
    /// (so no router solicitations or ND muddy packet counts).
    pub fn netns(&mut self, name: &str) -> Netns {
        let ns = Netns {
            name: format!("{}-{name}", self.prefix),
        };
        sh("ip", &["netns", "add", &ns.name]);
        self.netns.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns
    }

    /// Starts a process (built by `cmd`) whose output goes to `<dir>/<name>.log`.
    ///
    /// The child gets SIGTERM when the thread that started it ends, so a
    /// test, demo or bench killed outright (SIGKILL, where no drop runs)
    /// leaves no agent or server running in its namespaces.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> &mut Proc {
        let log = self.dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody will
                // signal us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the lab's process is gone"));
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push(Proc {
            name: name.into(),
            child,
            log,
        });
        self.procs.last_mut().expect("just pushed")
    }

    /// Stops the named process (SIGTERM, wait up to 5 s, then SIGKILL).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|p| p.name == name) {
            let mut p = self.procs.remove(i);
            stop_child(&mut p.child);
        }
    }

    /// The pid of a process started with [`Lab::spawn`].
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
    }

    /// The log of a process started with [`Lab::spawn`].
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn stop_child(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            stop_child(&mut p.child);
        }
        // Deleting a namespace deletes its interfaces, and with them their
        // XDP/TC attachments.
        for ns in self.netns.iter().rev() {
            let _ = try_sh("ip", &["netns", "del", &ns.name]);
        }
        if self.bpffs_mounted {
            let _ = try_sh("umount", &["-l", self.bpffs.to_str().unwrap_or_default()]);
        }
        if std::env::var_os("WEFT_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node of a [`Cluster`]: its namespace, underlay address and pod CIDR.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ns: Netns,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub bpffs: PathBuf,
    pub run_dir: PathBuf,
}

/// A pod attached to a node.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub node: usize,
}

/// Nodes on one underlay bridge, each a namespace with interface `und0`.
pub struct Underlay {
    pub ns: Netns,
    pub kind: UnderlayKind,
}

/// How the underlay's bridge ports treat offloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnderlayKind {
    /// veth defaults: a GSO skb crosses the bridge whole, with its
    /// "checksum later" state (what a nested or container-based cluster has).
    #[default]
    Veth,
    /// Transmit checksum (and so segmentation) off on the bridge side, as on
    /// a real NIC the checksum is filled in and frames are wire-sized before
    /// the wire: XDP on the receiving veth sees raw bytes, not the sender's
    /// "checksum later" promise. Needed for `--decap xdp` on veths. GRO on
    /// the node's `und0` (veth's NAPI), as every NIC driver does GRO.
    NicLike,
}

impl Underlay {
    /// The underlay: a namespace holding bridge `br0`.
    pub fn new(lab: &mut Lab) -> Self {
        Self::with_kind(lab, UnderlayKind::default())
    }

    /// An underlay whose ports behave as `kind` says.
    pub fn with_kind(lab: &mut Lab, kind: UnderlayKind) -> Self {
        let ns = lab.netns("und");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Self { ns, kind }
    }

    /// Plugs `node` into the bridge with interface `und0` at 198.18.0.`host`/24.
    pub fn plug(&self, node: &Netns, host: u8) -> Ipv4Addr {
        let port = format!("p{host}");
        node.ip(&[
            "link",
            "add",
            "und0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.ns.name,
        ]);
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"]);
        if self.kind == UnderlayKind::NicLike {
            self.ns.sh("ethtool", &["-K", &port, "tx", "off"]);
        }
        let ip = Ipv4Addr::new(198, 18, 0, host);
        node.ip(&["addr", "add", &format!("{ip}/24"), "dev", "und0"]);
        node.ip(&["link", "set", "und0", "up"]);
        if self.kind == UnderlayKind::NicLike {
            node.sh("ethtool", &["-K", "und0", "gro", "on"]);
        }
        ip
    }
}

/// Settings of a weft cluster built in a lab.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub vni: u32,
    pub port: u16,
    /// Extra flags for every agent (e.g. `--registry kube`).
    pub agent_args: Vec<String>,
    pub underlay: UnderlayKind,
}

impl ClusterSpec {
    /// Two nodes with one pod each: the smallest cluster with a cross-node path.
    pub fn pair() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 1,
            ..Self::default()
        }
    }

    /// Decapsulation in XDP (`--decap xdp`) on a NIC-like underlay, which
    /// XDP redirects into pods need (see [`UnderlayKind::NicLike`]).
    pub fn xdp_decap(mut self) -> Self {
        self.agent_args.extend(["--decap".into(), "xdp".into()]);
        self.underlay = UnderlayKind::NicLike;
        self
    }

    /// `nodes` nodes and no pods (tests add their own).
    pub fn nodes_only(nodes: usize) -> Self {
        Self {
            nodes,
            pods_per_node: 0,
            ..Self::default()
        }
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 3,
            pods_per_node: 2,
            vni: 1,
            port: 8472,
            agent_args: Vec::new(),
            underlay: UnderlayKind::default(),
        }
    }
}

/// A node that is not weft's (e.g. a flannel-style kernel vxlan node) but is
/// listed in the registry.
#[derive(Clone, Debug)]
pub struct ForeignNode {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub vtep_mac: String,
}

/// Nodes running the real `weft agent` (file registry), pods attached
/// through the same code path as the CNI plugin.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub underlay: Underlay,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub foreign: Vec<ForeignNode>,
    pub nodes_file: PathBuf,
    /// The PATH agents, `weft` commands and the CNI plugin get (none: this
    /// process's).
    pub path: Option<PathBuf>,
}

impl Cluster {
    /// Builds the underlay and nodes, starts every agent and waits until each
    /// is ready; then attaches `pods_per_node` pods to each node.
    pub fn start(lab: &mut Lab, spec: ClusterSpec) -> Self {
        let mut c = Self::new(lab, spec);
        c.launch(lab);
        c
    }

    /// Builds the underlay and the nodes' namespaces; starts nothing.
    pub fn new(lab: &mut Lab, spec: ClusterSpec) -> Self {
        let underlay = Underlay::with_kind(lab, spec.underlay);
        let bpffs = lab.bpffs();
        let mut nodes = Vec::new();
        for i in 0..spec.nodes {
            let ns = lab.netns(&format!("n{}", i + 1));
            let ip = underlay.plug(&ns, (i + 1) as u8);
            nodes.push(NodeInfo {
                name: format!("node-{}", i + 1),
                ns,
                underlay_ip: ip,
                pod_cidr: format!("198.19.{}.0/24", i + 1),
                bpffs: bpffs.join(format!("node-{}", i + 1)),
                run_dir: lab.dir.join(format!("node-{}", i + 1)),
            });
        }
        Self {
            spec,
            underlay,
            nodes,
            pods: Vec::new(),
            foreign: Vec::new(),
            nodes_file: lab.dir.join("nodes.toml"),
            path: None,
        }
    }

    /// Writes the registry, starts every agent, waits for them, adds the pods.
    pub fn launch(&mut self, lab: &mut Lab) {
        self.launch_saying(lab, |_| {});
    }

    /// [`Cluster::launch`], telling `say` each step as it is done (the demo
    /// prints them).
    pub fn launch_saying(&mut self, lab: &mut Lab, mut say: impl FnMut(&str)) {
        self.write_nodes_file();
        say(&format!(
            "starting `weft agent` on each node (file registry {})",
            self.nodes_file.display()
        ));
        for i in 0..self.nodes.len() {
            self.start_agent(lab, i);
        }
        for i in 0..self.nodes.len() {
            self.wait_ready(lab, i);
            let n = &self.nodes[i];
            say(&format!(
                "{}: agent ready, BPF programs attached, pod CIDR {}",
                n.name, n.pod_cidr
            ));
        }
        for i in 0..self.nodes.len() {
            for j in 0..self.spec.pods_per_node {
                let pod = self.add_pod(lab, i, j);
                say(&format!(
                    "{}: pod {} ({}) attached through the CNI plugin",
                    self.nodes[i].name, pod.ip, pod.name
                ));
            }
        }
    }

    /// Rewrites the node registry file (agents pick it up live).
    pub fn write_nodes_file(&self) {
        let mut s = String::new();
        for n in &self.nodes {
            s += &format!(
                "[[node]]\nname = \"{}\"\nunderlay_ip = \"{}\"\npod_cidr = \"{}\"\n\n",
                n.name, n.underlay_ip, n.pod_cidr
            );
        }
        for f in &self.foreign {
            s += &format!(
                "[[node]]\nname = \"{}\"\nunderlay_ip = \"{}\"\npod_cidr = \"{}\"\nvtep_mac = \"{}\"\n\n",
                f.name, f.underlay_ip, f.pod_cidr, f.vtep_mac
            );
        }
        let tmp = self.nodes_file.with_extension("tmp");
        std::fs::write(&tmp, s).expect("write nodes file");
        std::fs::rename(&tmp, &self.nodes_file).expect("rename nodes file");
    }

    pub fn agent_name(i: usize) -> String {
        format!("agent-{}", i + 1)
    }

    /// The command that runs node `i`'s agent (in its namespace).
    pub fn agent_command(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut cmd = n.ns.command(weft_bin());
        cmd.args([
            "agent",
            "--node-name",
            &n.name,
            "--iface",
            "und0",
            "--cluster-cidr",
            CLUSTER_CIDR,
        ])
        .arg("--nodes-file")
        .arg(&self.nodes_file)
        .args([
            "--vni",
            &self.spec.vni.to_string(),
            "--port",
            &self.spec.port.to_string(),
        ])
        .arg("--bpffs-dir")
        .arg(&n.bpffs)
        .arg("--run-dir")
        .arg(&n.run_dir)
        .args(&self.spec.agent_args)
        .env("WEFT_LOG", "info");
        if let Some(p) = &self.path {
            cmd.env("PATH", p);
        }
        cmd
    }

    /// Starts node `i`'s agent.
    pub fn start_agent(&self, lab: &mut Lab, i: usize) {
        lab.spawn(&Self::agent_name(i), self.agent_command(i));
    }

    /// Waits until node `i`'s agent has written its first sync.
    pub fn wait_ready(&self, lab: &Lab, i: usize) {
        let n = &self.nodes[i];
        let env = n.run_dir.join("subnet.env");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !env.exists() {
            assert!(
                Instant::now() < deadline,
                "agent of {} not ready in 20 s; log:\n{}",
                n.name,
                lab.log(&Self::agent_name(i))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `weft ARGS…` in node `i`'s namespace with its paths.
    pub fn weft(&self, i: usize, args: &[&str]) -> Output {
        let n = &self.nodes[i];
        let mut cmd = n.ns.command(weft_bin());
        cmd.args(args)
            .env("WEFT_BPFFS_DIR", &n.bpffs)
            .env("WEFT_RUN_DIR", &n.run_dir);
        if let Some(p) = &self.path {
            cmd.env("PATH", p);
        }
        cmd.output().expect("run weft")
    }

    /// The network configuration the lab's CNI invocations use on node `i`.
    pub fn cni_conf(&self, i: usize, version: &str) -> serde_json::Value {
        let n = &self.nodes[i];
        serde_json::json!({
            "cniVersion": version,
            "name": "weft",
            "type": "weft",
            "runDir": n.run_dir,
            "dataDir": n.run_dir.join("ipam"),
            "dns": {"nameservers": ["198.18.0.53"]},
        })
    }

    /// Runs the weft CNI plugin on node `i` exactly as a runtime does:
    /// `CNI_*` environment, configuration on stdin, inside the node's namespace.
    pub fn cni(
        &self,
        i: usize,
        command: &str,
        container: &str,
        netns: &str,
        conf: &serde_json::Value,
    ) -> Output {
        run_cni_plugin(
            &self.nodes[i].ns,
            &cni_bin(),
            command,
            container,
            netns,
            conf,
            self.path.as_deref(),
        )
    }

    /// Creates pod `j` on node `i`: a namespace, then CNI ADD.
    pub fn add_pod(&mut self, lab: &mut Lab, i: usize, j: usize) -> PodInfo {
        let ns = lab.netns(&format!("n{}p{}", i + 1, j + 1));
        let out = self.cni(
            i,
            "ADD",
            &ns.name,
            ns.path().to_str().expect("utf-8"),
            &self.cni_conf(i, "1.1.0"),
        );
        assert!(
            out.status.success(),
            "CNI ADD on node {}: {}{}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("CNI result JSON");
        let addr = result["ips"][0]["address"].as_str().expect("an address");
        let ip: Ipv4Addr = addr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("IPv4 address");
        let pod = PodInfo {
            name: ns.name.clone(),
            ns,
            ip,
            node: i,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// `weft status --json` of node `i`.
    pub fn status(&self, i: usize) -> serde_json::Value {
        let out = self.weft(i, &["status", "--json"]);
        assert!(
            out.status.success(),
            "weft status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Node `i`'s map of pod CIDRs, as `CIDR@underlay-ip` strings.
    pub fn remote_nodes(&self, i: usize) -> Vec<String> {
        self.status(i)["nodes"]
            .as_array()
            .expect("nodes list")
            .iter()
            .map(|n| {
                format!(
                    "{}@{}",
                    n["pod_cidr"].as_str().unwrap_or_default(),
                    n["underlay_ip"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// A named counter of node `i` (forwards or drops).
    pub fn counter(&self, i: usize, name: &str) -> u64 {
        let s = self.status(i);
        for list in ["forwards", "drops"] {
            for pair in s["counters"][list].as_array().expect("counter list") {
                if pair[0] == name {
                    return pair[1].as_u64().expect("counter value");
                }
            }
        }
        panic!("no counter {name}");
    }
}

/// iperf3 from `client` to a one-off server on `server_ip` in `server`, for
/// `secs` seconds with `extra` client flags; the received rate in Gbit/s.
pub fn iperf_gbps(
    server: &Netns,
    server_ip: Ipv4Addr,
    client: &Netns,
    lab: &mut Lab,
    name: &str,
    secs: u32,
    extra: &[&str],
) -> f64 {
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "--forceflush", "-B", &server_ip.to_string()]);
    lab.spawn(name, cmd);
    wait_for("iperf3 server", Duration::from_secs(5), || {
        lab.log(name).contains("listening").then_some(())
    });
    let mut args = vec![
        "-c".to_string(),
        server_ip.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client.try_sh("iperf3", &argv);
    lab.stop(name);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(v.get("error").is_none(), "iperf3 failed: {}", v["error"]);
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "iperf3 moved no data: {}", v["end"]);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// `ping -c COUNT -W 1 -i 0.05 DST` from `ns`; true when every reply came.
pub fn ping(ns: &Netns, dst: Ipv4Addr, count: u32) -> bool {
    ns.try_sh(
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-W",
            "1",
            "-i",
            "0.05",
            "-q",
            &dst.to_string(),
        ],
    )
    .status
    .success()
}

pub mod pktgen;

/// While alive, the calling *thread* is in `ns`'s network namespace (tests
/// run each in their own thread, so others are unaffected).
pub struct InNetns {
    orig: std::fs::File,
}

impl InNetns {
    pub fn enter(ns: &Netns) -> Self {
        Self::enter_path(&ns.path())
    }

    /// Enters the network namespace at `path` (a /run/netns file, or
    /// /proc/PID/ns/net of a process in it, e.g. a Kubernetes pod's).
    pub fn enter_path(path: &std::path::Path) -> Self {
        use std::os::fd::AsRawFd;
        let orig = std::fs::File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = std::fs::File::open(path)
            .unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
        // SAFETY: setns on fds we own.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns into {}",
            path.display()
        );
        Self { orig }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// A TCP and UDP echo server on `ip:port` inside a namespace, served by a
/// thread of this process; stops when dropped.
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, ip: Ipv4Addr, port: u16) -> Self {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = ns.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let _inside = InNetns::enter(&ns);
            let tcp = std::net::TcpListener::bind((ip, port)).expect("bind TCP echo");
            let udp = std::net::UdpSocket::bind((ip, port)).expect("bind UDP echo");
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_read_timeout(Some(Duration::from_millis(10)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((mut s, _)) = tcp.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    if let Ok(n) = s.read(&mut buf) {
                        let _ = s.write_all(&buf[..n]);
                    }
                }
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `i`-th 8 bytes of the stream [`bulk_tcp_intact`] sends: `i` through
/// one xorshift64* step.
pub(crate) fn bulk_word(i: u64) -> [u8; 8] {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
}

/// Sends `bytes` (a multiple of 8) of a pseudo-random stream over one TCP
/// connection from `client` to a receiver on `ip:port` in `server`, in
/// 64 KiB writes (GSO-sized skbs), and checks every byte on arrival: the
/// payload survived whatever merged, split or moved its headers on the way
/// (a checksum the receiver trusts would not catch that). `Err` says what
/// went wrong.
pub fn bulk_tcp_intact(
    server: &Netns,
    ip: Ipv4Addr,
    port: u16,
    client: &Netns,
    bytes: u64,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = server.clone();
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        let _inside = InNetns::enter(&ns);
        let l = std::net::TcpListener::bind((ip, port)).map_err(|e| format!("bind: {e}"))?;
        ready_tx.send(()).expect("ready");
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (mut at, mut buf) = (0u64, vec![0u8; 1 << 16]);
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("read at {at}: {e}"))?;
            if n == 0 {
                break;
            }
            let mut word = bulk_word(at / 8);
            for (k, b) in buf[..n].iter().enumerate() {
                let pos = at + k as u64;
                if pos.is_multiple_of(8) {
                    word = bulk_word(pos / 8);
                }
                if *b != word[(pos % 8) as usize] {
                    return Err(format!("byte {pos} of {bytes} differs"));
                }
            }
            at += n as u64;
        }
        if at != bytes {
            return Err(format!("received {at} of {bytes} bytes"));
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "receiver did not start".to_string())?;
    let sent = (|| {
        let _inside = InNetns::enter(client);
        let mut s =
            std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2))
                .map_err(|e| format!("connect: {e}"))?;
        let mut chunk = Vec::with_capacity(1 << 16);
        let mut word = 0u64;
        while word * 8 < bytes {
            chunk.clear();
            while chunk.len() < 1 << 16 && word * 8 < bytes {
                chunk.extend_from_slice(&bulk_word(word));
                word += 1;
            }
            s.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
        }
        Ok::<(), String>(())
    })();
    // The receiver's verdict first: a sender's error is usually its echo.
    receiver.join().expect("receiver thread").and(sent)
}

/// One TCP round trip from inside `from` to `ip:port`: true when the echo matches.
pub fn tcp_roundtrip(from: &Netns, ip: Ipv4Addr, port: u16) -> bool {
    use std::io::{Read, Write};
    let _inside = InNetns::enter(from);
    let Ok(mut s) =
        std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let msg = format!("weft tcp to {ip}");
    if s.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

/// One UDP round trip (3 tries) from inside `from` to `ip:port`: true when
/// the echo comes back from `ip:port` itself (a reply from any other address,
/// e.g. a Service backend whose reply missed its reverse NAT, does not count).
pub fn udp_roundtrip(from: &Netns, ip: Ipv4Addr, port: u16) -> bool {
    let _inside = InNetns::enter(from);
    let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
    let msg = format!("weft udp to {ip}");
    let mut buf = [0u8; 256];
    (0..3).any(|_| {
        s.send_to(msg.as_bytes(), (ip, port)).is_ok()
            && matches!(s.recv_from(&mut buf),
                Ok((n, peer)) if &buf[..n] == msg.as_bytes() && peer == (ip, port).into())
    })
}
pub mod k8s;
pub mod kube;
pub mod traffic;

/// A pod attached to a Linux bridge by a veth, as flannel's CNI (bridge +
/// host-local) does: `<ip>/24` on eth0, default route via the bridge.
pub fn bridge_pod(
    lab: &mut Lab,
    node: &Netns,
    bridge: &str,
    name: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Netns {
    let pod = lab.netns(name);
    let host = format!("v{}", &name[name.len().saturating_sub(10)..]);
    let mtu = mtu.to_string();
    node.ip(&[
        "link", "add", &host, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu,
        "netns", &pod.name,
    ]);
    node.ip(&["link", "set", &host, "master", bridge, "up"]);
    pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", &gateway.to_string()]);
    pod
}

/// A node set up exactly as flannel's vxlan backend does it: `flannel.1`
/// (nolearning, MTU underlay − 50), its address the subnet's network
/// address, and the `cni0` bridge (gateway `.1`) for pods. Remote nodes are
/// added with [`FlannelNode::add_remote`].
pub struct FlannelNode {
    pub ns: Netns,
    pub subnet: u8,
    pub vtep_mac: String,
}

impl FlannelNode {
    /// `ns` must already be plugged into the underlay as `und0`.
    pub fn new(ns: &Netns, underlay_ip: Ipv4Addr, subnet: u8, vni: u32, port: u16) -> Self {
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            &vni.to_string(),
            "local",
            &underlay_ip.to_string(),
            "dev",
            "und0",
            "dstport",
            &port.to_string(),
            "nolearning",
        ]);
        ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("198.19.{subnet}.0/32"),
            "dev",
            "flannel.1",
        ]);
        ns.ip(&["link", "add", "cni0", "type", "bridge"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("198.19.{subnet}.1/24"),
            "dev",
            "cni0",
        ]);
        ns.ip(&["link", "set", "cni0", "mtu", "1450", "up"]);
        let link = ns.ip(&["-o", "link", "show", "flannel.1"]);
        let vtep_mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("flannel.1 MAC")
            .to_string();
        Self {
            ns: ns.clone(),
            subnet,
            vtep_mac,
        }
    }

    /// What flanneld installs for a remote node: neighbour, FDB entry, onlink route.
    pub fn add_remote(&self, remote_ip: Ipv4Addr, remote_subnet: u8, remote_vtep: &str) {
        let net = format!("198.19.{remote_subnet}.0");
        self.ns.ip(&[
            "neigh",
            "replace",
            &net,
            "lladdr",
            remote_vtep,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ]);
        sh(
            "bridge",
            &[
                "-n",
                &self.ns.name,
                "fdb",
                "append",
                remote_vtep,
                "dev",
                "flannel.1",
                "dst",
                &remote_ip.to_string(),
            ],
        );
        self.ns.ip(&[
            "route",
            "add",
            &format!("{net}/24"),
            "via",
            &net,
            "dev",
            "flannel.1",
            "onlink",
        ]);
    }
}
