//! Reading the per-CPU counters by name.

use aya::maps::{MapData, PerCpuArray};
use serde::Serialize;
use weft_common::{DropReason, FwdReason};

/// Counter totals over all CPUs, by name, in enum order: both families,
/// and the IPv6 share (the rest is IPv4's, with frames of neither family).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub drops: Vec<(String, u64)>,
    pub forwards: Vec<(String, u64)>,
    pub drops_ipv6: Vec<(String, u64)>,
    pub forwards_ipv6: Vec<(String, u64)>,
}

impl Counters {
    pub fn drop(&self, r: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(n, _)| n == r.name())
            .map_or(0, |(_, v)| *v)
    }

    pub fn fwd(&self, r: FwdReason) -> u64 {
        self.forwards
            .iter()
            .find(|(n, _)| n == r.name())
            .map_or(0, |(_, v)| *v)
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|(_, v)| v).sum()
    }
}

fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}

/// Reads both counter arrays.
pub fn read(drops: &PerCpuArray<MapData, u64>, fwds: &PerCpuArray<MapData, u64>) -> Counters {
    // (name, IPv4's, IPv6's) of each reason.
    let by_family = |map, slots: Vec<(&str, u32, u32)>| -> Vec<(String, u64, u64)> {
        slots
            .into_iter()
            .map(|(n, v4, v6)| (n.to_string(), sum(map, v4), sum(map, v6)))
            .collect()
    };
    let d = by_family(
        drops,
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), r.slot(false), r.slot(true)))
            .collect(),
    );
    let f = by_family(
        fwds,
        FwdReason::ALL
            .iter()
            .map(|r| (r.name(), r.slot(false), r.slot(true)))
            .collect(),
    );
    let total = |v: &[(String, u64, u64)]| v.iter().map(|(n, a, b)| (n.clone(), a + b)).collect();
    let ipv6 = |v: &[(String, u64, u64)]| v.iter().map(|(n, _, b)| (n.clone(), *b)).collect();
    Counters {
        drops: total(&d),
        forwards: total(&f),
        drops_ipv6: ipv6(&d),
        forwards_ipv6: ipv6(&f),
    }
}
