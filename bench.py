"""bench.py: every benchmark of the repository, one table, one timing rule.

    python bench.py                          # ~3 min on 2 CPU cores; prints a Markdown table for the README
    python bench.py --quick                  # small sizes, few repetitions (the test suite runs this)
    python bench.py --only pairrm --pairrm DIR --device cuda --prompts 8     # PairRM alone, real weights

The timing rule, for every row: each path is warmed up once, then the paths being compared are run in turn,
interleaved, `repeats` times (other load on the machine hits both alike); the table shows the median and, in
brackets, the min-max of those repetitions. Ratios are ratios of medians on identical inputs, and every
comparison row also reports the largest difference between the two paths' outputs.

Rows:
  * Hedge (Eq. 4.1) on a 200-action game: many runs as one batched array computation vs one run at a time.
  * PairRM: all K(K-1) ordered pairs of many prompts packed in length-sorted batches vs one forward per pair.
  * SPPO training (Eq. 4.7) on one process: tokens/s of sppo.train_policy on a tiny Llama.
  * FSDP2 with 2 gloo ranks (train_7b.py under torchrun) vs one process on the same data and batch order; here the
    repetitions are the optimizer steps (after 3 warm-up steps) of one run of each.
  * train_7b.py at a real model's shape (`--only model --size 1b`: TinyLlama-1.1B's config, random weights) under
    torchrun on every local GPU (2 gloo ranks on CPU): tokens/s, MFU (CUDA), peak memory against memory_plan, the
    bf16-unchanged fraction; then the --deterministic resume check (stopped + resumed == uninterrupted, bit for bit).
  * --only real (not part of `all`; needs requirements-real.txt): SmolLM2-135M-Instruct from its GGUF, the real
    model of README "A real model on a laptop CPU": generation tokens/s, committee ranking pairs/s, training tokens/s
    on one process and on 2 gloo ranks, and the peak RSS of each.

  * --only mix (not part of `all`): this machine's fp32 matmul limit at the shapes of hidden 256 x 4 and 512 x 8
    Llamas, and sppo.train_policy on the realistic length mix (length_mix): plain, length-grouped and packed
    micro-batches, real tokens/s and the fraction of the limit.

    python bench.py --only model --size 1b        # on a GPU node (the README's GPU numbers come from this)
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers.hf_argparser import HfArg

import committee
import costs
import hedge_toy
import pairrm
import real_run
import policy
import runs
import sppo
import sppo_toy
import train_7b


@dataclass
class BenchConfig:
    quick: bool = HfArg(default=False, help="Small sizes and few repetitions (a smoke run, as in the test suite).")
    only: Literal["all", "hedge", "pairrm", "train", "fsdp", "model", "real", "mix"] = HfArg(
        default="all", help="Run one row only ('model': the GPU row; 'real': the SmolLM2 rows; 'mix': training on "
        "the realistic length mix against the matmul limit, ~25 min; none of the three is in all).")
    size: Literal["tiny", "1b"] = HfArg(default="tiny", help="Model row: 'tiny' (hidden 64) or '1b' (TinyLlama-1.1B's "
                                        "shape, random weights).")
    repeats: int = HfArg(default=5, help="Interleaved timed repetitions of each path (--quick: 1-2).")
    prompts: int = HfArg(default=32, help="PairRM row: prompts N.")
    k: int = HfArg(default=5, help="PairRM row: candidates per prompt (SPPO Sec. 5: K = 5), K(K-1) pairs each.")
    pairrm: str | None = HfArg(default=None, help="PairRM row: a local PairRM checkpoint; default: a small random one.")
    device: str = HfArg(default="cpu", help="PairRM row: cpu or cuda (fp32 on CPU, fp16 on GPU).")


# ----------------------------------------------------------------------------------------------------------------
# The one timing rule.
def interleaved(paths: dict, repeats: int) -> dict:
    """{name: fn}: warm up each fn once, then call them in turn `repeats` times. Returns {name: seconds list}."""
    for fn in paths.values():
        fn()
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def rate(work, seconds) -> dict:
    """work per second: median and min-max over the repetitions' times (or over given per-step rates)."""
    r = [work / s for s in seconds] if work is not None else list(seconds)
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


