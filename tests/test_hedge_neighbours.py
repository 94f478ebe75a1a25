"""Tests for Hedge's neighbours in last_iterate.py (play, regularized_gap, regularized_equilibrium, the seeded table),
against references that do not use the code under test: scipy's LP for the Nash equilibrium, scipy's root finder for
the regularised equilibrium, literal probability-space updates, hand computations, and the table's means and
intervals recomputed from its record files with a printed t quantile.

Run:  .venv/bin/python -m pytest tests/test_hedge_neighbours.py -q
"""
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import fsolve

import conftest
import hedge_toy as H
import last_iterate as L
from test_hedge_toy import lp_equilibrium, lp_equilibrium_is_unique  # the LP reference, in one place

ROOT = Path(__file__).resolve().parents[1]

W, W1 = H.weighted_rps(), np.array([0.6, 0.3, 0.1])  # interior equilibrium (2/7, 1/7, 4/7), a start away from it
LAST_ITERATE_ETA, LAST_ITERATE_T = 0.5, 10_000  # the step and horizon of the last-iterate acceptance test


def fsolve_regularized(P, tau, mu):
    """Independent reference: the root x of x = log mu + P softmax(x) / tau (unique: x is pinned, no gauge freedom)."""
    softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    x = fsolve(lambda x: x - np.log(mu) - P @ softmax(x) / tau, np.log(mu), xtol=1e-13)
    return softmax(x)


# --------------------------------------------------------------------------- the updates, literally, in probability space

def naive_trajectory(P, method, eta, T, pi1, tau=0.1, mu=None):
    """Each method's update as its paper writes it, with plain weights (fine while eta * T is small)."""
    n = len(P)
    mu = np.full(n, 1 / n) if mu is None else mu
    pi, prev, Q, total, out = np.array(pi1, float), np.array(pi1, float), np.zeros(n), np.zeros(n), []
    normal = lambda w: w / w.sum()
    for _ in range(T):
        out.append(pi)
        if method == "hedge":
            new = normal(pi * np.exp(eta * P @ pi))
        elif method == "optimistic_hedge":
            new = normal(pi * np.exp(eta * (2 * P @ pi - P @ prev)))
        elif method == "extragradient":
            half = normal(pi * np.exp(eta * P @ pi))
            new = normal(pi * np.exp(eta * P @ half))
        elif method == "nash_md":
            mix = normal(pi ** (1 - eta * tau) * mu ** (eta * tau))
            new = normal(mix * np.exp(eta * P @ mix))
        elif method == "mmd":
            new = normal((pi * mu ** (eta * tau) * np.exp(eta * P @ pi)) ** (1 / (1 + eta * tau)))
        elif method == "inpo":                                 # Zhang et al. 2024, Eq. (5)
            new = normal(pi ** (1 - eta * tau) * mu ** (eta * tau) * np.exp(eta * P @ pi))
        elif method == "mirror_prox":                          # two MMD steps from pi: at P pi, then at P half
            half = normal((pi * mu ** (eta * tau) * np.exp(eta * P @ pi)) ** (1 / (1 + eta * tau)))
            new = normal((pi * mu ** (eta * tau) * np.exp(eta * P @ half)) ** (1 / (1 + eta * tau)))
        elif method == "regret_matching_plus":
            Q = np.maximum(Q + P @ pi - pi @ P @ pi, 0)
            new = normal(Q) if Q.sum() > 0 else np.full(n, 1 / n)
        else:  # fictitious_play
            total = total + pi
            u = P @ (total / len(out))
            new = normal((u == u.max()).astype(float))
        prev, pi = pi, new
    return np.array(out)


