//! The CNI plugin (`weft-cni`, `"type": "weft"` in a conflist): CNI spec
//! 1.1.0, also answering 0.3.x, 0.4.0 and 1.0.0 callers.
//!
//! ADD wires the pod through [`crate::endpoint`] (the path the tests and the
//! demo use too) with an address from [`ipam`]; DEL undoes it idempotently;
//! CHECK reports drift; STATUS says whether the agent has configured the
//! node; GC releases what the runtime no longer knows; VERSION lists the
//! versions. Errors are the spec's JSON on stdout with a non-zero exit.
//!
//! Network configuration keys beyond the standard ones:
//! - `runDir`: where the agent's `subnet.env` is (default `/run/weft`);
//! - `dataDir`: IPAM store root (default `/var/lib/weft/ipam`; the network
//!   name is appended);
//! - `tcAttach`: how the pod's programs go on its veth — `auto` (the
//!   default: weft's netlink filters, which cost no RCU grace period, or TCX
//!   links for a pod whose egress the `bandwidth` plugin limits), `tcx`
//!   (always TCX links, Linux 6.6+), `netlink`.

pub mod conflist;
pub mod ipam;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    cidr::Family,
    dataplane::{Maps, TcMode, ip_key},
    endpoint::{self, EndpointSpec},
    host::netdev,
    node::NodeConfig,
};

/// The IPAM store root when the configuration gives no `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft/ipam";

/// Versions this plugin answers.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version it speaks natively.
pub const VERSION: &str = "1.1.0";

/// Well-known error codes (CNI spec, "Error codes").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: the node's pod CIDR has no free address.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// Plugin-specific: CHECK found the pod's networking not as ADD left it.
    pub const DRIFT: u32 = 101;
}

/// A CNI error: printed as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The network configuration on stdin.
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    dns: Option<Value>,
    #[serde(rename = "runDir")]
    run_dir: Option<PathBuf>,
    #[serde(rename = "dataDir")]
    data_dir: Option<PathBuf>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    /// What the runtime passes for the capabilities the conflist gives weft;
    /// weft reads `bandwidth` (see [`NetConf::shaped`]).
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<Value>,
    #[serde(rename = "tcAttach", default)]
    tc_attach: TcAttach,
}

/// `tcAttach`: how pods' programs are attached (see the module docs).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum TcAttach {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl NetConf {
    /// Whether the runtime passed a bandwidth limit (the `bandwidth`
    /// capability: `ingressRate`/`egressRate` in bit/s, 0 or absent for
    /// none), which the `bandwidth` plugin chained after weft applies on the
    /// pod's veth. Egress limits need TCX (`tcx`): the plugin's `ingress`
    /// qdisc cannot join the `clsact` weft uses without it, so the pod's ADD
    /// fails here, saying why, rather than in the plugin with "file exists".
    fn shaped(&self, tcx: bool) -> Result<bool, CniError> {
        let limited = |k: &str| self.limited(k);
        if limited("egressRate") && !tcx {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "runtimeConfig.bandwidth.egressRate: egress bandwidth limits need Linux 6.6 or newer with weft",
                "without TCX weft's programs sit in a clsact qdisc on the pod's veth, and the bandwidth plugin's ingress qdisc cannot be added next to it; drop the pod's kubernetes.io/egress-bandwidth (ingress limits work) or upgrade the node's kernel",
            ));
        }
        Ok(limited("ingressRate") || limited("egressRate"))
    }

    /// Whether the runtime passed a nonzero `bandwidth` limit `key`
    /// (`ingressRate`, `egressRate`).
    fn limited(&self, key: &str) -> bool {
        self.runtime_config
            .as_ref()
            .is_some_and(|r| r["bandwidth"][key].as_u64().is_some_and(|r| r > 0))
    }

    /// How this pod's programs are attached; an error where `tcAttach`
    /// asks for what cannot work.
    fn tc_mode(&self, tcx: bool) -> Result<TcMode, CniError> {
        let egress = self.limited("egressRate");
        match self.tc_attach {
            TcAttach::Auto => Ok(TcMode::pod(egress)),
            TcAttach::Tcx if tcx => Ok(TcMode::Tcx),
            TcAttach::Tcx => Err(CniError::new(
                code::INVALID_CONFIG,
                "tcAttach \"tcx\" needs Linux 6.6 or newer",
                "this kernel has no TCX links; remove tcAttach (or set it to \"auto\")",
            )),
            TcAttach::Netlink if egress => Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "runtimeConfig.bandwidth.egressRate with tcAttach \"netlink\"",
                "weft's netlink filters sit in a clsact qdisc, which leaves no room for the bandwidth plugin's ingress qdisc; use tcAttach \"auto\" (or \"tcx\")",
            )),
            TcAttach::Netlink => Ok(TcMode::Netlink),
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| crate::node::DEFAULT_RUN_DIR.into())
    }

    /// The IPAM store of this network's IPv4 addresses on this node (none
    /// on an IPv6-only node).
    fn ipam(&self, node: &NodeConfig) -> Option<ipam::Ipam<Ipv4Addr>> {
        let v4 = node.v4?;
        Some(ipam::Ipam::new(self.ipam_dir(), v4.subnet, v4.gateway))
    }

    /// The IPv6 store, on a dual-stack or IPv6-only node: `v6/` in the
    /// IPv4 one.
    fn ipam6(&self, node: &NodeConfig) -> Option<ipam::Ipam<Ipv6Addr>> {
        let v6 = node.v6?;
        Some(ipam::Ipam::new(
            self.ipam_dir().join("v6"),
            v6.subnet,
            v6.gateway,
        ))
    }

    fn ipam_dir(&self) -> PathBuf {
        let root = self
            .data_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        root.join(&self.name)
    }
}

