//! Agent settings: flags override the TOML config file, which overrides the
//! defaults (flannel's where a flannel user would look for them).
//!
//! ```toml
//! # /etc/weft/agent.toml — every key optional, same names as the flags
//! node-name = "node-1"
//! iface = "eth0"              # or iface-regex = "^en", or neither: default route
//! public-ip = "192.0.2.1"
//! public-ipv6 = "2001:db8::1" # with cluster-cidr6: IPv6 pods' VXLAN over IPv6 (flannel-v6.1)
//! registry = "file"           # or "kube"
//! nodes-file = "/etc/weft/nodes.toml"
//! kubeconfig = "/etc/weft/kubeconfig"
//! cluster-cidr = "10.244.0.0/16"
//! cluster-cidr6 = "fd00:10:244::/56"  # dual-stack (or, with enable-ipv4 = false, IPv6-only)
//! enable-ipv4 = true          # false: an IPv6-only cluster (flannel's EnableIPv4)
//! vni = 1
//! port = 8472
//! bpffs-dir = "/sys/fs/bpf/weft"
//! run-dir = "/run/weft"
//! metrics-addr = "127.0.0.1:9807"
//! stats-interval = 0
//! decap = "auto"             # or "xdp", "tc"
//! ip-masq = true             # masquerade pods' traffic leaving the cluster
//! read-cni-conf = "/etc/weft/10-weft.conflist"                 # installed, once ready,
//! write-cni-conf-when-ready = "/etc/cni/net.d/10-weft.conflist" # here (crate::cniconf)
//! flannel-compat = false     # kube registry: also speak flannel's annotations (docs/MIGRATION.md)
//! flannel-annotation-prefix = "flannel.alpha.coreos.com"  # flanneld's --kube-annotation-prefix
//! flannel-ipam-dir = "/var/lib/cni/networks/cbr0"         # flannel's pods' addresses (host-local)
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    cidr::{ClusterCidrs, Ipv4Cidr, Ipv6Cidr},
    registry::file::toml_error,
};
use std::time::Duration;

/// Default config file; read when it exists and `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/weft/agent.toml";

/// Where the node registry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RegistryKind {
    /// A TOML file listing the nodes (no cluster needed).
    File,
    /// Node objects of the Kubernetes API.
    Kube,
}

/// Where VXLAN from other nodes is decapsulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DecapMode {
    /// `tc` when the underlay is a veth (or has no native XDP), else `xdp`
    /// (the default).
    Auto,
    /// XDP on the underlay; frames for pods are redirected into their veths.
    /// Best with a NIC driver that runs XDP natively.
    #[serde(alias = "xdp-redirect")]
    #[value(alias = "xdp-redirect")]
    Xdp,
    /// TC ingress on the underlay; frames for pods enter them with
    /// `bpf_redirect_peer`. Keeps GSO: on a veth underlay (nested or
    /// container-based clusters) XDP would make the peer segment and the
    /// driver copy every frame.
    Tc,
}

