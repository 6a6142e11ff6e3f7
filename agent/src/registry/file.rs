//! The `file` registry: a TOML file, re-read when it changes.
//!
//! ```toml
//! [[node]]
//! name = "node-1"
//! underlay_ip = "198.18.0.1"
//! pod_cidr = "198.19.1.0/24"
//! vtep_mac = "0e:77:c6:12:00:01"   # optional; derived from underlay_ip when absent
//!
//! [[node]]                         # dual-stack: a list, one CIDR per family
//! name = "node-2"
//! underlay_ip = "198.18.0.2"
//! pod_cidrs = ["198.19.2.0/24", "2001:2:0:2::/64"]
//! underlay_ip6 = "2001:2:ffff::2"  # optional: IPv6 pods' VXLAN goes over IPv6
//! vtep_mac6 = "0e:77:c6:12:00:02"  # optional; vtep_mac when absent (a flannel
//!                                  # node: flannel-v6.1's MAC)
//! ```

use std::{net::Ipv4Addr, path::Path};

use serde::Deserialize;

use crate::{
    cidr::ClusterCidrs,
    host::netdev,
    registry::{
        BoxFuture, Node, Published, Registry, Snapshot, Underlay6, Vocabulary, pod_cidrs_of,
    },
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
    underlay_ip: Option<String>,
    pod_cidr: Option<String>,
    pod_cidrs: Option<Vec<String>>,
    vtep_mac: Option<String>,
    underlay_ip6: Option<String>,
    vtep_mac6: Option<String>,
}

/// Where each `[[node]]` table of `text` starts (a line holding only the
/// header), and the text's end: table `i` is `text[s[i]..s[i + 1]]`. The
/// first piece is whatever comes before the first header (empty, or
/// comments).
fn table_starts(text: &str) -> Vec<usize> {
    const HEADER: &str = "[[node]]";
    let bytes = text.as_bytes();
    let blank = |b: u8| b == b' ' || b == b'\t' || b == b'\r';
    let mut starts = vec![0];
    for at in memchr::memmem::find_iter(bytes, HEADER) {
        let mut line = at;
        while line > 0 && blank(bytes[line - 1]) {
            line -= 1;
        }
        let rest = &bytes[at + HEADER.len()..];
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        // At 0 it is the first piece's start already.
        if line > 0 && bytes[line - 1] == b'\n' && rest[..end].iter().all(|b| blank(*b)) {
            starts.push(line);
        }
    }
    starts.push(text.len());
    starts
}

/// The file's nodes, table by table (see [`table_starts`]), parsed one
/// `[[node]]` table at a time: the TOML parser's document of a whole
/// 50,000-node file takes some 65 MiB at once (and the allocator keeps it),
/// one table's a few hundred bytes. Where the pieces do not parse on their
/// own (a table header inside a multi-line string, say) the file is parsed
/// whole, as one piece, which also gives the error with its line.
fn parse_tables(text: &str, starts: &[usize]) -> Result<Vec<Vec<FileNode>>, String> {
    let mut tables = Vec::with_capacity(starts.len());
    for (i, w) in starts.windows(2).enumerate() {
        match toml::from_str::<FileNodes>(&text[w[0]..w[1]]) {
            // Nodes before the first header (`node = [...]`) and tables
            // after them: only the whole file says whether that is TOML.
            Ok(f)
                if i == 0
                    && !f.node.is_empty()
                    && starts.len() > 2
                    && !text.trim_start().starts_with("[[node]]") =>
            {
                return toml::from_str::<FileNodes>(text)
                    .map(|f| vec![f.node])
                    .map_err(|e| toml_error(text, &e));
            }
            // Deserialised into room for four nodes; a table holds one
            // (50,000 tables: 34 MiB instead of 8).
            Ok(mut f) => {
                f.node.shrink_to_fit();
                tables.push(f.node)
            }
            Err(_) => {
                return toml::from_str::<FileNodes>(text)
                    .map(|f| vec![f.node])
                    .map_err(|e| toml_error(text, &e));
            }
        }
    }
    Ok(tables)
}

#[cfg(test)]
fn parse_nodes(text: &str) -> Result<Vec<FileNode>, String> {
    Ok(parse_tables(text, &table_starts(text))?
        .into_iter()
        .flatten()
        .collect())
}

