//! The kernel outside BPF, reached in-process: [`netlink`] for links,
//! addresses, routes, neighbours and qdiscs, [`netns`] for work inside a
//! pod's namespace (`setns` on a thread of its own), [`netdev`] for the
//! ioctls netlink has no answer for (driver, GRO), [`sysctl`]; the node's
//! own devices [`weft0`] and [`gro`] (`weft_gro`); what flannel left on a
//! node weft takes over [`flannel`]; the masquerade ruleset
//! [`masq`], the one thing still done by a process (an iptables-restore or
//! nft transaction, once at start).

pub mod cmd;
pub mod flannel;
pub mod gro;
pub mod masq;
pub mod netdev;
pub mod netlink;
pub mod netns;
pub mod sysctl;
pub mod weft0;