@pytest.mark.parametrize("method", list(L.METHODS))
def test_every_method_matches_its_literal_update(method):
    P, pi1 = H.random_game(5, 3), np.random.default_rng(0).dirichlet(np.ones(5))
    mu = np.random.default_rng(1).dirichlet(np.ones(5)) + 0.01
    opts = dict(tau=0.3, mu=mu / mu.sum()) if method in L.REGULARISED else {}
    ref = naive_trajectory(P, method, 0.4, 60, pi1, **opts)
    got = L.trajectory(P, method, 0.4, 60, pi1, **opts)
    assert np.allclose(got, ref, atol=1e-12), np.abs(got - ref).max()
    pi_bar, pi_last = L.play(P, method, 0.4, 60, pi1, **opts)
    assert np.allclose(pi_bar, ref.mean(0), atol=1e-12) and np.allclose(pi_last, ref[-1], atol=1e-12)


@pytest.mark.parametrize("method", L.REGULARISED)
def test_moving_magnet_is_a_loop_that_resets_mu(method):
    """magnet_every = M (MPO's schedule): the magnet of step t is the iterate of step M floor(t/M): equal to running
    the method with a fixed mu for M steps at a time, each block's mu its first iterate."""
    P, pi1 = H.random_game(4, 5), np.random.default_rng(2).dirichlet(np.ones(4))
    got = L.trajectory(P, method, 0.4, 12, pi1, tau=0.3, magnet_every=5)
    blocks, start = [], pi1
    for _ in range(3):                                          # steps 0-4, 5-9, 10-11 (12 iterates, 11 steps)
        block = naive_trajectory(P, method, 0.4, 6, start, tau=0.3, mu=start)
        blocks.append(block[:5])
        start = block[5]
    assert np.allclose(got, np.concatenate(blocks)[:12], atol=1e-12)


def test_moving_the_magnet_makes_the_last_iterate_reach_the_unregularised_equilibrium():
    """Fixed mu: the last iterate of MMD stops at pi*_tau, 0.078 from the equilibrium of weighted RPS in gap at
    tau = 0.1; moved every 50 steps, it reaches the equilibrium itself (gap < 1e-8 after 2000 steps)."""
    fixed = H.duality_gap(W, L.play(W, "mmd", 0.5, 2000, tau=0.1)[1])
    moved = H.duality_gap(W, L.play(W, "mmd", 0.5, 2000, tau=0.1, magnet_every=50)[1])
    assert fixed > 0.05 and moved < 1e-8


def test_omwu_first_steps_by_hand():
    # RPS from pi_1 = (1/2, 1/2, 0): P pi_1 = (1/4, 3/4, 1/2). Step 1 is Hedge's (pi_0 = pi_1); with eta = 2 log 3,
    # pi_2 ∝ (e^{eta/4}, 3 e^{eta/4}, 0) = (1/4, 3/4, 0). Step 2: P pi_2 = (1/8, 5/8, 3/4), 2 P pi_2 - P pi_1 =
    # (0, 1/2, 1), so pi_3 ∝ (1/4, 3/4 * 3, 0) = (1/10, 9/10, 0).
    traj = L.trajectory(H.rock_paper_scissors(), "optimistic_hedge", 2 * math.log(3), 3, [0.5, 0.5, 0.0])
    assert np.allclose(traj, [[0.5, 0.5, 0], [0.25, 0.75, 0], [0.1, 0.9, 0]], atol=1e-15)


def test_hedge_via_play_is_todays_hedge_exactly():
    for P, eta, T, pi1 in [(W, 0.3, 200, W1), (H.random_game(7, 2), 1000.0, 300, None)]:
        assert all(np.array_equal(a, b) for a, b in zip(L.play(P, "hedge", eta, T, pi1), H.hedge(P, eta, T, pi1)))
    assert np.array_equal(L.trajectory(W, "hedge", 0.1, 50, W1), H.hedge_trajectory(W, 0.1, 50, W1))


