"""Tests for sppo_toy.py, the tiny-LM world: tabular SPPO against exact Hedge, the game oracle, the demo's run
directory (interrupted and resumed to the same bytes) and the demo CLI in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hedge_toy
import sppo
import sppo_toy

ROOT = Path(__file__).resolve().parents[1]


def test_tabular_sppo_approaches_hedge_with_many_samples():
    """Finite K shrinks the step to eta (K-1)/K; with K = 40 and many groups SPPO tracks exact Hedge."""
    P, eta = hedge_toy.weighted_rps(), 1.0
    pi1 = np.array([0.6, 0.3, 0.1])
    got = sppo_toy.tabular_sppo(P, eta, T=4, K=40, groups=200, log_z="exact", pi1=pi1, seed=1)
    ref = hedge_toy.hedge_trajectory(P, eta * 39 / 40, 4, pi1)
    assert np.abs(got - ref).sum(-1).max() < 0.03
    far = hedge_toy.hedge_trajectory(P, 0.0, 4, pi1)                                   # no update at all
    assert np.abs(got - far).sum(-1).max() > 0.1


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
    r = subprocess.run([sys.executable, str(ROOT / "sppo_toy.py"), "--iterations", "2", "--out", str(out),
                        "--figure", str(out / "gap.png"), "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LM gap" in r.stdout and "Hedge" in r.stdout
    assert (out / "gap.png").stat().st_size > 10_000
    m = json.loads((out / "demo_metrics.json").read_text())
    for game in m.values():                         # the model's step tracks the Hedge step it approximates
        assert len(game["gap"]) == 3 and max(game["tv"]) < 0.15
        assert game["gap"][2] < game["gap"][0]


def test_demo_config_help_shows_demo_defaults_and_rejects_bad_choices():
    """--help prints the values the demo really uses; a wrong choice exits 2 before any work."""
    r = subprocess.run([sys.executable, str(ROOT / "sppo_toy.py"), "--help"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "250"})                             # one line per flag
    assert r.returncode == 0 and "(default: 20)" in r.stdout and "(default: 3.0)" in r.stdout
    assert "{rmsprop,adamw}" in r.stdout and "(default: adamw)" in r.stdout
    assert sppo_toy.DemoConfig().iterations == 20 and sppo_toy.DemoConfig().eta == 3.0
    with pytest.raises(SystemExit) as e:
        sppo_toy.main(["--selection", "best", "--out", "/nonexistent/never/written"])
    assert e.value.code == 2


def test_synthetic_dataset_is_valid_d_t():
    rows = [dict(r, ref_logp=-1.0) for r in sppo_toy.synthetic_dataset(10, seed=2, long_rows=1)]
    assert sppo.check_dataset(rows, "synthetic") == rows and len(rows[0]["response"].split()) == 100
