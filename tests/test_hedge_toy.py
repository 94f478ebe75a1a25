"""Tests for hedge_toy.py: Hedge (Eq. 4.1) against hand computations, an LP, closed forms and brute-force enumeration.

Run:  .venv/bin/python -m pytest tests/test_hedge_toy.py -q
"""
import itertools
import math
import os
import sys

import numpy as np
import pytest
from scipy.optimize import linprog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import conftest  # noqa: E402
import hedge_toy as H  # noqa: E402

HORIZONS = [100, 1_000, 10_000, 100_000]


def lp_equilibrium(P):
    """Independent reference: max_pi min_j (pi^T P)_j by linprog; variables (pi, v), maximise v."""
    n = len(P)
    res = linprog(np.r_[np.zeros(n), -1.0], A_ub=np.c_[-P.T, np.ones(n)], b_ub=np.zeros(n),
                  A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0], bounds=[(0, None)] * n + [(None, None)])
    assert res.status == 0
    return res.x[:n], -res.fun


def lp_equilibrium_is_unique(P, tol=1e-8):
    """The optimal face {pi : P^T pi >= 1/2} is one point iff min and max of every coordinate over it agree."""
    n = len(P)
    for i in range(n):
        lo, hi = (linprog(s * np.eye(n)[i], A_ub=-P.T, b_ub=-0.5 * np.ones(n), A_eq=np.ones((1, n)), b_eq=[1.0],
                          bounds=[(0, None)] * n).fun * s for s in (1, -1))
        if hi - lo > tol:
            return False
    return True


@pytest.fixture(scope="module")
def suite():
    """Thm 4.1 runs for every game of the registry and T in {1e2, ..., 1e5}, one batched computation."""
    games = {name: make(0) for name, make in H.GAMES.items()}
    return games, {(r["game"], r["T"]): r for r in H.run_gap_suite(games, HORIZONS)}


# ------------------------------------------------------------------------------------------------ validation

GOOD = H.rock_paper_scissors()


def corrupt(i, j, value, mirror=None):
    P = GOOD.copy()
    P[i, j] = value
    if mirror is not None:
        P[j, i] = mirror
    return P


@pytest.mark.parametrize("P, words", [
    (np.full((2, 3), 0.5), ["(..., n, n)", "(2, 3)"]),
    (np.full(3, 0.5), ["(..., n, n)", "(3,)"]),
    (corrupt(0, 1, np.nan), ["non-finite", "P[0, 1]", "nan"]),
    (corrupt(2, 0, np.inf), ["non-finite", "P[2, 0]", "inf"]),
    (corrupt(0, 1, 1.5, -0.5), ["[0, 1]", "P[0, 1] = 1.5"]),
    (corrupt(1, 1, 0.3), ["diagonal", "P[1, 1] = 0.3"]),
    (corrupt(0, 1, 0.7, 0.4), ["P + P^T", "P[0, 1] + P[1, 0]", "1.1"]),
])
def test_validate_rejects_with_the_offending_entry(P, words):
    with pytest.raises(ValueError) as err:
        H.validate_preference(P)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_validate_accepts_batches_and_tensors():
    batch = np.stack([H.random_game(4, s) for s in range(3)])  # (3, 4, 4)
    out = H.validate_preference(batch.tolist())
    assert out.dtype == np.float64 and np.array_equal(out, batch)
    batch[2, 0, 1] = 0.9  # only the third matrix is broken
    with pytest.raises(ValueError, match=r"P\[2, 0, 1\] \+ P\[2, 1, 0\]"):
        H.validate_preference(batch)
    torch = pytest.importorskip("torch")
    s = torch.randn(5, 5)
    P = torch.sigmoid(s - s.T)  # float32: P + P^T = 1 only to ~1e-7, inside the tolerance
    assert np.allclose(H.validate_preference(P), P.double().numpy())