def test_play_batches_games_and_steps():
    games = np.stack([H.random_game(4, s) for s in range(6)]).reshape(2, 3, 4, 4)  # batch (2, 3)
    eta = np.array([[0.1, 0.5, 1.0], [0.2, 0.3, 0.4]])
    pi_bar, pi_last = L.play(games, "mmd", eta, 40, tau=0.2)
    assert pi_bar.shape == pi_last.shape == (2, 3, 4)
    for i, j in np.ndindex(2, 3):
        ref_bar, ref_last = L.play(games[i, j], "mmd", eta[i, j], 40, tau=0.2)
        assert np.allclose(pi_bar[i, j], ref_bar, atol=1e-14) and np.allclose(pi_last[i, j], ref_last, atol=1e-14)


# --------------------------------------------------------------------------------- acceptance: unregularised game

def test_omwu_and_extragradient_last_iterates_reach_the_lp_equilibrium_hedge_does_not():
    assert lp_equilibrium_is_unique(W)
    pi_lp, _ = lp_equilibrium(W)
    for method in ("optimistic_hedge", "extragradient"):
        _, last = L.play(W, method, LAST_ITERATE_ETA, LAST_ITERATE_T, W1)  # measured: gap ~2e-10, L1 ~5e-10
        assert H.duality_gap(W, last) <= 1e-6 and np.abs(last - pi_lp).sum() <= 1e-6, method
    _, last = L.play(W, "hedge", LAST_ITERATE_ETA, LAST_ITERATE_T, W1)  # measured: gap 0.25
    assert H.duality_gap(W, last) >= 1e-2


@pytest.mark.parametrize("game, T, tol", [("weighted_rps", 10_000, 0.02), ("chaotic_10", 10_000, 0.05)])
def test_regret_matching_plus_and_fictitious_play_averages_reach_the_lp_equilibrium(game, T, tol):
    P = H.GAMES[game](0)
    pi_lp, _ = lp_equilibrium(P)
    for method in ("regret_matching_plus", "fictitious_play"):
        pi_bar, _ = L.play(P, method, 1.0, T)  # measured L1: 0.010 / 0.010 (weighted_rps), 0.028 / 0.013 (chaotic_10)
        assert np.abs(pi_bar - pi_lp).sum() <= tol, method


@pytest.mark.parametrize("method", list(L.METHODS))
def test_pure_strategy_dominant_game(method):
    """ordered_game: the top action beats every other, so the equilibrium is pure (and pi*_tau leans on it)."""
    P = H.ordered_game(5, 1)
    top = np.eye(5)[np.argmax(P.sum(1))]
    pi_lp, _ = lp_equilibrium(P)
    assert np.allclose(pi_lp, top, atol=1e-9)
    if method in L.REGULARISED:
        pi_bar, pi_last = L.play(P, method, 0.5, 2000, tau=0.1)
        ref = fsolve_regularized(P, 0.1, np.full(5, 0.2))
        assert np.abs(pi_last - ref).sum() <= (1e-9 if method == "mmd" else 0.02) and np.argmax(pi_last) == top.argmax()
    else:
        pi_bar, pi_last = L.play(P, method, 0.5, 2000)
        assert np.abs(pi_last - top).sum() <= 1e-9 and np.abs(pi_bar - top).sum() <= 0.02


# ----------------------------------------------------------------------------------- acceptance: regularised game

@pytest.mark.parametrize("tau", [0.5, 0.1, 0.02])
def test_regularized_equilibrium_is_the_fixed_point_and_matches_scipy(tau):
    for P, mu in [(W, None), (H.random_game(6, 4), np.random.default_rng(2).dirichlet(np.ones(6)))]:
        n = len(P)
        pi = L.regularized_equilibrium(P, tau, mu)
        mu = np.full(n, 1 / n) if mu is None else mu
        gibbs = mu * np.exp(P @ pi / tau)
        assert np.abs(pi - gibbs / gibbs.sum()).sum() <= 1e-10  # pi ∝ mu exp(P pi / tau)
        assert np.abs(pi - fsolve_regularized(P, tau, mu)).sum() <= 1e-9
        assert abs(L.regularized_gap(P, pi, tau, mu)) <= 1e-14


