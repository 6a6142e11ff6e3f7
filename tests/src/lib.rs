//! Harness for weft's privileged end-to-end tests (and the demo, the bench
//! and `cargo xtask cluster`).
//!
//! A [`Lab`] owns everything it creates — network namespaces (their veths
//! go with them), child processes, a private bpffs mount, a scratch
//! directory — and removes all of it on drop, including when a test panics.
//! Nothing is created in the caller's network namespace. Addresses come from
//! 198.18.0.0/15: underlay 198.18.0.0/24, pods 198.19.0.0/16.
//!
//! - [`lab`]: namespaces, processes, bpffs, the lab's guards;
//! - [`cluster`]: weft nodes on an underlay, their agents and pods;
//! - [`traffic`]: what crosses them (ping, iperf3, echo, checked streams);
//! - [`baselines`]: what weft is compared with (flannel's vxlan, a bridge);
//! - [`runtime`]: container images and podman stores for the runtime tests;
//! - [`kube`]: a real kube-apiserver; [`k8s`]: a real Kubernetes cluster;
//! - [`pktgen`]: crafted frames for the packet tests.

pub mod baselines;
pub mod cluster;
pub mod k8s;
pub mod kube;
pub mod lab;
pub mod pktgen;
pub mod runtime;
pub mod traffic;

pub use baselines::{FlannelNode, FlannelNode6, bridge_pod};
pub use cluster::{
    CLUSTER_CIDR, CLUSTER_CIDR6, Cluster, ClusterSpec, ForeignNode, NodeInfo, PodInfo,
    UNDERLAY_PREFIX, Underlay, UnderlayKind, cni_bin, run_cni_plugin, weft_bin,
};
pub use lab::{InNetns, Lab, Netns, Proc, logged_tools, privileged, sh, try_sh, wait_for};
pub use runtime::{busybox_image, podman_store_args};
pub use traffic::{EchoServer, bulk_tcp_intact, iperf_gbps, ping, tcp_roundtrip, udp_roundtrip};
