"""bench/bench.py: every benchmark of the repository, one table, one timing rule. Run from the repository root:

    python -m bench.bench                    # ~5 min on 2 CPU cores; prints a Markdown table (docs/benchmarks.md)
    make bench                               # the same with the peers' rows (TRL, llm-blender), in their own venvs
    python -m bench.bench --quick            # small sizes, few repetitions (the test suite runs this)
    python -m bench.bench --only pairrm --pairrm DIR --device cuda --prompts 8     # PairRM alone, real weights

The timing rule, for every row: each path is warmed up once, then the paths being compared are run in turn,
interleaved, `repeats` times (other load on the machine hits both alike); the table shows the median and, in
brackets, the min-max of those repetitions. Ratios are ratios of medians on identical inputs, and every
comparison row also reports the largest difference between the two paths' outputs.

Rows:
  * Hedge (Eq. 4.1) on a 200-action game: many runs as one batched array computation vs one run at a time.
  * PairRM: all K(K-1) ordered pairs of many prompts packed in length-sorted batches vs one forward per pair; the
    same batches with pairrm.FewerPassAttention vs transformers' attention (`--profile`: where the time goes); and
    both paths' FLOP/s (costs.encoder_flops) against this machine's fp32 matmul limit at the layer's shapes.
  * Generation: K samples per prompt from one prefill whose KV cache is repeated K times (policy.sample_k) vs HF
    generate(num_return_sequences=K), which runs each prompt K times; prompts of length_mix's lengths, sampled
    tokens/s, and how many sampled rows differ (`--only generate` adds SmolLM2-135M; requirements/real.txt).
  * SPPO training (Eq. 4.7) on one process: tokens/s of training.train_policy on a tiny Llama.
  * FSDP2 with 2 gloo ranks (train_7b.py under torchrun) vs one process on the same data and batch order; here the
    repetitions are the optimizer steps (after 3 warm-up steps) of one run of each.
  * train_7b.py at a real model's shape (`--only model --size 1b`: TinyLlama-1.1B's config, random weights) under
    torchrun on every local GPU (2 gloo ranks on CPU): tokens/s, MFU (CUDA), peak memory against memory_plan, the
    bf16-unchanged fraction; then the --deterministic resume check (stopped + resumed == uninterrupted, bit for bit).
  * The peers, when their interpreters are given (--trl-python, --blender-python; `make bench` builds both
    environments and passes them): our sppo_hard training step vs TRL's DPOTrainer(loss_type="sppo_hard") on equal
    lengths and on a realistic length mix (length_mix), and pairrm.preference_matrices vs llm-blender's
    Blender.rank as the authors' scripts/rank.py calls it (--peer-pairrm real: at PairRM's own shape), with both
    sides' FLOP/s against the matmul limit; each with its agreement check (peer_runner.py is the peers' side: it
    runs under their interpreters and never imports our modules).
  * --only real (not part of `all`; needs requirements/real.txt): SmolLM2-135M-Instruct from its GGUF, the real
    model of docs/real_model.md: generation tokens/s, committee ranking pairs/s, training tokens/s
    on one process and on 2 gloo ranks, and the peak RSS of each.

  * --only mix (not part of `all`): this machine's fp32 matmul limit at the shapes of hidden 256 x 4 and 512 x 8
    Llamas, and training.train_policy on the realistic length mix (length_mix): plain, length-grouped and packed
    micro-batches, real tokens/s and the fraction of the limit.

    python -m bench.bench --only model --size 1b  # on a GPU node (docs/train_7b.md's GPU numbers come from this)
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
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
from transformers.utils import logging as hf_logging

import cli
import committee
import costs
import hedge_toy
import pairrm
import policy
import real_run
import runs
import sppo
import sppo_toy
import train_7b
import training
from bench import bench_peers
from bench.workloads import (MODEL_SIZES, build_sized_policy, fmt, interleaved, length_mix, matmul_limit,
                             mix_rows, of_limit, pairrm_inputs, pairrm_work, rate)
from cli import arg


@dataclass
class BenchConfig:
    quick: bool = arg(default=False, help="Small sizes and few repetitions (a smoke run, as in the test suite).")
    only: Literal["all", "hedge", "pairrm", "generate", "train", "fsdp", "model", "real", "peers", "mix"] = arg(
        default="all", help="Run one row only ('model': the GPU row; 'real': the SmolLM2 rows; 'mix': training on "
        "the realistic length mix against the matmul limit, ~25 min; none of the three is in all; 'peers': the peer "
        "rows alone; 'generate': also on SmolLM2).")
    size: Literal["tiny", "1b"] = arg(default="tiny", help="Model row: 'tiny' (hidden 64) or '1b' (TinyLlama-1.1B's "
                                        "shape, random weights).")
    repeats: int = arg(default=5, help="Interleaved timed repetitions of each path (--quick: 1-2).")
    prompts: int = arg(default=32, help="PairRM row: prompts N.")
    k: int = arg(default=5, help="PairRM row: candidates per prompt (SPPO Sec. 5: K = 5), K(K-1) pairs each.")
    pairrm: str | None = arg(default=None, help="PairRM row: a local PairRM checkpoint; default: a small random one.")
    device: str = arg(default="cpu", help="PairRM row: cpu or cuda (fp32 on CPU, fp16 on GPU).")
    trl_python: str | None = arg(default=None, help="Peer rows: the interpreter of an environment with trl 1.16 "
                                   "(requirements/bench-trl.txt; `make bench` builds .venv-trl).")
    blender_python: str | None = arg(default=None, help="Peer row: the interpreter of an environment with "
                                       "llm-blender 0.0.2 (requirements/bench-blender.txt; `make bench` builds "
                                       ".venv-blender).")
    peer_pairrm: Literal["h64", "h256", "real"] = arg(default="h64", help="PairRM peer row: the random DeBERTa-v2's "
                                                        "size (bench_peers.PEER_PAIRRM; h256 takes ~10x longer; real, "
                                                        "PairRM's own shape at rows of mean ~250 tokens, ~3 s a pair: "
                                                        "use --prompts 2).")
    profile: bool = arg(default=False, help="PairRM row: also print torch.profiler's top operators of one batched "
                          "pass (where the time goes).")


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
            "slow": rate(pairs, t["per_pair"]), "unit": "pairs/s", "times": t,
            "max_abs_diff": (out["b"] - out["1"]).abs().max().item()}


def bench_pairrm_attention(model, prompts, candidates, repeats=5):
    """The batched path with pairrm.FewerPassAttention vs the same batches through transformers' attention
    (pairrm.transformers_attention), on the same inputs. Returns the row, with max |M_fewer - M_transformers|."""
    N, K = len(prompts), len(candidates[0])
    ref, out = pairrm.transformers_attention(model), {}
    t = interleaved({"fewer": lambda: out.__setitem__("f", model.logit_matrices(prompts, candidates)),
                     "transformers": lambda: out.__setitem__("t", ref.logit_matrices(prompts, candidates))}, repeats)
    pairs = N * K * (K - 1)
    return {"setting": f"{N} prompts x K={K} ({pairs} pairs)", "fast": rate(pairs, t["fewer"]),
            "slow": rate(pairs, t["transformers"]), "unit": "pairs/s",
            "max_abs_diff": (out["f"] - out["t"]).abs().max().item()}


def bench_pairrm_rows(cfg, prompts=32, repeats=5):
    """The PairRM rows: packed batches vs one pair per forward, and FewerPassAttention vs transformers' attention
    (both batched); with cfg.profile, torch.profiler's top operators of one batched pass."""
    with tempfile.TemporaryDirectory() as tmp:
        path = cfg.pairrm or pairrm.save_tiny_random_checkpoint(tmp, seed=0, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=2, intermediate_size=128)
        model = pairrm.PairRM.from_pretrained(path, device=cfg.device)
    inputs = pairrm_inputs(prompts, cfg.k, seed=0)
    where = f", {cfg.pairrm or 'random DeBERTa-v2 hidden 32'} on {cfg.device}"
    rows = [("PairRM, packed batches vs one forward per pair", bench_pairrm(model, *inputs, repeats=repeats)),
            ("PairRM batches, FewerPassAttention vs transformers' attention",
             bench_pairrm_attention(model, *inputs, repeats=repeats))]
    for _, r in rows:
        r["setting"] += where
    rows.append(("PairRM against the matmul limit", pairrm_limit_row(model, inputs, rows[0][1]["times"])))
    if cfg.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.logit_matrices(*inputs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return rows


def generation_model(name, quick=False):
    """(model in eval mode, its description): 'tiny' a random Llama built here (vocab 32000; hidden 256 x 4 layers,
    64 x 2 with --quick), 'smollm2' SmolLM2-135M-Instruct from its GGUF (requirements/real.txt)."""
    if name == "smollm2":
        d = runs.gguf_checkpoint(real_run.smollm2_gguf())
        return runs.load_policy(d, sppo.SPPOConfig(), "cpu")[0].eval(), "SmolLM2-135M-Instruct fp32"
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hidden, layers = (64, 2) if quick else (256, 4)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval(), f"random Llama hidden {hidden} x {layers} layers, vocab 32000"


def bench_generate(name="tiny", prompts=8, K=5, max_new_tokens=32, repeats=3, quick=False):
    """Sampled tokens/s of policy.sample_k: each prompt's prefill run once and its KV cache repeated K times, vs HF
    generate(num_return_sequences=K), which repeats each prompt K times before the prefill. One left-padded batch
    of `prompts` random-id prompts with length_mix's prompt lengths (20-600 tokens), temperature 1, top-p 1, the
    same seed for both; a row's tokens count up to and including its EOS. Also reports how many of the B*K
    sampled rows differ between the two paths (0: token for token the same)."""
    from transformers import GenerationConfig
    model, what = generation_model(name, quick)
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    b = policy.collate([(r["prompt"], []) for r in length_mix(prompts, seed=0, vocab=model.config.vocab_size)],
                       eos[0], padding_side="left")                                          # (B, T)
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                           num_return_sequences=K, pad_token_id=eos[0], eos_token_id=eos)
    out = {}

    def path(shared):
        def sample():
            torch.manual_seed(0)
            out[shared] = policy.sample_k(model, b["input_ids"], b["attention_mask"], gen, shared_prefill=shared)
        return sample
    t = interleaved({"shared": path(True), "per_sample": path(False)}, repeats)
    T = b["input_ids"].shape[1]
    new = [row[T:].tolist() for row in out[True]]
    tokens = sum(next((n + 1 for n, tok in enumerate(ids) if tok in eos), len(ids)) for ids in new)
    differ = sum(x != y[T:].tolist() for x, y in zip(new, out[False]))
    lengths = [int(n) for n in b["attention_mask"].sum(1)]
    return {"setting": f"{what}, {prompts} prompts of "
                       f"{min(lengths)}-{max(lengths)} tokens x K={K}, {max_new_tokens} new tokens; rows that "
                       f"differ: {differ} of {len(new)}",
            "fast": rate(tokens, t["shared"]), "slow": rate(tokens, t["per_sample"]), "unit": "tokens/s"}

