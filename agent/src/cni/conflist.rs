//! The node's CNI configuration, installed by the agent once the node's
//! dataplane is ready (Cilium's `write-cni-conf-when-ready`).
//!
//! A container runtime reports a node's network ready as soon as a conflist
//! appears in its configuration directory, and the kubelet then marks the
//! Node Ready and pods land on it. Written by the agent after its first
//! sync, the conflist appears only when weft can wire pods: a node whose
//! agent cannot start stays NotReady instead of taking pods whose ADD fails.
//! The file is left in place when the agent stops (the dataplane stays
//! pinned and the plugin works without the agent), and put back if
//! something removes or changes it while the agent runs.

use std::path::{Path, PathBuf};

/// Errors of the CNI configuration settings.
#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    #[error(
        "write-cni-conf-when-ready is set but read-cni-conf is not: give the conflist to install (in weft's DaemonSet, the ConfigMap's /etc/weft/10-weft.conflist)"
    )]
    NoSource,
    #[error("read-cni-conf {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read-cni-conf {path} is not a CNI configuration list weft can install: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "writing the CNI configuration {path}: {source} (is the runtime's configuration directory, e.g. /etc/cni/net.d, mounted?)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A conflist to install, read and checked at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniConf {
    pub dest: PathBuf,
    text: String,
    /// Where the plugin keeps this network's IPAM store (its `dataDir`,
    /// then the network's name).
    pub ipam_dir: PathBuf,
}

/// What [`CniConf::ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// The file was there with this content.
    Present,
    /// It was missing or different, and is written now.
    Written,
}

impl CniConf {
    /// The settings' conflist: none unless `dest` is set; then `source` must
    /// be a conflist (a JSON object with `cniVersion`, `name` and a
    /// `plugins` list whose first plugin is weft's).
    pub fn from_settings(
        source: Option<&Path>,
        dest: Option<&Path>,
    ) -> Result<Option<Self>, CniConfError> {
        let Some(dest) = dest else {
            return Ok(None);
        };
        let source = source.ok_or(CniConfError::NoSource)?;
        let text = std::fs::read_to_string(source).map_err(|e| CniConfError::Read {
            path: source.into(),
            source: e,
        })?;
        let invalid = |message: String| CniConfError::Invalid {
            path: source.into(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
        for key in ["cniVersion", "name"] {
            if !v[key].is_string() {
                return Err(invalid(format!("no \"{key}\" string")));
            }
        }
        let Some(plugins) = v["plugins"].as_array().filter(|p| !p.is_empty()) else {
            return Err(invalid(
                "no \"plugins\" list (a single plugin's .conf is not a conflist)".into(),
            ));
        };
        if plugins[0]["type"] != "weft" {
            return Err(invalid(format!(
                "its first plugin is {}, not weft (\"type\": \"weft\")",
                plugins[0]["type"]
            )));
        }
        let name = v["name"].as_str().unwrap_or_default();
        let data_dir = plugins[0]["dataDir"]
            .as_str()
            .unwrap_or(crate::cni::DEFAULT_DATA_DIR);
        Ok(Some(Self {
            dest: dest.into(),
            ipam_dir: Path::new(data_dir).join(name),
            text,
        }))
    }

    /// Writes the conflist unless it is there as it should be; atomically
    /// (a temporary file in the same directory, renamed), so a runtime
    /// never reads half a file.
    pub fn ensure(&self) -> Result<Ensured, CniConfError> {
        if std::fs::read_to_string(&self.dest).is_ok_and(|t| t == self.text) {
            return Ok(Ensured::Present);
        }
        let werr = |source| CniConfError::Write {
            path: self.dest.clone(),
            source,
        };
        let name = self
            .dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Not ending in .conf/.conflist/.json: runtimes ignore it meanwhile.
        let tmp = self.dest.with_file_name(format!(".{name}.weft-tmp"));
        std::fs::write(&tmp, &self.text).map_err(werr)?;
        std::fs::rename(&tmp, &self.dest).map_err(werr)?;
        Ok(Ensured::Written)
    }

    /// Moves aside every other network configuration in the destination's
    /// directory that uses a plugin of type `plugin` (flannel's
    /// `10-flannel.conflist` sorts before `10-weft.conflist`, and a runtime
    /// takes the first): renamed to `<name>.weft-disabled`, which runtimes
    /// ignore and a roll-back can rename back. Returns the new names.
    pub fn disable_others(&self, plugin: &str) -> Vec<PathBuf> {
        let Some(dir) = self.dest.parent() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut moved = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if path == self.dest || !["conf", "conflist", "json"].contains(&ext) {
                continue;
            }
            let Ok(v) = std::fs::read_to_string(&path)
                .map_err(drop)
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(drop))
            else {
                continue;
            };
            let uses = v["type"] == plugin
                || v["plugins"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["type"] == plugin));
            if !uses {
                continue;
            }
            let mut aside = path.clone().into_os_string();
            aside.push(".weft-disabled");
            let aside = PathBuf::from(aside);
            match std::fs::rename(&path, &aside) {
                Ok(()) => moved.push(aside),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "could not move {plugin}'s CNI configuration aside: {e}; the runtime may keep using it")
                }
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-cniconf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const GOOD: &str =
        r#"{"cniVersion":"1.0.0","name":"weft","plugins":[{"type":"weft"},{"type":"portmap"}]}"#;