/// Every agent setting, each optional: from flags or from the file.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentSettings {
    /// This node's name in the registry [default: the host name].
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface [default: the interface of the default route].
    #[arg(long)]
    pub iface: Option<String>,
    /// Pick the first interface (with an IPv4 address) whose name matches this regex.
    #[arg(long, conflicts_with = "iface")]
    pub iface_regex: Option<String>,
    /// Underlay address to use instead of the interface's first IPv4 address.
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address (flannel's --public-ipv6): with
    /// --cluster-cidr6, IPv6 pods' VXLAN goes over IPv6 to and from nodes
    /// that have one too, as flannel's `flannel-v6.1` [default: none, IPv6
    /// pods over the IPv4 underlay].
    #[arg(long)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Node registry [default: file].
    #[arg(long, value_enum)]
    pub registry: Option<RegistryKind>,
    /// TOML file of the `file` registry [default: /etc/weft/nodes.toml].
    #[arg(long)]
    pub nodes_file: Option<PathBuf>,
    /// kubeconfig for the `kube` registry [default: in-cluster, then $KUBECONFIG].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Cluster CIDR: every pod address lies in it [default: 10.244.0.0/16].
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// IPv6 cluster CIDR, for a dual-stack cluster: pods get an address of
    /// each family (nodes' IPv6 pod CIDRs lie in it) [default: none, IPv4 only].
    #[arg(long)]
    pub cluster_cidr6: Option<Ipv6Cidr>,
    /// IPv4 pods (flannel's EnableIPv4); `--enable-ipv4=false`, with
    /// --cluster-cidr6, for an IPv6-only cluster: pods get an IPv6 address
    /// only, the node needs no IPv4 address, and its IPv6 underlay address
    /// is --public-ipv6 or else the underlay interface's first global one
    /// [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_ipv4: Option<bool>,
    /// VXLAN network identifier [default: 1, as flannel].
    #[arg(long)]
    pub vni: Option<u32>,
    /// VXLAN UDP port [default: 8472, as flannel; IANA's is 4789].
    #[arg(long)]
    pub port: Option<u16>,
    /// bpffs directory for pinned maps, programs and links [default: /sys/fs/bpf/weft].
    #[arg(long, env = "WEFT_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// Directory for subnet.env, read by the CNI plugin [default: /run/weft].
    #[arg(long, env = "WEFT_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Address of the /metrics, /healthz and /readyz endpoint [default: 127.0.0.1:9807].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Print counters every N seconds; 0 never [default: 0].
    #[arg(long)]
    pub stats_interval: Option<u64>,
    /// Where VXLAN is decapsulated: XDP or TC [default: auto].
    #[arg(long, value_enum, env = "WEFT_DECAP")]
    pub decap: Option<DecapMode>,
    /// Masquerade pods' traffic leaving the cluster CIDR behind the node's
    /// address, as flannel's --ip-masq (iptables, nat table); `--ip-masq=false`
    /// to leave that to something else [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_masq: Option<bool>,
    /// A CNI conflist to install once the node's dataplane is ready (see
    /// --write-cni-conf-when-ready).
    #[arg(long)]
    pub read_cni_conf: Option<PathBuf>,
    /// Install --read-cni-conf's conflist here once the dataplane is ready,
    /// and put it back if it is removed: the runtime then reports the node's
    /// network ready only when weft can wire pods (Cilium's option of the
    /// same name) [default: none; the DaemonSet sets it].
    #[arg(long)]
    pub write_cni_conf_when_ready: Option<PathBuf>,
    /// Run in a cluster that still has flannel (vxlan backend, kube subnet
    /// manager) nodes: read flannel's Node annotations for those nodes and
    /// publish them for this one, and take over what flannel left on this
    /// node (docs/MIGRATION.md). Needs the `kube` registry [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub flannel_compat: Option<bool>,
    /// flanneld's --kube-annotation-prefix [default: flannel.alpha.coreos.com].
    #[arg(long)]
    pub flannel_annotation_prefix: Option<String>,
    /// Where flannel's CNI (host-local IPAM) recorded its pods' addresses on
    /// this node; with flannel-compat they are reserved in weft's IPAM, so
    /// pods flannel wired keep running with their addresses
    /// [default: /var/lib/cni/networks/cbr0].
    #[arg(long)]
    pub flannel_ipam_dir: Option<PathBuf>,
}

/// Everything the agent needs to run, with defaults applied.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub iface: Option<String>,
    pub iface_regex: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub registry: RegistryKind,
    pub nodes_file: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    /// None in an IPv6-only cluster (`enable-ipv4 = false`).
    pub cluster_cidr: Option<Ipv4Cidr>,
    pub cluster_cidr6: Option<Ipv6Cidr>,
    pub vni: u32,
    pub port: u16,
    pub bpffs_dir: PathBuf,
    pub run_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    pub stats_interval: Option<Duration>,
    /// Compile the programs' debug logging in (when the agent logs at debug).
    pub bpf_debug_log: bool,
    pub decap: DecapMode,
    /// Masquerade pods' traffic leaving the cluster CIDR (crate::masq).
    pub ip_masq: bool,
    /// The conflist to install once ready: (source, destination).
    pub read_cni_conf: Option<PathBuf>,
    pub write_cni_conf_when_ready: Option<PathBuf>,
    /// flannel-compat: flannel's annotation keys (none: off).
    pub flannel: Option<FlannelSettings>,
}

/// What `flannel-compat` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlannelSettings {
    pub keys: crate::registry::flannel::Keys,
    /// flannel's host-local store of this node's pod addresses.
    pub ipam_dir: PathBuf,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "flannel-compat needs registry = \"kube\": flannel's nodes are known only from their Node annotations"
    )]
    FlannelNeedsKube,
    #[error("{0}")]
    FlannelPrefix(String),
    #[error(
        "public-ipv6 is set but cluster-cidr6 is not: the IPv6 underlay carries IPv6 pods; set cluster-cidr6 too (or drop public-ipv6)"
    )]
    Ipv6UnderlayWithoutPods,
    #[error("public-ipv6: {0}")]
    PublicIpv6(String),
    #[error(
        "enable-ipv4 = false makes an IPv6-only cluster: it needs cluster-cidr6 (the pods' IPv6 network); set it"
    )]
    Ipv6OnlyIncomplete,
    #[error(
        "enable-ipv4 = false with cluster-cidr set: an IPv6-only cluster has no IPv4 pods; drop cluster-cidr (or enable-ipv4 = false)"
    )]
    Ipv6OnlyWithIpv4Cidr,
    #[error(
        "flannel-compat runs with IPv4 (flannel's IPv4 annotations name each node); it does not take an IPv6-only cluster (enable-ipv4 = false)"
    )]
    FlannelNeedsIpv4,
}