def test_regularized_gap_matches_its_definition():
    """2 max_pi' P_tau(pi' > pi) - 1, by the Gibbs formula and by brute force over a grid of the 3-simplex."""
    tau, mu, pi = 0.3, np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.7, 0.1])
    kl = lambda p, q: np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0), -1)
    by_formula = 2 * (tau * np.log(mu @ np.exp(W @ pi / tau)) + tau * kl(pi, mu)) - 1
    grid = np.array([(i, j, 400 - i - j) for i in range(401) for j in range(401 - i)]) / 400  # (80601, 3)
    brute = 2 * np.max(grid @ W @ pi - tau * kl(grid, mu) + tau * kl(pi, mu)) - 1
    got = L.regularized_gap(W, pi, tau, mu)
    assert got == pytest.approx(by_formula, abs=1e-14) and brute <= got <= brute + 1e-4
    assert L.regularized_gap(W, pi, 1e-4) == pytest.approx(H.duality_gap(W, pi), abs=1e-3)  # tau -> 0


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_mmd_last_iterate_reaches_the_regularized_equilibrium(tau):
    ref = fsolve_regularized(W, tau, np.full(3, 1 / 3))
    _, last = L.play(W, "mmd", 0.5, 2000, W1, tau=tau)  # constant step
    assert L.regularized_gap(W, last, tau) <= 1e-6 and np.abs(last - ref).sum() <= 1e-9


def payoff_lipschitz(P):
    """L of pi -> P pi from l1 to l_inf on the simplex, by brute force: max |P d|_inf over d = (e_j - e_k) / 2, the
    extreme points of {d : sum(d) = 0, |d|_1 <= 1} (a convex function's max over a polytope sits at a vertex)."""
    n = len(P)
    return max(np.abs(P @ (np.eye(n)[j] - np.eye(n)[k]) / 2).max() for j in range(n) for k in range(n))


def test_mmd_default_step_is_outside_its_theorem_bound_and_what_it_does_there():
    """_mmd's docstring and docs/last_iterate.md: Sokota et al.'s eta <= tau / L^2 with L = max_i (max_j P_ij -
    min_j P_ij)/2 (1/2 on rps, 0.375 on weighted_rps); the CLI's eta = 0.5 is outside it for tau = 0.1, 0.03, 0.01.
    Measured at eta = 0.5, T = 10^4, tau = 0.01: weighted_rps and random_10 converge anyway; rps does not, its uniform
    pi*_tau repelling (Jacobian modulus sqrt(1 + eta^2/12) / (1 + eta tau) > 1, by hand and by finite differences);
    at eta = 0.2 < 2 tau / (1/12 - tau^2) it converges."""
    cfg = L.Config()
    assert (cfg.eta, cfg.tau, cfg.taus) == (0.5, 0.1, [0.3, 0.1, 0.03, 0.01])           # the defaults stated
    for game, want in [("rps", 0.5), ("weighted_rps", 0.375), ("random_10", None)]:
        P = H.GAMES[game]()
        assert payoff_lipschitz(P) == pytest.approx(((P.max(1) - P.min(1)) / 2).max(), abs=1e-15)
        assert want is None or payoff_lipschitz(P) == pytest.approx(want)
    bound = {tau: tau / 0.5 ** 2 for tau in cfg.taus}                                   # L = 1/2: eta <= 4 tau
    assert [tau for tau in cfg.taus if cfg.eta > bound[tau]] == [0.1, 0.03, 0.01]
    eta, tau = cfg.eta, 0.01
    for game, pi1 in [("weighted_rps", W1), ("random_10", None)]:
        P = H.GAMES[game]()
        _, last = L.play(P, "mmd", eta, 10_000, pi1, tau=tau)
        assert np.abs(last - L.regularized_equilibrium(P, tau)).sum() < 1e-9
    P, star = H.rock_paper_scissors(), np.full(3, 1 / 3)
    assert np.abs(L.regularized_equilibrium(P, tau) - star).sum() < 1e-10
    step = lambda pi: np.exp(L._mmd(P, np.log(pi), pi, eta, tau, np.log(star), None)[0])  # noqa: E731
    d = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]).T * 1e-6                          # zero-sum directions
    J = np.linalg.lstsq(d, np.stack([step(star + v) - step(star - v) for v in d.T], 1) / 2, rcond=None)[0]  # (2, 2)
    rho = math.sqrt(1 + eta ** 2 / 12) / (1 + eta * tau)
    assert np.abs(np.linalg.eigvals(J)).max() == pytest.approx(rho, rel=1e-6) and rho > 1
    _, last = L.play(P, "mmd", eta, 10_000, [0.6, 0.3, 0.1], tau=tau)
    assert np.abs(last - star).sum() > 0.5 and H.duality_gap(P, last) > 0.5             # it cycles
    _, last = L.play(P, "mmd", 0.2, 10_000 * 10, [0.6, 0.3, 0.1], tau=tau)
    assert np.abs(last - star).sum() < 1e-12


