//! The lab: network namespaces, child processes, a private bpffs and a
//! scratch directory, all removed when the [`Lab`] goes (also on a panic);
//! running commands inside namespaces, and entering one from a thread.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Whether we can do privileged things (root). Privileged tests skip with a
/// printed reason otherwise — unless `WEFT_REQUIRE_PRIVILEGED=1` (set by
/// `cargo xtask test`), where skipping is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("WEFT_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
        panic!("{test}: needs root, and WEFT_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIP {test}: needs root (run `cargo xtask test` as root)");
    false
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output whatever happened.
pub fn try_sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"))
}

/// A network namespace owned by a [`Lab`].
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `program args…` inside the namespace (panics on failure).
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Like [`Netns::sh`] but returns the output whatever happened.
    pub fn try_sh(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        try_sh("ip", &all)
    }

    /// `ip ARGS` in the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// A command that runs in this namespace's network stack only (nsenter
    /// keeps the mount namespace, so bpffs pins stay visible). nsenter is
    /// found by this process's PATH, so the command may be given another.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(nsenter());
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.sh("sysctl", &["-qw", &format!("{key}={value}")]);
    }
}

/// `nsenter`, as this process's PATH finds it.
fn nsenter() -> &'static std::path::Path {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join("nsenter"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("/usr/bin/nsenter"))
    })
}

/// A directory to put on a PATH instead of the machine's, holding only
/// `programs` (each found on this process's PATH), as wrappers that append
/// `NAME ARGS…` to the returned log before running the real one, and
/// `traps`, which append to the log and fail as if absent: a PATH without
/// `ip`, `tc`, `ethtool`, `nsenter` …, that records every process run or
/// tried through it.
pub fn logged_tools(lab: &Lab, tag: &str, programs: &[&str], traps: &[&str]) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = lab.dir.join(format!("{tag}-bin"));
    std::fs::create_dir_all(&dir).expect("tools dir");
    let log = lab.dir.join(format!("{tag}-spawned.log"));
    std::fs::write(&log, "").expect("spawn log");
    let path = std::env::var_os("PATH").unwrap_or_default();
    for p in programs {
        let Some(real) = std::env::split_paths(&path)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
        else {
            continue;
        };
        let wrapper = dir.join(p);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"{p} $*\" >> '{}'\nexec '{}' \"$@\"\n",
                log.display(),
                real.display()
            ),
        )
        .expect("wrapper");
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for t in traps {
        let trap = dir.join(t);
        std::fs::write(
            &trap,
            format!(
                "#!/bin/sh\necho \"{t} $* (not on this PATH)\" >> '{}'\nexit 127\n",
                log.display()
            ),
        )
        .expect("trap");
        std::fs::set_permissions(&trap, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    (dir, log)
}

/// A child process killed (SIGTERM, then SIGKILL) when the lab goes away.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// Owner of everything a test creates.
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    netns: Vec<Netns>,
    procs: Vec<Proc>,
    bpffs_mounted: bool,
}

impl Lab {
    /// A new lab named `wf<pid><seq>`-something, unique on this machine.
    pub fn new(tag: &str) -> Self {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wf{}{}{tag}", std::process::id() % 100_000, seq);
        let dir = std::env::temp_dir().join(format!("{prefix}.lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab dir");
        Self {
            bpffs: dir.join("bpffs"),
            prefix,
            dir,
            netns: Vec::new(),
            procs: Vec::new(),
            bpffs_mounted: false,
        }
    }

    /// A private bpffs instance for this lab's pins (never /sys/fs/bpf).
    pub fn bpffs(&mut self) -> PathBuf {
        if !self.bpffs_mounted {
            std::fs::create_dir_all(&self.bpffs).expect("bpffs dir");
            sh(
                "mount",
                &["-t", "bpf", "bpf", self.bpffs.to_str().expect("utf-8 path")],
            );
            self.bpffs_mounted = true;
        }
        self.bpffs.clone()
    }

    /// Creates a network namespace `<prefix>-<name>` with lo up and IPv6 off
    /// (so no router solicitations or ND muddy packet counts).
    pub fn netns(&mut self, name: &str) -> Netns {
        let ns = Netns {
            name: format!("{}-{name}", self.prefix),
        };
        sh("ip", &["netns", "add", &ns.name]);
        self.netns.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns
    }

    /// Starts a process (built by `cmd`) whose output goes to `<dir>/<name>.log`.
    ///
    /// The child gets SIGTERM when the thread that started it ends, so a
    /// test, demo or bench killed outright (SIGKILL, where no drop runs)
    /// leaves no agent or server running in its namespaces.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> &mut Proc {
        let log = self.dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody will
                // signal us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the lab's process is gone"));
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push(Proc {
            name: name.into(),
            child,
            log,
        });
        self.procs.last_mut().expect("just pushed")
    }

    /// Stops the named process (SIGTERM, wait up to 5 s, then SIGKILL).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|p| p.name == name) {
            let mut p = self.procs.remove(i);
            stop_child(&mut p.child);
        }
    }

    /// The pid of a process started with [`Lab::spawn`].
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
    }

    /// The log of a process started with [`Lab::spawn`].
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn stop_child(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            stop_child(&mut p.child);
        }
        // Deleting a namespace deletes its interfaces, and with them their
        // XDP/TC attachments.
        for ns in self.netns.iter().rev() {
            let _ = try_sh("ip", &["netns", "del", &ns.name]);
        }
        if self.bpffs_mounted {
            let _ = try_sh("umount", &["-l", self.bpffs.to_str().unwrap_or_default()]);
        }
        if std::env::var_os("WEFT_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// While alive, the calling *thread* is in `ns`'s network namespace (tests
/// run each in their own thread, so others are unaffected).
pub struct InNetns {
    orig: std::fs::File,
}

impl InNetns {
    pub fn enter(ns: &Netns) -> Self {
        Self::enter_path(&ns.path())
    }

    /// Enters the network namespace at `path` (a /run/netns file, or
    /// /proc/PID/ns/net of a process in it, e.g. a Kubernetes pod's).
    pub fn enter_path(path: &std::path::Path) -> Self {
        use std::os::fd::AsRawFd;
        let orig = std::fs::File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = std::fs::File::open(path)
            .unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
        // SAFETY: setns on fds we own.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns into {}",
            path.display()
        );
        Self { orig }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// Removes what a lab whose process was killed left (no drop ran), by its
/// prefix and directory: every process in its namespaces is killed, then
/// `between` runs (what else the lab made, e.g. a Kubernetes node's cgroups),
/// then its namespaces, bpffs mount and directory go. What `cargo xtask
/// demo --down` and `cargo xtask cluster --down` run after a killed run.
pub fn remove_leftovers(prefix: &str, dir: &std::path::Path, between: impl FnOnce()) {
    if prefix.is_empty() {
        return;
    }
    let list = try_sh("ip", &["netns", "list"]);
    let namespaces: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    for name in &namespaces {
        let pids = try_sh("ip", &["netns", "pids", name]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) of a process inside the lab's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    between();
    for name in namespaces.iter().rev() {
        let _ = try_sh("ip", &["netns", "del", name]);
    }
    let _ = try_sh(
        "umount",
        &["-l", dir.join("bpffs").to_str().unwrap_or_default()],
    );
    let _ = std::fs::remove_dir_all(dir);
}
