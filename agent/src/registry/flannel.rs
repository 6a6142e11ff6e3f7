//! flannel's side of the `kube` registry (`flannel-compat`): the Node
//! annotations flanneld's kube subnet manager reads and writes
//! (flannel's `pkg/subnet/kube`), so weft nodes and flannel nodes form one
//! cluster while it is moved to weft node by node.
//!
//! flanneld (`--kube-subnet-mgr`, vxlan backend) writes on its own Node,
//! under a prefix (`--kube-annotation-prefix`, default
//! `flannel.alpha.coreos.com`):
//!
//! ```text
//! kube-subnet-manager: "true"         # Nodes without it are not flannel's
//! backend-type:        "vxlan"
//! backend-data:        {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}   # flannel.1's MAC
//! public-ip:           192.0.2.7      # where its VXLAN goes; public-ip-overwrite wins
//! ```
//!
//! and, for every other Node carrying them, programs a route to its
//! `spec.podCIDR` via `<subnet>.0` on `flannel.1`, a permanent neighbour
//! `<subnet>.0 → VtepMAC` and an FDB entry `VtepMAC → public-ip`. A flannel
//! node therefore accepts a frame only when its inner destination MAC is
//! its own (random) VTEP MAC: weft takes that MAC, and the node's address,
//! from these annotations. On its own Node weft writes them as flanneld
//! would, with its stable VTEP MAC and its VNI, so flannel nodes program
//! their routes, neighbours and FDB toward weft nodes; a flanneld started
//! later on that node (a roll-back) re-reads the MAC from `backend-data` and
//! keeps it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::host::netdev;

/// flanneld's default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The annotation keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    pub managed: String,
    pub backend_type: String,
    pub backend_data: String,
    pub public_ip: String,
    pub public_ip_overwrite: String,
    pub node_public_ip: String,
    /// flanneld with `EnableIPv6`: `flannel-v6.1`'s VNI and MAC, and the
    /// node's IPv6 underlay address.
    pub backend_v6_data: String,
    pub public_ipv6: String,
    pub public_ipv6_overwrite: String,
}

impl Keys {
    /// The keys under `prefix`, normalised as flanneld does: a prefix
    /// without a slash gets one; one not ending in `/` or `-` gets a `-`.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => {
                return Err(format!(
                    "flannel-annotation-prefix `{prefix}` has more than one `/`; give flanneld's --kube-annotation-prefix (default {DEFAULT_PREFIX})"
                ));
            }
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let (domain, rest) = p.split_once('/').unwrap_or((&p, ""));
        let label = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        let domain_ok = domain.contains('.') && domain.split('.').all(label);
        let rest_ok = rest.is_empty() || label(rest.trim_end_matches('-'));
        if !domain_ok || !rest_ok {
            return Err(format!(
                "flannel-annotation-prefix `{prefix}` is not of the form fqdn[/name]: give flanneld's --kube-annotation-prefix (default {DEFAULT_PREFIX})"
            ));
        }
        Ok(Self {
            managed: format!("{p}kube-subnet-manager"),
            backend_type: format!("{p}backend-type"),
            backend_data: format!("{p}backend-data"),
            public_ip: format!("{p}public-ip"),
            public_ip_overwrite: format!("{p}public-ip-overwrite"),
            node_public_ip: format!("{p}node-public-ip"),
            backend_v6_data: format!("{p}backend-v6-data"),
            public_ipv6: format!("{p}public-ipv6"),
            public_ipv6_overwrite: format!("{p}public-ipv6-overwrite"),
        })
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX).expect("the default prefix is valid")
    }
}

/// What weft needs of a Node that carries flannel's annotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    /// With flannel's `EnableIPv6` on that node: its IPv6 underlay address
    /// (`public-ipv6`) and `flannel-v6.1`'s MAC (`backend-v6-data`).
    pub v6: Option<(Ipv6Addr, [u8; 6])>,
}

/// The flannel lease of Node `name`: `None` when it does not carry
/// flannel's annotations (`kube-subnet-manager` is not `"true"`: flanneld
/// ignores such Nodes too), else the lease or the one-line problem with it.
/// `vni` is this agent's: a node on another VNI cannot be reached.
pub fn lease(
    name: &str,
    annotations: &BTreeMap<String, String>,
    keys: &Keys,
    vni: u32,
) -> Option<Result<Lease, String>> {
    if annotations.get(&keys.managed).map(String::as_str) != Some("true") {
        return None;
    }
    Some(parse(name, annotations, keys, vni))
}

