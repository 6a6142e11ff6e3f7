//! Masquerading pods' traffic that leaves the cluster, as flannel's
//! `--ip-masq`: without it a pod's packets reach the outside world with the
//! pod's address, which nothing out there routes back.
//!
//! Rules live in the `nat` table in weft's own chain, jumped to from
//! POSTROUTING; only traffic the node's stack forwards passes there (pod to
//! pod traffic takes the BPF fast paths). Pod to pod (cluster CIDR to cluster
//! CIDR) and multicast return untouched; the rest from the cluster CIDR is
//! masqueraded behind the address of the interface it leaves by.
//!
//! As flannel does, the reverse too: what leaves for other nodes' pods
//! (through `weft0`) from an address outside the cluster CIDR — the node
//! itself calling a Service whose backend runs elsewhere, after kube-proxy's
//! DNAT kept the node's own source — is masqueraded behind `weft0`'s address,
//! the node's gateway. Otherwise the backend's answer, addressed outside the
//! cluster, would be masqueraded on *its* node and arrive from an address
//! this node's conntrack does not expect.
//!
//! The rules go where the node's other rules are: a node whose kube-proxy
//! uses iptables-legacy gets weft's there too (the kernel runs both, and NAT
//! is decided by whichever table binds a connection first). As
//! kubernetes-sigs/iptables-wrappers decides for kube-proxy's own image:
//! legacy when `iptables-legacy-save` lists more rules than
//! `iptables-nft-save`, else the system's `iptables` (nft on current
//! distributions, and the only choice where the variants are not installed).
//! A node with no `iptables-restore` at all but `nft` (RHEL 10 and others
//! ship only nftables) gets the same rules as nftables' own table `ip weft`,
//! one `nft -f` transaction.
//!
//! A dual-stack cluster gets the same rules for its IPv6 cluster CIDR, in
//! `ip6tables` (of the same flavour) or nftables' table `ip6 weft`.
//!
//! These are the only processes weft runs, once at start (and at `weft
//! down`): no interface exists for a firewall transaction.

use std::fmt::Display;

use crate::{cidr::ClusterCidrs, host::cmd::CmdError};

/// The address family a ruleset is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family's multicast range: its pods' traffic there is not
    /// masqueraded.
    fn multicast(self) -> &'static str {
        match self {
            Self::V4 => "224.0.0.0/4",
            Self::V6 => "ff00::/8",
        }
    }

    /// `iptables` or `ip6tables`.
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// nftables' family and its address expression: `ip`, `ip6`.
    fn nft(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }
}

/// weft's chain in the `nat` table.
pub const CHAIN: &str = "WEFT-POSTRTG";
/// The comment on POSTROUTING's jump into [`CHAIN`], so it can be found again.
const COMMENT: &str = "weft: masquerade pods leaving the cluster";

/// weft's nftables table (the nft backend).
pub const NFT_TABLE: &str = "weft";

/// A firewall flavour: iptables' (with its restore command) or nftables'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The system's `iptables`.
    Default,
    /// `iptables-legacy`.
    Legacy,
    /// `nft`, where no iptables is installed.
    Nft,
}

/// Whether `program` is an executable file in a directory of `PATH`
/// (nothing is run to find out).
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

impl Backend {
    /// The node's: see the module documentation.
    pub fn detect() -> Self {
        if !on_path("iptables-restore") && on_path("nft") {
            return Self::Nft;
        }
        // Rules other than weft's own, as `-A` lines of a save.
        let rules = |save: &str| {
            crate::host::cmd::run(save, &[]).map_or(0, |out| {
                out.lines()
                    .filter(|l| l.starts_with("-A") && !l.contains(CHAIN))
                    .count()
            })
        };
        if rules("iptables-legacy-save") > rules("iptables-nft-save") {
            Self::Legacy
        } else {
            Self::Default
        }
    }

    /// Every backend but this one (where an earlier run may have left rules).
    fn others(self) -> impl Iterator<Item = Self> {
        [Self::Default, Self::Legacy, Self::Nft]
            .into_iter()
            .filter(move |b| *b != self)
    }

