"""Tests for sppo.py: each loss against a hand computation, the tabular minimiser of Eq. (4.4) against Hedge,
sequence_logps against a one-token-at-a-time loop, generation, the resumable run directory, and the demo."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hedge_toy
import sppo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny Llama and its word-level tokenizer, saved and loaded back through from_pretrained."""
    d = tmp_path_factory.mktemp("tiny") / "llama"
    sppo.build_tiny_policy(d, seed=0)
    cfg = sppo.SPPOConfig(progress=False)
    return d, *sppo.load_policy(d, cfg, "cpu")


# -------------------------------------------------------------------------------------------------- losses
def t(*xs):
    return [torch.tensor([x], dtype=torch.float64) for x in xs]


def test_sppo_loss_by_hand():
    logp, ref, wp = t(-1.0, -2.0, 0.75)
    # Eq. (4.7): (log ratio 1 - eta (0.75 - 1/2))^2 with eta = 2 -> (1 - 0.5)^2
    assert sppo.sppo_loss(logp, ref, wp, 2.0).item() == pytest.approx(0.25)
    # Eq. (4.5) target eta*P - log Z = 1.5 - 1.2 = 0.3 -> (1 - 0.3)^2
    assert sppo.sppo_loss(logp, ref, wp, 2.0, log_z=1.2).item() == pytest.approx(0.49)
    # no reduction: one value per example
    assert sppo.sppo_loss(torch.zeros(4), torch.zeros(4), torch.full((4,), 0.5), 1000.0).shape == (4,)


def test_sppo_pair_loss_by_hand():
    lw, rw, ll, rl = t(-1.0, -1.5, -3.0, -2.0)          # log ratios l_w = 0.5, l_l = -1.0
    eta = 4.0
    # Eq. (4.12), P(y_w > y_l) = 0.8: (0.5 - 4*0.3)^2 + (-1 - 4*(0.2 - 0.5))^2 = 0.49 + 0.04
    assert sppo.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.8]), eta).item() == pytest.approx(0.53)
    # released form, row means 0.7 / 0.3, averaged: ((0.5 - 0.8)^2 + (-1 + 0.8)^2) / 2 = (0.09 + 0.04) / 2
    got = sppo.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.7]), eta, prob_l=torch.tensor([0.3]), form="released")
    assert got.item() == pytest.approx(0.065)
    with pytest.raises(ValueError, match="prob_l"):
        sppo.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.7]), eta, form="released")
    with pytest.raises(ValueError, match="form"):
        sppo.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.7]), eta, form="nope")


def test_dpo_ipo_kto_hard_by_hand():
    lw, rw, ll, rl = t(-1.0, -1.5, -3.0, -2.0)
    beta = 0.5                                           # a = 0.25, b = -0.5
    a, b = 0.25, -0.5
    assert sppo.dpo_loss(lw, rw, ll, rl, beta).item() == pytest.approx(-math.log(1 / (1 + math.exp(-(a - b)))))
    assert sppo.ipo_loss(lw, rw, ll, rl, beta).item() == pytest.approx((a - b - 1) ** 2)
    c = beta * 0.4
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert sppo.kto_loss(lw, rw, ll, rl, beta, kl=0.4).item() == pytest.approx(sig(-a + c) + sig(b - c))
    # SPPO with a hard label (Sec. 4.5): eta^2 [(a - 1/2)^2 + (b + 1/2)^2] with beta = 1/eta
    eta = 1 / beta
    assert sppo.sppo_hard_loss(lw, rw, ll, rl, eta).item() == pytest.approx(eta ** 2 * ((a - .5) ** 2 + (b + .5) ** 2))


def test_hedge_update_minimises_eq_4_4_tabular():
    """Under exact expectations (y ~ pi_t, exact P(y > pi_t), exact log Z), the minimiser of (4.4) over all
    policies is the Hedge step (4.1): it makes every squared term zero."""
    P = hedge_toy.weighted_rps()
    pi_t = np.array([0.5, 0.3, 0.2])
    eta = 1.7
    win = torch.tensor(P @ pi_t)                                                        # P(y > pi_t)
    log_z = float(hedge_toy.log_partition(P, pi_t, eta))
    ref = torch.log(torch.tensor(pi_t))
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.tensor(pi_t) * sppo.sppo_loss(torch.log_softmax(theta, 0), ref, win, eta, log_z)).sum()
        loss.backward()
        return loss
    opt.step(closure)
    np.testing.assert_allclose(torch.softmax(theta, 0).detach().numpy(), hedge_toy.hedge_step(P, pi_t, eta),
                               atol=1e-6)


