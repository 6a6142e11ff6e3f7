//! weft's node agent as a library: the `weft` binary, the CNI plugin and the
//! end-to-end tests all drive the dataplane through these modules.
//!
//! - [`daemon`]: `weft agent` — bring-up, the reconcile loop, the keeper;
//! - [`registry`]: where the nodes come from (a file, Node objects) and how
//!   a snapshot becomes map entries;
//! - [`dataplane`]: the BPF programs and maps — load, attach, pins, counters;
//! - [`host`]: the kernel outside BPF — links, addresses, routes, qdiscs,
//!   `weft0`, `weft_gro`, masquerade;
//! - [`endpoint`]: a pod's veth, addresses, routes and endpoint entry;
//! - [`cni`]: the `weft-cni` plugin, its IPAM, the conflist the agent installs;
//! - [`node`]: `subnet.env`, what the agent tells the plugin;
//! - [`status`]: `weft status`; [`cidr`]: IPv4 prefixes.

pub mod cidr;
pub mod cni;
pub mod daemon;
pub mod dataplane;
pub mod endpoint;
pub mod host;
pub mod node;
pub mod registry;
pub mod status;
