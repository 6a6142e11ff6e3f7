//! deploy/weft.yaml on a real API server and a real container runtime.
//!
//! The manifests (rbac.yaml, weft.yaml) are applied to a real kube-apiserver
//! as they are, except for the two settings a user edits (cluster CIDR and
//! underlay interface, in the ConfigMap). No kubelet runs here, so the test
//! does the kubelet's part for each node, no more: it takes the DaemonSet's
//! pod template back from the API server, resolves `spec.nodeName`, mounts a
//! service-account token (TokenRequest) where in-cluster clients look for it,
//! probes the readiness and liveness URLs itself, and hands the pod to podman
//! (`podman kube play`, runc) running in the node's network namespace. Each
//! node also gets its own mount namespace with an empty /run, /opt, /etc/cni
//! and /var/lib, so the template's hostPath volumes land on the test's node,
//! never on this machine; node-1 has a fresh bpffs at /sys/fs/bpf, node-2
//! none (its agent must mount one, for the node). The image is
//! `cargo xtask image`'s OCI archive (`cargo xtask test` builds one from the
//! binaries under test).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::{Value, json};
use weft_tests::{
    Cluster, ClusterSpec, Lab, NodeInfo, busybox_image,
    kube::{API_IP, API_PORT, KubeApi, apiserver_bin},
    privileged, sh, try_sh, wait_for,
};

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// The agent image under test: `$WEFT_IMAGE`, else target/weft-image.tar.
fn image() -> PathBuf {
    let path = std::env::var_os("WEFT_IMAGE").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/weft-image.tar"
            ))
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask image` builds it (`cargo xtask test` does it itself)",
        path.display()
    );
    path
}

/// Every document of a manifest file.
fn manifest(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(MANIFESTS).join(name)).unwrap();
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("deploy/{name}: {e}"))
}

/// The API path that creates objects of `doc`'s kind.
fn collection(doc: &Value) -> String {
    let ns = doc["metadata"]["namespace"].as_str();
    let (prefix, plural) = match doc["kind"].as_str().unwrap() {
        "ServiceAccount" => ("/api/v1", "serviceaccounts"),
        "ConfigMap" => ("/api/v1", "configmaps"),
        "ClusterRole" => ("/apis/rbac.authorization.k8s.io/v1", "clusterroles"),
        "ClusterRoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings"),
        "DaemonSet" => ("/apis/apps/v1", "daemonsets"),
        other => panic!("the test does not know where a {other} goes: extend collection()"),
    };
    match ns {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}"),
        None => format!("{prefix}/{plural}"),
    }
}

/// Replaces `from` with `to` in `text`, which must contain it: if the
/// manifest changes shape, the test says so instead of testing something else.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "deploy/weft.yaml's agent.toml no longer has {from:?}"
    );
    text.replace(from, to)
}

/// A node as a kubelet's host sees it: the lab node's network namespace, a
/// mount namespace of its own, and podman as its container runtime.
struct KubeletNode {
    node: NodeInfo,
    dir: PathBuf,
    /// The mount namespace (a bind of /proc/PID/ns/mnt).
    mnt: PathBuf,
}

impl KubeletNode {
    /// `bpffs`: whether the node has bpffs mounted at /sys/fs/bpf (systemd
    /// mounts it); without, /sys/fs/bpf is a plain directory on a shared
    /// mount, and the agent must mount bpffs there for the node.
    fn new(lab: &Lab, node: &NodeInfo, bpffs: bool) -> Self {
        let dir = lab.dir.join(format!("kubelet-{}", node.name));
        let ns_dir = dir.join("ns");
        std::fs::create_dir_all(&ns_dir).unwrap();
        // A persistent mount namespace is a bind mount of its nsfs file,
        // which must not sit on a shared mount.
        let d = ns_dir.to_str().unwrap();
        sh("mount", &["--bind", d, d]);
        sh("mount", &["--make-private", d]);
        let mnt = ns_dir.join("mnt");
        std::fs::write(&mnt, "").unwrap();
        let k = Self {
            node: node.clone(),
            dir: dir.clone(),
            mnt,
        };
        sh(
            "unshare",
            &[
                &format!("--mount={}", k.mnt.display()),
                "--propagation",
                "private",
                "true",
            ],
        );
        // The node's own host paths: what hostPath volumes and the CNI
        // plugin write goes here, and dies with the namespace.
        let bpf = if bpffs {
            "mount -t bpf bpf /sys/fs/bpf"
        } else {
            "if mountpoint -q /sys/fs/bpf; then umount /sys/fs/bpf; fi
            mount --bind /sys/fs/bpf /sys/fs/bpf; mount --make-rshared /sys/fs/bpf"
        };
        let setup = format!(
            "for d in /run /opt /etc/cni /var/lib; do mount -t tmpfs -o mode=0755 weft-node $d; done
            {bpf}
            mkdir -p /opt/cni/bin /etc/cni/net.d
            cp /usr/lib/cni/portmap /opt/cni/bin/"
        );
        k.check(k.run("sh", &["-ec", &setup]), "node mount namespace");
        std::fs::write(
            dir.join("containers.conf"),
            // Equal soft and hard nofile limits: podman 4.3 swaps them for
            // a pod's infra container. The CNI plugins come from the node's
            // /opt/cni/bin, as a kubelet's runtime takes them.
            "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=1024:1024\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/opt/cni/bin\"]\n",
        )
        .unwrap();
        k
    }

    /// Runs `program args…` in the node's network and mount namespaces.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        std::process::Command::new("nsenter")
            .arg(format!("--mount={}", self.mnt.display()))
            .arg(format!("--net={}", self.node.ns.path().display()))
            .arg(program)
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .unwrap_or_else(|e| panic!("nsenter {program}: {e}"))
    }

    fn podman(&self, args: &[&str]) -> Output {
        let store = weft_tests::podman_store_args(&self.dir);
        let mut all: Vec<&str> = store.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        self.run("podman", &all)
    }

    /// Panics with the output unless `out` succeeded; returns its stdout.
    fn check(&self, out: Output, what: &str) -> String {
        assert!(
            out.status.success(),
            "{what} on {}: {}{}",
            self.node.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `podman kube play` of `docs` (JSON is YAML).
    fn play(&self, docs: &[Value]) {
        let file = self.dir.join("play.yaml");
        let text: Vec<String> = docs.iter().map(Value::to_string).collect();
        std::fs::write(&file, text.join("\n---\n")).unwrap();
        let out = self.podman(&["kube", "play", file.to_str().unwrap()]);
        self.check(out, "podman kube play");
    }

    /// The log of the agent container of the pod [`daemon_pod`] names.
    fn agent_log(&self) -> String {
        let out = self.podman(&["logs", &format!("weft-{}-weft", self.node.name)]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// An HTTP GET from the node's network namespace; the status code.
    fn http_status(&self, url: &str) -> String {
        let out = self.run(
            "curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", url],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        let _ = self.podman(&["pod", "rm", "--all", "--force", "--time", "0"]);
        let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        let _ = try_sh("umount", &[self.mnt.to_str().unwrap_or_default()]);
        let _ = try_sh(
            "umount",
            &[self.dir.join("ns").to_str().unwrap_or_default()],
        );
    }
}

/// The pod a kubelet would run for the DaemonSet on `node`, in the form
/// podman plays it.
fn daemon_pod(template: &Value, node: &str, sa_dir: &Path) -> Value {
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!(node);
    // podman 4.3 applies the pod's restart policy to init containers too,
    // restarting install-cni for ever under Always; a kubelet does not.
    spec["restartPolicy"] = json!("OnFailure");
    let mut volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    volumes.push(
        json!({"name": "kube-api-access", "hostPath": {"path": sa_dir, "type": "Directory"}}),
    );
    spec["volumes"] = json!(volumes);
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            let mut env = Vec::new();
            for e in c["env"].as_array().into_iter().flatten() {
                let mut e = e.clone();
                if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    assert_eq!(
                        path, "spec.nodeName",
                        "the test resolves only spec.nodeName (the kubelet does more)"
                    );
                    e = json!({"name": e["name"], "value": node});
                }
                env.push(e);
            }
            env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": API_IP}));
            env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": API_PORT.to_string()}));
            c["env"] = json!(env);
            let mut mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
            mounts.push(json!({"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}));
            c["volumeMounts"] = json!(mounts);
            // The test probes these URLs itself (podman's health checks
            // need systemd and curl in the image).
            if let Some(c) = c.as_object_mut() {
                c.remove("readinessProbe");
                c.remove("livenessProbe");
            }
        }
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("weft-{node}"), "labels": template["metadata"]["labels"]},
        "spec": spec,
    })
}

/// The probe URLs of the template's agent container.
fn probe_urls(template: &Value) -> Vec<String> {
    let c = &template["spec"]["containers"][0];
    ["readinessProbe", "livenessProbe"]
        .iter()
        .map(|p| {
            let g = &c[p]["httpGet"];
            format!(
                "http://{}:{}{}",
                g["host"].as_str().expect("probe host"),
                g["port"],
                g["path"].as_str().expect("probe path")
            )
        })
        .collect()
}

/// An app container on `k` (busybox, network `weft` from the installed
/// conflist); its address.
fn app(k: &KubeletNode, name: &str) -> Ipv4Addr {
    k.check(
        k.podman(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "weft",
            "--cap-add",
            "NET_RAW",
            "localhost/busybox:latest",
            "sleep",
            "600",
        ]),
        "podman run (the runtime runs the installed weft CNI plugin)",
    );
    let ip = k.check(
        k.podman(&[
            "inspect",
            name,
            "--format",
            "{{.NetworkSettings.Networks.weft.IPAddress}}",
        ]),
        "podman inspect",
    );
    ip.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name} has no weft address: {ip:?}"))
}

fn ping(k: &KubeletNode, from: &str, to: Ipv4Addr) -> bool {
    k.podman(&["exec", from, "ping", "-c", "3", "-W", "2", &to.to_string()])
        .status
        .success()
}

#[test]
fn the_daemonset_runs_weft_on_every_node() {
    if !privileged("the_daemonset_runs_weft_on_every_node") {
        return;
    }
    assert!(
        apiserver_bin().is_some(),
        "kube-apiserver is not built; `cargo xtask setup` builds it (tests/kube/build.sh)"
    );
    let image = image();
    let mut lab = Lab::new("ds");
    let c = Cluster::new(&mut lab, ClusterSpec::nodes_only(2));
    let und = c.underlay.ns.clone();
    let api = KubeApi::start(&mut lab, &und, "br0");

    // The manifests, as a user applies them after setting the cluster CIDR
    // and the underlay interface in the ConfigMap.
    let mut docs = manifest("rbac.yaml");
    docs.extend(manifest("weft.yaml"));
    for doc in &mut docs {
        if doc["kind"] == "ConfigMap" {
            let toml = doc["data"]["agent.toml"].as_str().unwrap();
            let toml = edit(
                toml,
                "cluster-cidr = \"10.244.0.0/16\"",
                &format!("cluster-cidr = \"{}\"", weft_tests::CLUSTER_CIDR),
            );
            let toml = edit(&toml, "# iface = \"eth0\"", "iface = \"und0\"");
            doc["data"]["agent.toml"] = json!(toml);
        }
        api.request("POST", &collection(doc), doc);
    }
    for n in &c.nodes {
        api.request(
            "POST",
            "/api/v1/nodes",
            &json!({"metadata": {"name": n.name}, "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]}}),
        );
    }
    // What the API server stored (validated, defaults filled in).
    let ds = api.request(
        "GET",
        "/apis/apps/v1/namespaces/kube-system/daemonsets/weft",
        &Value::Null,
    );
    let config = api.request(
        "GET",
        "/api/v1/namespaces/kube-system/configmaps/weft-config",
        &Value::Null,
    );
    let template = &ds["spec"]["template"];
    let image_name = template["spec"]["containers"][0]["image"].as_str().unwrap();
    assert_eq!(
        template["spec"]["serviceAccountName"], "weft",
        "the pods run as deploy/rbac.yaml's ServiceAccount"
    );

    // The kubelet's service-account token for the pods: a TokenRequest
    // for kube-system/weft, so the API checks deploy/rbac.yaml's rules.
    let token = api.request(
        "POST",
        "/api/v1/namespaces/kube-system/serviceaccounts/weft/token",
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}}),
    );
    let sa_dir = lab.dir.join("serviceaccount");
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::write(
        sa_dir.join("token"),
        token["status"]["token"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(sa_dir.join("ca.crt"), &api.ca_pem).unwrap();
    std::fs::write(sa_dir.join("namespace"), "kube-system").unwrap();

    let busybox = busybox_image(&lab);
    // node-2 has no bpffs at /sys/fs/bpf until its agent mounts one.
    let nodes: Vec<KubeletNode> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| KubeletNode::new(&lab, n, i == 0))
        .collect();
    let urls = probe_urls(template);
    let start = |k: &KubeletNode| {
        k.play(&[config.clone(), daemon_pod(template, &k.node.name, &sa_dir)]);
    };
    let wait_ready = |k: &KubeletNode| {
        wait_for(
            &format!("the agent on {} to pass its probes", k.node.name),
            Duration::from_secs(30),
            || urls.iter().all(|u| k.http_status(u) == "200").then_some(()),
        );
    };
    for k in &nodes {
        k.check(
            k.podman(&["load", "--quiet", "--input", image.to_str().unwrap()]),
            "podman load (the image)",
        );
        let listed = k.check(
            k.podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]),
            "podman images",
        );
        assert!(
            listed.lines().any(|l| l == image_name),
            "the archive holds {image_name}, the image deploy/weft.yaml names: {listed}"
        );
        k.check(
            k.podman(&[
                "import",
                busybox.to_str().unwrap(),
                "localhost/busybox:latest",
            ]),
            "podman import (busybox)",
        );
        start(k);
    }
    for k in &nodes {
        wait_ready(k);
        // Its own Node is never reported as unannotated: the agent uses the
        // object its patch returned.
        let log = k.agent_log();
        assert!(
            !log.contains(&format!("Node {}: no weft.dev/underlay-ip", k.node.name))
                && !log.contains("not in the node registry yet"),
            "{}'s agent reported its own Node missing:\n{log}",
            k.node.name
        );
        // install-cni put the plugin and the ConfigMap's conflist in the
        // node's CNI directories.
        let installed = k.check(
            k.run("cat", &["/etc/cni/net.d/10-weft.conflist"]),
            "the installed conflist",
        );
        assert_eq!(
            serde_json::from_str::<Value>(&installed).unwrap(),
            serde_json::from_str::<Value>(config["data"]["10-weft.conflist"].as_str().unwrap())
                .unwrap(),
        );
        let on_disk: Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(MANIFESTS).join("10-weft.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&installed).unwrap(),
            on_disk,
            "the ConfigMap's conflist and deploy/10-weft.conflist are the same"
        );
        // The image's iptables installed the masquerade rules.
        let nat = k.run("iptables", &["-t", "nat", "-S", "WEFT-POSTRTG"]);
        assert!(
            String::from_utf8_lossy(&nat.stdout).contains("MASQUERADE"),
            "no masquerade rules on {} ({}); the agent's log:\n{}",
            k.node.name,
            String::from_utf8_lossy(&nat.stderr),
            k.agent_log()
        );
    }
    // Each agent published its Node's annotations with the pod's token.
    for n in &c.nodes {
        let node = api.request("GET", &format!("/api/v1/nodes/{}", n.name), &Value::Null);
        assert_eq!(
            node["metadata"]["annotations"]["weft.dev/underlay-ip"],
            n.underlay_ip.to_string(),
            "{}'s annotation",
            n.name
        );
    }

    // Workloads: the runtime attaches them with the installed plugin.
    let a = app(&nodes[0], "app-1");
    let b = app(&nodes[1], "app-2");
    for (ip, n) in [(a, &c.nodes[0]), (b, &c.nodes[1])] {
        let prefix = n.pod_cidr.trim_end_matches("0/24");
        assert!(ip.to_string().starts_with(prefix), "{ip} in {}", n.pod_cidr);
    }
    assert!(ping(&nodes[0], "app-1", b), "app-1 → app-2 across nodes");
    assert!(ping(&nodes[1], "app-2", a), "app-2 → app-1 across nodes");
    let status = nodes[0].check(
        nodes[0].podman(&["exec", "weft-node-1-weft", "weft", "status"]),
        "weft status in the agent's container",
    );
    assert!(
        status.contains(&c.nodes[1].pod_cidr),
        "weft status lists node-2: {status}"
    );

    // The bpffs node-2's agent mounted is the node's (Bidirectional
    // propagation), with the pins in it.
    let fs = nodes[1].check(
        nodes[1].run("stat", &["-f", "-c", "%T", "/sys/fs/bpf/weft"]),
        "stat of node-2's /sys/fs/bpf/weft",
    );
    assert_eq!(fs.trim(), "bpf_fs", "node-2's pins are on its own bpffs");

    // A rolling update, on the node whose bpffs the agent mounted: its
    // agent pod goes away (the pins stay in the node's bpffs through the
    // hostPath), traffic keeps flowing, and the new pod takes over the same
    // dataplane.
    nodes[1].check(
        nodes[1].podman(&["pod", "rm", "--force", "--time", "10", "weft-node-2"]),
        "podman pod rm (the old agent pod)",
    );
    assert_ne!(
        nodes[1].http_status(&urls[0]),
        "200",
        "the old agent is gone"
    );
    assert!(
        ping(&nodes[1], "app-2", a),
        "traffic crosses while node-2 has no agent"
    );
    assert!(ping(&nodes[0], "app-1", b));
    start(&nodes[1]);
    wait_ready(&nodes[1]);
    assert!(
        nodes[1].agent_log().contains("pods=1"),
        "the new agent re-pointed the existing pod:\n{}",
        nodes[1].agent_log()
    );
    assert!(
        ping(&nodes[1], "app-2", a),
        "and after the new agent started"
    );
    assert!(ping(&nodes[0], "app-1", b));

    // Uninstalling, as deploy/README.md says: with the agent's pod gone,
    // `weft down` from the image with the same host paths removes the
    // dataplane from the node.
    let k = &nodes[0];
    k.check(
        k.podman(&["pod", "rm", "--force", "--time", "10", "weft-node-1"]),
        "podman pod rm",
    );
    let down = k.check(
        k.podman(&[
            "run",
            "--rm",
            "--privileged",
            "--network",
            "host",
            "-v",
            "/sys/fs/bpf:/sys/fs/bpf",
            "-v",
            "/run/weft:/run/weft",
            image_name,
            "down",
        ]),
        "weft down from the image",
    );
    assert!(down.contains("removed pins"), "weft down: {down}");
    assert!(
        !k.run("ip", &["link", "show", "weft0"]).status.success(),
        "weft0 is gone"
    );
    assert!(
        !k.run("test", &["-e", "/sys/fs/bpf/weft"]).status.success(),
        "the pins are gone"
    );
    assert!(
        !k.run("iptables", &["-t", "nat", "-S", "WEFT-POSTRTG"])
            .status
            .success(),
        "the masquerade chain is gone"
    );
}