@pytest.mark.parametrize("P, words", [
    (GOOD.astype(str), ["real numbers", "P[0, 0]", "'0.5'", "<U"]),  # np.asarray(..., float) would parse the text
    ([["0.5", "0"], ["1", "0.5"]], ["real numbers", "P[0, 0]", "'0.5'"]),
    (GOOD.astype(complex), ["real numbers", "P[0, 0]", "complex"]),  # a cast would drop the imaginary part
    ([[0.5, 0.5 + 1j], [0.5, 0.5]], ["real numbers", "dtype complex128"]),  # one complex entry: all are
    (GOOD > 0.4, ["real numbers", "P[0, 0]", "dtype bool"]),
    ([[0.5, None], [0.5, 0.5]], ["real numbers", "P[0, 1] = None"]),
    (np.array([[0.5, True], [False, 0.5]], dtype=object), ["real numbers", "P[0, 1] = True"]),
])
def test_validate_rejects_entries_that_are_not_real_numbers(P, words):
    with pytest.raises(ValueError) as err:
        H.validate_preference(P)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_validate_rejects_bool_and_complex_tensors():
    torch = pytest.importorskip("torch")
    for T in (torch.eye(2, dtype=torch.bool), torch.full((2, 2), 0.5, dtype=torch.complex64)):
        with pytest.raises(ValueError, match="real numbers"):
            H.validate_preference(T)


def test_validate_accepts_int_and_float_arrays_and_mixed_lists():
    assert np.array_equal(H.validate_preference([[0.5, 1], [0, 0.5]]), [[0.5, 1.0], [0.0, 0.5]])  # ints and floats
    assert H.validate_preference(np.full((1, 1), 0.5, dtype=np.float16)).dtype == np.float64
    assert np.array_equal(H.validate_preference(np.array([[0.5, 1], [0, 0.5]], dtype=object)), [[0.5, 1], [0, 0.5]])
    with pytest.raises(ValueError, match="diagonal"):  # an int array is read as numbers (and then checked)
        H.validate_preference(np.eye(2, dtype=np.uint8))


@pytest.mark.parametrize("call", [
    lambda P: H.hedge(P, 0.1, 5), lambda P: H.hedge_batch(P[None], 0.1, 5), lambda P: H.hedge_trajectory(P, 0.1, 5),
    lambda P: H.hedge_step(P, np.full(3, 1 / 3), 0.1), lambda P: H.duality_gap(P, np.full(3, 1 / 3)),
    lambda P: H.log_partition(P, np.full(3, 1 / 3), 0.1)])
def test_every_function_taking_P_validates_it(call):
    call(GOOD)  # fine on a valid game
    with pytest.raises(ValueError, match="diagonal"):
        call(corrupt(1, 1, 0.3))


def test_policies_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        H.hedge(GOOD, 0.1, 5, pi1=[0.5, 0.2, 0.2])
    with pytest.raises(ValueError, match="shape"):
        H.duality_gap(GOOD, [0.5, 0.5])
    with pytest.raises(ValueError, match="T >= 1"):
        H.hedge(GOOD, 0.1, 0)


GOOD3 = np.stack([GOOD] * 3)  # (3, 3, 3)