    /// This flavour's `iptables` of `family` (`ip6tables-legacy`, say),
    /// with `suffix` (`-restore`).
    fn program(self, family: Family, suffix: &str) -> String {
        let flavour = match self {
            Self::Default => "",
            Self::Legacy => "-legacy",
            Self::Nft => unreachable!("nft has no iptables command"),
        };
        format!("{}{flavour}{suffix}", family.iptables())
    }

    fn iptables(self, family: Family, args: &[&str]) -> Result<String, CmdError> {
        crate::host::cmd::run(&self.program(family, ""), args)
    }

    /// Installs `cluster`'s rules (of `family`) in one transaction.
    fn restore(self, family: Family, cluster: &dyn Display) -> Result<String, CmdError> {
        if self == Self::Nft {
            return crate::host::cmd::run_with_input(
                "nft",
                &["-f", "-"],
                Some(&nft_ruleset(family, cluster)),
            );
        }
        crate::host::cmd::run_with_input(
            &self.program(family, "-restore"),
            &["--noflush", "-w"],
            Some(&ruleset(family, cluster)),
        )
    }

    /// Whether this backend's tool for `family` is installed.
    fn available(self, family: Family) -> bool {
        match self {
            Self::Nft => on_path("nft"),
            _ => on_path(&self.program(family, "")),
        }
    }

    /// Removes the jump and the chain (the table, for nft) of `family`, if
    /// there. Returns whether anything was.
    fn remove(self, family: Family) -> bool {
        if !self.available(family) {
            return false;
        }
        if self == Self::Nft {
            return crate::host::cmd::run("nft", &["delete", "table", family.nft(), NFT_TABLE])
                .is_ok();
        }
        let mut del = vec!["-t", "nat", "-D"];
        del.extend(jump());
        let mut removed = false;
        while self.iptables(family, &del).is_ok() {
            removed = true;
        }
        if self
            .iptables(family, &["-t", "nat", "-F", CHAIN, "-w"])
            .is_ok()
        {
            removed = true;
            let _ = self.iptables(family, &["-t", "nat", "-X", CHAIN, "-w"]);
        }
        removed
    }
}

/// The jump from POSTROUTING, as `iptables` arguments after the verb.
fn jump() -> [&'static str; 8] {
    [
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        COMMENT,
        "-j",
        CHAIN,
        "-w",
    ]
}

/// The chain's rules for `cluster` (of `family`), in `iptables-restore`
/// syntax: declaring the chain replaces its rules in one transaction (no
/// moment without them).
pub fn ruleset(family: Family, cluster: &dyn Display) -> String {
    let host = crate::host::weft0::HOST_IFACE;
    let multicast = family.multicast();
    format!(
        "*nat\n:{CHAIN} - [0:0]\n\
         -A {CHAIN} -s {cluster} -d {cluster} -j RETURN\n\
         -A {CHAIN} ! -s {cluster} -d {cluster} -o {host} -j MASQUERADE --random-fully\n\
         -A {CHAIN} -s {cluster} -d {multicast} -j RETURN\n\
         -A {CHAIN} -s {cluster} -j MASQUERADE --random-fully\n\
         COMMIT\n"
    )
}

/// The same rules as [`ruleset`], as nftables' table `ip weft` (`ip6 weft`),
/// replaced whole in one transaction (the empty declaration makes the
/// delete succeed on a first run).
pub fn nft_ruleset(family: Family, cluster: &dyn Display) -> String {
    let host = crate::host::weft0::HOST_IFACE;
    let (ip, multicast) = (family.nft(), family.multicast());
    format!(
        "table {ip} {NFT_TABLE} {{\n}}\n\
         delete table {ip} {NFT_TABLE}\n\
         table {ip} {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\t{ip} saddr {cluster} {ip} daddr {cluster} return\n\
         \t\t{ip} saddr != {cluster} {ip} daddr {cluster} oifname \"{host}\" masquerade fully-random\n\
         \t\t{ip} saddr {cluster} {ip} daddr {multicast} return\n\
         \t\t{ip} saddr {cluster} masquerade fully-random\n\
         \t}}\n\
         }}\n"
    )
}

