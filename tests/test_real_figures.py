"""real_run.py --compare / --replicates / --pair-estimate (issue 28): the paper's Figs. 1, 3 and 4 at the real
model's scale, on hand-made 2-iteration run directories whose held-out samples are hand-written (held_out_samples
patched: no model is loaded). The curves are checked against the evaluators applied prompt by prompt to the same
answers and against experiments.interval over seeds; the runs' settings are checked before any work."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import arena
import conftest
import experiments
import runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import real_run  # noqa: E402

REFS = str(ROOT / "data/reference_heldout.jsonl")
PI_0 = ["Japan is a country in Asia with many cities and a long history.", "Plant seed.",
        "The largest mammal is a very big animal that lives in the sea."]
POOL = ["The capital of Japan is Tokyo.", "Dig a small hole, put the seed in, cover it, water it.", "The blue whale.",
        "Tokyo.", "Plant it.", "A whale.", "Japan's capital city is Tokyo, on Honshu.",
        "Put the seed in soil and water it.", "The blue whale is the largest mammal.", "I do not know.",
        "Seeds need soil, water and light to grow into plants.", "Whales are mammals and live in the sea."]


def answers_of(model):
    """Hand-written held-out answers for a policy, one per prompt, fixed by its path (iter{t}/model of a run folder):
    different policies get different answers, the same policy the same ones."""
    if Path(model).name != "model":
        return PI_0
    k = sum(map(ord, f"{Path(model).parent.parent.name}/{Path(model).parent.name}"))
    return [POOL[(k + 5 * n) % len(POOL)] for n in range(3)]


def records(ys):
    return [{"responses": [y], "finished": [True], "token_ids": [list(range(len(y.split())))]} for y in ys]


def sibling(out, name, **changes):
    """A copy of the hand-made run directory `out` beside it, its config.json changed by `changes`."""
    new = out.parent / name
    shutil.copytree(out, new)
    runs.write_json(new / "config.json", {**json.loads((out / "config.json").read_text()), **changes})
    return new


@pytest.fixture
def world(tmp_path, monkeypatch):
    """--out (seed 42) and its seed-43 replicate, DPO and the pair-estimate run at both seeds, 2 iterations each."""
    out, prompts = conftest.hand_made_real_run(tmp_path, prompts_with_cycle=1, iterations=2)
    seen = []

    def samples(model, label, ps, gen, folder):
        seen.append(str(model))
        return records(answers_of(model))
    monkeypatch.setattr(real_run, "held_out_samples", samples)
    d = {"out": out, "prompts": prompts, "seen": seen, "s43": sibling(out, "s43", seed=43),
         "dpo": sibling(out, "dpo", loss="dpo"), "dpo43": sibling(out, "dpo43", loss="dpo", seed=43),
         "pair": sibling(out, "pair", estimate_from="pair"), "pair43": sibling(out, "pair43", estimate_from="pair",
                                                                               seed=43)}
    return d


def test_figures_are_per_seed_evaluations_averaged_over_seeds(tmp_path, world, monkeypatch, capsys):
    drawn = {}
    monkeypatch.setattr(real_run, "plot_by_iteration", lambda curves, shown, series, path, title: drawn.update(
        {Path(path).name: (list(shown), list(series))}))
    monkeypatch.setattr(arena, "plot_arena", lambda W, labels, path, se, n_prompts, title: drawn.update(
        {Path(path).name: (np.array(W), list(labels))}))
    w, figs = world, tmp_path / "figs"
    assert real_run.main(["--out", str(w["out"]), "--prompts", str(w["prompts"]), "--figures", str(figs),
                          "--references", REFS, "--replicates", str(w["s43"]),
                          "--compare", f"DPO={w['dpo']},{w['dpo43']}",
                          "--pair-estimate", f"{w['pair']},{w['pair43']}"]) == 0
    p = json.loads((figs / "real_run.json").read_text())["paper"]
    assert p["seeds"] == [42, 43] and list(p["runs"]) == ["SPPO", "DPO", "SPPO, P-hat from the pair (K = 2)"]
    xs, oracles = conftest.REAL_RUN_PROMPTS, real_run.evaluators("concise,informs,plain",
                                                                 conftest.REAL_RUN_PROMPTS, REFS)[0]
    dirs = {"SPPO": ["out", "s43"], "DPO": ["dpo", "dpo43"], "SPPO, P-hat from the pair (K = 2)": ["pair", "pair43"]}
    for name, oracle in oracles.items():
        for algo, folders in dirs.items():
            for t in (1, 2):                                  # pi_t against pi_0, one prompt at a time, per seed
                ys = [answers_of(w[f] / f"iter{t - 1}" / "model") for f in folders]
                p_n = [[oracle(x, [y[n], PI_0[n]], [True, True])[0, 1] for n, x in enumerate(xs)] for y in ys]
                raw = [100 * np.mean(q) for q in p_n]
                assert [r[t]["raw"][0] for r in p["per_seed"][name][algo]] == pytest.approx(raw, abs=1e-9)
                mean, half, _ = experiments.interval(raw)
                got = p["curves"][name]["raw"][algo][t]
                assert got[0] == pytest.approx(mean, abs=1e-9)
                assert got[1] == (pytest.approx(half, abs=1e-9) if raw[0] != raw[1] else pytest.approx(0, abs=1e-9))
            assert p["curves"][name]["raw"][algo][0] == [50.0, 0.0]
    assert drawn["real_fig1.png"] == (["committee (concise,informs,plain)", "held-out judge (references)"],
                                      ["SPPO", "DPO"])
    assert drawn["real_fig4.png"][1] == ["SPPO", "SPPO, P-hat from the pair (K = 2)"]
    W, labels = drawn["real_fig3.png"]                        # the first seed's arena, the pair runs left out
    assert labels == ["pi_0", "SPPO 1", "SPPO 2", "DPO 1", "DPO 2"] and W.shape == (5, 5)
    c = oracles["committee (concise,informs,plain)"]
    arena_answers = [PI_0] + [answers_of(w[f] / f"iter{t}" / "model") for f in ("out", "dpo") for t in (0, 1)]
    assert W[3, 2] == pytest.approx(np.mean([c(x, [arena_answers[3][n], arena_answers[2][n]], [True, True])[0, 1]
                                             for n, x in enumerate(xs)]), abs=1e-12)
    assert p["runs"]["DPO"][1] == {"out": str(w["dpo43"]), "seed": 43, "loss": "dpo", "estimate_from": "all",
                                   "cycle_share": [0.25, 0.25]}
    printed = capsys.readouterr().out
    assert "the paper's figures at this scale" in printed and "seeds [42, 43]" in printed


def test_lc_curves_are_each_seeds_lc_fit_averaged(tmp_path, world):
    """The LC curve: per seed, lc_against on that seed's arena (its LC rate against pi_0), then the mean over seeds."""
    w = world
    cfg = real_run.ReportConfig(out=str(w["out"]), prompts=str(w["prompts"]), figures=str(tmp_path / "f"),
                                references=REFS, replicates=[str(w["s43"])], compare=[f"DPO={w['dpo']},{w['dpo43']}"])
    real_run.report(cfg)
    p = json.loads((tmp_path / "f" / "real_run.json").read_text())["paper"]
    oracle = real_run.evaluators("concise,informs,plain", conftest.REAL_RUN_PROMPTS, REFS)[0]["held-out judge "
                                                                                                "(references)"]
    for algo, folders in {"SPPO": ["out", "s43"], "DPO": ["dpo", "dpo43"]}.items():
        lcs = []
        for f in folders:
            ys = [PI_0] + [answers_of(w[f] / f"iter{t}" / "model") for t in (0, 1)]
            gens = [records(y) for y in ys]
            table = arena.lc_against(arena.oracle_matrices(oracle, conftest.REAL_RUN_PROMPTS, gens),
                                     [arena.token_lengths(g) for g in gens])
            lcs.append([row["lc"] for row in table])
        for t in (1, 2):
            rates = [s[t][0] for s in lcs if s[t] is not None]
            want = experiments.interval(rates)[0] if rates else None
            got = p["curves"]["held-out judge (references)"]["lc"][algo][t][0]
            assert got == (pytest.approx(want, abs=1e-9) if want is not None else None)


