//! `/metrics` (Prometheus text format, via prometheus-client), `/healthz`
//! and `/readyz` on one small HTTP port.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
    },
    registry::Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dataplane::Maps;

/// The agent's own counters, updated by the reconcile loop.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub map_writes: Counter,
    pub registry_problems: Gauge,
    pub known_nodes: Gauge,
    /// Programs (or `weft0`) found missing and put back, by hook.
    pub repairs: Family<Vec<(String, String)>, Counter>,
}

/// Reads the dataplane's counters and map sizes at each scrape.
#[derive(Debug)]
struct DataplaneCollector {
    pin_dir: PathBuf,
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(maps) = Maps::open(&self.pin_dir) else {
            return Ok(());
        };
        let c = crate::dataplane::stats::read(&maps.drops, &maps.fwds);
        // By family: IPv6's share, and the rest (IPv4, and frames of
        // neither family).
        let split =
            |total: &[(String, u64)], v6: &[(String, u64)]| -> Vec<(String, &'static str, u64)> {
                total
                    .iter()
                    .zip(v6)
                    .flat_map(|((n, t), (_, six))| {
                        [(n.clone(), "ipv4", t - six), (n.clone(), "ipv6", *six)]
                    })
                    .collect()
            };
        for (name, help, values) in [
            (
                "weft_forwarded_packets",
                "Packets the dataplane forwarded, by decision and family.",
                split(&c.forwards, &c.forwards_ipv6),
            ),
            (
                "weft_dropped_packets",
                "Packets the dataplane dropped, by reason and family.",
                split(&c.drops, &c.drops_ipv6),
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (reason, fam, value) in values {
                let labels = [("reason", reason.as_str()), ("family", fam)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let sizes = [
            ("remote_cidrs", maps.remotes.keys().count()),
            ("endpoints", maps.endpoints.keys().count()),
            ("remote_cidrs_ipv6", maps.remotes6.keys().count()),
            ("endpoints_ipv6", maps.endpoints6.keys().count()),
            ("nodes", maps.nodes.keys().count()),
            ("nodes_ipv6", maps.nodes6.keys().count()),
        ];
        let mut family = encoder.encode_descriptor(
            "weft_map_entries",
            "Entries in each dataplane map.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (map, n) in sizes {
            ConstGauge::new(n as i64).encode(family.encode_family(&[("map", map)])?)?;
        }
        Ok(())
    }
}

/// The metrics registry, readiness flag and health served over HTTP.
#[derive(Clone)]
pub struct Server {
    registry: Arc<Mutex<Registry>>,
    pub ready: Arc<AtomicBool>,
    /// Why the agent needs a restart, if it does: `/healthz` then answers
    /// 503 with this, so a liveness probe restarts it.
    pub unhealthy: Arc<Mutex<Option<String>>>,
}

impl Server {
    pub fn new(agent: &AgentMetrics, pin_dir: PathBuf) -> Self {
        let mut r = Registry::default();
        r.register(
            "weft_reconciles",
            "Snapshots of the node registry applied to the maps.",
            agent.reconciles.clone(),
        );
        r.register(
            "weft_reconcile_errors",
            "Snapshots that could not be applied.",
            agent.reconcile_errors.clone(),
        );
        r.register(
            "weft_map_writes",
            "Map entries written or removed by reconciles.",
            agent.map_writes.clone(),
        );
        r.register(
            "weft_registry_problems",
            "Registry entries skipped as invalid.",
            agent.registry_problems.clone(),
        );
        r.register(
            "weft_known_nodes",
            "Nodes in the last applied snapshot.",
            agent.known_nodes.clone(),
        );
        r.register(
            "weft_dataplane_repairs",
            "Times a program of the agent's (or weft0) was found gone and put back, by hook.",
            agent.repairs.clone(),
        );
        r.register_collector(Box::new(DataplaneCollector { pin_dir }));
        Self {
            registry: Arc::new(Mutex::new(r)),
            ready: Arc::new(AtomicBool::new(false)),
            unhealthy: Arc::new(Mutex::new(None)),
        }
    }

    fn respond(&self, path: &str) -> (u16, String) {
        match path {
            "/healthz" => match self.unhealthy.lock().expect("health lock").as_ref() {
                Some(why) => (503, format!("unhealthy: {why}\n")),
                None => (200, "ok\n".into()),
            },
            "/readyz" if self.ready.load(Ordering::Relaxed) => (200, "ready\n".into()),
            "/readyz" => (503, "not ready: first sync not written yet\n".into()),
            "/metrics" => {
                let mut body = String::new();
                let registry = self.registry.lock().expect("metrics registry lock");
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (200, body),
                    Err(e) => (500, format!("encoding metrics: {e}\n")),
                }
            }
            _ => (404, "not found; try /metrics, /healthz, /readyz\n".into()),
        }
    }

    /// Serves on `listener` (bound by the caller, so a busy port is an
    /// error at start-up) until the task is dropped.
    pub async fn serve(self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
        loop {
            let (mut sock, _) = listener.accept().await?;
            let this = self.clone();
            tokio::spawn(async move {
                // Read until the end of the request head: a client may send
                // it in several segments.
                let mut buf = vec![0u8; 2048];
                let mut n = 0;
                let head = async {
                    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                    }
                };
                if tokio::time::timeout(std::time::Duration::from_secs(5), head)
                    .await
                    .is_err()
                    || n == 0
                {
                    return;
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (code, body) = this.respond(path);
                let reason = match code {
                    200 => "OK",
                    404 => "Not Found",
                    503 => "Service Unavailable",
                    _ => "Internal Server Error",
                };
                let ctype = if path == "/metrics" {
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                } else {
                    "text/plain"
                };
                let head = format!(
                    "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    }
}
