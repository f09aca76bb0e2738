#!/usr/bin/env bash
# `make demo`: a broker and a worker as separate processes, a handful of requests through Kafka,
# each printed with its answer and timings; one malformed message to show the dead-letter path.
# Stops every process it started, whatever happens.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}/release"
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
DIR=target/demo
THREADS="${FERRY_DEMO_THREADS:-$(nproc)}"
rm -rf "$DIR" && mkdir -p "$DIR"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

"$BIN/ferry" broker --partitions 3 --bootstrap-file "$DIR/bootstrap" >"$DIR/broker.log" 2>&1 &
pids+=($!)
"$BIN/ferry-worker" --bootstrap-file "$DIR/bootstrap" --model "$MODEL" \
  --worker-id demo-worker-1 --threads "$THREADS" >"$DIR/worker.log" 2>&1 &
pids+=($!)
echo "broker and worker started (logs in $DIR/)"

prompts=(
  "What is the capital of France?"
  "Write a haiku about autumn."
  "Give me three tips for writing clean code."
  "Explain what Kafka consumer groups are in two sentences."
  "What is 12 plus 30?"
)
i=0
for p in "${prompts[@]}"; do
  i=$((i + 1))
  "$BIN/ferry" request --bootstrap-file "$DIR/bootstrap" --id "demo-$i" \
    --message "user:$p" --max-tokens 64 --timeout 180s --output json >"$DIR/reply-$i.json"
done

# A message that is not JSON: the worker dead-letters it and keeps serving.
echo 'this is not a request' | "$BIN/ferry" publish --raw --bootstrap-file "$DIR/bootstrap" >/dev/null

python3 - "$DIR" "${prompts[@]}" <<'PY'
import json, sys
d, prompts = sys.argv[1], sys.argv[2:]
for i, p in enumerate(prompts, 1):
    r = json.load(open(f"{d}/reply-{i}.json"))
    t, u = r["timings"], r["usage"]
    print(f"\n[{r['id']}] {p}")
    print("  " + r["text"].strip().replace("\n", "\n  "))
    tps = u["completion_tokens"] / (t["decode_ms"] / 1000) if t["decode_ms"] else 0
    print(f"  -- {r['worker']}, {u['prompt_tokens']}+{u['completion_tokens']} tokens, "
          f"finish={r['finish_reason']}, queued {t['queued_ms']:.0f} ms, prefill {t['prefill_ms']:.0f} ms, "
          f"decode {t['decode_ms']:.0f} ms ({tps:.1f} tok/s), total {t['total_ms']:.0f} ms")
PY

# Wait (bounded) for the dead letter to be logged.
for _ in $(seq 1 100); do
  grep -q "dead-lettering" "$DIR/worker.log" && break
  sleep 0.1
done
echo
echo "malformed message: $(grep "dead-lettering" "$DIR/worker.log" | head -1 || echo "not dead-lettered yet")"
echo "demo done"
