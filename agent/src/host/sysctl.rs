//! Kernel settings under /proc/sys, written in the caller's network
//! namespace (no `sysctl` process).

use std::path::Path;

/// Writing a setting failed.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct SysctlError {
    pub path: String,
    pub source: std::io::Error,
}

/// Writes `value` to `key` (`net.ipv4.ip_forward` style).
pub fn set(key: &str, value: &str) -> Result<(), SysctlError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|source| SysctlError {
        path: path.display().to_string(),
        source,
    })
}
