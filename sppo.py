"""SPPO: the objective of Eq. (4.7) and the self-play loop of Algorithm 1, on one process.

Wu, Sun, Yuan, Ji, Yang, Gu, "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675.
Equation numbers below are the paper's.

    python sppo.py --model DIR --prompts P.jsonl --oracle pairrm --pairrm DIR_PAIRRM --out runs/x
    python sppo.py --help            # every setting with its default and allowed values
    python sppo_toy.py               # the demo: a tiny Llama learns a von Neumann winner (~1 min CPU)

Conventions (stated once, used everywhere in this repository):
  * log pi(y|x) is SUMMED over the response tokens of y (the sampled ids, and the sampled stop token when the
    response ended); prompt and padding never count. `logp - ref_logp` is therefore log pi(y|x)/pi_t(y|x) in nats.
  * eta is the Hedge step of Eq. (4.1); beta = 1/eta is the KL weight of DPO/IPO/KTO. The paper's LM runs use
    eta = 1000 (Sec. 5.1 prints "eta = 1e-3", a step App. A calls large: it is beta): targets eta (P - 1/2) reach
    +-400 nats, a starting loss near 1e5 is expected.
  * P is a K x K preference matrix over K responses to one prompt: P[i, j] = P(y_i > y_j | x), P + P^T = 1,
    diagonal 1/2 (validated by hedge_toy.validate_preference).

In the paper's order: win rates, the kept pair, log Z (Eq. 4.5, Sec. 4.2, 5.1) -> the oracle (Oracle, ORACLES) and
rank -> D_t (with the columns SPPO's successors read) -> training (Eq. 4.7 or any --loss; with --lora-rank on LoRA
adapters merged after each iteration) -> the four steps -> run_iteration, which reads as Algorithm 1 -> run() and
the CLI. Around it, one file each: the losses (Sec. 4) and their table LOSSES, with SPPO's successors, are
losses.py; every setting and its rules are sppo_config.py (parsed and checked by cli.py); pi as a causal LM (chat
template, truncation, padding, sampling, log pi(y|x)) is policy.py; the run directory, its records (one reader and
writer per artifact), manifests and the stage runner that makes each step resumable are runs.py; the demo's tiny-LM
world is sppo_toy.py; win rates between policies are arena.py.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import cli
import committee
import experiments
import hedge_toy
import losses
import pairrm
import policy
import runs
from cli import ArtifactError, ConfigError
from sppo_config import LOSSES, ORACLES, SPPOConfig, validate_config   # sppo.SPPOConfig: this file's settings
from training import add_adapters, check_lora_targets, encode_rows, merge_adapters, train_policy   # step 4


# ----------------------------------------------------------------------------------------------------------------
# Win rates, the kept pair and log Z (Eq. 4.5, Sec. 4.2, 5.1).
def win_rates(P):
    """P-hat(y_i > pi_t | x) = (1/K) sum_k P[i, k], the self-term 1/2 included (Sec. 5.1, Eq. 4.5).

    P: (..., K, K) array or tensor, validated by hedge_toy.validate_preference. Returns (..., K), same type.
    """
    hedge_toy.validate_preference(P.detach().cpu().numpy() if torch.is_tensor(P) else P)
    return P.mean(-1) if torch.is_tensor(P) else np.asarray(P, dtype=np.float64).mean(-1)


def select_pair(scores):
    """Winner = argmax, loser = argmin of scores (..., K) (Sec. 5.1). Returns two int arrays of shape (...).

    w == l marks a prompt with NO pair: every score is equal (all K responses tie), so argmax = argmin = 0. (uclaml/
    SPPO's compute_prob.py takes these same indices, so its chosen and rejected are then one response, a pair with
    margin 0 by construction.) A tie is no preference, and DPO, IPO, sppo_hard and KTO on two distinct rows would
    train on it as one: kept_rows keeps no row for such a prompt. Exactly equal scores only: any difference, however
    small, gives a pair.
    """
    s = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, dtype=np.float64)
    if s.shape[-1] < 2:
        raise ValueError(f"select_pair needs at least 2 responses per prompt, got K = {s.shape[-1]}")
    return s.argmax(-1), s.argmin(-1)                  # equal exactly when max = min: first max, first min


def selection_scores(P, logits=None):
    """What the winner and loser are chosen on (Sec. 5.1): the oracle's own score when it gives one, else the win rate.

    With PairRM's logit matrix M (K, K): s_PairRM(y_i; x) = (1/K) sum_k s(y_i, y_k; x), the mean logit
    (pairrm.scores_from_logits), whose argmax / argmin uclaml/SPPO's scripts/compute_prob.py keeps. Without one (a
    game oracle gives P only): P-hat(y_i > pi_t) = win_rates(P). PairRM's `official` P = sigma(s_i - s_j) orders the
    responses as s does; its `pairwise` P can order them otherwise (sigma is not linear). Returns (..., K).
    """
    if logits is None:
        return win_rates(P)
    return pairrm.scores_from_logits(torch.as_tensor(np.asarray(logits), dtype=torch.float64)).numpy()


def kept_rows(P, cfg, logits=None):
    """The rows D_t keeps for one prompt, [(k, role, P-hat)], and the log Z estimate (Eq. 4.5) of the same responses.

    selection='all': every response (Eq. 4.4). 'pair': winner and loser by selection_scores (Sec. 5.1), and no row
    at all when every score ties (select_pair's w == l): a prompt then gives 0 or 2 rows.
    estimate_from='all': P-hat(y_k > pi_t) = (1/K) sum_j P[k, j] over the K responses (Eq. 4.5, self-term 1/2
    included). 'pair' (Sec. 5.3's K = 2: 5 samples, PairRM's pair kept, P-hat from the pair alone):
    P-hat(y_w) = [P(y_w > y_w) + P(y_w > y_l)]/2 = 1/4 + P(y_w > y_l)/2 - the paper prints "1/2 + P/2", an
    arithmetic slip - and 1/4 + P(y_l > y_w)/2 for the loser.
    """
    P, wp = np.asarray(P, dtype=np.float64), win_rates(P)                               # (K, K), (K,) Eq. (4.5)
    if cfg.selection == "all":
        return [(k, "all", float(wp[k])) for k in range(len(wp))], float(log_z_estimate(wp, cfg.eta))
    w, l = (int(i) for i in select_pair(selection_scores(P, logits)))
    if w == l:                                                                            # all tied: no pair
        return [], float(log_z_estimate(wp, cfg.eta))
    if cfg.estimate_from == "pair":
        wp = np.zeros(len(wp))
        wp[[w, l]] = win_rates(P[np.ix_([w, l], [w, l])])                                 # Sec. 5.3, K = 2
        return [(w, "winner", float(wp[w])), (l, "loser", float(wp[l]))], float(log_z_estimate(wp[[w, l]], cfg.eta))
    return [(w, "winner", float(wp[w])), (l, "loser", float(wp[l]))], float(log_z_estimate(wp, cfg.eta))


def log_z_estimate(win_prob, eta):
    """Eq. (4.5): log Z_{pi_t}(x) ~ log (1/K) sum_k exp(eta P-hat(y_k > pi_t|x)), from the K samples.
    (..., K) -> (...)."""
    wp = torch.as_tensor(win_prob, dtype=torch.float64)
    return torch.logsumexp(eta * wp, dim=-1) - math.log(wp.shape[-1])




# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 2: the preference oracle, one interface (Oracle) and one table of the ones the CLI builds.
class Oracle(Protocol):
    """Step 2's oracle: oracle(x, [y_1..y_K]) -> P (K, K), P[i, j] = P(y_i > y_j | x), P + P^T = 1.

    identity() is what the run manifest records of it, and must change whenever its preferences would (a hash of
    its games, its judges, its checkpoint): a run resumed with another oracle is then refused, not silently fed
    stale preferences. Optional: batch(prompts, candidates) -> [P]; batch_with_logits(...) -> ([P], [logits]);
    reads_finished = True (batch then gets each response's stop flag, `finished=`)."""

    def __call__(self, prompt: str, responses: list[str]) -> np.ndarray: ...

    def identity(self) -> object: ...


def make_pairrm(cfg, device, hashes):
    """PairRM from a local checkpoint (the paper's oracle); its identity: the checkpoint's hash and the mode."""
    if not cfg.pairrm:
        raise ConfigError("--oracle pairrm needs --pairrm DIR (a local PairRM checkpoint)")
    return pairrm.PairRMOracle(pairrm.PairRM.from_pretrained(cfg.pairrm, device=device), mode=cfg.pairrm_mode,
                               progress=cfg.progress, checkpoint_id=hashes(cfg.pairrm))


def make_committee(cfg, device, hashes):
    """The committee of rule judges (committee.py): real text without PairRM weights."""
    return committee.CommitteeOracle(cfg.judges)


def needs_an_object(cfg, device, hashes):
    raise ConfigError(f"--oracle {cfg.oracle}: the game oracle is sppo_toy.GameOracle, passed to sppo.run(cfg, "
                      f"oracle=...); run sppo_toy.py")


ORACLES.update({                 # --oracle NAME -> make(cfg, device, hashes) -> Oracle
    "pairrm": make_pairrm,
    "committee": make_committee,
    "game": needs_an_object,
})


def oracle_prompts(prompts, cfg, model_dir):
    """x as the oracle reads it. --oracle-prompt raw: the prompt text. templated: pi_t's chat_prompt, as the
    authors' scripts/rank.py gives PairRM (they render [user x, assistant "None"] and cut at "None", which for the
    Mistral, Llama-3 and Gemma-2 templates is this text, except that a prompt containing "None" is cut there too)."""
    if cfg.oracle_prompt == "raw":
        return list(prompts)
    tokenizer = AutoTokenizer.from_pretrained(runs.checkpoint_dir(model_dir))                    # pi_0 may be a GGUF
    return [policy.chat_prompt(tokenizer, x) for x in prompts]


def rank(oracle, prompts, generations, progress=False):
    """Fill one K x K matrix per prompt. Returns (matrices, logits): logits are the oracle's K x K logit matrices
    when it gives them (`batch_with_logits`, PairRM: the selection score of Sec. 5.1 needs them), else None. Uses the
    oracle's batched `batch(prompts, candidates)` when it has one; an oracle with `reads_finished` (committee.py)
    also gets each response's EOS flag."""
    cands, logits = [g["responses"] for g in generations], None
    if getattr(oracle, "reads_finished", False) and not all("finished" in g for g in generations):
        raise ValueError(f"{type(oracle).__name__} reads each response's stop flag: give every record 'finished'")
    kw = {"finished": [g["finished"] for g in generations]} if getattr(oracle, "reads_finished", False) else {}
    if hasattr(oracle, "batch_with_logits"):
        mats, M = oracle.batch_with_logits(prompts, cands)
        mats, logits = [np.asarray(m, dtype=np.float64) for m in mats], [np.asarray(m, dtype=np.float64) for m in M]
    elif hasattr(oracle, "batch"):
        mats = [np.asarray(m, dtype=np.float64) for m in oracle.batch(prompts, cands, **kw)]
    else:
        mats = [np.asarray(oracle(x, ys), dtype=np.float64)
                for x, ys in tqdm(list(zip(prompts, cands)), desc="rank", disable=not progress, leave=False)]
    for i, m in enumerate(mats):
        try:
            hedge_toy.validate_preference(m)
        except ValueError as e:
            raise ValueError(f"oracle returned an invalid preference matrix for prompt {i}: {e}") from None
    return mats, logits


def answers(model, tokenizer, prompts, cfg, device="cpu"):
    """One sample per prompt (K = 1) under policy.sample_seed(cfg.seed, 0, .): every policy judged against another is
    sampled under the same seeds. The responses arena.py and the held-out win rates compare. Returns (texts,
    finished, lengths): the responses, whether each ended with a stop token (committee.py's judges read it) and its
    length in sampled tokens, stop token excluded (the length-controlled win rate's)."""
    gens = policy.generate_responses(model, tokenizer, prompts, dataclasses.replace(cfg, K=1), 0, device)
    return ([g["responses"][0] for g in gens], [g["finished"][0] for g in gens],
            [len(g["token_ids"][0]) for g in gens])


def win_rate(oracle, prompts, responses_a, responses_b, finished_a=None, finished_b=None, per_prompt=False):
    """P(pi_a > pi_b) on held-out prompts (Sec. 3, Fig. 3): the mean over prompts of the oracle's P(y_a > y_b | x),
    one response of each policy per prompt, and its standard error over prompts. finished_a/b: each response's stop
    flag, for an oracle that reads it (committee.py). Returns (win rate, s.e.), and with per_prompt also the (N,)
    P(y_a > y_b | x_n) (experiments.lc_win_rate's labels)."""
    pairs = [{"responses": [a, b]} for a, b in zip(responses_a, responses_b)]
    if finished_a is not None and finished_b is not None:
        for g, fa, fb in zip(pairs, finished_a, finished_b):
            g["finished"] = [fa, fb]
    mats, _ = rank(oracle, prompts, pairs)
    p = np.array([m[0, 1] for m in mats])                                                # (N,)
    w, se = float(p.mean()), float(p.std(ddof=1) / math.sqrt(len(p))) if len(p) > 1 else float("nan")
    return (w, se, p) if per_prompt else (w, se)


def held_out_rates(oracle, prompts, new, old):
    """--eval-prompts: pi_{t+1}'s answers `new` against another policy's `old` (answers' triples): the raw win rate
    (win_rate) and, as AlpacaEval 2.0 reports it, the length-controlled one (experiments.lc_win_rate, lengths in
    tokens), each as a probability with its s.e. Returns {"win_rate", "se", "lc_win_rate", "lc_se"} (LC None, with
    "lc_why", where the fit has no finite solution)."""
    w, se, p = win_rate(oracle, prompts, new[0], old[0], new[1], old[1], per_prompt=True)
    out = {"win_rate": w, "se": se}
    try:
        lc, lc_se = experiments.lc_win_rate(p, new[2], old[2])
        out.update(lc_win_rate=lc / 100, lc_se=lc_se / 100)
    except ValueError as e:
        out.update(lc_win_rate=None, lc_se=None, lc_why=str(e))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 3: D_t = {(x, y, P-hat(y > pi_t | x))} with the kept rows (Sec. 4.2 / 5.1).
def build_dataset(prompts, generations, matrices, cfg, logits=None, where="preferences.jsonl"):
    """One row per kept response (kept_rows), with the sampled token ids and stop id of its generation; no ref_logp
    yet (it needs pi_t: `reference_logps`). logits: the oracle's K x K logit matrix per prompt, or None.

    With --selection pair a prompt whose K responses all tie gives no row. When no prompt gives one, there is nothing
    to train on: an ArtifactError naming `where` (the preferences file), rather than an iteration that trains nothing
    and still hands on a pi_{t+1}: every response tied on every prompt means the oracle told nothing apart (identical
    samples, a blind judge), which the user should see, not a copy of pi_t."""
    rows = []
    for i, (x, g, P) in enumerate(zip(prompts, generations, matrices)):
        keep, lz = kept_rows(P, cfg, None if logits is None else logits[i])
        rows += [{"prompt_id": i, "prompt": x, "response": g["responses"][k], "finished": g["finished"][k],
                  "response_ids": g["token_ids"][k], "stop_id": g["stop_ids"][k], "win_prob": wp, "log_z": lz,
                  "role": role, "k": k} for k, role, wp in keep]
        if cfg.selection == "pair" and keep:                     # P(this row > the other kept row | x), Eq. (4.12)
            (w, *_), (l, *_) = keep
            rows[-2]["pair_prob"], rows[-1]["pair_prob"] = float(P[w][l]), float(P[l][w])
    if not rows:
        raise ArtifactError(f"{where}: the K = {cfg.K} responses of every one of the {len(matrices)} prompts tie, so "
                            f"--selection pair keeps no (winner, loser) pair to train on; use --selection all (a tie "
                            f"then has target 0) or more varied samples (--K, --temperature, --max-new-tokens)")
    return rows


def row_logps(model, tokenizer, rows, cfg, device="cpu", what="reference log-probs"):
    """log pi(y|x) of every row under `model` (summed over the response tokens, truncated as training sees them)."""
    pairs, _ = encode_rows(tokenizer, rows, cfg, complete=False)
    return policy.batched_logps(model, pairs, policy.pad_id(tokenizer), cfg.micro_batch, device, cfg.progress, what)


def reference_logps(model, tokenizer, rows, cfg, device="cpu", model_id=None):
    """ref_logp = log pi_t(y|x) of every row, by pi_t itself (pi_ref = pi_t: no second model is held), and ref_by:
    how (pi_t's hash `model_id`, the weights' dtype, the truncation), so that train_7b.py recomputes them when its
    policy differs (e.g. bf16 there against fp32 here: the initial log-ratio would not be 0)."""
    lps = row_logps(model, tokenizer, rows, cfg, device)
    return [dict(row, ref_logp=lp, ref_by=ref_by(cfg, model_id, cfg.dtype)) for row, lp in zip(rows, lps)]


def add_successor_columns(rows, mats, logps, cfg):
    """D_t's columns of a successor loss (losses.py), in place: mu_logp = log mu(y|x) when it reads the reference /
    magnet, and each prompt's ESTIMATED win rates (losses.successor_columns) from its K x K matrix and its K rows'
    log-probs (--selection all: row k of a prompt is its sample k). logps: {model name: [log-prob per row]}, with
    'ref' = log pi_t. Returns rows."""
    if "mu" in logps:
        for row, lp in zip(rows, logps["mu"]):
            row["mu_logp"] = lp
    if set(LOSSES[cfg.loss].columns) & losses.ESTIMATED:
        by_prompt = {}
        for n, r in enumerate(rows):
            by_prompt.setdefault(r["prompt_id"], []).append(n)
        for i, idx in by_prompt.items():
            cols = losses.successor_columns(cfg.loss, mats[i], {m: np.array([v[n] for n in idx]) for m, v in
                                                                 logps.items()}, cfg)
            for name, values in cols.items():
                for n, v in zip(idx, values):
                    rows[n][name] = float(v)
    return rows


def ref_by(cfg, model_id, dtype):
    """What a reference log-prob depends on besides the row: pi_t (its hash), the compute dtype, the truncation."""
    return {"model": model_id, "dtype": dtype, "truncation": cfg.truncation, "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length}


def check_dataset_sources(rows, gens, mats, cfg, path, logits=None):
    """D_t against its sources: prompt by prompt, in order, the rows kept_rows keeps (K, 2, or 0 for a prompt whose
    responses all tie under --selection pair), each carrying that generation's text and token ids and its P-hat (and
    pair_prob, P(this row > the other kept row), when it has one) from that prompt's matrix."""
    want = []                                                         # (prompt, k, P-hat, the other kept k or None)
    for i, P in enumerate(mats):
        keep = kept_rows(P, cfg, None if logits is None else logits[i])[0]
        others = [k for k, _, _ in keep][::-1] if cfg.selection == "pair" else [None] * len(keep)
        want += [(i, k, p, o) for (k, _, p), o in zip(keep, others)]
    if len(rows) != len(want):
        raise ArtifactError(f"{path}: {len(rows)} rows for {len(gens)} prompts whose preferences keep {len(want)}: "
                            f"--restart-from dataset")
    for n, (r, (i, k, p, o)) in enumerate(zip(rows, want)):
        pair_ok = "pair_prob" not in r or (o is not None and abs(r["pair_prob"] - mats[i][k][o]) < 1e-9)
        if not (r["prompt_id"] == i and r.get("k") == k and r["response"] == gens[i]["responses"][k] and pair_ok
                and r.get("response_ids") == gens[i]["token_ids"][k] and abs(r["win_prob"] - p) < 1e-9):
            raise ArtifactError(f"{path}: record {n + 1}: not prompt {i}'s generation k={k} with its win rate "
                                f"from preferences.jsonl: --restart-from dataset")


# ----------------------------------------------------------------------------------------------------------------
# The four steps as run_iteration calls them: each takes the iteration (runs.Iteration: pi_t loaded on first use,
# the device, the prompts) and returns what its artifact holds; the stage runner saves, reloads and records it.
def generate(it):
    """Step 1: y_1..y_K ~ pi_t(.|x) for every prompt (policy.generate_responses, seeded by policy.sample_seed)."""
    return policy.generate_responses(*it.pi_t(), it.prompts, it.cfg, it.t, it.device)


def make_dataset(it, gens, mats, logits):
    """Step 3: D_t = the kept rows (build_dataset) with log pi_ref(y|x) of each, pi_ref = pi_t (or pi_0 with
    --reference initial), computed here once so that training holds no second model."""
    cfg = it.cfg
    ref_dir = cfg.model if cfg.reference == "initial" else it.model_dir                      # pi_ref: pi_0 or pi_t
    pi_ref = it.pi_t() if ref_dir == it.model_dir else runs.load_policy(ref_dir, cfg, it.device)
    rows = build_dataset(it.prompts, gens, mats, cfg, logits, it.path("preferences.jsonl"))
    rows = reference_logps(*pi_ref, rows, cfg, it.device, it.hashes(ref_dir))
    loss = LOSSES[cfg.loss]
    if not loss.models and not set(loss.columns) & losses.ESTIMATED:
        return rows
    logps = {"ref": [r["ref_logp"] for r in rows]}                    # successors: log mu, log pi_{t-1} (losses.py)
    for name, d in runs.loss_models(cfg, it.t, loss.models).items():
        same = Path(d).resolve() == Path(it.model_dir).resolve()
        logps[name] = logps["ref"] if same else row_logps(*runs.load_policy(d, cfg, it.device), rows, cfg, it.device,
                                                           f"log-probs under {name}")
    return add_successor_columns(rows, mats, logps, cfg)


def train(it, rows, gens, mats, oracle, held_out=None):
    """Step 4: pi_{t+1} = argmin of Eq. (4.7) (or --loss) on D_t from pi_t (train_policy). Returns (model, tokenizer,
    metrics); held_out: pi_{t+1} meets pi_t and pi_0 on these prompts (win_rate, Sec. 5.1) for metrics.json."""
    cfg, t = it.cfg, it.t
    model, tok = it.pi_t()
    if held_out:                                             # pi_0's and pi_t's answers, before pi_t is trained
        old = {"t": answers(model, tok, held_out, cfg, it.device)}
        old["0"] = old["t"] if t == 0 else answers(*runs.load_policy(cfg.model, cfg, it.device), held_out, cfg,
                                                   it.device)
    torch.manual_seed(cfg.seed + t)
    if cfg.lora_rank:                                        # fresh adapters on pi_t, their A seeded here
        model = add_adapters(model, cfg)
    history = train_policy(model, tok, rows, dataclasses.replace(cfg, seed=cfg.seed + t), it.device)
    if cfg.lora_rank:                                        # pi_{t+1} = pi_t + (alpha/r) B A: a full checkpoint
        model = merge_adapters(model)
    stats = {"iteration": t, "prompts": len(it.prompts), "rows": len(rows),
             "prompts_without_pair": len(it.prompts) - len({r["prompt_id"] for r in rows}),     # all K tied
             "unfinished": sum(not f for g in gens for f in g["finished"]),
             "mean_win_prob_kept": float(np.mean([r["win_prob"] for r in rows])),
             "prompts_with_cycle": sum(committee.has_cycle(P) for P in mats),              # Condorcet cycles in P
             "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "history": history}
    if held_out:                                             # Sec. 5.1: selection by win rate on held-out prompts
        xs, new = oracle_prompts(held_out, cfg, it.model_dir), answers(model, tok, held_out, cfg, it.device)
        rates = {s: held_out_rates(oracle, xs, new, old[s]) for s in "t0"}
        stats["held_out"] = {"prompts": len(held_out), **{f"{k}_vs_pi_{s}": v for s, r in rates.items()
                                                          for k, v in r.items()}}
        print(f"iter {t}: held-out win rate of pi_{t + 1} ({len(held_out)} prompts; +- 1 s.e.; raw | "
              f"length-controlled): " + ", ".join(f"vs pi_{t if s == 't' else 0} {r['win_rate']:.3f} +- {r['se']:.3f}"
              + (f" | {r['lc_win_rate']:.3f} +- {r['lc_se']:.3f}" if r["lc_win_rate"] is not None else " | n/a")
              for s, r in rates.items()))
    print(f"iter {t}: {len(rows)} rows, loss {stats['first_loss']:.4g} -> {stats['last_loss']:.4g}, "
          f"{stats['prompts_with_cycle']} of {len(it.prompts)} prompts' preferences contain a cycle"
          + (f", {stats['prompts_without_pair']} tie throughout (no pair)" if stats["prompts_without_pair"] else ""))
    return model, tok, stats


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1.
def run_iteration(cfg, t, prompts, model_dir, oracle, hashes, device, held_out=None):
    """One iteration of Algorithm 1: pi_t (model_dir) -> pi_{t+1}, the paper's four steps in order. Returns
    pi_{t+1}'s directory, OUT/iter{t}/model.

    Each step runs through it.step (runs.Iteration, the stage runner): it is skipped when OUT/iter{t}/manifest.json
    shows it finished with this run's settings and inputs, and either way its artifact comes back as read from disk
    (generations.jsonl, preferences.jsonl, dataset.jsonl, model/ + metrics.json). held_out: the --eval-prompts."""
    it = runs.Iteration(cfg, t, prompts, model_dir, oracle.identity(), hashes, device, LOSSES[cfg.loss])
    gens = it.step("generate", generate, it)                          # Step 1: y_1..y_K ~ pi_t(.|x)
    xs = oracle_prompts(prompts, cfg, model_dir)                      # x as the oracle reads it
    mats, logits = it.step("rank", rank, oracle, xs, gens, cfg.progress)        # Step 2: P(y_k > y_k' | x)
    rows = it.step("dataset", make_dataset, it, gens, mats, logits)   # Step 3: D_t, with log pi_ref(y|x) per row
    check_dataset_sources(rows, gens, mats, cfg, it.path("dataset.jsonl"), logits)
    return it.step("train", train, it, rows, gens, mats, oracle, held_out)      # Step 4: Eq. (4.7) -> pi_{t+1}


def run(cfg, oracle=None):
    """Algorithm 1: for t = 0..T-1, pi_{t+1} = SPPO-step(pi_t). Resumes from whatever OUT holds that matches; one
    run per OUT at a time (OUT/.lock). oracle: any Oracle (an object with identity()); default: ORACLES[cfg.oracle].
    Returns pi_T's directory, or None when --stop-after stopped the run."""
    validate_config(cfg)
    if cfg.model is None or cfg.prompts is None:
        raise ConfigError("a run needs --model DIR and --prompts FILE")
    check_lora_targets(cfg)
    if oracle is not None and not callable(getattr(oracle, "identity", None)):
        raise ConfigError(f"oracle {type(oracle).__name__} has no identity(): the run manifest must record what "
                          f"makes its preferences (sppo.Oracle); give it one")
    prompts = runs.load_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts or None]
    held_out = runs.load_prompts(cfg.eval_prompts, cfg.prompt_column) if cfg.eval_prompts else None
    if held_out is not None and len(held_out) < 2:
        raise ConfigError(f"--eval-prompts {cfg.eval_prompts}: {len(held_out)} prompt(s); a standard error needs >= 2")
    if len(prompts) < (cfg.iterations if cfg.split_prompts else 1):
        raise ConfigError(f"--prompts {cfg.prompts}: {len(prompts)} prompts for {cfg.iterations} disjoint iteration "
                          f"slices" + ("" if prompts else " (the file is empty)"))
    runs.lock_run_dir(cfg.out)                                          # the first write: OUT/.lock
    out, device = Path(cfg.out), runs.resolve_device(cfg.device)
    hashes = runs.Hashes(out)
    oracle = oracle or ORACLES[cfg.oracle](cfg, device, hashes)
    stale = runs.check_run(cfg, prompts, oracle.identity(), hashes, LOSSES[cfg.loss])
    if stale and cfg.restart_from is None:
        raise stale[1]
    if stale and runs.STAGES.index(cfg.restart_from) > runs.STAGES.index(stale[1].stage):
        raise ConfigError(f"--restart-from {cfg.restart_from} would keep {stale[1].path}, which is stale; restart "
                          f"from {stale[1].stage} or an earlier stage")
    if stale:
        runs.move_aside(out, stale[0], cfg.restart_from)
    elif cfg.restart_from:
        print(f"--restart-from {cfg.restart_from}: every finished stage matches this run; nothing moved")
    runs.write_json(out / "config.json", dataclasses.asdict(cfg))        # only once the artifacts are known to match
    model_dir = cfg.model
    try:
        for t in range(cfg.iterations):
            model_dir = run_iteration(cfg, t, runs.iteration_prompts(prompts, cfg, t), model_dir, oracle, hashes,
                                      device, held_out)
    except runs.Stopped as e:
        print(e)
        return None
    return model_dir


def main(argv=None):
    hf_logging.disable_progress_bar()                       # weight loading/saving bars: noise next to ours

    def go(cfg):
        final = run(cfg)
        if final is not None:
            print(f"pi_{cfg.iterations} saved in {final}")
        return 0
    return cli.main("sppo.py", SPPOConfig, go, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