    #[test]
    fn written_once_then_put_back_when_removed_or_changed() {
        let d = dir("ok");
        std::fs::write(d.join("src"), GOOD).unwrap();
        let dest = d.join("10-weft.conflist");
        assert_eq!(CniConf::from_settings(None, None).unwrap(), None);
        let c = CniConf::from_settings(Some(&d.join("src")), Some(&dest))
            .unwrap()
            .unwrap();
        assert!(!dest.exists(), "nothing is written before ensure()");
        assert_eq!(c.ensure().unwrap(), Ensured::Written);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), GOOD);
        assert_eq!(c.ensure().unwrap(), Ensured::Present);
        std::fs::write(&dest, "{}").unwrap();
        assert_eq!(c.ensure().unwrap(), Ensured::Written);
        std::fs::remove_file(&dest).unwrap();
        assert_eq!(c.ensure().unwrap(), Ensured::Written);
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "no temporary file is left: {left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn others_of_a_type_are_moved_aside() {
        let d = dir("aside");
        std::fs::write(d.join("src"), GOOD).unwrap();
        let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true}},{"type":"portmap"}]}"#;
        std::fs::write(d.join("10-flannel.conflist"), flannel).unwrap();
        std::fs::write(d.join("99-other.conf"), r#"{"type":"bridge"}"#).unwrap();
        std::fs::write(d.join("notes.txt"), r#"{"type":"flannel"}"#).unwrap();
        let c = CniConf::from_settings(Some(&d.join("src")), Some(&d.join("10-weft.conflist")))
            .unwrap()
            .unwrap();
        assert_eq!(c.ipam_dir, PathBuf::from("/var/lib/weft/ipam/weft"));
        c.ensure().unwrap();
        assert_eq!(
            c.disable_others("flannel"),
            vec![d.join("10-flannel.conflist.weft-disabled")]
        );
        assert!(d.join("99-other.conf").exists() && d.join("notes.txt").exists());
        assert!(d.join("10-weft.conflist").exists());
        assert_eq!(c.disable_others("flannel"), Vec::<PathBuf>::new());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let d = dir("bad");
        let dest = d.join("10-weft.conflist");
        let e = CniConf::from_settings(None, Some(&dest)).unwrap_err();
        assert!(e.to_string().contains("read-cni-conf is not"), "{e}");
        let e = CniConf::from_settings(Some(&d.join("none")), Some(&dest)).unwrap_err();
        assert!(matches!(e, CniConfError::Read { .. }), "{e}");
        for (text, says) in [
            ("{not json", "not JSON"),
            (r#"{"name":"weft","plugins":[]}"#, "cniVersion"),
            (
                r#"{"cniVersion":"1.0.0","name":"weft","type":"weft"}"#,
                "plugins",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
                "not weft",
            ),
        ] {
            std::fs::write(d.join("src"), text).unwrap();
            let e = CniConf::from_settings(Some(&d.join("src")), Some(&dest)).unwrap_err();
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
