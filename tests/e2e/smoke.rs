use weft_tests::*;

#[test]
fn smoke() {
    if !privileged("smoke") {
        return;
    }
    let mut lab = Lab::new("sm");
    let c = Cluster::start(
        &mut lab,
        ClusterSpec {
            nodes: 2,
            pods_per_node: 2,
            ..Default::default()
        },
    );
    let s = c.weft(0, &["status"]);
    println!("{}", String::from_utf8_lossy(&s.stdout));
    let a = &c.pods[0];
    let b = &c.pods[1];
    let r = &c.pods[2];
    println!("same node: {}", ping(&a.ns, b.ip, 3));
    println!("cross node: {}", ping(&a.ns, r.ip, 3));
    println!("host->local pod: {}", ping(&c.nodes[0].ns, a.ip, 3));
    println!("host->remote pod: {}", ping(&c.nodes[0].ns, r.ip, 3));
    println!(
        "pod->remote host: {}",
        ping(&a.ns, c.nodes[1].underlay_ip, 3)
    );
    let s = c.weft(0, &["status"]);
    println!("{}", String::from_utf8_lossy(&s.stdout));
    let s = c.weft(1, &["status"]);
    println!("{}", String::from_utf8_lossy(&s.stdout));
    println!("{}", lab.log("agent-1"));
    if let Ok(s) = std::env::var("DEBUG_SLEEP") {
        std::thread::sleep(std::time::Duration::from_secs(s.parse().unwrap()));
    }
}
