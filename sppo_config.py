"""SPPOConfig: every setting of Algorithm 1 (sppo.py), with the paper's defaults, and its validation.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. Defaults are the
paper's (Sec. 5) unless a help text says otherwise; recipes/paper.yaml and recipes/released.yaml set the paper's text
and the authors' released scripts side by side. One field = one flag of `python sppo.py` (cli.py's convention;
`--config FILE.yaml` too); `python sppo.py --help` prints them all with their defaults and choices. RULES is the
table every run checks before any work (cli.check); its errors name the flag, the value and the way out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from transformers import AutoTokenizer

import cli
import committee
import costs
import runs
from cli import ConfigError, arg


LOSSES: dict = {}
"""--loss: name -> losses.Loss (the function, its kind, the settings and dataset columns it reads). The table is
losses.py's, next to the losses; the config reads it for --loss's choices and checks."""

ESTIMATED = frozenset(("prev_win_prob", "half_win_prob", "mix_win_prob"))
"""D_t's columns that estimate a win rate against another policy from all K samples of a prompt (losses.py)."""

PAPER_LOSSES = ("sppo", "sppo_pair", "dpo", "ipo", "sppo_hard", "kto")
"""Sec. 4's losses: the ones --reference initial applies to (a successor's target is for log pi_{t+1}/pi_t)."""

ORACLES: dict = {}
"""--oracle: name -> sppo.OracleEntry (its identity for the manifest, and how to build it). The table is sppo.py's."""

LORA_TARGETS = costs.LORA_TARGETS
"""--lora-targets' default: every attention and MLP projection of a Llama or Mistral decoder layer. Hu et al. (LoRA,
arXiv 2106.09685) adapt attention only; Dettmers et al. (QLoRA, arXiv 2305.14314, Sec. 4) find that adapters on all
the linear layers of the block are needed to match full fine-tuning."""


def finite(x):
    return math.isfinite(x)


def positive(x):
    return math.isfinite(x) and x > 0


def judges_ok(cfg):
    try:
        committee.parse_judges(cfg.judges)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Configuration: every knob of Algorithm 1, defaults from the paper (Sec. 5) and the authors' released code.
