#!/usr/bin/env python3
"""`make demo`: Ferry's promise, shown on the embedded broker (or, with `make demo BROKER=kafka`,
on a real single-node Apache Kafka started by `ferry broker --kafka`).

A broker and three workers as separate processes, snapshots to a shared directory. Requests go
through Kafka. While they generate, one worker is evicted (SIGTERM) and another killed (SIGKILL)
mid-generation; replacements start, as a Deployment would bring them back. Every answer is then
compared with the uninterrupted reference computed in-process by `ferry-generate`. Stops every
process it started; exits non-zero if any answer is missing or differs.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/ferry-target")) / "release"
MODEL = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DIR = ROOT / "target/demo"
SNAPSHOTS = DIR / "snapshots"

REQUESTS = [
    {"id": "demo-1", "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}], "max_tokens": 160},
    {"id": "demo-2", "messages": [{"role": "user", "content": "Explain how a bicycle stays upright while moving."}], "max_tokens": 160, "temperature": 0.8, "top_p": 0.95, "seed": 7},
    {"id": "demo-3", "messages": [{"role": "user", "content": "Give me five tips for learning to cook."}], "max_tokens": 160},
    {"id": "demo-4", "messages": [{"role": "user", "content": "Describe a walk through a forest in autumn."}], "max_tokens": 160, "temperature": 0.7, "seed": 42},
    {"id": "demo-5", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 48},
    {"id": "demo-6", "prompt": "Once upon a time, in a small village by the sea,", "max_tokens": 120, "temperature": 0.9, "top_k": 40, "seed": 3},
]

# `mock` (librdkafka's mock cluster, nothing to install) or `kafka` (`ferry broker --kafka`).
BROKER = os.environ.get("FERRY_DEMO_BROKER", "mock")

procs = []


def start(name, *args):
    log = open(DIR / f"{name}.log", "w")
    p = subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs.append(p)
    return p


def stop_all():
    # The broker last, and by SIGTERM, so that a real Kafka shuts down cleanly and removes its
    # storage; everything else is killed outright.
    for p in procs[1:]:
        if p.poll() is None:
            p.kill()
    for p in procs[1:]:
        p.wait()
    if procs and procs[0].poll() is None:
        procs[0].send_signal(signal.SIGTERM)
        try:
            procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    for p in procs:
        p.wait()


def wait_for(what, f, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = f()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def manifests():
    """(worker, tokens) of every snapshot manifest in the shared store."""
    out = []
    for m in SNAPSHOTS.glob("ferry/*/manifest"):
        try:
            lines = m.read_bytes().split(b"\n")
            doc = json.loads(lines[1])
            out.append((doc["worker"], len(doc["tokens"])))
        except (OSError, IndexError, ValueError):
            pass  # being replaced right now
    return out


def main():
    shutil.rmtree(DIR, ignore_errors=True)
    SNAPSHOTS.mkdir(parents=True)
    bootstrap = DIR / "bootstrap"
    if BROKER not in ("mock", "kafka"):
        raise SystemExit(f"demo: BROKER must be mock or kafka, not {BROKER!r}")
    start("broker", BIN / "ferry", "broker", "--partitions", "3", "--bootstrap-file", bootstrap,
          *(["--kafka"] if BROKER == "kafka" else []))
    if BROKER == "kafka":
        # Workers and callers wait 30 s for the bootstrap file; a real Kafka may need longer,
        # minutes on the first run, which fetches its jars.
        print("starting Apache Kafka (the first run fetches its jars with Maven)")
        wait_for("Kafka to start", bootstrap.exists, timeout=900)
    workers = {}

    def worker(name):
        workers[name] = start(
            name, BIN / "ferry-worker", "--bootstrap-file", bootstrap, "--model", MODEL, "--worker-id", name,
            "--threads", "1", "--snapshot-store", f"file://{SNAPSHOTS}", "--snapshot-every-tokens", "16",
            "--session-timeout", "6s",
        )

    for n in ("worker-1", "worker-2", "worker-3"):
        worker(n)
    print(f"broker and 3 workers started (logs in {DIR.relative_to(ROOT)}/)")

    waiting = {}
    for r in REQUESTS:
        r = dict(r, reply_to="ferry.replies")
        out = open(DIR / f"{r['id']}.json", "w")
        waiting[r["id"]] = subprocess.Popen(
            [str(BIN / "ferry"), "request", "--bootstrap-file", str(bootstrap), "--json", json.dumps(r),
             "--timeout", "400s", "--output", "json"],
            stdout=out, stderr=subprocess.DEVNULL)
        procs.append(waiting[r["id"]])

    # Evict a worker mid-generation: the first one with a snapshot of at least 32 tokens.
    victim, tokens = wait_for("a generation to pass 32 tokens", lambda: next(((w, t) for w, t in manifests() if t >= 32 and w in workers), None))
    print(f"evicting {victim} (SIGTERM) with a generation at {tokens}+ tokens")
    t = time.time()
    workers[victim].send_signal(signal.SIGTERM)
    code = workers.pop(victim).wait(timeout=30)
    print(f"  {victim} drained and exited with status {code} in {time.time() - t:.2f} s")
    worker("worker-4")

    # Kill another mid-generation, as a node failure would.
    victim, tokens = wait_for("another generation to pass 32 tokens", lambda: next(((w, t) for w, t in manifests() if t >= 32 and w in workers and w != "worker-4"), None))
    print(f"killing {victim} (SIGKILL) with a generation at {tokens}+ tokens")
    workers.pop(victim).send_signal(signal.SIGKILL)
    worker("worker-5")

    for rid, p in waiting.items():
        p.wait(timeout=400)
    print("all requests answered; computing the uninterrupted references in-process ...")
    ref = subprocess.run(
        [str(BIN / "ferry-generate"), "--model", str(MODEL), "--threads", "1"],
        input="\n".join(json.dumps(r) for r in REQUESTS), capture_output=True, text=True, check=True)
    refs = {row["id"]: row for row in map(json.loads, ref.stdout.splitlines())}

    print()
    print(f"{'request':<8} {'answered by':<10} {'attempt':>7} {'resumed from':>12} {'tokens':>6}  {'= reference':<11} answer")
    ok = True
    for r in REQUESTS:
        try:
            reply = json.load(open(DIR / f"{r['id']}.json"))
        except ValueError:
            print(f"{r['id']:<8} NO ANSWER")
            ok = False
            continue
        same = reply.get("text") == refs[r["id"]]["text"]
        ok &= same
        resumed = reply.get("resumed_from_token")
        text = reply.get("text", "").strip().replace("\n", " ")
        print(f"{r['id']:<8} {reply.get('worker', '?'):<10} {reply.get('attempt', '?'):>7} "
              f"{'token ' + str(resumed) if resumed is not None else '-':>12} {reply['usage']['completion_tokens']:>6}  "
              f"{'yes' if same else 'NO':<11} {text[:60]}{'...' if len(text) > 60 else ''}")
    print()
    print("every answer equals its uninterrupted reference" if ok else "SOME ANSWERS DIFFER FROM THE REFERENCE")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
