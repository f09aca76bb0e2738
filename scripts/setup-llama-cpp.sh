#!/usr/bin/env bash
# Makes llama.cpp available to the throughput benchmark, as the PyPI package llama-cpp-python,
# pinned, and prints the Python interpreter that imports it (the last line of stdout).
#
# Idempotent: the venv this script made is used as it is once it imports the pinned version.
# Otherwise the package is compiled from source into a venv under ~/.cache, so every later run,
# clone and CI job on the machine reuses it; the wheel is kept beside it, so a rebuilt venv does
# not compile again. The compile takes five to ten minutes on two cores.
#
# The build names its instruction sets rather than tuning itself to the build machine
# (GGML_NATIVE): a native build crashed on the machine these figures come from (it enables AMX).
# AVX2/FMA/F16C always; AVX-512 with VNNI, VBMI and BF16 when this CPU has them, so llama.cpp gets
# the same wide kernels that candle picks for Ferry at run time. On the 2-core machine of the
# README's figures the AVX-512 build decoded at the AVX2 build's speed (52.4 against 52.5 tokens/s,
# one thread) and prefilled 10% faster. No AMX, and no OpenMP, whose spinning threads distort
# timings when anything else shares the cores.
set -euo pipefail

VERSION=0.3.36
ROOT=${FERRY_LLAMA_CPP_HOME:-$HOME/.cache/ferry-llama-cpp}
VENV=$ROOT/venv
WHEELS=$ROOT/wheels
LOG=$ROOT/build.log
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF"
if grep -qw avx512f /proc/cpuinfo && grep -qw avx512_vnni /proc/cpuinfo; then
  CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
  grep -qw avx512_vbmi /proc/cpuinfo && CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512_VBMI=ON"
  grep -qw avx512_bf16 /proc/cpuinfo && CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512_BF16=ON"
else
  CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512=OFF"
fi
export CMAKE_ARGS

has_pinned() {
  "$1" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" >/dev/null 2>&1
}

# Only this script's own venv counts: a copy installed elsewhere may be built for other
# instruction sets, which would change what the comparison measures.
if has_pinned "$VENV/bin/python"; then
  echo "llama-cpp-python $VERSION: present in $VENV" >&2
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$ROOT"
# Two benchmark runs starting at once must not both compile into the same venv.
exec 9>"$ROOT/.lock"
flock 9
if has_pinned "$VENV/bin/python"; then
  echo "$VENV/bin/python"
  exit 0
fi

if ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "llama-cpp-python $VERSION: installing the kept wheel into $VENV (log: $LOG)" >&2
else
  echo "llama-cpp-python $VERSION: compiling into $VENV (about ten minutes; log: $LOG)" >&2
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! {
  "${pip[@]}" install --quiet --upgrade pip wheel &&
    { ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1 ||
      "${pip[@]}" wheel --no-cache-dir --no-deps --wheel-dir "$WHEELS" "llama-cpp-python==$VERSION"; } &&
    "${pip[@]}" install --find-links "$WHEELS" "llama-cpp-python==$VERSION"
} >"$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  echo "llama-cpp-python $VERSION: install failed (full log: $LOG)" >&2
  rm -rf "$VENV"
  exit 1
fi
if ! has_pinned "$VENV/bin/python"; then
  echo "llama-cpp-python $VERSION: installed but does not import (log: $LOG)" >&2
  exit 1
fi
echo "llama-cpp-python $VERSION: installed" >&2
echo "$VENV/bin/python"
