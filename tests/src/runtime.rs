//! What the container-runtime tests run: an image made here, no registry,
//! and podman stores of their own.

use std::path::PathBuf;

use crate::lab::{Lab, sh};

/// A container image (a root filesystem tar for `podman import`) made here
/// from Debian's static busybox, no registry involved: `sh`, `ping`,
/// `sleep`, `ip`, `cat`. Written to `<lab>/busybox.tar`.
pub fn busybox_image(lab: &Lab) -> PathBuf {
    let rootfs = lab.dir.join("busybox-rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs dir");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (Debian's busybox-static; `cargo xtask setup` installs it)");
    for applet in ["sh", "ping", "sleep", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .expect("applet link");
    }
    let image = lab.dir.join("busybox.tar");
    sh(
        "tar",
        &[
            "-C",
            rootfs.to_str().expect("utf-8 path"),
            "-cf",
            image.to_str().expect("utf-8 path"),
            ".",
        ],
    );
    image
}

/// podman's flags for a private store under `dir` (images, containers,
/// runtime state; vfs works on any filesystem): nothing of the machine's
/// own podman is used.
pub fn podman_store_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--root".into(),
        dir.join("storage").display().to_string(),
        "--runroot".into(),
        dir.join("runroot").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ]
}
