//! Traffic across a lab: ping, iperf3, an echo server, round trips, a bulk
//! TCP transfer checked byte for byte; and traffic that runs while
//! something changes underneath it (an agent restart, a DaemonSet rollout)
//! and then says exactly what it lost — a counted UDP stream, a TCP stream
//! checked byte by byte. The streams' ends run as threads of this process
//! inside the network namespaces given by path (a lab namespace's /run/netns
//! file, or /proc/PID/ns/net of a Kubernetes pod's process), so no tool in
//! the pods is needed.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::lab::{InNetns, Lab, Netns, wait_for};

/// A UDP stream of numbered datagrams, one every `interval`, from one
/// namespace to an address in another; [`UdpCount::finish`] says which
/// never arrived.
pub struct UdpCount {
    stop: Arc<AtomicBool>,
    sender: Option<JoinHandle<u64>>,
    receiver: Option<JoinHandle<HashSet<u64>>>,
}

/// What a [`UdpCount`] saw.
#[derive(Clone, Debug)]
pub struct UdpReport {
    pub sent: u64,
    pub received: u64,
    /// The first missing sequence numbers (up to 20).
    pub missing: Vec<u64>,
}

impl UdpReport {
    /// Panics unless at least `at_least` datagrams were sent and every one
    /// arrived; `during` says when (for the message).
    pub fn assert_lossless(&self, at_least: u64, during: &str) {
        assert!(
            self.sent >= at_least,
            "the UDP stream ran {during}: {self:?}"
        );
        assert!(
            self.missing.is_empty(),
            "lost {} of {} datagrams {during}, first: {:?}",
            self.sent - self.received,
            self.sent,
            self.missing
        );
    }
}

