//! The pin directory: bpffs (mounted where the node has none), and pins of
//! another version's map layout replaced.

use std::{fs, path::Path};

use weft_common::names;

use super::{DataplaneError, OBJECT};

/// What must match for a pinned map to be reused by the programs of this
/// build: the kernel checks program accesses against the map it gets, not
/// against what the program was compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The pinned maps. Each is rebuilt when it is replaced: the registry's by
/// the next sync, the counters and recorded flows start empty, and the
/// endpoints (the CNI plugin's record of the node's pods) are restored from
/// the pods' routes and neighbours ([`crate::endpoint::restore`]).
const PINNED_MAPS: [&str; 10] = [
    names::ENDPOINTS,
    names::REMOTE_CIDRS,
    names::ENDPOINTS6,
    names::REMOTE_CIDRS6,
    names::NODES,
    names::NODES6,
    names::STACK_FLOWS,
    names::STACK_FLOWS6,
    names::DROP_STATS,
    names::FWD_STATS,
];

/// Compares each pinned map under `pin_dir` with this build's definition.
/// A map of another layout (say an older version's counters, with fewer
/// reasons) is unpinned, so loading creates it anew — the programs still
/// attached keep the old one until they are replaced, so pods keep
/// forwarding meanwhile.
pub fn replace_stale_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    let object =
        aya_obj::Object::parse(OBJECT).map_err(|e| DataplaneError::Layout(e.to_string()))?;
    for name in PINNED_MAPS {
        let def = object
            .maps
            .get(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let wanted = MapLayout {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: def.max_entries(),
            flags: def.map_flags(),
        };
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let pinned = MapLayout {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        if pinned == wanted {
            continue;
        }
        fs::remove_file(&path).map_err(|source| DataplaneError::Io {
            path: path.clone(),
            source,
        })?;
        if name == names::ENDPOINTS {
            tracing::warn!(map = name, %pinned, %wanted, "the pinned endpoints map had another version's layout; replaced it, the node's pods are restored from their routes");
        } else {
            tracing::warn!(map = name, %pinned, %wanted, "a pinned map had another version's layout; replaced it with an empty one");
        }
    }
    Ok(())
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// True when `path` (which must exist) is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is valid; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `pin_dir` can hold pins: mounts bpffs at /sys/fs/bpf when the
/// directory is under it and nothing is mounted there yet (as Cilium does).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let root = Path::new("/sys/fs/bpf");
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    if !pin_dir.starts_with(root) {
        return Err(DataplaneError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    fs::create_dir_all(root).map_err(|source| DataplaneError::Io {
        path: root.into(),
        source,
    })?;
    // SAFETY: static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::Io {
            path: root.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_outside_bpffs_are_refused_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("weft-not-bpffs-{}", std::process::id()));
        let Err(e) = ensure_bpffs(&dir) else {
            panic!("{} taken for a bpffs", dir.display())
        };
        let m = e.to_string();
        assert!(matches!(e, DataplaneError::NotBpffs { .. }), "{e:?}");
        assert!(
            m.contains("mount -t bpf") && m.contains("/sys/fs/bpf"),
            "{m}"
        );
    }
}