def test_tabular_sppo_approaches_hedge_with_many_samples():
    """Finite K shrinks the step to eta (K-1)/K; with K = 40 and many groups SPPO tracks exact Hedge."""
    P, eta = hedge_toy.weighted_rps(), 1.0
    pi1 = np.array([0.6, 0.3, 0.1])
    got = sppo.tabular_sppo(P, eta, T=4, K=40, groups=200, log_z="exact", pi1=pi1, seed=1)
    ref = hedge_toy.hedge_trajectory(P, eta * 39 / 40, 4, pi1)
    assert np.abs(got - ref).sum(-1).max() < 0.03
    far = hedge_toy.hedge_trajectory(P, 0.0, 4, pi1)                                   # no update at all
    assert np.abs(got - far).sum(-1).max() > 0.1


# -------------------------------------------------------------------------------------------------- win rates
def test_win_rates_and_select_pair_by_hand():
    P = np.array([[0.5, 0.9, 0.6], [0.1, 0.5, 0.2], [0.4, 0.8, 0.5]])
    np.testing.assert_allclose(sppo.win_rates(P), [2.0 / 3, 0.8 / 3, 1.7 / 3])       # self-term 1/2 included
    batch = np.stack([P, P.T[[0, 1, 2]][:, [0, 1, 2]]])                               # (2, 3, 3)
    batch[1] = 1 - P
    w, l = sppo.select_pair(sppo.win_rates(batch))
    assert w.tolist() == [0, 1] and l.tolist() == [1, 0]
    w, l = sppo.select_pair(np.full(4, 0.5))                                          # all tied: distinct rows
    assert (w, l) == (0, 1)
    assert torch.is_tensor(sppo.win_rates(torch.tensor(P)))
    with pytest.raises(ValueError, match="diagonal"):
        sppo.win_rates(np.array([[0.4, 0.5], [0.5, 0.5]]))


def test_log_z_estimate_eq_4_5():
    wp = np.array([0.9, 0.5, 0.1])
    assert float(sppo.log_z_estimate(wp, 2.0)) == pytest.approx(math.log(np.exp(2 * wp).mean()))


# -------------------------------------------------------------------------------------------------- log-probs
def naive_logps(model, pairs):
    """One sequence at a time, one token at a time: sum_t log softmax(logits_{t-1})[y_t] over response tokens."""
    out = []
    for p, r in pairs:
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()                            # (T, V)
        out.append(sum(torch.log_softmax(logits[len(p) + i - 1], -1)[tok].item() for i, tok in enumerate(r)))
    return np.array(out)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_matches_naive_loop(tiny, side):
    _, model, tok = tiny
    prompts = ["play rps", "play weighted rps", "rock paper rock paper"]
    resps = [("rock", True), ("big rock", True), ("sharp", False)]
    pairs = [sppo.encode_example(tok, x, y, f, 64, 32)[:2] for x, (y, f) in zip(prompts, resps)]
    b = sppo.collate(pairs, tok.pad_token_id, padding_side=side)
    with torch.no_grad():
        got = sppo.sequence_logps(model, **b)
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), naive_logps(model, pairs), rtol=1e-5, atol=1e-5)


def test_sequence_logps_bf16_weights(tiny):
    d, model, tok = tiny
    m16 = sppo.load_policy(d, sppo.SPPOConfig(dtype="bfloat16"), "cpu")[0]
    pairs = [sppo.encode_example(tok, "play rps", y, True, 64, 32)[:2] for y in ["rock", "big rock", "paper"]]
    for side in ["right", "left"]:
        with torch.no_grad():
            got = sppo.sequence_logps(m16, **sppo.collate(pairs, tok.pad_token_id, side))
        assert got.dtype == torch.float32                                                # fp32 accumulation
        np.testing.assert_allclose(got.numpy(), naive_logps(m16, pairs), atol=2e-2)       # bf16 forward noise
    np.testing.assert_allclose(got.numpy(), naive_logps(model, pairs), atol=0.1)


