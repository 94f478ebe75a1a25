"""SPPO: the objective of Eq. (4.7) and the self-play loop of Algorithm 1, on one process.

Wu, Sun, Yuan, Ji, Yang, Gu, "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675.
Equation numbers below are the paper's.

    python sppo.py --model DIR --prompts P.jsonl --oracle pairrm --pairrm DIR_PAIRRM --out runs/x
    python sppo.py --help            # every setting with its default and allowed values
    python sppo_toy.py               # the demo: a tiny Llama learns a von Neumann winner (~1 min CPU)

Conventions (stated once, used everywhere in this repository):
  * log pi(y|x) is SUMMED over the response tokens of y (EOS included when the response ended); prompt and
    padding never count. `logp - ref_logp` is therefore log pi(y|x)/pi_t(y|x) in nats.
  * eta is the Hedge step of Eq. (4.1); beta = 1/eta is the KL weight of DPO/IPO/KTO. The paper's LM runs use
    eta = 1000 (its "beta = 1e-3"): targets eta (P - 1/2) reach +-400 nats, a starting loss near 1e5 is expected.
  * P is a K x K preference matrix over K responses to one prompt: P[i, j] = P(y_i > y_j | x), P + P^T = 1,
    diagonal 1/2 (validated by hedge_toy.validate_preference).

In the paper's order: config -> losses (Sec. 4) -> win rates, pair, log Z (Sec. 4.2, 5.1) -> log pi(y|x) -> records
(one reader and writer per artifact) -> Algorithm 1: generate, rank, dataset, train (Eq. 4.7) -> run directory -> CLI.
The demo's tiny-LM world is sppo_toy.py; win-rate matrices between policies (Fig. 3) are arena.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg

import committee
import hedge_toy
import pairrm


# ----------------------------------------------------------------------------------------------------------------
# Configuration: every knob of Algorithm 1, defaults from the paper (Sec. 5) and the authors' released code.
@dataclass
class SPPOConfig:
    model: str | None = HfArg(default=None, help="pi_0: a local directory (save_pretrained) or a .gguf file, converted "
                              "once to safetensors and cached (gguf_checkpoint).")
    prompts: str | None = HfArg(default=None, help="Prompts: JSONL with a `prompt` field per line, or parquet.")
    prompt_column: str = HfArg(default="prompt", help="Field / column that holds the prompt text.")
    max_prompts: int = HfArg(default=0, help="Use the first N prompts of the file (0: all), before the split.")
    out: str = HfArg(default="runs/sppo", help="Run directory; iteration t writes OUT/iter{t}/. Re-running resumes.")
    oracle: Literal["pairrm", "committee", "game"] = HfArg(default="pairrm", help="`pairrm` (the paper's), `committee` "
                                                           "(rule judges, committee.py) or `game` (sppo_toy).")
    judges: str = HfArg(default=committee.DEFAULT_JUDGES, help="--oracle committee: comma-separated judges, of "
                        f"{', '.join(committee.JUDGES)}.")
    pairrm: str | None = HfArg(default=None, help="Local PairRM checkpoint directory (either published layout).")
    pairrm_mode: Literal["pairwise", "official"] = HfArg(default="pairwise", help="P_ij = sigma(s(y_i, y_j)) as "
                                                         "in Sec. 5.1, or sigma(s_i - s_j) as the released code.")
    iterations: int = HfArg(default=3, help="Self-play iterations T (the paper runs 3).")
    split_prompts: bool = HfArg(default=True, help="A disjoint slice of the prompts per iteration (paper: 3 x 20k).")
    K: int = HfArg(default=5, help="Responses sampled per prompt (Sec. 5.1: K = 5; Sec. 5.3 ablates K = 2).")
    eta: float = HfArg(default=1000.0, help="Hedge step of Eq. (4.1); beta = 1/eta. The paper's runs: 1000.")
    log_z: Literal["half", "estimate"] = HfArg(default="half", help="log Z: eta/2 (Eq. 4.6, the paper's) or the "
                                               "K-sample estimate (Eq. 4.5).")
    selection: Literal["pair", "all"] = HfArg(default="pair", help="Rows of D_t per prompt: winner and loser (the "
                                              "paper's runs) or all K (Eq. 4.4).")
    max_new_tokens: int = HfArg(default=2048, help="Generation cap (released: 2048); capped = finished False.")
    temperature: float = HfArg(default=1.0, help="Sampling temperature (paper text 1.0; released code 0.7).")
    top_p: float = HfArg(default=1.0, help="Nucleus sampling (paper text 1.0; released code 0.9).")
    gen_batch: int = HfArg(default=8, help="Prompts per batched generate() call (each yields K sequences).")
    max_length: int = HfArg(default=1024, help="Prompt + response tokens kept for training (released code: 1024).")
    max_prompt_length: int = HfArg(default=512, help="Prompt tokens kept; longer prompts keep their END (512).")
    optimizer: Literal["rmsprop", "adamw"] = HfArg(default="rmsprop", help="RMSprop (the authors' code) or AdamW.")
    lr: float = HfArg(default=5e-7, help="Peak learning rate (paper: 5e-7).")
    warmup_ratio: float = HfArg(default=0.1, help="Fraction of steps of linear warm-up, then linear decay to 0.")
    weight_decay: float = HfArg(default=0.0, help="Weight decay (AdamW only).")
    max_grad_norm: float = HfArg(default=1.0, help="Gradient clipping threshold on the global L2 norm.")
    epochs: int = HfArg(default=1, help="Epochs over D_t per iteration (released scripts: 1).")
    global_batch: int = HfArg(default=64, help="Examples per optimizer step (paper: 64 = 8 per device x 8 GPUs).")
    micro_batch: int = HfArg(default=8, help="Examples per forward/backward; the rest is gradient accumulation.")
    seed: int = HfArg(default=42, help="Seed for prompt order, sampling and training order.")
    dtype: Literal["float32", "bfloat16", "float16"] = HfArg(default="float32", help="Weights dtype (log-probs "
                                                              "are accumulated in fp32 regardless).")
    device: str = HfArg(default="auto", help="`auto` = cuda when available, else cpu; or a torch device name.")
    stop_after: Literal["generate", "rank", "dataset", "train"] | None = HfArg(
        default=None, help="Stop after this stage of the first unfinished iteration (for debugging).")
    restart_from: Literal["generate", "rank", "dataset", "train"] | None = HfArg(
        default=None, help="Move the stale artifacts of the first iteration that does not match this run, from this "
        "stage on (and all later iterations), to OUT/stale/<time>/ and redo them. Nothing is deleted.")
    progress: bool = HfArg(default=True, help="Show progress bars.")


# ----------------------------------------------------------------------------------------------------------------
# The objective (Sec. 4). Every loss returns one value per example: no reduction.
def sppo_loss(logp, ref_logp, win_prob, eta, log_z=None):
    """Per-example square loss of SPPO.

    Eq. (4.6)/(4.7):  [log pi(y|x)/pi_t(y|x) - eta (P(y > pi_t|x) - 1/2)]^2           (log_z=None: log Z = eta/2)
    Eq. (4.4)/(4.5):  [log pi(y|x)/pi_t(y|x) - (eta P(y > pi_t|x) - log Z_{pi_t}(x))]^2   (log_z given)
    logp, ref_logp: summed log-probs under pi_theta and pi_t; win_prob: P-hat(y > pi_t | x); all shape (B,).
    """
    target = eta * (win_prob - 0.5) if log_z is None else eta * win_prob - log_z
    return (logp - ref_logp - target) ** 2


def sppo_pair_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, prob_w, eta, prob_l=None, form="paper"):
    """SPPO on one (winner, loser) pair per prompt.

    form="paper", Eq. (4.12): prob_w = P(y_w > y_l | x), and the loser's target uses P(y_w < y_l) = 1 - prob_w:
        [l_w - eta (prob_w - 1/2)]^2 + [l_l - eta ((1 - prob_w) - 1/2)]^2.
    form="released" (uclaml/SPPO, loss 'sppo'): prob_w, prob_l are the ROW MEANS P-hat(y > pi_t) of the winner and
        the loser over all K responses (self-term 1/2 included, so prob_w <= 0.9 at K = 5), and the two terms are
        averaged:  ([l_w - eta (prob_w - 1/2)]^2 + [l_l - eta (prob_l - 1/2)]^2) / 2.
    The paper form compares the pair with each other only; the released form compares each with pi_t (Eq. 4.5),
    which is Eq. (4.7) on the two kept rows.
    """
    if form == "paper":
        if prob_l is not None:
            raise ValueError("form='paper' derives the loser's probability as 1 - prob_w; do not pass prob_l")
        return (sppo_loss(logp_w, ref_logp_w, prob_w, eta) + sppo_loss(logp_l, ref_logp_l, 1.0 - prob_w, eta))
    if form == "released":
        if prob_l is None:
            raise ValueError("form='released' needs prob_l, the loser's row-mean win rate")
        return (sppo_loss(logp_w, ref_logp_w, prob_w, eta) + sppo_loss(logp_l, ref_logp_l, prob_l, eta)) / 2
    raise ValueError(f"form must be 'paper' or 'released', got {form!r}")


def _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta):
    """a = beta log pi(y_w)/pi_ref(y_w), b = beta log pi(y_l)/pi_ref(y_l)   (Sec. 4.5 notation, beta = 1/eta)."""
    return beta * (logp_w - ref_logp_w), beta * (logp_l - ref_logp_l)


def dpo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta):
    """Eq. (4.13): -log sigma(a - b)."""
    a, b = _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta)
    return -F.logsigmoid(a - b)


def ipo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta):
    """Eq. (4.14): [(a - b) - 1]^2."""
    a, b = _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta)
    return (a - b - 1.0) ** 2


def kto_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta, kl):
    """Eq. (4.15), simplified KTO: sigma(-a + c) + sigma(b - c), with c = beta KL(pi || pi_ref).

    `kl` is an estimate of KL(pi || pi_ref) in nats (KTO uses a detached batch estimate, clamped at 0).
    """
    a, b = _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta)
    c = beta * torch.as_tensor(kl, dtype=a.dtype, device=a.device).clamp(min=0)
    return torch.sigmoid(-a + c) + torch.sigmoid(b - c)


def sppo_hard_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, eta):
    """Sec. 4.5 with a hard label P(y_w > y_l) = 1: eta^2 [(a - 1/2)^2 + (b + 1/2)^2] (TRL's `sppo_hard`)."""
    return (logp_w - ref_logp_w - eta / 2) ** 2 + (logp_l - ref_logp_l + eta / 2) ** 2


# ----------------------------------------------------------------------------------------------------------------
# Win rates, the kept pair and log Z (Sec. 4.2, 5.1).
def win_rates(P):
    """P-hat(y_i > pi_t | x) = (1/K) sum_k P[i, k], the self-term 1/2 included (Sec. 5.1, Eq. 4.5).

    P: (..., K, K) array or tensor, validated by hedge_toy.validate_preference. Returns (..., K), same type.
    """
    hedge_toy.validate_preference(P.detach().cpu().numpy() if torch.is_tensor(P) else P)
    return P.mean(-1) if torch.is_tensor(P) else np.asarray(P, dtype=np.float64).mean(-1)


def select_pair(scores):
    """Winner = argmax, loser = argmin of scores (..., K) (Sec. 5.1). Returns two int arrays of shape (...).

    When every score is equal (all responses tied) argmax = argmin; the loser is then the next index, so the two
    rows are distinct; both have win rate 1/2 and target 0, which leaves pi_t alone (Sec. 4.1, the intuition).
    """
    s = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, dtype=np.float64)
    if s.shape[-1] < 2:
        raise ValueError(f"select_pair needs at least 2 responses per prompt, got K = {s.shape[-1]}")
    w, l = s.argmax(-1), s.argmin(-1)
    l = np.where(w == l, (w + 1) % s.shape[-1], l)
    return w, l


