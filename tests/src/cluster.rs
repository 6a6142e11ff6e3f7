//! weft clusters in a lab: nodes on one underlay bridge, each running the
//! real `weft agent` (file registry), pods attached through the CNI plugin.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{Lab, Netns};

/// Underlay network of a lab.
pub const UNDERLAY_PREFIX: &str = "198.18.0";
/// Cluster CIDR used by labs.
pub const CLUSTER_CIDR: &str = "198.19.0.0/16";
/// The IPv6 cluster CIDR of a dual-stack lab: in 2001:2::/48, IPv6's
/// benchmarking range (RFC 5180), as 198.18.0.0/15 is IPv4's; node N's pod
/// CIDR is 2001:2:0:N::/64.
pub const CLUSTER_CIDR6: &str = "2001:2::/48";
/// The IPv6 underlay of a lab whose nodes talk IPv6 too ([`ClusterSpec::underlay6`]):
/// node N is 2001:2:ff::N/64, outside the pods' [`CLUSTER_CIDR6`].
pub const UNDERLAY6_PREFIX: &str = "2001:2:ff::";

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

/// Path of the `weft-cni` plugin binary, next to `weft`.
pub fn cni_bin() -> PathBuf {
    weft_bin().with_file_name("weft-cni")
}

/// A node of a [`Cluster`]: its namespace, underlay address and pod CIDR.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ns: Netns,
    /// Its IPv4 underlay address (in an IPv6-only cluster the one it would
    /// have: it is neither configured nor in the registry).
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Its IPv6 pod CIDR, in a dual-stack cluster.
    pub pod_cidr6: Option<String>,
    /// Its IPv6 underlay address, with [`ClusterSpec::underlay6`].
    pub underlay_ip6: Option<std::net::Ipv6Addr>,
    pub bpffs: PathBuf,
    pub run_dir: PathBuf,
}

/// A pod attached to a node.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub ns: Netns,
    /// Its IPv4 address (0.0.0.0 in an IPv6-only cluster: it has none).
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack or IPv6-only cluster.
    pub ip6: Option<std::net::Ipv6Addr>,
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
        self.plug_link(node, host);
        let ip = Ipv4Addr::new(198, 18, 0, host);
        node.ip(&["addr", "add", &format!("{ip}/24"), "dev", "und0"]);
        ip
    }

    /// Plugs `node` into the bridge with interface `und0`, up, with no
    /// address (an IPv6-only node gets its one from [`Underlay::plug6`]).
    pub fn plug_link(&self, node: &Netns, host: u8) {
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
        node.ip(&["link", "set", "und0", "up"]);
        if self.kind == UnderlayKind::NicLike {
            node.sh("ethtool", &["-K", "und0", "gro", "on"]);
        }
    }

    /// Gives `node` (plugged in already) an IPv6 address on the underlay
    /// too: [`UNDERLAY6_PREFIX`]`host`/64.
    pub fn plug6(&self, node: &Netns, host: u8) -> std::net::Ipv6Addr {
        for (ns, dev) in [(&self.ns, "br0"), (node, "und0")] {
            ns.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0");
        }
        let ip: std::net::Ipv6Addr = format!("{UNDERLAY6_PREFIX}{host:x}").parse().unwrap();
        node.ip(&["addr", "add", &format!("{ip}/64"), "dev", "und0", "nodad"]);
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
    /// The CNI configuration's `tcAttach` for the pods (none: the plugin's
    /// default, `auto`).
    pub tc_attach: Option<&'static str>,
    /// Dual-stack: agents with `--cluster-cidr6` ([`CLUSTER_CIDR6`]), nodes
    /// with an IPv6 pod CIDR each, pods with an address of each family.
    pub dual_stack: bool,
    /// Extra environment for every agent.
    pub agent_env: Vec<(String, String)>,
    /// Dual-stack, and the nodes talk IPv6 on the underlay too: each has an
    /// address there (`--public-ipv6`), and IPv6 pods' VXLAN goes over IPv6.
    pub underlay6: bool,
    /// IPv6 only (`--enable-ipv4=false`): nodes with an IPv6 underlay
    /// address and an IPv6 pod CIDR only, pods with an IPv6 address only;
    /// node-1's agent is given its address (`--public-ipv6`), the others
    /// find theirs on `und0`.
    pub ipv6_only: bool,
}

impl ClusterSpec {
    /// This spec, dual-stack.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// This spec, dual-stack with an IPv6 underlay beside the IPv4 one.
    pub fn underlay6(mut self) -> Self {
        self.dual_stack = true;
        self.underlay6 = true;
        self
    }