/// One invocation: the CNI_* environment and stdin.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub env: HashMap<String, String>,
    pub stdin: String,
}

/// Runs one invocation; `Ok` is what to print (possibly nothing).
pub fn run(inv: &Invocation) -> Result<Option<Value>, (CniError, String)> {
    let command = inv.env.get("CNI_COMMAND").cloned().unwrap_or_default();
    if command == "VERSION" {
        let asked = serde_json::from_str::<Value>(&inv.stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(String::from))
            .unwrap_or_else(|| VERSION.into());
        return Ok(Some(
            json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf: NetConf = serde_json::from_str(&inv.stdin).map_err(|e| {
        (
            CniError::new(
                code::DECODE,
                "the network configuration on stdin is not valid JSON for weft",
                e.to_string(),
            ),
            VERSION.to_string(),
        )
    })?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (e, version.clone());
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(fail(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        )));
    }
    if conf.kind != "weft" {
        return Err(fail(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "this is the weft plugin, but the configuration's type is `{}`",
                conf.kind
            ),
            "",
        )));
    }
    let env = |k: &str| inv.env.get(k).filter(|v| !v.is_empty()).cloned();
    let need = |k: &str| {
        env(k).ok_or_else(|| {
            fail(CniError::new(
                code::INVALID_ENV,
                format!("{k} is not set"),
                format!("CNI_COMMAND={command} needs {k}"),
            ))
        })
    };
    match command.as_str() {
        "ADD" => add(
            &conf,
            &need("CNI_CONTAINERID")?,
            &need("CNI_IFNAME")?,
            &need("CNI_NETNS")?,
        )
        .map(Some)
        .map_err(fail),
        "DEL" => del(&conf, &need("CNI_CONTAINERID")?, &need("CNI_IFNAME")?)
            .map(|()| None)
            .map_err(fail),
        "CHECK" => check(
            &conf,
            &need("CNI_CONTAINERID")?,
            &need("CNI_IFNAME")?,
            &need("CNI_NETNS")?,
        )
        .map(|()| None)
        .map_err(fail),
        "STATUS" => status(&conf).map(|()| None).map_err(fail),
        "GC" => gc(&conf).map(|()| None).map_err(fail),
        "" => Err(fail(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "run by a container runtime: CNI_COMMAND=ADD|DEL|CHECK|STATUS|GC|VERSION",
        ))),
        other => Err(fail(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND `{other}`"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        ))),
    }
}

fn node_config(conf: &NetConf) -> Result<NodeConfig, CniError> {
    NodeConfig::read(&conf.run_dir()).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the weft agent has not configured this node yet",
            e.to_string(),
        )
    })
}

fn ipam_err(e: ipam::IpamError) -> CniError {
    match e {
        ipam::IpamError::Exhausted(_) => CniError::new(
            code::POOL_EXHAUSTED,
            "no free pod address on this node",
            e.to_string(),
        ),
        ipam::IpamError::Io { .. } => {
            CniError::new(code::IO, "the IPAM store could not be used", e.to_string())
        }
    }
}

