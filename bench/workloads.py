"""bench/workloads.py: what bench.py's rows run on, and the one rule they are timed by.

The timing rule (interleaved): each path is warmed up once, then the paths being compared are run in turn,
`repeats` times, so other load on the machine hits both alike; a row reports the median and the min-max (rate, fmt).
The inputs: PairRM texts of varied length (pairrm_inputs), token rows of equal lengths or of a realistic long-tailed
length mix (length_mix, as instruction-tuning data has), and random-init Llamas of named sizes with the demo's
tokenizer (MODEL_SIZES, build_sized_policy). bench.py (our rows) and bench_peers.py (the peers') share them.
"""
from __future__ import annotations

import random
import re
import statistics
import time

import numpy as np
import torch

import costs
import pairrm
import runs
import sppo_toy


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


def fmt(r, unit):
    """'median [min-max] unit', to 3 significant digits or more."""
    f = ",.0f" if r["median"] >= 100 else ".1f" if r["median"] >= 10 else ".2f"
    return f"{r['median']:{f}} [{r['min']:{f}}-{r['max']:{f}}] {unit}"


# ----------------------------------------------------------------------------------------------------------------
# The machine's limit: its fp32 matmul rate at a model's shapes, and the FLOPs a PairRM pass does.
def layer_weights(shape):
    """One layer's matmul weights (out, in, count) from a config dict: a Llama's (MODEL_SIZES: q, o (d x d), k, v
    (d_kv x d), gate, up (I x d), down (d x I)) or, without num_key_value_heads, a DeBERTa's (q, k, v, o, MLP in,
    MLP out)."""
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    if "num_key_value_heads" not in shape:
        return [(d, d, 4), (inter, d, 1), (d, inter, 1)]
    d_kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    return [(d, d, 2), (d_kv, d, 2), (inter, d, 2), (d, inter, 1)]


def matmul_limit(shape, threads, tokens=4096, repeats=5, backward=True):
    """This machine's fp32 matmul rate at the shapes of one layer (layer_weights(shape)): for each weight W the
    matmuls a (tokens x d) input runs through it: forward X W^T and, if backward (training), the input gradient dY W
    and the weight gradient dY^T X. Best of `repeats` each. Returns {"layer": FLOP/s of the whole set (its FLOPs /
    the sum of its times), "best": the fastest single matmul's FLOP/s}."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    flops, seconds, best = 0, 0.0, 0.0
    try:
        for n_out, n_in, count in layer_weights(shape):
            x, w, dy = torch.randn(tokens, n_in), torch.randn(n_out, n_in), torch.randn(tokens, n_out)
            for fn in (lambda: x @ w.T, lambda: dy @ w, lambda: dy.T @ x)[: 3 if backward else 1]:
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


def pairrm_work(model, prompts, candidates):
    """FLOPs of one model.logit_matrices pass over every ordered pair (costs.encoder_flops at each row's own length),
    the share of them that is attention (the T^2 terms), and the limit they run against: matmul_limit at the
    encoder's layer shapes, forward only, 1 thread. Returns (flops, attention share, row lengths (R,), limit FLOP/s)."""
    lengths = model.pair_lengths(prompts, candidates).tolist()
    config = model.pretrained_model.config
    flops = costs.encoder_flops(config, lengths)
    limit = matmul_limit(config.to_dict(), 1, backward=False)["layer"]
    return flops, 1 - costs.encoder_flops(config, lengths, attention=False) / flops, lengths, limit


def of_limit(flops, seconds, limit) -> str:
    """'A GFLOP/s = x% of the matmul limit' for flops done in the median of `seconds`."""
    achieved = flops / statistics.median(seconds)
    return f"{achieved / 1e9:.1f} GFLOP/s = {achieved / limit:.0%} of the matmul limit"


# ----------------------------------------------------------------------------------------------------------------
# Texts for PairRM.
WORDS = sorted(set(re.findall(r"\w+", pairrm._TINY_TEXT)))
"""Words of PairRM's tiny tokenizer text: about one token per word, as with a real tokenizer on English."""


def pairrm_inputs(n, k, seed=0, prompt_words=40, response_words=80):
    """n prompts of 8..prompt_words words and k responses of 3..response_words words each (random words), so lengths
    vary as sampled responses do. Returns (prompts, candidates)."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."  # noqa: E731
    return [text(8, prompt_words) + "?" for _ in range(n)], [[text(3, response_words) for _ in range(k)]
                                                             for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Token rows: a realistic length mix, and equal lengths (no padding anywhere).
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


def equal_lengths(n, seed, prompt=32, response=96, vocab=16, first_id=3):
    """n rows shaped as length_mix's, every prompt `prompt` tokens and every response `response` tokens (no padding
    anywhere: the setting of the issue's first measurement)."""
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(first_id, vocab, size=k).tolist()                  # noqa: E731
    return [{"prompt": ids(prompt), "winner": ids(response), "loser": ids(response)} for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Models of named sizes.
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


def mix_rows(mix, tokenizer, win_prob=(0.7, 0.3), ref_logp=-100.0):
    """length_mix's (or equal_lengths') (prompt, winner, loser) ids as D_t rows (runs.DATASET_FIELDS), winner then
    loser: the prompt as the tokenizer's words (policy.prompt_ids adds its chat template), each response as its ids,
    unfinished (no EOS); win rates win_prob (winner, loser) and ref_logp (any numbers: the loss's arithmetic is the
    same whatever they are)."""
    words = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    text = lambda ids: " ".join(words[t] for t in ids)                                 # noqa: E731
    return [{"prompt_id": i, "prompt": text(r["prompt"]), "response": text(r[role]), "response_ids": r[role],
             "finished": False, "win_prob": p, "ref_logp": ref_logp, "role": role}
            for i, r in enumerate(mix) for role, p in zip(("winner", "loser"), win_prob)]


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