/// One table's node, or the problem with it; `i` is its place in the file
/// (for a node without a name).
fn node_of(i: usize, n: FileNode) -> Result<Node, String> {
    let what = if n.name.is_empty() {
        format!("node #{}", i + 1)
    } else {
        format!("node `{}`", n.name)
    };
    if n.name.is_empty() {
        return Err(format!(
            "{what}: `name` is empty; give every node a unique name"
        ));
    }
    let ip: Option<Ipv4Addr> = match &n.underlay_ip {
        None if n.underlay_ip6.is_some() => None,
        None => {
            return Err(format!(
                "{what}: no underlay_ip (or underlay_ip6, for a node with an IPv6 underlay only)"
            ));
        }
        Some(text) => Some(
            text.parse()
                .map_err(|_| format!("{what}: underlay_ip `{text}` is not an IPv4 address"))?,
        ),
    };
    let (cidr, cidr6) = match (n.pod_cidr, n.pod_cidrs) {
        // One CIDR of either family (an IPv6-only node's is IPv6).
        (Some(one), None) => {
            pod_cidrs_of(&[one], "pod_cidr").map_err(|e| format!("{what}: {e}"))?
        }
        (None, Some(list)) => {
            pod_cidrs_of(&list, "pod_cidrs").map_err(|e| format!("{what}: {e}"))?
        }
        (Some(_), Some(_)) => {
            return Err(format!(
                "{what}: both pod_cidr and pod_cidrs; give one (pod_cidrs for a dual-stack node)"
            ));
        }
        (None, None) => {
            return Err(format!(
                "{what}: no pod_cidr (or pod_cidrs, for a dual-stack node)"
            ));
        }
    };
    let unicast = |field: &str, s: &str| match netdev::parse_mac(s) {
        Some(m) if m[0] & 1 == 0 => Ok(m),
        _ => Err(format!(
            "{what}: {field} `{s}` is not a unicast MAC like 0e:77:c6:12:00:01"
        )),
    };
    let ip6 = match &n.underlay_ip6 {
        None => None,
        Some(text) => Some(
            text.parse()
                .map_err(|_| format!("{what}: underlay_ip6 `{text}` is not an IPv6 address"))
                .and_then(|ip| {
                    Underlay6::check_ip(ip).map_err(|e| format!("{what}: underlay_ip6: {e}"))
                })?,
        ),
    };
    if ip6.is_none() && n.vtep_mac6.is_some() {
        return Err(format!(
            "{what}: vtep_mac6 without underlay_ip6; give the node's IPv6 underlay address too, or drop vtep_mac6"
        ));
    }
    let mac6 = match &n.vtep_mac6 {
        Some(s) => Some(unicast("vtep_mac6", s)?),
        None => None,
    };
    let mac = match (&n.vtep_mac, ip, mac6) {
        (Some(s), _, _) => unicast("vtep_mac", s)?,
        // An IPv6-only node's one VTEP MAC is its IPv6 one.
        (None, None, Some(m6)) => m6,
        // `ip` or `ip6` is there (checked above).
        (None, _, _) => netdev::node_vtep_mac(ip, ip6).unwrap_or_default(),
    };
    let underlay6 = ip6.map(|ip| Underlay6 {
        ip,
        vtep_mac: mac6.unwrap_or(mac),
    });
    Ok(Node {
        name: n.name,
        underlay_ip: ip,
        pod_cidr: cidr,
        pod_cidr6: cidr6,
        vtep_mac: mac,
        underlay6,
    })
}

/// Parses node-file text; `Err` only when the TOML itself is unreadable.
pub fn parse_file(text: &str, cluster: &ClusterCidrs) -> Result<Snapshot, String> {
    Ok(read_tables(text.to_string(), table_starts(text), cluster)?.0)
}

/// [`parse_file`], and what the next read needs to find the tables a
/// change touched.
fn read_tables(
    text: String,
    starts: Vec<usize>,
    cluster: &ClusterCidrs,
) -> Result<(Snapshot, LastRead), String> {
    let tables = parse_tables(&text, &starts)?;
    // Parsed whole: no tables to compare next time.
    let by_table = tables.len() + 1 == starts.len();
    let mut problems = Vec::new();
    let mut candidates = Vec::new();
    let mut clean = Vec::with_capacity(tables.len());
    let mut i = 0;
    for table in tables {
        let one = table.len() == 1;
        let mut name = None;
        for n in table {
            match node_of(i, n) {
                Ok(node) => {
                    name = one.then(|| node.name.clone());
                    candidates.push(node);
                }
                Err(p) => problems.push(p),
            }
            i += 1;
        }
        clean.push(name);
    }
    let last = if by_table {
        LastRead {
            text,
            starts,
            clean,
        }
    } else {
        LastRead::default()
    };
    Ok((
        Snapshot::validated(candidates, problems, cluster, Vocabulary::FILE),
        last,
    ))
}

