"""Algorithm 1, step 4: pi_{t+1} = argmin of the loss (losses.LOSSES, Eq. 4.7 by default) over D_t, from pi_t.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. Conventions: sppo.py's
docstring. What a trainer needs, shared by sppo.py (one process) and train_7b.py (FSDP2), never repeated there: D_t's
rows encoded and truncated as one group per prompt's pair (encode_rows, group_size), the order of the optimizer steps
(batch_schedule, micro_batches, train_schedule), the optimizer and LR schedule of the paper's recipe (make_optimizer,
make_scheduler), a collated batch and its per-row loss (make_batch, example_losses), the fit itself (train_policy,
with --fit-tol), and LoRA adapters (add_adapters, merge_adapters: Hu et al., arXiv 2106.09685, through peft).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import policy
from cli import ArtifactError, ConfigError
from sppo_config import LOSSES


# ----------------------------------------------------------------------------------------------------------------
# D_t as the trainer reads it: encoded once, truncated per group.
def encode_rows(tokenizer, rows, cfg, complete=True):
    """Encode dataset rows once, truncated group by group (cfg.truncation; groups: group_size). Returns the list of
    (prompt_ids, response_ids) and the count of truncated rows. complete=False: rows still being built in step 3,
    before the loss's own columns are added (their log-probs are what those columns need)."""
    g, pairs, n_cut, cache = group_size(rows, cfg, complete), [], 0, {}
    for i in range(0, len(rows), g):
        group = []
        for row in rows[i:i + g]:
            if row["prompt"] not in cache:
                cache[row["prompt"]] = policy.prompt_ids(tokenizer, row["prompt"])
            group.append((cache[row["prompt"]], policy.response_tokens(tokenizer, row, cfg.truncation)))
        for p, r, cut in policy.truncate(group, cfg.max_length, cfg.max_prompt_length, cfg.truncation):
            pairs.append((p, r))
            n_cut += cut
    return pairs, n_cut


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 4: training on D_t (Eq. 4.7). train_7b.py imports batch_schedule, make_optimizer,
# make_scheduler, make_batch and example_losses.
def group_size(rows, cfg, complete=True):
    """Rows that stay together in batching and truncation: 2 with selection='pair' (rows 2i, 2i+1 are one prompt's
    winner and loser: the authors' trainer sees a pair as one example), 1 with selection='all' (each of the K rows is
    its own example of Eq. 4.4; the released code has no such mode)."""
    if cfg.selection == "all":
        return 1
    bad = next((n for n in range(0, len(rows), 2) if n + 1 == len(rows) or rows[n]["prompt_id"] !=
                rows[n + 1]["prompt_id"]), None)
    if bad is not None:
        raise ArtifactError(f"dataset: record {bad + 1}: --selection pair needs rows in pairs (a prompt's winner, "
                            f"then its loser), but it has no pair after it; pass --selection all")
    loss, role = LOSSES[cfg.loss], lambda n, r: r.get("role", ("winner", "loser")[n % 2])     # noqa: E731
    bad = next((n for n, r in enumerate(rows) if (loss.kind == "pair" and role(n, r) != ("winner", "loser")[n % 2])
                or (complete and any(c not in r for c in loss.columns))), None)
    if bad is not None:
        raise ArtifactError(f"dataset: record {bad + 1}: --loss {cfg.loss} needs each prompt's winner, then its loser"
                            + (f", with {', '.join(loss.columns)} (sppo.py writes it)" if loss.columns else "") +
                            "; recompute it with --restart-from dataset")
    return 2


