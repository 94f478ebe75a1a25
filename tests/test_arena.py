"""Tests for arena.py (Fig. 3 / Table 1): exact win rates by hand, PairRM win rates and best-of-n against
one-prompt-at-a-time references, and the CLI in a subprocess."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arena
import conftest
import hedge_toy
import runs
import sppo
import sppo_toy

ROOT = Path(__file__).resolve().parents[1]


def test_arena_exact_by_hand(tmp_path):
    P = hedge_toy.rock_paper_scissors()
    pis = np.array([[1, 0, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]])
    W = arena.arena_exact(pis, P)
    np.testing.assert_allclose(W, [[0.5, 0.0, 0.5], [1.0, 0.5, 0.5], [0.5, 0.5, 0.5]])     # paper beats rock
    arena.plot_arena(W, ["rock", "paper", "uniform"], tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 5_000


def test_arena_pairrm_and_best_of_n(tmp_path):
    """W[i, j] is the mean of sigma(compare) over prompts, computed here one prompt at a time; W + W^T = 1."""
    import pairrm
    ranker = pairrm.PairRM.from_pretrained(pairrm.save_tiny_random_checkpoint(tmp_path / "rm", seed=1))
    prompts = ["hello there", "tell me a story", "what is two plus two"]
    resp = [["hi", "once upon a time", "four"], ["go away", "no", "five maybe"], ["", "a story", "4"]]
    W, SE = arena.arena_pairrm(ranker, prompts, resp)
    np.testing.assert_allclose(W + W.T, 1.0, atol=1e-6)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        p = [torch.sigmoid(ranker.compare([x], [resp[i][n]], [resp[j][n]]))[0].item() for n, x in enumerate(prompts)]
        assert W[i, j] == pytest.approx(np.mean(p), abs=1e-6)
        assert SE[i, j] == pytest.approx(np.std(p, ddof=1) / np.sqrt(3), abs=1e-6)


def test_best_of_n_against_one_prompt_at_a_time_compare(tmp_path):
    """best-of-n = the candidate with the largest s_PairRM(y_i) = mean_k f(y_i, y_k) (Sec. 5.1), computed here one
    prompt and one ordered pair at a time with compare(), independently of logit_matrices/scores."""
    import pairrm
    ranker = pairrm.PairRM.from_pretrained(pairrm.save_tiny_random_checkpoint(tmp_path / "rm", seed=2))
    prompts = ["hello there", "tell me a story", "what is two plus two"]
    cands = [["hi", "once upon a time", "four", "go away"], ["no", "a story", "4", "five"], ["x", "", "yes", "4"]]
    want = []
    for x, ys in zip(prompts, cands):
        K = len(ys)
        s = [sum(ranker.compare([x], [ys[i]], [ys[k]]).item() for k in range(K) if k != i) for i in range(K)]
        want.append(ys[int(np.argmax(s))])
    assert arena.best_of_n(ranker, prompts, [{"responses": ys} for ys in cands]) == want


def test_arena_cli_best_of_and_responses(tmp_path):
    """arena.py end to end in a subprocess: two tiny policies, best-of-2 under PairRM, W + W^T = 1, the heatmap;
    arena_responses samples each policy under the same seeds (same policy twice -> same responses)."""
    import pairrm
    pol = sppo_toy.build_tiny_policy(tmp_path / "pol", seed=0)
    rm = pairrm.save_tiny_random_checkpoint(tmp_path / "rm", seed=1)
    prompts = tmp_path / "p.jsonl"
    runs.write_jsonl(prompts, [{"prompt": x} for x in ["play rps", "play weighted rps", "rock paper"]])
    cfg = sppo.SPPOConfig(max_new_tokens=3, seed=5, progress=False)
    r1, r2 = arena.arena_responses([pol, pol], ["play rps", "rock paper"], cfg)
    assert r1 == r2 and len(r1) == 2
    with pytest.raises(ValueError, match="ranker"):
        arena.arena_responses([pol], ["play rps"], cfg, best_of=2)
    out = tmp_path / "w.json"
    r = conftest.run([sys.executable, str(ROOT / "arena.py"), "--models", pol, pol, "--prompts", str(prompts),
                      "--pairrm", rm, "--best-of", "2", "--max-new-tokens", "3", "--figure", str(tmp_path / "a.png"),
                      "--json-out", str(out), "--no-progress"], cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    W = np.array(res["W"])
    np.testing.assert_allclose(W + W.T, 1.0, atol=1e-6)
    assert res["responses"][0] == res["responses"][1]             # same policy, same seeds: a tie at 1/2
    np.testing.assert_allclose(W, 0.5, atol=1e-6)
    assert (tmp_path / "a.png").stat().st_size > 5_000
    bad = conftest.run([sys.executable, str(ROOT / "arena.py"), "--models", pol], cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "at least 2" in bad.stderr
