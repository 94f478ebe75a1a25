"""Tests for sppo_toy.py, the tiny-LM world: tabular SPPO against exact Hedge, the game oracle, the demo's run
directory (interrupted and resumed to the same bytes) and the demo CLI in a subprocess."""
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
import hedge_toy
import runs
import sppo
import sppo_toy

ROOT = Path(__file__).resolve().parents[1]


def condorcet_winner(P):
    """The response that beats every other one (P[i, j] > 1/2 for all j != i), found by checking each; or None."""
    n = len(P)
    return next((i for i in range(n) if all(P[i, j] > 0.5 for j in range(n) if j != i)), None)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "sppo"])
def test_tabular_selfplay_reaches_the_condorcet_winner_of_a_transitive_game(loss):
    P = hedge_toy.ordered_game(4, seed=2)
    win = condorcet_winner(P)
    assert win is not None
    pi = sppo_toy.tabular_selfplay(P, loss, 3.0, T=12, pi1=np.array([0.4, 0.3, 0.2, 0.1])[::-1] if win == 0 else
                                   None, seed=0)
    last, avg = sppo_toy.selfplay_gaps(P, pi)
    assert pi[-1][win] > 0.999                                                  # the pure von Neumann winner...
    assert last[-1] == pytest.approx(2 * (P @ pi[-1]).max() - 1) and last[-1] < 2e-3   # ...with gap 0 (Eq. 3.3)
    assert avg[-1] < avg[2] < avg[0]                                            # the average follows it


def test_tabular_dpo_on_rock_paper_scissors_collapses_to_a_pure_response_and_stays():
    """The von Neumann winner of RPS is uniform (gap 2 max(P u) - 1 = 0). Iterative DPO instead fits its first
    winner/loser pairs to a ranking (Bradley-Terry: one score per response), puts all its mass on the top one, and
    then samples only that response: every pair is (y, y), the loss is flat, nothing moves. Its last-iterate gap is
    1 (the worst possible) from iteration 2 on, and the average's gap grows towards 1. SPPO's average heads to 0."""
    P, pi1 = hedge_toy.rock_paper_scissors(), np.array([0.1, 0.2, 0.7])
    u = np.full(3, 1 / 3)
    assert 2 * (P @ u).max() - 1 == pytest.approx(0.0)
    dpo = sppo_toy.tabular_selfplay(P, "dpo", 3.0, T=12, pi1=pi1, seed=0)
    last, avg = sppo_toy.selfplay_gaps(P, dpo)
    pure = int(dpo[1].argmax())
    assert dpo[1][pure] > 0.999 and np.allclose(dpo[2:], dpo[1], atol=1e-9)        # pure at once, then frozen
    assert last[1:] == pytest.approx(1.0, abs=2e-3)
    assert avg[-1] > 0.85 and np.all(np.diff(avg[1:]) > 0)
    _, avg_sppo = sppo_toy.selfplay_gaps(P, sppo_toy.tabular_selfplay(P, "sppo", 3.0, T=12, pi1=pi1, seed=0))
    assert avg_sppo[-1] < 0.25 and avg_sppo[-1] < avg_sppo[2] / 2                # SPPO, same eta: towards u


def test_tabular_sppo_approaches_hedge_with_many_samples():
    """Finite K shrinks the step to eta (K-1)/K; with K = 40 and many groups SPPO tracks exact Hedge."""
    P, eta = hedge_toy.weighted_rps(), 1.0
    pi1 = np.array([0.6, 0.3, 0.1])
    got = sppo_toy.tabular_sppo(P, eta, T=4, K=40, groups=200, log_z="exact", pi1=pi1, seed=1)
    ref = hedge_toy.hedge_trajectory(P, eta * 39 / 40, 4, pi1)
    assert np.abs(got - ref).sum(-1).max() < 0.03
    far = hedge_toy.hedge_trajectory(P, 0.0, 4, pi1)                                   # no update at all
    assert np.abs(got - far).sum(-1).max() > 0.1


def test_self_term_makes_the_expected_step_hedge_at_eta_prime():
    """Exact, by enumerating every K-tuple of samples from pi_t: E[P-hat(y_1 > pi_t) | y_1 = y] is
    1/(2K) + ((K-1)/K) (P pi_t)_y, so the step exp(eta (E[P-hat] - 1/2)), normalised, is Hedge's step (4.1) at
    eta' = eta (K-1)/K exactly, and not the step at eta."""
    P, pi, eta, K = hedge_toy.weighted_rps(), np.array([0.5, 0.3, 0.2]), 3.0, 3
    mass, first = np.zeros(3), np.zeros(3)
    for ys in itertools.product(range(3), repeat=K):                 # y_1..y_K ~ pi_t, all 27 draws
        prob = np.prod(pi[list(ys)])
        mass[ys[0]] += prob
        first[ys[0]] += prob * sppo.win_rates(P[np.ix_(ys, ys)])[0]   # P-hat of y_1, self-term included (Eq. 4.5)
    expected = first / mass
    np.testing.assert_allclose(expected, 1 / (2 * K) + (K - 1) / K * P @ pi, atol=1e-12)
    step = pi * np.exp(eta * (expected - 0.5))
    step /= step.sum()
    np.testing.assert_allclose(step, hedge_toy.hedge_step(P, pi, sppo_toy.effective_eta(eta, K)), atol=1e-12)
    assert 0.5 * np.abs(step - hedge_toy.hedge_step(P, pi, eta)).sum() > 0.01


