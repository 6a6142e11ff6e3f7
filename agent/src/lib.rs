//! weft's node agent as a library: the `weft` binary, the CNI plugin and the
//! end-to-end tests all drive the dataplane through these modules.

pub mod agent;
pub mod cidr;
pub mod cni;
pub mod cniconf;
pub mod config;
pub mod dataplane;
pub mod endpoint;
pub mod gro;
pub mod ip;
pub mod kube;
pub mod masq;
pub mod metrics;
pub mod netdev;
pub mod node;
pub mod profile;
pub mod registry;
pub mod stats;
pub mod status;
pub mod sync;