def bench_train(rows=256, hidden=64, layers=2, repeats=3):
    """Tokens/s of training.train_policy (Eq. 4.7) on one process, tiny Llama, random win rates, one epoch a repetition."""
    with tempfile.TemporaryDirectory() as tmp:
        d = sppo_toy.build_tiny_policy(f"{tmp}/m", hidden=hidden, layers=layers)
        cfg = sppo.SPPOConfig(global_batch=64, micro_batch=16, epochs=1, lr=1e-4, progress=False)
        model, tok = runs.load_policy(d, cfg, "cpu")
        data = [dict(r, ref_logp=-5.0) for r in sppo_toy.synthetic_dataset(rows, seed=0)]
        tokens = sum(len(p) + len(r) for p, r in training.encode_rows(tok, data, cfg)[0])
        t = interleaved({"train": lambda: training.train_policy(model, tok, data, cfg, "cpu")}, repeats)
    return {"setting": f"tiny Llama hidden {hidden} x {layers}, {rows} rows, batch 64 (micro 16)",
            "fast": rate(tokens, t["train"]), "unit": "tokens/s"}


TORCHRUN_TIMEOUT_S = 1800
"""A torchrun launch that runs longer is killed, with its ranks (its own process group), and the row fails."""


def _torchrun(cmd, timeout=TORCHRUN_TIMEOUT_S, tail=2000):
    """Run a torchrun command in a process group of its own; on a non-zero exit or after `timeout` seconds, kill the
    whole group (torchrun and its ranks) and raise RuntimeError with the output's tail."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout} s; killed with its ranks:\n{out[-tail:]}{err[-tail:]}")
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-tail:]}{err[-tail:]}")


@contextlib.contextmanager
def _workdir(workdir, prefix):
    """`workdir` as a Path, or a temporary folder removed afterwards (a failed row leaves nothing in /tmp)."""
    if workdir:
        yield Path(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def bench_fsdp(world=2, rows=64, hidden=32, layers=2, arch="llama", global_batch=16, micro_batch=4, epochs=4,
               activation_checkpointing=False, workdir=None, model_dir=None, data_rows=None, max_length=48):
    """Tokens/s of train_7b.py under `world` gloo ranks (torchrun) against training.train_policy in this process, on the
    same tiny model, data and batch order; per-step rates, the first 3 (warm-up) excluded. Activation checkpointing
    is off by default, as in sppo.py, so the ratio is the cost of sharding alone. Returns a dict."""
    with _workdir(workdir, "bench_fsdp_") as work:
        return _bench_fsdp(work, world, rows, hidden, layers, arch, global_batch, micro_batch, epochs,
                           activation_checkpointing, model_dir, data_rows, max_length)


def _bench_fsdp(work, world, rows, hidden, layers, arch, global_batch, micro_batch, epochs, activation_checkpointing,
                model_dir, data_rows, max_length):
    model_dir = model_dir or sppo_toy.build_tiny_policy(work / "model", arch=arch, hidden=hidden, layers=layers)
    data = work / "data.jsonl"
    runs.write_jsonl(data, data_rows or sppo_toy.synthetic_dataset(rows, seed=1))
    flags = dict(global_batch=global_batch, micro_batch=micro_batch, epochs=epochs, max_length=max_length,
                 max_prompt_length=max_length // 3, lr=1e-4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(train_7b.__file__).resolve()), "--model", model_dir, "--data", str(data), "--out", str(work / "fsdp"),
           *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))], "--no-progress",
           "--activation-checkpointing" if activation_checkpointing else "--no-activation-checkpointing"]
    _torchrun(cmd)
    fsdp = [m["tokens_per_s"] for m in runs.read_jsonl(work / "fsdp" / "metrics.jsonl")][3:]
    cfg = sppo.SPPOConfig(**flags, progress=False)
    model, tok = runs.load_policy(model_dir, cfg, "cpu")
    ref = json.loads((work / "fsdp" / "ref_logp.json").read_text())["ref_logp"]    # cached by train_7b.py
    ref_rows = [dict(r, ref_logp=lp) for r, lp in zip(runs.read_jsonl(data), ref)]
    single = [h["tokens_per_s"] for h in training.train_policy(model, tok, ref_rows, cfg, "cpu")][3:]
    return {"world": world, "model": f"tiny {arch} hidden {hidden} x {layers} layers", "rows": rows,
            "activation_checkpointing": activation_checkpointing, "steps": len(fsdp) + 3,
            "fsdp": rate(None, fsdp), "single": rate(None, single), "single_process_threads": torch.get_num_threads(),
            "fsdp_threads_per_rank": 1, "fsdp_peak_rss_gb": max(m["peak_memory_gb"] for m in
                                                                  runs.read_jsonl(work / "fsdp" / "metrics.jsonl"))}


def bench_fsdp_row(rows=64):
    r = bench_fsdp(world=2, rows=rows)
    return {"setting": f"{r['model']}, {r['rows']} rows, {r['steps']} steps", "fast": r["fsdp"], "slow": r["single"],
            "unit": "tokens/s"}


def bench_model(size="tiny", rows=64, words=40, max_length=64, global_batch=16, micro_batch=4, stop_at=1,
                det_rows=None, workdir=None):
    """train_7b.py under torchrun (every local GPU, nccl; else 2 gloo ranks) on a random model of MODEL_SIZES[size]:
    one timed run (tokens/s and MFU per step after the first, peak memory, memory.json's plan vs measured, the
    bf16-unchanged fraction), then three --deterministic runs on the first `det_rows` rows (default: all):
    uninterrupted, stopped after step `stop_at`, and resumed; the resumed export must equal the uninterrupted one
    bit for bit. Returns a dict."""
    with _workdir(workdir, "bench_model_") as work:
        return _bench_model(work, size, rows, words, max_length, global_batch, micro_batch, stop_at, det_rows)


def _bench_model(work, size, rows, words, max_length, global_batch, micro_batch, stop_at, det_rows):
    from safetensors.torch import load_file
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
        _torchrun(cmd, tail=3000)
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
    xs = [r["prompt"] for r in runs.read_jsonl(Path(__file__).parents[1] / "data" / "prompts_train.jsonl")][:prompts]
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
def pairrm_limit_row(model, inputs, t):
    """The FLOP/s of the PairRM passes timed in t ({"batched", "per_pair"}: seconds) against this machine's matmul
    limit at the encoder's layer shapes (forward only, 1 thread; workloads.matmul_limit), measured after them."""
    flops, attention, lengths, limit = pairrm_work(model, *inputs)
    c = model.pretrained_model.config
    return {"setting": f"hidden {c.hidden_size} x {c.num_hidden_layers}, {len(lengths)} rows of {min(lengths)}-"
                       f"{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), attention {attention:.0%} of the "
                       f"FLOPs (costs.encoder_flops); limit {limit / 1e9:.1f} GFLOP/s (forward matmuls at the layer's "
                       f"shapes, 4096 tokens); batched: {of_limit(flops, t['batched'], limit)}; one pair per forward: "
                       f"{of_limit(flops, t['per_pair'], limit)}",
            "fast": rate(flops / 1e9, t["batched"]), "slow": rate(flops / 1e9, t["per_pair"]), "unit": "GFLOP/s"}


