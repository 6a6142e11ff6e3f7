//! `weft status`: this node, known nodes, local endpoints and counters.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    cidr::AnyCidr,
    dataplane::{
        self, DataplaneError, Maps, ip_from_key,
        stats::{self, Counters},
    },
    host::netdev::mac_to_string,
    node::NodeConfig,
    registry::sync::NodeMaps as _,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub node: Option<NodeConfig>,
    /// Where VXLAN is decapsulated: `xdp`, `tc`, or `none` (not attached).
    pub decap: &'static str,
    /// The UDP port `weft_gro` holds so that the kernel's GRO merges VXLAN
    /// before TC decap; `None` without it (the agent's log says why).
    pub gro_port: Option<u16>,
    pub nodes: Vec<NodeRow>,
    pub endpoints: Vec<EndpointRow>,
    pub counters: Counters,
}

#[derive(Debug, Serialize)]
pub struct NodeRow {
    pub pod_cidr: String,
    /// `ipv4` or `ipv6`: the pod CIDR's family.
    pub family: &'static str,
    /// Where its VXLAN goes: the node's IPv4 underlay address, or its IPv6
    /// one when the CIDR is carried over the IPv6 underlay.
    pub underlay_ip: String,
    /// `ipv4` or `ipv6`: the underlay's family.
    pub underlay: &'static str,
    pub vtep_mac: String,
    /// `local`, `remote` (VXLAN accepted from it) or `remote-unverified`.
    pub state: &'static str,
}

#[derive(Debug, Serialize)]
pub struct EndpointRow {
    pub ip: String,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    pub ifindex: u32,
    pub pod_mac: String,
    pub xdp_redirect: bool,
    /// A qdisc shapes the pod's veth: its traffic takes the node's stack.
    pub shaped: bool,
}

/// Reads the state from the pins in `bpffs` and the node config in `run_dir`.
pub fn collect(bpffs: &Path, run_dir: &Path) -> Result<Status, DataplaneError> {
    let maps = Maps::open(bpffs)?;
    let node = NodeConfig::read(run_dir).ok();
    let vteps: Vec<u32> = maps.nodes.keys().filter_map(Result::ok).collect();
    let vteps6: Vec<[u8; 16]> = maps.nodes6.keys().filter_map(Result::ok).collect();
    let mut nodes: Vec<NodeRow> = maps
        .remotes()
        .into_iter()
        .map(|(cidr, v)| {
            let local = node.as_ref().is_some_and(|n| match cidr {
                AnyCidr::V4(c) => n.v4.is_some_and(|v4| v4.subnet == c),
                AnyCidr::V6(c) => n.v6.is_some_and(|v6| v6.subnet == c),
            });
            let over6 = v.over_underlay6();
            NodeRow {
                pod_cidr: cidr.to_string(),
                family: family(matches!(cidr, AnyCidr::V6(_))),
                underlay_ip: if over6 {
                    std::net::Ipv6Addr::from(v.underlay_ip6).to_string()
                } else if v.underlay_ip == 0 {
                    // An IPv6-only node's own CIDRs.
                    "-".into()
                } else {
                    ip_from_key(v.underlay_ip).to_string()
                },
                // An IPv6-only node's own CIDRs carry no IPv4 address.
                underlay: if !over6 && v.underlay_ip == 0 {
                    "-"
                } else {
                    family(over6)
                },
                vtep_mac: mac_to_string(&v.vtep_mac),
                state: if local {
                    "local"
                } else if (over6 && vteps6.contains(&v.underlay_ip6))
                    || (!over6 && vteps.contains(&v.underlay_ip))
                {
                    "remote"
                } else {
                    "remote-unverified"
                },
            }
        })
        .collect();
    nodes.sort_by(|a, b| (a.family, &a.pod_cidr).cmp(&(b.family, &b.pod_cidr)));
    let row = |ip: String, v6: bool, e: weft_common::Endpoint| EndpointRow {
        ip,
        family: family(v6),
        ifindex: e.ifindex,
        pod_mac: mac_to_string(&e.pod_mac),
        xdp_redirect: e.flags & weft_common::Endpoint::FLAG_XDP_REDIRECT != 0,
        shaped: e.shaped(),
    };
    let v4 = maps
        .endpoints
        .iter()
        .filter_map(Result::ok)
        .map(|(ip, e)| row(ip_from_key(ip).to_string(), false, e));
    let v6 = maps
        .endpoints6
        .iter()
        .filter_map(Result::ok)
        .map(|(ip, e)| row(std::net::Ipv6Addr::from(ip).to_string(), true, e));
    let mut endpoints: Vec<EndpointRow> = v4.chain(v6).collect();
    endpoints.sort_by(|a, b| (a.family, &a.ip).cmp(&(b.family, &b.ip)));
    let decap = if bpffs.join(dataplane::PIN_LINK_XDP).exists() {
        "xdp"
    } else if bpffs.join(dataplane::PIN_LINK_UNDERLAY).exists()
        || (!dataplane::has_tcx() && node.is_some())
    {
        // Before TCX the TC filter is not pinned: configured and not XDP.
        "tc"
    } else {
        "none"
    };
    Ok(Status {
        node,
        decap,
        gro_port: crate::host::gro::held_port(),
        nodes,
        endpoints,
        counters: stats::read(&maps.drops, &maps.fwds),
    })
}