@pytest.mark.parametrize("call, words", [
    (lambda: H.hedge(GOOD, -0.1, 5), ["eta must be finite and > 0", "eta = -0.1"]),
    (lambda: H.hedge(GOOD, 0.0, 5), ["eta must be finite and > 0", "eta = 0.0"]),
    (lambda: H.hedge(GOOD, float("nan"), 5), ["eta", "nan"]),
    (lambda: H.hedge(GOOD, math.inf, 5), ["eta", "inf"]),
    (lambda: H.hedge(GOOD, 0.1, 2.9), ["T must be an integer", "T = 2.9"]),
    (lambda: H.hedge(GOOD, 0.1, True), ["T must be an integer", "T = True"]),
    (lambda: H.hedge_batch(GOOD3, [0.1, math.nan, 0.1], 5), ["eta", "nan"]),  # every entry of a batched eta
    (lambda: H.hedge_batch(GOOD3, [0.1, 0.2, -0.3], 5), ["eta", "-0.3"]),
    (lambda: H.hedge_batch(GOOD3, 0.1, [5, 0, 5]), ["T >= 1 per run", "[5, 0, 5]"]),
    (lambda: H.hedge_batch(GOOD3, 0.1, [5.0, 6.0, 5.0]), ["T must be an integer", "5.0"]),
    (lambda: H.hedge_trajectory(GOOD, -1e-3, 5), ["eta must be finite and >= 0", "eta = -0.001"]),
    (lambda: H.hedge_trajectory(GOOD, math.inf, 5), ["eta", "inf"]),
    (lambda: H.hedge_trajectory(GOOD, 0.1, 2.9), ["T must be an integer", "T = 2.9"]),
    (lambda: H.hedge_trajectory(GOOD, 0.1, np.array([2, 3])), ["T must be an integer", "array([2, 3])"]),
        (lambda: H.hedge_trajectory(GOOD, 0.1, 5, pi1=[0.5, 0.5, 0.5]), ["pi1", "sum to 1"]),
])
def test_run_functions_reject_bad_eta_T_and_pi1_naming_them(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_run_functions_accept_numpy_integers_per_run_T_and_eta_zero_as_identity():
    pi_bar, pi_last = H.hedge(GOOD, 0.1, np.int32(5), pi1=[0.6, 0.3, 0.1])
    assert np.allclose((pi_bar, pi_last), H.hedge(GOOD, 0.1, 5, pi1=[0.6, 0.3, 0.1]))
    rows = H.hedge_batch(GOOD3, np.array([0.1, 0.2, 0.3]), np.array([1, 2, 3], dtype=np.int64))  # run_gap_suite's form
    assert np.allclose(rows[1][0], 1 / 3)  # T = 1: pi_last = pi_1
    frozen = H.hedge_trajectory(GOOD, 0.0, 4, [0.6, 0.3, 0.1])  # eta = 0: no update, the sppo_toy test's reference
    assert np.allclose(frozen, [0.6, 0.3, 0.1])


# --------------------------------------------------------------------------------------------------- games

def test_games_have_the_structure_their_docstrings_claim():
    for name, make in H.GAMES.items():
        assert np.array_equal(H.validate_preference(make(3)), make(3)), name
    assert np.array_equal(H.rock_paper_scissors(), [[0.5, 0, 1], [1, 0.5, 0], [0, 1, 0.5]])  # paper beats rock
    off = ~np.eye(12, dtype=bool)
    assert set(H.chaotic_game(12, 1)[off]) == {0.0, 1.0}
    wins = H.ordered_game(12, 1).sum(1)  # a strict order: 0.5, 1.5, ..., 11.5 wins, each once
    assert np.array_equal(np.sort(wins), np.arange(12) + 0.5)
    r = H.random_game(12, 1)[off]
    assert 0 < r.min() and r.max() < 1
    with pytest.raises(ValueError, match="margins"):
        H.weighted_rps((1.0, 0.0, 0.5))


def test_weighted_rps_equilibrium_is_the_lp_solution_and_non_uniform():
    for margins in [(1.0, 0.5, 0.25), (0.2, 0.9, 0.6)]:
        P = H.weighted_rps(margins)
        pi_lp, value = lp_equilibrium(P)
        assert value == pytest.approx(0.5) and lp_equilibrium_is_unique(P)
        assert np.allclose(H.weighted_rps_equilibrium(margins), pi_lp, atol=1e-7)
    assert np.allclose(H.weighted_rps_equilibrium(), [2 / 7, 1 / 7, 4 / 7])


# ------------------------------------------------------------------------------------------------ Hedge

def test_hedge_step_and_log_partition_by_hand():
    # RPS, pi = (1/2, 1/2, 0): P(y > pi) = (1/4, 3/4, 1/2). With eta = 2 log 3, e^{eta/2} = 3, so
    # pi' ∝ (e^{eta/4}, 3 e^{eta/4}, 0) = (1/4, 3/4, 0) and Z = (sqrt 3 + 3 sqrt 3)/2 = 2 sqrt 3.
    pi, eta = np.array([0.5, 0.5, 0.0]), 2 * math.log(3)
    assert np.allclose(H.hedge_step(GOOD, pi, eta), [0.25, 0.75, 0.0], atol=1e-15)
    assert H.log_partition(GOOD, pi, eta) == pytest.approx(math.log(2 * math.sqrt(3)), rel=1e-14)


def test_step_is_eq_4_3():
    P, pi, eta = H.random_game(6, 2), np.random.default_rng(0).dirichlet(np.ones(6)), 3.0
    lhs = np.log(H.hedge_step(P, pi, eta) / pi)
    assert np.allclose(lhs, eta * P @ pi - H.log_partition(P, pi, eta), atol=1e-12)


def naive_hedge(P, eta, T, pi1):
    """Reference: Eq. (4.1) literally, in probability space (fine while eta*T is small)."""
    out, pi = [], np.array(pi1, float)
    for _ in range(T):
        out.append(pi)
        w = pi * np.exp(eta * P @ pi)
        pi = w / w.sum()
    return np.array(out)


def test_hedge_matches_naive_multiplicative_weights():
    P, pi1 = H.random_game(7, 3), np.random.default_rng(1).dirichlet(np.ones(7))
    ref = naive_hedge(P, 0.3, 200, pi1)
    assert np.allclose(H.hedge_trajectory(P, 0.3, 200, pi1), ref, atol=1e-12)
    pi_bar, pi_last = H.hedge(P, 0.3, 200, pi1)
    assert np.allclose(pi_bar, ref.mean(0), atol=1e-12) and np.allclose(pi_last, ref[-1], atol=1e-12)


def test_batched_padded_runs_equal_one_at_a_time():
    """Games of sizes 3 and 7, different eta and T, in one padded (R, n) array == separate hedge() calls."""
    games, etas, Ts = [H.weighted_rps(), H.random_game(7, 4), H.chaotic_game(7, 5)], [0.5, 0.1, 2.0], [30, 77, 5]
    P_pad, pi1 = np.full((3, 7, 7), 0.5), np.zeros((3, 7))
    for r, P in enumerate(games):
        P_pad[r, :len(P), :len(P)], pi1[r, :len(P)] = P, 1 / len(P)
    pi_bar, pi_last = H.hedge_batch(P_pad, etas, Ts, pi1)
    for r, P in enumerate(games):
        ref_bar, ref_last = H.hedge(P, etas[r], Ts[r])
        assert np.allclose(pi_bar[r, :len(P)], ref_bar, atol=1e-13) and np.allclose(pi_last[r, :len(P)], ref_last)
        assert np.all(pi_bar[r, len(P):] == 0)  # padding actions never get mass


def test_log_space_survives_large_eta_times_T():
    P = H.ordered_game(8, 6)
    top = np.argmax(P.sum(1))
    with np.errstate(over="raise", under="ignore", invalid="raise"):
        pi_bar, pi_last = H.hedge(P, 1000.0, 5000)  # naive weights would reach exp(1000 * 5000 / 2)
    assert np.array_equal(pi_last, np.eye(8)[top]) and np.all(np.isfinite(pi_bar))
    traj = H.hedge_trajectory(H.weighted_rps(), 1000.0, 500)
    assert np.all(np.isfinite(traj)) and np.allclose(traj.sum(1), 1)


# --------------------------------------------------------------------------------------------- Thm 4.1

def test_duality_gap_matches_its_definition():
    assert H.duality_gap(GOOD, [1, 0, 0]) == 1.0 and abs(H.duality_gap(GOOD, np.full(3, 1 / 3))) < 1e-15
    P = H.random_game(6, 7)
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(6))
    # max_pi' P(pi' > pi) - min_pi' P(pi' < pi), with P(pi' < pi) = P(pi > pi') = pi^T P pi', over pure pi'.
    definition = (P @ pi).max() - (pi @ P).min()
    assert H.duality_gap(P, pi) == pytest.approx(definition, abs=1e-14)
    others = rng.dirichlet(np.ones(6), 2000)  # (2000, 6) mixed pi' never beat the pure ones
    assert ((others @ P @ pi).max() - (pi @ P @ others.T).min()) <= definition + 1e-14


