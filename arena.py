"""The arena (Fig. 3, Table 1): win rates P(pi_i > pi_j) between policies, exact on a game or judged by PairRM.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. Fig. 3 is a heatmap
of pairwise win rates between the base model and its SPPO iterates, judged by PairRM on held-out prompts; Table 1's
"best-of-16" rows answer each prompt with PairRM's favourite of 16 samples.

    python arena.py --models runs/x/pi0 runs/x/iter0/model runs/x/iter1/model --prompts held_out.jsonl \
        --pairrm DIR_PAIRRM [--best-of 16] [--figure figures/arena.png]

W[i, j] = P(pi_i > pi_j) = E_x E_{y ~ pi_i, y' ~ pi_j} P(y > y' | x) (Sec. 3). On a finite game it is exact
(arena_exact); with a language model each policy answers every prompt once and W[i, j] is the mean over prompts
of PairRM's P(y_i > y_j | x), with its standard error over prompts (arena_pairrm).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm
from transformers.hf_argparser import HfArg

import committee
import hedge_toy
import pairrm
import policy
import runs
import sppo


# ----------------------------------------------------------------------------------------------------------------
# Win-rate matrices.
def arena_exact(policies, P):
    """W[i, j] = P(pi_i > pi_j) = pi_i^T P pi_j (Sec. 3) for policies (m, n) on one finite game P (n, n)."""
    pis = np.asarray(policies, dtype=np.float64)
    return pis @ hedge_toy.validate_preference(P) @ pis.T                               # (m, m)


def arena_pairrm(ranker, prompts, responses):
    """Fig. 3 for language models: W[i, j] = mean over prompts of PairRM's P(y_i > y_j | x) = sigma(f(x; y_i, y_j)
    - f(x; y_j, y_i)), with its standard error over prompts (sppo.win_rate, which sppo.py's held-out selection uses
    too). responses[i][n]: policy i's response to prompt n. Returns (W, SE)."""
    m, oracle = len(responses), pairrm.PairRMOracle(ranker)
    W, SE = np.full((m, m), 0.5), np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            W[i, j], SE[i, j] = sppo.win_rate(oracle, prompts, responses[i], responses[j])
            W[j, i], SE[j, i] = 1 - W[i, j], SE[i, j]
    return W, SE


def arena_oracle(oracle, prompts, generations):
    """Fig. 3 under any sppo oracle whose P(y > y' | x) depends on the pair alone (committee.py; PairRM pairwise):
    generations[i][n] = policy i's policy.generate_responses record for prompt n, S samples each. Per prompt, the m S
    answers are judged as one (mS, mS) matrix by sppo.rank, averaged over the S x S sample pairs of each two
    policies; W[i, j] is the mean over prompts, SE its standard error over prompts. Returns (W, SE), each (m, m)."""
    m, N, S = len(generations), len(prompts), len(generations[0][0]["responses"])
    pooled = [{k: [v for g in generations for v in g[n][k]] for k in ("responses", "finished")} for n in range(N)]
    mats = np.stack(sppo.rank(oracle, prompts, pooled)[0]).reshape(N, m, S, m, S).mean((2, 4))       # (N, m, m)
    W, SE = mats.mean(0), mats.std(0, ddof=1) / math.sqrt(N) if N > 1 else np.full((m, m), np.nan)
    np.fill_diagonal(W, 0.5)
    np.fill_diagonal(SE, 0.0)
    return W, SE


def policy_generations(model_dirs, prompts, cfg, device="cpu"):
    """S = cfg.K samples per prompt from each policy, with their EOS flags, under sppo's seeding rule (the same
    seeds for every policy). Returns generations[i][n] (policy.generate_responses records)."""
    out = []
    for d in tqdm(model_dirs, desc="arena: generate", disable=not cfg.progress, leave=False):
        model, tok = runs.load_policy(d, cfg, device)
        out.append(policy.generate_responses(model, tok, prompts, cfg, 0, device))
    return out


def best_of_n(ranker, prompts, generations):
    """Best-of-n (Table 1's best-of-16 rows): the PairRM-best (max s_PairRM) of each prompt's n samples."""
    best = ranker.best_of_n(prompts, [g["responses"] for g in generations])
    return [g["responses"][b] for g, b in zip(generations, best)]


