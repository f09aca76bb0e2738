//! The GPU's own health, from NVML (`libnvidia-ml`, loaded at run time by `nvml-wrapper`): what
//! a poisoned CUDA context does not show. Critical XID errors, uncorrectable ECC errors, pages
//! pending retirement, temperature and hardware slowdowns feed the existing health monitor
//! ([`super::health::monitor`]): a reading that means the device cannot be trusted trips the
//! worker (unready, drain, exit 3); one worth a warning is logged as degraded.
//!
//! NVML exists only where an NVIDIA driver is installed: on a machine without one,
//! [`NvmlHealth::open`] says so and the worker runs without this source. The decision is the
//! pure [`classify`], tested here on readings; the thresholds are documented beside the
//! Kubernetes manifests (`k8s/README.md`).

use std::sync::{Arc, Mutex};

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use tracing::{info, warn};

use super::health::{Health, HealthSource};

/// XID errors after which the GPU must be reset (or the node drained) before it is trusted
/// again, from NVIDIA's XID catalogue: 48 double-bit ECC, 62 internal micro-controller halt,
/// 64 row-remapping failure, 74 NVLink error, 79 fallen off the bus, 95 uncontained ECC,
/// 119 and 120 GSP errors, 140 unrecovered ECC. Any other critical XID (an application's MMU
/// fault, say) is degraded: if it poisoned the context, the CUDA check trips on that.
pub const FATAL_XIDS: [u64; 9] = [48, 62, 64, 74, 79, 95, 119, 120, 140];

/// The GPU temperature (°C) at and above which it is reported degraded.
pub const HOT_CELSIUS: u32 = 90;

/// One look at the device; a field is `None` where the device or driver does not report it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Readings {
    /// Critical XID errors since the last look.
    pub xids: Vec<u64>,
    /// Uncorrectable ECC errors since the driver loaded (volatile counter).
    pub uncorrected_ecc: Option<u64>,
    /// Retired pages waiting for a GPU reset to take effect.
    pub pages_pending_retirement: Option<bool>,
    pub temperature_celsius: Option<u32>,
    /// Hardware slowdown (thermal, power brake, or the generic hardware one) is active.
    pub hardware_slowdown: Option<bool>,
}

/// What the readings mean: the worst finding, with every finding of that severity named.
pub fn classify(r: &Readings) -> Health {
    let mut fatal = Vec::new();
    let mut degraded = Vec::new();
    for xid in &r.xids {
        if FATAL_XIDS.contains(xid) {
            fatal.push(format!("XID {xid}"));
        } else {
            degraded.push(format!("XID {xid}"));
        }
    }
    if let Some(n) = r.uncorrected_ecc.filter(|n| *n > 0) {
        fatal.push(format!("{n} uncorrectable ECC errors"));
    }
    if r.pages_pending_retirement == Some(true) {
        degraded.push("retired pages pending a GPU reset".into());
    }
    if let Some(t) = r.temperature_celsius.filter(|t| *t >= HOT_CELSIUS) {
        degraded.push(format!("{t} °C"));
    }
    if r.hardware_slowdown == Some(true) {
        degraded.push("hardware slowdown".into());
    }
    if !fatal.is_empty() {
        Health::Unrecoverable(fatal.join(", "))
    } else if !degraded.is_empty() {
        Health::Degraded(degraded.join(", "))
    } else {
        Health::Healthy
    }
}

/// The NVML UUID (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`) of a device whose CUDA UUID is
/// `bytes`: how the CUDA device the model runs on is found in NVML, whatever the ordering of
/// the two (`CUDA_VISIBLE_DEVICES`, `CUDA_DEVICE_ORDER`).
pub fn nvml_uuid(bytes: [u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// NVML's view of one GPU.
pub struct NvmlHealth {
    nvml: Nvml,
    uuid: String,
    /// Critical XIDs seen by the watcher thread since the last check.
    xids: Arc<Mutex<Vec<u64>>>,
}

impl NvmlHealth {
    /// The source for the GPU with NVML UUID `uuid`; the reason why not where NVML is absent
    /// (no NVIDIA driver) or does not know the device.
    pub fn open(uuid: &str) -> Result<Self, NvmlError> {
        let nvml = Nvml::init()?;
        nvml.device_by_uuid(uuid)?;
        let xids = Arc::new(Mutex::new(Vec::new()));
        watch_xids(uuid.to_string(), xids.clone());
        info!(device = uuid, "NVML health source open");
        Ok(Self {
            nvml,
            uuid: uuid.to_string(),
            xids,
        })
    }

    fn read(&self) -> Result<Readings, NvmlError> {
        let d = self.nvml.device_by_uuid(self.uuid.as_str())?;
        let slowdown = ThrottleReasons::HW_SLOWDOWN
            | ThrottleReasons::HW_THERMAL_SLOWDOWN
            | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN;
        Ok(Readings {
            xids: std::mem::take(&mut *self.xids.lock().unwrap_or_else(|e| e.into_inner())),
            uncorrected_ecc: d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).ok(),
            pages_pending_retirement: d.are_pages_pending_retired().ok(),
            temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok(),
            hardware_slowdown: d.current_throttle_reasons().ok().map(|r| r.intersects(slowdown)),
        })
    }
}

impl HealthSource for NvmlHealth {
    fn name(&self) -> String {
        format!("nvml:{}", self.uuid)
    }

    fn check(&self) -> Health {
        match self.read() {
            Ok(r) => classify(&r),
            // The driver answers for a device it still has: losing it is NVML's "GPU is lost".
            Err(NvmlError::GpuLost) => Health::Unrecoverable("NVML: the GPU is lost".into()),
            Err(e) => Health::Degraded(format!("NVML: {e}")),
        }
    }
}

/// Collects the device's critical XID errors as NVML reports them, on a thread of its own (an
/// event set is waited on; it lives with the NVML handle that made it). Ends quietly where the
/// device does not report XID events.
fn watch_xids(uuid: String, xids: Arc<Mutex<Vec<u64>>>) {
    let spawned = std::thread::Builder::new().name("nvml-xid".into()).spawn(move || {
        let watch = || -> Result<(), NvmlError> {
            let nvml = Nvml::init()?;
            let device = nvml.device_by_uuid(uuid.as_str())?;
            let set = device
                .register_events(EventTypes::CRITICAL_XID_ERROR, nvml.create_event_set()?)
                .map_err(|e| e.error)?;
            loop {
                match set.wait(1_000) {
                    Ok(event) => {
                        let xid = match event.event_data {
                            Some(XidError::Value(v)) => v,
                            _ => 0,
                        };
                        warn!(device = %uuid, xid, "critical XID error");
                        xids.lock().unwrap_or_else(|e| e.into_inner()).push(xid);
                    }
                    Err(NvmlError::Timeout) => {}
                    Err(e) => return Err(e),
                }
            }
        };
        if let Err(e) = watch() {
            info!(error = %e, "NVML XID events unavailable; the other readings still count");
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the NVML XID watcher");
    }
}

#[cfg(test)]
mod tests;