def test_theorem_bound_by_hand():
    assert H.theorem_4_1_bound(1.0, 100, 3) == pytest.approx(math.exp(-1) + 2 * math.log(3) / 100, rel=1e-14)
    pi1 = [0.5, 0.25, 0.25]  # max_y log 1/pi1(y) = log 4
    assert H.theorem_4_1_bound(0.5, 10, pi1) == pytest.approx(1 - (1 - math.exp(-0.5)) / 0.5 + 2 * math.log(4) / 5)
    n, T = 10, 10_000
    assert H.theorem_4_1_bound(H.tuned_eta(n, T), T, n) == pytest.approx(2 * math.sqrt(math.log(n) / T), rel=0.01)


def test_gap_is_below_the_bound_for_every_game_and_T(suite):
    games, rows = suite
    for (g, T), r in rows.items():
        assert r["eta"] == pytest.approx(2 * math.sqrt(math.log(len(games[g])) / T))
        assert -1e-9 <= r["gap"] <= r["bound"], (g, T, r["gap"], r["bound"])


def test_gap_falls_tenfold_on_a_non_uniform_equilibrium(suite):
    _, rows = suite
    assert not np.allclose(H.weighted_rps_equilibrium(), 1 / 3)
    assert rows["weighted_rps", 100]["gap"] >= 10 * rows["weighted_rps", 100_000]["gap"] > 0