def log_z_estimate(win_prob, eta):
    """Eq. (4.5): log Z_{pi_t}(x) ~ log (1/K) sum_k exp(eta P-hat(y_k > pi_t|x)), from the K samples. (..., K) -> (...)."""
    wp = torch.as_tensor(win_prob, dtype=torch.float64)
    return torch.logsumexp(eta * wp, dim=-1) - math.log(wp.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# log pi(y|x), summed over response tokens.
def sequence_logps(model, input_ids, attention_mask, response_mask, chunk=4096):
    """log pi(y|x) for each row: the sum of token log-probs where response_mask is 1. Returns fp32 (B,).

    input_ids, attention_mask, response_mask: (B, T); left or right padding (position ids are derived from the
    mask, so both give the same result). Logits are only computed from the first position that predicts a
    response token (logits_to_keep), only the response positions are gathered (N, V) in the model's dtype,
    and log-softmax is done in fp32 chunks of `chunk` rows: no fp32 (B, T, V) tensor is built. Under autograd the
    chunks' fp32 log-softmax (N, V) are kept for backward (~4 N V bytes; train_7b's memory plan counts them).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                # (B, T)
    T = input_ids.shape[1]
    first = int(response_mask.float().argmax(-1).min())                                 # earliest response token
    keep = T - max(first - 1, 0)                                                         # positions first-1 .. T-1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=keep).logits                           # (B, keep, V)
    pred = logits[:, :-1]                                                                # predicts tokens T-keep+1 ..
    labels = input_ids[:, T - keep + 1:]                                                 # (B, keep-1)
    mask = response_mask[:, T - keep + 1:].bool()                                        # (B, keep-1)
    rows = mask.nonzero(as_tuple=True)[0]                                                # (N,) batch index per token
    picked, targets = pred[mask], labels[mask]                                           # (N, V), (N,)
    token_logps = torch.cat([
        picked[i:i + chunk].float().log_softmax(-1).gather(-1, targets[i:i + chunk, None]).squeeze(-1)
        for i in range(0, len(targets), chunk)
    ]) if len(targets) else picked.new_zeros(0, dtype=torch.float32)                    # (N,) fp32
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, token_logps)                                           # (B,)


# ----------------------------------------------------------------------------------------------------------------
# Records: prompts in; generations, preferences and D_t out, as JSONL written atomically. One reader and one
# writer per artifact (train_7b.py uses the same), one field check; errors name the file, the line and the field.
class ArtifactError(ValueError):
    """A prompt file or run artifact that cannot be used; the message names the file and line."""


GENERATION_FIELDS = {"prompt_id": int, "prompt": str, "responses": list, "finished": list}
"""generations.jsonl, one record per prompt: K sampled texts and whether each ended with EOS."""
PREFERENCE_FIELDS = {"prompt_id": int, "P": list}
"""preferences.jsonl, one record per prompt: the K x K matrix P[i][j] = P(y_i > y_j | x)."""
DATASET_FIELDS = {"prompt_id": int, "prompt": str, "response": str, "finished": bool,
                  "win_prob": (int, float), "ref_logp": (int, float)}
"""Schema of D_t (dataset.jsonl), one row per kept response; train_7b.py reads the same file.
prompt_id: index of the prompt in this iteration; prompt: raw prompt text (the chat template is applied at
tokenisation); response: the sampled text; finished: it ended with EOS (EOS is then part of y); win_prob:
P-hat(y > pi_t|x) of Eq. (4.5); ref_logp: log pi_t(y|x) summed over response tokens. Optional: log_z
(Eq. 4.5 estimate, used when present and log_z='estimate'), role ('winner', 'loser' or 'all'), k (sample index)."""


def check_fields(row, schema: dict, where: str):
    """THE field check: `row` is a dict with every key of `schema` of its type(s); errors start with `where`."""
    if not isinstance(row, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in schema.items():
        if key not in row:
            raise ArtifactError(f"{where}: missing field {key!r}")
        types = typ if isinstance(typ, tuple) else (typ,)
        ok = bool in types if isinstance(row[key], bool) else isinstance(row[key], types)
        if not ok:
            raise ArtifactError(f"{where}: field {key!r} should be {' or '.join(t.__name__ for t in types)}, "
                                f"got {type(row[key]).__name__}")
    return row


def read_jsonl(path, required: dict | None = None):
    """Read a JSONL file; every line must be a JSON object with the `required` fields of the given types."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    f"a truncated or corrupt file - delete it to recompute") from None
            rows.append(check_fields(row, required or {}, f"{path}:{n}"))
    return rows


def write_jsonl(path, rows: Iterable[dict]):
    """Write rows atomically: a temporary file, flushed and fsynced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_prompts(path, column="prompt"):
    """Prompts from JSONL (one object per line with a string `column`) or parquet (a string column)."""
    path = Path(path)
    if path.suffix != ".parquet":
        prompts = [row[column] for row in read_jsonl(path, required={column: str})]
    elif not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    else:
        import pyarrow.parquet as pq                 # UltraFeedback's splits, as the SPPO authors ship them
        if column not in pq.read_schema(path).names:
            raise ArtifactError(f"{path}: no column {column!r}; columns are {pq.read_schema(path).names}")
        prompts = pq.read_table(path, columns=[column]).column(column).to_pylist()
    for n, p in enumerate(prompts, 1):
        if not isinstance(p, str) or not p.strip():
            raise ArtifactError(f"{path}: record {n}: field {column!r} should be a non-empty string, got {p!r}")
    return prompts


def _per_prompt(path, schema, n_prompts, fits, expected):
    """Records of `path`, one per prompt, in prompt order, each passing `fits(n, record)`; else the error names
    the line and what was `expected` there."""
    recs = read_jsonl(path, schema)
    for n, r in enumerate(recs):
        if r["prompt_id"] != n or n >= n_prompts or not fits(n, r):
            raise ArtifactError(f"{path}:{n + 1}: expected {expected(n)}; the file belongs to another run or "
                                f"config - delete it to recompute")
    if len(recs) != n_prompts:
        raise ArtifactError(f"{path}: {len(recs)} records for {n_prompts} prompts; delete it to recompute")
    return recs


def write_generations(path, prompts, generations):
    write_jsonl(path, ({"prompt_id": i, "prompt": x, **g} for i, (x, g) in enumerate(zip(prompts, generations))))


def read_generations(path, prompts, K):
    """generations.jsonl for exactly these prompts, in order, K responses each."""
    return _per_prompt(path, GENERATION_FIELDS, len(prompts), lambda n, g: g["prompt"] == prompts[n] and
                       len(g["responses"]) == K == len(g["finished"]), lambda n: f"prompt {n} with K={K} responses")


def write_preferences(path, matrices):
    write_jsonl(path, ({"prompt_id": i, "P": np.asarray(m).tolist()} for i, m in enumerate(matrices)))


def read_preferences(path, n_prompts, K):
    """preferences.jsonl: one valid K x K matrix per prompt, in prompt order. Returns a list of arrays."""
    recs = _per_prompt(path, PREFERENCE_FIELDS, n_prompts, lambda n, r: np.shape(r["P"]) == (K, K),
                       lambda n: f"prompt {n}'s {K} x {K} matrix")
    try:
        return [hedge_toy.validate_preference(r["P"]) for r in recs]
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None


def check_dataset(rows, path="dataset", need_ref=True, need_log_z=False):
    """Rows of D_t (DATASET_FIELDS; with need_ref=False ref_logp may be absent from every row, then pi_t computes
    it; need_log_z: --log-z estimate trains on each row's log_z): types, win_prob in [0, 1], finite ref_logp.
    Errors name `path`, the record and the field."""
    if not rows:
        raise ArtifactError(f"{path}: no rows")
    has_ref = [isinstance(r, dict) and "ref_logp" in r for r in rows]
    if any(has_ref) and not all(has_ref):
        raise ArtifactError(f"{path}: record {has_ref.index(False) + 1}: missing field 'ref_logp' (other records "
                            f"have one: give it to every record, or to none and it is computed from pi_t)")
    schema = {k: v for k, v in DATASET_FIELDS.items() if need_ref or k != "ref_logp"}
    schema.update({"log_z": (int, float)} if need_log_z else {})
    for n, row in enumerate(rows, 1):
        check_fields(row, schema, f"{path}: record {n}")
        if not 0.0 <= row["win_prob"] <= 1.0:
            raise ArtifactError(f"{path}: record {n}: win_prob {row['win_prob']} is outside [0, 1]")
        if "ref_logp" in row and not math.isfinite(row["ref_logp"]):
            raise ArtifactError(f"{path}: record {n}: ref_logp {row['ref_logp']} is not finite")
    return rows


def read_dataset(path, need_ref=True, need_log_z=False):
    """dataset.jsonl: field errors name the file and line, value errors the record (check_dataset)."""
    schema = {k: v for k, v in DATASET_FIELDS.items() if k != "ref_logp"}
    return check_dataset(read_jsonl(path, schema), path, need_ref, need_log_z)


# ----------------------------------------------------------------------------------------------------------------
# Tokens: x through the chat template, y with EOS when it finished, batches padded left or right.
def pad_id(tokenizer):
    """The padding id: the tokenizer's pad token, else its EOS (models without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_ids(tokenizer, prompt):
    """Token ids of the prompt, through the tokenizer's chat template when it has one (Algorithm 1: x ~ X)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_example(tokenizer, prompt, response, finished, max_length, max_prompt_length):
    """(prompt_ids, response_ids, truncated). y's tokens are the response's, plus EOS when it finished.

    Truncation (released code): the prompt keeps its LAST max_prompt_length tokens, the response its first
    max_length - len(prompt) tokens. `truncated` says whether either was cut, so callers can count it.
    """
    p = prompt_ids(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if finished else [])
    p_cut = p[-max_prompt_length:]
    r_cut = r[:max_length - len(p_cut)]
    return p_cut, r_cut, (len(p_cut) < len(p) or len(r_cut) < len(r))


def collate(pairs, pad, padding_side="right"):
    """Pack (prompt_ids, response_ids) pairs into input_ids, attention_mask, response_mask, each (B, T)."""
    T = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(pairs), T), dtype=torch.long)
    resp = torch.zeros((len(pairs), T), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        s = 0 if padding_side == "right" else T - n
        ids[i, s:s + n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, s:s + n] = 1
        resp[i, s + len(p):s + n] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def encode_rows(tokenizer, rows, cfg):
    """Encode dataset rows once: returns the list of (prompt_ids, response_ids) and the truncation count."""
    pairs, n_cut = [], 0
    for row in rows:
        p, r, cut = encode_example(tokenizer, row["prompt"], row["response"], row["finished"],
                                   cfg.max_length, cfg.max_prompt_length)
        pairs.append((p, r))
        n_cut += cut
    return pairs, n_cut


@torch.no_grad()
def batched_logps(model, pairs, pad, batch_size=16, device="cpu", progress=False, desc="log-probs"):
    """sequence_logps over many encoded pairs, in batches, no grad. Returns a float64 list (one per pair)."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        b = {k: v.to(device) for k, v in collate(pairs[i:i + batch_size], pad).items()}
        out += sequence_logps(model, **b).double().tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 1: y_1..y_K ~ pi_t(.|x), one batched generate() call per batch of prompts.
def sample_seed(seed, iteration, index):
    """THE seeding rule of generation: the prompts of iteration t are cut into batches of gen_batch from index 0,
    and the batch starting at prompt `index` is sampled under this seed. It depends on nothing else - not on the
    process, rank or number of GPUs - so sppo.py and train_7b.py draw identical samples for the same settings."""
    return ((seed * 1_000_003 + iteration) * 1_000_003 + index) % 2 ** 63


def eos_ids(model, tokenizer):
    """Every token id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts, cfg, iteration=0, device="cpu", start=0):
    """K samples per prompt. Returns one dict per prompt: {"responses": [K str], "finished": [K bool]}.

    `prompts` are the iteration's prompts from index `start` on (start: a multiple of cfg.gen_batch); batch by batch
    they are sampled under sample_seed(cfg.seed, iteration, start + i). Plain ancestral sampling at cfg.temperature
    / cfg.top_p (top-k off). A response is cut at its first EOS; one that never emits EOS within cfg.max_new_tokens
    is kept and flagged finished=False. Decoding keeps special tokens, so the text re-tokenises to the sampled ids.
    """
    from transformers import GenerationConfig
    model.eval()
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                               max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.K,
                               pad_token_id=pad, eos_token_id=stop)
    out, xs = [], [prompt_ids(tokenizer, p) for p in prompts]
    if sum(len(x) > cfg.max_prompt_length for x in xs):                # the training rule: keep the prompt's END
        print(f"generate: {sum(len(x) > cfg.max_prompt_length for x in xs)} of {len(xs)} prompts cut to their last "
              f"max_prompt_length={cfg.max_prompt_length} tokens, as training cuts them")
    for i in tqdm(range(0, len(prompts), cfg.gen_batch), desc="generate", disable=not cfg.progress, leave=False):
        chunk = prompts[i:i + cfg.gen_batch]
        b = collate([(x[-cfg.max_prompt_length:], []) for x in xs[i:i + cfg.gen_batch]], pad, padding_side="left")
        torch.manual_seed(sample_seed(cfg.seed, iteration, start + i))
        seqs = model.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                              generation_config=gen_cfg)                              # (B*K, T_in + new)
        new = seqs[:, b["input_ids"].shape[1]:].tolist()
        for j in range(len(chunk)):
            texts, done = [], []
            for ids in new[j * cfg.K:(j + 1) * cfg.K]:
                end = next((n for n, tok in enumerate(ids) if tok in stop), None)
                texts.append(tokenizer.decode(ids[:end], skip_special_tokens=False))
                done.append(end is not None)
            out.append({"responses": texts, "finished": done})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 2: the preference oracle, one interface: oracle(prompt, responses) -> P (K, K).
def make_oracle(cfg, device="cpu"):
    """PairRM from a local checkpoint, the paper's oracle; or the committee of rule judges (committee.py) for real
    text without PairRM weights. (The `game` oracle is sppo_toy.GameOracle, passed to run() as an object.)"""
    if cfg.oracle == "committee":
        return committee.CommitteeOracle(cfg.judges)
    if cfg.oracle != "pairrm":
        raise ValueError(f"--oracle {cfg.oracle} needs an oracle object (sppo_toy.GameOracle); run sppo_toy.py")
    if not cfg.pairrm:
        raise ValueError("--oracle pairrm needs --pairrm DIR (a local PairRM checkpoint)")
    ranker = pairrm.PairRM.from_pretrained(cfg.pairrm, device=device)
    return pairrm.PairRMOracle(ranker, mode=cfg.pairrm_mode, progress=cfg.progress)


def rank(oracle, prompts, generations, progress=False):
    """Fill one K x K matrix per prompt. Uses the oracle's batched `batch(prompts, candidates)` when it has one; an
    oracle with `reads_finished` (committee.py) also gets each response's EOS flag."""
    cands = [g["responses"] for g in generations]
    kw = {"finished": [g["finished"] for g in generations]} if getattr(oracle, "reads_finished", False) else {}
    if hasattr(oracle, "batch"):
        mats = [np.asarray(m, dtype=np.float64) for m in oracle.batch(prompts, cands, **kw)]
    else:
        mats = [np.asarray(oracle(x, ys), dtype=np.float64)
                for x, ys in tqdm(list(zip(prompts, cands)), desc="rank", disable=not progress, leave=False)]
    for i, m in enumerate(mats):
        try:
            hedge_toy.validate_preference(m)
        except ValueError as e:
            raise ValueError(f"oracle returned an invalid preference matrix for prompt {i}: {e}") from None
    return mats


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 3: D_t = {(x, y, P-hat(y > pi_t | x))} with the kept rows (Sec. 4.2 / 5.1).
def build_dataset(prompts, generations, matrices, cfg):
    """One row per kept response (DATASET_FIELDS without ref_logp, which needs pi_t: see `reference_logps`)."""
    rows = []
    for i, (x, g, P) in enumerate(zip(prompts, generations, matrices)):
        wp = win_rates(P)                                                                 # (K,) Eq. (4.5)
        lz = float(log_z_estimate(wp, cfg.eta))                                           # Eq. (4.5), log Z
        if cfg.selection == "all":
            keep = [(k, "all") for k in range(len(wp))]
        else:
            w, l = select_pair(wp)
            keep = [(int(w), "winner"), (int(l), "loser")]
        rows += [{"prompt_id": i, "prompt": x, "response": g["responses"][k], "finished": g["finished"][k],
                  "win_prob": float(wp[k]), "log_z": lz, "role": role, "k": k} for k, role in keep]
    return rows


def reference_logps(model, tokenizer, rows, cfg, device="cpu"):
    """ref_logp = log pi_t(y|x) of every row, by pi_t itself (pi_ref = pi_t: no second model is held)."""
    pairs, _ = encode_rows(tokenizer, rows, cfg)
    lps = batched_logps(model, pairs, pad_id(tokenizer), cfg.micro_batch, device, cfg.progress, "reference log-probs")
    return [dict(row, ref_logp=lp) for row, lp in zip(rows, lps)]


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 4: training on D_t (Eq. 4.7). train_7b.py imports batch_schedule, make_optimizer,
# make_scheduler, make_batch and example_losses.
def batch_schedule(n, global_batch, epochs, seed):
    """Indices of each optimizer step: a seeded permutation per epoch, cut into global batches (last may be short)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        steps += [perm[i:i + global_batch] for i in range(0, n, global_batch)]
    return steps


def make_optimizer(params, cfg):
    """RMSprop (the authors' code) or AdamW, built on whatever parameters are given (sharded ones included)."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'rmsprop' or 'adamw', got {cfg.optimizer!r}")


def make_scheduler(optimizer, total_steps, warmup_ratio):
    """Linear warm-up over ceil(warmup_ratio * total) steps, then linear decay to 0 (paper: ratio 0.1)."""
    warm = math.ceil(warmup_ratio * total_steps)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def example_losses(model, batch, eta):
    """Eq. (4.7) per example for a collated batch carrying ref_logp, win_prob and optionally log_z. Returns (B,) fp32."""
    logp = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return sppo_loss(logp, batch["ref_logp"], batch["win_prob"], eta, batch.get("log_z"))


def make_batch(pairs, rows, idx, pad, cfg, device):
    """Collate rows `idx` with their targets: ref_logp, win_prob (and log_z when cfg.log_z == 'estimate')."""
    b = collate([pairs[i] for i in idx], pad)
    b["ref_logp"] = torch.tensor([rows[i]["ref_logp"] for i in idx], dtype=torch.float32)
    b["win_prob"] = torch.tensor([rows[i]["win_prob"] for i in idx], dtype=torch.float32)
    if cfg.log_z == "estimate":
        b["log_z"] = torch.tensor([rows[i]["log_z"] for i in idx], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


class DivergedError(RuntimeError):
    """A non-finite loss or gradient: the run stops; the model keeps the weights of the last good step."""


def train_policy(model, tokenizer, rows, cfg, device="cpu", on_step=None):
    """theta_{t+1} = argmin_theta E_{D_t}[...]^2 (Eq. 4.7), starting from pi_t = `model`.

    rows: dataset rows (DATASET_FIELDS) with ref_logp computed by pi_t itself, so no second model is held.
    Each optimizer step sums per-example losses over micro-batches and divides by the global batch size
    (gradient accumulation gives the same gradient as one big batch). Returns a list of per-step metrics.
    """
    pairs, n_cut = encode_rows(tokenizer, rows, cfg)
    if n_cut:
        print(f"train: {n_cut} of {len(rows)} examples truncated to max_length={cfg.max_length} / "
              f"max_prompt_length={cfg.max_prompt_length}")
    schedule = batch_schedule(len(rows), cfg.global_batch, cfg.epochs, cfg.seed)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    sched = make_scheduler(opt, len(schedule), cfg.warmup_ratio)
    model.train()
    history = []
    bar = tqdm(schedule, desc="train (Eq. 4.7)", disable=not cfg.progress, leave=False)
    for step, idx in enumerate(bar):
        t0, n_tok = time.perf_counter(), 0
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for j in range(0, len(idx), cfg.micro_batch):
            b = make_batch(pairs, rows, idx[j:j + cfg.micro_batch], pad_id(tokenizer), cfg, device)
            losses = example_losses(model, b, cfg.eta)                                     # (micro,)
            (losses.sum() / len(idx)).backward()
            loss_sum += losses.detach().sum().item()
            n_tok += int(b["attention_mask"].sum())
        loss = loss_sum / len(idx)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise DivergedError(f"step {step}: loss {loss}, grad norm {gnorm} is not finite; stopped before the "
                                f"update, the model keeps the last good weights (try a lower lr or eta)")
        opt.step()
        sched.step()
        history.append({"step": step, "loss": loss, "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
                        "tokens_per_s": n_tok / (time.perf_counter() - t0)})
        bar.set_postfix(loss=f"{loss:.4g}")
        if on_step:
            on_step(history[-1])
    return history


# ----------------------------------------------------------------------------------------------------------------
# The run directory: OUT/iter{t}/{generations,preferences,dataset}.jsonl, model/, metrics.json and manifest.json.
# A stage is finished when OUT/iter{t}/manifest.json records it: the settings and inputs it depends on (pi_t's and
# the oracle's identity, the prompts, the sha256 of its input files) and the sha256 of what it wrote. Re-running
# the command resumes: a stage is reused only if all of that still matches; otherwise the run stops before any
# work, naming the setting or file, unless --restart-from moves the stale artifacts aside (never deletes them).
STAGES = ("generate", "rank", "dataset", "train")
STAGE_FILES = {"generate": ("generations.jsonl",), "rank": ("preferences.jsonl",), "dataset": ("dataset.jsonl",),
               "train": ("model", "metrics.json")}
STAGE_INPUTS = {"rank": ("generations.jsonl",), "dataset": ("generations.jsonl", "preferences.jsonl"),
                "train": ("dataset.jsonl",)}
STAGE_SETTINGS = {
    "generate": ("K", "seed", "temperature", "top_p", "max_new_tokens", "gen_batch", "max_prompt_length", "dtype"),
    "rank": ("oracle", "pairrm_mode", "judges"),
    "dataset": ("selection", "eta", "max_length", "max_prompt_length", "micro_batch", "dtype"),
    "train": ("log_z", "eta", "optimizer", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "epochs",
              "global_batch", "micro_batch", "seed", "max_length", "max_prompt_length", "dtype")}
"""The settings each stage's artifacts depend on (its input files and pi_t are recorded by hash besides)."""


class ConfigError(ValueError):
    """A setting that cannot work, found before any work starts; the CLIs print it as one line and exit 2."""


class StaleStage(ArtifactError):
    """A finished stage whose artifacts were made with other settings or inputs, or changed since."""

    def __init__(self, stage, path, why):
        self.stage, self.path = stage, path
        super().__init__(f"{path}: {why}; ways out: another --out, or --restart-from {stage} (moves it and every "
                         f"later artifact aside to OUT/stale/, deleting nothing)")


def validate_config(cfg):
    """Every setting in range and every choice valid, before any work (the library twin of argparse's checks)."""
    import typing
    for f in dataclasses.fields(cfg):
        hint = typing.get_type_hints(type(cfg))[f.name]                # Literal[...] or Literal[...] | None
        lit = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal]
        allowed = (*typing.get_args(lit[0]), *[None] * (type(None) in typing.get_args(hint))) if lit else ()
        if lit and getattr(cfg, f.name) not in allowed:
            raise ConfigError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r}: choose from {allowed}")
    pos = lambda x: math.isfinite(x) and x > 0                                                       # noqa: E731
    for ok, name, want in [(cfg.iterations >= 1, "iterations", ">= 1"), (cfg.max_prompts >= 0,
                           "max_prompts", ">= 0 (0: all)"), (cfg.K >= 2, "K", ">= 2: a preference "
                           "needs a pair"), (pos(cfg.eta), "eta", "finite and > 0 (eta <= 0 reverses Eq. 4.1)"),
                           (cfg.max_new_tokens >= 1, "max_new_tokens", ">= 1"), (pos(cfg.temperature), "temperature",
                           "finite and > 0"), (0 < cfg.top_p <= 1, "top_p", "in (0, 1]"), (cfg.gen_batch >= 1,
                           "gen_batch", ">= 1"), (1 <= cfg.max_prompt_length < cfg.max_length, "max_prompt_length",
                           f">= 1 and below --max-length {cfg.max_length}"), (pos(cfg.lr), "lr", "finite and > 0"),
                           (0 <= cfg.warmup_ratio <= 1, "warmup_ratio", "in [0, 1]"), (cfg.weight_decay >= 0,
                           "weight_decay", ">= 0"), (pos(cfg.max_grad_norm), "max_grad_norm", "finite and > 0"),
                           (cfg.epochs >= 1, "epochs", ">= 1: with 0 nothing is trained"), (cfg.global_batch >= 1,
                           "global_batch", ">= 1"), (cfg.micro_batch >= 1, "micro_batch", ">= 1")]:
        if not ok:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {want}")
    try:
        committee.parse_judges(cfg.judges)
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    gguf = str(cfg.model).endswith(".gguf")
    for flag, path, need in [("model", cfg.model, None if gguf else "config.json"), ("prompts", cfg.prompts, None),
                             ("pairrm", cfg.pairrm if cfg.oracle == "pairrm" else None, "config.json")]:
        if path is not None and not (Path(path) / need if need else Path(path)).exists():
            raise ConfigError(f"--{flag} {path}: " + (f"no {need} there" if need else "no such file"))
    return cfg


class Hashes:
    """sha256 of files and directories (a directory: its files' names and hashes), cached in OUT/hashes.json by
    path, size and mtime, so a 7B checkpoint is read once per run directory, not once per resume."""

    def __init__(self, out):
        self.path = Path(out) / "hashes.json"
        self.known = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __call__(self, path):
        path = Path(path).resolve()
        if path.is_dir():
            parts = [f"{p.relative_to(path)}:{self(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()
        st, key = path.stat(), str(path)
        if self.known.get(key, [None])[:2] != [st.st_size, st.st_mtime_ns]:
            with open(path, "rb") as f:
                self.known[key] = [st.st_size, st.st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest()]
            tmp = self.path.with_name(f"hashes.json.{os.getpid()}.tmp")       # one tmp per writer: no races
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        return self.known[key][2]


def stage_key(cfg, stage, d, model_dir, prompts, oracle_id, hashes):
    """Everything stage's artifacts in folder d depend on: its settings, pi_t, the prompts, the oracle, inputs."""
    key = {k: getattr(cfg, k) for k in STAGE_SETTINGS[stage]}
    key.update({f: hashes(Path(d) / f) for f in STAGE_INPUTS.get(stage, ())})
    if stage != "rank":
        key["model"] = hashes(model_dir)
    if stage == "generate":
        key["prompts"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    if stage == "rank":
        key["oracle_id"] = oracle_id
    return key


class Manifest:
    """OUT/iter{t}/manifest.json: one record per finished stage, {key, files: {name: sha256}, rows}."""

    def __init__(self, d):
        self.d, self.path = Path(d), Path(d) / "manifest.json"
        self.stages = json.loads(self.path.read_text())["stages"] if self.path.is_file() else {}

    def done(self, stage, key, hashes):
        """True: finished with exactly `key`, files unchanged. False: not finished (no record, or its files were
        deleted to recompute it; a file without a record is an interrupted write). StaleStage otherwise."""
        rec, files = self.stages.get(stage), [self.d / f for f in STAGE_FILES[stage]]
        if rec is None or not all(f.exists() for f in files):
            return False
        for k in sorted(set(rec["key"]) | set(key)):
            if rec["key"].get(k) != key.get(k):
                what = "input file" if k.endswith(".jsonl") else "pi_t" if k == "model" else "setting"
                raise StaleStage(stage, files[0], f"made with {what} {k} = {rec['key'].get(k)!r}, but this run has "
                                 f"{k} = {key.get(k)!r}")
        for f in files:
            if hashes(f) != rec["files"][f.name]:
                raise StaleStage(stage, f, "changed since it was written (its sha256 is not manifest.json's)")
        return True

    def commit(self, stage, key, hashes, rows):
        """Record a finished stage (its files are already in place): the last write of every stage."""
        self.stages[stage] = {"key": key, "files": {f: hashes(self.d / f) for f in STAGE_FILES[stage]}, "rows": rows}
        tmp = self.path.with_name("manifest.json.tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=1))
        os.replace(tmp, self.path)


def resolve_device(name):
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def gguf_cache():
    """Where converted GGUF checkpoints live: $SPPO_GGUF_CACHE, else ~/.cache/sppo/gguf (XDG_CACHE_HOME honoured)."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sppo" / "gguf"
    return Path(os.environ.get("SPPO_GGUF_CACHE", home))


def gguf_checkpoint(path, cache=None):
    """A .gguf file -> a local checkpoint directory (config, fp32 safetensors, tokenizer, chat template), converted
    once and cached in cache/<sha256 of the file>/, so a changed file is converted again. Returns the directory.

    transformers de-quantises the GGUF tensors to fp32 on load (needs the `gguf` package: requirements-real.txt) and
    marks the model GGUF-quantised, which save_pretrained refuses; the marker is cleared before saving. Concurrent
    callers (ranks) each write a private temporary directory; the first rename wins, the others drop theirs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ArtifactError(f"{path}: not a GGUF file (its first bytes are not 'GGUF')")
        f.seek(0)
        dest = Path(cache or gguf_cache()) / hashlib.file_digest(f, "sha256").hexdigest()
    if (dest / "config.json").is_file():
        return dest
    try:
        import gguf  # noqa: F401   transformers reads GGUF through it
    except ImportError:
        raise ConfigError(f"{path}: reading GGUF needs the gguf package: pip install -r requirements-real.txt") from None
    print(f"{path}: converting GGUF to safetensors in {dest} (once; cached by the file's sha256)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise ArtifactError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: {e})") from None
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    model.config.__dict__.pop("quantization_config", None)           # de-quantised: a plain fp32 checkpoint
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:                                                  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_policy(path, cfg, device):
    """A causal LM and its tokenizer from a local directory (no hub), or from a .gguf file via gguf_checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_checkpoint(path) if str(path).endswith(".gguf") else path
    if not (Path(path) / "config.json").is_file():
        raise ArtifactError(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).to(device)
    return model, AutoTokenizer.from_pretrained(path)


def save_policy(model, tokenizer, path):
    """save_pretrained into a temporary directory, then rename: a model directory is complete or absent."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def iteration_prompts(prompts, cfg, t):
    """The prompts of iteration t: its own slice when cfg.split_prompts (the paper's 3 x 20k), else all."""
    if not cfg.split_prompts:
        return list(prompts)
    parts = np.array_split(np.arange(len(prompts)), cfg.iterations)
    return [prompts[i] for i in parts[t]]


def check_dataset_sources(rows, gens, mats, cfg, path):
    """D_t against its sources: per prompt, in order, its 2 (pair) or K (all) kept rows carry that generation's
    text and P-hat (Eq. 4.5) from that prompt's matrix."""
    per = cfg.K if cfg.selection == "all" else 2
    if len(rows) != per * len(gens):
        raise ArtifactError(f"{path}: {len(rows)} rows for {len(gens)} prompts x {per} kept; delete it to recompute")
    for n, r in enumerate(rows):
        i, k = r["prompt_id"], r.get("k")
        if not (i == n // per and isinstance(k, int) and 0 <= k < cfg.K and r["response"] == gens[i]["responses"][k]
                and abs(r["win_prob"] - mats[i][k].mean()) < 1e-9):
            raise ArtifactError(f"{path}: record {n + 1}: not prompt {n // per}'s generation k={k} with its win rate "
                                f"from preferences.jsonl; delete it to recompute")


def run_iteration(cfg, t, prompts, model_dir, oracle, oracle_id, device, hashes):
    """One iteration of Algorithm 1: pi_t (model_dir) -> pi_{t+1} (OUT/iter{t}/model). Returns the new model dir,
    or None when cfg.stop_after stopped it. Each stage runs unless the manifest shows it finished as asked."""
    d = Path(cfg.out) / f"iter{t}"
    d.mkdir(parents=True, exist_ok=True)
    f_gen, f_pref, f_data, m_dir = d / "generations.jsonl", d / "preferences.jsonl", d / "dataset.jsonl", d / "model"
    man, cache = Manifest(d), {}

    def policy():                                                # pi_t, loaded once and only when a stage needs it
        if "m" not in cache:
            cache["m"] = load_policy(model_dir, cfg, device)
        return cache["m"]

    def stage(name, work, rows):                                 # run `work` unless finished; then commit it
        key = stage_key(cfg, name, d, model_dir, prompts, oracle_id, hashes)
        if not man.done(name, key, hashes):
            work()
            man.commit(name, key, hashes, rows())

    stage("generate", lambda: write_generations(f_gen, prompts, generate_responses(*policy(), prompts, cfg, t,
                                                                                    device)), lambda: len(prompts))
    gens = read_generations(f_gen, prompts, cfg.K)               # Step 1: y_1..y_K ~ pi_t(.|x)
    if cfg.stop_after == "generate":
        return None
    stage("rank", lambda: write_preferences(f_pref, rank(oracle, prompts, gens, progress=cfg.progress)),
          lambda: len(prompts))
    mats = read_preferences(f_pref, len(prompts), cfg.K)         # Step 2: P(y_k > y_k' | x) for all k, k'
    if cfg.stop_after == "rank":
        return None
    stage("dataset", lambda: write_jsonl(f_data, reference_logps(*policy(), build_dataset(prompts, gens, mats, cfg),
                                                                 cfg, device)), lambda: len(read_jsonl(f_data)))
    rows = read_dataset(f_data, need_log_z=cfg.log_z == "estimate")  # Step 3: D_t, log pi_t(y|x) as the reference
    check_dataset_sources(rows, gens, mats, cfg, f_data)
    if cfg.stop_after == "dataset":
        return None

    def train():                                                 # Step 4: Eq. (4.7); model, metrics, then commit
        model, tok = policy()
        torch.manual_seed(cfg.seed + t)
        history = train_policy(model, tok, rows, dataclasses.replace(cfg, seed=cfg.seed + t), device)
        save_policy(model, tok, m_dir)
        stats = {"iteration": t, "prompts": len(prompts), "rows": len(rows),
                 "unfinished": sum(not f for g in gens for f in g["finished"]),
                 "mean_win_prob_kept": float(np.mean([r["win_prob"] for r in rows])),
                 "prompts_with_cycle": sum(committee.has_cycle(P) for P in mats),          # Condorcet cycles in P
                 "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "history": history}
        write_json(d / "metrics.json", stats)
        print(f"iter {t}: {len(rows)} rows, loss {stats['first_loss']:.4g} -> {stats['last_loss']:.4g}, "
              f"{stats['prompts_with_cycle']} of {len(prompts)} prompts' preferences contain a cycle")
    stage("train", train, lambda: len(rows))
    return m_dir


def write_json(path, obj):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def check_run(cfg, prompts, oracle_id, hashes):
    """Walk every finished stage without doing any work. Returns (t, StaleStage) for the first stage whose
    artifacts do not match this run, or None when everything that exists does."""
    model_dir = cfg.model
    for t in range(cfg.iterations):
        d = Path(cfg.out) / f"iter{t}"
        man, p = Manifest(d), iteration_prompts(prompts, cfg, t)
        for name in STAGES:
            try:
                if not man.done(name, stage_key(cfg, name, d, model_dir, p, oracle_id, hashes), hashes):
                    return None
            except StaleStage as e:
                return t, e
        model_dir = d / "model"
    return None


def move_aside(out, t, stage):
    """--restart-from: move iteration t's artifacts of `stage` and later stages, and every later iteration, into
    OUT/stale/<UTC time>/ (nothing is deleted), and drop their manifest records."""
    dest = Path(out) / "stale" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    d, later = Path(out) / f"iter{t}", STAGES[STAGES.index(stage):]
    man = Manifest(d)
    for f in [d / f for s in later for f in STAGE_FILES[s]] + sorted(Path(out).glob("iter*")):
        if f.exists() and (f.parent == d or int(f.name[4:] or -1) > t):
            (dest / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), dest / f.relative_to(out))
    for s in later:
        man.stages.pop(s, None)
    write_json(man.path, {"stages": man.stages})
    print(f"--restart-from {stage}: moved iteration {t}'s {'/'.join(later)} artifacts and later iterations to {dest}")


def run(cfg, oracle=None):
    """Algorithm 1: for t = 0..T-1, pi_{t+1} = SPPO-step(pi_t). Resumes from whatever OUT holds that matches.
    oracle: any callable oracle(prompt, responses) -> P (K, K) (with .identity() for the manifest); default:
    make_oracle(cfg) (PairRM)."""
    validate_config(cfg)
    if cfg.model is None or cfg.prompts is None:
        raise ConfigError("a run needs --model DIR and --prompts FILE")
    prompts = load_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts or None]
    if len(prompts) < (cfg.iterations if cfg.split_prompts else 1):
        raise ConfigError(f"--prompts {cfg.prompts}: {len(prompts)} prompts for {cfg.iterations} disjoint iteration "
                          f"slices" + ("" if prompts else " (the file is empty)"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out}: not writable")
    if oracle is None and cfg.oracle == "committee":
        oracle = make_oracle(cfg)
    if oracle is None and (cfg.oracle != "pairrm" or not cfg.pairrm):
        raise ConfigError("--oracle pairrm needs --pairrm DIR (a local PairRM checkpoint)" if cfg.oracle == "pairrm"
                          else f"--oracle {cfg.oracle} needs an oracle object (sppo_toy.GameOracle): run sppo_toy.py")
    hashes = Hashes(out)
    oracle_id = (oracle.identity() if hasattr(oracle, "identity") else type(oracle).__name__) if oracle else \
        {"pairrm": hashes(cfg.pairrm), "mode": cfg.pairrm_mode}
    stale = check_run(cfg, prompts, oracle_id, hashes)
    if stale and cfg.restart_from is None:
        raise stale[1]
    if stale and STAGES.index(cfg.restart_from) > STAGES.index(stale[1].stage):
        raise ConfigError(f"--restart-from {cfg.restart_from} would keep {stale[1].path}, which is stale; restart "
                          f"from {stale[1].stage} or an earlier stage")
    if stale:
        move_aside(out, stale[0], cfg.restart_from)
    elif cfg.restart_from:
        print(f"--restart-from {cfg.restart_from}: every finished stage matches this run; nothing moved")
    write_json(out / "config.json", dataclasses.asdict(cfg))        # only once the artifacts are known to match
    oracle = oracle or make_oracle(cfg, resolve_device(cfg.device))
    model_dir = cfg.model
    for t in range(cfg.iterations):
        model_dir = run_iteration(cfg, t, iteration_prompts(prompts, cfg, t), model_dir, oracle, oracle_id,
                                  resolve_device(cfg.device), hashes)
        if model_dir is None:
            print(f"stopped after stage {cfg.stop_after!r} of iteration {t}; re-run the command to resume")
            return None
    return model_dir


def user_errors(prog, fn):
    """Run fn(); a ConfigError or ArtifactError (the user's to fix) becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except (ConfigError, ArtifactError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------------------
# CLI: the one convention of every script here (transformers.HfArgumentParser, as TRL's users know it).
def parse_config(cls, argv=None, description=None):
    """A `cls` instance from the command line: one flag per field (--field_name or --field-name), its help the
    field's, its true default shown, Literal fields listing their choices and rejecting anything else at once
    (exit 2). `--config FILE.yaml|.json` gives field values first; flags on the command line override them."""
    parser = HfArgumentParser(cls, description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of `field: value` lines; flags override")
    given = parser.parse_known_args(argv)[0].config
    file_args = []
    if given:
        import yaml
        path = Path(given)
        try:
            values = yaml.safe_load(path.read_text()) if path.is_file() else None
        except yaml.YAMLError as e:
            parser.error(f"--config {path}: not valid YAML/JSON ({e})")
        if not isinstance(values, dict):
            parser.error(f"--config {path}: expected a file of `field: value` lines")
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in values.items():
            if k not in names:
                parser.error(f"--config {path}: unknown setting {k!r}")
            if v is not None:
                file_args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    args = vars(parser.parse_args(file_args + list(sys.argv[1:] if argv is None else argv)))
    args.pop("config")
    return cls(**args)


def main(argv=None):
    cfg = parse_config(SPPOConfig, argv, description=__doc__.split("\n")[0])
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                       # weight loading/saving bars: noise next to ours

    def go():
        final = run(cfg)
        if final is not None:
            print(f"pi_{cfg.iterations} saved in {final}")
        return 0
    return user_errors("sppo.py", go)


if __name__ == "__main__":
    sys.exit(main())
