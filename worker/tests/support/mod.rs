//! What the worker's tests share that needs the worker's own types: the test model, loaded in
//! process. Everything else (brokers, worker processes, services, waits, requests) comes from
//! `ferry-testkit`.

use std::sync::{Arc, OnceLock};

use ferry_testkit::model::model_path;
use ferry_worker::model::{Kernels, LoadOptions, Model, ModelSource, WeightFormat};

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
pub fn shared() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(load(WeightFormat::Q8_0))).clone()
}