impl AgentConfig {
    /// The cluster's pod networks, both families.
    pub fn clusters(&self) -> ClusterCidrs {
        ClusterCidrs {
            v4: self.cluster_cidr,
            v6: self.cluster_cidr6,
        }
    }

    /// Applies the defaults to settings merged from flags and file.
    pub fn from_settings(
        s: AgentSettings,
        hostname: impl FnOnce() -> String,
    ) -> Result<Self, SettingsError> {
        let registry = s.registry.unwrap_or(RegistryKind::File);
        let flannel = match s.flannel_compat {
            Some(true) => {
                if registry != RegistryKind::Kube {
                    return Err(SettingsError::FlannelNeedsKube);
                }
                let prefix = s
                    .flannel_annotation_prefix
                    .as_deref()
                    .unwrap_or(crate::registry::flannel::DEFAULT_PREFIX);
                Some(FlannelSettings {
                    keys: crate::registry::flannel::Keys::new(prefix)
                        .map_err(SettingsError::FlannelPrefix)?,
                    ipam_dir: s
                        .flannel_ipam_dir
                        .unwrap_or_else(|| "/var/lib/cni/networks/cbr0".into()),
                })
            }
            _ => None,
        };
        let ipv4 = s.enable_ipv4.unwrap_or(true);
        if !ipv4 {
            if s.cluster_cidr6.is_none() {
                return Err(SettingsError::Ipv6OnlyIncomplete);
            }
            if s.cluster_cidr.is_some() {
                return Err(SettingsError::Ipv6OnlyWithIpv4Cidr);
            }
            if flannel.is_some() {
                return Err(SettingsError::FlannelNeedsIpv4);
            }
        }
        let public_ipv6 = match s.public_ipv6 {
            Some(_) if s.cluster_cidr6.is_none() => {
                return Err(SettingsError::Ipv6UnderlayWithoutPods);
            }
            Some(ip) => {
                Some(crate::registry::Underlay6::check_ip(ip).map_err(SettingsError::PublicIpv6)?)
            }
            None => None,
        };
        Ok(Self {
            node_name: s.node_name.unwrap_or_else(hostname),
            iface: s.iface,
            iface_regex: s.iface_regex,
            public_ip: s.public_ip,
            public_ipv6,
            registry,
            nodes_file: s
                .nodes_file
                .unwrap_or_else(|| "/etc/weft/nodes.toml".into()),
            kubeconfig: s.kubeconfig,
            cluster_cidr: ipv4.then(|| {
                s.cluster_cidr
                    .unwrap_or_else(|| Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16))
            }),
            cluster_cidr6: s.cluster_cidr6,
            vni: s.vni.unwrap_or(1),
            port: s.port.unwrap_or(8472),
            bpffs_dir: s
                .bpffs_dir
                .unwrap_or_else(|| crate::dataplane::DEFAULT_BPFFS_DIR.into()),
            run_dir: s
                .run_dir
                .unwrap_or_else(|| crate::node::DEFAULT_RUN_DIR.into()),
            metrics_addr: s
                .metrics_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9807))),
            stats_interval: s.stats_interval.filter(|n| *n > 0).map(Duration::from_secs),
            bpf_debug_log: false,
            decap: s.decap.unwrap_or(DecapMode::Auto),
            ip_masq: s.ip_masq.unwrap_or(true),
            read_cni_conf: s.read_cni_conf,
            write_cni_conf_when_ready: s.write_cni_conf_when_ready,
            flannel,
        })
    }
}

/// Errors reading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
}

