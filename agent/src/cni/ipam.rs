//! IPAM over the node's pod CIDR, on disk so that a plugin crash or a node
//! reboot never hands one address to two pods.
//!
//! Layout (like host-local's): `<dir>/<ip>` holds `<container id>\n<ifname>`
//! for each allocated address; `<dir>/last_reserved_ip` remembers where the
//! last allocation was, so addresses are reused round-robin rather than
//! immediately; `<dir>/lock` is held (flock) for every change, so concurrent
//! plugin invocations are safe. The network address, the gateway and the
//! broadcast address are never handed out. One store per address family
//! ([`Ipam`] over IPv4 or IPv6: a dual-stack pod holds one address in each).
//! The round-robin search steps over the allocated addresses only, so it
//! ends after at most (allocations + 1) tries even in an IPv6 /64.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::cidr::{Cidr, Family};

/// IPAM errors.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "no free address left in {0}: every address is allocated (release some with DEL or GC)"
    )]
    Exhausted(String),
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The allocator for one network (of one address family) on one node.
pub struct Ipam<A> {
    dir: PathBuf,
    subnet: Cidr<A>,
    gateway: A,
}

/// Held while the store is locked.
pub struct Locked<'a, A> {
    ipam: &'a Ipam<A>,
    _lock: File,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `flock`s `path` (created if missing), held until the file is dropped.
fn flock(path: &Path) -> Result<File, IpamError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    // SAFETY: flock on a file we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(IpamError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

impl<A: Family> Ipam<A> {
    pub fn new(dir: PathBuf, subnet: Cidr<A>, gateway: A) -> Self {
        Self {
            dir,
            subnet,
            gateway,
        }
    }

    /// Takes the store's lock (blocking until other invocations are done).
    pub fn lock(&self) -> Result<Locked<'_, A>, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        Ok(Locked {
            ipam: self,
            _lock: flock(&self.dir.join("lock"))?,
        })
    }
}

