"""SPPO's successors (losses.py): each loss's exact tabular minimiser is last_iterate.py's update, the columns D_t
carries are the win rates they stand for, and each runs through sppo.py's loop.

The tabular limit: a softmax table pi over n responses, every response a row weighted by pi_t(y) (rows) or every
ordered pair (y, y') weighted by pi_t(y) pi_t(y') (pairs), exact win rates, and, for the row methods, the exact log Z
of their step in place of the centre (as Eq. 4.7's minimiser is Hedge's step with log Z exact: test_sppo.py). L-BFGS
minimises the loss; the minimiser must equal the method's step in last_iterate.METHODS to 1e-6.
"""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hedge_toy as H
import last_iterate as L
import losses
import runs
import sppo
import sppo_toy

ROOT = Path(__file__).resolve().parents[1]
ETA, TAU = 0.7, 0.4
P = H.random_game(5, 7)
PI = np.array([0.35, 0.1, 0.25, 0.2, 0.1])                      # pi_t
PREV = np.array([0.2, 0.2, 0.3, 0.15, 0.15])                    # pi_{t-1}
MU = np.array([0.1, 0.3, 0.2, 0.25, 0.15])                      # the reference / magnet
CFG = sppo.SPPOConfig(eta=ETA, tau=TAU)


def normal(w):
    return w / w.sum()


def exact_columns():
    """The win rates each method's update uses, written from the updates themselves (not from losses.py)."""
    mix = normal(PI ** (1 - ETA * TAU) * MU ** (ETA * TAU))                                  # Nash-MD's pi_t^mu
    half_mmd = normal((PI * MU ** (ETA * TAU) * np.exp(ETA * P @ PI)) ** (1 / (1 + ETA * TAU)))
    half_hedge = normal(PI * np.exp(ETA * P @ PI))
    return {"win_prob": P @ PI, "prev_win_prob": P @ PREV, "mix_win_prob": P @ mix, "mu_logp": np.log(MU),
            "ref_logp": np.log(PI)}, {"mirror_prox": P @ half_mmd, "extragradient": P @ half_hedge}


def last_iterate_step(method):
    """pi_{t+1} from last_iterate.METHODS (optimistic: its memory is P pi_{t-1})."""
    name = {"optimistic": "optimistic_hedge", "dno": "hedge"}.get(method, method)
    mem = P @ PREV if method == "optimistic" else None
    log_pi, _ = L.METHODS[name](P, np.log(PI), PI, ETA, np.array([TAU]), np.log(MU), mem)
    return np.exp(log_pi)