@pytest.mark.parametrize("game", ["weighted_rps", "random_10", "chaotic_10", "ordered_10"])
def test_average_approaches_the_lp_equilibrium(suite, game):
    games, rows = suite
    assert lp_equilibrium_is_unique(games[game])
    pi_lp, _ = lp_equilibrium(games[game])
    err = [np.abs(rows[game, T]["pi_bar"] - pi_lp).sum() for T in HORIZONS]
    assert err[-1] < 0.03 and err[-1] < err[0] / 3, err


def test_last_iterate_cycles_while_the_average_converges():
    traj = H.hedge_trajectory(H.weighted_rps(), 0.1, 3000)  # figure (c)
    eq = H.weighted_rps_equilibrium()
    assert np.abs(traj.mean(0) - eq).sum() < 0.05
    assert np.abs(traj[-500:] - eq).sum(1).min() > 0.2  # the last 500 iterates all stay far from pi*


def kl_from(star, traj):
    """KL(pi* || pi_t) for every row pi_t of traj (T, n); pi* may be pure (0 log 0 = 0)."""
    m = star > 0
    return (star[m] * (np.log(star[m]) - np.log(traj[:, m]))).sum(-1)


@pytest.mark.parametrize("game, pi1", [("rps", [0.6, 0.3, 0.1]), ("weighted_rps", None), ("weighted_rps",
                                                                                          [0.6, 0.3, 0.1])])
@pytest.mark.parametrize("eta", [0.1, 1.0])
def test_kl_to_an_interior_equilibrium_never_falls(game, pi1, eta):
    """_hedge's docstring: a step changes KL(pi* || pi_t) by log Z_t - eta <pi*, P pi_t> (Eq. 4.3, by hand). With pi*
    interior, P pi* = 1/2 everywhere, so <pi*, P pi_t> = 1/2 <= log Z_t / eta (Jensen): KL never falls (Bailey &
    Piliouras 2018), and over 2000 steps it grows."""
    P = H.GAMES[game]()
    star = H.weighted_rps_equilibrium() if game == "weighted_rps" else np.full(3, 1 / 3)
    np.testing.assert_allclose(P @ star, 0.5, atol=1e-15)                                 # interior: all payoffs 1/2
    traj = H.hedge_trajectory(P, eta, 2000, pi1)                                          # (T, 3)
    kl = kl_from(star, traj)
    by_hand = H.log_partition(P, traj[:-1], eta) - eta * (traj[:-1] @ P.T @ star)          # (T - 1,)
    np.testing.assert_allclose(np.diff(kl), by_hand, atol=1e-12)
    assert np.diff(kl).min() >= -1e-12 and kl[-1] > kl[0] + 0.04


def test_kl_to_an_equilibrium_on_a_face_falls():
    """ordered_10's equilibrium is its top action (a vertex, not interior): <pi*, P pi_t> > 1/2 while pi_t is mixed,
    and KL(pi* || pi_t) = -log pi_t(top) falls at every step, from log 10 = 2.30 to 4.6e-5 after 245 steps at
    eta = 0.1: the last iterate converges, and the 'never decreases' of interior games does not hold."""
    P = H.GAMES["ordered_10"]()
    star = np.eye(10)[np.argmax(P.sum(1))]
    assert H.duality_gap(P, star) == 0                                                    # pi*: the top action
    traj = H.hedge_trajectory(P, 0.1, 245)
    kl = kl_from(star, traj)
    np.testing.assert_allclose(np.diff(kl), H.log_partition(P, traj[:-1], 0.1) - 0.1 * (traj[:-1] @ P.T @ star),
                               atol=1e-12)
    assert kl[0] == pytest.approx(math.log(10)) and kl[-1] == pytest.approx(4.58e-5, rel=0.01)
    assert np.diff(kl).max() < 0