fn parse(name: &str, a: &BTreeMap<String, String>, keys: &Keys, vni: u32) -> Result<Lease, String> {
    match a.get(&keys.backend_type).map(String::as_str) {
        Some("vxlan") => {}
        Some(other) => {
            return Err(format!(
                "Node {name}: annotation {}=`{other}`: weft speaks flannel's vxlan backend only (set Backend.Type to vxlan in flannel's net-conf.json); skipped",
                keys.backend_type
            ));
        }
        None => {
            return Err(format!(
                "Node {name}: no annotation {} (flanneld writes it with the lease); skipped until it does",
                keys.backend_type
            ));
        }
    }
    let data = a.get(&keys.backend_data).ok_or_else(|| {
        format!(
            "Node {name}: no annotation {}; skipped until flanneld writes it",
            keys.backend_data
        )
    })?;
    let vtep_mac = vtep_of(name, &keys.backend_data, data, vni)?;
    // flanneld copies public-ip-overwrite into public-ip when set; read it
    // first so a node whose flanneld has not done so yet is right too.
    let (key, text) = [&keys.public_ip_overwrite, &keys.public_ip]
        .into_iter()
        .find_map(|k| a.get(k).filter(|v| !v.is_empty()).map(|v| (k, v)))
        .ok_or_else(|| {
            format!(
                "Node {name}: no annotation {} (nor {}); skipped until flanneld writes it",
                keys.public_ip, keys.public_ip_overwrite
            )
        })?;
    let public_ip = text.parse::<Ipv4Addr>().map_err(|_| {
        format!("Node {name}: annotation {key}=`{text}` is not an IPv4 address; skipped")
    })?;
    let v6 = match [&keys.public_ipv6_overwrite, &keys.public_ipv6]
        .into_iter()
        .find_map(|k| a.get(k).filter(|v| !v.is_empty()).map(|v| (k, v)))
    {
        None => None,
        Some((key, text)) => {
            let ip = text
                .parse::<Ipv6Addr>()
                .map_err(|_| {
                    format!(
                        "Node {name}: annotation {key}=`{text}` is not an IPv6 address; skipped"
                    )
                })
                .and_then(|ip| {
                    super::Underlay6::check_ip(ip)
                        .map_err(|e| format!("Node {name}: annotation {key}: {e}; skipped"))
                })?;
            let data = a.get(&keys.backend_v6_data).ok_or_else(|| {
                format!(
                    "Node {name}: annotation {key} without {}; skipped until flanneld writes it",
                    keys.backend_v6_data
                )
            })?;
            Some((ip, vtep_of(name, &keys.backend_v6_data, data, vni)?))
        }
    };
    Ok(Lease {
        public_ip,
        vtep_mac,
        v6,
    })
}

/// The VTEP MAC in backend data `data` (annotation `key`), checked against
/// this agent's `vni`.
fn vtep_of(name: &str, key: &str, data: &str, vni: u32) -> Result<[u8; 6], String> {
    let bad = |what: &str| {
        format!(
            "Node {name}: annotation {key}=`{data}` {what} (flannel writes {{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:ff\"}}); skipped"
        )
    };
    let v: serde_json::Value =
        serde_json::from_str(data).map_err(|_| bad("is not a JSON object"))?;
    let their_vni = v["VNI"]
        .as_u64()
        .ok_or_else(|| bad("has no numeric \"VNI\""))?;
    let mac_text = v["VtepMAC"]
        .as_str()
        .ok_or_else(|| bad("has no \"VtepMAC\" string"))?;
    let vtep_mac = netdev::parse_mac(mac_text)
        .ok_or_else(|| bad("has a VtepMAC that is not a MAC address"))?;
    if vtep_mac[0] & 1 != 0 || vtep_mac == [0; 6] {
        return Err(format!(
            "Node {name}: annotation {key}: VtepMAC {mac_text} is not a unicast MAC; skipped"
        ));
    }
    if their_vni != u64::from(vni) {
        return Err(format!(
            "Node {name}: annotation {key} says VNI {their_vni}, this agent's VNI is {vni}: set weft's `vni` to flannel's Backend.VNI ({their_vni}) on every weft node; skipped"
        ));
    }
    Ok(vtep_mac)
}

