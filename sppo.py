"""SPPO: the objective of Eq. (4.7) and the self-play loop of Algorithm 1, on one process.

Wu, Sun, Yuan, Ji, Yang, Gu, "Self-Play Preference Optimization for Language Model Alignment",
arXiv 2405.00675. Equation numbers below are the paper's.

    python sppo.py --demo                                    # tiny Llama learns a von Neumann winner (~2 min CPU)
    python sppo.py --model DIR --prompts P.jsonl --oracle pairrm --pairrm DIR_PAIRRM --out runs/x

Conventions (stated once, used everywhere in this repository):
  * log pi(y|x) is SUMMED over the response tokens of y (EOS included when the response ended); prompt and
    padding never count. `logp - ref_logp` is therefore log pi(y|x)/pi_t(y|x) in nats.
  * eta is the Hedge step of Eq. (4.1); beta = 1/eta is the KL-regulariser of DPO/IPO/KTO. The paper's
    language-model runs use eta = 1000 (its "beta = 1e-3"), so targets eta (P - 1/2) reach +-400 nats and a
    starting loss near 1e5 is expected (paper_notes.md, Sec. 8).
  * P is a K x K preference matrix over K responses to one prompt: P[i, j] = P(y_i > y_j | x),
    P + P^T = 1, diagonal 1/2 (validated by hedge_toy.validate_preference).

File map: losses (Sec. 4) -> win rates and pair selection (Sec. 5.1) -> log-probs -> data -> training (4.7)
-> generation, oracles, the four stages of Algorithm 1 and the resumable run directory -> tabular SPPO ->
the demo -> CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import hedge_toy
import pairrm


# ----------------------------------------------------------------------------------------------------------------
# Configuration: every knob of Algorithm 1, defaults from the paper (Sec. 5) and the authors' released code.
@dataclass
class SPPOConfig:
    model: str | None = None
    """Local directory of pi_0 (a Hugging Face causal LM saved with save_pretrained)."""
    prompts: str | None = None
    """Prompt file: JSONL with a `prompt` field per line, or parquet with a prompt column."""
    prompt_column: str = "prompt"
    """Field / column that holds the prompt text."""
    out: str = "runs/sppo"
    """Run directory; every iteration's artifacts go under OUT/iter{t}/. Re-running the command resumes."""
    oracle: str = "pairrm"
    """Preference oracle: `pairrm` (the paper's) or `game` (synthetic games, demo only)."""
    pairrm: str | None = None
    """Local directory of a PairRM checkpoint (either published layout), for --oracle pairrm."""
    pairrm_mode: str = "pairwise"
    """`pairwise` P_ij = sigma(s(y_i, y_j)) as in Sec. 5.1, or `official` sigma(s_i - s_j) as in the released code."""
    iterations: int = 3
    """Self-play iterations T (the paper runs 3)."""
    split_prompts: bool = True
    """Give each iteration its own disjoint slice of the prompts, as the paper does (60k prompts, 3 x 20k)."""
    K: int = 5
    """Responses sampled per prompt (Sec. 5.1: K = 5; Sec. 5.3 ablates K = 2)."""
    eta: float = 1000.0
    """Hedge step of Eq. (4.1); beta = 1/eta. The paper's runs: eta = 1000."""
    log_z: str = "half"
    """Baseline log Z: `half` = eta/2 (Eq. 4.6, the paper's choice) or `estimate` = the K-sample estimate of Eq. (4.5)."""
    selection: str = "pair"
    """Rows of D_t kept per prompt: `pair` = winner and loser (the paper's runs) or `all` = all K (Eq. 4.4)."""
    max_new_tokens: int = 2048
    """Generation length cap (released code: 2048). Responses that hit it are flagged finished=False."""
    temperature: float = 1.0
    """Sampling temperature (paper text 1.0; the released code uses 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling (paper text 1.0; the released code uses 0.9)."""
    gen_batch: int = 8
    """Prompts per batched generate() call (each yields K sequences)."""
    max_length: int = 1024
    """Prompt + response tokens kept for training (released code: 1024)."""
    max_prompt_length: int = 512
    """Prompt tokens kept; longer prompts keep their END (released code: 512)."""
    optimizer: str = "rmsprop"
    """`rmsprop` (the authors' code) or `adamw`."""
    lr: float = 5e-7
    """Peak learning rate (paper: 5e-7)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up; then linear decay to 0 (paper: 0.1)."""
    weight_decay: float = 0.0
    """Weight decay (AdamW only)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold on the global L2 norm."""
    epochs: int = 1
    """Epochs over D_t per iteration (released scripts: 1; the paper's text says 18)."""
    global_batch: int = 64
    """Examples per optimizer step (paper: 64 = 8 per device x 8 GPUs)."""
    micro_batch: int = 8
    """Examples per forward/backward; global_batch / micro_batch micro-steps are accumulated."""
    seed: int = 42
    """Seed for prompt order, sampling and training order."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (log-probs are accumulated in fp32 regardless)."""
    device: str = "auto"
    """`auto` = cuda when available, else cpu."""
    stop_after: str | None = None
    """Stop after this stage of the last unfinished iteration (generate, rank, dataset, train); for debugging."""
    progress: bool = True
    """Show progress bars."""
    demo_groups: int = 100
    """Demo only: copies of each game prompt per iteration, each drawing K samples."""


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
# Win rates and the kept pair (Sec. 5.1).
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
# Data: prompts in, JSONL artifacts out. Errors name the file, the line and the field.
class ArtifactError(ValueError):
    """A prompt file or run artifact that cannot be used; the message names the file and line."""