# Training on the realistic length mix, against this machine's matmul limit.
MIX_PATHS = {"plain": dict(group_by_length=False, pack=False), "grouped": dict(group_by_length=True, pack=False),
             "packed": dict(group_by_length=True, pack=True)}
"""The training paths of bench_train_mix: plain micro-batches in the seeded order, padded (before); grouped by
length, padded; grouped and packed (sppo.py's default)."""


def bench_train_mix(size="h256", pairs=16, micro_batch=4, repeats=3):
    """training.train_policy (Eq. 4.7, one epoch = one optimizer step of all `pairs` pairs of length_mix(pairs, seed=0),
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
    enc = training.encode_rows(tok, rows, cfgs["plain"])[0]
    lengths = [len(p) + len(r) for p, r in enc]
    idx = training.train_schedule(rows, cfgs["plain"])[0][0]
    step = lambda sq: costs.step_flops(model.config, sum(p.numel() for p in model.parameters()), sum(lengths), sq,
                                       sum(len(r) for _, r in enc))                              # noqa: E731
    flops, attention = step(sum(n * n for n in lengths)), 1 - step(0) / step(sum(n * n for n in lengths))
    limit = [matmul_limit(MODEL_SIZES[size], 1)["layer"]]
    t = interleaved({name: lambda c=c: training.train_policy(model, tok, rows, c, "cpu") for name, c in cfgs.items()},
                    repeats)
    limit.append(matmul_limit(MODEL_SIZES[size], 1)["layer"])
    out, m = {}, MODEL_SIZES[size]
    for name, c in cfgs.items():
        mbs = training.micro_batches(idx, enc, micro_batch, 2, c.group_by_length)
        run = sum(lengths) if c.pack else sum(len(mb) * max(lengths[i] for i in mb) for mb in mbs)
        out[name] = {"setting": f"hidden {m['hidden_size']} x {m['num_hidden_layers']}, {pairs} pairs ({sum(lengths):,} "
                                f"tokens), micro-batch {micro_batch} pairs; pad {1 - sum(lengths) / run:.0%}; "
                                f"{of_limit(flops, t[name], max(limit))} "
                                f"({max(limit) / 1e9:.1f} GFLOP/s; attention {attention:.0%} of the FLOPs)",
                     "fast": rate(sum(lengths), t[name]), "unit": "tokens/s"}
    return out


def mix_rows_table(quick, repeats, sizes=("h256", "h512")):
    """The rows of --only mix: matmul_limit at 1 and 2 threads, and bench_train_mix (16 pairs at hidden 256 x 4, 8 at
    512 x 8: ~1 and ~4 min per repetition of the three paths on one busy core)."""
    rows = []
    for size in (["h256"] if quick else sizes):
        m = MODEL_SIZES[size]
        shape = f"hidden {m['hidden_size']} x {m['num_hidden_layers']}"
        for threads in (1, 2):
            lim = matmul_limit(m, threads)
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
# The table.
def main(argv=None):
    return cli.main("bench.py", BenchConfig, table, argv, description=__doc__.split("\n")[0])


def table(cfg):
    """Every row cfg.only asks for, timed by one rule, printed as one table."""
    for flag, python in (("--trl-python", cfg.trl_python), ("--blender-python", cfg.blender_python)):
        if python and not os.access(python, os.X_OK):
            raise cli.ConfigError(f"{flag} {python}: no such interpreter; `make bench` builds the peers' environments")
    q, reps = cfg.quick, (2 if cfg.quick else cfg.repeats)
    torch.set_num_threads(1)                                       # tiny models: one thread is fastest and stable
    hf_logging.disable_progress_bar()
    load = os.getloadavg()[0]
    want = lambda name: cfg.only in ("all", name)                  # noqa: E731
    rows = []
    if want("hedge"):
        rows.append(("Hedge, batched sweep vs one run at a time",
                     bench_hedge(runs=16 if q else 64, T=100 if q else 500, repeats=reps)))
    if want("pairrm"):
        rows += bench_pairrm_rows(cfg, prompts=4 if q else cfg.prompts, repeats=1 if q else reps)
    if want("generate"):
        for name in ["tiny"] + (["smollm2"] if cfg.only == "generate" else []):
            rows.append((f"Generation, one prefill per prompt vs HF's K ({name})",
                         bench_generate(name, prompts=2 if q else 8, K=2 if q else 5, max_new_tokens=8 if q else 32,
                                        repeats=1 if q else reps if name == "tiny" else 2, quick=q)))
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
    if want("peers"):
        rows += bench_peers.peer_rows(cfg)
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
    if want("peers") and not (cfg.trl_python and cfg.blender_python):
        print("\npeers: no TRL / llm-blender rows" if not (cfg.trl_python or cfg.blender_python) else "\npeers: one "
              "peer only", "(pass --trl-python and --blender-python, or run `make bench`, which builds .venv-trl and "
              ".venv-blender and passes both)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
