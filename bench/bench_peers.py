"""bench/bench_peers.py: bench.py's rows against the peers, TRL's sppo_hard step and llm-blender's PairRM, in one run.

    make bench              # builds .venv-trl and .venv-blender (their own pins), then bench.py with both peers
    python -m bench.bench --only peers --trl-python .venv-trl/bin/python --blender-python .venv-blender/bin/python

Each peer runs under its own interpreter (peer_runner.py, a subprocess that imports only the peer library, torch and
transformers; llm-blender needs transformers 4), driven line by line so that our timed blocks and the peer's
alternate (workloads.interleaved's rule). Both sides get identical inputs and weights, and every row checks that their
outputs agree before it reports a speed: per-pair losses (TRL) or scores and P (llm-blender), with stated tolerances.
Nothing here imports a peer: trl and llm-blender are never runtime dependencies (docs/benchmarks.md, "Against the
peers").
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import pairrm
import policy
import runs
import sppo
import training
from bench.workloads import (MODEL_SIZES, build_sized_policy, equal_lengths, interleaved, length_mix, mix_rows,
                             of_limit, pairrm_inputs, pairrm_work, rate)


# ----------------------------------------------------------------------------------------------------------------
# The peer, under its own interpreter, and the agreement check.
class Peer:
    """peer_runner.py under a peer's interpreter, driven line by line: read() waits for its next `@peer` answer,
    go() asks for one timed block and returns its answer. Its stderr goes to WORK/peer.log."""

    def __init__(self, python, kind, work, settings):
        (work / "peer.json").write_text(json.dumps(settings))
        env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]), "TQDM_DISABLE": "1",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf"),
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONNOUSERSITE": "1"}
        self.log = work / "peer.log"
        runner = str(Path(__file__).with_name("peer_runner.py"))
        self.p = subprocess.Popen([os.path.abspath(python), runner, kind, str(work)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                  text=True, env=env, cwd=work)

    def read(self):
        for line in self.p.stdout:
            if line.startswith("@peer "):
                return json.loads(line[6:])
        self.p.wait()
        raise RuntimeError(f"peer_runner.py stopped (exit {self.p.returncode}); its log, {self.log}:\n"
                           + self.log.read_text()[-3000:])

    def go(self):
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=120)


def check(what, diff, tol, detail=""):
    """An agreement check of a peer row: its line (printed by the caller), or AssertionError when it does not hold."""
    line = f"{what}: max |diff| {diff:.2e} (tolerance {tol:.0e}){detail}"
    if not diff <= tol:
        raise AssertionError(f"FAILED {line}")
    return line


def fp64_logps(model, pairs):
    """log pi(y|x) of each (prompt_ids, response_ids) row, one row at a time, in float64 on a float64 copy of the
    model: the independent reference that says how much of the two fp32 paths' difference is rounding."""
    m = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for p, r in pairs:
            logits = m(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1]          # (len(r), V): predicts r
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).sum().item())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training: our sppo_hard step vs TRL's DPOTrainer(loss_type="sppo_hard").
def bench_train_peer(python, size, mix, micro_batch=4, repeats=3, beta=0.1, lr=1e-6, tol=2e-3, name="rows"):
    """Our SPPO step with --loss sppo_hard (training.train_policy: training.example_losses through one optimizer step) vs
    TRL 1.16 DPOTrainer(loss_type="sppo_hard"), on the same tiny Llama (MODEL_SIZES[size]), the same token rows and
    the same micro-batches in the same order (TRL: train_sampling_strategy="sequential" over our schedule), fp32 on
    both sides: DPOConfig's defaults (bf16 autocast, gradient checkpointing, fused AdamW) turned off, RMSprop at the
    same lr, grad-norm clip 1. Reference log-probs are precomputed once, here, by a second random Llama (so the
    log-ratios are not 0), and both sides train on those numbers (TRL: precompute_ref_log_probs with the columns
    given). Every step takes all pairs (global batch = len(mix)); step 0 is the warm-up. The steps interleave:
    train_policy's on_step hands over to one TRL step. Real (non-pad) tokens/s for both.
    Agreement: each pair's loss at the first weights, ours at eta = 1/beta vs TRL's (the same square loss, Sec. 4.5),
    relative difference <= tol; each is also compared with the loss from fp64_logps (what fp32 rounding over rows of
    up to ~2,100 tokens costs each side). And TRL's own reference log-probs (compute_ref_log_probs) vs ours."""
    if len(mix) % micro_batch:                # TRL's dataloader would cut micro-batches across our steps otherwise
        raise ValueError(f"bench_train_peer: {len(mix)} pairs do not split into micro-batches of {micro_batch}")
    work = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    policy_dir, ref_dir = build_sized_policy(work / "policy", size, seed=0), build_sized_policy(work / "ref", size, 1)
    n = len(mix)
    cfg = sppo.SPPOConfig(loss="sppo_hard", eta=1 / beta, optimizer="rmsprop", lr=lr, warmup_ratio=0.0,
                          global_batch=n, micro_batch=micro_batch, epochs=repeats + 1, max_length=4096,
                          max_prompt_length=4096, progress=False)
    model, tok = runs.load_policy(policy_dir, cfg, "cpu")
    ref_model, _ = runs.load_policy(ref_dir, cfg, "cpu")
    pad, rows = policy.pad_id(tok), mix_rows(mix, tok, win_prob=(1.0, 0.0))      # ref_logp: set below
    pairs = training.encode_rows(tok, rows, cfg)[0]                   # (chat-templated prompt ids, response ids) per row
    for r, lp in zip(rows, policy.batched_logps(ref_model, pairs, pad, batch_size=2 * micro_batch)):
        r["ref_logp"] = lp
    steps = training.train_schedule(rows, cfg)[0]                     # row indices of each step: winner, loser, ...
    order = [j // 2 for step in steps for j in step[0::2]]        # pair index of TRL's rows, step after step
    runs.write_jsonl(work / "rows.jsonl", [
        {"prompt_ids": pairs[2 * i][0], "chosen_ids": pairs[2 * i][1], "rejected_ids": pairs[2 * i + 1][1],
         "ref_chosen_logps": rows[2 * i]["ref_logp"], "ref_rejected_logps": rows[2 * i + 1]["ref_logp"]}
        for i in order])
    peer = Peer(python, "trl", work, dict(rows="rows.jsonl", model=policy_dir, ref_model=ref_dir, beta=beta, lr=lr,
                                          optimizer="rmsprop", micro_batch=micro_batch,
                                          accumulation=-(-n // micro_batch), steps=len(steps), pairs=n, threads=1,
                                          attn_implementation=model.config._attn_implementation))
    first = order[:n]                                              # the pairs of step 0, in TRL's row order
    with torch.no_grad():                                          # our loss of each pair, first weights
        ours = [float(training.example_losses(model, training.make_batch(pairs, rows, [2 * i, 2 * i + 1], pad, cfg, "cpu"),
                                          cfg)[0]) for i in first]
    lp64 = fp64_logps(model, [pairs[j] for i in first for j in (2 * i, 2 * i + 1)])
    exact = [(lp64[2 * k] - rows[2 * i]["ref_logp"] - cfg.eta / 2) ** 2 +              # Sec. 4.5, P = 1, in fp64
             (lp64[2 * k + 1] - rows[2 * i + 1]["ref_logp"] + cfg.eta / 2) ** 2 for k, i in enumerate(first)]
    theirs = peer.read()
    rel = lambda a, b: max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))       # noqa: E731
    ref_diff = max(abs(rows[2 * i + k]["ref_logp"] - theirs[key][j]) for j, i in enumerate(first)
                   for k, key in enumerate(("ref_chosen", "ref_rejected")))
    tokens = sum(len(p) + len(r) for p, r in pairs)                # real tokens of one step (all pairs)
    micro = [s[j:j + 2 * micro_batch] for s in steps[1:] for j in range(0, len(s), 2 * micro_batch)]
    padded = sum(len(b) * max(len(pairs[i][0]) + len(pairs[i][1]) for i in b) for b in micro)   # rows x longest
    times = {"ours": [], "trl": []}

    def hand_over(h):                                              # after each of our steps, one TRL step
        times["ours"].append(tokens / h["tokens_per_s"])
        times["trl"].append(peer.go()["seconds"])
    training.train_policy(model, tok, rows, cfg, "cpu", on_step=hand_over)
    peer.close()
    shutil.rmtree(work)                                            # kept, with peer.log, when anything above failed
    shape = f"hidden {MODEL_SIZES[size]['hidden_size']} x {MODEL_SIZES[size]['num_hidden_layers']}"
    pad_share = 1 - tokens * len(steps[1:]) / padded               # of the padded micro-batches of the timed steps
    setting = (f"{name}: {n} pairs, {tokens:,} real tokens a step ({pad_share:.0%} of the padded batches is pad); "
               f"tiny Llama {shape}, micro-batch {micro_batch} pairs, RMSprop; TRL with "
               + ", ".join(f"{k}={v}" for k, v in theirs["settings"].items()))
    loss_diff = rel(ours, theirs["losses"])
    print(f"agreement, TRL {name}, {shape}: "
          + check("per-pair loss ours vs TRL (relative)", loss_diff, tol,
                  f"; vs fp64 one row at a time: ours {rel(ours, exact):.1e}, TRL {rel(theirs['losses'], exact):.1e}")
          + "; " + check("TRL's reference log-probs vs ours (nats)", ref_diff, 1e-2), flush=True)
    return {"setting": setting, "fast": rate(tokens, times["ours"][1:]), "slow": rate(tokens, times["trl"][1:]),
            "unit": "tokens/s", "max_abs_diff": loss_diff}


