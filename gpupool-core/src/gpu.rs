//! Which GPUs a worker may give to jobs, and which are free right now.
//!
//! Discovery goes through NVML (`nvml-wrapper`, which loads the NVIDIA
//! library at run time): with no driver or no GPU it fails in milliseconds
//! and the worker runs CPU-only.

use std::collections::BTreeMap;
use std::str::FromStr;

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

/// One GPU as NVML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Index in PCI bus order (what `CUDA_VISIBLE_DEVICES` means with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub index: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Model name.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total: u64,
}

/// Lists the GPUs NVML sees, or says why it cannot.
pub fn discover() -> Result<Vec<GpuInfo>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable ({e})"))?;
    let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
    (0..count)
        .map(|i| {
            let d = nvml.device_by_index(i).map_err(|e| format!("NVML device {i}: {e}"))?;
            Ok(GpuInfo {
                index: i,
                uuid: d.uuid().unwrap_or_default(),
                name: d.name().unwrap_or_default(),
                memory_total: d.memory_info().map(|m| m.total).unwrap_or(0),
            })
        })
        .collect()
}

/// Turns a selection into the GPU indices this worker serves.
pub fn resolve(selection: &GpuSelection) -> Result<Vec<u32>, Error> {
    match selection {
        GpuSelection::None => Ok(Vec::new()),
        GpuSelection::Auto => match discover() {
            Ok(gpus) => {
                tracing::info!("found {} GPU(s): {:?}", gpus.len(), gpus.iter().map(|g| &g.name).collect::<Vec<_>>());
                Ok(gpus.into_iter().map(|g| g.index).collect())
            }
            Err(why) => {
                tracing::info!("no GPUs: {why}; running CPU-only");
                Ok(Vec::new())
            }
        },
        GpuSelection::List(list) => match discover() {
            Ok(gpus) => {
                let missing: Vec<u32> = list.iter().copied().filter(|i| !gpus.iter().any(|g| g.index == *i)).collect();
                if missing.is_empty() {
                    Ok(list.clone())
                } else {
                    Err(Error::Config(format!(
                        "--gpus names GPU(s) {missing:?}, but this host has {} GPU(s)",
                        gpus.len()
                    )))
                }
            }
            Err(_) => Ok(list.clone()),
        },
    }
}

/// Which GPUs are in use, so each is given to at most `per_gpu` jobs.
#[derive(Debug, Clone)]
pub struct GpuSlots {
    load: BTreeMap<u32, usize>,
    per_gpu: usize,
}

impl GpuSlots {
    /// Slots for these GPUs, `per_gpu` jobs each (at least 1).
    pub fn new(gpus: &[u32], per_gpu: usize) -> Self {
        GpuSlots { load: gpus.iter().map(|g| (*g, 0)).collect(), per_gpu: per_gpu.max(1) }
    }

    /// Whether there are any GPUs.
    pub fn is_gpu_host(&self) -> bool {
        !self.load.is_empty()
    }

    /// How many distinct GPUs could be given now.
    pub fn free(&self) -> u32 {
        u32::try_from(self.load.values().filter(|l| **l < self.per_gpu).count()).unwrap_or(u32::MAX)
    }

    /// Takes `n` distinct GPUs, least loaded first; `None` if fewer are free.
    pub fn take(&mut self, n: u32) -> Option<Vec<u32>> {
        if n > self.free() {
            return None;
        }
        let mut free: Vec<(usize, u32)> =
            self.load.iter().filter(|(_, l)| **l < self.per_gpu).map(|(g, l)| (*l, *g)).collect();
        free.sort_unstable();
        let chosen: Vec<u32> = free.into_iter().take(n as usize).map(|(_, g)| g).collect();
        for g in &chosen {
            *self.load.entry(*g).or_default() += 1;
        }
        let mut chosen = chosen;
        chosen.sort_unstable();
        Some(chosen)
    }

    /// Gives GPUs back.
    pub fn give_back(&mut self, gpus: &[u32]) {
        for g in gpus {
            if let Some(l) = self.load.get_mut(g) {
                *l = l.saturating_sub(1);
            }
        }
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

    #[test]
    fn slots_never_double_book() {
        let mut s = GpuSlots::new(&[0, 1, 2], 1);
        let a = s.take(2).unwrap();
        assert_eq!(s.free(), 1);
        assert!(s.take(2).is_none());
        let b = s.take(1).unwrap();
        assert!(a.iter().all(|g| !b.contains(g)));
        assert_eq!(s.free(), 0);
        s.give_back(&a);
        assert_eq!(s.free(), 2);
        let mut shared = GpuSlots::new(&[0], 2);
        assert_eq!(shared.take(1), Some(vec![0]));
        assert_eq!(shared.take(1), Some(vec![0]));
        assert_eq!(shared.take(1), None);
    }
}