impl UdpCount {
    /// Starts the receiver on `dst:port` inside `to`, then the sender in `from`.
    pub fn start(from: PathBuf, to: PathBuf, dst: Ipv4Addr, port: u16, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let receiver = std::thread::spawn(move || {
            let _inside = InNetns::enter_path(&to);
            let sock = std::net::UdpSocket::bind((dst, port))
                .unwrap_or_else(|e| panic!("bind UDP {dst}:{port}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            tx.send(()).unwrap();
            let mut got = HashSet::new();
            let mut buf = [0u8; 64];
            let mut quiet_since = None;
            loop {
                match sock.recv(&mut buf) {
                    Ok(8) => {
                        got.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        quiet_since = None;
                    }
                    _ if flag.load(Ordering::Relaxed) => {
                        let t = *quiet_since.get_or_insert_with(Instant::now);
                        if t.elapsed() > Duration::from_millis(500) {
                            return got;
                        }
                    }
                    _ => {}
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("UDP receiver started");
        let flag = stop.clone();
        let sender = std::thread::spawn(move || {
            let _inside = InNetns::enter_path(&from);
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let start = Instant::now();
            let mut seq = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if sock.send_to(&seq.to_be_bytes(), (dst, port)).is_ok() {
                    seq += 1;
                }
                let next = start + interval * seq as u32;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            seq
        });
        Self {
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Stops the sender, waits for the last datagrams, and counts.
    pub fn finish(mut self) -> UdpReport {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .expect("sender")
            .join()
            .expect("UDP sender");
        let got = self
            .receiver
            .take()
            .expect("receiver")
            .join()
            .expect("UDP receiver");
        UdpReport {
            sent,
            received: got.len() as u64,
            missing: (0..sent).filter(|s| !got.contains(s)).take(20).collect(),
        }
    }
}

impl Drop for UdpCount {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One TCP connection carrying the pseudo-random stream of
/// [`crate::bulk_tcp_intact`] at up to `rate` bytes a second until stopped;
/// the receiver checks every byte.
pub struct TcpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<(), String>>>,
    receiver: Option<Result<JoinHandle<Result<u64, String>>, String>>,
}

impl TcpStream {
    pub fn start(from: PathBuf, to: PathBuf, dst: Ipv4Addr, port: u16, rate: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        // Long enough for a node's dataplane to be replaced under it.
        let receiver = checked_receiver(to, dst.into(), port, Duration::from_secs(30));
        let (flag, count) = (stop.clone(), sent.clone());
        let sender = std::thread::spawn(move || -> Result<(), String> {
            let _inside = InNetns::enter_path(&from);
            let mut s =
                std::net::TcpStream::connect_timeout(&(dst, port).into(), Duration::from_secs(5))
                    .map_err(|e| format!("connect: {e}"))?;
            s.set_write_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let start = Instant::now();
            let chunk_words = 2048u64; // 16 KiB writes
            let mut word = 0u64;
            let mut chunk = Vec::with_capacity(chunk_words as usize * 8);
            while !flag.load(Ordering::Relaxed) {
                chunk.clear();
                for w in word..word + chunk_words {
                    chunk.extend_from_slice(&bulk_word(w));
                }
                s.write_all(&chunk)
                    .map_err(|e| format!("write at byte {}: {e}", word * 8))?;
                word += chunk_words;
                count.store(word * 8, Ordering::Relaxed);
                let due = start + Duration::from_secs_f64((word * 8) as f64 / rate as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            Ok(())
        });
        Self {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops, closes the connection, and returns the bytes received intact,
    /// or what went wrong (the receiver's verdict first: a sender's error is
    /// usually its echo).
    pub fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .expect("sender")
            .join()
            .expect("TCP sender");
        let received = self
            .receiver
            .take()
            .expect("receiver")?
            .join()
            .expect("TCP receiver")?;
        sent?;
        let written = self.sent();
        if received != written {
            return Err(format!("received {received} of {written} bytes"));
        }
        Ok(received)
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// iperf3 from `client` to a one-off server on `server_ip` in `server`, for
/// `secs` seconds with `extra` client flags; the received rate in Gbit/s.
pub fn iperf_gbps(
    server: &Netns,
    server_ip: impl Into<IpAddr>,
    client: &Netns,
    lab: &mut Lab,
    name: &str,
    secs: u32,
    extra: &[&str],
) -> f64 {
    let server_ip = server_ip.into();
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "--forceflush", "-B", &server_ip.to_string()]);
    lab.spawn(name, cmd);
    wait_for("iperf3 server", Duration::from_secs(5), || {
        lab.log(name).contains("listening").then_some(())
    });
    let mut args = vec![
        "-c".to_string(),
        server_ip.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client.try_sh("iperf3", &argv);
    lab.stop(name);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(v.get("error").is_none(), "iperf3 failed: {}", v["error"]);
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "iperf3 moved no data: {}", v["end"]);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// `ping -c COUNT -W 1 -i 0.05 DST` from `ns`; true when every reply came.
pub fn ping(ns: &Netns, dst: impl Into<IpAddr>, count: u32) -> bool {
    let dst = dst.into();
    ns.try_sh(
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-W",
            "1",
            "-i",
            "0.05",
            "-q",
            &dst.to_string(),
        ],
    )
    .status
    .success()
}

/// A TCP and UDP echo server on `ip:port` inside a namespace, served by a
/// thread of this process; stops when dropped.
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, ip: impl Into<IpAddr>, port: u16) -> Self {
        use std::io::{Read, Write};
        let ip = ip.into();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = ns.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let _inside = InNetns::enter(&ns);
            let tcp = std::net::TcpListener::bind((ip, port)).expect("bind TCP echo");
            let udp = std::net::UdpSocket::bind((ip, port)).expect("bind UDP echo");
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_read_timeout(Some(Duration::from_millis(10)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((mut s, _)) = tcp.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    if let Ok(n) = s.read(&mut buf) {
                        let _ = s.write_all(&buf[..n]);
                    }
                }
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `i`-th 8 bytes of the stream [`bulk_tcp_intact`] sends: `i` through
/// one xorshift64* step.
pub(crate) fn bulk_word(i: u64) -> [u8; 8] {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
}

/// Sends `bytes` (a multiple of 8) of a pseudo-random stream over one TCP
/// connection from `client` to a receiver on `ip:port` in `server`, in
/// 64 KiB writes (GSO-sized skbs), and checks every byte on arrival: the
/// payload survived whatever merged, split or moved its headers on the way
/// (a checksum the receiver trusts would not catch that). `Err` says what
/// went wrong.
pub fn bulk_tcp_intact(
    server: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    client: &Netns,
    bytes: u64,
) -> Result<(), String> {
    let ip = ip.into();
    let receiver = checked_receiver(server.path(), ip, port, Duration::from_secs(10))?;
    let sent = (|| {
        let _inside = InNetns::enter(client);
        let mut s =
            std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2))
                .map_err(|e| format!("connect: {e}"))?;
        let mut chunk = Vec::with_capacity(1 << 16);
        let mut word = 0u64;
        while word * 8 < bytes {
            chunk.clear();
            while chunk.len() < 1 << 16 && word * 8 < bytes {
                chunk.extend_from_slice(&bulk_word(word));
                word += 1;
            }
            s.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
        }
        Ok::<(), String>(())
    })();
    // The receiver's verdict first: a sender's error is usually its echo.
    match receiver.join().expect("receiver thread")? {
        at if at == bytes => sent,
        at => Err(format!("received {at} of {bytes} bytes")),
    }
}

/// A receiver on `ip:port` inside the namespace at `netns`, started (its
/// socket listening) when this returns: it takes one connection and checks
/// every byte against the [`bulk_word`] stream until the sender closes,
/// then says how many bytes came, or where they went wrong.
fn checked_receiver(
    netns: PathBuf,
    ip: IpAddr,
    port: u16,
    read_timeout: Duration,
) -> Result<JoinHandle<Result<u64, String>>, String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || -> Result<u64, String> {
        let _inside = InNetns::enter_path(&netns);
        let l = std::net::TcpListener::bind((ip, port)).map_err(|e| format!("bind: {e}"))?;
        ready_tx.send(()).expect("ready");
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(read_timeout))
            .map_err(|e| e.to_string())?;
        let (mut at, mut buf) = (0u64, vec![0u8; 1 << 16]);
        loop {
            let n = s
                .read(&mut buf)
                .map_err(|e| format!("read at byte {at}: {e}"))?;
            if n == 0 {
                return Ok(at);
            }
            for (k, b) in buf[..n].iter().enumerate() {
                let pos = at + k as u64;
                if *b != bulk_word(pos / 8)[(pos % 8) as usize] {
                    return Err(format!("byte {pos} differs"));
                }
            }
            at += n as u64;
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "receiver did not start".to_string())?;
    Ok(receiver)
}

/// One TCP round trip from inside `from` to `ip:port`: true when the echo matches.
pub fn tcp_roundtrip(from: &Netns, ip: impl Into<IpAddr>, port: u16) -> bool {
    use std::io::{Read, Write};
    let ip = ip.into();
    let _inside = InNetns::enter(from);
    let Ok(mut s) =
        std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let msg = format!("weft tcp to {ip}");
    if s.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

/// One UDP round trip (3 tries) from inside `from` to `ip:port`: true when
/// the echo comes back from `ip:port` itself (a reply from any other address,
/// e.g. a Service backend whose reply missed its reverse NAT, does not count).
pub fn udp_roundtrip(from: &Netns, ip: impl Into<IpAddr>, port: u16) -> bool {
    let ip = ip.into();
    let _inside = InNetns::enter(from);
    let any: IpAddr = if ip.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let Ok(s) = std::net::UdpSocket::bind((any, 0)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
    let msg = format!("weft udp to {ip}");
    let mut buf = [0u8; 256];
    (0..3).any(|_| {
        s.send_to(msg.as_bytes(), (ip, port)).is_ok()
            && matches!(s.recv_from(&mut buf),
                Ok((n, peer)) if &buf[..n] == msg.as_bytes() && peer == (ip, port).into())
    })
}
