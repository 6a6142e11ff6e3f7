//! A real container runtime drives the plugin: podman (Debian's, CNI
//! network backend) runs containers on two weft nodes; they reach each other
//! across the overlay.

use std::path::{Path, PathBuf};

use weft_tests::{Cluster, ClusterSpec, Lab, NodeInfo, privileged, try_sh};

/// podman for one node: its own storage, runroot, containers.conf and
/// conflist, run inside the node's namespace (so the plugin runs there).
struct Podman {
    node: NodeInfo,
    dir: PathBuf,
}

impl Podman {
    fn new(lab: &Lab, node: &NodeInfo, image_tar: &Path) -> Self {
        let dir = lab.dir.join(format!("podman-{}", node.name));
        let bin = dir.join("cni-bin");
        let conf = dir.join("net.d");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        // CNI runs the binary named by "type": weft-cni installed as `weft`.
        std::os::unix::fs::symlink(weft_tests::cni_bin(), bin.join("weft")).unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin.display(),
                conf.display()
            ),
        )
        .unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "plugins": [
                {"type": "weft", "runDir": node.run_dir, "dataDir": dir.join("ipam")},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        std::fs::write(conf.join("10-weft.conflist"), conflist.to_string()).unwrap();
        let p = Self {
            node: node.clone(),
            dir,
        };
        let out = p.run(&[
            "import",
            image_tar.to_str().unwrap(),
            "localhost/weft-test:latest",
        ]);
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding the
        // cgroup mounts the OCI runtime needs.
        self.node
            .ns
            .command("podman")
            .args(weft_tests::podman_store_args(&self.dir))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .expect("run podman")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all", "--time", "0"]);
    }
}

#[test]
fn podman_containers_on_two_nodes_reach_each_other() {
    if !privileged("podman_containers_on_two_nodes_reach_each_other") {
        return;
    }
    if try_sh("podman", &["--version"]).status.code() != Some(0) {
        panic!("podman is missing: `cargo xtask setup` installs it");
    }
    let mut lab = Lab::new("pod");
    let c = Cluster::start(&mut lab, ClusterSpec::nodes_only(2));
    let image = weft_tests::busybox_image(&lab);

    let engines: Vec<Podman> = c
        .nodes
        .iter()
        .map(|n| Podman::new(&lab, n, &image))
        .collect();
    let mut ips = Vec::new();
    for (i, p) in engines.iter().enumerate() {
        let out = p.run(&[
            "run",
            "-d",
            "--ulimit",
            "nofile=1024:4096",
            "--ulimit",
            "nproc=1024:1024",
            "--name",
            &format!("c{i}"),
            "--network",
            "weft",
            "--cap-add",
            "NET_RAW",
            "localhost/weft-test:latest",
            "sleep",
            "600",
        ]);
        assert!(
            out.status.success(),
            "podman run on {}: {}",
            p.node.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let out = p.run(&[
            "inspect",
            &format!("c{i}"),
            "--format",
            "{{.NetworkSettings.Networks.weft.IPAddress}}",
        ]);
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            ip.starts_with(&format!("198.19.{}.", i + 1)),
            "container on {} got {ip:?} from weft's IPAM",
            p.node.name
        );
        ips.push(ip);
    }
    for (i, p) in engines.iter().enumerate() {
        let other = &ips[1 - i];
        let out = p.run(&[
            "exec",
            &format!("c{i}"),
            "ping",
            "-c",
            "3",
            "-W",
            "2",
            other,
        ]);
        assert!(
            out.status.success(),
            "container on {} → {other}: {}{}",
            p.node.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Removing a container runs CNI DEL: its endpoint disappears.
    let out = engines[0].run(&["rm", "--force", "--time", "0", "c0"]);
    assert!(
        out.status.success(),
        "podman rm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c.status(0)["endpoints"].as_array().unwrap().len(),
        0,
        "CNI DEL removed the endpoint"
    );
}