fn family(v6: bool) -> &'static str {
    if v6 { "ipv6" } else { "ipv4" }
}

/// Counters as two readable lines.
pub fn format_counters(c: &Counters) -> String {
    // `name=total`, and `(ipv6 N)` where IPv6 has a share.
    let f = |v: &[(String, u64)], v6: &[(String, u64)]| {
        v.iter()
            .zip(v6)
            .map(|((n, x), (_, six))| match six {
                0 => format!("{n}={x}"),
                six => format!("{n}={x} (ipv6 {six})"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "forwarded: {}\ndropped:   {}",
        f(&c.forwards, &c.forwards_ipv6),
        f(&c.drops, &c.drops_ipv6)
    )
}

/// The whole status, for a person.
pub fn format(s: &Status) -> String {
    let mut out = String::new();
    match &s.node {
        Some(n) => {
            let _ = writeln!(out, "node {}: pod MTU {}", n.node, n.mtu);
            if let Some(v4) = &n.v4 {
                let _ = writeln!(
                    out,
                    "  ipv4: pod CIDR {} (gateway {}), cluster {}",
                    v4.subnet, v4.gateway, v4.network
                );
            }
            if let Some(v6) = &n.v6 {
                let _ = writeln!(
                    out,
                    "  ipv6: pod CIDR {} (gateway {}), cluster {}",
                    v6.subnet, v6.gateway, v6.network
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "node: (no subnet.env: agent not configured on this node)"
            );
        }
    }
    let _ = writeln!(out, "decap: {}", s.decap);
    let _ = match s.gro_port {
        Some(port) => writeln!(
            out,
            "vxlan gro: {} holds udp/{port}",
            crate::host::gro::GRO_IFACE
        ),
        None => writeln!(out, "vxlan gro: none (decap sees every received frame)"),
    };
    let _ = writeln!(out, "\nnodes ({}):", s.nodes.len());
    let _ = writeln!(
        out,
        "  {:<24} {:<26} {:<18} state",
        "pod CIDR", "underlay IP", "VTEP MAC"
    );
    for n in &s.nodes {
        let _ = writeln!(
            out,
            "  {:<24} {:<26} {:<18} {}",
            n.pod_cidr, n.underlay_ip, n.vtep_mac, n.state
        );
    }
    let _ = writeln!(out, "\nlocal endpoints ({}):", s.endpoints.len());
    for e in &s.endpoints {
        let _ = writeln!(
            out,
            "  {:<24} ifindex {:<5} mac {} xdp-redirect {}{}",
            e.ip,
            e.ifindex,
            e.pod_mac,
            e.xdp_redirect,
            if e.shaped {
                " shaped (through the stack)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(out, "\ncounters:\n{}", format_counters(&s.counters));
    out
}
