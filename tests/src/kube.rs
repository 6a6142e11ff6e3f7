//! A real kube-apiserver and etcd for tests, inside a lab namespace.
//!
//! The binary is built from Debian's source by `tests/kube/build.sh`
//! (cached under `$WEFT_CACHE_DIR/kube`, default `/var/cache/weft/kube`). Both servers run in the given namespace
//! (the underlay's), the API server on `198.18.0.254:6443`, so agents in
//! node namespaces reach it over the underlay. Two tokens: `admin` (group
//! system:masters) for the test, `agent` (user weft-agent, nothing granted
//! until the test applies deploy/rbac.yaml's rules to it).

use std::{path::PathBuf, process::Command, time::Duration};

use crate::{Lab, Netns, sh};

pub const API_IP: &str = "198.18.0.254";
/// The API server's IPv6 address, with [`ApiOptions::ipv6`]: on the IPv6
/// underlay of [`crate::cluster::UNDERLAY6_PREFIX`], for IPv6-only nodes.
pub const API_IP6: &str = "2001:2:ff::fe";
pub const API_PORT: u16 = 6443;
pub const ADMIN_TOKEN: &str = "weft-test-admin-token";
pub const AGENT_TOKEN: &str = "weft-test-agent-token";
/// The user the agent token authenticates as.
pub const AGENT_USER: &str = "weft-agent";

/// The Kubernetes release every component comes from.
pub const VERSION: &str = "1.20.2";
/// The Service CIDR of every lab API server.
pub const SERVICE_CIDR: &str = "198.18.200.0/24";
/// The `kubernetes` Service's ClusterIP (the first of [`SERVICE_CIDR`]):
/// where in-cluster clients (weft's agent in its DaemonSet) find the API.
pub const SERVICE_API_IP: &str = "198.18.200.1";

/// Where the cached kube-apiserver binary is, if it was built.
pub fn apiserver_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_KUBE_APISERVER") {
        return Some(p.into());
    }
    cached("kube-apiserver")
}

/// Where the cached kube-proxy binary is, if it was built.
pub fn proxy_bin() -> Option<PathBuf> {
    cached("kube-proxy")
}

/// The directory tests/kube/build.sh caches the components in
/// (`$WEFT_CACHE_DIR/kube`, default `/var/cache/weft/kube`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("WEFT_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/weft"), PathBuf::from)
        .join("kube")
}

/// `$WEFT_CACHE_DIR/kube/<name>-1.20.2`, built by tests/kube/build.sh.
pub fn cached(name: &str) -> Option<PathBuf> {
    let bin = cache_dir().join(format!("{name}-{VERSION}"));
    bin.exists().then_some(bin)
}

/// How the API server runs, beyond what every lab gets.
#[derive(Clone, Debug, Default)]
pub struct ApiOptions {
    /// More static tokens: (token, user, groups separated by commas).
    pub tokens: Vec<(String, String, String)>,
    /// A whole cluster talks to it (kubelets, controllers): the Node
    /// authorizer before RBAC, kubelets reached at their InternalIP, and the
    /// `kubernetes` Service's endpoints kept (in-cluster clients use it).
    pub cluster: bool,
    /// Dual-stack Services: 1.20's alpha `IPv6DualStack` gate on, and an
    /// IPv6 service range ([`SERVICE_CIDR6`]) beside the IPv4 one.
    pub dual_stack: bool,
    /// Also listens on [`API_IP6`] (IPv6-only nodes reach it there:
    /// [`KubeApi::kubeconfig6`]).
    pub ipv6: bool,
}

/// The IPv6 service range of a dual-stack API server (outside the lab's
/// IPv6 cluster CIDR 2001:2::/48).
pub const SERVICE_CIDR6: &str = "2001:2:200::/112";

/// Running etcd + kube-apiserver.
pub struct KubeApi {
    pub ns: Netns,
    pub dir: PathBuf,
    pub ca_pem: String,
    bin: PathBuf,
    opts: ApiOptions,
}

impl KubeApi {
    /// Starts etcd and the API server in `ns` (which gets 198.18.0.254 on
    /// `dev`) and waits until /readyz answers.
    pub fn start(lab: &mut Lab, ns: &Netns, dev: &str) -> Self {
        Self::start_with(lab, ns, dev, ApiOptions::default())
    }

