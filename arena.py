"""The arena (Fig. 3, Table 1): win rates P(pi_i > pi_j) between policies, exact on a game or judged by PairRM.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. Fig. 3 is a heatmap
of pairwise win rates between the base model and its DPO, IPO and SPPO iterates, judged by PairRM; Table 1's
"best-of-16" rows answer each prompt with PairRM's favourite of 16 samples.

    python arena.py --models runs/x/pi0 runs/x/iter0/model runs/x/iter1/model --prompts held_out.jsonl \
        --pairrm DIR_PAIRRM [--best-of 16] [--figure figures/arena.png]

W[i, j] = P(pi_i > pi_j) = E_x E_{y ~ pi_i, y' ~ pi_j} P(y > y' | x) (Sec. 3). On a finite game it is exact
(arena_exact); with a language model each policy answers every prompt once and W[i, j] is the mean over prompts
of PairRM's P(y_i > y_j | x), with its standard error over prompts (arena_pairrm).

Against the first policy (pi_0), each policy's win rate is also printed length-controlled, as AlpacaEval 2.0 reports
it (Dubois et al., arXiv 2404.04475): lc_win_rate fits logit P = theta + phi tanh(length difference / sd) and
reports 100 sigmoid(theta), the win rate at equal length; lengths are response tokens (token_lengths). The fit lives
with the other statistics in experiments.py (sppo.py's --eval-prompts reports it too) and is imported here.
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

import cli
import committee
import hedge_toy
import pairrm
import policy
import runs
import sppo
from experiments import lc_win_rate   # AlpacaEval 2.0's length-controlled win rate, as arena.lc_win_rate


# ----------------------------------------------------------------------------------------------------------------
# Win-rate matrices.
def arena_exact(policies, P):
    """W[i, j] = P(pi_i > pi_j) = pi_i^T P pi_j (Sec. 3) for policies (m, n) on one finite game P (n, n)."""
    pis = np.asarray(policies, dtype=np.float64)
    return pis @ hedge_toy.validate_preference(P) @ pis.T                               # (m, m)


def summarise(mats):
    """W = the mean over prompts of per-prompt win-rate matrices mats (N, m, m), SE = their standard error over
    prompts (std, ddof 1, / sqrt N; NaN for one prompt). Returns (W, SE), each (m, m), diagonal 1/2 and 0."""
    N = len(mats)
    W, SE = mats.mean(0), mats.std(0, ddof=1) / math.sqrt(N) if N > 1 else np.full(mats.shape[1:], np.nan)
    np.fill_diagonal(W, 0.5)
    np.fill_diagonal(SE, 0.0)
    return W, SE


def pairrm_matrices(ranker, prompts, responses):
    """mats[n, i, j] = PairRM's P(y_i > y_j | x_n) = sigma(f(x; y_i, y_j) - f(x; y_j, y_i)) for the policies'
    responses[i][n] (one each), pair by pair through sppo.rank, as sppo.win_rate judges them. Returns (N, m, m)."""
    m, N, oracle = len(responses), len(prompts), pairrm.PairRMOracle(ranker)
    mats = np.full((N, m, m), 0.5)
    for i in range(m):
        for j in range(i + 1, m):
            pairs = [{"responses": [a, b]} for a, b in zip(responses[i], responses[j])]
            mats[:, i, j] = [P[0, 1] for P in sppo.rank(oracle, prompts, pairs)[0]]
            mats[:, j, i] = 1 - mats[:, i, j]
    return mats


def arena_pairrm(ranker, prompts, responses):
    """Fig. 3 for language models: W[i, j] = mean over prompts of PairRM's P(y_i > y_j | x) = sigma(f(x; y_i, y_j)
    - f(x; y_j, y_i)), with its standard error over prompts (sppo.win_rate's rule, which sppo.py's held-out selection
    uses too). responses[i][n]: policy i's response to prompt n. Returns (W, SE)."""
    return summarise(pairrm_matrices(ranker, prompts, responses))