# ----------------------------------------------------------------------------------------------- App. A

def test_log_z_limits_by_hand():
    assert H.log_z_limit("ordered", 1.0) == pytest.approx(math.log(math.e - 1), rel=1e-14)  # 0.5413
    assert H.log_z_limit("ordered", 1000.0) == pytest.approx(1000 - math.log(1000), rel=1e-14)
    assert H.log_z_limit("chaotic", 3.0) == 1.5
    with pytest.raises(ValueError, match="kind"):
        H.log_z_limit("transitive", 1.0)
    with pytest.raises(ValueError, match="kind"):
        H.empirical_log_z("transitive", 3, 1.0)


def ordered_exact(K, eta):
    """log (1/K) sum_i exp(eta (i - 1/2)/K), i = 1..K, summed as a geometric series (App. A, ordered case)."""
    log_expm1 = lambda x: x + math.log(-math.expm1(-x))  # log(e^x - 1), no overflow
    return -math.log(K) + eta / (2 * K) + log_expm1(eta) - log_expm1(eta / K)


@pytest.mark.parametrize("K", [2, 5, 50])
def test_empirical_log_z_ordered_is_exact(K):
    etas = np.array([1.0, 10.0, 1000.0])
    mean, se = H.empirical_log_z("ordered", K, etas, trials=30, seed=1)
    assert np.allclose(mean, [ordered_exact(K, e) for e in etas], rtol=1e-12) and np.all(se < 1e-10)


def chaotic_exact(K, eta):
    """E log Z_K over all 2^(K(K-1)/2) equally likely tournaments (App. A, chaotic case), by enumeration."""
    pairs, values = list(itertools.combinations(range(K), 2)), []
    for coins in itertools.product((0.0, 1.0), repeat=len(pairs)):
        P = np.full((K, K), 0.5)
        for (i, j), c in zip(pairs, coins):
            P[i, j], P[j, i] = c, 1 - c
        values.append(math.log(np.mean(np.exp(eta * P.mean(1)))))
    return np.mean(values)


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_empirical_log_z_chaotic_matches_enumeration(K):
    etas = np.array([1.0, 10.0])
    mean, se = H.empirical_log_z("chaotic", K, etas, trials=3000, seed=2)
    for m, s, eta in zip(mean, se, etas):
        assert abs(m - chaotic_exact(K, eta)) <= 4 * s + 1e-12, (K, eta, m, s)


def test_empirical_log_z_approaches_the_limits():
    for kind in H.KINDS:
        dev = [abs(H.empirical_log_z(kind, K, 1.0, trials=50, seed=3)[0] - H.log_z_limit(kind, 1.0)) for K in
               (4, 32, 256)]
        assert dev[0] > dev[1] > dev[2] and dev[2] < 2e-3, (kind, dev)


# -------------------------------------------------------------------------------------------------- CLI