def test_encode_example_eos_and_truncation(tiny):
    _, _, tok = tiny
    p, r, cut = sppo.encode_example(tok, "play rps", "big rock", True, 64, 32)
    assert p == tok.apply_chat_template([{"role": "user", "content": "play rps"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert r == tok.convert_tokens_to_ids(["big", "rock"]) + [tok.eos_token_id] and not cut
    p, r, cut = sppo.encode_example(tok, "play rps " * 10, "rock " * 10, False, 12, 5)
    assert len(p) == 5 and p[-1] == tok.convert_tokens_to_ids("=>") and len(r) == 7 and cut


# -------------------------------------------------------------------------------------------------- generation
def test_generation_k_per_prompt_and_reproducible(tiny):
    _, model, tok = tiny
    cfg = sppo.SPPOConfig(K=4, max_new_tokens=3, gen_batch=2, progress=False)
    prompts = ["play rps", "play weighted rps", "play rps"]
    a = sppo.generate_responses(model, tok, prompts, cfg, seed=3)
    b = sppo.generate_responses(model, tok, prompts, cfg, seed=3)
    c = sppo.generate_responses(model, tok, prompts, cfg, seed=4)
    assert a == b and a != c
    assert len(a) == 3 and all(len(g["responses"]) == 4 == len(g["finished"]) for g in a)
    for g in a:                                          # a finished response re-tokenises within the cap
        for y, done in zip(g["responses"], g["finished"]):
            n = len(tok(y, add_special_tokens=False)["input_ids"])
            assert n < 3 if done else n == 3


def test_game_oracle_malformed_loses():
    o = sppo.GameOracle(sppo.demo_games())
    P = o("play rps", ["rock", "paper", "rock rock", "paper"])
    np.testing.assert_allclose(P[:, 2], [1, 1, 0.5, 1])
    assert P[0, 1] == 0.0 and P[1, 3] == 0.5
    hedge_toy.validate_preference(P)


# -------------------------------------------------------------------------------------------------- run directory
def demo_args(out, *extra):
    return ["--demo", "--iterations", "2", "--demo-groups", "6", "--epochs", "2", "--out", str(out),
            "--figure", str(Path(out) / "gap.png"), "--no-progress", *extra]


def artifacts(out):
    files = sorted(p for p in Path(out).rglob("*") if p.suffix in (".jsonl",) or p.name == "model.safetensors")
    return {str(p.relative_to(out)): p.read_bytes() if p.suffix == ".jsonl" else
            {k: v.clone() for k, v in __import__("safetensors.torch").torch.load_file(p).items()} for p in files}


def test_interrupted_run_resumes_to_same_artifacts(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert sppo.main(demo_args(full)) == 0
    for stage in ["generate", "dataset"]:                         # stop twice, at different stages, then resume
        assert sppo.main(demo_args(cut, "--stop-after", stage)) == 0
    assert (cut / "iter0" / "dataset.jsonl").exists() and not (cut / "iter0" / "model").exists()
    assert sppo.main(demo_args(cut)) == 0
    a, b = artifacts(full), artifacts(cut)
    assert a.keys() == b.keys() and len(a) == 2 * 4 + 2          # + prompts.jsonl, pi0
    for k in a:
        if k.endswith(".jsonl"):
            assert a[k] == b[k], k
        else:
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    # a truncated artifact is reported with its path and line, never silently used
    f = cut / "iter1" / "preferences.jsonl"
    text = f.read_text()
    f.write_text(text[: len(text) - 40])
    with pytest.raises(sppo.ArtifactError, match=r"preferences\.jsonl:\d+: not valid JSON"):
        sppo.main(demo_args(cut))


def test_diverged_loss_stops_and_keeps_weights(tiny):
    _, model, tok = tiny
    rows = [{"prompt_id": 0, "prompt": "play rps", "response": "rock", "finished": True, "win_prob": 0.5,
             "ref_logp": 1e30}]
    before = [p.detach().clone() for p in model.parameters()]
    cfg = sppo.SPPOConfig(global_batch=1, micro_batch=1, lr=1e-3, progress=False)
    with pytest.raises(sppo.DivergedError, match="not finite"):
        sppo.train_policy(model, tok, rows, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_prompt_files(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(sppo.ArtifactError, match=r"p\.jsonl:2: missing field 'prompt'"):
        sppo.load_prompts(f)
    f.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(sppo.ArtifactError, match=r"p\.jsonl:2: field 'prompt' should be str"):
        sppo.load_prompts(f)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"instruction": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(sppo.ArtifactError, match=r"no column 'prompt'; columns are \['instruction'\]"):
        sppo.load_prompts(tmp_path / "p.parquet")
    assert sppo.load_prompts(tmp_path / "p.parquet", column="instruction") == ["x", "y"]
    with pytest.raises(sppo.ArtifactError, match="record 1: field 'win_prob' should be"):
        sppo.check_dataset([{"prompt_id": 0, "prompt": "x", "response": "y", "finished": True, "win_prob": "1",
                             "ref_logp": 0.0}], "d.jsonl")


@pytest.mark.slow
def test_demo_cli_small(tmp_path):
    """The demo end to end in a subprocess, at small size: it trains, prints the table and writes the plot."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(ROOT / "sppo.py"), "--demo", "--iterations", "2", "--out", str(out),
                        "--figure", str(out / "gap.png"), "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LM gap" in r.stdout and "Hedge" in r.stdout
    assert (out / "gap.png").stat().st_size > 10_000
    m = json.loads((out / "demo_metrics.json").read_text())
    for game in m.values():                         # the model's step tracks the Hedge step it approximates
        assert len(game["gap"]) == 3 and max(game["tv"]) < 0.15
        assert game["gap"][2] < game["gap"][0]


def test_rank_stage_with_pairrm(tmp_path, tiny):
    """`--oracle pairrm`: the rank stage fills each prompt's K x K matrix with PairRM's batched preference matrix."""
    import pairrm
    d, _, _ = tiny
    rm_dir = pairrm.save_tiny_random_checkpoint(tmp_path / "pairrm", layout="PairRM-hf", seed=0)
    prompts = tmp_path / "p.jsonl"
    sppo.write_jsonl(prompts, [{"prompt": x} for x in ["play rps", "play weighted rps", "rock paper"]])
    out = tmp_path / "run"
    args = ["--model", str(d), "--prompts", str(prompts), "--oracle", "pairrm", "--pairrm", str(rm_dir),
            "--iterations", "1", "--K", "3", "--max-new-tokens", "4", "--out", str(out), "--stop-after", "rank",
            "--no-progress"]
    assert sppo.main(args) == 0
    gens = sppo.read_jsonl(out / "iter0" / "generations.jsonl")
    prefs = sppo.read_jsonl(out / "iter0" / "preferences.jsonl")
    assert len(prefs) == 3
    ranker = pairrm.PairRM.from_pretrained(rm_dir)
    for g, p in zip(gens, prefs):                                     # one prompt at a time, as the reference
        want = ranker.preference_matrix(g["prompt"], g["responses"], mode="pairwise").double().numpy()
        np.testing.assert_allclose(np.array(p["P"]), want, atol=1e-6)
    # the next stages run from these files: D_t keeps the winner and loser of each prompt
    assert sppo.main(args[:-3] + ["--stop-after", "dataset", "--no-progress"]) == 0
    rows = sppo.read_jsonl(out / "iter0" / "dataset.jsonl")
    assert [r["role"] for r in rows] == ["winner", "loser"] * 3
    for r in rows:
        wp = sppo.win_rates(np.array(prefs[r["prompt_id"]]["P"]))
        assert r["win_prob"] == pytest.approx(wp[r["k"]]) and wp.max() == pytest.approx(wp[rows[2 * r["prompt_id"]]["k"]])


def test_arena_exact_by_hand(tmp_path):
    P = hedge_toy.rock_paper_scissors()
    pis = np.array([[1, 0, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]])
    W = sppo.arena_exact(pis, P)
    np.testing.assert_allclose(W, [[0.5, 0.0, 0.5], [1.0, 0.5, 0.5], [0.5, 0.5, 0.5]])     # paper beats rock
    sppo.plot_arena(W, ["rock", "paper", "uniform"], tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 5_000


def test_arena_pairrm_and_best_of_n(tmp_path):
    """W[i, j] is the mean of sigma(compare) over prompts, computed here one prompt at a time; W + W^T = 1."""
    import pairrm
    ranker = pairrm.PairRM.from_pretrained(pairrm.save_tiny_random_checkpoint(tmp_path / "rm", seed=1))
    prompts = ["hello there", "tell me a story", "what is two plus two"]
    resp = [["hi", "once upon a time", "four"], ["go away", "no", "five maybe"], ["", "a story", "4"]]
    W, SE = sppo.arena_pairrm(ranker, prompts, resp)
    np.testing.assert_allclose(W + W.T, 1.0, atol=1e-6)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        p = [torch.sigmoid(ranker.compare([x], [resp[i][n]], [resp[j][n]]))[0].item() for n, x in enumerate(prompts)]
        assert W[i, j] == pytest.approx(np.mean(p), abs=1e-6)
        assert SE[i, j] == pytest.approx(np.std(p, ddof=1) / np.sqrt(3), abs=1e-6)
    gens = [{"responses": r} for r in resp]
    best = sppo.best_of_n(ranker, prompts, gens)
    s = ranker.scores(prompts, resp)
    assert best == [r[int(k)] for r, k in zip(resp, s.argmax(-1))]