/// The annotations flanneld would write on this node's Node for underlay
/// address `ip`, VTEP MAC `mac` and `vni`, given the Node's current
/// `annotations` (flannel's precedence: a `public-ip-overwrite` there is
/// what `public-ip` says).
pub fn own(
    keys: &Keys,
    annotations: &BTreeMap<String, String>,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    mac: &[u8; 6],
    vni: u32,
) -> BTreeMap<String, String> {
    let public = |overwrite: &String, ip: String| {
        annotations
            .get(overwrite)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or(ip)
    };
    let mut want = BTreeMap::from([
        (keys.managed.clone(), "true".to_string()),
        (keys.backend_type.clone(), "vxlan".to_string()),
        (keys.backend_data.clone(), backend_data(vni, mac)),
        (
            keys.public_ip.clone(),
            public(&keys.public_ip_overwrite, ip.to_string()),
        ),
    ]);
    // With an IPv6 underlay, as flanneld with EnableIPv6 (one MAC for both:
    // weft's decap does not read the inner destination MAC).
    if let Some(ip6) = ip6 {
        want.insert(keys.backend_v6_data.clone(), backend_data(vni, mac));
        want.insert(
            keys.public_ipv6.clone(),
            public(&keys.public_ipv6_overwrite, ip6.to_string()),
        );
    }
    want
}

