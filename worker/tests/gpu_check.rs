//! The prepared GPU check, dry-run on the CPU: `scripts/gguf-first-layers.py` derives the small
//! model it carries (the first 2 blocks of the test model), and `scripts/gpu-check.sh` runs
//! `ferry-gpu-check` on it with `FERRY_GPU_CHECK_DEVICE=cpu` and this build's binary. The report
//! must pass and hold every part, so the script is known to work before a GPU ever runs it.

use std::process::Command;

#[test]
fn the_gpu_check_passes_as_a_dry_run_on_the_cpu() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small.gguf");
    let derived = Command::new("python3")
        .arg(root.join("scripts/gguf-first-layers.py"))
        .arg(ferry_testkit::model::model_path())
        .arg(&small)
        .arg("2")
        .output()
        .expect("python3 runs");
    assert!(
        derived.status.success(),
        "deriving the small model failed (`python3 -m pip install gguf`; make test does):\n{}",
        String::from_utf8_lossy(&derived.stderr)
    );
    let out = dir.path().join("out");
    let run = Command::new(root.join("scripts/gpu-check.sh"))
        .env("OUT", &out)
        .env("FERRY_GPU_CHECK_DEVICE", "cpu")
        .env("FERRY_GPU_CHECK_BIN", env!("CARGO_BIN_EXE_ferry-gpu-check"))
        .env("FERRY_GPU_CHECK_MODEL", &small)
        .output()
        .expect("the script runs");
    let log = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("gpu-check.json")).expect("a report")).expect("JSON");
    assert_eq!(report["pass"], true, "{report:#}");
    assert_eq!(report["layers"], 2);
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["resume"]["runs"].as_array().map(Vec::len), Some(4));
    let runs = report["resume"]["runs"].as_array().expect("runs");
    assert!(runs.iter().all(|r| r["identical"] == true), "{report:#}");
    assert!(
        runs.iter()
            .any(|r| r["drain"] == false && r["resumed_from"].as_u64() < r["interrupted_at"].as_u64()),
        "a crash between snapshots loses tokens: {report:#}"
    );
    let throughput = report["throughput"].as_array().expect("throughput");
    assert_eq!(throughput.len(), 2);
    assert!(throughput
        .iter()
        .all(|t| t["decode_tokens_per_s"].as_f64().is_some_and(|r| r > 0.0)));
    assert!(report["snapshot_overhead"]["with_over_without"]
        .as_f64()
        .is_some_and(|r| r > 0.0));
    assert!(out.join("gpu-machine.txt").exists());
}
