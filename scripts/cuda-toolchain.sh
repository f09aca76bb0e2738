#!/usr/bin/env bash
# A CUDA toolkit to build `ferry-worker --features cuda` with, on a machine without a GPU, an
# NVIDIA driver or a system CUDA: NVIDIA's own wheels from PyPI (nvcc, its NVVM and headers, the
# runtime and CCCL headers), installed once into a cache, plus link stubs for the libraries
# candle's cudarc links against (the driver, NVRTC, cuRAND, cuBLAS, cuBLASLt), as the CUDA
# toolkit's own `lib64/stubs` provides for the driver. The stubs only satisfy the linker: each
# names the real library's soname, so a binary built here loads the real libraries of the GPU
# machine it runs on.
#
# Prints the toolkit root (use it as CUDA_HOME, with its bin/ on the PATH). Idempotent: a
# complete cache is reused as it is.
#
#   FERRY_CUDA_CACHE    where the toolkits live (default ~/.cache/ferry-cuda)
#   FERRY_CUDA_VERSION  the CUDA release of the wheels (default 13.0; cudarc 0.19 supports up
#                       to 13.4, and the first release with nvcc on PyPI is 13.0)
set -euo pipefail

version="${FERRY_CUDA_VERSION:-13.0}"
major="${version%%.*}"
cache="${FERRY_CUDA_CACHE:-$HOME/.cache/ferry-cuda}"
root="$cache/$version"
toolkit="$root/py/nvidia/cu$major"
stamp="$root/complete"

if [[ -f "$stamp" ]]; then
    echo "$toolkit"
    exit 0
fi

rm -rf "$root"
mkdir -p "$root"
python3 -m pip install --quiet --disable-pip-version-check --target "$root/py" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-nvvm==$version.*" "nvidia-cuda-crt==$version.*" \
    "nvidia-cuda-runtime==$version.*" "nvidia-cuda-cccl==$version.*" >&2
[[ -x "$toolkit/bin/nvcc" ]] || { echo "no nvcc in $toolkit/bin after installing the wheels" >&2; exit 1; }

# The runtime's unversioned name, which candle-kernels links with `-lcudart`.
ln -sf libcudart.so."$major" "$toolkit/lib/libcudart.so"

# Link stubs: every function cudarc declares for a library, defined to do nothing, in a shared
# object that carries the real library's soname. cudarc's sources are where cargo unpacked them.
cudarc="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' | sort -V | tail -1)"
if [[ -z "$cudarc" ]]; then
    # Not fetched yet: fetching the workspace's dependencies unpacks it.
    cargo fetch --quiet >&2
    cudarc="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' | sort -V | tail -1)"
fi
[[ -n "$cudarc" ]] || { echo "cannot find cudarc 0.19's sources under ~/.cargo/registry" >&2; exit 1; }
stubs="$toolkit/lib/stubs"
mkdir -p "$stubs"
stub() { # stub <library> <soname> <cudarc module>
    local c="$root/$1.c"
    grep -ohE '^pub unsafe fn [A-Za-z_][A-Za-z0-9_]*\(' "$cudarc/src/$3/sys/"*.rs |
        sed -E 's/^pub unsafe fn ([A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u >"$c"
    [[ -s "$c" ]] || { echo "no functions found for $1 in $cudarc/src/$3" >&2; exit 1; }
    gcc -shared -fPIC -Wl,-soname,"$2" -o "$stubs/lib$1.so" "$c"
}
stub cuda libcuda.so.1 driver
stub nvrtc "libnvrtc.so.$major" nvrtc
stub curand libcurand.so.10 curand
stub cublas "libcublas.so.$major" cublas
stub cublasLt "libcublasLt.so.$major" cublaslt

touch "$stamp"
echo "$toolkit"
