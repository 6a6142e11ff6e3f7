//! `weft down`: detaches everything weft attached and removes its pins,
//! devices, routes, rules and files.

use std::path::Path;

use crate::{
    dataplane,
    host::{gro, masq, netdev, weft0},
};

/// `weft down`: detaches everything weft attached and removes its pins,
/// devices, routes and files.
pub fn down(bpffs_dir: &Path, run_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    if bpffs_dir.exists() {
        // Removing a link's pin detaches it; maps go with their last reference.
        match std::fs::remove_dir_all(bpffs_dir) {
            Ok(()) => done.push(format!("removed pins under {}", bpffs_dir.display())),
            Err(e) => done.push(format!("could not remove {}: {e}", bpffs_dir.display())),
        }
    }
    // Netlink filters are not pinned: find weft's (its own priority and
    // handle) on pod veths' both sides (with or without TCX: pods take
    // netlink filters by default) and, before TCX, the underlay's ingress.
    // weft0 takes its own with it when deleted.
    {
        use aya::programs::TcAttachType::{Egress, Ingress};
        for iface in netdev::names() {
            for (dir, name) in [(Ingress, "ingress"), (Egress, "egress")] {
                if dataplane::detach_nl(&iface, dir) {
                    done.push(format!("removed weft's TC filter from {iface} {name}"));
                }
            }
        }
    }
    if masq::remove() {
        done.push(format!(
            "removed the masquerade rules (nat table, chain {})",
            masq::CHAIN
        ));
    }
    if weft0::remove() {
        done.push(format!("deleted {} and its routes", weft0::HOST_IFACE));
    }
    if gro::remove() {
        done.push(format!("deleted {}", gro::GRO_IFACE));
    }
    let env = run_dir.join(crate::node::SUBNET_ENV);
    if std::fs::remove_file(&env).is_ok() {
        done.push(format!("removed {}", env.display()));
    }
    done
}