def test_cli_small_run_writes_tables_and_figures(tmp_path):
    out = tmp_path / "figs"
    cmd = [sys.executable, os.path.join(ROOT, "hedge_toy.py"), "--out", str(out), "--t-max", "1000", "--seed", "1",
           "--trials", "20", "--ks", "2", "5", "20"]
    proc = conftest.run(cmd, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "holds?" in proc.stdout and "log Z/eta" in proc.stdout and " NO" not in proc.stdout
    assert "weighted_rps   3  1e+03" in proc.stdout
    for name in ("hedge_gap.png", "hedge_log_z.png", "hedge_simplex.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_non_zero_when_a_bound_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(H, "theorem_4_1_bound", lambda eta, T, pi1: np.asarray(eta) * 0 - 1.0)  # every gap now "fails"
    cfg = H.Config(out=str(tmp_path), t_max=100, trials=3, ks=(2,))
    assert H.report(cfg) == 1
    assert "NO" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, words", [
    ("etas", [1.0, 0.0], ["--etas [1.0, 0.0]", "finite and > 0"]),
    ("etas", [float("inf")], ["--etas", "inf"]),
    ("etas", [], ["--etas", "[]"]),
    ("ks", [2, 1], ["--ks [2, 1]", "K >= 2"]),
    ("ks", [2.5], ["--ks", "2.5"]),
    ("ks", [2, 10**5], ["--ks [2, 100000]", "K <= 2000", "K x K"]),
    ("t_max", 0, ["--t-max 0", "integer >= 1"]),
    ("t_max", 100.0, ["--t-max 100.0", "integer"]),
    ("t_max", 10**12, ["--t-max 1000000000000", "<= 10^7", "Thm 4.1"]),
    ("trials", 0, ["--trials 0", "[1, 10^5]"]),
    ("trials", 10**12, ["--trials 1000000000000", "[1, 10^5]"]),
    ("trials", 10**5, ["--trials 100000", "2e9 / sum(K^2)"]),       # within its cap, not with K = 2 x 2 ... 500 x 500
    ("seed", -1, ["--seed -1", ">= 0"]),
])
def test_report_refuses_a_bad_config_before_any_work(tmp_path, field, value, words):
    out = tmp_path / "figs"
    cfg = H.Config(**(dict(out=str(out), t_max=100, trials=3, ks=[2, 500]) | {field: value}))
    with pytest.raises(ValueError) as err:                              # cli.ConfigError
        H.report(cfg)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not out.exists()  # nothing computed, nothing written


def run_cli(tmp_path, *args):
    """hedge_toy.py in a subprocess, from tmp_path; a bad setting must exit 2 before any work."""
    return conftest.run([sys.executable, os.path.join(ROOT, "hedge_toy.py"), *args], timeout=120, cwd=tmp_path)


def test_cli_bad_value_exits_2_at_once_with_one_line(tmp_path):
    proc = run_cli(tmp_path, "--etas", "0", "--out", str(tmp_path / "figs"))
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "figs").exists()
    assert proc.stderr.splitlines() == ["hedge_toy.py: error: --etas [0.0]: must be finite and > 0"]


@pytest.mark.parametrize("args, words", [
    pytest.param(["--t-max", "1000000000000"], ["--t-max 1000000000000: must be <= 10^7", "Thm 4.1"], id="t-max-1e12"),
    pytest.param(["--trials", "1000000000000"], ["--trials 1000000000000: must be an integer in [1, 10^5]"],
                 id="trials-1e12"),
    pytest.param(["--ks", "2", "100000"], ["--ks [2, 100000]: must be each K <= 2000"], id="ks-1e5"),
])
def test_cli_refuses_sizes_that_would_run_for_hours_at_once(tmp_path, args, words):
    """A horizon or a Monte Carlo size far past what the runs can hold or finish is one line and exit 2, at once
    (it used to print nothing for minutes), and nothing is written."""
    proc = run_cli(tmp_path, *args, "--out", str(tmp_path / "figs"))
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "figs").exists()
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("hedge_toy.py: error: ")
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


def test_cli_caps_hold_through_a_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("t_max: 1.0e+12\nout: figs\n")
    proc = run_cli(tmp_path, "--config", "c.yaml")
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "figs").exists()
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "--t-max 1000000000000: must be <= 10^7" in proc.stderr


def test_cli_out_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(tmp_path, "--out", str(tmp_path / "a_file" / "figs"), "--t-max", "100", "--trials", "3")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"hedge_toy.py: error: --out {tmp_path / 'a_file' / 'figs'}: "
                                        f"{tmp_path / 'a_file'} is a file, not a folder"]


def test_app_a_table_shows_the_given_ks_outside_its_default_subset(tmp_path, capsys):
    assert H.report(H.Config(out=str(tmp_path), t_max=100, trials=3, ks=[3, 4], etas=[1.0])) == 0
    out = capsys.readouterr().out
    table = out[out.index("App. A"):].split("\n\n")[0].splitlines()[2:]  # the App. A table's rows
    assert [line.split()[:3] for line in table] == [[kind, "1", K] for kind in H.KINDS for K in ("3", "4")]