def minimise(loss_of_logpi):
    theta = torch.zeros(len(PI), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=1000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_of_logpi(torch.log_softmax(theta, 0))
        value.backward()
        return value
    opt.step(closure)
    return torch.softmax(theta, 0).detach().numpy()


ROW = ("optimistic", "extragradient", "mirror_prox", "nash_md", "mmd")


@pytest.mark.parametrize("method", ROW)
def test_row_method_minimiser_is_its_last_iterate_update(method):
    cols, half = exact_columns()
    batch = {k: torch.tensor(v) for k, v in cols.items()}
    if method in half:
        batch["half_win_prob"] = torch.tensor(half[method])
    cfg = sppo.SPPOConfig(eta=ETA, tau=TAU, loss=method)
    step = {"optimistic": losses.optimistic_step, "extragradient": losses.extragradient_step,
            "mirror_prox": losses.mirror_prox_step, "nash_md": losses.nash_md_step, "mmd": losses.mmd_step}[method]
    s, _ = step(batch, cfg)
    batch["log_z"] = torch.logsumexp(torch.log(torch.tensor(PI)) + s, 0).expand(len(PI))      # exact log Z
    w = torch.tensor(PI)
    got = minimise(lambda logpi: (w * losses.LOSSES[method].fn(logpi, batch, cfg)).sum())
    np.testing.assert_allclose(got, last_iterate_step(method), atol=1e-6)
    assert 0.5 * np.abs(got - PI).sum() > 1e-2                                                  # it moved


@pytest.mark.parametrize("method", ("inpo", "dno"))
def test_pair_method_minimiser_is_its_last_iterate_update(method):
    """Every ordered pair (y, y'), y != y', weighted pi_t(y) pi_t(y'): INPO's rows are labelled by the oracle, so
    (y, y') is a (winner, loser) pair with probability P(y > y'); DNO's soft labels need no winner (both orders)."""
    cols, _ = exact_columns()
    n = len(PI)
    w_idx, l_idx = map(np.array, zip(*[(i, j) for i in range(n) for j in range(n) if i != j]))
    idx = torch.tensor(np.stack([w_idx, l_idx], 1).ravel())
    weight = PI[w_idx] * PI[l_idx] * (P[w_idx, l_idx] if method == "inpo" else 1.0)
    batch = {k: torch.tensor(v)[idx] for k, v in cols.items()}
    cfg = sppo.SPPOConfig(eta=ETA, tau=TAU, loss=method)
    got = minimise(lambda logpi: (torch.tensor(weight) * losses.LOSSES[method].fn(logpi[idx], batch, cfg)).sum())
    np.testing.assert_allclose(got, last_iterate_step(method), atol=1e-6)
    assert 0.5 * np.abs(got - PI).sum() > 1e-2


def test_sppo_and_dno_share_hedges_step_and_their_targets_agree():
    """DNO's minimiser is Hedge's step: on exact rows its target margin is the difference of SPPO's targets."""
    r = torch.tensor([0.7, 0.2, 0.55, 0.4], dtype=torch.float64)
    b = {"win_prob": r, "ref_logp": torch.zeros(4)}
    got, want = losses.LOSSES["dno"].target(torch.zeros(4, dtype=torch.float64), b, CFG)
    sppo_target = ETA * (r - 0.5)
    assert torch.allclose(want, sppo_target[0::2] - sppo_target[1::2])


# ------------------------------------------------------------------------------------ the columns of D_t
def test_reweighted_win_rates_by_hand():
    """K = 3: weights softmax(log w) = (1/2, 1/4, 1/4) give P-hat(y_i > q) = sum_k w_k P[i, k]; uniform weights give
    Eq. (4.5)'s row mean (self-term included)."""
    Pk = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.6], [0.8, 0.4, 0.5]])
    got = losses.reweighted_win_rates(Pk, np.log([2.0, 1.0, 1.0]))
    np.testing.assert_allclose(got, [0.5 * 0.5 + 0.25 * 0.9 + 0.25 * 0.2, 0.05 + 0.125 + 0.15, 0.4 + 0.1 + 0.125])
    np.testing.assert_allclose(losses.reweighted_win_rates(Pk, np.zeros(3)), sppo.win_rates(Pk))


@pytest.mark.parametrize("method", ("optimistic", "nash_md", "mirror_prox", "extragradient"))
def test_estimated_columns_converge_to_the_exact_win_rates(method):
    """successor_columns on K samples drawn from pi_t, weighted by q/pi_t: with K = 6000 the estimate of
    P(y > q) for every response is within 0.02 of the exact value (self-normalised importance sampling, error
    O(1/sqrt K): 0.003-0.008 over four seeds; the K x K matrix is 290 MB)."""
    rng = np.random.default_rng(3)
    y = rng.choice(len(PI), size=6000, p=PI)
    logps = {"ref": np.log(PI)[y], "mu": np.log(MU)[y], "previous": np.log(PREV)[y]}
    cfg = sppo.SPPOConfig(eta=ETA, tau=TAU, loss=method)
    got = losses.successor_columns(method, P[y[:, None], y[None, :]], logps, cfg)
    cols, half = exact_columns()
    want = {"optimistic": cols["prev_win_prob"], "nash_md": cols["mix_win_prob"]}.get(method, half.get(method))
    (name, est), = got.items()
    per_response = np.array([est[y == k].mean() for k in range(len(PI))])
    np.testing.assert_allclose(per_response, want, atol=0.02)


@pytest.mark.parametrize("method", ("optimistic", "nash_md", "mirror_prox", "extragradient"))
def test_estimated_columns_are_exact_on_a_sample_with_pi_t_s_frequencies(method):
    """20 samples whose counts are exactly 20 pi_t (7, 2, 5, 4, 2): self-normalised importance weighting is then
    exact, so each sample's column equals the win rate against q written from the update (to 1e-12); uniform weights
    (a half step or a mixture dropped) would miss by 4e-3 or more."""
    y = np.repeat(np.arange(len(PI)), (20 * PI).round().astype(int))
    logps = {"ref": np.log(PI)[y], "mu": np.log(MU)[y], "previous": np.log(PREV)[y]}
    cfg = sppo.SPPOConfig(eta=ETA, tau=TAU, loss=method)
    (name, est), = losses.successor_columns(method, P[y[:, None], y[None, :]], logps, cfg).items()
    cols, half = exact_columns()
    want = {"optimistic": cols["prev_win_prob"], "nash_md": cols["mix_win_prob"]}.get(method, half.get(method))
    np.testing.assert_allclose(est, want[y], atol=1e-12)
    assert np.abs(P[y][:, y].mean(1) - want[y]).max() > 4e-3


