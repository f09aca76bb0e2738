//! Where a bench's JSON report goes: `FERRY_BENCH_OUT` (`make bench` sets it), or the
//! workspace's `target/bench`. Included with `#[path]` by each bench.

use std::path::PathBuf;

/// Writes `report` as pretty JSON to `<out>/<name>.json` and returns the file's path.
pub fn save(name: &str, report: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let out = std::env::var_os("FERRY_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(report)? + "\n")?;
    Ok(file)
}
