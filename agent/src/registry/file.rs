//! The `file` registry: a TOML file, re-read when it changes.
//!
//! ```toml
//! [[node]]
//! name = "node-1"
//! underlay_ip = "198.18.0.1"
//! pod_cidr = "198.19.1.0/24"
//! vtep_mac = "0e:77:c6:12:00:01"   # optional; derived from underlay_ip when absent
//! ```

use std::{net::Ipv4Addr, path::Path};

use serde::Deserialize;

use crate::{
    cidr::Ipv4Cidr,
    host::netdev,
    registry::{BoxFuture, Node, Published, Registry, Snapshot, Vocabulary},
};

/// Errors reading a registry as a whole (as opposed to one bad entry).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("reading node file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "node file {path} is not valid TOML: {message}. Fix the file; the dataplane keeps its current state meanwhile"
    )]
    Toml { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNodes {
    #[serde(default)]
    node: Vec<FileNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: String,
    underlay_ip: String,
    pod_cidr: String,
    vtep_mac: Option<String>,
}

/// Reads the node file at `path`.
pub fn read_file(path: &Path, cluster: &Ipv4Cidr) -> Result<Snapshot, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_file(&text, cluster).map_err(|message| RegistryError::Toml {
        path: path.display().to_string(),
        message,
    })
}

/// The file's nodes, parsed one `[[node]]` table at a time: the TOML
/// parser's document of a whole 50,000-node file takes some 65 MiB at once
/// (and the allocator keeps it), one table's a few hundred bytes. Where the
/// pieces do not parse on their own (a table header inside a multi-line
/// string, say) the file is parsed whole, which also gives the error with
/// its line.
fn parse_nodes(text: &str) -> Result<Vec<FileNode>, String> {
    let whole = || {
        toml::from_str::<FileNodes>(text)
            .map(|f| f.node)
            .map_err(|e| toml_error(text, &e))
    };
    let mut starts: Vec<usize> = text
        .split_inclusive('\n')
        .scan(0, |at, line| {
            let start = *at;
            *at += line.len();
            Some((start, line))
        })
        .filter(|(_, line)| line.trim() == "[[node]]")
        .map(|(start, _)| start)
        .collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    starts.push(text.len());
    let mut nodes = Vec::with_capacity(starts.len());
    for w in starts.windows(2) {
        match toml::from_str::<FileNodes>(&text[w[0]..w[1]]) {
            Ok(f) => nodes.extend(f.node),
            Err(_) => return whole(),
        }
    }
    Ok(nodes)
}

/// Parses node-file text; `Err` only when the TOML itself is unreadable.
pub fn parse_file(text: &str, cluster: &Ipv4Cidr) -> Result<Snapshot, String> {
    let file = FileNodes {
        node: parse_nodes(text)?,
    };
    let mut problems = Vec::new();
    let mut candidates = Vec::new();
    for (i, n) in file.node.into_iter().enumerate() {
        let what = if n.name.is_empty() {
            format!("node #{}", i + 1)
        } else {
            format!("node `{}`", n.name)
        };
        if n.name.is_empty() {
            problems.push(format!(
                "{what}: `name` is empty; give every node a unique name"
            ));
            continue;
        }
        let ip: Ipv4Addr = match n.underlay_ip.parse() {
            Ok(ip) => ip,
            Err(_) => {
                problems.push(format!(
                    "{what}: underlay_ip `{}` is not an IPv4 address",
                    n.underlay_ip
                ));
                continue;
            }
        };
        let cidr: Ipv4Cidr = match n.pod_cidr.parse() {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{what}: pod_cidr: {e}"));
                continue;
            }
        };
        let mac = match &n.vtep_mac {
            None => netdev::vtep_mac_for(ip),
            Some(s) => match netdev::parse_mac(s) {
                Some(m) if m[0] & 1 == 0 => m,
                _ => {
                    problems.push(format!(
                        "{what}: vtep_mac `{s}` is not a unicast MAC like 0e:77:c6:12:00:01"
                    ));
                    continue;
                }
            },
        };
        candidates.push(Node {
            name: n.name,
            underlay_ip: ip,
            pod_cidr: cidr,
            vtep_mac: mac,
        });
    }
    Ok(Snapshot::validated(
        candidates,
        problems,
        cluster,
        Vocabulary::FILE,
    ))
}

/// A TOML error as one line that points into the file: `line N: message`
/// (the message alone where the parser gives no position).
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = 1 + text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            format!("line {line}: {}", e.message().trim_end())
        }
        None => e.message().trim_end().to_string(),
    }
}

/// The `file` registry: a TOML file, re-read when it changes.
pub struct FileRegistry {
    pub path: std::path::PathBuf,
    pub cluster: Ipv4Cidr,
    pub poll: std::time::Duration,
}