def test_tabular_selfplay_at_many_samples_tracks_the_exact_update():
    """Algorithm 1 on a softmax table (sppo_toy.tabular_selfplay) with the successors' columns, 400 groups of K = 20:
    Nash-MD's and MMD's first iteration (mu = pi_1 = pi_t, so no pull yet) and second (mu = pi_1 != pi_2), at eta = 3
    and tau = 0.2, land within a quarter of the distance they moved (TV; measured: 0.003-0.008 of 0.04-0.10) from the
    exact update from the same pi_t (the finite-K shrink of the step, (K-1)/K, and the centre eta/2 in place of log Z
    account for the rest)."""
    for method in ("nash_md", "mmd"):
        pis = sppo_toy.tabular_selfplay(P, method, 3.0, 3, K=20, groups=400, pi1=PI, seed=0, tau=0.2)
        for t in (0, 1):
            exact = np.exp(L.METHODS[method](P, np.log(pis[t]), pis[t], 3.0, np.array([0.2]), np.log(PI), None)[0])
            moved = 0.5 * np.abs(pis[t + 1] - pis[t]).sum()
            assert 0.5 * np.abs(pis[t + 1] - exact).sum() < moved / 4, (method, t, pis[t + 1], exact, moved)


# ------------------------------------------------------------------------------------ settings
def test_settings_are_checked_before_any_work():
    with pytest.raises(sppo.ConfigError, match="--loss.*--selection all"):
        sppo.validate_config(sppo.SPPOConfig(loss="nash_md", selection="pair"))
    with pytest.raises(sppo.ConfigError, match="--loss.*--reference"):
        sppo.validate_config(sppo.SPPOConfig(loss="mmd", selection="all", reference="initial"))
    with pytest.raises(sppo.ConfigError, match="--eta.*1/tau"):
        sppo.validate_config(sppo.SPPOConfig(loss="nash_md", selection="all", eta=1000.0, tau=0.1))
    with pytest.raises(sppo.ConfigError, match="--tau"):
        sppo.validate_config(sppo.SPPOConfig(loss="mmd", selection="all", tau=-1.0))
    with pytest.raises(sppo.ConfigError, match="--eta.*--loss inpo"):
        sppo.validate_config(sppo.SPPOConfig(loss="inpo", eta=1000.0))
    with pytest.raises(sppo.ConfigError, match="--tau.*unless --loss reads it"):
        sppo.validate_config(sppo.SPPOConfig(loss="sppo", tau=0.3))
    with pytest.raises(sppo.ConfigError, match="--magnet-every.*unless --loss reads it"):
        sppo.validate_config(sppo.SPPOConfig(loss="optimistic", selection="all", magnet_every=2))
    with pytest.raises(sppo.ConfigError, match="--loss"):                      # sppo_toy checks sppo.py's RULES
        sppo_toy.tabular_selfplay(P, "optimistic", ETA, 2, selection="pair")
    sppo.validate_config(sppo.SPPOConfig(loss="inpo", eta=5.0, tau=0.1))                          # a pair method
    assert math.isclose(sppo.SPPOConfig().tau, 0.1)


# ------------------------------------------------------------------------------------ through sppo.py's loop
def tiny_run(out, method, iterations=3, **kw):
    """sppo.run on the demo's tiny LM and game oracle (sppo_toy), 3 iterations of a few prompts."""
    games = sppo_toy.demo_games()
    selection = "all" if losses.LOSSES[method].kind == "row" else "pair"
    cfg = sppo_toy.check_demo(sppo_toy.DemoConfig(
        out=str(out), figure=str(out / "gap.png"), iterations=iterations, groups=3, K=4, eta=2.0, loss=method,
        selection=selection, epochs=2, global_batch=64, micro_batch=64, progress=False,
        **({"tau": 0.2} if "tau" in losses.LOSSES[method].settings else {}), **kw))
    cfg = sppo_toy.demo_start(cfg, games)
    sppo.run(cfg, oracle=sppo_toy.GameOracle(games))
    return cfg