/// How many bytes `a` and `b` share at the front, compared a block at a
/// time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// How many bytes `a` and `b` share at the end, compared a block at a time.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let (la, lb) = (a.len(), b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[la - i - BLOCK..la - i] == b[lb - i - BLOCK..lb - i] {
        i += BLOCK;
    }
    while i < n && a[la - i - 1] == b[lb - i - 1] {
        i += 1;
    }
    i
}

/// An edit from one text to another, table by table: tables `..p` and the
/// last `q` are the same in both; the others were replaced.
#[derive(Debug, PartialEq, Eq)]
struct Edit {
    /// [`table_starts`] of the new text.
    starts: Vec<usize>,
    p: usize,
    q: usize,
}

/// The [`Edit`] from `old` (tables `old_starts`) to `new`, found from where
/// the bytes differ: a table whose bytes, and whose header line's, lie in
/// the common prefix or suffix is the same table in both, and only the
/// bytes between are searched for headers (no pass over the whole file).
fn edit(old: &str, old_starts: &[usize], new: &str) -> Edit {
    let (a, b) = (old.as_bytes(), new.as_bytes());
    let pre = common_prefix(a, b);
    let old_n = old_starts.len() - 1;
    if pre == a.len() && a.len() == b.len() {
        return Edit {
            starts: old_starts.to_vec(),
            p: old_n,
            q: 0,
        };
    }
    let suf = common_suffix(&a[pre..], &b[pre..]);
    let interior = &old_starts[1..old_n];
    // Kept at the front: a header whose line, newline included, lies in the
    // common prefix.
    let line_end = |s: usize| {
        a[s..]
            .iter()
            .position(|c| *c == b'\n')
            .map_or(usize::MAX, |e| s + e + 1)
    };
    let p = interior.partition_point(|s| line_end(*s) <= pre);
    // Kept at the back: a header whose line and the newline before it lie in
    // the common suffix.
    let q = interior.len() - interior.partition_point(|s| *s < a.len() - suf + 1);
    let (from, to_old) = (old_starts[p], old_starts[old_n - q]);
    let to_new = to_old + b.len() - a.len();
    let mut starts: Vec<usize> = old_starts[..=p].to_vec();
    let mid = table_starts(&new[from..to_new]);
    starts.extend(mid[1..mid.len() - 1].iter().map(|s| s + from));
    starts.extend(
        old_starts[old_n - q..]
            .iter()
            .map(|s| s + b.len() - a.len()),
    );
    Edit { starts, p, q }
}

/// The file as the registry last read it, table by table, to find what a
/// change touched without parsing the rest.
#[derive(Debug, Default)]
struct LastRead {
    text: String,
    /// [`table_starts`] of `text`; empty: compare nothing.
    starts: Vec<usize>,
    /// Per table: its node's name, if it is exactly one node that read
    /// without a problem.
    clean: Vec<Option<String>>,
}

/// The most tables a change may touch for [`changed_tables`] to be worth
/// it; more are read as a whole file.
const FEW: usize = 64;

impl LastRead {
    fn table<'a>(text: &'a str, starts: &[usize], i: usize) -> &'a str {
        &text[starts[i]..starts[i + 1]]
    }

    /// What changed from the last read to `text` (tables `starts`), when it
    /// is one run of at most [`FEW`] whole tables replaced, each old and
    /// new one a single clean node, and `published` holds every node of
    /// the last read (no problems, no conflicts). `None`: read it whole.
    fn changed_tables(&self, text: &str, published: &Published) -> Option<Tables> {
        if self.starts.is_empty() || !published.settled() {
            return None;
        }
        let Edit { starts, p, q } = edit(&self.text, &self.starts, text);
        let (old_n, new_n) = (self.starts.len() - 1, starts.len() - 1);
        let (gone, came) = (p..old_n - q, p..new_n - q);
        if gone.len() + came.len() > FEW {
            return None;
        }
        let gone_names: Vec<&String> = self.clean[gone.clone()]
            .iter()
            .map(Option::as_ref)
            .collect::<Option<_>>()?;
        let mut nodes = Vec::with_capacity(came.len());
        for j in came {
            let f = toml::from_str::<FileNodes>(Self::table(text, &starts, j)).ok()?;
            let [n] = <[FileNode; 1]>::try_from(f.node).ok()?;
            nodes.push(node_of(j, n).ok()?);
        }
        // A name that came must be new, or one that went (a node changed);
        // another table's would be a duplicate.
        let mut came_names = std::collections::BTreeSet::new();
        for n in &nodes {
            let free = !published.nodes.contains_key(&n.name) || gone_names.contains(&&n.name);
            if !free || !came_names.insert(n.name.clone()) {
                return None;
            }
        }
        let mut changes: Vec<(String, Option<Node>)> = gone_names
            .iter()
            .filter(|n| !came_names.contains(**n))
            .map(|n| ((*n).clone(), None))
            .collect();
        let names = nodes.iter().map(|n| Some(n.name.clone())).collect();
        changes.extend(nodes.into_iter().map(|n| (n.name.clone(), Some(n))));
        Some(Tables {
            changes,
            gone,
            names,
            starts,
        })
    }

    /// Makes this the read of `text` that `t` found; gives back the text it
    /// replaces (a buffer for the next read).
    fn commit(&mut self, text: String, t: Tables) -> String {
        self.clean.splice(t.gone, t.names);
        self.starts = t.starts;
        std::mem::replace(&mut self.text, text)
    }
}

