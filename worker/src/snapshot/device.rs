//! Where a snapshot's cache was computed: part of the model fingerprint every manifest carries.

use candle_core::Device;

/// Where a snapshot's cache was computed, as its model fingerprint names it: a snapshot is
/// continued only where the arithmetic is the same, bit for bit, and is otherwise recomputed
/// from its tokens. On the CPU: `cpu`, plus Ferry's kernel path when they ran (they and candle's
/// round differently). On a GPU: the device's name and compute capability and the cache's dtype
/// ([`gpu_fingerprint`]), since kernels compiled for another architecture, or a library that
/// picks its algorithm by the device, may round differently.
pub fn device_fingerprint(device: &Device, kernels: &str) -> String {
    let base = match device {
        Device::Cpu => "cpu".to_string(),
        other => gpu_description(other),
    };
    match kernels {
        "" => base,
        kernels => format!("{base}+{kernels}"),
    }
}

/// The fingerprint of a GPU named `name`, of compute capability `major`.`minor`, whose KV cache
/// holds `dtype` values.
pub fn gpu_fingerprint(name: &str, (major, minor): (i32, i32), dtype: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("cuda-{name}-sm{major}{minor}-{dtype}")
}

/// The dtype of the KV cache: the llama implementation computes in f32 on every device.
const KV_DTYPE: &str = "f32";

#[cfg(feature = "cuda")]
fn gpu_description(device: &Device) -> String {
    let Ok(cuda) = device.as_cuda_device() else {
        return format!("{:?}-{KV_DTYPE}", device.location());
    };
    let ctx = cuda.cuda_stream().context().clone();
    let name = ctx.name().unwrap_or_else(|_| "unknown".into());
    let capability = ctx.compute_capability().unwrap_or((0, 0));
    gpu_fingerprint(&name, capability, KV_DTYPE)
}

#[cfg(not(feature = "cuda"))]
fn gpu_description(device: &Device) -> String {
    format!("{:?}-{KV_DTYPE}", device.location())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_named_with_the_kernels_that_ran() {
        assert_eq!(device_fingerprint(&Device::Cpu, ""), "cpu");
        assert_eq!(
            device_fingerprint(&Device::Cpu, "ferry-q8-attn-avx2"),
            "cpu+ferry-q8-attn-avx2"
        );
    }

    #[test]
    fn gpus_are_told_apart_by_name_capability_and_dtype() {
        let h100 = gpu_fingerprint("NVIDIA H100 80GB HBM3", (9, 0), "f32");
        assert_eq!(h100, "cuda-nvidia_h100_80gb_hbm3-sm90-f32");
        assert_ne!(h100, gpu_fingerprint("NVIDIA H100 PCIe", (9, 0), "f32"));
        assert_ne!(h100, gpu_fingerprint("NVIDIA H100 80GB HBM3", (8, 0), "f32"));
        assert_ne!(h100, gpu_fingerprint("NVIDIA H100 80GB HBM3", (9, 0), "bf16"));
        assert!(!h100.contains(' '), "one token in the fingerprint");
    }
}
