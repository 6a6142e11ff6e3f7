//! A test's own client of a lab API server (kube-rs, as admin), shared by
//! the suites that drive Node objects (`#[path]`-included: each test binary
//! uses what it needs).
#![allow(dead_code)]

use k8s_openapi::api::{
    core::v1::Node,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use weft_tests::{
    InNetns, Netns,
    kube::{ADMIN_TOKEN, AGENT_USER, KubeApi, apiserver_bin},
};

/// Skips (or, where privileged tests are required, fails) without a built
/// kube-apiserver.
pub fn have_apiserver(test: &str) -> bool {
    if apiserver_bin().is_some() {
        return true;
    }
    if std::env::var_os("WEFT_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
        panic!("kube-apiserver is not built; `cargo xtask setup` builds it (tests/kube/build.sh)");
    }
    eprintln!("SKIP {test}: kube-apiserver not built (tests/kube/build.sh)");
    false
}

/// Runs `f` with an admin client on a runtime whose sockets live in `ns`.
pub fn with_client<T: Send + 'static>(
    ns: &Netns,
    api: &KubeApi,
    f: impl AsyncFnOnce(Client) -> T + Send + 'static,
) -> T {
    let ns = ns.clone();
    let kubeconfig = api.kubeconfig("admin", ADMIN_TOKEN);
    std::thread::spawn(move || {
        let _inside = InNetns::enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            f(Client::try_from(config).unwrap()).await
        })
    })
    .join()
    .unwrap()
}

pub fn node(name: &str, cidr: Option<&str>, annotations: &[(&str, &str)]) -> Node {
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    let mut spec = serde_json::json!({});
    if let Some(c) = cidr {
        spec = serde_json::json!({"podCIDR": c, "podCIDRs": [c]});
    }
    serde_json::from_value(
        serde_json::json!({"metadata": {"name": name, "annotations": ann}, "spec": spec}),
    )
    .unwrap()
}

pub fn create(ns: &Netns, api: &KubeApi, n: Node) {
    with_client(ns, api, async move |c| {
        Api::<Node>::all(c)
            .create(&PostParams::default(), &n)
            .await
            .unwrap();
    });
}

pub fn delete(ns: &Netns, api: &KubeApi, name: &str) {
    let name = name.to_string();
    with_client(ns, api, async move |c| {
        Api::<Node>::all(c)
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
    });
}

/// Merge-patches `metadata.<field>.<key> = value` on Node `name`.
pub fn patch_meta(ns: &Netns, api: &KubeApi, name: &str, field: &str, key: &str, value: &str) {
    let (name, patch) = (
        name.to_string(),
        serde_json::json!({"metadata": {field: {key: value}}}),
    );
    with_client(ns, api, async move |c| {
        Api::<Node>::all(c)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    });
}

pub fn label(ns: &Netns, api: &KubeApi, name: &str, value: &str) {
    patch_meta(ns, api, name, "labels", "weft-test", value);
}

pub fn annotate(ns: &Netns, api: &KubeApi, name: &str, key: &str, value: &str) {
    patch_meta(ns, api, name, "annotations", key, value);
}

/// deploy/rbac.yaml's ClusterRole as it is, bound to the agents' user
/// (the daemonset test binds it to the ServiceAccount, as the file does).
pub fn bind_agent_rbac(und: &Netns, api: &KubeApi) {
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
        .unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&rbac).unwrap();
    let role: ClusterRole = serde_json::from_value(
        docs.into_iter()
            .find(|d| d["kind"] == "ClusterRole")
            .expect("a ClusterRole in deploy/rbac.yaml"),
    )
    .unwrap();
    let role_name = role.metadata.name.clone().unwrap();
    with_client(und, api, async move |client| {
        Api::<ClusterRole>::all(client.clone())
            .create(&PostParams::default(), &role)
            .await
            .unwrap();
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "weft-agent-test-user"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": AGENT_USER}]
        }))
        .unwrap();
        Api::<ClusterRoleBinding>::all(client)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    });
}
