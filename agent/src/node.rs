//! What the agent tells the CNI plugin and operators about this node, in
//! `<run-dir>/subnet.env` (default `/run/weft/subnet.env`), in the spirit of
//! flannel's `/run/flannel/subnet.env`:
//!
//! ```text
//! WEFT_NODE=node-1
//! WEFT_NETWORK=10.244.0.0/16      # cluster CIDR
//! WEFT_SUBNET=10.244.1.0/24       # this node's pod CIDR
//! WEFT_GATEWAY=10.244.1.1         # pods' default gateway (on weft0)
//! WEFT_MTU=1450                   # pod MTU: underlay MTU - 50
//! WEFT_BPFFS=/sys/fs/bpf/weft     # where the dataplane is pinned
//! WEFT_NETWORK6=2001:2::/48       # dual-stack only: the IPv6 cluster CIDR,
//! WEFT_SUBNET6=2001:2:0:1::/64    #   this node's IPv6 pod CIDR
//! WEFT_GATEWAY6=2001:2:0:1::1     #   and the pods' IPv6 gateway
//! ```
//!
//! An IPv6-only node has the `6` lines only.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use crate::cidr::{Cidr, Family};

/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/weft";
/// File name of the node config in the run directory.
pub const SUBNET_ENV: &str = "subnet.env";

/// This node's network facts, as written for the CNI plugin: one side per
/// family the node's pods have (at least one).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeConfig {
    pub node: String,
    /// The IPv4 side (none on an IPv6-only node).
    pub v4: Option<NodeV4>,
    pub mtu: u32,
    pub bpffs: PathBuf,
    /// The IPv6 side of a dual-stack or IPv6-only node.
    pub v6: Option<NodeV6>,
}

/// A node's side of one family: the cluster's network (the cluster
/// CIDR), the node's pod CIDR and the pods' gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(bound = "A: Family + serde::Serialize")]
pub struct NodeNet<A: Family> {
    pub network: Cidr<A>,
    pub subnet: Cidr<A>,
    pub gateway: A,
}

/// A node's IPv4 side.
pub type NodeV4 = NodeNet<Ipv4Addr>;
/// A node's IPv6 side.
pub type NodeV6 = NodeNet<Ipv6Addr>;

impl<A: Family> NodeNet<A>
where
    A::Err: std::fmt::Display,
{
    /// The side of a node with pod CIDR `subnet` in cluster `network`, when
    /// it has both; the gateway is the pod CIDR's first address.
    pub fn of(network: Option<Cidr<A>>, subnet: Option<Cidr<A>>) -> Option<Self> {
        let (network, subnet) = (network?, subnet?);
        Some(Self {
            network,
            subnet,
            gateway: NodeConfig::gateway_of(&subnet),
        })
    }

    /// The suffix of this family's keys: `WEFT_SUBNET`, `WEFT_SUBNET6`.
    fn suffix() -> &'static str {
        if A::BITS == 128 { "6" } else { "" }
    }

    fn render(&self, s: &mut String) {
        let x = Self::suffix();
        let _ = writeln!(s, "WEFT_NETWORK{x}={}", self.network);
        let _ = writeln!(s, "WEFT_SUBNET{x}={}", self.subnet);
        let _ = writeln!(s, "WEFT_GATEWAY{x}={}", self.gateway);
    }

    /// This family's side from `kv`, if it has its `WEFT_SUBNET…`.
    fn parse(kv: &BTreeMap<&str, &str>) -> Result<Option<Self>, String> {
        let x = Self::suffix();
        if !kv.contains_key(format!("WEFT_SUBNET{x}").as_str()) {
            return Ok(None);
        }
        fn get<T: std::str::FromStr>(kv: &BTreeMap<&str, &str>, key: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            kv.get(key)
                .ok_or_else(|| format!("{key} is missing"))?
                .parse()
                .map_err(|e| format!("{key}: {e}"))
        }
        Ok(Some(Self {
            network: get(kv, &format!("WEFT_NETWORK{x}"))?,
            subnet: get(kv, &format!("WEFT_SUBNET{x}"))?,
            gateway: get(kv, &format!("WEFT_GATEWAY{x}"))?,
        }))
    }
}

