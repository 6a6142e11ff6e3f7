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

use crate::{cidr::Ipv4Cidr, host::cmd::CmdError};

/// weft's chain in the `nat` table.
pub const CHAIN: &str = "WEFT-POSTRTG";
/// The comment on POSTROUTING's jump into [`CHAIN`], so it can be found again.
const COMMENT: &str = "weft: masquerade pods leaving the cluster";

/// An iptables flavour: its command and its restore command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The system's `iptables`.
    Default,
    /// `iptables-legacy`.
    Legacy,
}

impl Backend {
    /// The node's: see the module documentation.
    pub fn detect() -> Self {
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

    fn other(self) -> Self {
        match self {
            Self::Default => Self::Legacy,
            Self::Legacy => Self::Default,
        }
    }

    fn iptables(self, args: &[&str]) -> Result<String, CmdError> {
        let program = match self {
            Self::Default => "iptables",
            Self::Legacy => "iptables-legacy",
        };
        crate::host::cmd::run(program, args)
    }

    fn restore(self, input: &str) -> Result<String, CmdError> {
        let program = match self {
            Self::Default => "iptables-restore",
            Self::Legacy => "iptables-legacy-restore",
        };
        crate::host::cmd::run_with_input(program, &["--noflush", "-w"], Some(input))
    }

    /// Removes the jump and the chain, if there. Returns whether anything was.
    fn remove(self) -> bool {
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

/// Installs (or updates) the rules for `cluster` in the node's iptables
/// flavour, removing any an earlier run left in the other. Idempotent.
/// Returns the flavour used.
pub fn install(cluster: &Ipv4Cidr) -> Result<Backend, CmdError> {
    let backend = Backend::detect();
    backend.other().remove();
    backend.restore(&ruleset(cluster))?;
    let mut check = vec!["-t", "nat", "-C"];
    check.extend(jump());
    if backend.iptables(&check).is_err() {
        let mut add = vec!["-t", "nat", "-A"];
        add.extend(jump());
        backend.iptables(&add)?;
    }
    Ok(backend)
}

/// Removes the jump and the chain from both flavours, if there. Returns
/// whether anything was.
pub fn remove() -> bool {
    // Both run: `|` does not short-circuit.
    Backend::Default.remove() | Backend::Legacy.remove()
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
}