def _has_type(value, typ):
    types = typ if isinstance(typ, tuple) else (typ,)
    return bool in types if isinstance(value, bool) else isinstance(value, types)


def read_jsonl(path, required: dict[str, type | tuple] = {}):
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
            if not isinstance(row, dict):
                raise ArtifactError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key, typ in required.items():
                if key not in row:
                    raise ArtifactError(f"{path}:{n}: missing field {key!r}")
                if not _has_type(row[key], typ):
                    raise ArtifactError(f"{path}:{n}: field {key!r} should be {getattr(typ, '__name__', typ)}, "
                                        f"got {type(row[key]).__name__}")
            rows.append(row)
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
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional reader; installed with the pinned requirements
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file")
        names = pq.read_schema(path).names
        if column not in names:
            raise ArtifactError(f"{path}: no column {column!r}; columns are {names}")
        prompts = pq.read_table(path, columns=[column]).column(column).to_pylist()
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ArtifactError(f"{path}: row {i}: column {column!r} should be a non-empty string, got {p!r}")
        return prompts
    rows = read_jsonl(path, required={column: str})
    for n, row in enumerate(rows, 1):
        if not row[column].strip():
            raise ArtifactError(f"{path}: record {n}: field {column!r} is empty")
    return [row[column] for row in rows]


DATASET_FIELDS = {"prompt_id": int, "prompt": str, "response": str, "finished": bool,
                  "win_prob": (int, float), "ref_logp": (int, float)}
"""Schema of D_t (dataset.jsonl), one row per kept response; train_7b.py reads the same file.
prompt_id: index of the prompt in this iteration; prompt: raw prompt text (the chat template is applied at
tokenisation); response: the sampled text; finished: it ended with EOS (EOS is then part of y); win_prob:
P-hat(y > pi_t|x) of Eq. (4.5); ref_logp: log pi_t(y|x) summed over response tokens. Optional: log_z
(Eq. 4.5 estimate, used when present and log_z='estimate'), role ('winner', 'loser' or 'all'), k (sample index)."""


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