/// What [`LastRead::changed_tables`] found.
struct Tables {
    /// The nodes to publish (`None`: gone).
    changes: Vec<(String, Option<Node>)>,
    /// The old tables replaced, and the names of the new ones.
    gone: std::ops::Range<usize>,
    names: Vec<Option<String>>,
    /// [`table_starts`] of the new text.
    starts: Vec<usize>,
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
    pub cluster: ClusterCidrs,
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
            let mut last = LastRead::default();
            let mut spare = String::new();
            loop {
                let now = stamp(&self.path);
                if first || now != seen {
                    first = false;
                    seen = now;
                    let started = std::time::Instant::now();
                    // Read into the buffer of the read before last: the
                    // pages of a large file are not faulted in afresh.
                    spare.clear();
                    let read = std::fs::File::open(&self.path)
                        .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut spare));
                    if let Err(source) = read {
                        let e = RegistryError::Read {
                            path: self.path.display().to_string(),
                            source,
                        };
                        tracing::error!("{e}");
                        tokio::time::sleep(self.poll).await;
                        continue;
                    }
                    // A few tables replaced: those nodes only.
                    let changed = last.changed_tables(&spare, &tx.borrow());
                    if let Some(mut t) = changed {
                        let mut done = true;
                        tx.send_if_modified(|p| {
                            for (name, node) in std::mem::take(&mut t.changes) {
                                done &= p.update(&name, node, &self.cluster);
                            }
                            p.took = started.elapsed();
                            true
                        });
                        if done {
                            spare = last.commit(std::mem::take(&mut spare), t);
                            tokio::time::sleep(self.poll).await;
                            continue;
                        }
                    }
                    let starts = table_starts(&spare);
                    match read_tables(std::mem::take(&mut spare), starts, &self.cluster) {
                        Ok((snap, read)) => {
                            spare = std::mem::replace(&mut last, read).text;
                            if spare.capacity() < last.text.len() {
                                // Pages written once now, not at the next
                                // read (a 4.5 MB file: about 1 ms of faults).
                                spare = last.text.clone();
                            }
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
                        Err(message) => tracing::error!(
                            "{}",
                            RegistryError::Toml {
                                path: self.path.display().to_string(),
                                message,
                            }
                        ),
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

    fn cluster() -> ClusterCidrs {
        ClusterCidrs {
            v4: Some("198.19.0.0/16".parse().unwrap()),
            v6: Some("2001:2::/48".parse().unwrap()),
        }
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
    fn dual_stack_nodes_and_their_bad_entries() {
        let node = |name: &str, n: u8, cidrs: &str| {
            format!("[[node]]\nname = \"{name}\"\nunderlay_ip = \"198.18.0.{n}\"\n{cidrs}\n")
        };
        let text = [
            node(
                "a",
                1,
                r#"pod_cidrs = ["198.19.1.0/24", "2001:2:0:1::/64"]"#,
            ),
            node("v4only", 2, r#"pod_cidrs = ["198.19.2.0/24"]"#),
            node(
                "two6",
                3,
                r#"pod_cidrs = ["198.19.3.0/24", "2001:2:0:3::/64", "2001:2:0:4::/64"]"#,
            ),
            node(
                "two4",
                4,
                r#"pod_cidrs = ["198.19.4.0/24", "198.19.5.0/24"]"#,
            ),
            node("only6", 5, r#"pod_cidrs = ["2001:2:0:5::/64"]"#),
            node(
                "both",
                6,
                "pod_cidr = \"198.19.6.0/24\"\npod_cidrs = [\"198.19.6.0/24\"]",
            ),
            node(
                "outside6",
                7,
                r#"pod_cidrs = ["198.19.7.0/24", "2001:3::/64"]"#,
            ),
            node(
                "overlap6",
                8,
                r#"pod_cidrs = ["198.19.8.0/24", "2001:2:0:1:8000::/65"]"#,
            ),
            node(
                "bad6",
                9,
                r#"pod_cidrs = ["198.19.9.0/24", "2001:2:0:9::1/64"]"#,
            ),
            node("none", 10, ""),
            node(
                "wide6",
                11,
                r#"pod_cidrs = ["198.19.11.0/24", "2001:2::/40"]"#,
            ),
        ]
        .concat();
        let s = parse_file(&text, &cluster()).unwrap();
        let kept: Vec<_> = s
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.pod_cidr6))
            .collect();
        assert_eq!(
            kept,
            [
                ("a", Some("2001:2:0:1::/64".parse().unwrap())),
                ("v4only", None),
                // An IPv6 pod CIDR only: its pods are IPv6 only, over the
                // IPv4 underlay.
                ("only6", Some("2001:2:0:5::/64".parse().unwrap()))
            ]
        );
        for needle in [
            "node `two6`: pod_cidrs has two IPv6 CIDRs",
            "node `two4`: pod_cidrs has two IPv4 CIDRs",
            "node `both`: both pod_cidr and pod_cidrs",
            "node `outside6`: pod_cidr 2001:3::/64 is outside the IPv6 cluster CIDR 2001:2::/48",
            "node `overlap6`: pod_cidr 2001:2:0:1:8000::/65 overlaps node `a`'s 2001:2:0:1::/64",
            "did you mean 2001:2:0:9::/64",
            "node `none`: no pod_cidr",
            "node `wide6`: pod_cidr 2001:2::/40 is wider than the IPv6 cluster CIDR 2001:2::/48",
        ] {
            assert!(
                s.problems.iter().any(|p| p.contains(needle)),
                "no problem says {needle:?}: {:#?}",
                s.problems
            );
        }
        assert_eq!(s.problems.len(), 8, "{:#?}", s.problems);

        // An agent without an IPv6 cluster CIDR carries the IPv4 side only.
        let v4_only: ClusterCidrs = cluster().v4.unwrap().into();
        let s = parse_file(
            &node(
                "a",
                1,
                r#"pod_cidrs = ["198.19.1.0/24", "2001:2:0:1::/64"]"#,
            ),
            &v4_only,
        )
        .unwrap();
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(
            s.nodes
                .iter()
                .map(|n| (n.pod_cidr.unwrap().to_string(), n.pod_cidr6))
                .collect::<Vec<_>>(),
            [("198.19.1.0/24".to_string(), None)]
        );
    }

    #[test]
    fn ipv6_only_nodes_and_their_bad_entries() {
        let v6_only: ClusterCidrs = "2001:2::/48"
            .parse::<crate::cidr::Ipv6Cidr>()
            .unwrap()
            .into();
        let text = r#"
[[node]]
name = "a"
underlay_ip6 = "2001:2:ff::1"
pod_cidr = "2001:2:0:1::/64"

[[node]]
name = "dual"
underlay_ip = "198.18.0.2"
underlay_ip6 = "2001:2:ff::2"
pod_cidrs = ["198.19.2.0/24", "2001:2:0:2::/64"]

[[node]]
name = "v4pods"
underlay_ip = "198.18.0.3"
pod_cidr = "198.19.3.0/24"

[[node]]
name = "nowhere"
pod_cidr = "2001:2:0:4::/64"

[[node]]
name = "same6"
underlay_ip6 = "2001:2:ff::1"
pod_cidr = "2001:2:0:5::/64"
"#;
        let s = parse_file(text, &v6_only).unwrap();
        let a = &s.nodes[0];
        let ip6: std::net::Ipv6Addr = "2001:2:ff::1".parse().unwrap();
        assert_eq!(
            (a.underlay_ip, a.pod_cidr, a.underlay6.map(|u| u.ip)),
            (None, None, Some(ip6))
        );
        assert_eq!(
            a.vtep_mac,
            netdev::vtep_mac_for6(ip6),
            "MAC from the IPv6 address"
        );
        // A dual-stack entry is carried by its IPv6 side.
        let dual = &s.nodes[1];
        assert_eq!((dual.name.as_str(), dual.pod_cidr), ("dual", None));
        assert_eq!(s.nodes.len(), 2, "{:#?}", s.problems);
        for needle in [
            "node `v4pods`: no IPv6 pod_cidr (this cluster's pods are IPv6)",
            "node `nowhere`: no underlay_ip (or underlay_ip6",
            "node `same6`: IPv6 underlay_ip 2001:2:ff::1 is already node `a`'s",
        ] {
            assert!(
                s.problems.iter().any(|p| p.contains(needle)),
                "no problem says {needle:?}: {:#?}",
                s.problems
            );
        }
        // IPv4 pods need an IPv4 underlay, whatever the cluster.
        let s = parse_file(
            "[[node]]\nname = \"x\"\nunderlay_ip6 = \"2001:2:ff::9\"\npod_cidrs = [\"198.19.9.0/24\", \"2001:2:0:9::/64\"]\n",
            &cluster(),
        )
        .unwrap();
        assert!(
            s.problems[0].contains("an IPv4 pod_cidr but no IPv4 underlay_ip"),
            "{:?}",
            s.problems
        );
    }

    #[test]
    fn ipv6_underlay_addresses_and_their_bad_entries() {
        let node = |name: &str, n: u8, rest: &str| {
            format!("[[node]]\nname = \"{name}\"\nunderlay_ip = \"198.18.0.{n}\"\n{rest}\n")
        };
        let text = [
            node(
                "a",
                1,
                "pod_cidrs = [\"198.19.1.0/24\", \"2001:2:0:1::/64\"]\nunderlay_ip6 = \"2001:2:ff::1\"",
            ),
            node(
                "flannel",
                2,
                "pod_cidrs = [\"198.19.2.0/24\", \"2001:2:0:2::/64\"]\nunderlay_ip6 = \"2001:2:ff::2\"\nvtep_mac6 = \"0e:00:00:00:06:02\"",
            ),
            node("dup6", 3, "pod_cidr = \"198.19.3.0/24\"\nunderlay_ip6 = \"2001:2:ff::1\""),
            node("v4addr", 4, "pod_cidr = \"198.19.4.0/24\"\nunderlay_ip6 = \"198.18.0.4\""),
            node("linklocal", 5, "pod_cidr = \"198.19.5.0/24\"\nunderlay_ip6 = \"fe80::5\""),
            node("maconly", 6, "pod_cidr = \"198.19.6.0/24\"\nvtep_mac6 = \"0e:00:00:00:06:06\""),
            node("badmac", 7, "pod_cidr = \"198.19.7.0/24\"\nunderlay_ip6 = \"2001:2:ff::7\"\nvtep_mac6 = \"ff:ff:ff:ff:ff:ff\""),
        ]
        .concat();
        let s = parse_file(&text, &cluster()).unwrap();
        let kept: Vec<_> = s
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.underlay6))
            .collect();
        let u6 = |ip: &str, mac| {
            Some(crate::registry::Underlay6 {
                ip: ip.parse().unwrap(),
                vtep_mac: mac,
            })
        };
        assert_eq!(
            kept,
            [
                (
                    "a",
                    u6(
                        "2001:2:ff::1",
                        netdev::vtep_mac_for("198.18.0.1".parse().unwrap())
                    )
                ),
                ("flannel", u6("2001:2:ff::2", [0x0e, 0, 0, 0, 6, 2])),
            ]
        );
        for needle in [
            "node `dup6`: IPv6 underlay_ip 2001:2:ff::1 is already node `a`'s",
            "node `v4addr`: underlay_ip6 `198.18.0.4` is not an IPv6 address",
            "node `linklocal`: underlay_ip6: fe80::5 cannot be an underlay address",
            "node `maconly`: vtep_mac6 without underlay_ip6",
            "node `badmac`: vtep_mac6 `ff:ff:ff:ff:ff:ff` is not a unicast MAC",
        ] {
            assert!(
                s.problems.iter().any(|p| p.contains(needle)),
                "no problem says {needle:?}: {:#?}",
                s.problems
            );
        }
        assert_eq!(s.problems.len(), 5, "{:#?}", s.problems);
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
        let mixed = "node = [{name = \"a\", underlay_ip = \"198.18.0.1\", pod_cidr = \"198.19.1.0/24\"}]\n[[node]]\nname = \"b\"\nunderlay_ip = \"198.18.0.2\"\npod_cidr = \"198.19.2.0/24\"\n";
        assert!(toml::from_str::<FileNodes>(mixed).is_err());
        assert!(
            parse_nodes(mixed).is_err(),
            "not TOML as a whole: not read in pieces either"
        );
        let e = parse_nodes(concat!(
            "[[node]]\nname = \"a\"\nunderlay_ip = \"198.18.0.1\"\npod_cidr = \"198.19.1.0/24\"\n",
            "[[node]]\nname = \"b\"\nunderlay_ip = \"198.18.0.2\"\npod_cidr = \"198.19.2.0/24\"\nbogus = 1\n",
        ))
        .unwrap_err();
        assert!(e.starts_with("line 9: "), "the whole file's line: {e}");
    }

    #[test]
    fn table_starts_are_the_header_lines() {
        // The rule as first written: lines that are the header, trimmed.
        let by_lines = |text: &str| {
            let mut v: Vec<usize> = text
                .split_inclusive('\n')
                .scan(0, |at, line| {
                    let start = *at;
                    *at += line.len();
                    Some((start, line))
                })
                .filter(|(_, line)| line.trim() == "[[node]]")
                .map(|(start, _)| start)
                .collect();
            if v.first() != Some(&0) {
                v.insert(0, 0);
            }
            v.push(text.len());
            v
        };
        for text in [
            "",
            "[[node]]\nname = \"a\"\n",
            "# head\n[[node]]\na = 1\n  [[node]]  \r\nb = 2\n[[node]] # no\nx = \"[[node]]\"\n[[node]]",
            "\n\n[[node]]\n",
            "[[nodes]]\n[[node]]x\n\t[[node]]\n",
        ] {
            assert_eq!(table_starts(text), by_lines(text), "{text:?}");
        }
    }

    fn file_of(nodes: &[(&str, &str, &str)]) -> String {
        nodes
            .iter()
            .map(|(n, ip, c)| {
                format!("[[node]]\nname = \"{n}\"\nunderlay_ip = \"{ip}\"\npod_cidr = \"{c}\"\n\n")
            })
            .collect()
    }

    /// What the registry publishes for `text` after `before`: (changes
    /// found table by table, or None), and the published set checked
    /// against a full read of `text`.
    fn step(before: &str, text: &str) -> Option<Vec<(String, bool)>> {
        let (snap, last) =
            read_tables(before.to_string(), table_starts(before), &cluster()).unwrap();
        let mut p = Published::default();
        p.replace(snap);
        let changes = last.changed_tables(text, &p)?.changes;
        // Only what changed the set (a table read again may hold the same node).
        let changes: Vec<_> = changes
            .into_iter()
            .filter(|(name, node)| p.nodes.get(name) != node.as_ref())
            .collect();
        for (name, node) in &changes {
            assert!(p.update(name, node.clone(), &cluster()), "{name}");
        }
        let full = parse_file(text, &cluster()).unwrap();
        assert_eq!(
            p.nodes.values().cloned().collect::<Vec<_>>(),
            {
                let mut v = full.nodes.clone();
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            },
            "as a full read"
        );
        Some(
            changes
                .into_iter()
                .map(|(n, node)| (n, node.is_some()))
                .collect(),
        )
    }

    #[test]
    fn a_change_to_a_few_tables_is_read_as_those_nodes() {
        let nodes: Vec<(String, String, String)> = (1..=6)
            .map(|i| {
                (
                    format!("n{i}"),
                    format!("198.18.0.{i}"),
                    format!("198.19.{i}.0/24"),
                )
            })
            .collect();
        let v = |skip: Option<usize>, edit: Option<(usize, &str)>| -> String {
            let mut list: Vec<(&str, &str, &str)> = nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != skip)
                .map(|(i, (n, ip, c))| match edit {
                    Some((j, c2)) if j == i => (n.as_str(), ip.as_str(), c2),
                    _ => (n.as_str(), ip.as_str(), c.as_str()),
                })
                .collect();
            if skip == Some(99) {
                list.push(("n7", "198.18.0.7", "198.19.7.0/24"));
            }
            file_of(&list)
        };
        let base = v(None, None);
        let yes = |n: &str| vec![(n.to_string(), true)];
        assert_eq!(step(&base, &base), Some(vec![]), "nothing changed");
        assert_eq!(
            step(&base, &v(None, Some((2, "198.19.33.0/24")))),
            Some(yes("n3"))
        );
        assert_eq!(
            step(&base, &v(Some(99), None)),
            Some(yes("n7")),
            "one added"
        );
        assert_eq!(
            step(&base, &v(Some(0), None)),
            Some(vec![("n1".into(), false)])
        );
        assert_eq!(
            step(&base, &v(Some(5), None)),
            Some(vec![("n6".into(), false)])
        );
        // A rename: the old name goes, the new one comes.
        let renamed = base.replace("name = \"n4\"", "name = \"n44\"");
        assert_eq!(
            step(&base, &renamed),
            Some(vec![("n4".into(), false), ("n44".into(), true)])
        );
        // Read whole: a second table with a name in use, a problem, a
        // conflict, a comment above the first table.
        for whole in [
            base.replace("name = \"n4\"", "name = \"n5\""),
            base.replace("198.18.0.4\"", "198.18.0.400\""),
            base.replace("198.19.4.0/24", "198.19.5.0/24"),
            format!("# nodes\n{base}"),
        ] {
            let (snap, last) =
                read_tables(base.to_string(), table_starts(&base), &cluster()).unwrap();
            let mut p = Published::default();
            p.replace(snap);
            let found = last.changed_tables(&whole, &p);
            // The conflict passes here and is refused by update().
            if let Some(t) = found {
                assert!(
                    t.changes
                        .into_iter()
                        .any(|(n, node)| !p.update(&n, node, &cluster())),
                    "{whole}"
                );
            }
        }
        // A set with a problem is never changed table by table.
        let bad = base.replace("198.18.0.4\"", "198.18.0.400\"");
        assert_eq!(step(&bad, &v(None, Some((2, "198.19.33.0/24")))), None);
    }

