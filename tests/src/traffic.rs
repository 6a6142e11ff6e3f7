//! Traffic that runs while something changes underneath it (an agent
//! restart, a DaemonSet rollout) and then says exactly what it lost: a
//! counted UDP stream and a TCP stream checked byte by byte.
//!
//! Both ends run as threads of this process inside the network namespaces
//! given by path (a lab namespace's /run/netns file, or /proc/PID/ns/net of a
//! Kubernetes pod's process), so no tool in the pods is needed.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{InNetns, bulk_word};

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
    receiver: Option<JoinHandle<Result<u64, String>>>,
}

impl TcpStream {
    pub fn start(from: PathBuf, to: PathBuf, dst: Ipv4Addr, port: u16, rate: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let receiver = std::thread::spawn(move || -> Result<u64, String> {
            let _inside = InNetns::enter_path(&to);
            let l = std::net::TcpListener::bind((dst, port)).map_err(|e| format!("bind: {e}"))?;
            tx.send(()).expect("ready");
            let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
            // Long enough for a node's dataplane to be replaced under it.
            s.set_read_timeout(Some(Duration::from_secs(30)))
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
        rx.recv_timeout(Duration::from_secs(5))
            .expect("TCP receiver started");
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
            .expect("receiver")
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
