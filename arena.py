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
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers.hf_argparser import HfArg

import hedge_toy
import pairrm
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
        out.append(best_of_n(ranker, prompts, sppo.generate_responses(model, tok, prompts, dataclasses.replace(
            cfg, K=best_of), 0, device)) if best_of > 1 else sppo.answers(model, tok, prompts, cfg, device))
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
    pairrm: str | None = HfArg(default=None, help="Local PairRM checkpoint directory, the judge.")
    best_of: int = HfArg(default=1, help="Answer with PairRM's best of N samples (Table 1: 16); 1 = one sample.")
    temperature: float = HfArg(default=1.0, help="Sampling temperature.")
    top_p: float = HfArg(default=1.0, help="Nucleus sampling.")
    max_new_tokens: int = HfArg(default=512, help="Generation cap per response.")
    gen_batch: int = HfArg(default=8, help="Prompts per batched generate() call.")
    seed: int = HfArg(default=0, help="Sampling seed (the same for every policy).")
    dtype: str = HfArg(default="float32", help="Weights dtype of the policies.")
    device: str = HfArg(default="auto", help="`auto` = cuda when available, else cpu.")
    figure: str = HfArg(default="figures/arena.png", help="Where to save the heatmap.")
    json_out: str | None = HfArg(default=None, help="Also write W, SE, labels and responses to this JSON file.")
    progress: bool = HfArg(default=True, help="Show progress bars.")


def main(argv=None):
    cfg = runs.parse_config(ArenaConfig, argv, description=__doc__.split("\n")[0])
    return runs.user_errors("arena.py", lambda: arena(cfg))


def arena(cfg):
    """The CLI's work: responses from every policy, PairRM's win-rate matrix with s.e., the table and heatmap."""
    if len(cfg.models) < 2 or not cfg.prompts or not cfg.pairrm:
        raise runs.ConfigError("needs --models DIR DIR [...] (at least 2), --prompts FILE and --pairrm DIR")
    device = runs.resolve_device(cfg.device)
    prompts = runs.load_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts or None]
    ranker = pairrm.PairRM.from_pretrained(cfg.pairrm, device=device)
    gen = sppo.SPPOConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                          gen_batch=cfg.gen_batch, seed=cfg.seed, dtype=cfg.dtype, progress=cfg.progress)
    responses = arena_responses(cfg.models, prompts, gen, ranker, cfg.best_of, device)
    W, SE = arena_pairrm(ranker, prompts, responses)
    labels = [Path(m).name if Path(m).name != "model" else Path(m).parent.name for m in cfg.models]
    print(f"P(row beats column), PairRM on {len(prompts)} prompts, best-of-{cfg.best_of}; +- one standard error")
    print(f"{'':>14}" + "".join(f"{lab[:14]:>16}" for lab in labels))
    for i, lab in enumerate(labels):
        print(f"{lab[:14]:>14}" + "".join(f"{W[i, j]:9.3f} +-{SE[i, j]:4.2f}" if i != j else f"{'-':>16}"
                                          for j in range(len(labels))))
    plot_arena(W, labels, cfg.figure, se=SE, n_prompts=len(prompts), title=f"P(row beats column), best-of-{cfg.best_of}")
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps({"labels": labels, "W": W.tolist(), "SE": SE.tolist(),
                                                  "prompts": prompts, "responses": responses}, indent=1))
    print(f"wrote {cfg.figure}" + (f" and {cfg.json_out}" if cfg.json_out else ""))
    return 0


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    sys.exit(main())
