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
# Where CUDA's libraries usually lie: FERRY_GPU_CHECK_LIB_DIRS (colon-separated) first, then a
# toolkit under /usr/local, conda, and NVIDIA's wheels in Python's site-packages.
lib_dirs() {
    local d
    local extra="${FERRY_GPU_CHECK_LIB_DIRS:-}"
    for d in ${extra//:/ } /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib \
        /opt/conda/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
        [[ -d "$d" ]] && echo "$d"
    done
    python3 -c 'import glob, site
for p in site.getsitepackages() + [site.getusersitepackages()]:
    print("\n".join(glob.glob(p + "/nvidia/*/lib")))' 2>/dev/null
}
# Each library the loader cannot find (cuBLAS and cuRAND are not carried): its folder, if found.
for lib in $(ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}'); do
    for d in $(lib_dirs); do
        if [[ -e "$d/$lib" ]]; then
            export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
            echo "gpu-check: $lib found in $d"
            break
        fi
    done
done
{
    echo "# nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 || true
    echo "# the newest CUDA the driver runs (the binary's kernels are PTX from CUDA 13.0: 13.0 or later needed)"
    nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" || echo "unknown"
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
