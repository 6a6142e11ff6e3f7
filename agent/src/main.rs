//! `weft`: the node agent and its CLI.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use weft_agent::{
    daemon::{
        self,
        config::{AgentConfig, AgentSettings},
    },
    dataplane::{DEFAULT_BPFFS_DIR, profile},
    endpoint::{self, EndpointSpec},
    host::netdev,
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
    ///
    /// Settings come from flags, then the config file, then defaults.
    Agent {
        /// TOML config file with the same settings as the flags (kebab-case keys).
        #[arg(long, default_value = weft_agent::daemon::config::DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        settings: Box<AgentSettings>,
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
    /// Measure the CPU time weft's BPF programs take on this machine over a
    /// window of live traffic (kernel run-time statistics, on only while
    /// this runs).
    Profile {
        /// Length of the window, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
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
        /// The pod's IPv4 address (in this node's pod CIDR).
        #[arg(long, required_unless_present = "ip6")]
        ip: Option<Ipv4Addr>,
        /// Its IPv6 address, on a dual-stack or IPv6-only node (in its IPv6
        /// pod CIDR).
        #[arg(long)]
        ip6: Option<Ipv6Addr>,
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
        #[arg(long)]
        ip6: Option<Ipv6Addr>,
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Agent { config, settings } => {
            let from_file = if config.exists() {
                AgentSettings::from_file(&config)?
            } else if config.as_os_str() != weft_agent::daemon::config::DEFAULT_CONFIG {
                anyhow::bail!("config file {} does not exist", config.display());
            } else {
                AgentSettings::default()
            };
            let mut cfg = AgentConfig::from_settings((*settings).over(from_file), hostname)?;
            // The programs log at debug level only when the agent does:
            // otherwise the log calls are pruned at load time.
            cfg.bpf_debug_log =
                std::env::var("WEFT_LOG").is_ok_and(|v| v.contains("debug") || v.contains("trace"));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(cfg))?;
        }
        Command::Status { json, paths } => {
            let s = status::collect(&paths.bpffs_dir, &paths.run_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::format(&s));
            }
        }
        Command::Profile { seconds, json } => {
            let window = std::time::Duration::try_from_secs_f64(seconds).map_err(|_| {
                anyhow::anyhow!("--seconds {seconds}: give a number of seconds, e.g. 5")
            })?;
            let p = profile::profile(window)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", profile::format(&p));
            }
        }
        Command::Down { paths } => {
            for line in daemon::down(&paths.bpffs_dir, &paths.run_dir) {
                println!("{line}");
            }
        }
        Command::Endpoint(EndpointCmd::Add {
            netns,
            ifname,
            id,
            ip,
            ip6,
            paths,
        }) => {
            let node = NodeConfig::read(&paths.run_dir)?;
            let spec = EndpointSpec {
                netns,
                host_ifname: endpoint::host_ifname(&id, &ifname),
                ifname,
                ip,
                ip6,
                shaped: false,
                tc: weft_agent::dataplane::TcMode::pod(false),
            };
            let a = endpoint::add(&spec, &node)?;
            println!("{} {}", a.host_ifname, netdev::mac_to_string(&a.pod_mac));
        }
        Command::Endpoint(EndpointCmd::Del {
            id,
            ifname,
            ip,
            ip6,
            paths,
        }) => {
            let node = NodeConfig::read(&paths.run_dir)?;
            let ips: Vec<IpAddr> = ip
                .map(IpAddr::V4)
                .into_iter()
                .chain(ip6.map(IpAddr::V6))
                .collect();
            endpoint::del(&endpoint::host_ifname(&id, &ifname), &ips, &node)?;
        }
    }
    Ok(())
}