# ----------------------------------------------------------------------------------------------------------------
# PairRM: pairrm.preference_matrices vs llm-blender's Blender.rank (uclaml/SPPO's scripts/rank.py).
PEER_PAIRRM = {"h64": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                           initializer_range=0.5),
               "h256": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                            initializer_range=0.1),
               "real": dict({k: pairrm.DEBERTA_V3_LARGE[k] for k in ("hidden_size", "num_hidden_layers",
                                                                     "num_attention_heads", "intermediate_size",
                                                                     "position_buckets")}, initializer_range=0.05)}
"""The PairRM peer row's random DeBERTa-v2 (pairrm.save_tiny_random_checkpoint), by --peer-pairrm: h64 (the
default, seconds a repetition: per-forward overheads weigh), h256 (closer to compute-bound) or real (the shape of
PairRM's DeBERTa-v3-large backbone: hidden 1024 x 24 layers, 16 heads, MLP 4096, 256 position buckets; ~3 s a pair
on one thread). Inits wide enough that scores are O(0.1-1) and the agreement checks are not met by near-zero
outputs, and no wider (fp32 rounding grows with the weights: P at init 0.5 and hidden 256 was 2.5e-4 off)."""
PEER_WORDS = {"h64": (40, 80), "h256": (40, 80), "real": (100, 190)}
"""pairrm_inputs' (prompt_words, response_words) by shape: rows of 55-198 tokens (mean 127 at 32 prompts); real: 78-437
tokens, mean 250 at 32 prompts (204 at 2), the ~250-token rows of PairRM's real setting."""


