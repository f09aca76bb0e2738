//! The model file the tests and benches run.

use std::path::PathBuf;

/// The GGUF the tests run: `$FERRY_TEST_MODEL`, or the file `make model` fetches.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("FERRY_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "test model {} is missing: run `make model` (or set FERRY_TEST_MODEL)",
        path.display()
    );
    path
}
