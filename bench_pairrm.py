"""Benchmark: PairRM's batched evaluation against one forward per ordered pair, on the same inputs.

The released SPPO pipeline ranks with llm-blender one prompt at a time (batch_size=1), and users report that ranking
takes longer than training. pairrm.py packs the K(K-1) ordered pairs of many prompts into length-sorted batches of a
token budget. This script times both paths on the same prompts (default: 32 prompts, K = 5 as in SPPO Sec. 5, so 640
ordered pairs; a small random DeBERTa-v2 on CPU) and checks that they give the same logit matrix M.

Run:
    python bench_pairrm.py                                   # small random checkpoint in a temp folder, CPU
    python bench_pairrm.py --model /path/to/PairRM --prompts 8 --device cuda   # the real weights
The measuring function `bench_pairrm(model, prompts, candidates, ...) -> dict` is importable.
"""
import argparse
import dataclasses
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass

import torch

import pairrm

# Words of the tiny tokenizer's text: about one token per word, as with a real tokenizer on English.
WORDS = sorted(set(re.findall(r"\w+", pairrm._TINY_TEXT)))


@dataclass
class BenchConfig:
    prompts: int = 32
    """number of prompts N"""
    k: int = 5
    """candidates per prompt (K = 5 in SPPO, Sec. 5): K(K-1) ordered pairs per prompt"""
    prompt_words: int = 40
    """prompts have 8..prompt_words words (about one token per word)"""
    response_words: int = 80
    """responses have 3..response_words words"""
    hidden_size: int = 32
    """hidden size of the random DeBERTa-v2 (ignored with --model)"""
    layers: int = 2
    """encoder layers of the random model (ignored with --model)"""
    heads: int = 2
    """attention heads of the random model (ignored with --model)"""
    batch_tokens: int = 0
    """padded tokens per forward on the batched path; 0: pairrm's default for the device"""
    repeats: int = 5
    """timed runs of each path, interleaved; the fastest of each is reported"""
    seed: int = 0
    """seed of the random texts and weights"""
    model: str = ""
    """a local llm-blender/PairRM(-hf) folder; empty: write a small random checkpoint to a temp folder"""
    device: str = "cpu"
    """cpu or cuda (fp32 on CPU, fp16 on GPU)"""
    threads: int = 0
    """torch CPU threads; 0: torch's default"""


def make_inputs(n: int, k: int, seed: int = 0, prompt_words: int = 40, response_words: int = 80):
    """n prompts of 8..prompt_words words and k responses of 3..response_words words each (random words of the tiny
    tokenizer's text): lengths vary as sampled responses do. Returns (prompts, candidates)."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."
    prompts = [text(8, prompt_words) + "?" for _ in range(n)]
    return prompts, [[text(3, response_words) for _ in range(k)] for _ in range(n)]


def bench_pairrm(model: pairrm.PairRM, prompts: list[str], candidates: list[list[str]],
                 batch_tokens: int | None = None, repeats: int = 5) -> dict:
    """Time model.logit_matrices batched (batch_tokens) and with one ordered pair per forward (batch_tokens=1, so
    every batch holds a single row) on the same inputs. Returns pairs/s of both, the speedup and max |M_b - M_1|."""
    N, K = len(prompts), len(candidates[0])
    pairs = N * K * (K - 1)

    def run(tokens):
        t0 = time.perf_counter()
        M = model.logit_matrices(prompts, candidates, batch_tokens=tokens)  # returns on CPU: synchronised
        return time.perf_counter() - t0, M

    for tokens in (batch_tokens, 1):  # warm-up
        model.logit_matrices(prompts[:1], candidates[:1], batch_tokens=tokens)
    batched_s = per_pair_s = float("inf")
    for _ in range(repeats):  # interleaved, fastest of each: robust to other load on the machine
        (t_b, M_batched), (t_1, M_per_pair) = run(batch_tokens), run(1)
        batched_s, per_pair_s = min(batched_s, t_b), min(per_pair_s, t_1)
    i, j = (~torch.eye(K, dtype=torch.bool)).nonzero().unbind(1)
    n = torch.arange(N).repeat_interleave(len(i))
    rows = torch.stack([n, n * K + i.repeat(N), n * K + j.repeat(N)], 1)  # all ordered pairs, as logit_matrices
    lengths = model.encode(prompts, candidates, rows).lengths().float()
    batch_tokens = batch_tokens or pairrm.default_batch_tokens(next(model.parameters()).device)
    return dict(prompts=N, k=K, pairs=pairs, mean_row_tokens=lengths.mean().item(), batch_tokens=batch_tokens,
                batched_s=batched_s, per_pair_s=per_pair_s, batched_pairs_per_s=pairs / batched_s,
                per_pair_pairs_per_s=pairs / per_pair_s, speedup=per_pair_s / batched_s,
                max_abs_diff=(M_batched - M_per_pair).abs().max().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(BenchConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default)
    cfg = BenchConfig(**vars(parser.parse_args()))
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = cfg.model or pairrm.save_tiny_random_checkpoint(
            tmp, seed=cfg.seed, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden_size)
        model = pairrm.PairRM.from_pretrained(path, device=cfg.device)
    prompts, candidates = make_inputs(cfg.prompts, cfg.k, cfg.seed, cfg.prompt_words, cfg.response_words)
    load = os.getloadavg()[0]  # other work on the machine distorts timings: shown with them
    r = bench_pairrm(model, prompts, candidates, cfg.batch_tokens or None, cfg.repeats)
    what = cfg.model or f"random DeBERTa-v2 (hidden {cfg.hidden_size}, {cfg.layers} layers, {cfg.heads} heads)"
    print(f"PairRM: {what}, {cfg.device}, {torch.get_num_threads()} threads, dtype {next(model.parameters()).dtype}, "
          f"load average {load:.1f} on {os.cpu_count()} cores before the run")
    print(f"{r['prompts']} prompts x K={r['k']}: {r['pairs']} ordered pairs, {r['mean_row_tokens']:.0f} tokens/row\n")
    print("| path | seconds | pairs/s |\n|---|---:|---:|")
    print(f"| batched (batch_tokens={r['batch_tokens']}) | {r['batched_s']:.3f} | {r['batched_pairs_per_s']:.0f} |")
    print(f"| one forward per ordered pair | {r['per_pair_s']:.3f} | {r['per_pair_pairs_per_s']:.0f} |")
    print(f"\nspeedup {r['speedup']:.1f}x; max |M_batched - M_per_pair| = {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