def test_nash_md_constant_step_bias_shrinks_with_eta():
    """Munos et al. 2023, Thm 1: KL(pi*_tau || pi_t) -> at most 2 eta / tau at a constant step; measured L1 distances on
    weighted_rps with tau = 0.5 are 1.24e-2 (eta = 0.5), 2.41e-3 (0.1), 1.20e-3 (0.05): an O(eta) bias."""
    tau = 0.5
    ref = fsolve_regularized(W, tau, np.full(3, 1 / 3))
    dist = {}
    for eta in (0.5, 0.1, 0.05):
        _, last = L.play(W, "nash_md", eta, int(40 / (eta * tau)), W1, tau=tau)  # (1 - eta tau)^T ~ e^-40: converged
        dist[eta] = np.abs(last - ref).sum()
        assert np.sum(ref * np.log(ref / last)) <= 2 * eta / tau  # the bound of Thm 1, at t -> infinity
    assert 5e-3 <= dist[0.5] <= 3e-2 and 1e-3 <= dist[0.1] <= 5e-3
    assert 4 <= dist[0.5] / dist[0.1] <= 6 and 1.8 <= dist[0.1] / dist[0.05] <= 2.2  # linear in eta
    _, mmd_last = L.play(W, "mmd", 0.5, 400, W1, tau=tau)  # MMD at the same constant step has no bias
    assert np.abs(mmd_last - ref).sum() <= 1e-9


def test_nash_md_with_eta_log_t_over_tau_t_reaches_the_limit():
    """Munos et al. 2023, Thm 1 with eta = log T / (tau T): KL = O(log T / (tau^2 T)). Measured L1: 1.05e-2 (T = 1e2),
    9.3e-4 (1e3), 8.9e-5 (1e4): the bias goes to 0 as T grows."""
    tau = 0.5
    ref = fsolve_regularized(W, tau, np.full(3, 1 / 3))
    dist = [np.abs(L.play(W, "nash_md", math.log(T) / (tau * T), T, W1, tau=tau)[1] - ref).sum()
            for T in (100, 1000, 10_000)]
    assert dist[0] > 5 * dist[1] > 25 * dist[2] and dist[2] <= 2e-4, dist


# ------------------------------------------------------------------------------------ over seeds: the tuned table

def gaps_by_hand(P, pi, tau=None):
    """2 max_i (P pi)_i - 1; with tau, the regularised gap by its Gibbs formula (mu uniform),
    2 tau [log sum_y mu(y) e^((P pi)_y / tau) + KL(pi || mu)] - 1."""
    if tau is None:
        return 2 * (P @ pi).max() - 1
    mu = np.full(len(P), 1 / len(P))
    return 2 * tau * (np.log(mu @ np.exp(P @ pi / tau)) + np.sum(pi * np.log(pi / mu))) - 1


