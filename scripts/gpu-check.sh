#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU (see scripts/gpu-check-prepare.sh, run first on
# a machine with Rust): runs `ferry-gpu-check` on the GPU and writes one JSON report to
# $OUT/gpu-check.json (or ./gpu-check.json): logits against the CPU's, a generation interrupted
# and resumed from a snapshot (byte-identical), prefill and decode tokens/s with 1 and 8
# sequences, snapshot overhead. Also writes what the machine is (nvidia-smi) and which of the
# binary's libraries are missing there. Finishes within 8 minutes or reports that it did not.
#
#   FERRY_GPU_CHECK_DEVICE  cuda:0 by default; `cpu` runs the same check on the CPU (a dry run)
#   FERRY_GPU_CHECK_BIN     the binary (default: gpu-check/ferry-gpu-check, unpacked from .gz)
#   FERRY_GPU_CHECK_MODEL   the model (default: gpu-check/small.gguf)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
mkdir -p "$out"
dir=gpu-check
device="${FERRY_GPU_CHECK_DEVICE:-cuda:0}"
bin="${FERRY_GPU_CHECK_BIN:-}"
if [[ -z "$bin" ]]; then
    bin="$(mktemp -d)/ferry-gpu-check"
    gunzip -c "$dir/ferry-gpu-check.gz" >"$bin" && chmod +x "$bin"
fi
export LD_LIBRARY_PATH="$PWD/$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    echo "# nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 || true
    echo "# libraries the binary cannot find here"
    ldd "$bin" 2>&1 | grep "not found" || echo "none"
} >"$out/gpu-machine.txt"
cat "$out/gpu-machine.txt"
timeout 480 "$bin" --model "${FERRY_GPU_CHECK_MODEL:-$dir/small.gguf}" --device "$device" --out "$out/gpu-check.json"
status=$?
if [[ $status -ne 0 && ! -s "$out/gpu-check.json" ]]; then
    printf '{"pass": false, "exit_status": %d, "device": "%s"}\n' "$status" "$device" >"$out/gpu-check.json"
fi
echo "gpu-check: exit $status, report in $out/gpu-check.json"
exit $status
