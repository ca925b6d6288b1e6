//! GPUs on a real host: [`NvmlInventory`] (NVML through `nvml-wrapper`,
//! which loads the NVIDIA library at run time: with no driver or no GPU it
//! fails in milliseconds and the worker runs CPU-only), the inventory a
//! `--gpus` choice gives ([`inventory`]), and [`Placement`], which gives each
//! GPU to one job at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpupool_core::Error;
use gpupool_core::gpu::{GpuInventory, GpuSelection, GpuStatus, StaticInventory};

/// GPUs through NVML.
pub struct NvmlInventory {
    nvml: nvml_wrapper::Nvml,
    indices: Vec<u32>,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlInventory").field("indices", &self.indices).finish_non_exhaustive()
    }
}

impl NvmlInventory {
    /// Opens NVML; `Err` says why it cannot (no driver, no GPU).
    pub fn open() -> Result<Self, String> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable ({e})"))?;
        let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
        Ok(NvmlInventory { nvml, indices: (0..count).collect() })
    }

    /// Every GPU's status, whether this worker uses it or not.
    pub fn all(&self) -> Vec<GpuStatus> {
        self.indices.iter().map(|i| self.one(*i)).collect()
    }

    fn one(&self, index: u32) -> GpuStatus {
        let Ok(d) = self.nvml.device_by_index(index) else { return GpuStatus::bare(index) };
        let memory = d.memory_info().ok();
        GpuStatus {
            index,
            uuid: d.uuid().unwrap_or_default(),
            name: d.name().unwrap_or_default(),
            memory_total: memory.as_ref().map_or(0, |m| m.total),
            memory_used: memory.as_ref().map_or(0, |m| m.used),
            utilization: d.utilization_rates().ok().map(|u| u.gpu),
            processes: d.running_compute_processes().map(|ps| ps.iter().map(|p| p.pid).collect()).unwrap_or_default(),
        }
    }

    /// Keeps only these indices.
    fn restrict(mut self, keep: &[u32]) -> Self {
        self.indices.retain(|i| keep.contains(i));
        self
    }
}

impl GpuInventory for NvmlInventory {
    fn status(&self) -> Vec<GpuStatus> {
        self.indices.iter().map(|i| self.one(*i)).collect()
    }
}

/// `CUDA_VISIBLE_DEVICES` set on the worker itself: indices, or UUIDs
/// matched against NVML's list. `None` when unset.
fn visible_devices(all: &[GpuStatus]) -> Option<Vec<u32>> {
    let v = std::env::var("CUDA_VISIBLE_DEVICES").ok()?;
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(i) = item.parse::<u32>() {
            out.push(i);
        } else if let Some(g) = all.iter().find(|g| !g.uuid.is_empty() && (g.uuid == item || g.uuid.starts_with(item)))
        {
            out.push(g.index);
        }
    }
    Some(out)
}

/// The inventory for a `--gpus` choice. `auto` uses NVML (honouring
/// `CUDA_VISIBLE_DEVICES` set on the worker) and falls back to CPU-only with
/// one log line; a list is checked against NVML where it exists and taken as
/// given where it does not.
pub fn inventory(selection: &GpuSelection) -> Result<Arc<dyn GpuInventory>, Error> {
    match selection {
        GpuSelection::None => Ok(Arc::new(StaticInventory::default())),
        GpuSelection::Auto => match NvmlInventory::open() {
            Ok(nvml) => {
                let all = nvml.all();
                let inv = match visible_devices(&all) {
                    Some(keep) => nvml.restrict(&keep),
                    None => nvml,
                };
                let names: Vec<String> = inv.status().iter().map(|g| format!("{} {}", g.index, g.name)).collect();
                tracing::info!("GPUs: {}", names.join(", "));
                Ok(Arc::new(inv))
            }
            Err(why) => {
                let fallback = visible_devices(&[]).unwrap_or_default();
                if fallback.is_empty() {
                    tracing::info!("no GPUs: {why}; running CPU-only");
                } else {
                    tracing::info!(
                        "{why}; using CUDA_VISIBLE_DEVICES={} as given",
                        fallback.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                    );
                }
                Ok(Arc::new(StaticInventory::new(&fallback)))
            }
        },
        GpuSelection::List(list) => match NvmlInventory::open() {
            Ok(nvml) => {
                let count = nvml.indices.len();
                let missing: Vec<u32> = list.iter().copied().filter(|i| !nvml.indices.contains(i)).collect();
                if missing.is_empty() {
                    Ok(Arc::new(nvml.restrict(list)))
                } else {
                    {
                        let missing = missing.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                        Err(Error::Config(format!(
                            "--gpus names GPU {missing}, but this host has {count} GPU(s) (0 to {})",
                            count.saturating_sub(1)
                        )))
                    }
                }
            }
            Err(why) => {
                let shown = list.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                tracing::warn!("{why}; taking --gpus {shown} as given, with nothing known of their memory");
                Ok(Arc::new(StaticInventory::new(list)))
            }
        },
    }
}

/// The GPU indices a selection resolves to (see [`inventory`]).
pub fn resolve(selection: &GpuSelection) -> Result<Vec<u32>, Error> {
    Ok(inventory(selection)?.status().iter().map(|g| g.index).collect())
}