@pytest.mark.parametrize("game, seed", [("weighted_rps", 4), ("random_10", 7)])
def test_selfplay_world_records_are_the_gaps_of_the_literal_updates(game, seed):
    """selfplay_world at a tiny T against naive_trajectory (each update as its paper writes it) from the same start
    and game, the gaps by hand; the checkpoints are 30^(k/7) rounded, k = 0..7."""
    T, tau = 30, 0.1
    P = H.GAMES[game](seed)                                                 # random_10: drawn from the seed
    pi1 = np.random.default_rng([1, seed]).dirichlet(np.ones(len(P)))     # the start: drawn from the seed
    for method in L.METHODS:
        rows = L.selfplay_world(method, 0.4, seed, game=game, T=T, tau=tau, checkpoints=8)
        ref = naive_trajectory(P, method, 0.4, T, pi1, tau=tau)             # (T, n): row i-1 is pi_i
        assert [r["t"] for r in rows] == list(range(8))
        assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 7, 11, 18, 30]
        for r in rows:
            i = r["iteration"]
            assert r["gap_last"] == pytest.approx(gaps_by_hand(P, ref[i - 1]), abs=1e-12), (method, i)
            assert r["gap_avg"] == pytest.approx(gaps_by_hand(P, ref[:i].mean(0)), abs=1e-12), (method, i)
            if method in L.REGULARISED:
                assert r["reg_gap_last"] == pytest.approx(gaps_by_hand(P, ref[i - 1], tau), abs=1e-12), (method, i)
            else:
                assert "reg_gap_last" not in r


QUICK_TABLE = ["--table", "--t", "60", "--seeds", "3", "--tuning-seeds", "2", "--grid", "0.25", "1", "--jobs", "1"]


@pytest.fixture(scope="module")
def quick_table(tmp_path_factory):
    """`python last_iterate.py --table` at T = 60, 2 tuning seeds, 3 report seeds, grid 0.25 1: (folder, stdout)."""
    d = tmp_path_factory.mktemp("table")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert L.main([*QUICK_TABLE, "--out", str(d / "fig"), "--records", str(d / "runs")]) == 0
    return d, out.getvalue()


def test_table_is_recomputed_from_its_record_files(quick_table):
    """The acceptance test: each chosen step re-derived from the tuning files by the stated rule, and each reported
    mean and interval from the report files alone, with t_{0.975, 2} = 4.302653 from a printed table."""
    d, printed = quick_table
    summary = json.loads((d / "fig" / "last_iterate_table.json").read_text())
    assert (summary["T"], summary["tuning_seeds"], summary["report_seeds"]) == (60, [0, 1], [100, 101, 102])
    last = lambda f: json.loads(f.read_text().splitlines()[-1])
    for game in L.TABLE_GAMES:
        assert f"\n{game}:\n" in printed
        for method in L.METHODS:
            folder, chosen = d / "runs" / game / "selfplay_world" / method, summary["games"][game]["chosen"][method]
            grid = [0.25] if method in L.STEPLESS else [0.25, 1.0]
            tuned = {s: np.mean([last(folder / f"step{s:g}_seed{k}.jsonl")["gap_last"] for k in (0, 1)]) for s in grid}
            assert chosen == min(grid, key=lambda s: (tuned[s], s)), (game, method, tuned)
            files = [folder / f"step{chosen:g}_seed{k}.jsonl" for k in (100, 101, 102)]
            manifests = [json.loads(f.read_text().splitlines()[0])["manifest"] for f in files]
            assert [m["seed"] for m in manifests] == [100, 101, 102] and all(
                m["settings"] == {"game": game, "T": 60, "tau": 0.1} for m in manifests)
            assert all(last(f)["iteration"] == 60 for f in files)
            for metric in ("gap_last", "gap_avg", *(("reg_gap_last",) if method in L.REGULARISED else ())):
                v = np.array([last(f)[metric] for f in files])
                mean, half, n = summary["games"][game]["final"][method][metric]
                assert n == 3 and mean == pytest.approx(v.mean(), abs=1e-15), (game, method, metric)
                assert half == pytest.approx(4.302653 * v.std(ddof=1) / math.sqrt(3), rel=1e-5, abs=1e-15)
            assert ("reg_gap_last" in summary["games"][game]["final"][method]) == (method in L.REGULARISED)


