//! Work inside another network namespace (a pod's), in-process: on a thread
//! of its own that enters the namespace with `setns(2)` and ends when the
//! work is done, so no other thread ever runs there. Never `nsenter`.

use std::{os::fd::AsRawFd, path::Path};

/// Entering a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter {
        path: String,
        source: std::io::Error,
    },
}

/// Runs `f` on a new thread inside the network namespace at `path` (a
/// nsfs file: `/var/run/netns/NAME`, `/proc/PID/ns/net`) and returns what it
/// returns. Sockets `f` opens belong to that namespace.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = std::fs::File::open(path).map_err(|source| NetnsError::Open {
        path: path.display().to_string(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a file we own, on a thread that ends with `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Enter {
                    path: path.display().to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .expect("the namespace thread does not panic")
    })
}