# ----------------------------------------------------------------------------------------------------------------
# Rows.
def bench_hedge(n=200, runs=64, T=500, repeats=5):
    """Hedge steps/s: `runs` independent runs (different eta) batched as one (R, n) array vs a Python loop of runs."""
    P = np.stack([hedge_toy.random_game(n, seed=s) for s in range(runs)])                 # (R, n, n)
    eta = np.linspace(0.01, 0.5, runs)
    t = interleaved({"batched": lambda: hedge_toy.hedge_batch(P, eta, T),
                     "looped": lambda: [hedge_toy.hedge(P[r], eta[r], T) for r in range(runs)]}, repeats)
    a = hedge_toy.hedge_batch(P, eta, T)[0]
    b = np.stack([hedge_toy.hedge(P[r], eta[r], T)[0] for r in range(runs)])
    return {"setting": f"n={n}, {runs} runs x T={T}", "fast": rate(runs * T, t["batched"]),
            "slow": rate(runs * T, t["looped"]), "unit": "run-steps/s", "max_abs_diff": float(np.abs(a - b).max())}


WORDS = sorted(set(re.findall(r"\w+", pairrm._TINY_TEXT)))
"""Words of PairRM's tiny tokenizer text: about one token per word, as with a real tokenizer on English."""


def pairrm_inputs(n, k, seed=0, prompt_words=40, response_words=80):
    """n prompts of 8..prompt_words words and k responses of 3..response_words words each (random words), so lengths
    vary as sampled responses do. Returns (prompts, candidates)."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."  # noqa: E731
    return [text(8, prompt_words) + "?" for _ in range(n)], [[text(3, response_words) for _ in range(k)]
                                                             for _ in range(n)]


def bench_pairrm(model, prompts, candidates, repeats=5):
    """model.logit_matrices with length-sorted packed batches vs one ordered pair per forward (batch_tokens=1, so
    every batch holds a single row), on the same inputs. Returns the row, with max |M_batched - M_per_pair|."""
    N, K = len(prompts), len(candidates[0])
    out = {}
    t = interleaved({"batched": lambda: out.__setitem__("b", model.logit_matrices(prompts, candidates)),
                     "per_pair": lambda: out.__setitem__("1", model.logit_matrices(prompts, candidates,
                                                                                    batch_tokens=1))}, repeats)
    pairs = N * K * (K - 1)
    return {"setting": f"{N} prompts x K={K} ({pairs} pairs)", "fast": rate(pairs, t["batched"]),
            "slow": rate(pairs, t["per_pair"]), "unit": "pairs/s",
            "max_abs_diff": (out["b"] - out["1"]).abs().max().item()}


def bench_pairrm_row(cfg, prompts=32, repeats=5):
    with tempfile.TemporaryDirectory() as tmp:
        path = cfg.pairrm or pairrm.save_tiny_random_checkpoint(tmp, seed=0, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=2, intermediate_size=128)
        model = pairrm.PairRM.from_pretrained(path, device=cfg.device)
    r = bench_pairrm(model, *pairrm_inputs(prompts, cfg.k, seed=0), repeats=repeats)
    r["setting"] += f", {cfg.pairrm or 'random DeBERTa-v2 hidden 32'} on {cfg.device}"
    return r


LENGTH_MIX = {"prompt": (100, 0.9, 20, 600), "response": (300, 0.8, 20, 1500)}
"""The realistic length mix (length_mix): (median, sigma of log, min, max) tokens of prompts and of responses."""


def length_mix(n, seed, vocab=16, first_id=3):
    """n (prompt, winner, loser) rows of random token ids whose lengths are long-tailed, as in instruction-tuning data:
    a prompt has round(LogNormal(log 100, 0.9)) tokens clipped to [20, 600]; each response round(LogNormal(log 300,
    0.8)) clipped to [20, 1500], the winner's and the loser's drawn independently (LENGTH_MIX). Ids are uniform in
    [first_id, vocab) (the tiny tokenizer's specials 0-2, pad/bos/eos, never drawn). Deterministic in (n, seed).
    Returns [{"prompt": [ids], "winner": [ids], "loser": [ids]}] * n."""
    rng = np.random.default_rng(seed)

    def draw(kind):
        median, sigma, lo, hi = LENGTH_MIX[kind]
        k = int(np.clip(round(rng.lognormal(np.log(median), sigma)), lo, hi))
        return rng.integers(first_id, vocab, size=k).tolist()
    return [{"prompt": draw("prompt"), "winner": draw("response"), "loser": draw("response")} for _ in range(n)]


def bench_train(rows=256, hidden=64, layers=2, repeats=3):
    """Tokens/s of sppo.train_policy (Eq. 4.7) on one process, tiny Llama, random win rates, one epoch a repetition."""
    with tempfile.TemporaryDirectory() as tmp:
        d = sppo_toy.build_tiny_policy(f"{tmp}/m", hidden=hidden, layers=layers)
        cfg = sppo.SPPOConfig(global_batch=64, micro_batch=16, epochs=1, lr=1e-4, progress=False)
        model, tok = runs.load_policy(d, cfg, "cpu")
        data = [dict(r, ref_logp=-5.0) for r in sppo_toy.synthetic_dataset(rows, seed=0)]
        tokens = sum(len(p) + len(r) for p, r in sppo.encode_rows(tok, data, cfg)[0])
        t = interleaved({"train": lambda: sppo.train_policy(model, tok, data, cfg, "cpu")}, repeats)
    return {"setting": f"tiny Llama hidden {hidden} x {layers}, {rows} rows, batch 64 (micro 16)",
            "fast": rate(tokens, t["train"]), "unit": "tokens/s"}


def bench_fsdp(world=2, rows=64, hidden=32, layers=2, arch="llama", global_batch=16, micro_batch=4, epochs=4,
               activation_checkpointing=False, workdir=None, model_dir=None, data_rows=None, max_length=48):
    """Tokens/s of train_7b.py under `world` gloo ranks (torchrun) against sppo.train_policy in this process, on the
    same tiny model, data and batch order; per-step rates, the first 3 (warm-up) excluded. Activation checkpointing
    is off by default, as in sppo.py, so the ratio is the cost of sharding alone. Returns a dict."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench_fsdp_"))
    model_dir = model_dir or sppo_toy.build_tiny_policy(work / "model", arch=arch, hidden=hidden, layers=layers)
    data = work / "data.jsonl"
    runs.write_jsonl(data, data_rows or sppo_toy.synthetic_dataset(rows, seed=1))
    flags = dict(global_batch=global_batch, micro_batch=micro_batch, epochs=epochs, max_length=max_length,
                 max_prompt_length=max_length // 3, lr=1e-4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(train_7b.__file__).resolve()), "--model", model_dir, "--data", str(data), "--out", str(work / "fsdp"),
           *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))], "--no-progress",
           "--activation-checkpointing" if activation_checkpointing else "--no-activation-checkpointing"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    fsdp = [m["tokens_per_s"] for m in runs.read_jsonl(work / "fsdp" / "metrics.jsonl")][3:]
    cfg = sppo.SPPOConfig(**flags, progress=False)
    model, tok = runs.load_policy(model_dir, cfg, "cpu")
    ref = json.loads((work / "fsdp" / "ref_logp.json").read_text())["ref_logp"]    # cached by train_7b.py
    ref_rows = [dict(r, ref_logp=lp) for r, lp in zip(runs.read_jsonl(data), ref)]
    single = [h["tokens_per_s"] for h in sppo.train_policy(model, tok, ref_rows, cfg, "cpu")][3:]
    return {"world": world, "model": f"tiny {arch} hidden {hidden} x {layers} layers", "rows": rows,
            "activation_checkpointing": activation_checkpointing, "steps": len(fsdp) + 3,
            "fsdp": rate(None, fsdp), "single": rate(None, single), "single_process_threads": torch.get_num_threads(),
            "fsdp_threads_per_rank": 1, "fsdp_peak_rss_gb": max(m["peak_memory_gb"] for m in
                                                                  runs.read_jsonl(work / "fsdp" / "metrics.jsonl"))}


