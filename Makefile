# Ferry's commands. Each target does its own set-up on a fresh machine (Rust toolchain, Python
# with pip, gcc and make are all it assumes).

SHELL := /bin/bash
# The build cache lives outside the clone, so a fresh clone (and CI) reuses it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/ferry-target
# candle's thread pool spins; with more threads than free cores it slows down badly. Tests run
# several processes at once, so each gets one compute thread.
TEST_THREADS ?= 1
CARGO ?= cargo
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: all build model test check-cuda demo chaos bench lint clean

all: build

model: $(MODEL)

$(MODEL):
	./scripts/fetch-model.sh

build:
	$(CARGO) build --release --workspace --bins

# Every test: unit, schema, engine against candle's reference, and end to end through real
# Apache Kafka: each test binary starts one `ferry broker --kafka` (jars fetched once into
# ~/.cache/ferry-kafka, Java and Maven installed if missing) and shares it among its tests.
# FERRY_TEST_BROKER=mock runs them on the mock instead (no Java); FERRY_TEST_BOOTSTRAP_SERVERS
# runs them against a cluster of your own.
# Tests use the dev profile (dependencies fully optimised, see Cargo.toml). confluent-kafka is the
# client of the Python durable-caller example, which worker/tests/durable_caller.rs runs.
test: model
	python3 k8s/tests/run.py
	python3 -m pip install --quiet confluent-kafka==2.12.1 gguf==0.19.0
	$(CARGO) build --workspace --bins --features ferry-worker/fault-injection
	RAYON_NUM_THREADS=$(TEST_THREADS) FERRY_TEST_MODEL=$(CURDIR)/$(MODEL) \
		$(CARGO) test --workspace --features ferry-worker/fault-injection --no-fail-fast -- --test-threads=2
	$(MAKE) check-cuda

# The GPU worker, compiled on any machine, GPU or not: `ferry-worker --features cuda` (release),
# with CUDA's compiler and headers from NVIDIA's PyPI wheels and link stubs for the driver's
# libraries (scripts/cuda-toolchain.sh, cached in ~/.cache/ferry-cuda), candle's kernels built
# for CUDA_COMPUTE_CAP (90: H100 and H200). Its own build cache, so the CPU build is untouched.
CUDA_COMPUTE_CAP ?= 90
CUDA_TARGET_DIR ?= $(HOME)/.cache/ferry-target-cuda
check-cuda:
	toolkit="$$(./scripts/cuda-toolchain.sh)" && \
	CUDA_HOME="$$toolkit" PATH="$$toolkit/bin:$$PATH" CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) \
		CARGO_TARGET_DIR=$(CUDA_TARGET_DIR) $(CARGO) build --release -p ferry-worker --features cuda \
		--bin ferry-worker --bin ferry-gpu-check
	@echo "check-cuda: built ferry-worker and ferry-gpu-check in $(CUDA_TARGET_DIR)/release with --features cuda (compute capability $(CUDA_COMPUTE_CAP))"

# The main job on the embedded broker: a broker and three workers, requests through Kafka, one
# worker evicted and one killed mid-generation, every answer checked against the reference.
# `make demo BROKER=kafka` runs it on a real single-node Apache Kafka (`ferry broker --kafka`).
BROKER ?= mock
demo: model build
	FERRY_DEMO_BROKER=$(BROKER) ./scripts/demo.py

# The chaos harness: real Apache Kafka and three workers under streaming load (150 requests, 6 in
# flight), a fault every 8 s (evictions and crashes, a freeze, a node drain, the broker stopped
# and resumed, the broker SIGKILLed and restarted on its data), every answer checked against the
# uninterrupted reference. FERRY_CHAOS_BROKER=mock runs it on the mock (no broker crash there). Writes target/chaos/report.json and
# chart.svg (logs in target/chaos/logs); fails if any request is lost or answered wrongly.
# FERRY_CHAOS_* variables change the defaults (`ferry-loadtest chaos --help`);
# FERRY_CHAOS_DELIVERY=exactly-once runs the workers with transactions (duplicates then 0).
chaos: model build
	$(CARGO_TARGET_DIR)/release/ferry-loadtest chaos

# Engine speed, single sequence: prefill and decode tokens/s for the file's Q4_1 weights and for
# Q8_0 re-quantised at load (target/bench/engine.json). Snapshot costs: decode overhead, bytes per
# token, restore against re-prefill, recovery after SIGTERM and SIGKILL (target/bench/snapshot.json).
# Throughput: single-sequence decode and the prefill of 512 tokens against llama.cpp on the same file,
# prompt and threads; aggregate decode with 1, 4, 8 and 16 sequences in flight; the same with 2
# threads; peak RSS with 8 sequences of 1024 tokens (target/bench/throughput.json). Every report
# names the CPU, its features and the kernel path (FERRY_KERNELS=avx2 make bench forces one). Start-up: process start to /readyz 200 of the release worker with the
# model, median of several runs, and the model load's share of it (target/bench/startup.json).
# Recovery: signal to the survivor's first new token after SIGTERM and SIGKILL, on real Kafka and on
# the mock side by side, and fleet throughput through Kafka over in-process (target/bench/recovery.json).
# The throughput bench's llama.cpp is llama-cpp-python, compiled once into
# ~/.cache/ferry-llama-cpp by scripts/setup-llama-cpp.sh (about ten minutes); if that fails the
# throughput report says why and the other figures are still measured.
# One compute thread by default, the figure that stays stable when anything else shares the cores.
BENCH_THREADS ?= 1
bench: model
	$(CARGO) build --release -p ferry -p ferry-worker --bins
	python=$$(./scripts/setup-llama-cpp.sh) || python=; \
	RAYON_NUM_THREADS=$(BENCH_THREADS) FERRY_BENCH_OUT=$(CURDIR)/target/bench FERRY_TEST_MODEL=$(CURDIR)/$(MODEL) \
		FERRY_LLAMA_CPP_PYTHON=$$python $(CARGO) bench -p ferry-worker --bench engine --bench snapshot --bench throughput --bench startup --bench recovery

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	rm -rf target
