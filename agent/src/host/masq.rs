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
//! These are the only processes weft runs, once at start (and at `weft
//! down`): no interface exists for a firewall transaction.

use crate::{cidr::Ipv4Cidr, host::cmd::CmdError};

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

    fn iptables(self, args: &[&str]) -> Result<String, CmdError> {
        let program = match self {
            Self::Default => "iptables",
            Self::Legacy => "iptables-legacy",
            Self::Nft => unreachable!("nft has no iptables command"),
        };
        crate::host::cmd::run(program, args)
    }

    /// Installs `cluster`'s rules in one transaction.
    fn restore(self, cluster: &Ipv4Cidr) -> Result<String, CmdError> {
        let (program, args): (&str, &[&str]) = match self {
            Self::Default => ("iptables-restore", &["--noflush", "-w"]),
            Self::Legacy => ("iptables-legacy-restore", &["--noflush", "-w"]),
            Self::Nft => {
                return crate::host::cmd::run_with_input(
                    "nft",
                    &["-f", "-"],
                    Some(&nft_ruleset(cluster)),
                );
            }
        };
        crate::host::cmd::run_with_input(program, args, Some(&ruleset(cluster)))
    }

    /// Whether this backend's tool is installed.
    fn available(self) -> bool {
        on_path(match self {
            Self::Default => "iptables",
            Self::Legacy => "iptables-legacy",
            Self::Nft => "nft",
        })
    }

    /// Removes the jump and the chain (the table, for nft), if there.
    /// Returns whether anything was.
    fn remove(self) -> bool {
        if !self.available() {
            return false;
        }
        if self == Self::Nft {
            return crate::host::cmd::run("nft", &["delete", "table", "ip", NFT_TABLE]).is_ok();
        }
        let mut del = vec!["-t", "nat", "-D"];
        del.extend(jump());
        let mut removed = false;
        while self.iptables(&del).is_ok() {
            removed = true;
        }
        if self.iptables(&["-t", "nat", "-F", CHAIN, "-w"]).is_ok() {
            removed = true;
            let _ = self.iptables(&["-t", "nat", "-X", CHAIN, "-w"]);
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

/// The chain's rules for `cluster`, in `iptables-restore` syntax: declaring
/// the chain replaces its rules in one transaction (no moment without them).
pub fn ruleset(cluster: &Ipv4Cidr) -> String {
    let host = crate::host::weft0::HOST_IFACE;
    format!(
        "*nat\n:{CHAIN} - [0:0]\n\
         -A {CHAIN} -s {cluster} -d {cluster} -j RETURN\n\
         -A {CHAIN} ! -s {cluster} -d {cluster} -o {host} -j MASQUERADE --random-fully\n\
         -A {CHAIN} -s {cluster} -d 224.0.0.0/4 -j RETURN\n\
         -A {CHAIN} -s {cluster} -j MASQUERADE --random-fully\n\
         COMMIT\n"
    )
}

/// The same rules as [`ruleset`], as nftables' table `ip weft`, replaced
/// whole in one transaction (the empty declaration makes the delete
/// succeed on a first run).
pub fn nft_ruleset(cluster: &Ipv4Cidr) -> String {
    let host = crate::host::weft0::HOST_IFACE;
    format!(
        "table ip {NFT_TABLE} {{\n}}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cluster} ip daddr {cluster} return\n\
         \t\tip saddr != {cluster} ip daddr {cluster} oifname \"{host}\" masquerade fully-random\n\
         \t\tip saddr {cluster} ip daddr 224.0.0.0/4 return\n\
         \t\tip saddr {cluster} masquerade fully-random\n\
         \t}}\n\
         }}\n"
    )
}

/// Installs (or updates) the rules for `cluster` in the node's firewall
/// flavour, removing any an earlier run left in another. Idempotent.
/// Returns the flavour used.
pub fn install(cluster: &Ipv4Cidr) -> Result<Backend, CmdError> {
    let backend = Backend::detect();
    for other in backend.others() {
        other.remove();
    }
    backend.restore(cluster)?;
    if backend == Backend::Nft {
        return Ok(backend);
    }
    let mut check = vec!["-t", "nat", "-C"];
    check.extend(jump());
    if backend.iptables(&check).is_err() {
        let mut add = vec!["-t", "nat", "-A"];
        add.extend(jump());
        backend.iptables(&add)?;
    }
    Ok(backend)
}

/// Removes the rules from every flavour, if there. Returns whether anything
/// was.
pub fn remove() -> bool {
    // All run: `|` does not short-circuit.
    Backend::Default.remove() | Backend::Legacy.remove() | Backend::Nft.remove()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_returns_cluster_traffic_and_masquerades_the_rest() {
        let r = ruleset(&"10.244.0.0/16".parse().unwrap());
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
        let r = nft_ruleset(&"10.244.0.0/16".parse().unwrap());
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
}