def bench_fsdp_row(rows=64):
    r = bench_fsdp(world=2, rows=rows)
    return {"setting": f"{r['model']}, {r['rows']} rows, {r['steps']} steps", "fast": r["fsdp"], "slow": r["single"],
            "unit": "tokens/s"}


# TinyLlama-1.1B's config.json (hidden, MLP, layers, heads, KV heads, vocab): a real shape without a download.
MODEL_SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2),
               "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000),
               # the training peer rows' tiny Llamas (hidden x layers, MLP ~2.7 x hidden, head dim 64)
               "h256": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=4),
               "h512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8)}


def build_sized_policy(out_dir, size, seed=0):
    """A random-init Llama of MODEL_SIZES[size] with the demo's word-level tokenizer (ids past it are never drawn)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    sppo_toy.build_tiny_policy(out_dir, seed=seed)                 # the tokenizer (and a tiny model, replaced below)
    tok = AutoTokenizer.from_pretrained(out_dir)
    shape = {"vocab_size": len(tok), **MODEL_SIZES[size]}
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    runs.save_policy(LlamaForCausalLM(config), tok, out_dir)
    return str(out_dir)


def bench_model(size="tiny", rows=64, words=40, max_length=64, global_batch=16, micro_batch=4, stop_at=1,
                det_rows=None, workdir=None):
    """train_7b.py under torchrun (every local GPU, nccl; else 2 gloo ranks) on a random model of MODEL_SIZES[size]:
    one timed run (tokens/s and MFU per step after the first, peak memory, memory.json's plan vs measured, the
    bf16-unchanged fraction), then three --deterministic runs on the first `det_rows` rows (default: all):
    uninterrupted, stopped after step `stop_at`, and resumed; the resumed export must equal the uninterrupted one
    bit for bit. Returns a dict."""
    from safetensors.torch import load_file
    work = Path(workdir or tempfile.mkdtemp(prefix="bench_model_"))
    model_dir = build_sized_policy(work / "model", size)
    data = work / "data.jsonl"
    runs.write_jsonl(data, sppo_toy.synthetic_dataset(rows, seed=1, words=words))
    runs.write_jsonl(work / "det.jsonl", runs.read_jsonl(data)[:det_rows])
    world = torch.cuda.device_count() or 2
    flags = dict(global_batch=global_batch, micro_batch=micro_batch, epochs=1, max_length=max_length,
                 max_prompt_length=16, lr=1e-6, save_every=10 ** 6)

    def launch(out, *extra, rows_file=data):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(train_7b.__file__).resolve()), "--model", model_dir, "--data", str(rows_file), "--out",
               str(out),
               *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))], "--no-progress", *extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return time.perf_counter() - t0

    wall = launch(work / "timed", "--measure-memory")
    steps = runs.read_jsonl(work / "timed" / "metrics.jsonl")
    summary = json.loads((work / "timed" / "summary.json").read_text())
    memory = json.loads((work / "timed" / "memory.json").read_text())
    det = dict(rows_file=work / "det.jsonl")
    launch(work / "det", "--deterministic", **det)
    launch(work / "det_resumed", "--deterministic", "--stop-at-step", str(stop_at), **det)
    launch(work / "det_resumed", "--deterministic", "--resume", **det)
    a, b = (load_file(str(work / o / "model" / "model.safetensors")) for o in ("det", "det_resumed"))
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    later = steps[2:] or steps           # the first steps pay for allocation and cuDNN's plan for each new shape
    return {"size": size, "world": world, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
            "cpu", "params_m": sum(v.numel() for v in a.values()) / 1e6, "steps": len(steps), "wall_s": wall,
            "tokens_per_s": rate(None, [m["tokens_per_s"] for m in later]),
            "mfu": [m["mfu"] for m in later], "peak_memory_gb": max(m["peak_memory_gb"] for m in steps),
            "memory": memory, "bf16_unchanged_fraction": summary["bf16_unchanged_fraction"],
            "resume_bit_exact": not differing, "resume_differing_tensors": differing[:5]}


def bench_real(prompts=8, K=4, max_new_tokens=32, repeats=2):
    """SmolLM2-135M-Instruct (GGUF -> safetensors): generation tokens/s (sampled tokens, EOS included), committee
    ranking pairs/s on those samples, and training tokens/s with peak RSS, one process vs 2 gloo ranks (bench_fsdp
    on D_t built from the samples). Returns the rows."""
    d = runs.gguf_checkpoint(real_run.smollm2_gguf())
    cfg = sppo.SPPOConfig(K=K, max_new_tokens=max_new_tokens, gen_batch=prompts, temperature=0.7, top_p=0.9,
                          progress=False, eta=10.0)
    model, tok = runs.load_policy(d, cfg, "cpu")
    xs = [r["prompt"] for r in runs.read_jsonl(Path(__file__).parent / "data" / "prompts_train.jsonl")][:prompts]
    out = {}
    t = interleaved({"gen": lambda: out.__setitem__("g", policy.generate_responses(model, tok, xs, cfg))}, repeats)
    new = sum(len(tok(y, add_special_tokens=False)["input_ids"]) + f for g in out["g"] for y, f in
              zip(g["responses"], g["finished"]))
    oracle = committee.CommitteeOracle()
    r_rank = interleaved({"rank": lambda: sppo.rank(oracle, xs, out["g"])}, repeats * 10)
    rows = sppo.build_dataset(xs, out["g"], sppo.rank(oracle, xs, out["g"])[0], cfg)   # winner + loser, as trained
    f = bench_fsdp(world=2, rows=len(rows), global_batch=4, micro_batch=1, epochs=3, model_dir=str(d),
                   data_rows=rows, max_length=192)
    what = f"SmolLM2-135M fp32, {prompts} prompts x K={K}"
    return [("SmolLM2 generation (HF generate)", {"setting": f"{what}, {max_new_tokens} new tokens, T 0.7",
                                                  "fast": rate(new, t["gen"]), "unit": "tokens/s"}),
            ("SmolLM2 committee ranking", {"setting": f"{what}: {prompts * K * (K - 1)} ordered pairs",
                                           "fast": rate(prompts * K * (K - 1), r_rank["rank"]), "unit": "pairs/s"}),
            ("SmolLM2 training, 2 gloo ranks vs one process", {
                "setting": f"{len(rows)} rows, batch 4 pairs, {f['steps']} steps; "
                           f"peak RSS {f['fsdp_peak_rss_gb']:.2f} GB "
                           f"per rank vs {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB (this "
                           f"process, generation included)", "fast": f["fsdp"], "slow": f["single"], "unit": "tokens/s"})]


# ----------------------------------------------------------------------------------------------------------------
# Training on the realistic length mix, against this machine's matmul limit.
def matmul_limit(size, threads, tokens=4096, repeats=5):
    """This machine's fp32 matmul rate at the shapes of one decoder layer of MODEL_SIZES[size]: for each weight (d' x
    d), d' in {d (q, o), d_kv (k, v), intermediate (gate, up)}, and the MLP's down (d x intermediate), the three
    matmuls training runs on a (tokens x d) input: forward X W^T, input gradient dY W, weight gradient dY^T X. Best of
    `repeats`. Returns {"layer": FLOP/s of the whole set (its FLOPs / the sum of its times), "best": the fastest
    single matmul's FLOP/s}."""
    m = MODEL_SIZES[size]
    d, inter = m["hidden_size"], m["intermediate_size"]
    d_kv = m["num_key_value_heads"] * d // m["num_attention_heads"]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    flops, seconds, best = 0, 0.0, 0.0
    try:
        for n_out, n_in, count in [(d, d, 2), (d_kv, d, 2), (inter, d, 2), (d, inter, 1)]:   # per layer
            x, w, dy = torch.randn(tokens, n_in), torch.randn(n_out, n_in), torch.randn(tokens, n_out)
            for fn in (lambda: x @ w.T, lambda: dy @ w, lambda: dy.T @ x):
                fn()
                t = min(timed(fn) for _ in range(repeats))
                f = 2 * tokens * n_in * n_out
                flops, seconds, best = flops + count * f, seconds + count * t, max(best, f / t)
    finally:
        torch.set_num_threads(old)
    return {"layer": flops / seconds, "best": best}


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mix_rows(mix, tokenizer):
    """length_mix's (prompt, winner, loser) ids as D_t rows (runs.DATASET_FIELDS): the prompt as the tiny tokenizer's
    words (policy.prompt_ids adds its chat template), each response as its sampled ids, unfinished (no EOS), win rates
    0.7 / 0.3 and ref_logp -100 (any numbers: the loss's arithmetic is the same whatever they are)."""
    words = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [{"prompt_id": i, "prompt": " ".join(words[t] for t in r["prompt"]), "response": "", "response_ids":
             r[role], "finished": False, "win_prob": 0.7 if role == "winner" else 0.3, "ref_logp": -100.0,
             "role": role} for i, r in enumerate(mix) for role in ("winner", "loser")]


MIX_PATHS = {"plain": dict(group_by_length=False, pack=False), "grouped": dict(group_by_length=True, pack=False),
             "packed": dict(group_by_length=True, pack=True)}
"""The training paths of bench_train_mix: plain micro-batches in the seeded order, padded (before); grouped by
length, padded; grouped and packed (sppo.py's default)."""


def bench_train_mix(size="h256", pairs=16, micro_batch=4, repeats=3):
    """sppo.train_policy (Eq. 4.7, one epoch = one optimizer step of all `pairs` pairs of length_mix(pairs, seed=0),
    no truncation, micro-batches of `micro_batch` pairs) on a random Llama of MODEL_SIZES[size], one thread, each
    path of MIX_PATHS interleaved. Real (non-pad) tokens/s; the padded share of the tokens each path runs; achieved
    FLOP/s (costs.step_flops: 6N per real token + attention at each row's own length) against matmul_limit, measured
    before and after the timed runs (the machine is shared: the faster of the two is taken, the conservative choice).
    Returns {path: row dict}."""
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = runs.load_policy(build_sized_policy(f"{tmp}/m", size), sppo.SPPOConfig(progress=False), "cpu")
    rows = mix_rows(length_mix(pairs, seed=0), tok)
    cfgs = {name: sppo.SPPOConfig(**kw, global_batch=pairs, micro_batch=micro_batch, epochs=1, lr=1e-7,
                                  max_length=4096, max_prompt_length=4096, progress=False)
            for name, kw in MIX_PATHS.items()}
    enc = sppo.encode_rows(tok, rows, cfgs["plain"])[0]
    lengths = [len(p) + len(r) for p, r in enc]
    idx = sppo.train_schedule(rows, cfgs["plain"])[0][0]
    step = lambda sq: costs.step_flops(model.config, sum(p.numel() for p in model.parameters()), sum(lengths), sq,
                                       sum(len(r) for _, r in enc))                              # noqa: E731
    flops, attention = step(sum(n * n for n in lengths)), 1 - step(0) / step(sum(n * n for n in lengths))
    limit = [matmul_limit(size, 1)["layer"]]
    t = interleaved({name: lambda c=c: sppo.train_policy(model, tok, rows, c, "cpu") for name, c in cfgs.items()},
                    repeats)
    limit.append(matmul_limit(size, 1)["layer"])
    out, m = {}, MODEL_SIZES[size]
    for name, c in cfgs.items():
        mbs = sppo.micro_batches(idx, enc, micro_batch, 2, c.group_by_length)
        run = sum(lengths) if c.pack else sum(len(mb) * max(lengths[i] for i in mb) for mb in mbs)
        achieved = flops / statistics.median(t[name])
        out[name] = {"setting": f"hidden {m['hidden_size']} x {m['num_hidden_layers']}, {pairs} pairs ({sum(lengths):,} "
                                f"tokens), micro-batch {micro_batch} pairs; pad {1 - sum(lengths) / run:.0%}; "
                                f"{achieved / 1e9:.1f} GFLOP/s = {achieved / max(limit):.0%} of the matmul limit "
                                f"({max(limit) / 1e9:.1f} GFLOP/s; attention {attention:.0%} of the FLOPs)",
                     "fast": rate(sum(lengths), t[name]), "unit": "tokens/s", "achieved": achieved,
                     "limit": max(limit)}
    return out


def mix_rows_table(quick, repeats, sizes=("h256", "h512")):
    """The rows of --only mix: matmul_limit at 1 and 2 threads, and bench_train_mix (16 pairs at hidden 256 x 4, 8 at
    512 x 8: ~1 and ~4 min per repetition of the three paths on one busy core)."""
    rows = []
    for size in (["h256"] if quick else sizes):
        m = MODEL_SIZES[size]
        shape = f"hidden {m['hidden_size']} x {m['num_hidden_layers']}"
        for threads in (1, 2):
            lim = matmul_limit(size, threads)
            rows.append((f"machine limit: fp32 matmul, {threads} thread{'s' * (threads > 1)}", {
                "setting": f"{shape}: one layer's 7 weights x (forward, grad in, grad W) on 4096 tokens; fastest "
                           f"single matmul {lim['best'] / 1e9:.1f} GFLOP/s", "fast": rate(lim["layer"] / 1e9, [1.0]),
                "unit": "GFLOP/s"}))
        mix = bench_train_mix(size, pairs=4 if quick else {"h256": 16, "h512": 8}[size], micro_batch=2 if quick else 4,
                              repeats=repeats)
        for name in ("grouped", "packed"):
            rows.append((f"training on the length mix: {name} vs plain micro-batches", {
                **mix[name], "slow": mix["plain"]["fast"],
                "setting": mix[name]["setting"] + f"; plain: {mix['plain']['setting'].split('; ')[1]}"}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
def fmt(r, unit):
    return f"{r['median']:,.0f} [{r['min']:,.0f}-{r['max']:,.0f}] {unit}"


def main(argv=None):
    cfg = runs.parse_config(BenchConfig, argv, description=__doc__.split("\n")[0])
    q, reps = cfg.quick, (2 if cfg.quick else cfg.repeats)
    torch.set_num_threads(1)                                       # tiny models: one thread is fastest and stable
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    load = os.getloadavg()[0]
    want = lambda name: cfg.only in ("all", name)                  # noqa: E731
    rows = []
    if want("hedge"):
        rows.append(("Hedge, batched sweep vs one run at a time",
                     bench_hedge(runs=16 if q else 64, T=100 if q else 500, repeats=reps)))
    if want("pairrm"):
        rows.append(("PairRM, packed batches vs one forward per pair",
                     bench_pairrm_row(cfg, prompts=4 if q else cfg.prompts, repeats=1 if q else reps)))
    if want("train"):
        rows.append(("SPPO training (Eq. 4.7), one process", bench_train(rows=64 if q else 256,
                                                                          repeats=1 if q else 3)))
    if want("fsdp"):
        rows.append(("train_7b FSDP2, 2 gloo ranks vs one process", bench_fsdp_row(rows=32 if q else 64)))
    if cfg.only == "model":
        big = cfg.size != "tiny"
        big_run = dict(rows=512, words=1000, max_length=1024, global_batch=32, micro_batch=8, det_rows=96)
        r = bench_model(cfg.size, **(big_run if big else {}))       # big: 8 steps of 32 pairs; resume check on 2
        print(json.dumps(r, indent=1))
        mfu = [x for x in r["mfu"] if x is not None]
        rows.append((f"train_7b, {r['params_m']:.0f} M params, {r['world']} x {r['device']}", {
            "setting": f"{r['steps']} steps; peak {r['peak_memory_gb']:.1f} GB; MFU "
                       + (f"{statistics.median(mfu):.1%}" if mfu else "n/a (no CUDA)")
                       + f"; resume bit-exact: {r['resume_bit_exact']}", "fast": r["tokens_per_s"], "unit": "tokens/s"}))
    if cfg.only == "real":
        rows += bench_real(repeats=1 if q else 2)
    if cfg.only == "mix":
        rows += mix_rows_table(q, 1 if q else min(cfg.repeats, 3))
    if cfg.only == "all":
        rows.append(("train_7b MFU", {"setting": "see train_7b.py logs" if torch.cuda.is_available() else
                                      "needs CUDA: not measurable on this machine", "unit": "-"}))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, 1 thread per process, load average {load:.1f} before the run; median [min-max] "
          f"of interleaved repetitions\n")
    print("| what | setting | fast path | baseline | ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows:
        fast = fmt(r["fast"], r["unit"]) if "fast" in r else "n/a"
        slow = fmt(r["slow"], r["unit"]) if "slow" in r else ""
        ratio = f"{r['fast']['median'] / r['slow']['median']:.2f}x" if "slow" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"| {name} | {r['setting']} | {fast} | {slow} | {ratio} | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
