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

/// A library the binary needs and the loader cannot find (cuBLAS and cuRAND are not carried) is
/// looked for where CUDA usually lies, `FERRY_GPU_CHECK_LIB_DIRS` first, and its folder added:
/// a stand-in binary linked against a library of its own runs only if the script finds it.
#[test]
fn the_gpu_check_finds_a_library_the_loader_cannot() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let (libs, src) = (dir.path().join("libs"), dir.path().join("src"));
    std::fs::create_dir_all(&libs).expect("libs");
    std::fs::create_dir_all(&src).expect("src");
    let gcc = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("gcc").args(args).output().expect("gcc runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(
        src.join("lib.c"),
        "const char *report(void) { return \"{\\\"pass\\\": true}\"; }\n",
    )
    .expect("lib.c");
    // The stand-in takes the check's arguments and writes the library's report to `--out`.
    std::fs::write(
        src.join("main.c"),
        "#include <stdio.h>\n#include <string.h>\nconst char *report(void);\n\
         int main(int argc, char **argv) {\n\
           for (int i = 1; i + 1 < argc; i++) if (!strcmp(argv[i], \"--out\")) {\n\
             FILE *f = fopen(argv[i + 1], \"w\"); if (!f) return 2; fputs(report(), f); fclose(f); return 0; }\n\
           return 3; }\n",
    )
    .expect("main.c");
    let lib = libs.join("libferrystandin.so.7");
    gcc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-Wl,-soname,libferrystandin.so.7".as_ref(),
        "-o".as_ref(),
        lib.as_os_str(),
        src.join("lib.c").as_os_str(),
    ]);
    let bin = dir.path().join("ferry-gpu-check");
    gcc(&[
        "-o".as_ref(),
        bin.as_os_str(),
        src.join("main.c").as_os_str(),
        lib.as_os_str(),
    ]);
    let run = |lib_dirs: &str| {
        let out = dir.path().join(format!("out-{}", lib_dirs.len()));
        let run = Command::new(root.join("scripts/gpu-check.sh"))
            .env("OUT", &out)
            .env("FERRY_GPU_CHECK_BIN", &bin)
            .env("FERRY_GPU_CHECK_LIB_DIRS", lib_dirs)
            .output()
            .expect("the script runs");
        let log = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
        let report = std::fs::read_to_string(out.join("gpu-check.json")).unwrap_or_default();
        (run.status.success(), log, report)
    };
    let (ok, log, report) = run("");
    assert!(!ok, "the library is nowhere the script looks:\n{log}");
    assert!(report.contains("\"pass\": false"), "{report}");
    let (ok, log, report) = run(&format!("/nonexistent:{}", libs.display()));
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("libferrystandin.so.7 found in {}", libs.display())),
        "{log}"
    );
    assert_eq!(report, "{\"pass\": true}");
}
