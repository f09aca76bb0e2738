#!/usr/bin/env python3
"""llama.cpp's single-sequence speed on a GGUF file, for comparison with Ferry's engine.

Reads a JSON object on stdin, {"prompt": [token ids], "decode_tokens": N, "repeats": R}, so
that both engines run exactly the same tokens (Ferry's tokenizer made them), and prints one JSON
object with prefill and decode tokens/s (medians over the repeats).

Each repeat starts from an empty cache, evaluates the prompt in one batch (prefill), takes the
argmax of its logits, then evaluates N single tokens, each the argmax of the previous logits
(greedy decode). End of sequence is ignored, so every repeat does the same work. Decode tokens/s
is N over the time of those N evaluations, argmax included: the same definition the Rust side
uses for Ferry (N forward passes of one token, sampling included).

    python3 scripts/llama_cpp_bench.py --model models/x.gguf --threads 1 < request.json

Limits: logits are read through llama-cpp-python's ctypes binding and argmax is numpy's; both
cost microseconds against milliseconds of forward pass.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def run_once(llm, prompt, decode_tokens):
    """Returns (prefill seconds, decode seconds, generated token ids)."""
    n_vocab = llm.n_vocab()
    llm.reset()

    def argmax():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    t = time.perf_counter()
    llm.eval(prompt)
    token = argmax()
    prefill = time.perf_counter() - t
    generated = [token]
    t = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([token])
        token = argmax()
        generated.append(token)
    decode = time.perf_counter() - t
    return prefill, decode, generated


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    req = json.load(sys.stdin)
    prompt, n, repeats = req["prompt"], int(req["decode_tokens"]), int(req.get("repeats", 3))
    if len(prompt) + n + 1 > args.n_ctx:
        sys.exit(f"prompt of {len(prompt)} plus {n} tokens does not fit n_ctx {args.n_ctx}")

    t = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.n_ctx,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    prefill, decode, generated = [], [], []
    for _ in range(repeats):
        p, d, generated = run_once(llm, prompt, n)
        prefill.append(len(prompt) / p)
        decode.append(n / d)
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": llama_cpp.__version__,
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
                "threads": args.threads,
                "n_ctx": args.n_ctx,
                "prompt_tokens": len(prompt),
                "decode_tokens": n,
                "repeats": repeats,
                "load_s": load_s,
                "prefill_tokens_per_s": statistics.median(prefill),
                "decode_tokens_per_s": statistics.median(decode),
                "decode_tokens_per_s_runs": decode,
                "generated": generated,
            }
        )
    )


if __name__ == "__main__":
    main()