def collate(pairs, pad_id, padding_side="right"):
    """Pack (prompt_ids, response_ids) pairs into input_ids, attention_mask, response_mask, each (B, T)."""
    T = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
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
def batched_logps(model, pairs, pad_id, batch_size=16, device="cpu", progress=False, desc="log-probs"):
    """sequence_logps over many encoded pairs, in batches, no grad. Returns a float64 list (one per pair)."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        b = {k: v.to(device) for k, v in collate(pairs[i:i + batch_size], pad_id).items()}
        out += sequence_logps(model, **b).double().tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training on D_t (Eq. 4.7). train_7b.py imports batch_schedule, make_optimizer, make_scheduler, example_losses.
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


def make_batch(pairs, rows, idx, pad_id, cfg, device):
    """Collate rows `idx` with their targets: ref_logp, win_prob (and log_z when cfg.log_z == 'estimate')."""
    b = collate([pairs[i] for i in idx], pad_id)
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    history = []
    bar = tqdm(schedule, desc="train (Eq. 4.7)", disable=not cfg.progress, leave=False)
    for step, idx in enumerate(bar):
        t0, n_tok = time.perf_counter(), 0
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for j in range(0, len(idx), cfg.micro_batch):
            b = make_batch(pairs, rows, idx[j:j + cfg.micro_batch], pad_id, cfg, device)
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
# Algorithm 1, step 1: y_1..y_K ~ pi_t(.|x), one batched generate() call per batch of prompts.
def eos_ids(model, tokenizer):
    """Every token id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts, cfg, seed, device="cpu"):
    """K samples per prompt. Returns one dict per prompt: {"responses": [K str], "finished": [K bool]}.

    Sampling is plain ancestral sampling at cfg.temperature / cfg.top_p (top-k off), seeded per prompt batch so a
    resumed or repeated run draws the same samples. A response is cut at its first EOS; one that never emits EOS
    within cfg.max_new_tokens is kept and flagged finished=False. Decoding keeps special tokens, so the text
    re-tokenises to the ids that were sampled.
    """
    from transformers import GenerationConfig
    model.eval()
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                               max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.K,
                               pad_token_id=pad_id, eos_token_id=stop)
    out = []
    for i in tqdm(range(0, len(prompts), cfg.gen_batch), desc="generate", disable=not cfg.progress, leave=False):
        chunk = prompts[i:i + cfg.gen_batch]
        b = collate([(prompt_ids(tokenizer, p), []) for p in chunk], pad_id, padding_side="left")
        torch.manual_seed(seed * 1_000_003 + i)
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
class GameOracle:
    """A synthetic oracle: each prompt carries a preference game (hedge_toy) over a small set of responses.

    games: {prompt: (P, responses)} with P (n, n) over the n well-formed responses. A malformed response (any text
    not in the list, or an unfinished one) loses to every well-formed response and ties with other malformed ones,
    so the game the policy plays is the (n+1)-action `extended(prompt)`.
    """

    def __init__(self, games: dict[str, tuple[np.ndarray, list[str]]]):
        self.games = {x: (hedge_toy.validate_preference(P), list(ys)) for x, (P, ys) in games.items()}

    def extended(self, prompt):
        """(n+1, n+1) matrix: the game plus a last 'malformed' action."""
        P, ys = self.games[prompt]
        n = len(ys)
        Q = np.full((n + 1, n + 1), 0.5)
        Q[:n, :n], Q[:n, n], Q[n, :n] = P, 1.0, 0.0
        return Q

    def action(self, prompt, response):
        """Index of the response among the prompt's well-formed ones; n for a malformed response."""
        ys = self.games[prompt][1]
        return ys.index(response.strip()) if response.strip() in ys else len(ys)

    def __call__(self, prompt, responses):
        if prompt not in self.games:
            raise KeyError(f"GameOracle has no game for prompt {prompt!r}")
        a = [self.action(prompt, r) for r in responses]
        return self.extended(prompt)[np.ix_(a, a)]                                        # (K, K)


def make_oracle(cfg, device="cpu", games=None):
    """The oracle named by cfg.oracle: PairRM from a local checkpoint (the paper's), or a GameOracle."""
    if cfg.oracle == "game":
        if games is None:
            raise ValueError("--oracle game needs games (it is used by the demo and tests)")
        return GameOracle(games)
    if cfg.oracle == "pairrm":
        if not cfg.pairrm:
            raise ValueError("--oracle pairrm needs --pairrm DIR (a local PairRM checkpoint)")
        ranker = pairrm.PairRM.from_pretrained(cfg.pairrm, device=device)
        return pairrm.PairRMOracle(ranker, mode=cfg.pairrm_mode, progress=cfg.progress)
    raise ValueError(f"oracle must be 'pairrm' or 'game', got {cfg.oracle!r}")


def rank(oracle, prompts, generations, progress=False):
    """Fill one K x K matrix per prompt. Uses the oracle's batched `batch(prompts, candidates)` when it has one."""
    cands = [g["responses"] for g in generations]
    if hasattr(oracle, "batch"):
        mats = [np.asarray(m, dtype=np.float64) for m in oracle.batch(prompts, cands)]
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
    """One row per kept response (DATASET_FIELDS without ref_logp, which needs pi_t: see `dataset` stage)."""
    rows = []
    for i, (x, g, P) in enumerate(zip(prompts, generations, matrices)):
        wp = win_rates(P)                                                                 # (K,) Eq. (4.5)
        lz = float(log_z_estimate(wp, cfg.eta))                                           # Eq. (4.5), log Z
        if cfg.selection == "all":
            keep = [(k, "all") for k in range(len(wp))]
        elif cfg.selection == "pair":
            w, l = select_pair(wp)
            keep = [(int(w), "winner"), (int(l), "loser")]
        else:
            raise ValueError(f"selection must be 'pair' or 'all', got {cfg.selection!r}")
        rows += [{"prompt_id": i, "prompt": x, "response": g["responses"][k], "finished": g["finished"][k],
                  "win_prob": float(wp[k]), "log_z": lz, "role": role, "k": k} for k, role in keep]
    return rows


