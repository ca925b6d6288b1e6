//! The [`GpuInventory`] trait: which GPUs a worker may give to jobs, and
//! how busy each is right now.
//!
//! What lives here: the contract, the `--gpus` choice and a fixed list
//! ([`StaticInventory`]). What does not: NVML discovery and placement
//! (`gpupool-worker`).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The `--gpus` choice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSelection {
    /// Every GPU NVML finds; none without a driver.
    #[default]
    Auto,
    /// CPU only.
    None,
    /// Exactly these indices (taken as given when NVML is unavailable).
    List(Vec<u32>),
}

impl FromStr for GpuSelection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "auto" => Ok(GpuSelection::Auto),
            "none" | "" => Ok(GpuSelection::None),
            list => list
                .split(',')
                .map(|i| {
                    i.trim().parse::<u32>().map_err(|_| {
                        Error::Config(format!(
                            "--gpus `{s}`: `{i}` is not a GPU index; use auto, none or a list like 0,2"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|mut v| {
                    v.sort_unstable();
                    v.dedup();
                    GpuSelection::List(v)
                }),
        }
    }
}

/// One GPU: what it is and, where known, how busy it is right now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuStatus {
    /// Index in PCI bus order (what `CUDA_VISIBLE_DEVICES` means with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub index: u32,
    /// `GPU-…` UUID (empty when unknown).
    pub uuid: String,
    /// Model name (empty when unknown).
    pub name: String,
    /// Total memory in bytes (0 when unknown).
    pub memory_total: u64,
    /// Used memory in bytes (0 when unknown).
    pub memory_used: u64,
    /// GPU utilisation in percent, when known.
    pub utilization: Option<u32>,
    /// Process ids with compute contexts on it.
    pub processes: Vec<u32>,
}

impl GpuStatus {
    /// A GPU known only by its index (no NVML).
    pub fn bare(index: u32) -> Self {
        GpuStatus { index, ..GpuStatus::default() }
    }

    /// Free memory in bytes, when known.
    pub fn memory_free(&self) -> Option<u64> {
        (self.memory_total > 0).then(|| self.memory_total.saturating_sub(self.memory_used))
    }
}

/// Where a worker learns which GPUs it has and how busy they are.
///
/// # Overview
///
/// The worker asks [`status`](GpuInventory::status) before every placement
/// and every registration (`gpupool status`): NVML on a real host
/// (`NvmlInventory` in `gpupool-worker`), a fixed list where NVML is missing
/// ([`StaticInventory`]), anything a test or a scheduler wants.
///
/// # Implementing
///
/// - Return the same GPUs, by index, on every call: the worker counts its
///   slots from the first answer. Indices are what `CUDA_VISIBLE_DEVICES`
///   means with `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
/// - Fill in memory and utilisation where known; zero means unknown, and a
///   GPU with unknown memory is never skipped as busy.
/// - Answer quickly: the worker asks before each placement, from its
///   reserve loop. NVML answers in about a millisecond; a slower source
///   should cache.
///
/// # Errors
///
/// None: a GPU that cannot be read is returned with what is known (its
/// index).
///
/// # Cancellation safety
///
/// Synchronous; nothing to cancel.
pub trait GpuInventory: Send + Sync + std::fmt::Debug {
    /// The GPUs this worker may use, with their status now.
    fn status(&self) -> Vec<GpuStatus>;
}

/// GPUs known by index only: `--gpus 0,1` without NVML.
#[derive(Debug, Clone, Default)]
pub struct StaticInventory {
    gpus: Vec<GpuStatus>,
}

impl StaticInventory {
    /// These GPUs, with nothing known about their memory.
    pub fn new(indices: &[u32]) -> Self {
        StaticInventory { gpus: indices.iter().map(|i| GpuStatus::bare(*i)).collect() }
    }

    /// These GPUs as described (tests).
    pub fn with_status(gpus: Vec<GpuStatus>) -> Self {
        StaticInventory { gpus }
    }
}

impl GpuInventory for StaticInventory {
    fn status(&self) -> Vec<GpuStatus> {
        self.gpus.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_parses() {
        assert_eq!("auto".parse::<GpuSelection>().unwrap(), GpuSelection::Auto);
        assert_eq!("none".parse::<GpuSelection>().unwrap(), GpuSelection::None);
        assert_eq!("2,0,2".parse::<GpuSelection>().unwrap(), GpuSelection::List(vec![0, 2]));
        assert!("0,x".parse::<GpuSelection>().is_err());
    }
}