/// Errors reading the node config.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("{path} is missing: the weft agent has not configured this node yet (is it running?)")]
    Missing { path: String },
    #[error("{path}: {message}. The agent rewrites it on start; restart the agent")]
    Invalid { path: String, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl NodeConfig {
    /// The gateway of a pod CIDR: its first address.
    pub fn gateway_of<A: Family>(subnet: &Cidr<A>) -> A {
        subnet.nth(1).unwrap_or(subnet.addr())
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "WEFT_NODE={}", self.node);
        if let Some(v4) = &self.v4 {
            v4.render(&mut s);
        }
        let _ = writeln!(s, "WEFT_MTU={}", self.mtu);
        let _ = writeln!(s, "WEFT_BPFFS={}", self.bpffs.display());
        if let Some(v6) = &self.v6 {
            v6.render(&mut s);
        }
        s
    }

    /// Writes `subnet.env` atomically (temp file + rename).
    pub fn write(&self, run_dir: &Path) -> Result<(), NodeConfigError> {
        let path = run_dir.join(SUBNET_ENV);
        let werr = |source| NodeConfigError::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(run_dir).map_err(werr)?;
        let tmp = run_dir.join(format!(".{SUBNET_ENV}.tmp"));
        std::fs::write(&tmp, self.render()).map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)
    }

    pub fn read(run_dir: &Path) -> Result<Self, NodeConfigError> {
        let path = run_dir.join(SUBNET_ENV);
        let p = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|_| NodeConfigError::Missing { path: p.clone() })?;
        Self::parse(&text).map_err(|message| NodeConfigError::Invalid { path: p, message })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let kv: BTreeMap<&str, &str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |k: &str| kv.get(k).copied().ok_or_else(|| format!("{k} is missing"));
        if !kv.contains_key("WEFT_SUBNET") && !kv.contains_key("WEFT_SUBNET6") {
            return Err("WEFT_SUBNET (and WEFT_SUBNET6) is missing".into());
        }
        Ok(Self {
            node: get("WEFT_NODE")?.to_string(),
            v4: NodeV4::parse(&kv)?,
            mtu: get("WEFT_MTU")?
                .parse()
                .map_err(|e| format!("WEFT_MTU: {e}"))?,
            bpffs: PathBuf::from(get("WEFT_BPFFS")?),
            v6: NodeV6::parse(&kv)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = NodeConfig {
            node: "n1".into(),
            v4: Some(NodeV4 {
                network: "198.19.0.0/16".parse().unwrap(),
                subnet: "198.19.1.0/24".parse().unwrap(),
                gateway: "198.19.1.1".parse().unwrap(),
            }),
            mtu: 1450,
            bpffs: "/sys/fs/bpf/weft".into(),
            v6: None,
        };
        assert_eq!(NodeConfig::parse(&c.render()).unwrap(), c);
        let dual = NodeConfig {
            v6: Some(NodeV6 {
                network: "2001:2::/48".parse().unwrap(),
                subnet: "2001:2:0:1::/64".parse().unwrap(),
                gateway: "2001:2:0:1::1".parse().unwrap(),
            }),
            ..c.clone()
        };
        assert_eq!(NodeConfig::parse(&dual.render()).unwrap(), dual);
        let v6_only = NodeConfig {
            v4: None,
            ..dual.clone()
        };
        assert!(!v6_only.render().contains("WEFT_SUBNET="));
        assert_eq!(NodeConfig::parse(&v6_only.render()).unwrap(), v6_only);
        let half = dual.render().replace("WEFT_GATEWAY6", "# WEFT_GATEWAY6");
        assert!(
            NodeConfig::parse(&half)
                .unwrap_err()
                .contains("WEFT_GATEWAY6")
        );
        assert!(
            NodeConfig::parse("WEFT_NODE=x\n")
                .unwrap_err()
                .contains("WEFT_SUBNET")
        );
        assert!(
            NodeConfig::parse("WEFT_NODE=x\nWEFT_SUBNET=198.19.1.0/24\n")
                .unwrap_err()
                .contains("WEFT_NETWORK")
        );
    }
}