def blender_checkpoint(out_dir, shape="h64", seed=0):
    """PairRM's random checkpoint (pairrm.save_tiny_random_checkpoint, layout "PairRM", PEER_PAIRRM) completed into
    the layout llm-blender 0.0.2 loads from a local folder: its config.json's model_name names the backbone folder by
    absolute path, and that folder holds what AutoModel/AutoTokenizer.from_pretrained read there (the backbone's
    weights, without the `pretrained_model.` prefix, and the tokenizer files). Returns out_dir."""
    from safetensors.torch import load_file, save_file
    out = Path(pairrm.save_tiny_random_checkpoint(out_dir, layout="PairRM", seed=seed, **PEER_PAIRRM[shape]))
    backbone = out / "backbone"
    weights = load_file(str(out / "model.safetensors"))
    save_file({k.removeprefix("pretrained_model."): v for k, v in weights.items() if k.startswith("pretrained_model.")},
              str(backbone / "model.safetensors"), metadata={"format": "pt"})
    for f in out.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, backbone / f.name)
    ranker = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**ranker, "model_name": str(backbone.resolve())}, indent=2))
    return str(out)


def bench_pairrm_peer(python, prompts=32, k=5, shape="h64", repeats=3, tol_scores=5e-4, tol_p=1e-4):
    """pairrm's preference matrices (mode "official": P = sigma(s_i - s_j), the released pipeline's) vs llm-blender
    0.0.2 as uclaml/SPPO's scripts/rank.py calls it (Blender.rank(prompts, candidates, return_scores=True,
    batch_size=1), fp32 on CPU) followed by scripts/compute_prob.py's P, on the same random checkpoint
    (blender_checkpoint, PEER_PAIRRM[shape]) and the same texts (pairrm_inputs). Agreement: the scores within
    tol_scores, P within tol_p. Pairs/s counts the K(K-1) ordered pairs of every prompt (both paths run all of them)."""
    work = Path(tempfile.mkdtemp(prefix="bench_blender_"))
    ckpt = blender_checkpoint(work / "pairrm", shape)
    words = PEER_WORDS[shape]
    xs, ys = pairrm_inputs(prompts, k, seed=0, prompt_words=words[0], response_words=words[1])
    (work / "texts.json").write_text(json.dumps({"prompts": xs, "candidates": ys}))
    peer = Peer(python, "blender", work, dict(checkpoint=ckpt, texts="texts.json", batch_size=1, threads=1))
    model = pairrm.PairRM.from_pretrained(ckpt, device="cpu")
    peer.read()                                                    # loaded
    out, theirs = {}, []

    def ours():                                                    # preference_matrices, keeping its logits
        out["M"] = model.logit_matrices(xs, ys)
        out["P"] = pairrm.preference_from_logits(out["M"], "official")
    t = interleaved({"ours": ours, "blender": lambda: theirs.append(peer.go())}, repeats)
    peer.close()
    shutil.rmtree(work)                                            # kept, with peer.log, when anything above failed
    scores = pairrm.scores_from_logits(out["M"])                   # (N, K), from the timed pass: no extra one
    s_diff = (scores - torch.tensor(theirs[0]["scores"])).abs().max().item()
    p_diff = (out["P"].double() - torch.tensor(theirs[0]["P"])).abs().max().item()
    print("agreement, PairRM vs llm-blender: "
          + check("scores", s_diff, tol_scores, f" (scores up to {scores.abs().max():.2f})")
          + "; " + check("P = sigma(s_i - s_j)", p_diff, tol_p), flush=True)
    pairs, blender_t = prompts * k * (k - 1), [r["seconds"] for r in theirs[1:]]
    flops, attention, lengths, limit = pairrm_work(model, xs, ys)
    return {"setting": f"{prompts} prompts x K={k} ({pairs} pairs, rows of {min(lengths)}-{max(lengths)} tokens, mean "
                       f"{sum(lengths) / len(lengths):.0f}), random DeBERTa-v2 hidden "
                       f"{PEER_PAIRRM[shape]['hidden_size']} x {PEER_PAIRRM[shape]['num_hidden_layers']}, fp32; "
                       "llm-blender rank(batch_size=1) on transformers 4.44.2; ours "
                       f"{of_limit(flops, t['ours'], limit)}, llm-blender's {of_limit(flops, blender_t, limit)} "
                       f"({limit / 1e9:.1f} GFLOP/s: forward matmuls at the layer's shapes; attention {attention:.0%} "
                       "of the FLOPs)",
            "fast": rate(pairs, t["ours"]), "slow": rate(pairs, blender_t), "unit": "pairs/s", "max_abs_diff": p_diff}


# ----------------------------------------------------------------------------------------------------------------
# The rows the given interpreters allow.
def peer_rows(cfg):
    """The peer rows that cfg's interpreters allow (--trl-python, --blender-python)."""
    rows = []
    if cfg.trl_python:
        for size in ("h256", "h512"):
            rows.append(("SPPO sppo_hard step vs TRL DPOTrainer, equal lengths",
                         bench_train_peer(cfg.trl_python, size, equal_lengths(8, seed=0), name="equal lengths")))
        for size in ("h256", "h512"):
            rows.append(("SPPO sppo_hard step vs TRL DPOTrainer, realistic length mix",
                         bench_train_peer(cfg.trl_python, size, length_mix(8, seed=0), name="length_mix(8, 0)")))
    if cfg.blender_python:
        rows.append(("PairRM preference_matrices vs llm-blender rank",
                     bench_pairrm_peer(cfg.blender_python, prompts=cfg.prompts, k=cfg.k, shape=cfg.peer_pairrm)))
    return rows
