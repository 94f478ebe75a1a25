"""bench.py: one table of measured rates and speed-ups, each measured side by side in the same run.

    python bench.py                 # ~2-3 min on 2 CPU cores; prints a Markdown table for the README
    python bench.py --quick         # fewer repetitions, smaller sizes (used by the test suite)

Rows (medians of several repetitions; ratios compare two paths on the same inputs, timed interleaved):
  * Hedge (Eq. 4.1) on a 200-action game: many runs as one batched array computation vs one run at a time.
  * PairRM: all K(K-1) ordered pairs of many prompts packed in length-sorted batches vs one forward per pair
    (bench_pairrm.bench_pairrm).
  * SPPO training (Eq. 4.7) on one process: tokens/s of sppo.train_policy on a tiny Llama.
  * FSDP2 with 2 gloo ranks vs one process on the same data and batch order (bench_fsdp, launching train_7b.py under torchrun).
  * MFU of train_7b's step when CUDA is present (not measurable on a CPU machine: the row says so).
Timings on a shared machine are noisy: the load average is printed with the table.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bench_pairrm
import hedge_toy
import pairrm
import sppo
import train_7b


def timed(fn, repeats):
    """Median wall time of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_hedge(n=200, runs=64, T=500, repeats=5):
    """Hedge steps/s: `runs` independent runs (different eta) batched as one (R, n) array vs a Python loop of runs."""
    P = np.stack([hedge_toy.random_game(n, seed=s) for s in range(runs)])                 # (R, n, n)
    eta = np.linspace(0.01, 0.5, runs)
    batched = timed(lambda: hedge_toy.hedge_batch(P, eta, T), repeats)
    looped = timed(lambda: [hedge_toy.hedge(P[r], eta[r], T) for r in range(runs)], repeats)
    a = hedge_toy.hedge_batch(P, eta, T)[0]
    b = np.stack([hedge_toy.hedge(P[r], eta[r], T)[0] for r in range(runs)])
    steps = runs * T
    return {"setting": f"n={n}, {runs} runs x T={T}", "fast": steps / batched, "slow": steps / looped,
            "unit": "run-steps/s", "ratio": looped / batched, "max_abs_diff": float(np.abs(a - b).max())}


def bench_train(rows=256, hidden=64, layers=2, repeats=3):
    """Tokens/s of sppo.train_policy (Eq. 4.7) on one process, tiny Llama, random win rates."""
    with tempfile.TemporaryDirectory() as tmp:
        d = sppo.build_tiny_policy(f"{tmp}/m", hidden=hidden, layers=layers)
        cfg = sppo.SPPOConfig(global_batch=64, micro_batch=16, epochs=1, lr=1e-4, progress=False)
        model, tok = sppo.load_policy(d, cfg, "cpu")
        data = [dict(r, ref_logp=-5.0) for r in train_7b.synthetic_dataset(rows, seed=0)]
        rates = []
        for _ in range(repeats):
            rates += [h["tokens_per_s"] for h in sppo.train_policy(model, tok, data, cfg, "cpu")]
    return {"setting": f"tiny Llama hidden {hidden} x {layers}, batch 64 (micro 16)",
            "fast": statistics.median(rates), "unit": "tokens/s"}


def bench_pairrm_row(prompts=32, k=5, repeats=5):
    with tempfile.TemporaryDirectory() as tmp:
        path = pairrm.save_tiny_random_checkpoint(tmp, seed=0, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=128)
        model = pairrm.PairRM.from_pretrained(path)
    p, c = bench_pairrm.make_inputs(prompts, k, seed=0)
    r = bench_pairrm.bench_pairrm(model, p, c, repeats=repeats)
    return {"setting": f"{prompts} prompts x K={k} ({r['pairs']} pairs), random DeBERTa-v2 hidden 32",
            "fast": r["batched_pairs_per_s"], "slow": r["per_pair_pairs_per_s"], "unit": "pairs/s",
            "ratio": r["speedup"], "max_abs_diff": r["max_abs_diff"]}