def batch_schedule(n, global_batch, epochs, seed, group=1):
    """Row indices of each optimizer step: a seeded permutation of the n / group units (pairs or rows) per epoch,
    cut into global batches of `global_batch` units (the last may be short), each unit's rows kept together."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(epochs):
        perm = torch.randperm(n // group, generator=g).tolist()
        steps += [[u * group + j for u in perm[i:i + global_batch] for j in range(group)]
                  for i in range(0, n // group, global_batch)]
    return steps


def micro_batches(idx, pairs, micro, group=1, by_length=True):
    """One optimizer step's rows `idx` cut into micro-batches of `micro` units (a unit: `group` rows kept together,
    a prompt's winner and loser). by_length: the units are first sorted by their longest row (longest first; ties
    keep the seeded order), so each micro-batch pads little. The step's loss, the sum of per-row losses / len(idx),
    and its gradient do not depend on the cut (up to fp32 summation order): which rows form the step is unchanged.
    (--loss kto is the exception: its KL estimate is the micro-batch's mean, so the cut picks the rows it averages.)
    pairs: the (prompt_ids, response_ids) of every row. Returns [[row index, ...], ...]."""
    units = [idx[j:j + group] for j in range(0, len(idx), group)]
    if by_length:
        units.sort(key=lambda u: -max(len(pairs[i][0]) + len(pairs[i][1]) for i in u))      # stable
    return [[i for u in units[j:j + micro] for i in u] for j in range(0, len(units), micro)]


def train_schedule(rows, cfg):
    """(steps, schedule_length, group): the row indices of each optimizer step trained (cfg.epochs epochs), the LR
    schedule's length in steps (cfg.schedule_epochs, default cfg.epochs: Sec. 5.1 keeps the model after epoch 1 of
    an 18-epoch schedule; uclaml/SPPO's run_sppo_*.sh train 1 epoch of a 1-epoch one, pipeline.sh --num 1) and the
    group size. selection='pair': global and micro batches count pairs, and the step's loss, the sum over its rows
    / its row count, is the authors' mean over pairs of (l_w + l_l)/2 (sppo_pair_loss, form='released')."""
    g = group_size(rows, cfg)
    steps = batch_schedule(len(rows), cfg.global_batch, cfg.epochs, cfg.seed, g)
    per_epoch = math.ceil(len(rows) // g / cfg.global_batch)
    return steps, per_epoch * (cfg.schedule_epochs or cfg.epochs), g


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


def example_losses(model, batch, cfg):
    """cfg.loss (LOSSES) per row of a collated batch carrying ref_logp, win_prob (and the loss's columns; log_z with
    --log-z estimate). Returns (B,) fp32 whose sum over the step's rows / its row count is the step's loss.

    A pair loss reads rows 2i, 2i+1 as one prompt's winner and loser (group_size keeps them in one micro-batch) and
    gives both rows the pair's loss, so sum / rows = the mean over pairs."""
    logp = policy.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                 cu_seq_lens=batch.get("cu_seq_lens"))                                        # (B,)
    loss = LOSSES[cfg.loss]
    values = loss.fn(logp, batch, cfg)                                          # (B,) row loss, (B/2,) pair loss
    return values if loss.kind == "row" else values.repeat_interleave(2)


def make_batch(pairs, rows, idx, pad, cfg, device):
    """Collate rows `idx` (padded, or packed into one sequence with cfg.pack) with their targets: ref_logp, win_prob
    (log_z when cfg.log_z == 'estimate', and the loss's own columns: pair_prob for sppo_pair)."""
    b = policy.collate([pairs[i] for i in idx], pad, multiple=policy.pad_multiple(device), packed=cfg.pack)
    for name in ("ref_logp", "win_prob", *("log_z",) * (cfg.log_z == "estimate"), *LOSSES[cfg.loss].columns):
        b[name] = torch.tensor([rows[i][name] for i in idx], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


FIT_PATIENCE = 5
"""--fit-tol: failed epochs in a row (each one halving the rate) before the fit stops. AdamW's step does not shrink
with the gradient, so near a minimum it overshoots: one failed epoch is not yet convergence."""


class DivergedError(RuntimeError):
    """A non-finite loss or gradient: the run stops; the model keeps the weights of the last good step."""


def train_policy(model, tokenizer, rows, cfg, device="cpu", on_step=None):
    """theta_{t+1} = argmin_theta E_{D_t}[...]^2 (Eq. 4.7; or cfg.loss: example_losses), starting from pi_t = `model`.

    rows: dataset rows (runs.DATASET_FIELDS) with ref_logp computed by pi_ref (pi_t, or pi_0 with --reference
    initial) in the dataset stage, so no second model is held.
    Steps come from train_schedule, micro-batches from micro_batches (pairs stay in one; grouped by length with
    cfg.group_by_length; padding-free with cfg.pack, policy.collate). Each optimizer step sums per-row losses over
    micro-batches and divides by its row count (gradient accumulation gives the same gradient as one big batch).
    With cfg.fit_tol > 0 each epoch's mean loss (its last step's `epoch_loss`) is judged: below (1 - fit_tol) times
    the best so far, the weights it started from become the best; otherwise the model goes back to the best weights
    at half the learning rate, and after FIT_PATIENCE such epochs in a row the fit stops at the best (cfg.epochs is
    the cap). With one full-batch step per epoch the loss judged is exact, so a fit never ends above its start.
    Returns a list of per-step metrics; `lr` is the rate the step used.
    """
    pairs, n_cut = encode_rows(tokenizer, rows, cfg)
    if n_cut:
        print(f"train: {n_cut} of {len(rows)} examples truncated to max_length={cfg.max_length} / "
              f"max_prompt_length={cfg.max_prompt_length} ({cfg.truncation} rule)")
    schedule, total, group = train_schedule(rows, cfg)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    sched = make_scheduler(opt, total, cfg.warmup_ratio)
    model.train()
    history, per_epoch, best, stale, restored = [], len(schedule) // cfg.epochs, math.inf, 0, False
    bar = tqdm(schedule, desc="train (Eq. 4.7)", disable=not cfg.progress, leave=False)
    for step, idx in enumerate(bar):
        if cfg.fit_tol and step % per_epoch == 0:                 # the weights this epoch's loss is measured on
            start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t0, n_tok = time.perf_counter(), 0
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for mb in micro_batches(idx, pairs, cfg.micro_batch, group, cfg.group_by_length):    # a pair: one micro-batch
            b = make_batch(pairs, rows, mb, policy.pad_id(tokenizer), cfg, device)
            losses = example_losses(model, b, cfg)                                         # (micro,)
            (losses.sum() / len(idx)).backward()
            loss_sum += losses.detach().sum().item()
            n_tok += int(b["attention_mask"].sum())
        loss = loss_sum / len(idx)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise DivergedError(f"step {step}: loss {loss}, grad norm {gnorm} is not finite; stopped before the "
                                f"update, the model keeps the last good weights (try a lower lr or eta)")
        lr = sched.get_last_lr()[0]                                                     # the rate of this step
        opt.step()
        sched.step()
        history.append({"step": step, "loss": loss, "grad_norm": gnorm, "lr": lr,
                        "tokens_per_s": n_tok / (time.perf_counter() - t0)})
        bar.set_postfix(loss=f"{loss:.4g}")
        if on_step:
            on_step(history[-1])
        if cfg.fit_tol and (step + 1) % per_epoch == 0:            # fit until the loss stops falling (--fit-tol)
            history[-1]["epoch_loss"] = float(np.mean([h["loss"] for h in history[-per_epoch:]]))
            if restored:                                           # it started from best_state: its loss is `best`
                restored = False
            elif history[-1]["epoch_loss"] < best * (1 - cfg.fit_tol):
                best, stale, best_state = history[-1]["epoch_loss"], 0, start
            elif (stale := stale + 1) >= FIT_PATIENCE:
                break
            else:                                                  # back to the best weights, at half the rate
                model.load_state_dict(best_state)
                sched.base_lrs, restored = [lr / 2 for lr in sched.base_lrs], True
    if cfg.fit_tol:
        model.load_state_dict(best_state)                          # the epoch of the lowest loss
    return history


# ----------------------------------------------------------------------------------------------------------------
# Step 4 on LoRA adapters (--lora-rank r > 0; Hu et al., "LoRA", arXiv 2106.09685, through peft): each iteration
# trains fresh adapters on pi_t, then merges them, so pi_{t+1} is a full checkpoint like any other. pi_ref = pi_t is
# unchanged: its log-probs are D_t's ref_logp (make_dataset), so no second model is held, LoRA or not.
def lora_problem(model, targets):
    """None when every name of `targets` names a module of `model` that LoRA can adapt (a Linear or Embedding whose
    full name is it or ends with "." + it: peft's rule), else a one-line reason naming the first missing one and the
    names the model has."""
    adaptable = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in adaptable)]
    if not missing:
        return None
    have = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    return f"no Linear/Embedding module {missing[0]!r} in {type(model).__name__}; it has {', '.join(have)}"