def logps_under(model_dir, rows, cfg):
    model, tok = runs.load_policy(model_dir, cfg, "cpu")
    return np.array(sppo.row_logps(model, tok, rows, cfg))


@pytest.mark.parametrize("method", ROW + ("inpo", "dno"))
def test_each_successor_runs_through_sppo_run_with_its_columns(tmp_path, method):
    """Every method through sppo.run on the tiny LM: D_t of iteration 2 carries log mu (the magnet: pi_0, or pi_2
    with --magnet-every 2) and the win rates against pi_1 / the mixture / the half step, recomputed here from the
    policies' own log-probs and the preference matrices with the importance weights written out by hand."""
    cfg = tiny_run(tmp_path, method, magnet_every=2 if method == "mmd" else 0)
    d = tmp_path / "iter2"
    rows = runs.read_jsonl(d / "dataset.jsonl")
    mats = [np.array(m["P"]) for m in runs.read_jsonl(d / "preferences.jsonl")]
    ref = np.array([r["ref_logp"] for r in rows])
    np.testing.assert_allclose(ref, logps_under(tmp_path / "iter1" / "model", rows, cfg), atol=1e-4)  # pi_2
    spec = losses.LOSSES[method]
    if "mu" in spec.models:
        magnet = tmp_path / "iter1" / "model" if method == "mmd" else cfg.model                 # pi_2 or pi_0
        mu = logps_under(magnet, rows, cfg)
        np.testing.assert_allclose([r["mu_logp"] for r in rows], mu, atol=1e-4)
    for i, P in enumerate(mats):
        k = [n for n, r in enumerate(rows) if r["prompt_id"] == i]
        if not k or spec.kind == "pair":
            continue
        wp = P.mean(1)
        log_w = {"prev_win_prob": lambda: logps_under(tmp_path / "iter0" / "model", [rows[n] for n in k], cfg)
                 - ref[k],                                                                        # pi_1 / pi_2
                 "mix_win_prob": lambda: 2.0 * 0.2 * (mu[k] - ref[k]),
                 "half_win_prob": lambda: (2.0 * wp + (2.0 * 0.2 * (mu[k] - ref[k]) if method == "mirror_prox"
                                                       else 0)) / (1 + (2.0 * 0.2 if method == "mirror_prox" else 0))}
        for col in set(spec.columns) & set(log_w):
            w = np.exp(log_w[col]())
            want = P @ (w / w.sum())
            np.testing.assert_allclose([rows[n][col] for n in k], want, atol=1e-4)
    assert (tmp_path / "iter2" / "model").is_dir()


def test_the_dataset_manifest_covers_the_successors_settings(tmp_path):
    """D_t's columns depend on tau (and the loss, and mu's weights): a run resumed with another tau is refused at
    the dataset stage, naming the setting, before any work."""
    tiny_run(tmp_path, "nash_md", iterations=1)
    games = sppo_toy.demo_games()
    cfg = sppo_toy.check_demo(sppo_toy.DemoConfig(
        out=str(tmp_path), figure=str(tmp_path / "gap.png"), iterations=1, groups=3, K=4, eta=2.0, loss="nash_md",
        selection="all", epochs=2, tau=0.3, global_batch=64, micro_batch=64, progress=False))
    cfg = sppo_toy.demo_start(cfg, games)
    with pytest.raises(sppo.ArtifactError, match=r"dataset.jsonl.*tau = 0.2.*tau = 0.3"):
        sppo.run(cfg, oracle=sppo_toy.GameOracle(games))


def test_train_7b_trains_every_successor_and_leaves_their_columns_to_sppo():
    """train_7b.py --stage rank/all builds D_t without log-probs; with a successor loss it refuses, with the way out."""
    r = subprocess.run([sys.executable, str(ROOT / "train_7b.py"), "--stage", "all", "--loss", "mmd", "--selection",
                        "all", "--model", str(ROOT), "--prompts", str(ROOT / "data" / "prompts_train.jsonl")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "sppo.py --loss mmd --stop-after dataset, then train_7b.py --data" in r.stderr