/// `op` on `store`, locked, when this node has that store (one per
/// family its pods have); `None` when it has not.
fn in_store<A: Family, T>(
    store: &Option<ipam::Ipam<A>>,
    op: impl FnOnce(&ipam::Locked<'_, A>) -> Result<T, ipam::IpamError>,
) -> Result<Option<T>, CniError> {
    store
        .as_ref()
        .map(|s| s.lock().and_then(|l| op(&l)))
        .transpose()
        .map_err(ipam_err)
}

fn add(conf: &NetConf, id: &str, ifname: &str, netns: &str) -> Result<Value, CniError> {
    let node = node_config(conf)?;
    let shaped = conf.shaped(crate::dataplane::has_tcx())?;
    if !Path::new(netns).exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {netns} does not exist"),
            "the container may be gone",
        ));
    }
    let ipam = conf.ipam(&node);
    let ipam6 = conf.ipam6(&node);
    // Gives back what was allocated, when the ADD fails after it.
    let release = || {
        let _ = in_store(&ipam, |l| l.release(id, ifname));
        let _ = in_store(&ipam6, |l| l.release(id, ifname));
    };
    let ip = in_store(&ipam, |l| l.allocate(id, ifname))?;
    let ip6 = in_store(&ipam6, |l| l.allocate(id, ifname)).inspect_err(|_| release())?;
    let spec = EndpointSpec {
        netns: netns.into(),
        ifname: ifname.into(),
        host_ifname: endpoint::host_ifname(id, ifname),
        ip,
        ip6,
        shaped,
        tc: conf.tc_mode(crate::dataplane::has_tcx())?,
    };
    let attached = match endpoint::add(&spec, &node) {
        Ok(a) => a,
        Err(e) => {
            // Nothing half-built stays: endpoint::add cleaned its part; give the addresses back.
            release();
            return Err(CniError::new(
                code::IO,
                format!("setting up {ifname} in {netns}"),
                e.to_string(),
            ));
        }
    };
    Ok(result(
        &conf.cni_version,
        conf.dns.clone(),
        &attached,
        ifname,
        netns,
        &pod_addresses(&node, ip, ip6),
    ))
}

/// A pod's address of one family, with its prefix length (32 or 128) and
/// its gateway.
#[derive(Clone, Copy, Debug)]
struct PodAddress {
    ip: IpAddr,
    prefix: u8,
    gateway: IpAddr,
}

impl PodAddress {
    fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix)
    }

    fn default_route(&self) -> &'static str {
        if self.ip.is_ipv4() {
            "0.0.0.0/0"
        } else {
            "::/0"
        }
    }
}

/// The pod's addresses (IPv4 first) with their gateways on `node`.
fn pod_addresses(
    node: &NodeConfig,
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
) -> Vec<PodAddress> {
    let v4 = ip.zip(node.v4).map(|(ip, v4)| PodAddress {
        ip: IpAddr::V4(ip),
        prefix: 32,
        gateway: IpAddr::V4(v4.gateway),
    });
    let v6 = ip6.zip(node.v6).map(|(ip6, v6)| PodAddress {
        ip: IpAddr::V6(ip6),
        prefix: 128,
        gateway: IpAddr::V6(v6.gateway),
    });
    v4.into_iter().chain(v6).collect()
}

/// The ADD result in the caller's version.
fn result(
    version: &str,
    dns: Option<Value>,
    a: &endpoint::Attached,
    ifname: &str,
    netns: &str,
    addresses: &[PodAddress],
) -> Value {
    let mut ips = vec![];
    let mut routes = vec![];
    for p in addresses {
        let mut ipc =
            json!({"address": p.cidr(), "gateway": p.gateway.to_string(), "interface": 1});
        if version.starts_with("0.") {
            ipc["version"] = json!(if p.ip.is_ipv4() { "4" } else { "6" });
        }
        ips.push(ipc);
        routes.push(json!({"dst": p.default_route(), "gw": p.gateway.to_string()}));
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.host_ifname, "mac": netdev::mac_to_string(&a.host_mac)},
            {"name": ifname, "mac": netdev::mac_to_string(&a.pod_mac), "sandbox": netns},
        ],
        "ips": ips,
        "routes": routes,
        "dns": dns.unwrap_or_else(|| json!({})),
    })
}

