//! A userspace TUN ↔ UDP forwarder of the same design as flannel's `udp`
//! backend, written for the benchmark as a **reference, not a product
//! backend**: one thread per node; packets read from the TUN device are sent
//! in UDP to the node owning the destination subnet, and UDP datagrams
//! received are written to the TUN device. No encryption, no batching.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};

/// Opens (creating) TUN device `name` without packet information.
fn open_tun(name: &str) -> Result<OwnedFd> {
    // SAFETY: plain open(2).
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("open /dev/net/tun: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF on a tun fd with a valid ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// `routes`: (subnet address, prefix, peer) — where each remote subnet lives.
pub fn run(tun: &str, listen: SocketAddrV4, routes: &[(Ipv4Addr, u8, SocketAddrV4)]) -> Result<()> {
    let tun = open_tun(tun)?;
    let sock = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    let mut fds = [
        libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut buf = vec![0u8; 65536];
    eprintln!("udp-forwarder: ready");
    loop {
        // SAFETY: fds is a valid array of two pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 20 {
                let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                let peer = routes.iter().find(|(net, p, _)| {
                    let mask = if *p == 0 {
                        0
                    } else {
                        u32::MAX << (32 - u32::from(*p))
                    };
                    u32::from(dst) & mask == u32::from(*net)
                });
                if let Some((_, _, peer)) = peer {
                    let _ = sock.send_to(&buf[..n as usize], peer);
                }
            }
        }
        if fds[1].revents & libc::POLLIN != 0
            && let Ok(n) = sock.recv(&mut buf)
        {
            // SAFETY: writing from our buffer.
            unsafe { libc::write(tun.as_raw_fd(), buf.as_ptr().cast(), n) };
        }
    }
}