    #[test]
    fn changes_read_one_after_another_track_the_file() {
        let mut list: Vec<(String, String, String)> = (1..=5)
            .map(|i| {
                (
                    format!("n{i}"),
                    format!("198.18.0.{i}"),
                    format!("198.19.{i}.0/24"),
                )
            })
            .collect();
        let render = |l: &[(String, String, String)]| {
            file_of(
                &l.iter()
                    .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                    .collect::<Vec<_>>(),
            )
        };
        let text = render(&list);
        let (snap, mut last) =
            read_tables(text.to_string(), table_starts(&text), &cluster()).unwrap();
        let mut p = Published::default();
        p.replace(snap);
        for k in 0..12usize {
            match k % 3 {
                0 => {
                    let i = k % list.len();
                    list[i].2 = format!("198.19.{}.0/24", 100 + k);
                }
                1 => list.push((
                    format!("m{k}"),
                    format!("198.18.1.{k}"),
                    format!("198.19.{}.0/24", 200 + k),
                )),
                _ => {
                    let i = k % list.len();
                    list.remove(i);
                }
            }
            let text = render(&list);
            let mut t = last.changed_tables(&text, &p).expect("one table changed");
            for (name, node) in std::mem::take(&mut t.changes) {
                assert!(p.update(&name, node, &cluster()));
            }
            last.commit(text.clone(), t);
            let mut want = parse_file(&text, &cluster()).unwrap().nodes;
            want.sort_by(|a, b| a.name.cmp(&b.name));
            assert_eq!(
                p.nodes.values().cloned().collect::<Vec<_>>(),
                want,
                "step {k}"
            );
        }
    }

