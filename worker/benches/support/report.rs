//! Where a bench's JSON report goes: `FERRY_BENCH_OUT` (`make bench` sets it), or the
//! workspace's `target/bench`. Included with `#[path]` by each bench. Every report names the
//! machine: the CPU, the instruction sets the kernels care about, and the kernels that ran.

use std::path::PathBuf;

/// The model at `path` with `weights`, on the kernels `FERRY_KERNELS` names (as the worker reads
/// it).
#[allow(dead_code)] // Not every bench loads a model itself.
pub fn load_model(
    path: &std::path::Path,
    weights: ferry_worker::model::WeightFormat,
) -> anyhow::Result<ferry_worker::model::Model> {
    use ferry_worker::model::{Kernels, LoadOptions, Model, ModelSource};
    let opts = LoadOptions {
        kernels: Kernels::from_env().map_err(anyhow::Error::msg)?,
        ..LoadOptions::new(ModelSource::Path(path.to_path_buf()), weights)
    };
    Ok(Model::load(&opts, &candle_core::Device::Cpu)?)
}

/// The CPU's model name and the instruction sets that pick a kernel path.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx_vnni",
        "amx_int8",
    ];
    let features: Vec<&str> = wanted
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|g| g == *f))
        .collect();
    serde_json::json!({
        "cpu": field("model name"),
        "cpu_features": features,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "kernels": ferry_worker::model::Kernels::from_env().map(|k| k.name()).unwrap_or("invalid FERRY_KERNELS"),
    })
}

/// Writes `report` as pretty JSON to `<out>/<name>.json`, with the machine beside it (see
/// [`machine`]), and returns the file's path.
pub fn save(name: &str, report: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let mut report = report.clone();
    if let Some(fields) = report.as_object_mut() {
        fields.insert("machine".into(), machine());
    }
    let out = std::env::var_os("FERRY_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(&report)? + "\n")?;
    Ok(file)
}

/// [`save`]s `report`, prints it as pretty JSON and says where it was written: the end of a
/// bench whose report is read as it is.
#[allow(dead_code)] // The throughput bench prints a table instead.
pub fn save_and_print(name: &str, report: &serde_json::Value) -> anyhow::Result<()> {
    let file = save(name, report)?;
    println!("{}", serde_json::to_string_pretty(report)?);
    println!("wrote {}", file.display());
    Ok(())
}
