"""Tests for arena.py (Fig. 3 / Table 1): exact win rates by hand, PairRM win rates and best-of-n against
one-prompt-at-a-time references, and the CLI in a subprocess."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arena
import conftest
import experiments
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
    assert res["vs_first_percent"][1] == {"raw": [50.0, 0.0], "lc": [50.0, 0.0]}      # equal lengths: LC = raw
    assert "raw | length-controlled (lc_win_rate)" in r.stdout
    assert (tmp_path / "a.png").stat().st_size > 5_000
    bad = conftest.run([sys.executable, str(ROOT / "arena.py"), "--models", pol], cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "at least 2" in bad.stderr


# ----------------------------------------------------------------------------------------------------------------
# The CLI's checks: every bad setting is one line and exit 2 before any model is loaded or any file written.
@pytest.fixture
def world(tmp_path):
    """Paths that pass the path checks without building anything: two model folders (config.json and a weights
    file; never loaded, since every case here stops before), a prompt file, a PairRM folder."""
    for name in ("pi_0", "pi_1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    (tmp_path / "rm").mkdir()
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "play rps"}, {"prompt": "play weighted rps"}])
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def arena_argv(w, *extra, pairrm=True):
    return ["--models", str(w / "pi_0"), str(w / "pi_1"), "--prompts", str(w / "p.jsonl"),
            *(["--pairrm", str(w / "rm")] if pairrm else []), "--figure", str(w / "out" / "arena.png"),
            "--json-out", str(w / "out" / "w.json"), "--no-progress", *extra]


def case(name, extra, words, pairrm=True, marks=()):
    return pytest.param(extra, words, pairrm, id=name, marks=marks)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
BAD = [  # (extra flags, what the one line must say, --pairrm given); {w} is the test's folder
    case("labels-for-fewer-models", ["--labels", "ONLY"], "--labels ['ONLY']: must be one label per --models"),
    case("max-prompts-negative", ["--max-prompts", "-1"], "--max-prompts -1: must be >= 0"),
    case("top-p-2", ["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    case("top-p-0", ["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    case("temperature-0", ["--temperature", "0"], "--temperature 0.0: must be finite and > 0"),
    case("temperature-nan", ["--temperature", "nan"], "--temperature nan: must be finite and > 0"),
    case("temperature-negative", ["--temperature", "-1"], "--temperature -1.0: must be finite and > 0"),
    case("max-new-tokens-0", ["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    case("gen-batch-0", ["--gen-batch", "0"], "--gen-batch 0: must be >= 1"),
    case("samples-0", ["--samples", "0", "--oracle", "committee"], "--samples 0: must be >= 1", pairrm=False),
    case("samples-with-pairrm", ["--samples", "2"], "--samples 2: must be 1 with --oracle pairrm"),
    case("best-of-0", ["--best-of", "0"], "--best-of 0: must be >= 1"),
    case("best-of-with-committee", ["--best-of", "4", "--oracle", "committee"],
         "--best-of 4: must be 1 with --oracle committee", pairrm=False),
    case("device-bogus", ["--device", "bogus"], "--device 'bogus': must be auto, cpu, or a torch device"),
    case("device-cuda-without-cuda", ["--device", "cuda"], "--device 'cuda': must be auto, cpu, or a torch device",
         marks=NO_GPU),
    case("one-model", ["--models", "{w}/pi_0"], "--models ['{w}/pi_0']: must be at least 2 policies"),
    case("model-missing", ["--models", "{w}/pi_0", "{w}/nope"], "--models {w}/nope: no such folder"),
    case("model-not-a-model", ["--models", "{w}/pi_0", "{w}/rm"], "--models {w}/rm: not a model folder"),
    case("prompts-missing", ["--prompts", "{w}/nope.jsonl"], "--prompts {w}/nope.jsonl: no such file"),
    case("pairrm-missing", ["--pairrm", "{w}/nope"], "--pairrm {w}/nope: no such folder"),
    case("pairrm-with-committee", ["--oracle", "committee"], "--pairrm '{w}/rm': must be left out with --oracle "
                                                              "committee"),
    case("judges-unknown", ["--judges", "concise,longest"], "--judges 'concise,longest': must be comma-separated"),
    case("figure-under-a-file", ["--figure", "{w}/a_file/arena.png"], "--figure {w}/a_file/arena.png: {w}/a_file is a "
                                                                      "file, not a folder"),
    case("json-out-a-folder", ["--json-out", "{w}"], "--json-out {w}: exists and is a folder"),
    case("pairrm-config-json-only", ["--pairrm", "{w}/pi_0"], "{w}/pi_0 is not a PairRM checkpoint: missing "
                                                               "tokenizer.json"),
]


@pytest.mark.parametrize("extra, words, pairrm", BAD)
def test_cli_bad_setting_is_one_line_and_nothing_is_written(world, capsys, extra, words, pairrm):
    """arena.main as `python arena.py` runs it (sys.exit(main())): exit code 2, one line naming the flag, nothing on
    stdout, no figure or JSON, no model loaded. A flag given twice takes its last value (argparse)."""
    assert arena.main(arena_argv(world, *[x.format(w=world) for x in extra], pairrm=pairrm)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("arena.py: error: ") and words.format(w=world) in err, err
    assert not (world / "out").exists()


def test_existing_outputs_are_overwritten_not_refused(world):
    """A re-run writes over its figure and JSON: an existing --figure / --json-out file passes the path checks."""
    import cli
    (world / "out").mkdir()
    (world / "out" / "arena.png").write_bytes(b"old")
    (world / "out" / "w.json").write_text("{}")
    cfg = cli.parse(arena.ArenaConfig, arena_argv(world))
    assert cli.check(cfg) is cfg


def test_cli_refuses_labels_for_fewer_policies_in_a_subprocess(world):
    """The same check end to end: `--labels ONLY` with two policies used to drop a policy from the table and JSON."""
    r = conftest.run([sys.executable, str(ROOT / "arena.py"), *arena_argv(world, "--labels", "ONLY")],
                     cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and not (world / "out").exists()
    assert r.stderr.splitlines() == ["arena.py: error: --labels ['ONLY']: must be one label per --models policy, or "
                                     "left out (their folder names)"]


def test_config_file_lists_stay_lists(world):
    """--config FILE.yaml: models and labels are YAML lists and stay lists (the RULES see 2 policies, 2 labels)."""
    import cli
    (world / "c.yaml").write_text(f"models:\n  - {world / 'pi_0'}\n  - {world / 'pi_1'}\nlabels: [base, sppo]\n"
                                  f"prompts: {world / 'p.jsonl'}\npairrm: {world / 'rm'}\n")
    cfg = cli.check(cli.parse(arena.ArenaConfig, ["--config", str(world / "c.yaml")]))
    assert cfg.models == [str(world / "pi_0"), str(world / "pi_1")] and cfg.labels == ["base", "sppo"]
    assert arena.main(["--config", str(world / "c.yaml"), "--labels", "only", "--figure", str(world / "o.png")]) == 2
    assert not (world / "o.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# real_run.py, the arena's report on a finished real-model run: the same checks before any sampling.
@pytest.mark.parametrize("extra, words", [
    pytest.param(["--out", "{w}/nope"], "--out {w}/nope: no such folder", id="real-run-out-missing"),
    pytest.param(["--out", "{w}/rm"], "--out {w}/rm: no config.json: not an sppo.py run directory",
                 id="real-run-not-a-run"),
    pytest.param(["--out", "{w}/half"], "{w}/half/iter0/model: missing: the run has not finished iteration 0",
                 id="real-run-unfinished"),
    pytest.param(["--samples", "0"], "--samples 0: must be >= 1", id="real-run-samples-0"),
    pytest.param(["--max-prompts", "-1"], "--max-prompts -1: must be >= 0", id="real-run-max-prompts-negative"),
    pytest.param(["--gen-batch", "0"], "--gen-batch 0: must be >= 1", id="real-run-gen-batch-0"),
    pytest.param(["--short-cap", "-1"], "--short-cap -1: must be >= 0", id="real-run-short-cap-negative"),
    pytest.param(["--eos-bias", "0"], "--eos-bias 0.0: must be finite and > 0", id="real-run-eos-bias-0"),
    pytest.param(["--cache", "{w}/a_file"], "--cache {w}/a_file: exists and is not a folder",
                 id="real-run-cache-a-file"),
    pytest.param(["--prompts", "{w}/nope.jsonl"], "--prompts {w}/nope.jsonl: no such file",
                 id="real-run-prompts-missing"),
    pytest.param(["--figures", "{w}/a_file"], "--figures {w}/a_file: exists and is not a folder",
                 id="real-run-figures-a-file"),
])
def test_real_run_cli_bad_setting_is_one_line_before_any_work(world, capsys, extra, words):
    import real_run
    (world / "half").mkdir()
    runs.write_json(world / "half" / "config.json", {"iterations": 1, "model": str(world / "pi_0")})
    argv = ["--out", str(world / "half"), "--prompts", str(world / "p.jsonl"), "--figures", str(world / "figs"),
            *[x.format(w=world) for x in extra]]
    assert real_run.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("real_run.py: error: ") and words.format(w=world) in err, err
    assert not (world / "figs").exists() and not (world / "half" / "arena").exists()


# ----------------------------------------------------------------------------------------------------------------
# arena.lc_win_rate: AlpacaEval 2.0's length-controlled win rate (arXiv 2404.04475, Sec. 3), one model pair.
def synthetic_pair(seed, theta, phi, N, shift=8.0, votes=3):
    """Prompts drawn from the GLM itself: length differences d ~ N(shift, 15) tokens, s = sigmoid(theta + phi
    tanh(d / sd)), and p = the share of `votes` independent judges that prefer the model (soft labels)."""
    rng = np.random.default_rng(seed)
    len_base = rng.integers(10, 60, N).astype(float)
    len_model = np.maximum(len_base + np.round(rng.normal(shift, 15, N)), 0)
    d = len_model - len_base
    s = 1 / (1 + np.exp(-(theta + phi * np.tanh(d / d.std(ddof=1)))))
    return rng.binomial(votes, s) / votes, len_model, len_base


def test_lc_win_rate_by_hand_on_two_length_groups():
    """Two prompts where the model is 10 tokens longer (p = 1, 0.6) and two where it is 10 shorter (p = 1/2, 1/2):
    z = +-tanh(10/sd) takes two values, so the fit is saturated, s = 0.8 on the longer group and 0.5 on the shorter,
    theta = (logit 0.8 + logit 0.5) / 2 = (ln 4 + 0) / 2 = ln 2 and the rate is 100 sigmoid(ln 2) = 200/3 (raw: 65).
    s.e. by hand (the sandwich of a saturated fit is the delta method on the group means): var(mean p | longer) =
    ((1 - .8)^2 + (.6 - .8)^2) / 2^2 = 0.02, var(logit) = 0.02 / (.8 .2)^2 = 0.78125; the shorter group has no
    spread; var(theta) = (0.78125 + 0) / 4 * N/(N-k) = 0.1953125 * 4/2 = 0.390625; se = 100 (2/3)(1/3) 0.625."""
    fit = experiments.lc_fit([1, .6, .5, .5], [20, 20, 0, 0], [10, 10, 10, 10])
    assert fit["theta"] == pytest.approx(np.log(2)) and fit["raw"] == pytest.approx(65)
    assert arena.lc_win_rate([1, .6, .5, .5], [20, 20, 0, 0], [10, 10, 10, 10]) == pytest.approx(
        (200 / 3, 100 * 2 / 9 * 0.625))


def test_lc_win_rate_with_equal_lengths_is_the_raw_win_rate():
    """Equal lengths (sd = 0, the tanh term drops): theta = logit(mean p), so the rate is 100 mean(p), and its s.e.
    is the raw win rate's, std(p, ddof=1)/sqrt(N) (sppo.win_rate's, over prompts). All won: 100, s.e. 0."""
    rng = np.random.default_rng(0)
    p, lengths = rng.choice([0, 1 / 3, 1 / 2, 2 / 3, 1], 25), rng.integers(1, 48, 25)
    rate, se = arena.lc_win_rate(p, lengths, lengths)
    assert rate == pytest.approx(100 * p.mean()) and se == pytest.approx(100 * p.std(ddof=1) / 5)
    assert arena.lc_win_rate([1, 1, 1], [3, 9, 4], [5, 5, 5]) == (100.0, 0.0)
    assert arena.lc_win_rate([0, 0], [3, 3], [3, 3]) == (0.0, 0.0)


def test_lc_fit_against_scipy_and_finite_differences():
    """The Newton fit against scipy's BFGS on the same soft-label log-likelihood, and the sandwich against one built
    from finite differences: per-prompt scores g_n and the Hessian of the summed log-likelihood, numerically."""
    from scipy.optimize import minimize
    p, lm, lb = synthetic_pair(3, 0.4, -1.0, 60)
    z = np.tanh((lm - lb) / (lm - lb).std(ddof=1))

    def ll(b, n=slice(None)):
        eta = b[0] + b[1] * z[n]
        return np.sum(p[n] * eta - np.logaddexp(0, eta))
    ref = minimize(lambda b: -ll(b), [0.0, 0.0], method="BFGS", options={"gtol": 1e-10}).x
    fit = experiments.lc_fit(p, lm, lb)
    np.testing.assert_allclose([fit["theta"], fit["phi"]], ref, atol=1e-5)
    h, b, e = 1e-5, ref, np.eye(2)
    G = np.array([[(ll(b + h * e[i], n) - ll(b - h * e[i], n)) / (2 * h) for i in range(2)] for n in range(60)])
    H = np.array([[(ll(b + h * e[i] + h * e[j]) - ll(b + h * e[i] - h * e[j]) - ll(b - h * e[i] + h * e[j])
                    + ll(b - h * e[i] - h * e[j])) / (4 * h * h) for j in range(2)] for i in range(2)])
    cov = 60 / 58 * np.linalg.inv(H) @ G.T @ G @ np.linalg.inv(H)
    np.testing.assert_allclose(fit["cov"], cov, rtol=1e-3)
    s0 = 1 / (1 + np.exp(-ref[0]))
    assert fit["se"] == pytest.approx(100 * s0 * (1 - s0) * np.sqrt(cov[0, 0]), rel=1e-3)


def test_lc_win_rate_recovers_theta_where_the_raw_rate_is_biased_by_length():
    """Data drawn from the GLM: the model is 8 tokens longer on average and its wins lean on length (phi = 1.5), so
    the raw win rate overstates 100 sigmoid(theta); the length-controlled rate recovers it within 2 of its s.e. on
    at least 8 of 10 seeds, with a mean error well inside one s.e. and far smaller than the raw rate's."""
    theta, phi, target = 0.3, 1.5, 100 / (1 + np.exp(-0.3))
    err, ses, raw_err = [], [], []
    for seed in range(10):
        p, lm, lb = synthetic_pair(seed, theta, phi, 400)
        rate, se = arena.lc_win_rate(p, lm, lb)
        err, ses, raw_err = err + [rate - target], ses + [se], raw_err + [100 * p.mean() - target]
    assert sum(abs(e) < 2 * se for e, se in zip(err, ses)) >= 8, (err, ses)      # 9 of 10 here
    assert abs(np.mean(err)) < 0.5 * np.mean(ses)                                   # 0.06 against s.e. ~1.7
    assert np.mean(raw_err) > 3 * np.mean(ses)                                      # the raw rate: +8.7