def bench_fsdp(world=2, rows=64, hidden=32, layers=2, arch="llama", global_batch=16, micro_batch=4, epochs=4,
               activation_checkpointing=False, workdir=None):
    """Tokens/s of train_7b.py under `world` gloo ranks (torchrun) against sppo.train_policy in this process, on the
    same tiny model, data and batch order. Medians over steps, the first 3 (warm-up) excluded. Activation
    checkpointing is off by default, as in sppo.py, so the ratio is the cost of sharding alone. Returns a dict."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench_fsdp_"))
    model_dir = sppo.build_tiny_policy(work / "model", arch=arch, hidden=hidden, layers=layers)
    data = work / "data.jsonl"
    sppo.write_jsonl(data, train_7b.synthetic_dataset(rows, seed=1))
    flags = dict(global_batch=global_batch, micro_batch=micro_batch, epochs=epochs, max_length=48,
                 max_prompt_length=16, lr=1e-4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(train_7b.__file__).resolve()), "--model", model_dir, "--data", str(data), "--out", str(work / "fsdp"),
           *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))], "--no-progress",
           "--activation-checkpointing" if activation_checkpointing else "--no-activation-checkpointing"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    fsdp = [m["tokens_per_s"] for m in sppo.read_jsonl(work / "fsdp" / "metrics.jsonl")][3:]
    cfg = sppo.SPPOConfig(**flags, progress=False)
    model, tok = sppo.load_policy(model_dir, cfg, "cpu")
    ref_rows = [dict(r, ref_logp=lp) for r, lp in zip(sppo.read_jsonl(data), json.loads(
        (work / "data.ref_logp.json").read_text())["ref_logp"])]
    single = [h["tokens_per_s"] for h in sppo.train_policy(model, tok, ref_rows, cfg, "cpu")][3:]
    out = {"world": world, "model": f"tiny {arch} hidden {hidden} x {layers} layers", "rows": rows,
           "activation_checkpointing": activation_checkpointing,
           "steps": len(fsdp) + 3, "fsdp_tokens_per_s": statistics.median(fsdp),
           "single_process_tokens_per_s": statistics.median(single), "single_process_threads": torch.get_num_threads(),
           "fsdp_threads_per_rank": 1}
    out["ratio"] = out["fsdp_tokens_per_s"] / out["single_process_tokens_per_s"]
    return out


def bench_fsdp_row(rows=64):
    r = bench_fsdp(world=2, rows=rows)
    return {"setting": f"{r['model']}, {r['rows']} rows, {r['steps']} steps", "fast": r["fsdp_tokens_per_s"],
            "slow": r["single_process_tokens_per_s"], "unit": "tokens/s", "ratio": r["ratio"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    args = p.parse_args(argv)
    q = args.quick
    torch.set_num_threads(1)                                       # tiny models: one thread is fastest and stable
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    load = os.getloadavg()[0]
    rows = [("Hedge, batched sweep vs one run at a time", bench_hedge(runs=16 if q else 64, T=100 if q else 500,
                                                                      repeats=2 if q else 5)),
            ("PairRM, packed batches vs one forward per pair", bench_pairrm_row(prompts=4 if q else 32,
                                                                                repeats=1 if q else 5)),
            ("SPPO training (Eq. 4.7), one process", bench_train(rows=64 if q else 256, repeats=1 if q else 3)),
            ("train_7b FSDP2, 2 gloo ranks vs one process", bench_fsdp_row(rows=32 if q else 64))]
    if torch.cuda.is_available():
        rows.append(("train_7b MFU", {"setting": "see train_7b.py logs", "fast": float("nan"), "unit": "MFU"}))
    else:
        rows.append(("train_7b MFU", {"setting": "needs CUDA: not measurable on this machine", "fast": float("nan"),
                                      "unit": "-"}))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, 1 thread per process, load average {load:.1f} before the run\n")
    print("| what | setting | fast path | baseline | ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows:
        fast = "n/a" if r["fast"] != r["fast"] else f"{r['fast']:,.0f} {r['unit']}"
        slow = f"{r['slow']:,.0f} {r['unit']}" if "slow" in r else ""
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"| {name} | {r['setting']} | {fast} | {slow} | {ratio} | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
