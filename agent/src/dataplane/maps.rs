//! The pinned maps, as user space opens them (the agent, the CNI plugin,
//! `weft status`, tests).

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, LpmTrie, MapData, PerCpuArray};
use weft_common::{Endpoint, FlowKey, FlowKey6, FlowState, Ipv6Key, RemoteNode, Vtep, names};

use super::DataplaneError;

/// The dataplane's maps, opened from their pins (by the agent, the CNI
/// plugin, `weft status`, tests).
pub struct Maps {
    pub remotes: LpmTrie<MapData, [u8; 4], RemoteNode>,
    pub endpoints: HashMap<MapData, u32, Endpoint>,
    /// IPv6 pod CIDR → owner (the IPv4 map's twin).
    pub remotes6: LpmTrie<MapData, Ipv6Key, RemoteNode>,
    /// Local pod IPv6 → its veth (the IPv4 map's twin).
    pub endpoints6: HashMap<MapData, Ipv6Key, Endpoint>,
    pub nodes: HashMap<MapData, u32, Vtep>,
    /// Peer underlay IPv6 → VTEP (the IPv4 map's twin).
    pub nodes6: HashMap<MapData, Ipv6Key, Vtep>,
    pub drops: PerCpuArray<MapData, u64>,
    pub fwds: PerCpuArray<MapData, u64>,
}

impl Maps {
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            pin_dir: &Path,
            name: &'static str,
            wrap: fn(MapData) -> aya::maps::Map,
        ) -> Result<T, DataplaneError> {
            T::try_from(wrap(open_pinned(pin_dir, name)?))
                .map_err(|source| DataplaneError::Map { name, source })
        }
        Ok(Self {
            remotes: open(pin_dir, names::REMOTE_CIDRS, aya::maps::Map::LpmTrie)?,
            endpoints: open(pin_dir, names::ENDPOINTS, aya::maps::Map::HashMap)?,
            remotes6: open(pin_dir, names::REMOTE_CIDRS6, aya::maps::Map::LpmTrie)?,
            endpoints6: open(pin_dir, names::ENDPOINTS6, aya::maps::Map::HashMap)?,
            nodes: open(pin_dir, names::NODES, aya::maps::Map::HashMap)?,
            nodes6: open(pin_dir, names::NODES6, aya::maps::Map::HashMap)?,
            drops: open(pin_dir, names::DROP_STATS, aya::maps::Map::PerCpuArray)?,
            fwds: open(pin_dir, names::FWD_STATS, aya::maps::Map::PerCpuArray)?,
        })
    }
}

/// The endpoints map alone, opened from its pin (what a DEL needs).
pub fn endpoints(pin_dir: &Path) -> Result<HashMap<MapData, u32, Endpoint>, DataplaneError> {
    let name = names::ENDPOINTS;
    HashMap::try_from(aya::maps::Map::HashMap(open_pinned(pin_dir, name)?))
        .map_err(|source| DataplaneError::Map { name, source })
}

/// The IPv6 endpoints map alone, opened from its pin.
pub fn endpoints6(pin_dir: &Path) -> Result<HashMap<MapData, Ipv6Key, Endpoint>, DataplaneError> {
    let name = names::ENDPOINTS6;
    HashMap::try_from(aya::maps::Map::HashMap(open_pinned(pin_dir, name)?))
        .map_err(|source| DataplaneError::Map { name, source })
}

/// The map of flows whose replies take the stack (see
/// dataplane-ebpf/src/flows.rs), opened from its pin. Not part of [`Maps`]:
/// the CNI plugin has no use for it.
pub fn stack_flows(pin_dir: &Path) -> Result<HashMap<MapData, FlowKey, FlowState>, DataplaneError> {
    let name = names::STACK_FLOWS;
    HashMap::try_from(aya::maps::Map::LruHashMap(open_pinned(pin_dir, name)?))
        .map_err(|source| DataplaneError::Map { name, source })
}

/// The IPv6 twin of [`stack_flows`].
pub fn stack_flows6(
    pin_dir: &Path,
) -> Result<HashMap<MapData, FlowKey6, FlowState>, DataplaneError> {
    let name = names::STACK_FLOWS6;
    HashMap::try_from(aya::maps::Map::LruHashMap(open_pinned(pin_dir, name)?))
        .map_err(|source| DataplaneError::Map { name, source })
}

/// The map pinned as `name` in `pin_dir`; [`DataplaneError::NotPinned`]
/// when there is no such pin.
pub(super) fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<MapData, DataplaneError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DataplaneError::NotPinned { path });
    }
    MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })
}

/// An IPv4 address as the maps store it (network order bytes in a `u32`).
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_key`].
pub fn ip_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_where_nothing_is_pinned_say_so_and_what_to_check() {
        let dir = std::env::temp_dir().join(format!("weft-no-pins-{}", std::process::id()));
        let Err(e) = Maps::open(&dir) else {
            panic!("opened maps from {}", dir.display())
        };
        assert!(matches!(e, DataplaneError::NotPinned { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains(&dir.display().to_string())
                && m.contains("weft agent")
                && m.contains("--bpffs-dir"),
            "{m}"
        );
        assert!(matches!(
            stack_flows(&dir),
            Err(DataplaneError::NotPinned { .. })
        ));
    }
}