@dataclass
class SPPOConfig:
    model: str | None = arg(default=None, path="model", help="pi_0: a local directory (save_pretrained) or a .gguf "
                            "file, converted "
                              "once to safetensors and cached (gguf_checkpoint).")
    prompts: str | None = arg(default=None, path="file", help="Prompts: JSONL with a `prompt` field per line, or "
                              "parquet.")
    prompt_column: str = arg(default="prompt", help="Field / column that holds the prompt text.")
    max_prompts: int = arg(default=0, help="Use the first N prompts of the file (0: all), before the split.")
    out: str = arg(default="runs/sppo", path="out_dir", help="Run directory; iteration t writes OUT/iter{t}/. "
                   "Re-running resumes; one run at a time (OUT/.lock).")
    oracle: str = arg(default="pairrm", choices=ORACLES, help="Step 2's oracle (sppo.ORACLES): `pairrm` (the "
                      "paper's), `committee` (rule judges, committee.py) or `game` (sppo_toy.py passes its games).")
    judges: str = arg(default=committee.DEFAULT_JUDGES, help="--oracle committee: comma-separated judges, of "
                        f"{', '.join(committee.JUDGES)}.")
    pairrm: str | None = arg(default=None, path="dir", help="Local PairRM checkpoint directory (either published "
                             "layout).")
    pairrm_mode: Literal["pairwise", "official"] = arg(default="pairwise", help="P_ij = sigma(s(y_i, y_j)) as "
                                                         "in Sec. 5.1, or sigma(s_i - s_j) as the released code.")
    oracle_prompt: Literal["raw", "templated"] = arg(default="raw", help="What the oracle reads as x: the raw "
                                                       "prompt, or pi_t's chat-templated prompt (released: rank.py).")
    iterations: int = arg(default=3, help="Self-play iterations T (the paper runs 3).")
    split_prompts: bool = arg(default=True, help="A disjoint slice of the prompts per iteration (paper: 3 x 20k).")
    K: int = arg(default=5, help="Responses sampled per prompt (Sec. 5.1: K = 5; Sec. 5.3 ablates K = 2).")
    eta: float = arg(default=1000.0, help="Hedge step of Eq. (4.1); beta = 1/eta. The paper's runs: 1000.")
    log_z: Literal["half", "estimate"] = arg(default="half", help="log Z: eta/2 (Eq. 4.6, the paper's) or the "
                                               "K-sample estimate (Eq. 4.5).")
    selection: Literal["pair", "all"] = arg(default="pair", help="Rows of D_t per prompt: winner and loser (the "
                                              "paper's runs; batches count pairs) or all K (Eq. 4.4; batches count "
                                              "rows).")
    estimate_from: Literal["all", "pair"] = arg(default="all", help="P-hat of the kept rows from all K responses "
                                                  "(Sec. 5.1) or from the pair alone (Sec. 5.3's K = 2; needs "
                                                  "--selection pair).")
    loss: str = arg(default="sppo", choices=LOSSES, help="Step 4's objective (sppo.LOSSES): sppo (Eq. 4.7 per "
        "row), or on each (winner, loser) pair (needs --selection pair): sppo_pair "
        "(Eq. 4.12), dpo (4.13), ipo, sppo_hard (Sec. 4.5), kto (4.15); beta = 1/eta. dpo/ipo = the paper's "
        "iterative baselines. SPPO's successors (losses.py): optimistic, extragradient, mirror_prox, nash_md, mmd "
        "(rows, --selection all), inpo, dno (pairs).")
    reference: Literal["previous", "initial"] = arg(default="previous", help="pi_ref of the loss: pi_t (the "
                                                      "paper's SPPO and iterative DPO/IPO) or pi_0 in every iteration.")
    ipo_target: float = arg(default=0.5, help="--loss ipo: the margin a - b it fits (1/2: the minimiser of Azar et "
                                                "al.'s and TRL's IPO, whose loss is ours / beta^2; 1: Eq. 4.14 as "
                                                "printed).")
    tau: float = arg(default=0.1, help="KL weight towards the reference / magnet mu of --loss nash_md, mmd, "
                                       "mirror_prox and inpo (losses.py): they solve the tau-regularised game.")
    magnet_every: int = arg(default=0, help="The magnet mu of those losses: pi_0 (0), or moved to the current "
                                            "policy every N iterations (MPO, arXiv 2410.16714).")
    max_new_tokens: int = arg(default=2048, help="Generation cap (released: 2048); capped = finished False.")
    temperature: float = arg(default=1.0, help="Sampling temperature (paper text 1.0; released code 0.7).")
    top_p: float = arg(default=1.0, help="Nucleus sampling (paper text 1.0; released code 0.9).")
    gen_batch: int = arg(default=8, help="Prompts per batched generate() call (each yields K sequences).")
    max_length: int = arg(default=1024, help="Prompt + response tokens kept for training (released code: 1024).")
    max_prompt_length: int = arg(default=512, help="Prompt tokens kept; longer prompts keep their END (512).")
    truncation: Literal["ours", "released"] = arg(default="ours", help="`ours`: the prompt keeps its last "
                                                    "max_prompt_length tokens, the response the rest, EOS only when it "
                                                    "finished; `released`: uclaml/SPPO's trainer rule (see truncate).")
    optimizer: Literal["rmsprop", "adamw"] = arg(default="rmsprop", help="RMSprop (the authors' code) or AdamW.")
    lr: float = arg(default=5e-7, help="Peak learning rate (paper: 5e-7).")
    warmup_ratio: float = arg(default=0.1, help="Fraction of steps of linear warm-up, then linear decay to 0.")
    weight_decay: float = arg(default=0.0, help="Weight decay (AdamW only).")
    max_grad_norm: float = arg(default=1.0, help="Gradient clipping threshold on the global L2 norm.")
    epochs: int = arg(default=1, help="Epochs over D_t trained per iteration (released scripts: 1).")
    schedule_epochs: int | None = arg(default=None, help="Length of the LR schedule in epochs (default: "
                                        "--epochs). Sec. 5.1's 'total epochs 18' is this; the paper keeps the model "
                                        "after epoch 1.")
    fit_tol: float = arg(default=0.0, help="Fit each iteration until its loss stops falling: stop once 5 epochs in a "
                         "row have not brought the epoch's mean loss this share below the best so far (--epochs is "
                         "the cap). 0: train --epochs epochs.")
    global_batch: int = arg(default=64, help="Pairs (--selection pair) or rows (all) per optimizer step (paper: 64 "
                              "pairs = 8 per device x 8 GPUs).")
    micro_batch: int = arg(default=8, help="Pairs or rows per forward/backward; the rest is gradient accumulation.")
    group_by_length: bool = arg(default=True, help="Cut each optimizer step's pairs (or rows) into micro-batches "
                                  "sorted by length, so they pad little; the step's rows and loss are unchanged "
                                  "(training.micro_batches).")
    pack: bool = arg(default=True, help="Padding-free micro-batches: the rows packed into one sequence, each row "
                       "attending to itself only (policy.collate, packed=True); same log-probs, no pad tokens.")
    lora_rank: int = arg(default=0, help="Train each iteration's step 4 on fresh LoRA adapters of this rank r (peft; "
                         "Hu et al., arXiv 2106.09685): W + (alpha/r) B A on --lora-targets, merged into pi_{t+1}, "
                         "saved as a full checkpoint. 0: full fine-tuning (the paper's).")
    lora_alpha: float = arg(default=16.0, help="--lora-rank: the adapters' scale numerator; the update is "
                            "(alpha/r) B A.")
    lora_dropout: float = arg(default=0.0, help="--lora-rank: dropout on the adapters' input while training.")
    lora_targets: list[str] = arg(default_factory=lambda: list(LORA_TARGETS), help="--lora-rank: the modules that "
                                  "get adapters, by name (peft's rule: a module whose name ends with one).")
    seed: int = arg(default=42, help="Seed for prompt order, sampling and training order.")
    dtype: Literal["float32", "bfloat16", "float16"] = arg(default="float32", help="Weights dtype (log-probs "
                                                              "are accumulated in fp32 regardless).")
    device: str = arg(default="auto", help="`auto` = cuda when available, else cpu; or a torch device name.")
    stop_after: Literal["generate", "rank", "dataset", "train"] | None = arg(
        default=None, help="Stop after this stage of the first unfinished iteration (for debugging).")
    restart_from: Literal["generate", "rank", "dataset", "train"] | None = arg(
        default=None, help="Move the stale artifacts of the first iteration that does not match this run, from this "
        "stage on (and all later iterations), to OUT/stale/<time>/ and redo them. Nothing is deleted.")
    eval_prompts: str | None = arg(default=None, path="file", help="Held-out prompts (JSONL/parquet): each "
                                   "iteration reports "
                                     "P(pi_{t+1} > pi_t) and P(pi_{t+1} > pi_0) on them, with s.e., in metrics.json.")
    progress: bool = arg(default=True, help="Show progress bars.")

    RULES = (
        # field             the test                                             what it must be
        ("iterations",      lambda c: c.iterations >= 1,                         ">= 1"),
        ("max_prompts",     lambda c: c.max_prompts >= 0,                        ">= 0 (0: all)"),
        ("K",               lambda c: c.K >= 2,                                  ">= 2: a preference needs a pair"),
        ("eta",             lambda c: positive(c.eta),                           "finite and > 0 (eta <= 0 reverses "
                                                                                 "Eq. 4.1)"),
        ("max_new_tokens",  lambda c: c.max_new_tokens >= 1,                     ">= 1"),
        ("temperature",     lambda c: positive(c.temperature),                   "finite and > 0"),
        ("top_p",           lambda c: 0 < c.top_p <= 1,                          "in (0, 1]"),
        ("gen_batch",       lambda c: c.gen_batch >= 1,                          ">= 1"),
        ("max_length",      lambda c: c.max_length >= 2,                         ">= 2"),
        ("max_prompt_length", lambda c: 1 <= c.max_prompt_length < c.max_length,
                                                      lambda c: f">= 1 and below --max-length {c.max_length}"),
        ("lr",              lambda c: positive(c.lr),                            "finite and > 0"),
        ("warmup_ratio",    lambda c: 0 <= c.warmup_ratio <= 1,                  "in [0, 1]"),
        ("weight_decay",    lambda c: c.weight_decay >= 0,                       ">= 0"),
        ("max_grad_norm",   lambda c: positive(c.max_grad_norm),                 "finite and > 0"),
        ("epochs",          lambda c: c.epochs >= 1,                             ">= 1: with 0 nothing is trained"),
        ("fit_tol",         lambda c: positive(c.fit_tol) or c.fit_tol == 0,       "finite and >= 0"),
        ("schedule_epochs", lambda c: c.schedule_epochs is None or c.schedule_epochs >= c.epochs,
                                                      lambda c: f">= --epochs {c.epochs} (the LR schedule's length; "
                                                                f"leave it out for --epochs)"),
        ("global_batch",    lambda c: c.global_batch >= 1,                       ">= 1"),
        ("micro_batch",     lambda c: c.micro_batch >= 1,                        ">= 1"),
        ("ipo_target",      lambda c: finite(c.ipo_target),                      "finite"),
        ("tau",             lambda c: positive(c.tau),                           "finite and > 0"),
        ("magnet_every",    lambda c: c.magnet_every >= 0,                       ">= 0 (0: mu = pi_0 throughout)"),
        ("lora_rank",       lambda c: c.lora_rank >= 0,                          ">= 0 (0: full fine-tuning)"),
        ("lora_alpha",      lambda c: positive(c.lora_alpha),                    "finite and > 0"),
        ("lora_dropout",    lambda c: 0 <= c.lora_dropout < 1,                   "in [0, 1)"),
        ("lora_targets",    lambda c: len(c.lora_targets) > 0 and all(isinstance(t, str) and t.strip() for t in
                                                                      c.lora_targets),
                                                                                 "one or more module names"),
        ("estimate_from",   lambda c: c.estimate_from == "all" or c.selection == "pair",
                                                                                 "'all' with --selection all (the "
                                                                                 "pair is only known with pairs)"),
        ("loss",            lambda c: LOSSES[c.loss].kind == "row" or c.selection == "pair",
                                                                                 "a row loss (sppo) with --selection "
                                                                                 "all: the others train on pairs"),
        ("loss",            lambda c: c.selection == "all" or not set(LOSSES[c.loss].columns) & ESTIMATED,
                                                                                 "a row method with --selection all: "
                                                                                 "its win rate against another policy "
                                                                                 "is estimated on all K samples"),
        ("loss",            lambda c: c.reference == "previous" or c.loss in PAPER_LOSSES,
                                                                                 "one of sppo, sppo_pair, dpo, ipo, "
                                                                                 "sppo_hard, kto with --reference "
                                                                                 "initial: a successor's target is for "
                                                                                 "log pi_{t+1}/pi_t"),
        ("eta",             lambda c: c.loss not in ("nash_md", "inpo") or c.eta * c.tau <= 1,
                                                      lambda c: f"<= 1/tau = {1 / c.tau:g} with --loss {c.loss} (its "
                                                                f"pi_t^(1 - eta tau) mu^(eta tau))"),
        ("tau",             lambda c: c.tau == 0.1 or "tau" in LOSSES[c.loss].settings,
                                                                                 "left at 0.1 unless --loss reads it "
                                                                                 "(nash_md, mmd, mirror_prox, inpo)"),
        ("magnet_every",    lambda c: c.magnet_every == 0 or "magnet_every" in LOSSES[c.loss].settings,
                                                                                 "0 unless --loss reads it (nash_md, "
                                                                                 "mmd, mirror_prox, inpo)"),
        ("log_z",           lambda c: c.log_z == "half" or "log_z" in LOSSES[c.loss].settings,
                                                                                 "'half' unless --loss sppo (only "
                                                                                 "Eq. 4.4 has a log Z)"),
        ("judges",          judges_ok,                                           f"comma-separated judges of "
                                                                                 f"{', '.join(committee.JUDGES)}"),
        ("oracle_prompt",   lambda c: c.oracle_prompt == "raw" or c.oracle != "committee",
                                                                                 "raw with --oracle committee (its "
                                                                                 "on_topic judge would count the chat "
                                                                                 "template's words)"),
        ("device",          lambda c: runs.device_available(c.device),           "auto, cpu, or a torch device this "
                                                                                 "machine has (cuda needs a GPU)"),
    )
    """Every setting's rule, checked by cli.check before any work (sppo.run, train_7b.py, sppo_toy.py)."""


def validate_config(cfg):
    """cli.check(cfg) (choices, RULES, paths), and that --oracle-prompt templated has pi_0's chat template to use."""
    cli.check(cfg)
    if cfg.oracle_prompt == "templated" and cfg.model and not str(cfg.model).endswith(".gguf"):  # GGUF: at rank
        if not getattr(AutoTokenizer.from_pretrained(cfg.model), "chat_template", None):
            raise ConfigError(f"--oracle-prompt templated: the tokenizer of --model {cfg.model} has no chat template; "
                              f"use --oracle-prompt raw")
    return cfg