def check_dataset(rows, path="dataset"):
    """Schema check for rows read from `path` (DATASET_FIELDS); errors name the record and field."""
    for n, row in enumerate(rows, 1):
        for key, typ in DATASET_FIELDS.items():
            if key not in row:
                raise ArtifactError(f"{path}: record {n}: missing field {key!r}")
            if not _has_type(row[key], typ):
                raise ArtifactError(f"{path}: record {n}: field {key!r} should be "
                                    f"{getattr(typ, '__name__', typ)}, got {type(row[key]).__name__}")
        if not 0.0 <= row["win_prob"] <= 1.0:
            raise ArtifactError(f"{path}: record {n}: win_prob {row['win_prob']} is outside [0, 1]")
        if not math.isfinite(row["ref_logp"]):
            raise ArtifactError(f"{path}: record {n}: ref_logp {row['ref_logp']} is not finite")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The run directory: OUT/iter{t}/{generations,preferences,dataset}.jsonl, model/, metrics.json. Each file is
# written atomically, so a stage whose file exists is finished; re-running the same command resumes.
def resolve_device(name):
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def load_policy(path, cfg, device):
    """A causal LM and its tokenizer from a local directory (no hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
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


def run_iteration(cfg, t, prompts, model_dir, oracle, device):
    """One iteration of Algorithm 1: pi_t (model_dir) -> pi_{t+1} (OUT/iter{t}/model). Returns the new model dir."""
    d = Path(cfg.out) / f"iter{t}"
    d.mkdir(parents=True, exist_ok=True)
    f_gen, f_pref, f_data, m_dir = d / "generations.jsonl", d / "preferences.jsonl", d / "dataset.jsonl", d / "model"
    cache = {}

    def policy():                                                # pi_t, loaded once and only when a stage needs it
        if "m" not in cache:
            cache["m"] = load_policy(model_dir, cfg, device)
        return cache["m"]

    def stop(stage):
        return cfg.stop_after == stage

    # Step 1: generate.
    if not f_gen.exists():
        gens = generate_responses(*policy(), prompts, cfg, seed=cfg.seed + 7919 * t, device=device)
        write_jsonl(f_gen, ({"prompt_id": i, "prompt": x, **g} for i, (x, g) in enumerate(zip(prompts, gens))))
    gens = read_jsonl(f_gen, {"prompt_id": int, "prompt": str, "responses": list, "finished": list})
    for n, g in enumerate(gens, 1):
        if len(g["responses"]) != cfg.K or len(g["finished"]) != cfg.K or g["prompt"] != prompts[g["prompt_id"]]:
            raise ArtifactError(f"{f_gen}:{n}: expected K={cfg.K} responses for prompt {g['prompt_id']} of this "
                                f"iteration; the file belongs to another run or config - delete it to regenerate")
    if len(gens) != len(prompts):
        raise ArtifactError(f"{f_gen}: {len(gens)} records for {len(prompts)} prompts; delete it to regenerate")
    if stop("generate"):
        return None
    # Step 2: rank.
    if not f_pref.exists():
        mats = rank(oracle, prompts, gens, progress=cfg.progress)
        write_jsonl(f_pref, ({"prompt_id": i, "P": m.tolist()} for i, m in enumerate(mats)))
    prefs = read_jsonl(f_pref, {"prompt_id": int, "P": list})
    mats = []
    for n, r in enumerate(prefs, 1):
        try:
            mats.append(hedge_toy.validate_preference(np.asarray(r["P"], dtype=np.float64)))
        except ValueError as e:
            raise ArtifactError(f"{f_pref}:{n}: {e}") from None
    if stop("rank"):
        return None
    # Step 3: D_t, with log pi_t(y|x) as the reference (pi_ref = pi_t: no second model is held).
    if not f_data.exists():
        model, tok = policy()
        rows = build_dataset(prompts, gens, mats, cfg)
        pairs, _ = encode_rows(tok, rows, cfg)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for row, lp in zip(rows, batched_logps(model, pairs, pad, cfg.micro_batch, device, cfg.progress)):
            row["ref_logp"] = lp
        write_jsonl(f_data, rows)
    rows = check_dataset(read_jsonl(f_data), f_data)
    if stop("dataset"):
        return None
    # Step 4: train (Eq. 4.7) and save pi_{t+1}.
    if not (m_dir / "config.json").exists():
        model, tok = policy()
        torch.manual_seed(cfg.seed + t)
        history = train_policy(model, tok, rows, dataclasses.replace(cfg, seed=cfg.seed + t), device)
        save_policy(model, tok, m_dir)
        stats = {"iteration": t, "prompts": len(prompts), "rows": len(rows),
                 "unfinished": sum(not f for g in gens for f in g["finished"]),
                 "mean_win_prob_kept": float(np.mean([r["win_prob"] for r in rows])),
                 "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "history": history}
        (d / "metrics.json").write_text(json.dumps(stats, indent=1))
        print(f"iter {t}: {len(rows)} rows, loss {stats['first_loss']:.4g} -> {stats['last_loss']:.4g}")
    return m_dir


def run(cfg, oracle=None, games=None):
    """Algorithm 1: for t = 0..T-1, pi_{t+1} = SPPO-step(pi_t). Resumes from whatever OUT already holds."""
    device = resolve_device(cfg.device)
    if cfg.model is None or cfg.prompts is None:
        raise ValueError("run needs --model DIR and --prompts FILE")
    prompts = load_prompts(cfg.prompts, cfg.prompt_column)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    oracle = oracle or make_oracle(cfg, device, games)
    model_dir = cfg.model
    for t in range(cfg.iterations):
        model_dir = run_iteration(cfg, t, iteration_prompts(prompts, cfg, t), model_dir, oracle, device)
        if model_dir is None:
            print(f"stopped after stage {cfg.stop_after!r} of iteration {t}; re-run the command to resume")
            return None
    return model_dir


# ----------------------------------------------------------------------------------------------------------------
# The arena (Fig. 3): pairwise win rates P(pi_i > pi_j) between policies, exact or judged by PairRM.
def arena_exact(policies, P):
    """W[i, j] = P(pi_i > pi_j) = pi_i^T P pi_j (Sec. 3) for policies (m, n) on one finite game P (n, n)."""
    pis = np.asarray(policies, dtype=np.float64)
    return pis @ hedge_toy.validate_preference(P) @ pis.T                               # (m, m)


def best_of_n(ranker, prompts, generations):
    """Best-of-n (Table 1's best-of-16 rows): the PairRM-best (max s_PairRM) of each prompt's n samples."""
    best = ranker.best_of_n(prompts, [g["responses"] for g in generations])
    return [g["responses"][b] for g, b in zip(generations, best)]


def arena_responses(model_dirs, prompts, cfg, ranker=None, best_of=1, device="cpu"):
    """One response per held-out prompt from each policy: a sample, or the PairRM-best of `best_of` samples."""
    out = []
    for d in tqdm(model_dirs, desc="arena: generate", disable=not cfg.progress, leave=False):
        model, tok = load_policy(d, cfg, device)
        gens = generate_responses(model, tok, prompts, dataclasses.replace(cfg, K=best_of), cfg.seed, device)
        out.append(best_of_n(ranker, prompts, gens) if best_of > 1 else [g["responses"][0] for g in gens])
    return out


def arena_pairrm(ranker, prompts, responses):
    """Fig. 3 for language models: W[i, j] = mean over prompts of P(y_i > y_j | x) = sigma(compare(y_i, y_j)),
    with its standard error over prompts. responses[i][n]: policy i's response to prompt n. Returns (W, SE)."""
    m, N = len(responses), len(prompts)
    W, SE = np.full((m, m), 0.5), np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            p = torch.sigmoid(ranker.compare(prompts, responses[i], responses[j])).double().numpy()   # (N,)
            W[i, j], W[j, i] = p.mean(), 1 - p.mean()
            SE[i, j] = SE[j, i] = p.std(ddof=1) / math.sqrt(N) if N > 1 else float("nan")
    return W, SE


def plot_arena(W, labels, path, se=None, n_prompts=None, title="P(row beats column)"):
    """Annotated heatmap of a win-rate matrix (the paper's Fig. 3), with +- standard errors when given."""
    import matplotlib.pyplot as plt
    m = len(labels)
    fig, ax = plt.subplots(figsize=(1.1 * m + 2.5, 1.0 * m + 1.6))
    im = ax.imshow(W, cmap="RdBu_r", vmin=0, vmax=1)
    for i in range(m):
        for j in range(m):
            txt = f"{W[i, j]:.2f}" + (f"\n\u00b1{se[i, j]:.2f}" if se is not None and i != j else "")
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if abs(W[i, j] - .5) > .3 else "k")
    ax.set_xticks(range(m), labels, rotation=45, ha="right")
    ax.set_yticks(range(m), labels)
    ax.set_title(title + (f" ({n_prompts} prompts)" if n_prompts else ""))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Tabular SPPO: the loss of Eq. (4.7) on a softmax table, against exact Hedge (Eq. 4.1) from hedge_toy.
