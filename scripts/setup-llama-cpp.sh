#!/usr/bin/env bash
# Makes llama.cpp available to the throughput benchmark, as the PyPI package llama-cpp-python,
# pinned, and prints the Python interpreter that imports it (the last line of stdout).
#
# Idempotent: an interpreter that already imports the pinned version (the venv this script
# made, or python3 itself) is used as it is. Otherwise the package is compiled from source into
# a venv under ~/.cache, so every later run, clone and CI job on the machine reuses it; the wheel
# is kept beside it, so a rebuilt venv does not compile again. The compile takes about ten
# minutes on two cores.
#
# The build is pinned to AVX2/FMA/F16C with no AVX-512, AMX or OpenMP rather than tuned to the
# build machine (GGML_NATIVE): the native build crashed on the machine these figures come from,
# and a fixed instruction set keeps the comparison the same wherever the wheel is reused.
# Ferry's own kernels (candle's) use AVX2/FMA too.
set -euo pipefail

VERSION=0.3.36
ROOT=${FERRY_LLAMA_CPP_HOME:-$HOME/.cache/ferry-llama-cpp}
VENV=$ROOT/venv
WHEELS=$ROOT/wheels
LOG=$ROOT/build.log
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF"

has_pinned() {
  "$1" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" >/dev/null 2>&1
}

for py in "$VENV/bin/python" "$(command -v python3 || true)"; do
  if [ -n "$py" ] && [ -x "$py" ] && has_pinned "$py"; then
    echo "llama-cpp-python $VERSION: present for $py" >&2
    echo "$py"
    exit 0
  fi
done

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
      "${pip[@]}" wheel --no-deps --wheel-dir "$WHEELS" "llama-cpp-python==$VERSION"; } &&
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