impl Registry for FileRegistry {
    fn run(self: Box<Self>, tx: tokio::sync::watch::Sender<Published>) -> BoxFuture<()> {
        Box::pin(async move {
            let stamp = |p: &Path| {
                use std::os::unix::fs::MetadataExt as _;
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.mtime(), m.mtime_nsec(), m.ino(), m.len()))
            };
            let mut seen = None;
            let mut first = true;
            let mut last_problems: Vec<String> = Vec::new();
            loop {
                let now = stamp(&self.path);
                if first || now != seen {
                    first = false;
                    seen = now;
                    let started = std::time::Instant::now();
                    match read_file(&self.path, &self.cluster) {
                        Ok(snap) => {
                            if snap.problems != last_problems {
                                for p in &snap.problems {
                                    tracing::error!("node registry: {p}");
                                }
                                last_problems = snap.problems.clone();
                            }
                            tx.send_modify(|p| {
                                p.replace(snap);
                                p.took = started.elapsed();
                            });
                        }
                        Err(e) => tracing::error!("{e}"),
                    }
                }
                tokio::time::sleep(self.poll).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Ipv4Cidr {
        "198.19.0.0/16".parse().unwrap()
    }

    #[test]
    fn good_file() {
        let s = parse_file(
            r#"
            [[node]]
            name = "a"
            underlay_ip = "198.18.0.1"
            pod_cidr = "198.19.1.0/24"
            [[node]]
            name = "b"
            underlay_ip = "198.18.0.2"
            pod_cidr = "198.19.2.0/24"
            vtep_mac = "02:00:00:00:00:02"
            "#,
            &cluster(),
        )
        .unwrap();
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[0].vtep_mac, [0x0e, 0x77, 198, 18, 0, 1]);
        assert_eq!(s.nodes[1].vtep_mac, [2, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn bad_entries_are_skipped_with_one_line_each() {
        let s = parse_file(
            r#"
            [[node]]
            name = "a"
            underlay_ip = "198.18.0.1"
            pod_cidr = "198.19.1.0/24"
            [[node]]
            name = "badip"
            underlay_ip = "198.18.0.300"
            pod_cidr = "198.19.3.0/24"
            [[node]]
            name = "overlap"
            underlay_ip = "198.18.0.4"
            pod_cidr = "198.19.1.128/25"
            [[node]]
            name = "outside"
            underlay_ip = "198.18.0.5"
            pod_cidr = "10.0.0.0/24"
            [[node]]
            name = "hostbits"
            underlay_ip = "198.18.0.6"
            pod_cidr = "198.19.6.1/24"
            [[node]]
            name = "a"
            underlay_ip = "198.18.0.7"
            pod_cidr = "198.19.7.0/24"
            [[node]]
            name = "mac"
            underlay_ip = "198.18.0.8"
            pod_cidr = "198.19.8.0/24"
            vtep_mac = "01:00:5e:00:00:01"
            "#,
            &cluster(),
        )
        .unwrap();
        assert_eq!(
            s.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(s.problems.len(), 6, "{:#?}", s.problems);
        for (needle, p) in [
            "badip",
            "hostbits",
            "mac",
            "overlaps node `a`",
            "outside the cluster",
            "listed twice",
        ]
        .iter()
        .map(|n| (n, s.problems.iter().find(|p| p.contains(n))))
        {
            assert!(
                p.is_some(),
                "no problem mentions {needle}: {:#?}",
                s.problems
            );
        }
    }

    #[test]
    fn tables_parsed_one_by_one_read_as_the_whole_file() {
        for text in [
            "# nodes\n[[node]]\nname = \"a\"\nunderlay_ip = \"198.18.0.1\"\npod_cidr = \"198.19.1.0/24\"\n\n  [[node]]  \nname = 'b'\nunderlay_ip = \"198.18.0.2\"\npod_cidr = \"198.19.2.0/24\"\n",
            "node = [{name = \"a\", underlay_ip = \"198.18.0.1\", pod_cidr = \"198.19.1.0/24\"}]\n",
            // A header line inside a multi-line string: one node, not two.
            "[[node]]\nname = \"a\"\nunderlay_ip = \"198.18.0.1\"\npod_cidr = \"198.19.1.0/24\"\nvtep_mac = \"\"\"\n[[node]]\n\"\"\"\n",
            "",
        ] {
            let whole: FileNodes = toml::from_str(text).unwrap();
            let names = |v: &[FileNode]| v.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
            assert_eq!(
                names(&parse_nodes(text).unwrap()),
                names(&whole.node),
                "{text}"
            );
        }
        let e = parse_nodes(concat!(
            "[[node]]\nname = \"a\"\nunderlay_ip = \"198.18.0.1\"\npod_cidr = \"198.19.1.0/24\"\n",
            "[[node]]\nname = \"b\"\nunderlay_ip = \"198.18.0.2\"\npod_cidr = \"198.19.2.0/24\"\nbogus = 1\n",
        ))
        .unwrap_err();
        assert!(e.starts_with("line 9: "), "the whole file's line: {e}");
    }

    #[test]
    fn malformed_toml_is_an_error() {
        let e = parse_file("[[node]\nname=", &cluster()).unwrap_err();
        assert!(e.starts_with("line 1: "), "names the line: {e}");
        let e = parse_file("[[node]]\nname = \"a\"\nbogus = 1\n", &cluster()).unwrap_err();
        assert!(e.contains("bogus") || e.contains("unknown"), "{e}");
        assert!(e.starts_with("line 3: "), "names the line: {e}");
    }
}
