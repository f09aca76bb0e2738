//! Memory admission: a request starts generating only when the worst case of its KV cache fits,
//! beside the worst cases of the requests already generating, in the worker's KV budget
//! (`--kv-budget`). Otherwise it waits for one of them to finish, so a burst of long requests
//! queues instead of getting the pod OOM-killed.
//!
//! A request's worst case is the cache of every position it can reach: its prompt plus its
//! `max_tokens`, capped by the context window, rounded up to the
//! [`CACHE_CHUNK`] positions the cache allocates at a time, times the bytes one position takes
//! in every layer ([`bytes_per_position`]). The budget is kept in a fair semaphore whose units
//! are positions: a request waits in arrival order, so a long one is not starved by a stream of
//! short ones behind it. A request whose worst case alone exceeds the whole budget could never
//! start; it is refused at once ([`Admission::TooLarge`]), and the caller dead-letters it.
//!
//! A request that resumes from a snapshot holds more while its cache is restored: the cache and
//! one piece of the snapshot as the store returned it (`snapshot::resume::restore_peak_bytes`).
//! The restored cache is part of the worst case already; the piece is not, so such a request is
//! admitted for its worst case plus its snapshot's largest piece (the restore allowance), and
//! gives the allowance back as soon as the restore is done ([`KvPermit::restored`]). The size
//! comes from the snapshot's manifest, read before admission; the restore itself reads the
//! manifest again and, should it now need more than was admitted (another worker wrote since),
//! or should the allowance not fit beside the worst case in the whole budget, it resumes
//! without the cache and recomputes it from the tokens, which the worst case covers.
//!
//! The budget comes from the flag, or by default from what the memory the caches live in has
//! free once the model is loaded, less a reserve. On the CPU that is the cgroup's memory limit
//! minus what the process holds ([`default_budget`]); on a GPU (`cuda` builds), the device's free
//! memory as its driver reports it ([`accelerator_budget`]). The pure parts (sizes, cgroup
//! files, the arithmetic) are functions of their inputs; only [`KvBudget::from_config`] reads
//! the system.
//!
//! Limit: only KV caches and restores are counted. Activations of a prefill chunk, the copies a
//! snapshot makes of new positions, and the transient copy when a cache grows by a chunk are
//! what the reserve is for. The default also assumes the process is alone in its cgroup, as a
//! worker container in Kubernetes is, and on a GPU that what other processes hold of it at start
//! stays what they hold.

use std::sync::Arc;
use std::time::Duration;

use ferry_schemas::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tracing::{info, warn};

use crate::config::KvBudgetSetting;
use crate::engine::JobControl;
use crate::model::LlamaConfig;
use crate::model::CACHE_CHUNK;
use crate::ops::Ops;
use crate::snapshot::format::KvShape;

const MIB: u64 = 1024 * 1024;
/// The default budget keeps this share of the cgroup limit free...
const RESERVE_SHARE: u64 = 10;
/// ...and at least this much.
const MIN_RESERVE: u64 = 128 * MIB;
/// The default budget on an accelerator keeps at least this much of its memory free (and a
/// tenth of it, as on the CPU): CUDA modules loaded at their first use, cuBLAS's workspace and
/// the activations of a batch live there too.
const MIN_ACCELERATOR_RESERVE: u64 = 512 * MIB;
/// A cgroup memory limit this large means no limit (cgroup v1 writes `PAGE_COUNTER_MAX` pages,
/// about 8 EiB, for "unlimited").
const NO_LIMIT_FROM: u64 = 1 << 60;

/// Bytes one cached position of this model takes ([`KvShape::bytes_per_position`], the measure
/// the snapshot writer uses too).
pub fn bytes_per_position(c: &LlamaConfig) -> u64 {
    let shape = KvShape {
        n_layer: c.n_layer as u32,
        n_kv_head: c.n_kv_head as u32,
        head_dim: c.head_dim as u32,
    };
    shape.bytes_per_position() as u64
}

/// The most positions a request's cache can hold: its prompt and `max_tokens`, capped by the
/// context window (generation stops there).
pub fn worst_case_tokens(prompt_len: usize, max_tokens: usize, context: usize) -> usize {
    prompt_len.saturating_add(max_tokens).min(context)
}

/// The positions a cache of `tokens` positions has allocated: whole chunks.
pub fn allocated_positions(tokens: usize) -> usize {
    crate::model::allocated_positions(tokens)
}

/// Positions of the budget that `bytes` take, rounded up.
pub fn positions_for(bytes: u64, bytes_per_position: u64) -> usize {
    usize::try_from(bytes.div_ceil(bytes_per_position.max(1))).unwrap_or(usize::MAX)
}