/// Installs (or updates) the rules for the cluster's CIDRs (IPv6 too, in a
/// dual-stack cluster) in the node's firewall flavour, removing any an
/// earlier run left in another (or, for IPv6, left when the cluster had
/// an IPv6 CIDR). Idempotent. Returns the flavour used.
pub fn install(clusters: &ClusterCidrs) -> Result<Backend, CmdError> {
    let backend = Backend::detect();
    let v6 = clusters.v6.as_ref().map(|c| c as &dyn Display);
    for (family, cluster) in [
        (Family::V4, clusters.v4.as_ref().map(|c| c as &dyn Display)),
        (Family::V6, v6),
    ] {
        for other in backend.others() {
            other.remove(family);
        }
        let Some(cluster) = cluster else {
            backend.remove(family);
            continue;
        };
        backend.restore(family, cluster)?;
        if backend == Backend::Nft {
            continue;
        }
        let mut check = vec!["-t", "nat", "-C"];
        check.extend(jump());
        if backend.iptables(family, &check).is_err() {
            let mut add = vec!["-t", "nat", "-A"];
            add.extend(jump());
            backend.iptables(family, &add)?;
        }
    }
    Ok(backend)
}

/// Removes the rules of both families from every flavour, if there.
/// Returns whether anything was.
pub fn remove() -> bool {
    let mut removed = false;
    for family in [Family::V4, Family::V6] {
        for backend in [Backend::Default, Backend::Legacy, Backend::Nft] {
            removed |= backend.remove(family);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_returns_cluster_traffic_and_masquerades_the_rest() {
        let r = ruleset(Family::V4, &"10.244.0.0/16");
        assert!(r.starts_with("*nat\n:WEFT-POSTRTG - [0:0]\n"), "{r}");
        let rules: Vec<&str> = r.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(
            rules,
            [
                "-A WEFT-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
                "-A WEFT-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -o weft0 -j MASQUERADE --random-fully",
                "-A WEFT-POSTRTG -s 10.244.0.0/16 -d 224.0.0.0/4 -j RETURN",
                "-A WEFT-POSTRTG -s 10.244.0.0/16 -j MASQUERADE --random-fully",
            ]
        );
        assert!(r.ends_with("COMMIT\n"));
    }

    #[test]
    fn the_nft_ruleset_is_the_same_rules_replaced_whole() {
        let r = nft_ruleset(Family::V4, &"10.244.0.0/16");
        assert!(
            r.starts_with("table ip weft {\n}\ndelete table ip weft\ntable ip weft {\n"),
            "{r}"
        );
        let rules: Vec<&str> = r
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ip "))
            .collect();
        assert_eq!(
            rules,
            [
                "ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return",
                "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 oifname \"weft0\" masquerade fully-random",
                "ip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 return",
                "ip saddr 10.244.0.0/16 masquerade fully-random",
            ]
        );
        assert!(r.contains("type nat hook postrouting priority srcnat;"));
    }

    #[test]
    fn the_ipv6_rules_are_the_same_in_ip6tables_and_nft_ip6() {
        let r = ruleset(Family::V6, &"2001:2::/48");
        assert!(
            r.contains("-A WEFT-POSTRTG -s 2001:2::/48 -d ff00::/8 -j RETURN"),
            "{r}"
        );
        assert!(
            r.contains("-A WEFT-POSTRTG -s 2001:2::/48 -j MASQUERADE --random-fully"),
            "{r}"
        );
        let n = nft_ruleset(Family::V6, &"2001:2::/48");
        assert!(
            n.starts_with("table ip6 weft {\n}\ndelete table ip6 weft\n"),
            "{n}"
        );
        assert!(
            n.contains("ip6 saddr 2001:2::/48 ip6 daddr ff00::/8 return"),
            "{n}"
        );
        assert_eq!(
            Backend::Legacy.program(Family::V6, "-restore"),
            "ip6tables-legacy-restore"
        );
        assert_eq!(Backend::Default.program(Family::V4, ""), "iptables");
    }
}