impl<A: Family> Locked<'_, A> {
    fn owner_of(&self, ip: A) -> Option<(String, String)> {
        let text = fs::read_to_string(self.ipam.dir.join(ip.to_string())).ok()?;
        let mut lines = text.lines();
        Some((
            lines.next()?.to_string(),
            lines.next().unwrap_or_default().to_string(),
        ))
    }

    /// Every allocation: (address, container id, ifname).
    pub fn allocations(&self) -> Result<Vec<(A, String, String)>, IpamError> {
        let dir = &self.ipam.dir;
        let mut out = Vec::new();
        for e in fs::read_dir(dir).map_err(io(dir))?.flatten() {
            if let Ok(ip) = e.file_name().to_string_lossy().parse::<A>()
                && let Some((id, ifname)) = self.owner_of(ip)
            {
                out.push((ip, id, ifname));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The address already held by (container, ifname), if any.
    pub fn find(&self, id: &str, ifname: &str) -> Result<Option<A>, IpamError> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|(_, i, f)| i == id && f == ifname)
            .map(|(ip, _, _)| ip))
    }

    /// Allocates an address for (container, ifname); returns the one it
    /// already holds if there is one (a retried ADD).
    pub fn allocate(&self, id: &str, ifname: &str) -> Result<A, IpamError> {
        if let Some(ip) = self.find(id, ifname)? {
            return Ok(ip);
        }
        let s = &self.ipam.subnet;
        let exhausted = || IpamError::Exhausted(s.to_string());
        let first = s.addr().to_bits() + 1;
        let last = s.broadcast().to_bits().saturating_sub(1);
        if last < first {
            return Err(exhausted());
        }
        let marker = self.ipam.dir.join("last_reserved_ip");
        let start = fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse::<A>().ok())
            .map(A::to_bits)
            .filter(|a| (first..=last).contains(a))
            .map_or(first, |a| if a >= last { first } else { a + 1 });
        // Every address but the gateway is tried once, round robin from
        // `start`; each one tried and skipped is an allocated one (or the
        // gateway), so a free one turns up within allocations + 2 tries.
        let span = last - first + 1;
        for k in 0..span {
            let cand = A::from_bits(first + (start - first + k) % span);
            if cand == self.ipam.gateway {
                continue;
            }
            let path = self.ipam.dir.join(cand.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{id}\n{ifname}\n").as_bytes())
                        .map_err(io(&path))?;
                    f.sync_all().map_err(io(&path))?;
                    fs::write(&marker, cand.to_string()).map_err(io(&marker))?;
                    return Ok(cand);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(IpamError::Io { path, source: e }),
            }
        }
        Err(exhausted())
    }

    /// Reserves here every address of this network that the `host-local`
    /// store `dir` (flannel's `/var/lib/cni/networks/cbr0`: the same layout,
    /// `<ip>` holding `<container id>\r\n<ifname>`) has allocated, for the
    /// same container and interface: a pod another plugin wired keeps its
    /// address (nothing here hands it out again), and its DEL through weft
    /// releases it. Addresses already allocated here are left as they are.
    /// Returns the addresses adopted now; a missing `dir` adopts nothing.
    pub fn adopt_host_local(&self, dir: &Path) -> Result<Vec<A>, IpamError> {
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        // host-local's own lock (the same flock on `<dir>/lock`): no ADD of
        // its plugin is half-way while we read.
        let _theirs = flock(&dir.join("lock"))?;
        let s = &self.ipam.subnet;
        let mut adopted = Vec::new();
        for e in fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let Ok(ip) = e.file_name().to_string_lossy().parse::<A>() else {
                continue;
            };
            if !s.contains(ip) || ip == s.addr() || ip == s.broadcast() || ip == self.ipam.gateway {
                continue;
            }
            let Ok(text) = fs::read_to_string(e.path()) else {
                continue;
            };
            let mut lines = text.lines();
            let id = lines.next().unwrap_or_default().trim();
            let ifname = lines.next().unwrap_or("eth0").trim();
            if id.is_empty() {
                continue;
            }
            let path = self.ipam.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{id}\n{ifname}\n").as_bytes())
                        .map_err(io(&path))?;
                    f.sync_all().map_err(io(&path))?;
                    adopted.push(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(IpamError::Io { path, source: e }),
            }
        }
        adopted.sort();
        Ok(adopted)
    }

    /// Releases what (container, ifname) holds; fine if it holds nothing.
    pub fn release(&self, id: &str, ifname: &str) -> Result<Option<A>, IpamError> {
        let ip = self.find(id, ifname)?;
        if let Some(ip) = ip {
            let path = self.ipam.dir.join(ip.to_string());
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(ip)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ipam<A: Family>(tag: &str, cidr: &str) -> Ipam<A> {
        let dir = std::env::temp_dir().join(format!("weft-ipam-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let c: Cidr<A> = cidr.parse().ok().unwrap();
        Ipam::new(dir, c, c.nth(1).unwrap())
    }

    #[test]
    fn ipv6_allocates_after_the_gateway_and_steps_over_the_taken() {
        let i = ipam::<Ipv6Addr>("v6", "2001:2:0:1::/64");
        let l = i.lock().unwrap();
        let got: Vec<String> = (0..3)
            .map(|n| l.allocate(&format!("c{n}"), "eth0").unwrap().to_string())
            .collect();
        assert_eq!(got, ["2001:2:0:1::2", "2001:2:0:1::3", "2001:2:0:1::4"]);
        assert_eq!(
            l.allocate("c1", "eth0").unwrap().to_string(),
            "2001:2:0:1::3"
        );
        assert_eq!(
            l.release("c0", "eth0").unwrap(),
            Some("2001:2:0:1::2".parse().unwrap())
        );
        assert_eq!(
            l.allocate("c9", "eth0").unwrap().to_string(),
            "2001:2:0:1::5"
        );
        drop(l);
        // An IPv4 store in the same directory sees none of these.
        let v4: Ipam<Ipv4Addr> = Ipam::new(
            i.dir.clone(),
            "198.19.1.0/24".parse().unwrap(),
            "198.19.1.1".parse().unwrap(),
        );
        assert!(v4.lock().unwrap().allocations().unwrap().is_empty());
        fs::remove_dir_all(&i.dir).unwrap();
    }

    #[test]
    fn allocates_round_robin_skipping_reserved() {
        let i = ipam::<Ipv4Addr>("rr", "198.19.1.0/29"); // .1 gateway, .7 broadcast: .2-.6 usable
        let l = i.lock().unwrap();
        let got: Vec<String> = (0..5)
            .map(|n| l.allocate(&format!("c{n}"), "eth0").unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "198.19.1.2",
                "198.19.1.3",
                "198.19.1.4",
                "198.19.1.5",
                "198.19.1.6"
            ]
        );
        assert!(matches!(
            l.allocate("c9", "eth0"),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(
            l.allocate("c2", "eth0").unwrap().to_string(),
            "198.19.1.4",
            "a retried ADD gets the same address"
        );
        assert_eq!(
            l.release("c1", "eth0")
                .unwrap()
                .map(|a| a.to_string())
                .as_deref(),
            Some("198.19.1.3")
        );
        assert_eq!(
            l.release("c1", "eth0").unwrap(),
            None,
            "release is idempotent"
        );
        assert_eq!(
            l.allocate("c7", "eth0").unwrap().to_string(),
            "198.19.1.3",
            "the only free one"
        );
        l.release("c7", "eth0").unwrap(); // frees .3 (the last one handed out)
        l.release("c4", "eth0").unwrap(); // frees .6
        // Round robin: the search goes on after .3, so .6 comes before the
        // just-freed .3.
        assert_eq!(l.allocate("c8", "eth0").unwrap().to_string(), "198.19.1.6");
        assert_eq!(l.allocate("c9", "eth0").unwrap().to_string(), "198.19.1.3");
        fs::remove_dir_all(&i.dir).unwrap();
    }

    #[test]
    fn host_local_allocations_are_adopted_and_released_by_weft() {
        let i = ipam::<Ipv4Addr>("adopt", "198.19.1.0/29");
        let theirs = i.dir.with_extension("cbr0");
        let _ = fs::remove_dir_all(&theirs);
        fs::create_dir_all(&theirs).unwrap();
        // host-local's layout: CRLF between id and ifname, its markers.
        fs::write(theirs.join("198.19.1.2"), "flannel-pod-a\r\neth0").unwrap();
        fs::write(theirs.join("198.19.1.5"), "flannel-pod-b\r\neth0").unwrap();
        fs::write(theirs.join("198.19.2.9"), "other-subnet\r\neth0").unwrap();
        fs::write(theirs.join("198.19.1.1"), "gateway?\r\neth0").unwrap();
        fs::write(theirs.join("last_reserved_ip.0"), "198.19.1.5").unwrap();
        fs::write(theirs.join("lock"), "").unwrap();
        let l = i.lock().unwrap();
        let adopted = l.adopt_host_local(&theirs).unwrap();
        assert_eq!(
            adopted,
            vec![
                "198.19.1.2".parse::<Ipv4Addr>().unwrap(),
                "198.19.1.5".parse().unwrap()
            ]
        );
        assert!(
            l.adopt_host_local(&theirs).unwrap().is_empty(),
            "idempotent"
        );
        // Never handed out while those pods live; their DEL releases them.
        let got: Vec<String> = (0..3)
            .map(|n| l.allocate(&format!("n{n}"), "eth0").unwrap().to_string())
            .collect();
        assert_eq!(got, ["198.19.1.3", "198.19.1.4", "198.19.1.6"]);
        assert_eq!(
            l.release("flannel-pod-b", "eth0").unwrap(),
            Some("198.19.1.5".parse().unwrap())
        );
        assert!(
            l.adopt_host_local(&i.dir.with_extension("none"))
                .unwrap()
                .is_empty()
        );
        fs::remove_dir_all(&i.dir).unwrap();
        fs::remove_dir_all(&theirs).unwrap();
    }
}