    /// This spec, IPv6 only: no IPv4 address on any node or pod.
    pub fn ipv6_only(mut self) -> Self {
        self.ipv6_only = true;
        self.underlay6 = true;
        self
    }

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
            tc_attach: None,
            dual_stack: false,
            agent_env: Vec::new(),
            underlay6: false,
            ipv6_only: false,
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
    /// Its IPv6 pod CIDR, if dual-stack.
    pub pod_cidr6: Option<String>,
    /// Its IPv6 underlay address and IPv6 VTEP MAC (flannel-v6.1's), if any.
    pub underlay6: Option<(std::net::Ipv6Addr, String)>,
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
            let host = (i + 1) as u8;
            let ip = if spec.ipv6_only {
                underlay.plug_link(&ns, host);
                Ipv4Addr::new(198, 18, 0, host)
            } else {
                underlay.plug(&ns, host)
            };
            let underlay_ip6 = spec.underlay6.then(|| underlay.plug6(&ns, host));
            nodes.push(NodeInfo {
                name: format!("node-{}", i + 1),
                ns,
                underlay_ip: ip,
                pod_cidr: format!("198.19.{}.0/24", i + 1),
                pod_cidr6: (spec.dual_stack || spec.ipv6_only)
                    .then(|| format!("2001:2:0:{:x}::/64", i + 1)),
                underlay_ip6,
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
            let cidrs = match &n.pod_cidr6 {
                Some(c6) if self.spec.ipv6_only => format!("pod_cidr = \"{c6}\""),
                Some(c6) => format!("pod_cidrs = [\"{}\", \"{c6}\"]", n.pod_cidr),
                None => format!("pod_cidr = \"{}\"", n.pod_cidr),
            };
            s += &format!("[[node]]\nname = \"{}\"\n{cidrs}\n", n.name);
            if !self.spec.ipv6_only {
                s += &format!("underlay_ip = \"{}\"\n", n.underlay_ip);
            }
            if let Some(ip6) = n.underlay_ip6 {
                s += &format!("underlay_ip6 = \"{ip6}\"\n");
            }
            s += "\n";
        }
        for f in &self.foreign {
            let cidrs = match &f.pod_cidr6 {
                Some(c6) => format!("pod_cidrs = [\"{}\", \"{c6}\"]", f.pod_cidr),
                None => format!("pod_cidr = \"{}\"", f.pod_cidr),
            };
            s += &format!(
                "[[node]]\nname = \"{}\"\nunderlay_ip = \"{}\"\n{cidrs}\nvtep_mac = \"{}\"\n",
                f.name, f.underlay_ip, f.vtep_mac
            );
            if let Some((ip6, mac6)) = &f.underlay6 {
                s += &format!("underlay_ip6 = \"{ip6}\"\nvtep_mac6 = \"{mac6}\"\n");
            }
            s += "\n";
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
        cmd.args(["agent", "--node-name", &n.name, "--iface", "und0"]);
        if self.spec.ipv6_only {
            cmd.args(["--enable-ipv4=false", "--cluster-cidr6", CLUSTER_CIDR6]);
        } else {
            cmd.args(["--cluster-cidr", CLUSTER_CIDR]);
        }
        cmd.arg("--nodes-file")
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
        if self.spec.dual_stack {
            cmd.args(["--cluster-cidr6", CLUSTER_CIDR6]);
        }
        // An IPv6-only node but the first finds its address on its own (the
        // underlay interface's first global IPv6 address).
        if let Some(ip6) = n.underlay_ip6
            && !(self.spec.ipv6_only && i > 0)
        {
            cmd.args(["--public-ipv6", &ip6.to_string()]);
        }
        cmd.envs(self.spec.agent_env.iter().map(|(k, v)| (k, v)));
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
        let mut conf = serde_json::json!({
            "cniVersion": version,
            "name": "weft",
            "type": "weft",
            "runDir": n.run_dir,
            "dataDir": n.run_dir.join("ipam"),
            "dns": {"nameservers": ["198.18.0.53"]},
        });
        if let Some(mode) = self.spec.tc_attach {
            conf["tcAttach"] = serde_json::json!(mode);
        }
        conf
    }

    /// Whether node `i`'s pod veth `host_if` has weft's (ingress, egress)
    /// programs: as pinned TCX links, or as weft's netlink filters.
    pub fn pod_programs(&self, i: usize, host_if: &str) -> (bool, bool) {
        let n = &self.nodes[i];
        let on = |pins: &str, dir: &str, prog: &str| {
            n.bpffs.join(pins).join(host_if).exists()
                || String::from_utf8_lossy(
                    &n.ns
                        .try_sh("tc", &["filter", "show", "dev", host_if, dir])
                        .stdout,
                )
                .contains(prog)
        };
        (
            on("pods", "ingress", "weft_from_pod"),
            on("pods_to", "egress", "weft_to_pod"),
        )
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
        let addresses: Vec<std::net::IpAddr> = result["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .map(|i| {
                let addr = i["address"].as_str().expect("an address");
                addr.split('/')
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("an IP address")
            })
            .collect();
        // IPv4 first; a dual-stack pod's IPv6 address second; an IPv6-only
        // pod's alone.
        let (ip, ip6) = match addresses[..] {
            [std::net::IpAddr::V4(ip)] => (ip, None),
            [std::net::IpAddr::V4(ip), std::net::IpAddr::V6(ip6)] => (ip, Some(ip6)),
            [std::net::IpAddr::V6(ip6)] => (Ipv4Addr::UNSPECIFIED, Some(ip6)),
            _ => panic!("CNI ADD result: {result}"),
        };
        assert_eq!(
            (ip.is_unspecified(), ip6.is_some()),
            (
                self.spec.ipv6_only,
                self.spec.dual_stack || self.spec.ipv6_only
            ),
            "CNI ADD result: {result}"
        );
        let pod = PodInfo {
            name: ns.name.clone(),
            ns,
            ip,
            ip6,
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