def test_table_resumes_from_its_records(quick_table, tmp_path):
    """A second run with the same settings reads every record back (nothing reruns) and writes the same JSON."""
    d, _ = quick_table
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert L.main([*QUICK_TABLE, "--out", str(tmp_path), "--records", str(d / "runs")]) == 0
    assert "running" not in out.getvalue()
    assert (tmp_path / "last_iterate_table.json").read_text() == (d / "fig" / "last_iterate_table.json").read_text()


@pytest.mark.parametrize("settings, words", [
    (dict(seeds=5), ["--seeds 5", "left at its default without --table"]),
    (dict(grid=[0.5]), ["--grid [0.5]", "without --table"]),
    (dict(table=True, eta=0.1), ["--eta 0.1", "left at its default with --table"]),
    (dict(table=True, taus=[0.1]), ["--taus [0.1]", "with --table"]),
    (dict(table=True, seeds=1), ["--seeds 1", "an interval needs 2 seeds"]),
    (dict(table=True, grid=[0.5, 20.0]), ["--grid [0.5, 20.0]", "nash_md needs eta tau <= 1"]),
    (dict(table=True, grid=[]), ["--grid []", "one or more steps"]),
    (dict(table=True, tuning_seeds=0), ["--tuning-seeds 0", "in [1, 100]"]),
])
def test_table_settings_refused_before_any_work(tmp_path, settings, words):
    """A flag of the other mode would be ignored without a word: refused, like a bad value, before anything runs."""
    cfg = L.Config(out=str(tmp_path / "figs"), records=str(tmp_path / "runs"), **settings)
    if "records" not in settings and not cfg.table:
        cfg.records = L.Config.records                            # only its default is allowed without --table
    with pytest.raises(ValueError) as err:                        # cli.ConfigError
        (L.table if cfg.table else L.report)(cfg)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not (tmp_path / "figs").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kwargs, words", [
    (dict(method="omwu"), ["method", "'omwu'", "optimistic_hedge"]),
    (dict(eta=0.0), ["eta", "0.0"]),
    (dict(eta=-1), ["eta", "-1"]),
    (dict(eta=float("nan")), ["eta", "nan"]),
    (dict(eta="fast"), ["eta", "'fast'"]),
    (dict(method="mmd", tau=0), ["tau", "0"]),
    (dict(method="nash_md", tau=-0.5), ["tau", "-0.5"]),
    (dict(method="mmd", mu=[0.5, 0.5, 0.0]), ["mu", "> 0", "0."]),
    (dict(method="mmd", mu=[0.5, 0.5]), ["mu", "shape", "(2,)"]),
    (dict(method="nash_md", mu=[0.5, 0.2, 0.2]), ["mu", "sum to 1"]),
    (dict(method="hedge", tau=0.1), ["options", "tau", "'hedge'"]),
    (dict(method="mmd", magnet=[1, 0, 0]), ["options", "magnet"]),
    (dict(method="nash_md", eta=3.0, tau=0.5), ["eta * tau <= 1", "1.5"]),
    (dict(T=0), ["T", "0"]),
    (dict(T=2.9), ["T must be an integer", "2.9"]),
    (dict(T=True), ["T must be an integer", "True"]),
    (dict(eta=float("inf")), ["eta", "inf"]),
    (dict(eta=[0.1, -0.1]), ["eta", "-0.1"]),
    (dict(method="mmd", pi1=[1.0, 0.0, 0.0]), ["pi1", "> 0"]),
])
def test_play_rejects_bad_arguments_naming_them(kwargs, words):
    args = dict(P=W, method="hedge", eta=0.1, T=10) | kwargs
    with pytest.raises(ValueError) as err:
        L.play(**args)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_trajectory_checks_T_like_play():
    with pytest.raises(ValueError, match=r"T must be an integer.*T = 2.9"):
        L.trajectory(W, "hedge", 0.1, 2.9)