    /// [`KubeApi::start`] with `opts`.
    pub fn start_with(lab: &mut Lab, ns: &Netns, dev: &str, opts: ApiOptions) -> Self {
        let bin = apiserver_bin()
            .expect("kube-apiserver not built: run tests/kube/build.sh (cargo xtask setup does)");
        let dir = lab.dir.join("kube");
        std::fs::create_dir_all(&dir).unwrap();
        ns.ip(&["addr", "add", &format!("{API_IP}/24"), "dev", dev]);
        if opts.ipv6 {
            ns.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0");
            ns.ip(&["addr", "add", &format!("{API_IP6}/64"), "dev", dev, "nodad"]);
        }
        let p = |f: &str| dir.join(f).display().to_string();
        let ossl = |args: &[&str]| {
            sh("openssl", args);
        };
        ossl(&["genrsa", "-out", &p("ca.key"), "2048"]);
        ossl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("ca.key"),
            "-subj",
            "/CN=weft-test-ca",
            "-days",
            "2",
            "-out",
            &p("ca.crt"),
        ]);
        ossl(&["genrsa", "-out", &p("server.key"), "2048"]);
        ossl(&[
            "req",
            "-new",
            "-key",
            &p("server.key"),
            "-subj",
            "/CN=kube-apiserver",
            "-out",
            &p("server.csr"),
        ]);
        std::fs::write(
            dir.join("san.ext"),
            format!(
                "subjectAltName=IP:{API_IP},IP:{API_IP6},IP:{SERVICE_API_IP},IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            ),
        )
        .unwrap();
        ossl(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("san.ext"),
            "-out",
            &p("server.crt"),
        ]);
        ossl(&["genrsa", "-out", &p("sa.key"), "2048"]);
        ossl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")]);
        let mut tokens =
            format!("{ADMIN_TOKEN},admin,1,system:masters\n{AGENT_TOKEN},{AGENT_USER},2\n");
        for (i, (token, user, groups)) in opts.tokens.iter().enumerate() {
            tokens += &format!("{token},{user},{},\"{groups}\"\n", 100 + i);
        }
        std::fs::write(dir.join("tokens.csv"), tokens).unwrap();
        let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        let api = Self {
            ns: ns.clone(),
            dir,
            ca_pem,
            bin,
            opts,
        };
        api.start_etcd(lab);
        api.start_apiserver(lab);
        api
    }

    fn start_etcd(&self, lab: &mut Lab) {
        let mut etcd = self.ns.command("etcd");
        etcd.args(["--name", "weft-test", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
            ])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .args([
                "--initial-cluster",
                "weft-test=http://127.0.0.1:2380",
                "--log-level",
                "warn",
            ]);
        lab.spawn("etcd", etcd);
    }

    /// Starts (or restarts) the API server and waits for /readyz.
    pub fn start_apiserver(&self, lab: &mut Lab) {
        let d = |f: &str| format!("{}", self.dir.join(f).display());
        let mut cmd = self.ns.command(&self.bin);
        cmd.args([
            "--etcd-servers=http://127.0.0.1:2379",
            // With an IPv6 address too: every address of the namespace.
            &format!(
                "--bind-address={}",
                if self.opts.ipv6 { "::" } else { API_IP }
            ),
            &format!("--advertise-address={API_IP}"),
            &format!("--secure-port={API_PORT}"),
            "--insecure-port=0",
            &format!("--tls-cert-file={}", d("server.crt")),
            &format!("--tls-private-key-file={}", d("server.key")),
            &format!("--token-auth-file={}", d("tokens.csv")),
            &format!("--service-account-key-file={}", d("sa.pub")),
            &format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc",
            // As kubeadm and every installer: kube-proxy's DaemonSet and
            // weft's are privileged.
            "--allow-privileged=true",
        ]);
        if self.opts.dual_stack {
            cmd.args([
                "--feature-gates=IPv6DualStack=true".to_string(),
                format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}"),
            ]);
        } else {
            cmd.arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
        }
        if self.opts.cluster {
            cmd.args([
                // As kubeadm: kubelets may read what their own pods use.
                "--authorization-mode=Node,RBAC",
                // The node names resolve nowhere here.
                "--kubelet-preferred-address-types=InternalIP",
            ]);
        } else {
            // No one reaches the API through the `kubernetes` Service.
            cmd.args([
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
            ]);
        }
        lab.spawn("kube-apiserver", cmd);
        self.wait_ready(lab);
    }

    /// Stops the API server (etcd keeps the data).
    pub fn stop_apiserver(&self, lab: &mut Lab) {
        lab.stop("kube-apiserver");
    }

    fn wait_ready(&self, lab: &Lab) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .curl("/readyz")
                .args(["-o", "/dev/null", "-w", "%{http_code}"])
                .output();
            if out.as_ref().is_ok_and(|o| o.stdout == b"200") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kube-apiserver not ready in 60 s:\n{}",
                lab.log("kube-apiserver")
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates Service `name` in `default`: `cluster_ip` port 80, TCP and
    /// UDP, to `target` on its endpoints (which the caller sets).
    pub fn create_service(&self, name: &str, cluster_ip: std::net::Ipv4Addr, target: u16) {
        self.request(
            "POST",
            "/api/v1/namespaces/default/services",
            &serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": cluster_ip.to_string(), "ports": [
                {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": target},
                {"name": "udp", "protocol": "UDP", "port": 80, "targetPort": target},
            ]}}),
        );
    }

    /// One request to the API server as admin (curl from the server's
    /// namespace): `method` on `path` with a JSON `body` (merge patch for
    /// PATCH). Panics unless it answers 2xx; returns the answer's JSON.
    pub fn request(&self, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let content_type = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        let out = self
            .curl(path)
            .args(["-w", "\n%{http_code}", "-X", method])
            .args(["-H", &format!("Content-Type: {content_type}")])
            .args(["--data-binary", &body.to_string()])
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (answer, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", "000"));
        assert!(
            code.starts_with('2'),
            "{method} {path}: HTTP {code}: {answer}"
        );
        serde_json::from_str(answer).unwrap_or_default()
    }

    /// curl for `path` on the API server as admin, from the server's namespace.
    fn curl(&self, path: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .args(["curl", "-sk", "-H"])
            .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
            .arg(format!("https://{API_IP}:{API_PORT}{path}"));
        cmd
    }

    /// Starts a real kube-proxy (iptables mode) in `node`'s namespace, as
    /// node `name`, watching this API server as admin. It touches only what
    /// is the namespace's own: its conntrack-table sizes are left alone.
    pub fn start_proxy(
        &self,
        lab: &mut Lab,
        node: &Netns,
        name: &str,
        node_ip: std::net::Ipv4Addr,
        cluster_cidr: &str,
    ) {
        let bin = proxy_bin()
            .expect("kube-proxy not built: run tests/kube/build.sh (cargo xtask setup does)");
        let kubeconfig = self.kubeconfig("kube-proxy", ADMIN_TOKEN);
        let mut cmd = node.command(bin);
        cmd.args(proxy_args(&kubeconfig, name, node_ip, cluster_cidr))
            // Endpoints, not EndpointSlices: no controller manager here
            // turns the one into the other. Both families' proxier when the
            // cluster CIDRs name both (`V4,V6`).
            .arg(if cluster_cidr.contains(',') {
                "--feature-gates=EndpointSliceProxying=false,IPv6DualStack=true"
            } else {
                "--feature-gates=EndpointSliceProxying=false"
            });
        lab.spawn(&format!("kube-proxy-{name}"), cmd);
    }

    /// Writes a kubeconfig for `token` and returns its path.
    pub fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        self.kubeconfig_for(name, token, &format!("{API_IP}:{API_PORT}"))
    }

    /// [`KubeApi::kubeconfig`] to the server's IPv6 address (with
    /// [`ApiOptions::ipv6`]).
    pub fn kubeconfig6(&self, name: &str, token: &str) -> PathBuf {
        assert!(
            self.opts.ipv6,
            "the API server listens on IPv6 only with ApiOptions::ipv6"
        );
        self.kubeconfig_for(name, token, &format!("[{API_IP6}]:{API_PORT}"))
    }

    fn kubeconfig_for(&self, name: &str, token: &str, server: &str) -> PathBuf {
        use std::fmt::Write as _;
        let b64 = base64(self.ca_pem.as_bytes());
        let mut s = String::new();
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: weft\n  cluster:\n    server: https://{server}\n    certificate-authority-data: {b64}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: weft\n    user: u\ncurrent-context: c\n"
        );
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, s).unwrap();
        path
    }
}

/// kube-proxy's flags for node `name` at `node_ip`: iptables mode, and
/// nothing that reaches beyond the node's own namespace (conntrack-table
/// sizes and timeouts are the machine's, in init_net).
pub fn proxy_args(
    kubeconfig: &std::path::Path,
    name: &str,
    node_ip: std::net::Ipv4Addr,
    cluster_cidr: &str,
) -> Vec<String> {
    [
        format!("--kubeconfig={}", kubeconfig.display()),
        "--proxy-mode=iptables".into(),
        format!("--hostname-override={name}"),
        // Its node's address (else it waits for a Node object).
        format!("--bind-address={node_ip}"),
        format!("--cluster-cidr={cluster_cidr}"),
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
        "--healthz-bind-address=127.0.0.1:10256".into(),
        "--oom-score-adj=0".into(),
        "--v=2".into(),
    ]
    .into()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
