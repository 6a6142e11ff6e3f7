//! The kernel outside BPF: devices, addresses, routes, neighbours, qdiscs,
//! the node's own `weft0` and `weft_gro`, and the masquerade ruleset.

pub mod gro;
pub mod ip;
pub mod masq;
pub mod netdev;
pub mod weft0;