def test_lc_win_rate_standard_error_is_calibrated_and_symmetric():
    """Over 200 draws the spread of the rate matches the mean sandwich s.e. (to 15%): the soft labels (3 votes) vary
    less than Bernoulli labels would, which the inverse Fisher information would miss. Swapping model and baseline
    (p -> 1 - p, lengths swapped) gives 100 - rate with the same s.e."""
    rates, ses = np.array([arena.lc_win_rate(*synthetic_pair(100 + s, -0.2, 0.8, 150)) for s in range(200)]).T
    assert rates.std(ddof=1) == pytest.approx(ses.mean(), rel=0.15)
    p, lm, lb = synthetic_pair(7, -0.2, 0.8, 150)
    rate, se = arena.lc_win_rate(p, lm, lb)
    assert arena.lc_win_rate(1 - p, lb, lm) == pytest.approx((100 - rate, se))


def test_lc_against_and_token_lengths_one_policy_at_a_time(tmp_path):
    """lc_against against lc_win_rate called policy by policy on the column of the base, and the raw rate against
    100 x (mean, s.e.) of that column; a separated column gives lc None. token_lengths: the mean number of sampled
    ids over a prompt's samples, or a tokenizer's count of each text."""
    rng = np.random.default_rng(1)
    N, m = 30, 3
    mats = np.full((N, m, m), 0.5)
    mats[:, 1, 0] = rng.choice([0, 1 / 3, 2 / 3, 1], N)
    lengths = rng.integers(5, 48, (m, N)).astype(float)
    mats[:, 2, 0] = (lengths[2] > lengths[0]).astype(float)            # wins exactly when longer: separated
    mats[:, 0, 1:] = 1 - mats[:, 1:, 0]
    table = arena.lc_against(mats, lengths)
    assert table[0] == {"raw": (50.0, 0.0), "lc": (50.0, 0.0)}
    assert table[1]["lc"] == pytest.approx(arena.lc_win_rate(mats[:, 1, 0], lengths[1], lengths[0]))
    assert table[1]["raw"] == pytest.approx((100 * mats[:, 1, 0].mean(), 100 * mats[:, 1, 0].std(ddof=1) / np.sqrt(N)))
    assert table[2]["lc"] is None and "the length term separates the preferences" in table[2]["why"]
    gens = [{"token_ids": [[1, 2, 3], [4]]}, {"token_ids": [[5, 6]]}]
    np.testing.assert_array_equal(arena.token_lengths(gens), [2.0, 2.0])
    pol = sppo_toy.build_tiny_policy(tmp_path / "pol", seed=0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(pol)
    texts = ["rock paper", "scissors rock rock"]
    np.testing.assert_array_equal(arena.token_lengths(model_dir=pol, texts=texts),
                                  [len(tok.encode(t, add_special_tokens=False)) for t in texts])


@pytest.mark.parametrize("args, words", [
    (([0.5, 1.5], [1, 2], [1, 1]), "p[1] = 1.5 must be in [0, 1]"),
    (([0.5, 0.5], [1, -2], [1, 1]), "len_model[1] = -2 must be >= 0 (tokens)"),
    (([0.5, 0.5, 1], [1, 2], [1, 1]), "len_model must be 1-D with one entry per prompt (3 in p), got shape (2,)"),
    (([0.5, np.nan], [1, 2], [1, 1]), "p[1] is not finite"),
    (([0.5], [1], [1]), "needs at least 2 prompts for a standard error, got 1"),
    (([0.5, 1], [1, 2], [1, 1]), "2 prompts for 2 parameters (theta, phi): the sandwich s.e. needs more prompts"),
    (([1, 1, 0, 0], [20, 20, 0, 0], [10] * 4), "the length term separates the preferences"),
])
def test_lc_win_rate_refuses_bad_input_naming_it(args, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        arena.lc_win_rate(*args)


def test_real_run_evaluates_under_the_committee_each_judge_and_the_held_out_judge(tmp_path):
    """real_run.evaluate on hand-made records of 2 policies (no model): one evaluator per judge set, each equal to
    arena_oracle and lc_against computed directly; the held-out judge only where every prompt has a reference."""
    import committee
    import real_run
    prompts = ["How do I plant a seed?", "What is the capital of Japan?"]
    gens = [[{"responses": ["Plant seed."], "finished": [True], "token_ids": [[1, 2, 3]]},
             {"responses": ["Japan."], "finished": [True], "token_ids": [[4, 5]]}],
            [{"responses": ["Dig a small hole, put the seed in, cover it with soil and water it."], "finished": [True],
              "token_ids": [list(range(16))]},
             {"responses": ["The capital of Japan is Tokyo."], "finished": [True], "token_ids": [list(range(8))]}]]
    refs = tmp_path / "r.jsonl"
    runs.write_jsonl(refs, [{"prompt": x, "reference": r} for x, r in zip(prompts, ["Dig a hole, sow, cover, water.",
                                                                                   "The capital is Tokyo."])])
    oracles, note = real_run.evaluators("concise,informs,plain", prompts, refs)
    assert note is None and list(oracles) == ["committee (concise,informs,plain)", "concise alone", "informs alone",
                                              "plain alone", "held-out judge (references)",
                                              "held-out judge, recall only (lambda 0)"]
    ev = real_run.evaluate(oracles, prompts, gens)
    lengths = [np.array([3.0, 2.0]), np.array([16.0, 8.0])]
    for name, oracle in oracles.items():
        W, SE = arena.arena_oracle(oracle, prompts, gens)
        np.testing.assert_allclose(ev[name]["W"], W)
        assert ev[name]["vs_pi0"] == arena.lc_against(arena.oracle_matrices(oracle, prompts, gens), lengths)
    assert ev["held-out judge (references)"]["W"][1][0] == 1.0 and ev["concise alone"]["W"][1][0] == 0.0
    _, note = real_run.evaluators(committee.FIRST_JUDGES, prompts + ["Hello!"], refs)
    assert note == f"held-out judge skipped: 1 of 3 prompts have no reference in {refs}"


def test_real_run_report_end_to_end_on_hand_made_samples(tmp_path, monkeypatch, capsys):
    """real_run.report on a 1-iteration run directory whose held-out samples are hand-made (held_out_samples
    patched: no model is loaded): the JSON holds every evaluator's raw and LC rows and the cycle share, and each
    evaluator is printed."""
    import real_run
    out, _ = conftest.hand_made_real_run(tmp_path, prompts_with_cycle=1)
    answers = {"pi_0": ["Japan is a country in Asia with many cities and a long history.", "Plant seed.",
                        "The largest mammal is a very big animal that lives in the sea."],
               "pi_1": ["The capital of Japan is Tokyo.", "Dig a small hole, put the seed in, cover it, water it.",
                        "The blue whale."]}
    monkeypatch.setattr(real_run, "held_out_samples", lambda model, label, ps, gen, folder: [
        {"responses": [y], "finished": [True], "token_ids": [list(range(len(y.split())))]} for y in answers[label]])
    assert real_run.main(["--out", str(out), "--prompts", str(tmp_path / "p.jsonl"), "--figures",
                          str(tmp_path / "figs"), "--references", str(ROOT / "data/reference_heldout.jsonl")]) == 0
    s = json.loads((tmp_path / "figs" / "real_run.json").read_text())
    assert s["cycle_share"] == [0.25] and s["held_out_judge_note"] is None and s["baselines"] is None   # default off
    assert list(s["evaluators"]) == ["committee (concise,informs,plain)", "concise alone", "informs alone",
                                     "plain alone", "held-out judge (references)",
                                     "held-out judge, recall only (lambda 0)"]
    assert s["evaluators"]["held-out judge (references)"][1]["raw"][0] == 100.0        # pi_1 right every time
    printed = capsys.readouterr().out
    assert "win rate against pi_0 under held-out judge (references)" in printed and "share: 0.25" in printed