/// The cgroup's memory limit, from the contents of cgroup v2's `memory.max` or else cgroup v1's
/// `memory.limit_in_bytes`. `None` when neither gives one (`max`, a value too large to be a
/// limit, unreadable or absent).
pub fn cgroup_limit(v2_memory_max: Option<&str>, v1_limit_in_bytes: Option<&str>) -> Option<u64> {
    let parse = |s: &str| s.trim().parse::<u64>().ok().filter(|&n| n > 0 && n < NO_LIMIT_FROM);
    match v2_memory_max {
        // cgroup v2 is authoritative where it is mounted, even when it says `max`.
        Some(v2) => parse(v2),
        None => v1_limit_in_bytes.and_then(parse),
    }
}

/// The resident set size, from the contents of `/proc/self/status` (`VmRSS:  1234 kB`).
pub fn resident_bytes(proc_status: &str) -> Option<u64> {
    let line = proc_status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

/// The default budget under a memory limit: what the limit leaves beside the process as it is
/// now (the model loaded) and a reserve of a tenth of the limit, at least 128 MiB. `None` when
/// that leaves nothing.
pub fn default_budget(limit: u64, resident: u64) -> Option<u64> {
    let reserve = (limit / RESERVE_SHARE).max(MIN_RESERVE);
    limit.checked_sub(resident)?.checked_sub(reserve).filter(|&b| b > 0)
}

/// The default budget on an accelerator with `free` of its `total` bytes free once the model is
/// loaded (the weights are out of `free` already): `free` less a reserve of a tenth of `total`,
/// at least 512 MiB. `None` when that leaves nothing.
pub fn accelerator_budget(free: u64, total: u64) -> Option<u64> {
    let reserve = (total / RESERVE_SHARE).max(MIN_ACCELERATOR_RESERVE);
    free.min(total).checked_sub(reserve).filter(|&b| b > 0)
}

/// The accelerator's free and total memory now, in bytes, as its driver reports them for the
/// device's context; `None` when the driver does not say.
#[cfg(feature = "cuda")]
fn accelerator_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let cuda = device.as_cuda_device().ok()?;
    let ctx = cuda.cuda_stream().context().clone();
    // `cuMemGetInfo` answers for the calling thread's current context.
    ctx.bind_to_thread().ok()?;
    let (free, total) = result::mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

/// Without the `cuda` feature there is no accelerator to ask.
#[cfg(not(feature = "cuda"))]
fn accelerator_memory(_device: &candle_core::Device) -> Option<(u64, u64)> {
    None
}

/// How an admission ended.
#[derive(Debug)]
pub enum Admission {
    /// The request may generate; its worst case stays reserved until the permit drops.
    Admitted(KvPermit),
    /// The request was told to suspend (a drain, a revocation) while it waited.
    Suspended,
    /// Its worst case alone exceeds the whole budget: it can never start on this worker.
    TooLarge { code: ErrorCode, message: String },
}

/// A request's reservation, released when dropped.
#[derive(Debug)]
pub struct KvPermit {
    /// `None` under an unlimited budget, which still reports what it would reserve.
    _permit: Option<OwnedSemaphorePermit>,
    /// The restore allowance's share of the budget, until [`KvPermit::restored`].
    restore: Option<OwnedSemaphorePermit>,
    /// What the permit reserves now, the restore allowance included until it is given back.
    bytes: u64,
    /// The restore allowance in bytes, until it is given back.
    restore_bytes: u64,
    /// Whether the budget is unlimited: any restore may then go ahead.
    unlimited: bool,
    ops: Arc<Ops>,
}

impl KvPermit {
    /// The memory beyond the cache that this request's restore may hold (see the module doc):
    /// what was reserved for it, unbounded under an unlimited budget, none once given back.
    pub fn restore_allowance(&self) -> u64 {
        if self.unlimited {
            u64::MAX
        } else {
            self.restore_bytes
        }
    }

    /// Gives the restore allowance back: the restore is over (or there was none), and what it
    /// held beside the cache is freed. Later restores under this permit get no allowance.
    pub fn restored(&mut self) {
        self.restore = None;
        self.ops.metrics.kv_released(self.restore_bytes);
        self.bytes -= self.restore_bytes;
        self.restore_bytes = 0;
        self.unlimited = false;
    }
}

impl Drop for KvPermit {
    fn drop(&mut self) {
        self.ops.metrics.kv_released(self.bytes);
    }
}

/// The worker's KV budget, shared by every request task.
#[derive(Debug)]
pub struct KvBudget {
    /// The budget in positions; `None` is unlimited (every request is admitted at once).
    positions: Option<Arc<Semaphore>>,
    capacity: usize,
    bytes_per_position: u64,
    context: usize,
    ops: Arc<Ops>,
}

/// Why the worker cannot start with the budget it was given or found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--kv-budget: {0}")]
pub struct BudgetError(pub String);

impl KvBudget {
    /// A budget of `bytes` (`None`: unlimited) for caches of `bytes_per_position` bytes a
    /// position, in a context of `context` positions.
    pub fn new(
        bytes: Option<u64>,
        bytes_per_position: u64,
        context: usize,
        ops: Arc<Ops>,
    ) -> Result<Self, BudgetError> {
        let bytes_per_position = bytes_per_position.max(1);
        let capacity = match bytes {
            None => None,
            Some(b) => {
                let positions = usize::try_from(b / bytes_per_position)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS)
                    .min(u32::MAX as usize);
                if positions < CACHE_CHUNK {
                    return Err(BudgetError(format!(
                        "{} MiB holds {positions} cached positions, less than the {CACHE_CHUNK} (\
                         {} MiB) one request's cache takes at the least: raise it, or the memory limit",
                        b / MIB,
                        CACHE_CHUNK as u64 * bytes_per_position / MIB
                    )));
                }
                Some(positions)
            }
        };
        ops.metrics
            .set_kv_budget(capacity.map(|p| p as u64 * bytes_per_position));
        Ok(Self {
            positions: capacity.map(|p| Arc::new(Semaphore::new(p))),
            capacity: capacity.unwrap_or(usize::MAX),
            bytes_per_position,
            context,
            ops,
        })
    }

    /// The budget for `model` as configured: the flag's size, unlimited, or by default (call it
    /// once the model is loaded) on the CPU the cgroup's limit less what this process holds
    /// now, and on an accelerator, where the caches live in its memory, which the cgroup does
    /// not bound, the device's free memory now, less a reserve ([`accelerator_budget`]);
    /// unlimited where neither is known. Logs which.
    pub fn from_config(
        setting: KvBudgetSetting,
        model: &crate::model::Model,
        ops: Arc<Ops>,
    ) -> Result<Self, BudgetError> {
        let per_position = bytes_per_position(&model.weights.config);
        let bytes = match setting {
            KvBudgetSetting::Off => {
                info!("KV budget: unlimited (--kv-budget off)");
                None
            }
            KvBudgetSetting::Bytes(b) => Some(b),
            KvBudgetSetting::Auto if !model.weights.device().is_cpu() => {
                match accelerator_memory(model.weights.device()) {
                    None => {
                        info!("KV budget: unlimited (the accelerator's free memory is unknown; set --kv-budget to bound the caches)");
                        None
                    }
                    Some((free, total)) => {
                        let budget = accelerator_budget(free, total).ok_or_else(|| {
                            BudgetError(format!(
                                "the accelerator has {} MiB of {} MiB free beside the model, which leaves no room for \
                                 KV caches beside the reserve: set --kv-budget, or use a larger device",
                                free / MIB,
                                total / MIB
                            ))
                        })?;
                        info!(
                            free_mib = free / MIB,
                            total_mib = total / MIB,
                            "KV budget from the accelerator's free memory, less a reserve"
                        );
                        Some(budget)
                    }
                }
            }
            KvBudgetSetting::Auto => {
                let read = |p: &str| std::fs::read_to_string(p).ok();
                let limit = cgroup_limit(
                    read("/sys/fs/cgroup/memory.max").as_deref(),
                    read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref(),
                );
                let resident = read("/proc/self/status").as_deref().and_then(resident_bytes);
                match (limit, resident) {
                    (None, _) => {
                        info!("KV budget: unlimited (no cgroup memory limit; set --kv-budget to bound the caches)");
                        None
                    }
                    (Some(limit), resident) => {
                        let resident = resident.unwrap_or_else(|| {
                            warn!("cannot read this process's resident memory; counting it as none");
                            0
                        });
                        let budget = default_budget(limit, resident).ok_or_else(|| {
                            BudgetError(format!(
                                "the cgroup memory limit of {} MiB leaves no room for KV caches beside the {} MiB \
                                 this process holds and the reserve: raise the limit or set --kv-budget",
                                limit / MIB,
                                resident / MIB
                            ))
                        })?;
                        info!(
                            limit_mib = limit / MIB,
                            resident_mib = resident / MIB,
                            "KV budget from the cgroup memory limit, less the process and a reserve"
                        );
                        Some(budget)
                    }
                }
            }
        };
        let budget = Self::new(bytes, per_position, model.context_length, ops)?;
        if let Some(b) = bytes {
            info!(
                budget_mib = b / MIB,
                positions = budget.capacity,
                bytes_per_position = per_position,
                full_context_requests = budget.capacity / allocated_positions(model.context_length).max(1),
                "KV budget: requests start when their worst-case cache fits"
            );
        }
        Ok(budget)
    }

    /// Waits until the worst case of a request with a prompt of `prompt_len` tokens and
    /// `max_tokens`, plus `restore_bytes` for restoring its snapshot (its largest piece,
    /// `snapshot::resume::restore_overhead_bytes`; 0 without one), fits beside those admitted,
    /// and reserves it. Gives up when `control` is told to suspend; refuses at once a request
    /// whose worst case could never fit. A restore allowance that could never fit beside the
    /// worst case is left out: the request is admitted without one
    /// ([`KvPermit::restore_allowance`] 0), and resumes by recomputing its cache.
    pub async fn admit(
        &self,
        prompt_len: usize,
        max_tokens: usize,
        restore_bytes: u64,
        control: &JobControl,
    ) -> Admission {
        let worst = worst_case_tokens(prompt_len, max_tokens, self.context);
        let cache = allocated_positions(worst);
        if cache > self.capacity {
            let bytes = cache as u64 * self.bytes_per_position;
            return Admission::TooLarge {
                code: self.too_large_code(prompt_len),
                message: self.too_large_message(prompt_len, max_tokens, bytes),
            };
        }
        let mut restore = positions_for(restore_bytes, self.bytes_per_position);
        if restore > self.capacity - cache {
            info!(
                restore_mib = restore_bytes.div_ceil(MIB),
                "restoring the snapshot's cache cannot fit beside the worst case in the KV budget: \
                 it will be recomputed from the tokens"
            );
            restore = 0;
        }
        let positions = cache + restore;
        let bytes = positions as u64 * self.bytes_per_position;
        let mut permit = match &self.positions {
            None => None,
            Some(sem) => {
                // `positions <= capacity <= u32::MAX` (see `new`).
                let n = positions as u32;
                match sem.clone().try_acquire_many_owned(n) {
                    Ok(p) => Some(p),
                    Err(TryAcquireError::NoPermits) => {
                        self.ops.metrics.kv_admission_waited();
                        info!(
                            worst_case_mib = bytes / MIB,
                            free_mib = sem.available_permits() as u64 * self.bytes_per_position / MIB,
                            "waiting for KV budget"
                        );
                        tokio::select! {
                            p = sem.clone().acquire_many_owned(n) => p.ok(),
                            () = suspended(control) => return Admission::Suspended,
                        }
                    }
                    // The semaphore is never closed.
                    Err(TryAcquireError::Closed) => None,
                }
            }
        };
        let restore_permit = permit.as_mut().and_then(|p| p.split(restore));
        self.ops.metrics.kv_reserved(bytes);
        Admission::Admitted(KvPermit {
            _permit: permit,
            restore: restore_permit,
            bytes,
            restore_bytes: restore as u64 * self.bytes_per_position,
            unlimited: self.positions.is_none(),
            ops: self.ops.clone(),
        })
    }

    /// A prompt that does not fit beside one generated token is too long for this worker; a
    /// prompt that fits but not with its `max_tokens` is a request to send with fewer.
    fn too_large_code(&self, prompt_len: usize) -> ErrorCode {
        if allocated_positions(worst_case_tokens(prompt_len, 1, self.context)) > self.capacity {
            ErrorCode::PromptTooLong
        } else {
            ErrorCode::InvalidRequest
        }
    }

    fn too_large_message(&self, prompt_len: usize, max_tokens: usize, bytes: u64) -> String {
        let most = (self.capacity / CACHE_CHUNK) * CACHE_CHUNK;
        format!(
            "a prompt of {prompt_len} tokens with max_tokens {max_tokens} needs up to {} MiB of KV cache, more than \
             this worker's whole KV budget of {} MiB (--kv-budget): prompt plus max_tokens may be at most {most} tokens here",
            bytes.div_ceil(MIB),
            self.capacity as u64 * self.bytes_per_position / MIB,
        )
    }
}

/// Resolves once `control` is told to suspend.
async fn suspended(control: &JobControl) {
    while !control.suspend.load(std::sync::atomic::Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests;
