"""real_run.py --compare / --pair-estimate (issue 28): the paper's Figs. 1, 3 and 4 at the real model's scale, on
hand-made run directories whose held-out samples are hand-written (held_out_samples patched: no model is loaded).
The arenas are checked against the evaluators applied directly to the same answers; the runs' settings are checked
before any work."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import arena
import conftest
import runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import real_run  # noqa: E402

ANSWERS = {"pi_0": ["Japan is a country in Asia with many cities and a long history.", "Plant seed.",
                    "The largest mammal is a very big animal that lives in the sea."],
           "pi_1": ["The capital of Japan is Tokyo.", "Dig a small hole, put the seed in, cover it, water it.",
                    "The blue whale."],
           "DPO_1": ["Tokyo.", "Plant it.", "A whale."],
           "pair_1": ["Japan's capital city is Tokyo, on Honshu.", "Put the seed in soil and water it.",
                      "The blue whale is the largest mammal."]}


def sibling(out, name, **changes):
    """A copy of the hand-made run directory `out` beside it, its config.json changed by `changes`."""
    new = out.parent / name
    shutil.copytree(out, new)
    runs.write_json(new / "config.json", {**json.loads((out / "config.json").read_text()), **changes})
    return new


@pytest.fixture
def three_runs(tmp_path, monkeypatch):
    out, prompts = conftest.hand_made_real_run(tmp_path, prompts_with_cycle=1)
    seen = []

    def samples(model, label, ps, gen, folder):
        seen.append((str(model), label))
        return [{"responses": [y], "finished": [True], "token_ids": [list(range(len(y.split())))]}
                for y in ANSWERS[label]]
    monkeypatch.setattr(real_run, "held_out_samples", samples)
    return out, prompts, sibling(out, "dpo", loss="dpo"), sibling(out, "pair", estimate_from="pair"), seen


def test_paper_figures_arena_equals_the_evaluators_applied_directly(tmp_path, three_runs, capsys):
    out, prompts, dpo, pair, seen = three_runs
    figs = tmp_path / "figs"
    refs = str(ROOT / "data/reference_heldout.jsonl")
    assert real_run.main(["--out", str(out), "--prompts", str(prompts), "--figures", str(figs), "--references", refs,
                          "--compare", f"DPO={dpo}", "--pair-estimate", str(pair)]) == 0
    assert (str(dpo / "iter0" / "model"), "DPO_1") in seen and (str(pair / "iter0" / "model"), "pair_1") in seen
    p = json.loads((figs / "real_run.json").read_text())["paper"]
    assert p["labels"] == ["pi_0", "SPPO 1", "DPO 1", "SPPO, P-hat from the pair (K = 2) 1"]
    assert p["index"] == {"SPPO": [0, 1], "DPO": [0, 2], "SPPO, P-hat from the pair (K = 2)": [0, 3]}
    xs = conftest.REAL_RUN_PROMPTS
    gens = [[{"responses": [y], "finished": [True]} for y in ANSWERS[k]] for k in ("pi_0", "pi_1", "DPO_1", "pair_1")]
    oracles, _ = real_run.evaluators("concise,informs,plain", xs, refs)
    for name, oracle in oracles.items():                                 # one prompt at a time, by the oracle itself
        W = np.array([[np.mean([oracle(x, [gens[i][n]["responses"][0], gens[j][n]["responses"][0]],
                                       [True, True])[0, 1] for n, x in enumerate(xs)]) if i != j else 0.5
                       for j in range(4)] for i in range(4)])
        assert np.array(p["evaluators"][name]["W"]) == pytest.approx(W, abs=1e-12), name
        lengths = np.array([[len(y.split()) for y in ANSWERS[k]] for k in ("pi_0", "pi_1", "DPO_1", "pair_1")], float)
        lc = arena.lc_against(arena.oracle_matrices(oracle, xs, gens), lengths)
        assert p["evaluators"][name]["vs_pi0"] == json.loads(json.dumps(lc)), name
    assert p["runs"]["DPO"]["loss"] == "dpo" and p["runs"]["SPPO"]["cycle_share"] == [0.25]
    for f in ("real_fig1.png", "real_fig3.png", "real_fig3_heldout.png", "real_fig4.png"):
        assert (figs / f).stat().st_size > 10_000, f
    printed = capsys.readouterr().out
    assert "the paper's figures at this scale" in printed and "real_fig4.png" in printed


@pytest.mark.parametrize("compare, pair_estimate, error, words", [
    (["DPO"], None, runs.ConfigError, "--compare 'DPO': expected LABEL=DIR"),
    (["SPPO={out}"], None, runs.ConfigError, "the label 'SPPO' is used twice"),
    (["DPO={hot}"], None, runs.ArtifactError, "setting 'temperature' is 1.0 but 0.7"),
    (["DPO={missing}"], None, runs.ArtifactError, "no config.json"),
    ([], "{dpo}", runs.ArtifactError, "--pair-estimate needs estimate_from 'pair'"),
    (["X={pair}"], None, runs.ArtifactError, "--compare needs estimate_from 'all'"),
])
def test_compared_runs_are_refused_before_any_work(tmp_path, three_runs, compare, pair_estimate, error, words):
    """A compared run that differs from --out in a setting other than its objective, a malformed or reused label, or
    a pair-estimate run that is not one: refused, naming the flag, file and setting, before a sample is drawn."""
    out, prompts, dpo, pair, seen = three_runs
    dirs = {"out": out, "dpo": dpo, "pair": pair, "hot": sibling(out, "hot", temperature=1.0),
            "missing": tmp_path / "nowhere"}
    cfg = real_run.ReportConfig(out=str(out), prompts=str(prompts), figures=str(tmp_path / "f"),
                                compare=[c.format(**dirs) for c in compare],
                                pair_estimate=pair_estimate and pair_estimate.format(**dirs))
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        real_run.report(cfg)
    assert seen == []