def test_regularized_functions_validate_tau_and_mu():
    with pytest.raises(ValueError, match=r"tau must be finite and > 0; got tau = 0"):
        L.regularized_equilibrium(W, 0)
    with pytest.raises(ValueError, match="mu must be > 0"):
        L.regularized_gap(W, W1, 0.1, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="diagonal"):
        L.regularized_equilibrium(np.full((3, 3), 0.3), 0.1)


@pytest.mark.slow
def test_cli_table_and_figures(tmp_path, capsys):  # ~5 s, most of it matplotlib
    figs = tmp_path / "new" / "figs"                 # a missing --out is made before the sweep, not failed after it
    L.report(L.Config(out=str(figs), t=200))
    out = capsys.readouterr().out
    assert "last-iterate gap" in out and "regularised gap" in out
    assert sum(line.split()[0] in L.METHODS for line in out.splitlines() if line.strip()) == 3 * len(L.METHODS)
    for name in ("dynamics_last_iterate.png", "dynamics_simplex.png"):
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("field, value, words", [
    ("eta", float("nan"), ["--eta nan", "finite and > 0"]),
    ("t", 0, ["--t 0", "integer >= 1"]),
    ("t", 10**8, ["--t 100000000", "<= 10^6"]),
    ("tau", -0.1, ["--tau -0.1"]),
    ("taus", [0.1, 0.0], ["--taus [0.1, 0.0]"]),
    ("taus", [], ["--taus []"]),
    ("seed", -1, ["--seed -1", ">= 0"]),
    ("eta", 5.0, ["--eta 5.0", "nash_md needs eta * tau <= 1", "--taus"]),  # the tau -> 0 panel's largest tau: 0.3
])
def test_config_refused_before_any_work(tmp_path, field, value, words):
    out = tmp_path / "figs"
    with pytest.raises(ValueError) as err:                              # cli.ConfigError
        L.report(L.Config(**{"out": str(out), field: value}))
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not out.exists()


def run_cli(tmp_path, *args):
    return conftest.run([sys.executable, str(ROOT / "last_iterate.py"), *args], timeout=120, cwd=tmp_path)


def test_cli_bad_value_exits_2_at_once_with_one_line(tmp_path):
    proc = run_cli(tmp_path, "--tau", "0", "--out", str(tmp_path / "f"))
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "f").exists()
    assert proc.stderr.splitlines() == ["last_iterate.py: error: --tau 0.0: must be finite and > 0"]


def test_cli_refuses_a_horizon_it_cannot_hold_at_once(tmp_path):
    """--t 10^8 would keep ~140 GB of iterates after hours of steps: refused at once, one line, nothing written."""
    proc = run_cli(tmp_path, "--t", "100000000", "--out", str(tmp_path / "f"))
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "f").exists()
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("last_iterate.py: error: --t 100000000: must be <= 10^6")


def test_cli_out_that_cannot_be_made_is_refused_before_the_sweep(tmp_path):
    """--out is checked before any work (it used to fail after the whole sweep): under a file it cannot be made."""
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(tmp_path, "--out", str(tmp_path / "a_file" / "f"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"last_iterate.py: error: --out {tmp_path / 'a_file' / 'f'}: "
                                        f"{tmp_path / 'a_file'} is a file, not a folder"]