def test_game_oracle_malformed_loses():
    o = sppo_toy.GameOracle(sppo_toy.demo_games())
    P = o("play rps", ["rock", "paper", "rock rock", "paper"])
    np.testing.assert_allclose(P[:, 2], [1, 1, 0.5, 1])
    assert P[0, 1] == 0.0 and P[1, 3] == 0.5
    hedge_toy.validate_preference(P)


def demo_args(out, *extra):
    return ["--iterations", "2", "--groups", "6", "--epochs", "2", "--out", str(out),
            "--figure", str(Path(out) / "gap.png"), "--no-progress", *extra]


def artifacts(out):
    files = sorted(p for p in Path(out).rglob("*") if p.suffix in (".jsonl",) or p.name == "model.safetensors")
    return {str(p.relative_to(out)): p.read_bytes() if p.suffix == ".jsonl" else
            {k: v.clone() for k, v in __import__("safetensors.torch").torch.load_file(p).items()} for p in files}


def test_interrupted_run_resumes_to_same_artifacts(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert sppo_toy.main(demo_args(full)) == 0
    for stage in ["generate", "dataset"]:                         # stop twice, at different stages, then resume
        assert sppo_toy.main(demo_args(cut, "--stop-after", stage)) == 0
    assert (cut / "iter0" / "dataset.jsonl").exists() and not (cut / "iter0" / "model").exists()
    assert sppo_toy.main(demo_args(cut)) == 0
    a, b = artifacts(full), artifacts(cut)
    assert a.keys() == b.keys() and len(a) == 2 * 4 + 2          # + prompts.jsonl, pi0
    for k in a:
        if k.endswith(".jsonl"):
            assert a[k] == b[k], k
        else:
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    # a truncated artifact is reported with its path, never silently used
    f = cut / "iter1" / "preferences.jsonl"
    text = f.read_text()
    f.write_text(text[: len(text) - 40])
    assert sppo_toy.main(demo_args(cut)) == 2                    # one line, exit 2: the file and the way out
    assert "iter1/preferences.jsonl: changed since it was written" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_cli_small(tmp_path):
    """The demo end to end in a subprocess, at small size: it trains, prints the table and writes the plot."""
    out = tmp_path / "demo"
    r = conftest.run([sys.executable, str(ROOT / "sppo_toy.py"), "--iterations", "2", "--out", str(out),
                      "--figure", str(out / "gap.png"), "--no-progress"],
                     cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LM gap" in r.stdout and "Hedge" in r.stdout
    assert (out / "gap.png").stat().st_size > 10_000
    m = json.loads((out / "demo_metrics.json").read_text())
    for game in m.values():                         # the model's step tracks the Hedge(eta (K-1)/K) step
        assert len(game["gap"]) == len(game["hedge_gap_eta"]) == 3 and max(game["tv"]) < 0.15
        assert game["gap"][2] < game["gap"][0] and game["eta_eff"] == pytest.approx(3.0 * 4 / 5)


def test_demo_criterion_by_hand():
    """The demo's pass rule (DEMO_CRITERION): gap cut to a third, at most 0.05 above Hedge(eta'), mean TV step
    <= 0.04; each clause fails on its own, and it is judged against Hedge(eta'), not Hedge(eta)."""
    m = {"gap": [0.6, 0.3, 0.15], "hedge_gap": [0.6, 0.28, 0.12], "hedge_gap_eta": [0.6, 0.2, 0.05],
         "tv": [0.03, 0.04], "tv_eta": [0.2, 0.2]}
    assert sppo_toy.demo_passes(m)[0]                                      # 0.15 <= 0.2, <= 0.17, mean TV 0.035
    assert not sppo_toy.demo_passes(dict(m, gap=[0.4, 0.3, 0.15]))[0]      # 0.15 > 0.4 / 3
    assert not sppo_toy.demo_passes(dict(m, hedge_gap=[0.6, 0.28, 0.09]))[0]   # 0.15 > 0.09 + 0.05
    assert not sppo_toy.demo_passes(dict(m, tv=[0.03, 0.06]))[0]           # mean TV 0.045 > 0.04
    assert "0.1500" in sppo_toy.demo_passes(m)[1] and "0.2000" in sppo_toy.demo_passes(m)[1]


def test_demo_config_help_shows_demo_defaults_and_rejects_bad_choices():
    """--help prints the values the demo really uses; a wrong choice exits 2 before any work."""
    r = conftest.run([sys.executable, str(ROOT / "sppo_toy.py"), "--help"], cwd=ROOT, timeout=120,
                     env={**os.environ, "COLUMNS": "250"})                             # one line per flag
    assert r.returncode == 0 and "(default: 20)" in r.stdout and "(default: 3.0)" in r.stdout
    assert "{rmsprop,adamw}" in r.stdout and "(default: adamw)" in r.stdout
    assert sppo_toy.DemoConfig().iterations == 20 and sppo_toy.DemoConfig().eta == 3.0
    with pytest.raises(SystemExit) as e:                                                # argparse's choices
        sppo_toy.main(["--selection", "best", "--out", "/nonexistent/never/written"])
    assert e.value.code == 2


BAD_DEMO = [  # (flags, what the one line must say): settings the demo does not use, and bad ones
    pytest.param(["--model", "{w}/pi0", "--prompts", "/nonexistent"], "--model '{w}/pi0': must be left out: not a "
                 "setting of sppo_toy.py (it builds its own pi_0", id="model-and-prompts-unused"),
    pytest.param(["--prompts", "/nonexistent"], "--prompts '/nonexistent': must be left out: not a setting of "
                 "sppo_toy.py (the prompts are the two game prompts", id="prompts-unused"),
    pytest.param(["--oracle", "committee"], "--oracle 'committee': must be left out: not a setting of sppo_toy.py "
                 "(the oracle is the demo's preference game", id="oracle-committee-unused"),
    pytest.param(["--pairrm", "{w}"], "--pairrm '{w}': must be left out", id="pairrm-unused"),
    pytest.param(["--judges", "concise"], "--judges 'concise': must be left out", id="judges-unused"),
    pytest.param(["--eval-prompts", "{w}/p.jsonl"], "--eval-prompts '{w}/p.jsonl': must be left out",
                 id="eval-prompts-unused"),
    pytest.param(["--oracle-prompt", "templated"], "--oracle-prompt 'templated': must be left out",
                 id="oracle-prompt-unused"),
    pytest.param(["--max-prompts", "3"], "--max-prompts 3: must be left out", id="max-prompts-unused"),
    pytest.param(["--groups", "0"], "--groups 0: must be >= 1", id="groups-0"),
    pytest.param(["--figure", "{w}/a_file/gap.png"], "--figure {w}/a_file/gap.png: {w}/a_file is a file, not a folder",
                 id="figure-under-a-file"),
    pytest.param(["--device", "bogus"], "--device 'bogus': must be auto, cpu, or a torch device", id="device-bogus"),
]


@pytest.mark.parametrize("extra, words", BAD_DEMO)
def test_demo_cli_refuses_unused_and_bad_settings_before_any_work(tmp_path, capsys, extra, words):
    """A setting the demo would ignore (it builds its own pi_0, prompts and game oracle) used to be ignored, and
    --oracle committee recorded in the manifest as the oracle; --groups 0 failed after pi_0 was built. Each is one
    line and exit 2 now, before anything is built or written (OUT is not created)."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "out"
    assert sppo_toy.main(["--out", str(out), "--no-progress", *[x.format(w=tmp_path) for x in extra]]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("sppo_toy.py: error: ") and words.format(w=tmp_path) in err, err
    assert not out.exists()


def test_demo_cli_refuses_an_unused_setting_in_a_subprocess(tmp_path):
    """The same end to end (`--model X --prompts /nonexistent`, both ignored before): exit 2, one line, no OUT."""
    r = conftest.run([sys.executable, str(ROOT / "sppo_toy.py"), "--model", "X", "--prompts", "/nonexistent",
                        "--out", str(tmp_path / "out")], cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and not (tmp_path / "out").exists()
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("sppo_toy.py: error: --model 'X': must be left out")


def test_demo_from_python_checks_like_the_cli(tmp_path):
    """demo() called from Python (the notebooks) runs the same checks before building pi_0."""
    import cli
    for run, cfg in ((sppo_toy.demo, sppo_toy.DemoConfig(out=str(tmp_path / "a"), oracle="committee")),
                     (sppo_toy.demo, sppo_toy.DemoConfig(out=str(tmp_path / "a"), groups=0)),
                     (sppo_toy.demo, sppo_toy.DemoConfig(out=str(tmp_path / "a"), loss="ipo"))):
        with pytest.raises(cli.ConfigError):
            run(cfg)
    assert not (tmp_path / "a").exists()


def test_synthetic_dataset_is_valid_d_t():
    rows = [dict(r, ref_logp=-1.0) for r in sppo_toy.synthetic_dataset(10, seed=2, long_rows=1)]
    assert runs.check_dataset(rows, "synthetic") == rows and len(rows[0]["response"].split()) == 100