def tabular_sppo(P, eta, T, K=5, groups=64, log_z="half", pi1=None, seed=0):
    """T iterations of SPPO on a softmax policy table; returns the iterates pi_1..pi_T as an array (T, n).

    Each iteration samples `groups` x K responses from pi_t, estimates P-hat(y_k > pi_t) from the K x K block
    (Eq. 4.5), and minimises the mean of sppo_loss over the samples by L-BFGS from pi_t:
    log_z="half" uses the constant eta/2 (Eq. 4.6), "exact" the exact log Z_{pi_t} at step eta (Eq. 4.2,
    hedge_toy), a number that constant (e.g. App. A's ordered value log((e^eta - 1)/eta)). With
    K -> inf and groups -> inf both approach Hedge; finite K shrinks the step to eta (K-1)/K (the self-term 1/2).
    """
    P = hedge_toy.validate_preference(P)
    if log_z not in ("half", "exact") and not isinstance(log_z, (int, float)):
        raise ValueError(f"log_z must be 'half', 'exact' or a number, got {log_z!r}")
    n = P.shape[0]
    rng = np.random.default_rng(seed)
    pi = np.full(n, 1.0 / n) if pi1 is None else np.asarray(pi1, dtype=np.float64)
    theta = torch.tensor(np.log(pi), dtype=torch.float64, requires_grad=True)
    out = []
    for _ in range(T):
        pi = torch.softmax(theta, 0).detach().numpy()
        out.append(pi)
        y = rng.choice(n, size=(groups, K), p=pi)                                         # (G, K) samples
        wp = torch.from_numpy(win_rates(P[y[:, :, None], y[:, None, :]]).ravel())        # (G*K,) Eq. (4.5)
        idx = torch.from_numpy(y.ravel())
        ref = torch.log_softmax(theta, 0).detach()[idx]
        lz = (None if log_z == "half" else float(hedge_toy.log_partition(P, pi, eta)) if log_z == "exact"
              else float(log_z))                                                          # Eq. (4.6) / (4.2)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = sppo_loss(torch.log_softmax(theta, 0)[idx], ref, wp, eta, lz).mean()  # Eq. (4.7)
            loss.backward()
            return loss
        opt.step(closure)
    return np.array(out)