impl AgentSettings {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: toml_error(&text, &e),
        })
    }

    /// `self` (flags) over `file`: a flag given wins, else the file's value.
    pub fn over(self, file: Self) -> Self {
        Self {
            node_name: self.node_name.or(file.node_name),
            iface: self.iface.or(file.iface),
            iface_regex: self.iface_regex.or(file.iface_regex),
            public_ip: self.public_ip.or(file.public_ip),
            public_ipv6: self.public_ipv6.or(file.public_ipv6),
            registry: self.registry.or(file.registry),
            nodes_file: self.nodes_file.or(file.nodes_file),
            kubeconfig: self.kubeconfig.or(file.kubeconfig),
            cluster_cidr: self.cluster_cidr.or(file.cluster_cidr),
            cluster_cidr6: self.cluster_cidr6.or(file.cluster_cidr6),
            enable_ipv4: self.enable_ipv4.or(file.enable_ipv4),
            vni: self.vni.or(file.vni),
            port: self.port.or(file.port),
            bpffs_dir: self.bpffs_dir.or(file.bpffs_dir),
            run_dir: self.run_dir.or(file.run_dir),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            stats_interval: self.stats_interval.or(file.stats_interval),
            decap: self.decap.or(file.decap),
            ip_masq: self.ip_masq.or(file.ip_masq),
            read_cni_conf: self.read_cni_conf.or(file.read_cni_conf),
            write_cni_conf_when_ready: self
                .write_cni_conf_when_ready
                .or(file.write_cni_conf_when_ready),
            flannel_compat: self.flannel_compat.or(file.flannel_compat),
            flannel_annotation_prefix: self
                .flannel_annotation_prefix
                .or(file.flannel_annotation_prefix),
            flannel_ipam_dir: self.flannel_ipam_dir.or(file.flannel_ipam_dir),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file: AgentSettings = toml::from_str(
            "vni = 7\nport = 4789\ncluster-cidr = \"198.19.0.0/16\"\ncluster-cidr6 = \"2001:2::/48\"\nregistry = \"kube\"\nip-masq = false\n",
        )
        .unwrap();
        let flags = AgentSettings {
            vni: Some(9),
            ..Default::default()
        };
        let s = flags.over(file);
        assert_eq!(s.vni, Some(9));
        assert_eq!(s.port, Some(4789));
        assert_eq!(s.registry, Some(RegistryKind::Kube));
        assert_eq!(s.cluster_cidr.unwrap().to_string(), "198.19.0.0/16");
        assert_eq!(s.cluster_cidr6.unwrap().to_string(), "2001:2::/48");
        assert_eq!(s.iface, None);
        assert_eq!(s.ip_masq, Some(false));
    }

    #[test]
    fn flannel_compat_needs_the_kube_registry_and_a_valid_prefix() {
        let host = || "h".to_string();
        let on = |extra: &str| {
            let s: AgentSettings =
                toml::from_str(&format!("flannel-compat = true\n{extra}")).unwrap();
            AgentConfig::from_settings(s, host)
        };
        assert!(matches!(on(""), Err(SettingsError::FlannelNeedsKube)));
        let c = on("registry = \"kube\"\n").unwrap();
        let f = c.flannel.unwrap();
        assert_eq!(
            f.keys.managed,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        assert_eq!(f.ipam_dir, PathBuf::from("/var/lib/cni/networks/cbr0"));
        let e = on("registry = \"kube\"\nflannel-annotation-prefix = \"a/b/c\"\n").unwrap_err();
        assert!(e.to_string().contains("more than one `/`"), "{e}");
        let off: AgentSettings = toml::from_str("registry = \"kube\"\n").unwrap();
        assert_eq!(AgentConfig::from_settings(off, host).unwrap().flannel, None);
    }

    #[test]
    fn ipv6_only_needs_an_ipv6_cluster_and_no_ipv4_one() {
        let host = || "h".to_string();
        let with = |text: &str| {
            let s: AgentSettings = toml::from_str(text).unwrap();
            AgentConfig::from_settings(s, host)
        };
        let ok = with("enable-ipv4 = false\ncluster-cidr6 = \"2001:2::/48\"\n").unwrap();
        assert_eq!((ok.cluster_cidr, ok.public_ipv6), (None, None));
        assert_eq!(ok.clusters().to_string(), "2001:2::/48");
        assert!(matches!(
            with("enable-ipv4 = false\n"),
            Err(SettingsError::Ipv6OnlyIncomplete)
        ));
        assert!(matches!(
            with(
                "enable-ipv4 = false\ncluster-cidr6 = \"2001:2::/48\"\ncluster-cidr = \"198.19.0.0/16\"\n"
            ),
            Err(SettingsError::Ipv6OnlyWithIpv4Cidr)
        ));
        assert!(matches!(
            with(
                "enable-ipv4 = false\ncluster-cidr6 = \"2001:2::/48\"\nregistry = \"kube\"\nflannel-compat = true\n"
            ),
            Err(SettingsError::FlannelNeedsIpv4)
        ));
        // The default stays IPv4 with flannel's CIDR.
        let v4 = with("").unwrap();
        assert_eq!(v4.clusters().to_string(), "10.244.0.0/16");
    }

    #[test]
    fn toml_errors_name_the_line() {
        let text = "vni = 7\n\nport = \"x\"\n";
        let e = toml::from_str::<AgentSettings>(text).unwrap_err();
        let m = toml_error(text, &e);
        assert!(m.starts_with("line 3: "), "{m}");
        assert!(!m.contains('\n'), "one line: {m}");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = toml::from_str::<AgentSettings>("vnii = 7\n")
            .unwrap_err()
            .message()
            .to_string();
        assert!(e.contains("vnii"), "{e}");
        let e = toml::from_str::<AgentSettings>("cluster-cidr = \"10.0.0.1/8\"\n")
            .unwrap_err()
            .message()
            .to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
    }
}
