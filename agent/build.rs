//! Builds the BPF object and hands its path to the crate, so `cargo build -p
//! weft-agent` always embeds the object built from the current sources.

#[path = "../xtask/src/ebpf.rs"]
#[expect(dead_code, reason = "shared with xtask; the build script uses a part")]
mod ebpf;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest
        .parent()
        .expect("agent/ is in the workspace")
        .to_path_buf();
    for path in [
        "dataplane-ebpf/src",
        "dataplane-ebpf/Cargo.toml",
        "common/src",
        "common/Cargo.toml",
        "xtask/src/ebpf.rs",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    let object = match ebpf::build(&workspace, ebpf::Profile::Release) {
        Ok(object) => object,
        Err(e) => {
            println!("cargo:warning={e}");
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("weft-dataplane.o");
    std::fs::copy(&object, &out).expect("copy the BPF object into OUT_DIR");
}