/// `backend-data` exactly as flanneld marshals it (Go's encoding/json of
/// `vxlanLeaseAttrs`): `{"VNI":1,"VtepMAC":"0e:77:c6:12:00:01"}`.
pub fn backend_data(vni: u32, mac: &[u8; 6]) -> String {
    format!(
        "{{\"VNI\":{vni},\"VtepMAC\":\"{}\"}}",
        netdev::mac_to_string(mac)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
            .collect()
    }

    #[test]
    fn prefixes_as_flanneld_normalises_them() {
        assert_eq!(
            Keys::new("flannel.alpha.coreos.com").unwrap().managed,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        assert_eq!(
            Keys::new("example.com/net").unwrap().backend_data,
            "example.com/net-backend-data"
        );
        assert_eq!(
            Keys::new("example.com/net-").unwrap().public_ip,
            "example.com/net-public-ip"
        );
        for bad in ["a/b/c", "Flannel.io", "noddomain", "example.com/Net"] {
            assert!(Keys::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_flannels_lease_with_its_precedence() {
        let k = Keys::default();
        let good = ann(&[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("backend-data", r#"{"VNI":1,"VtepMAC":"5a:0f:3c:11:22:33"}"#),
            ("public-ip", "198.18.0.7"),
        ]);
        assert_eq!(
            lease("n", &good, &k, 1),
            Some(Ok(Lease {
                public_ip: "198.18.0.7".parse().unwrap(),
                vtep_mac: [0x5a, 0x0f, 0x3c, 0x11, 0x22, 0x33],
                v6: None,
            }))
        );
        let mut over = good.clone();
        over.insert(k.public_ip_overwrite.clone(), "198.18.0.70".into());
        assert_eq!(
            lease("n", &over, &k, 1).unwrap().unwrap().public_ip,
            "198.18.0.70".parse::<Ipv4Addr>().unwrap()
        );
        // Not flannel's: no lease, no problem.
        assert_eq!(lease("n", &ann(&[("backend-type", "vxlan")]), &k, 1), None);
        let mut off = good.clone();
        off.insert(k.managed.clone(), "false".into());
        assert_eq!(lease("n", &off, &k, 1), None);
    }

    #[test]
    fn reads_the_ipv6_side_of_a_dual_stack_flannel_node() {
        let k = Keys::default();
        let mut a = ann(&[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("backend-data", r#"{"VNI":1,"VtepMAC":"5a:0f:3c:11:22:33"}"#),
            ("public-ip", "198.18.0.7"),
            (
                "backend-v6-data",
                r#"{"VNI":1,"VtepMAC":"5a:0f:3c:11:22:66"}"#,
            ),
            ("public-ipv6", "2001:2:ff::7"),
        ]);
        assert_eq!(
            lease("n", &a, &k, 1).unwrap().unwrap().v6,
            Some((
                "2001:2:ff::7".parse().unwrap(),
                [0x5a, 0x0f, 0x3c, 0x11, 0x22, 0x66]
            ))
        );
        a.insert(k.public_ipv6_overwrite.clone(), "2001:2:ff::70".into());
        assert_eq!(
            lease("n", &a, &k, 1).unwrap().unwrap().v6.unwrap().0,
            "2001:2:ff::70".parse::<Ipv6Addr>().unwrap()
        );
        for (field, value, needle) in [
            (
                "public-ipv6-overwrite",
                "198.18.0.7",
                "is not an IPv6 address",
            ),
            (
                "public-ipv6-overwrite",
                "fe80::7",
                "cannot be an underlay address",
            ),
            (
                "backend-v6-data",
                r#"{"VNI":2,"VtepMAC":"5a:0f:3c:11:22:66"}"#,
                "says VNI 2",
            ),
            ("backend-v6-data", "null", "no numeric \"VNI\""),
        ] {
            let mut bad = a.clone();
            bad.insert(format!("flannel.alpha.coreos.com/{field}"), value.into());
            let e = lease("n6", &bad, &k, 1).unwrap().unwrap_err();
            assert!(
                e.starts_with("Node n6: ") && e.contains(needle),
                "{field}={value}: {e}"
            );
        }
        let mut no_data = a.clone();
        no_data.remove(&k.backend_v6_data);
        let e = lease("n6", &no_data, &k, 1).unwrap().unwrap_err();
        assert!(
            e.contains("without flannel.alpha.coreos.com/backend-v6-data"),
            "{e}"
        );
    }

    #[test]
    fn names_the_node_and_the_field_of_every_bad_lease() {
        let k = Keys::default();
        let base = [
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("backend-data", r#"{"VNI":1,"VtepMAC":"5a:0f:3c:11:22:33"}"#),
            ("public-ip", "198.18.0.7"),
        ];
        for (field, value, needle) in [
            ("backend-type", "host-gw", "vxlan backend only"),
            ("backend-data", "{VNI:1", "is not a JSON object"),
            (
                "backend-data",
                r#"{"VtepMAC":"5a:0f:3c:11:22:33"}"#,
                "no numeric \"VNI\"",
            ),
            ("backend-data", r#"{"VNI":1}"#, "no \"VtepMAC\""),
            (
                "backend-data",
                r#"{"VNI":1,"VtepMAC":"5a:0f"}"#,
                "not a MAC address",
            ),
            (
                "backend-data",
                r#"{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}"#,
                "not a unicast MAC",
            ),
            (
                "backend-data",
                r#"{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}"#,
                "not a unicast MAC",
            ),
            (
                "backend-data",
                r#"{"VNI":4096,"VtepMAC":"5a:0f:3c:11:22:33"}"#,
                "set weft's `vni` to flannel's Backend.VNI (4096)",
            ),
            (
                "public-ip",
                "198.18.0.300",
                "public-ip=`198.18.0.300` is not an IPv4 address",
            ),
            (
                "public-ip",
                "",
                "no annotation flannel.alpha.coreos.com/public-ip",
            ),
        ] {
            let mut a = ann(&base);
            a.insert(format!("flannel.alpha.coreos.com/{field}"), value.into());
            let e = lease("bad-node", &a, &k, 1).unwrap().unwrap_err();
            assert!(e.starts_with("Node bad-node: "), "{e}");
            assert!(e.contains(needle), "{field}={value}: {e}");
            assert!(e.ends_with("skipped") || e.contains("skipped until"), "{e}");
        }
    }

    #[test]
    fn writes_what_flanneld_writes() {
        let k = Keys::default();
        let mac = netdev::vtep_mac_for("198.18.0.1".parse().unwrap());
        let mine = own(
            &k,
            &BTreeMap::new(),
            "198.18.0.1".parse().unwrap(),
            None,
            &mac,
            1,
        );
        assert_eq!(
            mine[&k.backend_data],
            r#"{"VNI":1,"VtepMAC":"0e:77:c6:12:00:01"}"#
        );
        assert_eq!(mine[&k.public_ip], "198.18.0.1");
        assert_eq!(mine[&k.managed], "true");
        assert_eq!(mine[&k.backend_type], "vxlan");
        // What we write reads back as our own lease.
        assert_eq!(
            lease("me", &mine, &k, 1),
            Some(Ok(Lease {
                public_ip: "198.18.0.1".parse().unwrap(),
                vtep_mac: mac,
                v6: None,
            }))
        );
        let over = BTreeMap::from([(k.public_ip_overwrite.clone(), "203.0.113.9".to_string())]);
        assert_eq!(
            own(&k, &over, "198.18.0.1".parse().unwrap(), None, &mac, 1)[&k.public_ip],
            "203.0.113.9"
        );
        // With an IPv6 underlay: flanneld's EnableIPv6 annotations, which
        // read back as the lease's IPv6 side.
        let ip6: Ipv6Addr = "2001:2:ff::1".parse().unwrap();
        let mine = own(
            &k,
            &BTreeMap::new(),
            "198.18.0.1".parse().unwrap(),
            Some(ip6),
            &mac,
            1,
        );
        assert_eq!(mine[&k.public_ipv6], "2001:2:ff::1");
        assert_eq!(
            mine[&k.backend_v6_data],
            r#"{"VNI":1,"VtepMAC":"0e:77:c6:12:00:01"}"#
        );
        assert_eq!(
            lease("me", &mine, &k, 1).unwrap().unwrap().v6,
            Some((ip6, mac))
        );
    }
}