@pytest.mark.parametrize("kw, error, words", [
    ({"compare": ["DPO"]}, runs.ConfigError, "--compare 'DPO': expected LABEL=DIR"),
    ({"compare": ["a/b={dpo}"]}, runs.ConfigError, "LABEL of letters, digits"),
    ({"compare": ["SPPO={dpo}"]}, runs.ConfigError, "the label 'SPPO' is used twice"),
    ({"compare": ["pair={dpo}"]}, runs.ConfigError, "'pair' is --pair-estimate's"),
    ({"compare": ["DPO={hot}"]}, runs.ArtifactError, "setting 'temperature' is 1.0 but 0.7"),
    ({"compare": ["DPO={missing}"]}, runs.ArtifactError, "--compare .*nowhere: no config.json"),
    ({"compare": ["X={out}"]}, runs.ConfigError, "given twice"),
    ({"compare": ["X={s43}"]}, runs.ArtifactError, "the same loss and estimate_from as --out's run"),
    ({"compare": ["X={pair}"]}, runs.ArtifactError, "estimate_from 'pair': it must be 'all'"),
    ({"compare": ["DPO={dpo43}"]}, runs.ConfigError, "DPO: seeds \\[43\\] but --out's group has \\[42\\]"),
    ({"compare": ["DPO={dpo}"], "replicates": ["{s43}"]}, runs.ConfigError, "seeds \\[42\\] but"),
    ({"replicates": ["{dpo43}"]}, runs.ArtifactError, "--replicates needs --out's 'sppo'"),
    ({"pair_estimate": "{dpo}"}, runs.ArtifactError, "--pair-estimate needs --out's 'sppo'"),
    ({"pair_estimate": "{s43}"}, runs.ArtifactError, "--pair-estimate needs 'pair'"),
])
def test_compared_runs_are_refused_before_any_work(tmp_path, world, kw, error, words):
    """A compared run that differs from --out in a setting other than its objective and seed, a malformed, reused or
    reserved label, a folder given twice, a run that is no other algorithm, seeds that differ between algorithms, or
    a replicate / pair-estimate run that is not one: refused, naming the flag, file and setting, before a sample is
    drawn."""
    w = {**world, "hot": sibling(world["out"], "hot", temperature=1.0, loss="dpo"), "missing": tmp_path / "nowhere"}
    fill = {k: v for k, v in w.items() if isinstance(v, Path)}
    args = {k: ([x.format(**fill) for x in v] if isinstance(v, list) else v.format(**fill)) for k, v in kw.items()}
    cfg = real_run.ReportConfig(out=str(w["out"]), prompts=str(w["prompts"]), figures=str(tmp_path / "f"), **args)
    with pytest.raises(error, match=words):
        real_run.report(cfg)
    assert w["seen"] == []


def test_a_run_that_differs_only_in_its_objective_seed_or_how_it_ran_is_accepted(tmp_path, world):
    w = world
    ipo = sibling(w["out"], "ipo", loss="ipo", ipo_target=1.0, device="cuda", restart_from="train", progress=True)
    groups = real_run.run_groups(real_run.ReportConfig(out=str(w["out"]), compare=[f"IPO={ipo}"]),
                                 json.loads((w["out"] / "config.json").read_text()))
    assert [(g.name, g.kind, [d for d, _ in g.runs]) for g in groups] == [("SPPO", "main", [str(w["out"])]),
                                                                          ("IPO", "compare", [str(ipo)])]
