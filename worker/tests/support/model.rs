//! Finding and loading the test model.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ferry_worker::model::{Kernels, LoadOptions, Model, ModelSource, WeightFormat};

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

/// The model with `weights`, on the kernels `FERRY_KERNELS` names (as the workers the tests start
/// read it), so that `FERRY_KERNELS=avx2 make test` runs every test on one path.
pub fn load(weights: WeightFormat) -> Model {
    let opts = LoadOptions {
        kernels: Kernels::from_env().expect("FERRY_KERNELS names kernels"),
        ..LoadOptions::new(ModelSource::Path(model_path()), weights)
    };
    Model::load(&opts, &candle_core::Device::Cpu).expect("test model loads")
}

/// The model as the worker loads it by default, loaded once per test binary.
#[allow(dead_code)]
pub fn shared() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(load(WeightFormat::Q8_0))).clone()
}