def oracle_matrices(oracle, prompts, generations):
    """mats[n, i, j] = the mean over the S x S sample pairs of policies i and j of the oracle's P(y > y' | x_n), for
    any sppo oracle whose P(y > y' | x) depends on the pair alone (committee.py's CommitteeOracle and ReferenceOracle;
    PairRM pairwise). generations[i][n] = policy i's policy.generate_responses record for prompt n, S samples each;
    per prompt the m S answers are judged as one (mS, mS) matrix by sppo.rank. Returns (N, m, m)."""
    m, N, S = len(generations), len(prompts), len(generations[0][0]["responses"])
    pooled = [{k: [v for g in generations for v in g[n][k]] for k in ("responses", "finished")} for n in range(N)]
    return np.stack(sppo.rank(oracle, prompts, pooled)[0]).reshape(N, m, S, m, S).mean((2, 4))          # (N, m, m)


def arena_oracle(oracle, prompts, generations):
    """Fig. 3 under any sppo oracle whose P(y > y' | x) depends on the pair alone: W[i, j] is the mean over prompts
    of oracle_matrices, SE its standard error over prompts. Returns (W, SE), each (m, m)."""
    return summarise(oracle_matrices(oracle, prompts, generations))


# ----------------------------------------------------------------------------------------------------------------
# The length-controlled win rate of AlpacaEval 2.0 (Dubois, Galambosi, Liang, Hashimoto, "Length-Controlled
# AlpacaEval: A Simple Way to Debias Automatic Evaluators", arXiv 2404.04475, Sec. 3), one model against a baseline.
def lc_against(mats, lengths, base=0):
    """Each policy's raw and length-controlled win rate against policy `base`, in percent with standard errors:
    mats (N, m, m) per-prompt win rates (oracle_matrices, pairrm_matrices), lengths (m, N) each policy's response
    length per prompt in tokens (token_lengths). Returns [{"raw": (rate, se), "lc": (rate, se)}] for every policy,
    the base's own row 50 +- 0; where lc_win_rate refuses (no finite fit, too few prompts) "lc" is None and "why"
    says why."""
    (W, SE), out = summarise(mats), []
    for i in range(mats.shape[1]):
        row = {"raw": (100 * W[i, base], 100 * SE[i, base])}
        try:
            row["lc"] = lc_win_rate(mats[:, i, base], lengths[i], lengths[base]) if i != base else (50.0, 0.0)
        except ValueError as e:
            row.update(lc=None, why=str(e))
        out.append(row)
    return out


def token_lengths(generations=None, model_dir=None, texts=None):
    """Response lengths in tokens, one per prompt: from policy.generate_responses records (the sampled token_ids,
    stop token excluded; the mean over a prompt's S samples), or by encoding `texts` with model_dir's tokenizer
    (add_special_tokens off; for PairRM's best-of-n answers, which keep no ids). Returns (N,) float64."""
    if generations is not None:
        return np.array([np.mean([len(ids) for ids in g["token_ids"]]) for g in generations], dtype=np.float64)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(runs.checkpoint_dir(model_dir))
    return np.array([len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts], dtype=np.float64)


def print_lc(table, labels, judge):
    """The raw and length-controlled win rates against labels[0] (lc_against), one line per other policy."""
    print(f"win rate against {labels[0]} under {judge} (percent +- 1 s.e.): raw | length-controlled (lc_win_rate)")
    for lab, row in list(zip(labels, table))[1:]:
        lc = f"{row['lc'][0]:6.1f} +- {row['lc'][1]:4.1f}" if row["lc"] else f"   n/a ({row['why'][13:70]}...)"
        print(f"{lab[:14]:>14}  {row['raw'][0]:6.1f} +- {row['raw'][1]:4.1f} | {lc}")


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
def judges_ok(spec):
    try:
        committee.parse_judges(spec)
    except ValueError:
        return False
    return True