fn del(conf: &NetConf, id: &str, ifname: &str) -> Result<(), CniError> {
    let host = endpoint::host_ifname(id, ifname);
    match node_config(conf) {
        Ok(node) => {
            let ip = in_store(&conf.ipam(&node), |l| l.release(id, ifname))?.flatten();
            let ip6 = in_store(&conf.ipam6(&node), |l| l.release(id, ifname))?.flatten();
            let ips: Vec<IpAddr> = ip
                .map(IpAddr::V4)
                .into_iter()
                .chain(ip6.map(IpAddr::V6))
                .collect();
            endpoint::del(&host, &ips, &node)
                .map_err(|e| CniError::new(code::IO, format!("removing {host}"), e.to_string()))
        }
        // No agent configuration (e.g. weft removed): still remove the veth.
        Err(_) => endpoint::delete_link(&host)
            .map_err(|e| CniError::new(code::IO, format!("removing {host}"), e.to_string())),
    }
}

fn check(conf: &NetConf, id: &str, ifname: &str, netns: &str) -> Result<(), CniError> {
    let node = node_config(conf)?;
    let drift = |what: String| {
        CniError::new(
            code::DRIFT,
            "the pod's networking is not as ADD left it",
            what,
        )
    };
    let host = endpoint::host_ifname(id, ifname);
    let ip = in_store(&conf.ipam(&node), |l| l.find(id, ifname))?
        .map(|f| f.ok_or_else(|| drift(format!("no address is allocated to {id}/{ifname}"))))
        .transpose()?;
    let ip6 = in_store(&conf.ipam6(&node), |l| l.find(id, ifname))?
        .map(|f| f.ok_or_else(|| drift(format!("no IPv6 address is allocated to {id}/{ifname}"))))
        .transpose()?;
    let addresses = pod_addresses(&node, ip, ip6);
    if let Some(prev) = &conf.prev_result {
        for p in &addresses {
            let want = p.cidr();
            if !prev["ips"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|i| i["address"] == want.as_str()))
            {
                return Err(drift(format!("prevResult does not list {want}")));
            }
        }
    }
    let host_if = netdev::get(&host).map_err(|e| drift(format!("host-side veth: {e}")))?;
    // What the pod's side lacks, read from a thread inside its namespace.
    let missing = crate::host::netns::run_in(Path::new(netns), || {
        let mut nl = crate::host::netlink::Netlink::open()?;
        let Some(eth) = nl.link(ifname)? else {
            return Ok::<_, crate::host::netlink::NetlinkError>(Some(format!(
                "{netns} has no {ifname}"
            )));
        };
        let have = nl.addresses()?;
        for p in &addresses {
            if !have
                .iter()
                .any(|(i, a, l)| *i == eth.index && *a == p.ip && *l == p.prefix)
            {
                return Ok(Some(format!("{ifname} does not have {}", p.cidr())));
            }
            let via_gw = nl
                .routes(p.ip.is_ipv4())?
                .iter()
                .any(|r| r.prefix == 0 && r.gateway == Some(p.gateway) && r.oif == Some(eth.index));
            if !via_gw {
                return Ok(Some(format!(
                    "no default route via {} in the pod (for {})",
                    p.gateway,
                    p.cidr()
                )));
            }
        }
        Ok(None)
    })
    .map_err(|e| drift(format!("{ifname} in {netns}: {e}")))?
    .map_err(|e| drift(format!("{ifname} in {netns}: {e}")))?;
    if let Some(what) = missing {
        return Err(drift(what));
    }
    let maps = Maps::open(&node.bpffs).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            "the dataplane is not loaded",
            e.to_string(),
        )
    })?;
    for p in &addresses {
        let ep = match p.ip {
            IpAddr::V4(ip) => maps.endpoints.get(&ip_key(ip), 0),
            IpAddr::V6(ip6) => maps.endpoints6.get(&ip6.octets(), 0),
        };
        match ep {
            Ok(ep) if ep.ifindex == host_if.index => {}
            Ok(ep) => {
                return Err(drift(format!(
                    "the dataplane sends {} to ifindex {}, not {host} ({})",
                    p.ip, ep.ifindex, host_if.index
                )));
            }
            Err(_) => {
                return Err(drift(format!("the dataplane has no endpoint for {}", p.ip)));
            }
        }
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let node = NodeConfig::read(&conf.run_dir()).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            "weft is not ready on this node",
            e.to_string(),
        )
    })?;
    Maps::open(&node.bpffs).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            "weft's dataplane is not loaded on this node",
            e.to_string(),
        )
    })?;
    Ok(())
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    let node = node_config(conf)?;
    let valid = conf.valid_attachments.as_deref().unwrap_or_default();
    let live = |id: &str, ifname: &str| {
        valid
            .iter()
            .any(|a| a.container_id == id && a.ifname == ifname)
    };
    in_store(&conf.ipam6(&node), |l| gc_store(l, &live, &node))?;
    in_store(&conf.ipam(&node), |l| gc_store(l, &live, &node))?;
    Ok(())
}

