//! The next-hop cache's generation.
//!
//! The programs keep `bpf_fib_lookup`'s answer for each peer they send
//! VXLAN to (`WEFT_NEXTHOPS`, dataplane-ebpf/src/encap.rs) and use it while
//! its generation is the one in `WEFT_NEXTHOP_GN`. The agent moves that
//! generation on whenever rtnetlink reports that a neighbour, a route, an
//! address or a link changed in the node's namespace — every cached answer
//! is then looked up again by the next packet to its peer, so a changed
//! underlay MAC or route is used from that packet on. The kernel sends the
//! notification after it made the change, so a lookup racing with the bump
//! either saw the new state or is stored under the old generation.
//!
//! Entries also expire after `NextHop::TTL_NS` (10 s): what changed while no
//! agent was running is picked up then, or at the agent's start, which
//! moves the generation on too.

use std::{io, path::Path, thread::JoinHandle};

use aya::maps::{Array, MapData};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use weft_common::names;

use super::{DataplaneError, maps::open_pinned};

/// rtnetlink's multicast groups (linux/rtnetlink.h, the `RTMGRP_*` bits):
/// links, neighbours, IPv4 addresses and IPv4 routes (the underlay is
/// IPv4 where the programs look next hops up).
const GROUPS: u32 = 0x1 | 0x4 | 0x10 | 0x40;

/// `WEFT_NEXTHOP_GN`, opened from its pin.
pub struct Generation(Array<MapData, u32>);

impl Generation {
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        let map = open_pinned(pin_dir, names::NEXTHOP_GEN)?;
        Array::try_from(aya::maps::Map::Array(map))
            .map(Self)
            .map_err(map_error)
    }

    /// The current generation.
    pub fn get(&self) -> Result<u32, DataplaneError> {
        self.0.get(&0, 0).map_err(map_error)
    }

    /// Invalidates every cached next hop; the new generation.
    pub fn bump(&mut self) -> Result<u32, DataplaneError> {
        let next = self.get()?.wrapping_add(1);
        self.0.set(0, next, 0).map_err(map_error)?;
        Ok(next)
    }
}

fn map_error(source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map {
        name: names::NEXTHOP_GEN,
        source,
    }
}

/// Invalidates the cache now, then on every rtnetlink change, on a thread
/// of its own in the calling thread's network namespace. Errors opening the
/// map or the socket are returned; later ones are logged (the entries'
/// expiry still bounds how long a stale one is used).
pub fn watch(pin_dir: &Path) -> Result<JoinHandle<()>, DataplaneError> {
    let mut generation = Generation::open(pin_dir)?;
    let sock = subscribe().map_err(DataplaneError::Netlink)?;
    // Subscribed first: whatever changes from here on is seen.
    generation.bump()?;
    std::thread::Builder::new()
        .name("weft-nexthops".into())
        .spawn(move || follow(sock, generation))
        .map_err(DataplaneError::Netlink)
}

fn subscribe() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind(&SocketAddr::new(0, GROUPS))?;
    Ok(sock)
}

/// Moves the generation on for every batch of notifications (and when the
/// kernel dropped some: ENOBUFS).
fn follow(sock: Socket, mut generation: Generation) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock.recv(&mut &mut buf[..], 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(
                    "the next-hop cache no longer follows rtnetlink ({e}); cached next hops now expire only after 10 s. Restart the agent"
                );
                return;
            }
        }
        if let Err(e) = generation.bump() {
            tracing::error!("invalidating the next-hop cache: {e}");
        }
    }
}