# ----------------------------------------------------------------------------------------------------------------
# The demo: a tiny Llama that learns the von Neumann winner of two games, tracked against exact Hedge.
DEMO_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "user", "=>", "play", "rps", "weighted", "rock", "paper",
              "scissors", "big", "sharp", "lizard", "spock"]
DEMO_START = {"play rps": [0.7, 0.2, 0.1], "play weighted rps": [0.7, 0.2, 0.1]}
"""pi_0 of the demo: a warm start far from equilibrium, as an instruction-tuned model is (Sec. 5 starts from one)."""


def demo_games():
    """{prompt: (P, responses)}: RPS (uniform equilibrium) and weighted RPS (equilibrium (2/7, 1/7, 4/7));
    'big rock' and 'sharp scissors' are 2 tokens, so summed log-probs matter."""
    return {"play rps": (hedge_toy.rock_paper_scissors(), ["rock", "paper", "scissors"]),
            "play weighted rps": (hedge_toy.weighted_rps(), ["big rock", "paper", "sharp scissors"])}


def build_tiny_policy(out_dir, arch="llama", vocab=DEMO_VOCAB, hidden=32, layers=2, seed=0):
    """Save a random-init tiny causal LM and a word-level tokenizer (with a chat template) to out_dir, locally.

    It loads back through the same AutoModelForCausalLM / AutoTokenizer.from_pretrained path as a real checkpoint.
    arch: "llama" or "mistral".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")                                        # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<s> user {{ m['content'] }} =>{% endfor %}"
    Config, Model = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    config = Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Model(config)
    save_policy(model, tokenizer, out_dir)
    return str(out_dir)


def response_logps(model, tokenizer, prompt, responses):
    """log pi(y|x) of each finished response (EOS included), exactly, by teacher forcing. Returns (n,) float64."""
    pairs = [encode_example(tokenizer, prompt, y, True, 10 ** 6, 10 ** 6)[:2] for y in responses]
    pad = tokenizer.pad_token_id
    return np.array(batched_logps(model, pairs, pad, batch_size=len(pairs), device=model.device))


def exact_policy(model, tokenizer, prompt, responses):
    """The model's exact distribution over the n well-formed responses plus 'malformed' (everything else): (n+1,)."""
    p = np.exp(response_logps(model, tokenizer, prompt, responses))
    return np.append(p, max(0.0, 1.0 - p.sum()))


