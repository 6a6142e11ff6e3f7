//! `weft-cni`: the CNI plugin. Install it as `weft` in the runtime's CNI
//! plugin directory (e.g. /opt/cni/bin/weft) for `"type": "weft"`.

fn main() {
    std::process::exit(weft_agent::cni::main());
}
