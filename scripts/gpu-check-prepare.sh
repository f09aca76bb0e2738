#!/usr/bin/env bash
# Prepares the GPU check on this machine (no GPU needed) for a machine with an NVIDIA GPU that
# has no Rust and no network: builds `ferry-gpu-check` with `--features cuda` (make check-cuda's
# toolchain), and puts into `gpu-check/` (git-ignored; carry it) the stripped, gzipped binary,
# the CUDA runtime it was linked with, and a small model: the first 2 blocks of the real GGUF
# (same tokenizer, embeddings and shapes; 36 MB), so that all of it stays under 64 MiB.
# Then run `scripts/gpu-check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-check
model="${FERRY_GPU_CHECK_SOURCE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -f "$model" ]] || make model
toolkit="$(./scripts/cuda-toolchain.sh)"
target="${CUDA_TARGET_DIR:-$HOME/.cache/ferry-target-cuda}"
CUDA_HOME="$toolkit" PATH="$toolkit/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CARGO_TARGET_DIR="$target" \
    cargo build --release -p ferry-worker --features cuda --bin ferry-gpu-check
rm -rf "$out"
mkdir -p "$out/lib"
strip -o "$out/ferry-gpu-check" "$target/release/ferry-gpu-check"
gzip -9 "$out/ferry-gpu-check"
cp -L "$toolkit/lib/libcudart.so."* "$out/lib/"
python3 -m pip install --quiet --disable-pip-version-check gguf==0.19.0
python3 scripts/gguf-first-layers.py "$model" "$out/small.gguf" 2
du -sh "$out"
