//! The CUDA health source (built only with the `cuda` feature).
//!
//! cudarc 0.19 (the version candle 0.11 links) has no NVML bindings, so the check goes through
//! the CUDA driver API instead: it synchronises the CUDA context the model runs in
//! (`cuCtxSynchronize`, on candle's own primary context). A context that hit an illegal address,
//! a failed launch, an uncorrectable ECC error or a lost device is poisoned for good: every later
//! call on it returns that *sticky* error, which is exactly what this check sees, also while the
//! worker is idle. Which codes count as unrecoverable is decided by the pure
//! [`super::is_unrecoverable`], tested without a GPU. What it cannot see:
//! ECC or thermal events that have not (yet) poisoned the context, which only NVML reports.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaContext, DriverError};

use super::health::{Health, HealthSource};

/// Checks the context of a CUDA device.
pub struct CudaHealth {
    ordinal: usize,
    ctx: Arc<CudaContext>,
}

impl CudaHealth {
    /// The source for `device`, or `None` when it is not a CUDA device.
    pub fn new(device: &candle_core::Device) -> Option<Self> {
        let cuda = device.as_cuda_device().ok()?;
        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        Some(Self {
            ordinal: ctx.ordinal(),
            ctx,
        })
    }
}

impl CudaHealth {
    /// The device's UUID as NVML writes it, to find the same GPU there.
    pub fn nvml_uuid(&self) -> Option<String> {
        let uuid = self.ctx.uuid().ok()?;
        Some(super::nvml::nvml_uuid(uuid.bytes.map(|b| b as u8)))
    }
}

impl HealthSource for CudaHealth {
    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn check(&self) -> Health {
        match self.ctx.synchronize() {
            Ok(()) => Health::Healthy,
            Err(DriverError(code)) => {
                let name = format!("{code:?}");
                if super::is_unrecoverable(code as u32) {
                    Health::Unrecoverable(name)
                } else {
                    Health::Degraded(name)
                }
            }
        }
    }
}