def arena_responses(model_dirs, prompts, cfg, ranker=None, best_of=1, device="cpu"):
    """One response per prompt from each policy: a sample, or the PairRM-best of `best_of` samples (Table 1's
    best-of-16). Sampling follows cfg (an sppo.SPPOConfig: temperature, top_p, max_new_tokens, seed, dtype) with
    sppo's seeding rule, so every policy is sampled under the same seeds. Returns responses[i][n]."""
    if best_of > 1 and ranker is None:
        raise ValueError(f"best_of={best_of} needs a PairRM ranker to pick the best sample")
    out = []
    for d in tqdm(model_dirs, desc="arena: generate", disable=not cfg.progress, leave=False):
        model, tok = runs.load_policy(d, cfg, device)
        out.append(best_of_n(ranker, prompts, policy.generate_responses(model, tok, prompts, dataclasses.replace(
            cfg, K=best_of), 0, device)) if best_of > 1 else sppo.answers(model, tok, prompts, cfg, device)[0])
    return out


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
# CLI: Fig. 3 between saved policies on held-out prompts.
@dataclass
class ArenaConfig:
    models: list[str] = HfArg(default_factory=list, help="Policy directories (save_pretrained), e.g. pi_0 pi_1 ...")
    prompts: str | None = HfArg(default=None, help="Held-out prompts: JSONL with a `prompt` field, or parquet.")
    prompt_column: str = HfArg(default="prompt", help="Field / column that holds the prompt text.")
    max_prompts: int = HfArg(default=0, help="Use the first N prompts (0: all).")
    oracle: Literal["pairrm", "committee"] = HfArg(default="pairrm", help="The judge: PairRM (the paper's) or the "
                                                   "committee of rule judges (committee.py).")
    pairrm: str | None = HfArg(default=None, help="Local PairRM checkpoint directory, the judge.")
    judges: str = HfArg(default=committee.DEFAULT_JUDGES, help="--oracle committee: its comma-separated judges.")
    samples: int = HfArg(default=1, help="--oracle committee: samples per policy and prompt (W averages their pairs).")
    best_of: int = HfArg(default=1, help="Answer with PairRM's best of N samples (Table 1: 16); 1 = one sample.")
    temperature: float = HfArg(default=1.0, help="Sampling temperature.")
    top_p: float = HfArg(default=1.0, help="Nucleus sampling.")
    max_new_tokens: int = HfArg(default=512, help="Generation cap per response.")
    gen_batch: int = HfArg(default=8, help="Prompts per batched generate() call.")
    seed: int = HfArg(default=0, help="Sampling seed (the same for every policy).")
    dtype: str = HfArg(default="float32", help="Weights dtype of the policies.")
    device: str = HfArg(default="auto", help="`auto` = cuda when available, else cpu.")
    labels: list[str] = HfArg(default_factory=list, help="Names of the policies (default: their folder names).")
    figure: str = HfArg(default="figures/arena.png", help="Where to save the heatmap.")
    json_out: str | None = HfArg(default=None, help="Also write W, SE, labels and responses to this JSON file.")
    progress: bool = HfArg(default=True, help="Show progress bars.")


def main(argv=None):
    cfg = runs.parse_config(ArenaConfig, argv, description=__doc__.split("\n")[0])
    return runs.user_errors("arena.py", lambda: arena(cfg))


def arena(cfg):
    """The CLI's work: responses from every policy, PairRM's win-rate matrix with s.e., the table and heatmap."""
    if len(cfg.models) < 2 or not cfg.prompts or (cfg.oracle == "pairrm" and not cfg.pairrm):
        raise runs.ConfigError("needs --models DIR DIR [...] (at least 2), --prompts FILE and --pairrm DIR (or "
                               "--oracle committee)")
    if cfg.oracle == "committee" and (cfg.best_of != 1 or cfg.samples < 1):
        raise runs.ConfigError("--oracle committee: --best-of must be 1 (best-of-n needs PairRM) and --samples >= 1")
    try:
        judges = committee.CommitteeOracle(cfg.judges) if cfg.oracle == "committee" else None
    except ValueError as e:
        raise runs.ConfigError(f"--{e}") from None
    device = runs.resolve_device(cfg.device)
    prompts = runs.load_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts or None]
    gen = sppo.SPPOConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                          gen_batch=cfg.gen_batch, seed=cfg.seed, dtype=cfg.dtype, progress=cfg.progress)
    if judges:
        gens = policy_generations(cfg.models, prompts, dataclasses.replace(gen, K=cfg.samples), device)
        W, SE = arena_oracle(judges, prompts, gens)
        responses = [[g["responses"] for g in gs] for gs in gens]
    else:
        ranker = pairrm.PairRM.from_pretrained(cfg.pairrm, device=device)
        responses = arena_responses(cfg.models, prompts, gen, ranker, cfg.best_of, device)
        W, SE = arena_pairrm(ranker, prompts, responses)
    labels = cfg.labels or [Path(m).name if Path(m).name != "model" else Path(m).parent.name for m in cfg.models]
    judge = f"committee ({cfg.judges}), {cfg.samples} sample(s)" if judges else f"PairRM, best-of-{cfg.best_of}"
    print(f"P(row beats column), {judge} on {len(prompts)} prompts; +- one standard error")
    print(f"{'':>14}" + "".join(f"{lab[:14]:>16}" for lab in labels))
    for i, lab in enumerate(labels):
        print(f"{lab[:14]:>14}" + "".join(f"{W[i, j]:9.3f} +-{SE[i, j]:4.2f}" if i != j else f"{'-':>16}"
                                          for j in range(len(labels))))
    plot_arena(W, labels, cfg.figure, se=SE, n_prompts=len(prompts), title="P(row beats column), " +
               ("committee" if judges else f"PairRM, best-of-{cfg.best_of}"))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps({"labels": labels, "W": W.tolist(), "SE": SE.tolist(),
                                                  "prompts": prompts, "responses": responses, "finished":
                                                  [[g["finished"] for g in gs] for gs in gens] if judges else None},
                                                 indent=1))
    print(f"wrote {cfg.figure}" + (f" and {cfg.json_out}" if cfg.json_out else ""))
    return 0


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    sys.exit(main())
