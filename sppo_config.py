"""SPPOConfig: every setting of Algorithm 1 (sppo.py), with the paper's defaults, and its validation.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. Defaults are the
paper's (Sec. 5) unless a help text says otherwise; recipes/paper.yaml and recipes/released.yaml set the paper's text
and the authors' released scripts side by side. One field = one flag of `python sppo.py` (runs.parse_config, through
transformers.HfArgumentParser; `--config FILE.yaml` too); `python sppo.py --help` prints them all with their defaults
and choices. validate_config checks every setting before any work starts: its errors name the flag and the way out.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers.hf_argparser import HfArg

import committee
from runs import ConfigError


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
    oracle_prompt: Literal["raw", "templated"] = HfArg(default="raw", help="What the oracle reads as x: the raw "
                                                       "prompt, or pi_t's chat-templated prompt (released: rank.py).")
    iterations: int = HfArg(default=3, help="Self-play iterations T (the paper runs 3).")
    split_prompts: bool = HfArg(default=True, help="A disjoint slice of the prompts per iteration (paper: 3 x 20k).")
    K: int = HfArg(default=5, help="Responses sampled per prompt (Sec. 5.1: K = 5; Sec. 5.3 ablates K = 2).")
    eta: float = HfArg(default=1000.0, help="Hedge step of Eq. (4.1); beta = 1/eta. The paper's runs: 1000.")
    log_z: Literal["half", "estimate"] = HfArg(default="half", help="log Z: eta/2 (Eq. 4.6, the paper's) or the "
                                               "K-sample estimate (Eq. 4.5).")
    selection: Literal["pair", "all"] = HfArg(default="pair", help="Rows of D_t per prompt: winner and loser (the "
                                              "paper's runs; batches count pairs) or all K (Eq. 4.4; batches count "
                                              "rows).")
    estimate_from: Literal["all", "pair"] = HfArg(default="all", help="P-hat of the kept rows from all K responses "
                                                  "(Sec. 5.1) or from the pair alone (Sec. 5.3's K = 2; needs "
                                                  "--selection pair).")
    loss: Literal["sppo", "sppo_pair", "dpo", "ipo", "sppo_hard", "kto"] = HfArg(default="sppo", help="Step 4's "
        "objective: sppo (Eq. 4.7 per row), or on each (winner, loser) pair (needs --selection pair): sppo_pair "
        "(Eq. 4.12), dpo (4.13), ipo, sppo_hard (Sec. 4.5), kto (4.15); beta = 1/eta. dpo/ipo = the paper's "
        "iterative baselines.")
    reference: Literal["previous", "initial"] = HfArg(default="previous", help="pi_ref of the loss: pi_t (the "
                                                      "paper's SPPO and iterative DPO/IPO) or pi_0 in every iteration.")
    ipo_target: float = HfArg(default=0.5, help="--loss ipo: the margin a - b it fits (1/2: Azar et al.'s and TRL's "
                                                "IPO; 1: Eq. 4.14 as printed).")
    max_new_tokens: int = HfArg(default=2048, help="Generation cap (released: 2048); capped = finished False.")
    temperature: float = HfArg(default=1.0, help="Sampling temperature (paper text 1.0; released code 0.7).")
    top_p: float = HfArg(default=1.0, help="Nucleus sampling (paper text 1.0; released code 0.9).")
    gen_batch: int = HfArg(default=8, help="Prompts per batched generate() call (each yields K sequences).")
    max_length: int = HfArg(default=1024, help="Prompt + response tokens kept for training (released code: 1024).")
    max_prompt_length: int = HfArg(default=512, help="Prompt tokens kept; longer prompts keep their END (512).")
    truncation: Literal["ours", "released"] = HfArg(default="ours", help="`ours`: the prompt keeps its last "
                                                    "max_prompt_length tokens, the response the rest, EOS only when it "
                                                    "finished; `released`: uclaml/SPPO's trainer rule (see truncate).")
    optimizer: Literal["rmsprop", "adamw"] = HfArg(default="rmsprop", help="RMSprop (the authors' code) or AdamW.")
    lr: float = HfArg(default=5e-7, help="Peak learning rate (paper: 5e-7).")
    warmup_ratio: float = HfArg(default=0.1, help="Fraction of steps of linear warm-up, then linear decay to 0.")
    weight_decay: float = HfArg(default=0.0, help="Weight decay (AdamW only).")
    max_grad_norm: float = HfArg(default=1.0, help="Gradient clipping threshold on the global L2 norm.")
    epochs: int = HfArg(default=1, help="Epochs over D_t trained per iteration (released scripts: 1).")
    schedule_epochs: int | None = HfArg(default=None, help="Length of the LR schedule in epochs (default: "
                                        "--epochs). Sec. 5.1's 'total epochs 18' is this; the paper keeps the model "
                                        "after epoch 1.")
    global_batch: int = HfArg(default=64, help="Pairs (--selection pair) or rows (all) per optimizer step (paper: 64 "
                              "pairs = 8 per device x 8 GPUs).")
    micro_batch: int = HfArg(default=8, help="Pairs or rows per forward/backward; the rest is gradient accumulation.")
    group_by_length: bool = HfArg(default=True, help="Cut each optimizer step's pairs (or rows) into micro-batches "
                                  "sorted by length, so they pad little; the step's rows and loss are unchanged "
                                  "(sppo.micro_batches).")
    pack: bool = HfArg(default=True, help="Padding-free micro-batches: the rows packed into one sequence, each row "
                       "attending to itself only (policy.collate, packed=True); same log-probs, no pad tokens.")
    seed: int = HfArg(default=42, help="Seed for prompt order, sampling and training order.")
    dtype: Literal["float32", "bfloat16", "float16"] = HfArg(default="float32", help="Weights dtype (log-probs "
                                                              "are accumulated in fp32 regardless).")
    device: str = HfArg(default="auto", help="`auto` = cuda when available, else cpu; or a torch device name.")
    stop_after: Literal["generate", "rank", "dataset", "train"] | None = HfArg(
        default=None, help="Stop after this stage of the first unfinished iteration (for debugging).")
    restart_from: Literal["generate", "rank", "dataset", "train"] | None = HfArg(
        default=None, help="Move the stale artifacts of the first iteration that does not match this run, from this "
        "stage on (and all later iterations), to OUT/stale/<time>/ and redo them. Nothing is deleted.")
    eval_prompts: str | None = HfArg(default=None, help="Held-out prompts (JSONL/parquet): each iteration reports "
                                     "P(pi_{t+1} > pi_t) and P(pi_{t+1} > pi_0) on them, with s.e., in metrics.json.")
    progress: bool = HfArg(default=True, help="Show progress bars.")


# ----------------------------------------------------------------------------------------------------------------
# Validation: every setting in range and every choice valid, before any work.
def validate_config(cfg):
    """Every setting in range and every choice valid, before any work (the library twin of argparse's checks)."""
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
                           (cfg.epochs >= 1, "epochs", ">= 1: with 0 nothing is trained"), (cfg.schedule_epochs is
                           None or cfg.schedule_epochs >= cfg.epochs, "schedule_epochs", f">= --epochs {cfg.epochs} "
                           "(the LR schedule's length; leave it out for --epochs)"), (cfg.estimate_from == "all" or
                           cfg.selection == "pair", "estimate_from", "'all' with --selection all (the pair is only "
                           "known with --selection pair)"), (cfg.loss == "sppo" or cfg.selection == "pair", "loss",
                           "'sppo' with --selection all (the other losses train on each prompt's winner and loser)"),
                           (cfg.log_z == "half" or cfg.loss == "sppo", "log_z", "'half' unless --loss sppo (only "
                           "Eq. 4.4 has a log Z)"), (math.isfinite(cfg.ipo_target), "ipo_target", "finite"),
                           (cfg.global_batch >= 1,
                           "global_batch", ">= 1"), (cfg.micro_batch >= 1, "micro_batch", ">= 1")]:
        if not ok:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {want}")
    try:
        committee.parse_judges(cfg.judges)
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    gguf = str(cfg.model).endswith(".gguf")
    for flag, path, need in [("model", cfg.model, None if gguf else "config.json"), ("prompts", cfg.prompts, None),
                             ("eval-prompts", cfg.eval_prompts, None),
                             ("pairrm", cfg.pairrm if cfg.oracle == "pairrm" else None, "config.json")]:
        if path is not None and not (Path(path) / need if need else Path(path)).exists():
            raise ConfigError(f"--{flag} {path}: " + (f"no {need} there" if need else "no such file"))
    if cfg.oracle_prompt == "templated" and cfg.oracle == "committee":
        raise ConfigError("--oracle-prompt templated with --oracle committee: the on_topic judge would count the chat "
                          "template's words as the prompt's; use --oracle-prompt raw")
    if cfg.oracle_prompt == "templated" and cfg.model is not None and not gguf:      # a GGUF's: read at rank
        from transformers import AutoTokenizer
        if not getattr(AutoTokenizer.from_pretrained(cfg.model), "chat_template", None):
            raise ConfigError(f"--oracle-prompt templated: the tokenizer of --model {cfg.model} has no chat template; "
                              f"use --oracle-prompt raw")
    return cfg