@dataclass
class ArenaConfig:
    models: list[str] = cli.arg(default_factory=list, help="Policy directories (save_pretrained) or .gguf files, at "
                                "least 2, e.g. pi_0 pi_1 ...")
    prompts: str | None = cli.arg(default=None, path="file", help="Held-out prompts: JSONL with a `prompt` field, or "
                                  "parquet.")
    prompt_column: str = cli.arg(default="prompt", help="Field / column that holds the prompt text.")
    max_prompts: int = cli.arg(default=0, help="Use the first N prompts (0: all).")
    oracle: Literal["pairrm", "committee"] = cli.arg(default="pairrm", help="The judge: PairRM (the paper's) or the "
                                                     "committee of rule judges (committee.py).")
    pairrm: str | None = cli.arg(default=None, path="dir", help="--oracle pairrm: local PairRM checkpoint directory, "
                                 "the judge.")
    judges: str = cli.arg(default=committee.DEFAULT_JUDGES, help="--oracle committee: its comma-separated judges, of "
                          f"{', '.join(committee.JUDGES)}.")
    samples: int = cli.arg(default=1, help="--oracle committee: samples per policy and prompt (W averages their "
                           "pairs).")
    best_of: int = cli.arg(default=1, help="--oracle pairrm: answer with PairRM's best of N samples (Table 1: 16); 1 = "
                           "one sample.")
    temperature: float = cli.arg(default=1.0, help="Sampling temperature.")
    top_p: float = cli.arg(default=1.0, help="Nucleus sampling, in (0, 1].")
    max_new_tokens: int = cli.arg(default=512, help="Generation cap per response.")
    gen_batch: int = cli.arg(default=8, help="Prompts per batched generate() call.")
    seed: int = cli.arg(default=0, help="Sampling seed (the same for every policy).")
    dtype: Literal["float32", "bfloat16", "float16"] = cli.arg(default="float32", help="Weights dtype of the "
                                                               "policies.")
    device: str = cli.arg(default="auto", help="`auto` = cuda when available, else cpu; or a torch device name.")
    labels: list[str] = cli.arg(default_factory=list, help="Names of the policies, one per --models (default: their "
                                "folder names).")
    figure: str = cli.arg(default="figures/arena.png", path="out_file", help="Where to save the heatmap.")
    json_out: str | None = cli.arg(default=None, path="out_file", help="Also write W, SE, labels and responses to "
                                   "this JSON file.")
    progress: bool = cli.arg(default=True, help="Show progress bars.")

    RULES = (
        # field           the test                                              what it must be
        ("models",        lambda c: len(c.models) >= 2,                         "at least 2 policies (W compares "
                                                                                "them): --models DIR DIR [...]"),
        ("labels",        lambda c: len(c.labels) in (0, len(c.models)),        "one label per --models policy, or "
                                                                                "left out (their folder names)"),
        ("prompts",       lambda c: c.prompts is not None,                      "a prompt file: --prompts FILE (JSONL "
                                                                                "or parquet)"),
        ("max_prompts",   lambda c: c.max_prompts >= 0,                         ">= 0 (0: all)"),
        ("pairrm",        lambda c: c.oracle != "pairrm" or c.pairrm is not None,
                                                                                "a local PairRM checkpoint folder "
                                                                                "with --oracle pairrm (or use "
                                                                                "--oracle committee)"),
        ("pairrm",        lambda c: c.oracle == "pairrm" or c.pairrm is None,   "left out with --oracle committee (the "
                                                                                "committee judges, not PairRM)"),
        ("judges",        lambda c: judges_ok(c.judges),                        f"comma-separated judges of "
                                                                                f"{', '.join(committee.JUDGES)}"),
        ("judges",        lambda c: c.oracle == "committee" or c.judges == committee.DEFAULT_JUDGES,
                                                                                "left out with --oracle pairrm (only "
                                                                                "the committee has judges)"),
        ("samples",       lambda c: c.samples >= 1,                             ">= 1"),
        ("samples",       lambda c: c.oracle == "committee" or c.samples == 1,  "1 with --oracle pairrm (it answers "
                                                                                "with one sample, or --best-of N)"),
        ("best_of",       lambda c: c.best_of >= 1,                             ">= 1"),
        ("best_of",       lambda c: c.oracle == "pairrm" or c.best_of == 1,     "1 with --oracle committee (best-of-n "
                                                                                "picks by PairRM's scores)"),
        ("temperature",   lambda c: cli.finite_positive(c.temperature),         "finite and > 0"),
        ("top_p",         lambda c: 0 < c.top_p <= 1,                           "in (0, 1]"),
        ("max_new_tokens", lambda c: c.max_new_tokens >= 1,                     ">= 1"),
        ("gen_batch",     lambda c: c.gen_batch >= 1,                           ">= 1"),
        ("device",        lambda c: runs.device_available(c.device),            "auto, cpu, or a torch device this "
                                                                                "machine has (cuda needs a GPU)"),
    )
    """Checked by cli.check before any work; each --models path is checked as a model (check_models) after it."""