/// Releases each address in `store` whose attachment (container ID,
/// interface) is not `live`, and removes what is left of that pod.
fn gc_store<A: Family + Into<IpAddr>>(
    store: &ipam::Locked<'_, A>,
    live: &dyn Fn(&str, &str) -> bool,
    node: &NodeConfig,
) -> Result<(), ipam::IpamError> {
    for (ip, id, ifname) in store.allocations()? {
        if !live(&id, &ifname) {
            store.release(&id, &ifname)?;
            let host = endpoint::host_ifname(&id, &ifname);
            let _ = endpoint::del(&host, &[ip.into()], node);
        }
    }
    Ok(())
}

/// The plugin's `main`: reads the environment and stdin, prints the result
/// or the error JSON, returns the exit code.
pub fn main() -> i32 {
    let mut stdin = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin);
    let inv = Invocation {
        env: std::env::vars()
            .filter(|(k, _)| k.starts_with("CNI_"))
            .collect(),
        stdin,
    };
    match run(&inv) {
        Ok(Some(v)) => {
            println!("{v}");
            0
        }
        Ok(None) => 0,
        Err((e, version)) => {
            println!("{}", e.to_json(&version));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(cmd: &str, stdin: &str) -> Invocation {
        Invocation {
            env: [("CNI_COMMAND".to_string(), cmd.to_string())]
                .into_iter()
                .collect(),
            stdin: stdin.into(),
        }
    }

    /// A minimal weft conf, with `extra` (`,"key":…`) appended.
    fn conf(extra: &str) -> NetConf {
        serde_json::from_str(&format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"weft"{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn bandwidth_limits_mark_the_pod_shaped() {
        assert_eq!(conf("").shaped(true), Ok(false));
        let none = conf(r#","runtimeConfig":{"bandwidth":{"ingressRate":0,"egressRate":0}}"#);
        assert_eq!(none.shaped(false), Ok(false));
        let ingress = conf(r#","runtimeConfig":{"bandwidth":{"ingressRate":1000000}}"#);
        assert_eq!(
            ingress.shaped(false),
            Ok(true),
            "ingress limits need no TCX"
        );
        let egress = conf(r#","runtimeConfig":{"bandwidth":{"egressRate":1000000}}"#);
        assert_eq!(egress.shaped(true), Ok(true));
        let e = egress.shaped(false).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
        assert!(
            e.msg.contains("egressRate") && e.msg.contains("6.6"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn pods_get_netlink_filters_unless_their_egress_is_limited_or_tcx_is_asked_for() {
        let egress = r#","runtimeConfig":{"bandwidth":{"egressRate":1000000}}"#;
        assert_eq!(conf("").tc_mode(true), Ok(TcMode::Netlink));
        assert_eq!(conf(egress).tc_mode(true), Ok(TcMode::Tcx));
        assert_eq!(conf(r#","tcAttach":"tcx""#).tc_mode(true), Ok(TcMode::Tcx));
        assert_eq!(
            conf(r#","tcAttach":"tcx""#)
                .tc_mode(false)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        let e = conf(&format!(r#","tcAttach":"netlink"{egress}"#))
            .tc_mode(true)
            .unwrap_err();
        assert!(e.details.contains("ingress qdisc"), "{e:?}");
        assert!(
            serde_json::from_str::<NetConf>(
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","tcAttach":"bogus"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn version_and_input_errors() {
        let v = run(&inv("VERSION", r#"{"cniVersion":"1.0.0"}"#))
            .unwrap()
            .unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "1.1.0")
        );
        let (e, _) = run(&inv("ADD", "{not json")).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let (e, _) = run(&inv(
            "ADD",
            r#"{"cniVersion":"9.9.9","name":"n","type":"weft"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let (e, v) = run(&inv(
            "ADD",
            r#"{"cniVersion":"1.0.0","name":"n","type":"weft"}"#,
        ))
        .unwrap_err();
        assert_eq!((e.code, v.as_str()), (code::INVALID_ENV, "1.0.0"), "{e:?}");
        assert!(e.msg.contains("CNI_CONTAINERID"));
        let (e, _) = run(&inv(
            "BOGUS",
            r#"{"cniVersion":"1.0.0","name":"n","type":"weft"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        let j = CniError::new(7, "m", "d").to_json("1.1.0");
        assert_eq!(
            j,
            json!({"cniVersion": "1.1.0", "code": 7, "msg": "m", "details": "d"})
        );
    }
}