def warm_start(model, tokenizer, targets, steps=300, lr=1e-2):
    """Fit pi_0(.|x) to a target distribution over well-formed responses: min -sum_y q(y|x) log pi(y|x)."""
    prompts, pairs, weights = [], [], []
    for x, (ys, q) in targets.items():
        for y, w in zip(ys, q):
            pairs.append(encode_example(tokenizer, x, y, True, 10 ** 6, 10 ** 6)[:2])
            weights.append(w)
    batch, w = collate(pairs, tokenizer.pad_token_id), torch.tensor(weights)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = -(w * sequence_logps(model, **batch)).sum()
        loss.backward()
        opt.step()
    return model


def demo_config(**overrides):
    """The demo's settings: an SPPOConfig for a 16-token world (eta = 3: 20 Hedge steps cut both gaps by ~4x)."""
    base = dict(out="runs/demo", oracle="game", iterations=20, split_prompts=False, K=5, eta=3.0, selection="all",
                max_new_tokens=3, gen_batch=256, max_length=32, max_prompt_length=16, optimizer="adamw", lr=5e-3,
                warmup_ratio=0.1, epochs=12, global_batch=256, micro_batch=1024, seed=0, demo_groups=100)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SPPOConfig(**base)


def demo_metrics(cfg, games, model_dirs):
    """For each game: exact policies pi_0..pi_T, gaps of the averaged model policy and of averaged Hedge from the
    model's own pi_0 at the same eta (Thm 4.1), and the one-step error TV(pi_{t+1}, Hedge step from pi_t)."""
    oracle = GameOracle(games)
    pis = {x: [] for x in games}
    for d in model_dirs:
        model, tok = load_policy(d, cfg, "cpu")
        for x, (_, ys) in games.items():
            pis[x].append(exact_policy(model, tok, x, ys))
    out = {}
    for x in games:
        Q, pi = oracle.extended(x), np.array(pis[x])                                     # (n+1, n+1), (T+1, n+1)
        hedge = hedge_toy.hedge_trajectory(Q, cfg.eta, len(pi), pi1=pi[0])              # Eq. (4.1) from pi_0
        avg = np.cumsum(pi, 0) / np.arange(1, len(pi) + 1)[:, None]                     # pi-bar_t
        havg = np.cumsum(hedge, 0) / np.arange(1, len(pi) + 1)[:, None]
        tv = [0.5 * np.abs(pi[t + 1] - hedge_toy.hedge_step(Q, pi[t], cfg.eta)).sum() for t in range(len(pi) - 1)]
        out[x] = {"policy": pi.tolist(), "gap": [hedge_toy.duality_gap(Q, p) for p in avg],
                  "hedge_gap": [hedge_toy.duality_gap(Q, p) for p in havg], "tv": tv,
                  "last_gap": [hedge_toy.duality_gap(Q, p) for p in pi]}
    return out


