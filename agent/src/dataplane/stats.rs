//! Reading the per-CPU counters by name.

use aya::maps::{MapData, PerCpuArray};
use serde::Serialize;
use weft_common::{DropReason, FwdReason};

/// Counter totals over all CPUs, by name, in enum order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub drops: Vec<(String, u64)>,
    pub forwards: Vec<(String, u64)>,
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
    Counters {
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), sum(drops, r.index())))
            .collect(),
        forwards: FwdReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), sum(fwds, r.index())))
            .collect(),
    }
}