    #[test]
    fn an_edit_finds_the_tables_a_full_search_would() {
        let mut next = crate::registry::tests::rng(5);
        let pieces = [
            "[[node]]\nname = \"a\"\n",
            "[[node]]\nname = \"b\"\n\n",
            "  [[node]]  \nx = 1\n",
            "# c\n",
            "[[node]]\n",
            "y = \"[[node]]\"\n",
            "[[nodes]]\n",
        ];
        for round in 0..3000 {
            let mut parts: Vec<&str> = (0..next(12)).map(|_| pieces[next(7) as usize]).collect();
            let old: String = parts.concat();
            // Replace, insert or remove a few pieces, or cut a piece short.
            for _ in 0..1 + next(3) {
                let at = next(parts.len() as u64 + 1) as usize;
                match next(3) {
                    0 if at < parts.len() => {
                        parts.remove(at);
                    }
                    1 => parts.insert(at, pieces[next(7) as usize]),
                    _ if at < parts.len() => {
                        parts[at] = &parts[at][..next(parts[at].len() as u64 + 1) as usize]
                    }
                    _ => {}
                }
            }
            let new: String = parts.concat();
            let e = edit(&old, &table_starts(&old), &new);
            assert_eq!(
                e.starts,
                table_starts(&new),
                "round {round}: {old:?} -> {new:?}"
            );
            let (os, n) = (table_starts(&old), e.starts.len() - 1);
            for i in 0..e.p {
                assert_eq!(
                    &old[os[i]..os[i + 1]],
                    &new[e.starts[i]..e.starts[i + 1]],
                    "round {round}"
                );
            }
            for k in 0..e.q {
                let (i, j) = (os.len() - 2 - k, n - 1 - k);
                assert_eq!(
                    &old[os[i]..os[i + 1]],
                    &new[e.starts[j]..e.starts[j + 1]],
                    "round {round}"
                );
            }
        }
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