def plot_demo(metrics, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, (x, m) in zip(axes[0], metrics.items()):
        t = np.arange(len(m["gap"]))
        ax.plot(t, m["gap"], "o-", label="tiny LM, averaged policy (SPPO)")
        ax.plot(t, m["hedge_gap"], "s--", label="tabular Hedge (4.1), averaged")
        ax.plot(t, m["last_gap"], ":", color="gray", label="tiny LM, last iterate")
        ax.set(title=f"prompt: '{x}'", xlabel="iteration t", ylabel="duality gap", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo(cfg, figure="figures/demo_gap.png"):
    """Build pi_0, run Algorithm 1 with the game oracle, print the gap table and save the plot. Returns metrics."""
    games = demo_games()
    torch.set_num_threads(1)                     # a 16-token, hidden-32 model: thread sync costs more than it saves
    out = Path(cfg.out)
    pi0 = out / "pi0"
    if not (pi0 / "config.json").exists():
        build_tiny_policy(out / "pi0.init", seed=cfg.seed)
        model, tok = load_policy(out / "pi0.init", cfg, "cpu")
        warm_start(model, tok, {x: (games[x][1], DEMO_START[x]) for x in games})
        save_policy(model, tok, pi0)
        shutil.rmtree(out / "pi0.init")
    write_jsonl(out / "prompts.jsonl", ({"prompt": x} for x in games for _ in range(cfg.demo_groups)))
    cfg = dataclasses.replace(cfg, model=str(pi0), prompts=str(out / "prompts.jsonl"))
    if run(cfg, oracle=GameOracle(games)) is None:
        return None
    dirs = [pi0] + [out / f"iter{t}" / "model" for t in range(cfg.iterations)]
    metrics = demo_metrics(cfg, games, dirs)
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=1))
    head = f"{'t':>3} " + " ".join(f"| {x[:18]:>18}: {'LM gap':>7} {'Hedge':>7} {'TV step':>7} " for x in games)
    print(head)
    for t in range(cfg.iterations + 1):
        print(f"{t:>3} " + " ".join(f"| {'':>18}  {m['gap'][t]:7.4f} {m['hedge_gap'][t]:7.4f} "
                                    f"{(m['tv'][t - 1] if t else float('nan')):7.4f} " for m in metrics.values()))
    for x, m in metrics.items():
        ok = m["gap"][-1] <= m["gap"][0] / 3 and m["gap"][-1] <= max(2 * m["hedge_gap"][-1], m["hedge_gap"][-1] + 0.02)
        print(f"'{x}': gap {m['gap'][0]:.4f} -> {m['gap'][-1]:.4f} (Hedge {m['hedge_gap'][-1]:.4f}); "
              f"<= 1/3 of start and <= max(2 Hedge, Hedge + 0.02): {'yes' if ok else 'NO'}")
    plot_demo(metrics, figure)
    # Fig. 3: P(pi_s > pi_t), exact, averaged over the two games' prompts.
    ts = sorted({0, 1, 2, 3, 5, 10, cfg.iterations} & set(range(cfg.iterations + 1)))
    oracle = GameOracle(games)
    W = np.mean([arena_exact(np.array(m["policy"])[ts], oracle.extended(x)) for x, m in metrics.items()], 0)
    arena_png = Path(figure).with_name(Path(figure).stem.replace("_gap", "") + "_arena.png")
    plot_arena(W, [f"pi_{t}" for t in ts], arena_png, title="demo: P(row beats column), exact")
    print(f"wrote {figure}, {arena_png} and {out / 'demo_metrics.json'}")
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# CLI: one flag per SPPOConfig field, its help the field's docstring.
def field_docs(cls):
    """{field: docstring} read from the class source (the attribute docstrings under each field)."""
    import ast
    import inspect
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value.strip() for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parse_args(argv=None):
    docs = field_docs(SPPOConfig)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", action="store_true", help="run the tiny-model demo (demo defaults for unset flags)")
    p.add_argument("--figure", default="figures/demo_gap.png", help="demo: where to save the gap plot")
    for f in dataclasses.fields(SPPOConfig):
        kind = bool if f.type in ("bool",) else int if f.type == "int" else float if f.type == "float" else str
        kw = dict(default=None, help=docs.get(f.name, ""))
        if kind is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, **kw)
    return p.parse_args(argv)


def main(argv=None):
    import matplotlib
    matplotlib.use("Agg")                                   # figures go to files; no display needed
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                       # weight loading/saving bars: noise next to ours
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SPPOConfig)}
    if args.demo:
        t0 = time.perf_counter()
        metrics = demo(demo_config(**given), args.figure)
        print(f"demo finished in {time.perf_counter() - t0:.1f} s")
        return 0 if metrics is not None or given["stop_after"] else 1
    cfg = SPPOConfig(**{k: v for k, v in given.items() if v is not None})
    final = run(cfg)
    if final is not None:
        print(f"pi_{cfg.iterations} saved in {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