def check_lora_targets(cfg):
    """--lora-targets against pi_0 before any work: the model built from --model's config.json on the meta device
    (no weights read). A .gguf pi_0 is checked when it is loaded (add_adapters)."""
    if not cfg.lora_rank or str(cfg.model).endswith(".gguf"):
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model))
    if problem := lora_problem(model, cfg.lora_targets):
        raise ConfigError(f"--lora-targets {' '.join(cfg.lora_targets)}: {problem} (--model {cfg.model})")


def add_adapters(model, cfg):
    """pi_t with fresh LoRA adapters: in every module of cfg.lora_targets, W x becomes W x + (alpha/r) B A x with
    A (r, d_in) Kaiming-uniform from the torch RNG (train() seeds it), B (d_out, r) zero, so at step 0 the model IS
    pi_t and the log-ratio of Eq. (4.7) starts at 0 as in full fine-tuning. W and every other weight are frozen:
    train_policy's optimizer gets the parameters that require grad, A and B only. Dropout cfg.lora_dropout acts on
    the adapters' input in training. Returns peft's wrapper, which takes the same calls as the model."""
    if problem := lora_problem(model, cfg.lora_targets):
        raise ConfigError(f"--lora-targets {' '.join(cfg.lora_targets)}: {problem}")
    from peft import LoraConfig, get_peft_model     # imported here: full fine-tuning never loads peft
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    with warnings.catch_warnings():                 # peft 0.21 asks transformers 5.24 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, lora)


def merge_adapters(model):
    """pi_{t+1} as a plain model: W <- W + (alpha/r) B A in every adapted module and the adapters removed (peft's
    merge_and_unload), every weight trainable again. save_pretrained then writes a full checkpoint: the next
    iteration's pi_t, and what arena.py, train_7b.py and from_pretrained read, with no trace of peft."""
    merged = model.merge_and_unload()
    merged.requires_grad_(True)
    return merged
