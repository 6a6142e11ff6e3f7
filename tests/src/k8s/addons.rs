//! The cluster's add-ons beyond weft: its DNS.

use std::time::Duration;

use super::KubeCluster;

/// The cluster's DNS domain (kubelet `--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The `kube-dns` Service's ClusterIP (kubelet `--cluster-dns`).
pub const CLUSTER_DNS_IP: &str = "198.18.200.10";
/// The lab's DNS server image (tests/kube/dns; `cargo xtask` builds it).
pub const CLUSTER_DNS_IMAGE: &str = "localhost/weft-lab/cluster-dns:lab";

/// The cluster's DNS, as an add-on is installed: tests/kube/dns (what
/// CoreDNS's kubernetes plugin answers) behind the `kube-dns` Service, so
/// every lookup crosses the pod network.
const CLUSTER_DNS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: cluster-dns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: lab:cluster-dns}
rules:
  - apiGroups: [""]
    resources: ["services", "endpoints"]
    verbs: ["list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: lab:cluster-dns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: lab:cluster-dns}
subjects: [{kind: ServiceAccount, name: cluster-dns, namespace: kube-system}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cluster-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: cluster-dns
      dnsPolicy: Default
      priorityClassName: system-cluster-critical
      containers:
        - name: dns
          image: CLUSTER_DNS_IMAGE
          args: ["--domain=CLUSTER_DOMAIN"]
          ports:
            - {containerPort: 53, protocol: UDP, name: dns}
            - {containerPort: 53, protocol: TCP, name: dns-tcp}
          readinessProbe:
            tcpSocket: {port: 53}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: CLUSTER_DNS_IP
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
"#;

impl KubeCluster {
    /// The cluster's DNS add-on ([`CLUSTER_DNS`]); it needs the pod network.
    pub fn install_dns(&mut self, say: &mut impl FnMut(&str)) {
        self.apply(
            "cluster-dns",
            &CLUSTER_DNS
                .replace("CLUSTER_DNS_IMAGE", CLUSTER_DNS_IMAGE)
                .replace("CLUSTER_DOMAIN", CLUSTER_DOMAIN)
                .replace("CLUSTER_DNS_IP", CLUSTER_DNS_IP),
        );
        self.wait_pods_ready(
            "kube-system",
            "k8s-app=kube-dns",
            1,
            Duration::from_secs(90),
        );
        say(&format!(
            "cluster DNS: tests/kube/dns behind the kube-dns Service ({CLUSTER_DNS_IP}), {CLUSTER_DOMAIN}"
        ));
    }
}