def check_models(cfg):
    """Each --models entry is a model folder (config.json and its weights) or a .gguf file: cli.check_path's model
    kind, one path at a time (a list field, so not a path= field of cli.check)."""
    for m in cfg.models:
        cli.check_path("models", m, "model")


def main(argv=None):
    return cli.main("arena.py", ArenaConfig, arena, argv, description=__doc__.split("\n")[0])


def arena(cfg):
    """The CLI's work: responses from every policy, the judge's win-rate matrix with s.e., the table and heatmap.
    Every setting and path is checked first (cli.check, check_models), before any model is loaded."""
    cli.check(cfg)
    check_models(cfg)
    judges = committee.CommitteeOracle(cfg.judges) if cfg.oracle == "committee" else None
    device = runs.resolve_device(cfg.device)
    prompts = runs.load_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts or None]
    if not prompts:
        raise cli.ArtifactError(f"--prompts {cfg.prompts}: no prompts")
    gen = sppo.SPPOConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                          gen_batch=cfg.gen_batch, seed=cfg.seed, dtype=cfg.dtype, progress=cfg.progress)
    if judges:
        gens = policy_generations(cfg.models, prompts, dataclasses.replace(gen, K=cfg.samples), device)
        mats = oracle_matrices(judges, prompts, gens)
        responses = [[g["responses"] for g in gs] for gs in gens]
        lengths = [token_lengths(gs) for gs in gens]
    else:
        ranker = pairrm.PairRM.from_pretrained(cfg.pairrm, device=device)
        responses = arena_responses(cfg.models, prompts, gen, ranker, cfg.best_of, device)
        mats = pairrm_matrices(ranker, prompts, responses)
        lengths = [token_lengths(model_dir=cfg.models[0], texts=r) for r in responses]    # pi_0's tokenizer for all
    (W, SE), lc = summarise(mats), lc_against(mats, lengths)
    labels = cfg.labels or [Path(m).name if Path(m).name != "model" else Path(m).parent.name for m in cfg.models]
    judge = f"committee ({cfg.judges}), {cfg.samples} sample(s)" if judges else f"PairRM, best-of-{cfg.best_of}"
    print(f"P(row beats column), {judge} on {len(prompts)} prompts; +- one standard error")
    print(f"{'':>14}" + "".join(f"{lab[:14]:>16}" for lab in labels))
    for i, lab in enumerate(labels):
        print(f"{lab[:14]:>14}" + "".join(f"{W[i, j]:9.3f} +-{SE[i, j]:4.2f}" if i != j else f"{'-':>16}"
                                          for j in range(len(labels))))
    print_lc(lc, labels, judge)
    plot_arena(W, labels, cfg.figure, se=SE, n_prompts=len(prompts), title="P(row beats column), " +
               ("committee" if judges else f"PairRM, best-of-{cfg.best_of}"))
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps({"labels": labels, "W": W.tolist(), "SE": SE.tolist(),
                                                  "vs_first_percent": lc, "lengths": [x.tolist() for x in lengths],
                                                  "prompts": prompts, "responses": responses, "finished":
                                                  [[g["finished"] for g in gs] for gs in gens] if judges else None},
                                                 indent=1))
    print(f"wrote {cfg.figure}" + (f" and {cfg.json_out}" if cfg.json_out else ""))
    return 0


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    sys.exit(main())
