//! `weft`: the node agent and its CLI.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use weft_agent::{
    agent::{self, AgentConfig},
    cidr::Ipv4Cidr,
    dataplane::DEFAULT_BPFFS_DIR,
    endpoint::{self, EndpointSpec},
    node::{DEFAULT_RUN_DIR, NodeConfig},
    status,
};

/// weft: a Kubernetes pod network with a VXLAN dataplane in eBPF.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Paths {
    /// bpffs directory where maps, programs and links are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "WEFT_BPFFS_DIR")]
    bpffs_dir: PathBuf,
    /// Directory for subnet.env (read by the CNI plugin).
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "WEFT_RUN_DIR")]
    run_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load and attach the dataplane, keep maps in sync.
    Agent {
        /// This node's name in the registry (default: the host name).
        #[arg(long, env = "WEFT_NODE_NAME")]
        node_name: Option<String>,
        /// Underlay interface (default: the interface of the default route).
        #[arg(long)]
        iface: Option<String>,
        /// Pick the first interface whose name matches this glob (`*`, `?`).
        #[arg(long, conflicts_with = "iface")]
        iface_regex: Option<String>,
        /// Underlay address to use instead of the interface's first IPv4 address.
        #[arg(long)]
        public_ip: Option<Ipv4Addr>,
        /// TOML file listing the cluster's nodes (the `file` registry).
        #[arg(long, default_value = "/etc/weft/nodes.toml")]
        nodes_file: PathBuf,
        /// Cluster CIDR: every pod address lies in it.
        #[arg(long, default_value = "10.244.0.0/16")]
        cluster_cidr: Ipv4Cidr,
        /// VXLAN network identifier (flannel's default is 1).
        #[arg(long, default_value_t = 1)]
        vni: u32,
        /// VXLAN UDP port (flannel's default is 8472; IANA's is 4789).
        #[arg(long, default_value_t = 8472)]
        port: u16,
        /// Print counters every N seconds (0: never).
        #[arg(long, default_value_t = 0)]
        stats_interval: u64,
        #[command(flatten)]
        paths: Paths,
    },
    /// Show this node, known nodes, local endpoints and counters.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        paths: Paths,
    },
    /// Remove everything weft attached on this node: pins, weft0, routes, files.
    Down {
        #[command(flatten)]
        paths: Paths,
    },
    /// Attach or detach a pod by hand (the CNI plugin does the same).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Create the pod's veth in NETNS and register it with the dataplane.
    Add {
        /// Path of the pod's network namespace.
        #[arg(long)]
        netns: PathBuf,
        /// Interface name inside the pod.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Container ID: names the host-side veth.
        #[arg(long)]
        id: String,
        /// The pod's address (in this node's pod CIDR).
        #[arg(long)]
        ip: Ipv4Addr,
        #[command(flatten)]
        paths: Paths,
    },
    /// Remove the pod's veth and endpoint entry (idempotent).
    Del {
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        #[command(flatten)]
        paths: Paths,
    },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            node_name,
            iface,
            iface_regex,
            public_ip,
            nodes_file,
            cluster_cidr,
            vni,
            port,
            stats_interval,
            paths,
        } => {
            let cfg = AgentConfig {
                node_name: node_name.unwrap_or_else(hostname),
                iface,
                iface_regex,
                public_ip,
                nodes_file,
                cluster_cidr,
                vni,
                port,
                bpffs_dir: paths.bpffs_dir,
                run_dir: paths.run_dir,
                stats_interval: (stats_interval > 0).then(|| Duration::from_secs(stats_interval)),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::run(cfg))?;
        }
        Command::Status { json, paths } => {
            let s = status::collect(&paths.bpffs_dir, &paths.run_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::format(&s));
            }
        }
        Command::Down { paths } => {
            for line in agent::down(&paths.bpffs_dir, &paths.run_dir) {
                println!("{line}");
            }
        }
        Command::Endpoint(EndpointCmd::Add {
            netns,
            ifname,
            id,
            ip,
            paths,
        }) => {
            let node = NodeConfig::read(&paths.run_dir)?;
            let spec = EndpointSpec {
                netns,
                host_ifname: endpoint::host_ifname(&id, &ifname),
                ifname,
                ip,
            };
            let a = endpoint::add(&spec, &node)?;
            println!(
                "{} {}",
                a.host_ifname,
                weft_agent::netdev::mac_to_string(&a.pod_mac)
            );
        }
        Command::Endpoint(EndpointCmd::Del {
            id,
            ifname,
            ip,
            paths,
        }) => {
            let node = NodeConfig::read(&paths.run_dir)?;
            endpoint::del(&endpoint::host_ifname(&id, &ifname), ip, &node)?;
        }
    }
    Ok(())
}