/// Which GPUs are given to which jobs, so that each goes to at most
/// `per_gpu` jobs at a time, counted from the moment it is assigned (not
/// from when the job's process allocates memory).
///
/// Before each placement it asks the inventory again: a GPU none of this
/// worker's jobs holds is skipped while more than `busy_fraction` of its
/// memory is used (by someone else), and a job's `gpu_memory` needs that
/// much free memory.
#[derive(Debug, Clone)]
pub struct Placement {
    inventory: Arc<dyn GpuInventory>,
    indices: Vec<u32>,
    load: BTreeMap<u32, usize>,
    per_gpu: usize,
    busy_fraction: f64,
}

impl Placement {
    /// Placement over an inventory, `per_gpu` jobs each (at least 1), a GPU
    /// counting as taken by others when more than `busy_fraction` of its
    /// memory is used.
    pub fn new(inventory: Arc<dyn GpuInventory>, per_gpu: usize, busy_fraction: f64) -> Self {
        let indices: Vec<u32> = inventory.status().iter().map(|g| g.index).collect();
        let load = indices.iter().map(|g| (*g, 0)).collect();
        Placement { inventory, indices, load, per_gpu: per_gpu.max(1), busy_fraction }
    }

    /// The GPU indices this worker serves.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Whether there are any GPUs.
    pub fn is_gpu_host(&self) -> bool {
        !self.indices.is_empty()
    }

    /// How many GPUs this worker has.
    pub fn total(&self) -> u32 {
        u32::try_from(self.indices.len()).unwrap_or(u32::MAX)
    }

    /// The inventory's status now.
    pub fn status(&self) -> Vec<GpuStatus> {
        self.inventory.status()
    }

    /// Which jobs (count) hold each GPU.
    pub fn load(&self, index: u32) -> usize {
        self.load.get(&index).copied().unwrap_or(0)
    }

    fn usable(&self, status: &[GpuStatus], min_free: Option<u64>) -> Vec<(usize, u32)> {
        self.load
            .iter()
            .filter(|(_, l)| **l < self.per_gpu)
            .filter(|(g, l)| {
                let Some(s) = status.iter().find(|s| s.index == **g) else { return true };
                let foreign_busy =
                    **l == 0 && s.memory_total > 0 && s.memory_used as f64 > self.busy_fraction * s.memory_total as f64;
                let enough = min_free.is_none_or(|need| s.memory_free().is_none_or(|free| free >= need));
                !foreign_busy && enough
            })
            .map(|(g, l)| (*l, *g))
            .collect()
    }

    /// How many distinct GPUs could be given now.
    pub fn free(&self) -> u32 {
        u32::try_from(self.usable(&self.inventory.status(), None).len()).unwrap_or(u32::MAX)
    }

    /// Takes `n` distinct GPUs with at least `min_free` bytes free each,
    /// least loaded first; `None` if fewer are usable now.
    pub fn take(&mut self, n: u32, min_free: Option<u64>) -> Option<Vec<u32>> {
        let status = if n == 0 { Vec::new() } else { self.inventory.status() };
        let mut usable = self.usable(&status, min_free);
        if usable.len() < n as usize {
            return None;
        }
        usable.sort_unstable();
        let mut chosen: Vec<u32> = usable.into_iter().take(n as usize).map(|(_, g)| g).collect();
        for g in &chosen {
            *self.load.entry(*g).or_default() += 1;
        }
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

    fn placement(gpus: &[u32], per_gpu: usize) -> Placement {
        Placement::new(Arc::new(StaticInventory::new(gpus)), per_gpu, 0.1)
    }

    #[test]
    fn never_double_books() {
        let mut s = placement(&[0, 1, 2], 1);
        let a = s.take(2, None).unwrap();
        assert_eq!(s.free(), 1);
        assert!(s.take(2, None).is_none());
        let b = s.take(1, None).unwrap();
        assert!(a.iter().all(|g| !b.contains(g)));
        assert_eq!(s.free(), 0);
        s.give_back(&a);
        assert_eq!(s.free(), 2);
        let mut shared = placement(&[0], 2);
        assert_eq!(shared.take(1, None), Some(vec![0]));
        assert_eq!(shared.take(1, None), Some(vec![0]));
        assert_eq!(shared.take(1, None), None);
        assert_eq!(placement(&[], 1).take(0, None), Some(vec![]));
    }

    #[test]
    fn skips_gpus_busy_with_someone_elses_process_and_honours_gpu_memory() {
        const GIB: u64 = 1 << 30;
        let gpu = |index, used| GpuStatus { index, memory_total: 80 * GIB, memory_used: used, ..GpuStatus::default() };
        let inv = Arc::new(StaticInventory::with_status(vec![gpu(0, 70 * GIB), gpu(1, GIB / 2), gpu(2, 20 * GIB)]));
        let mut p = Placement::new(inv, 1, 0.1);
        assert_eq!(p.free(), 1, "GPU 0 (70 of 80 GiB used) and GPU 2 (20 GiB) are taken by others");
        assert_eq!(p.take(1, Some(40 * GIB)), Some(vec![1]));
        assert_eq!(p.take(1, None), None);
        let mut lenient = Placement::new(Arc::new(StaticInventory::with_status(vec![gpu(2, 20 * GIB)])), 1, 0.5);
        assert_eq!(lenient.take(1, Some(70 * GIB)), None, "60 GiB free is less than the 70 GiB asked for");
        assert_eq!(lenient.take(1, Some(50 * GIB)), Some(vec![2]));
    }
}
