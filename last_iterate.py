"""Hedge's neighbours: self-play methods whose LAST iterate converges, exactly, on hedge_toy.py's games.

SPPO (Wu et al., arXiv 2405.00675) deploys its last iterate pi_T, not the average that Thm 4.1 is about, and
Hedge's last iterate cycles around the equilibrium (figures/hedge_simplex.png). This file runs, on the same games
and with the same exactness as hedge_toy.py, the methods after it whose last iterate converges -- optimistic Hedge
(OMWU), extragradient, Nash-MD, magnetic mirror descent -- beside Hedge, regret matching+ and fictitious play; and
the KL-regularised game that Nash-MD and MMD solve (its gap and its equilibrium, by a certified solver).

Conventions are hedge_toy.py's: P (..., n, n) with P + P^T = 1, policies (..., n), eta the step; tau the KL weight
and mu the reference / magnet of the regularised methods. NumPy, float64.

Run:  python last_iterate.py [--out figures] [--eta 0.5] [--t 10000] [--tau 0.1]
It prints one table (the last-iterate and average gap of every method on three games: one run per cell, at one eta,
the figures' run) and writes figures/dynamics_last_iterate.png and figures/dynamics_simplex.png.

      python last_iterate.py --table [--seeds 10] [--tuning-seeds 3] [--grid 0.05 0.1 0.25 0.5 1] [--t 10000]
The comparison (experiments.py, ~1 min on 2 cores): each method's eta chosen on tuning seeds 0..2 by experiments.RULE
on the last-iterate gap at T, then the last-iterate and average gaps at T over fresh seeds 100..109, mean ± 95%
t-interval; printed, and written to figures/last_iterate_table.json (records under runs/last_iterate, resumable).
"""
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cli  # the one CLI convention: standard library and PyYAML only, so this file stays NumPy-only
import experiments  # the runner over seeds: NumPy, the standard library and cli.py
from hedge_toy import (GAMES, _average, _check_eta_T, _count, _each, _hedge, _log_step, _loop, _normalise, _payoff,
                       _positive, _step, _validate_policy, duality_gap, plot_simplex, print_table, timed,
                       validate_preference, weighted_rps_equilibrium)

# SPPO deploys its last iterate, and Hedge's cycles (hedge_simplex.png). Each method below is one step (log pi_t, mem)
# -> (log pi_{t+1}, mem), with P (..., n, n), eta and tau (..., 1), log mu (..., n); _loop drives them all. The games
# are symmetric: both players at pi_1 make the same updates, so two-player guarantees hold for this self-play.


def _optimistic_hedge(P, log_pi, pi, eta, tau, log_mu, mem):
    """OMWU: log pi_{t+1} = log pi_t + eta (2 P pi_t - P pi_{t-1}) - log Z, pi_0 = pi_1 (Rakhlin & Sridharan 2013;
    Daskalakis & Panageas, ITCS 2019). LAST iterate -> the equilibrium if it is unique, linearly for a small eta (Wei,
    Lee, Zhang & Luo, ICLR 2021); average gap O(1/T) (Syrgkanis et al. 2015)."""
    u = _payoff(P, pi)  # memory: P pi_{t-1}
    return _normalise(log_pi + eta * (2 * u - (u if mem is None else mem))), u  # Daskalakis & Panageas 2019


def _extragradient(P, log_pi, pi, eta, tau, log_mu, mem):
    """Extragradient / mirror prox: pi_{t+1/2} ∝ pi_t exp(eta P pi_t), pi_{t+1} ∝ pi_t exp(eta P pi_{t+1/2})
    (Korpelevich 1976; Nemirovski 2004; EGPO, Zhou, Fazel & Du 2025, on the KL-regularised game). The average of the
    half-steps has gap O(1/T) (Nemirovski); the LAST iterate converges in bilinear games (Mertikopoulos et al. 2019)."""
    half = np.exp(_log_step(P, log_pi, pi, eta))  # pi_{t+1/2}, Eq. (4.3)
    return _log_step(P, log_pi, half, eta), mem  # from pi_t with the payoff at pi_{t+1/2}, Nemirovski 2004


def _nash_md(P, log_pi, pi, eta, tau, log_mu, mem):
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886, Sec. 6): pi_t^mu ∝ pi_t^(1 - eta tau) mu^(eta tau), then
    pi_{t+1} = argmax_pi eta P(pi > pi_t^mu) - KL(pi || pi_t^mu) ∝ pi_t^mu exp(eta P pi_t^mu). Their Thm 1: LAST iterate
    KL(pi*_tau || pi_{t+1}) <= (1 - eta tau)^t KL(pi*_tau || pi_1) + 2 eta / tau, so a constant eta leaves an O(eta/tau)
    bias; eta = log T / (tau T) gives O(log T / (tau^2 T)). Needs eta tau <= 1."""
    log_mix = _normalise((1 - eta * tau) * log_pi + eta * tau * log_mu)  # pi_t^mu, Munos et al. Sec. 6
    return _log_step(P, log_mix, np.exp(log_mix), eta), mem  # a Hedge step from pi_t^mu against pi_t^mu


def _mmd(P, log_pi, pi, eta, tau, log_mu, mem):
    """Magnetic mirror descent (Sokota et al., ICLR 2023, Sec. 3, entropy case; alpha = tau, magnet rho = mu):
    pi_{t+1} = argmax_pi eta [<pi, P pi_t> - tau KL(pi || mu)] - KL(pi || pi_t) ∝ (pi_t mu^(eta tau) e^(eta P pi_t))^
    (1/(1 + eta tau)). Its fixed point IS the regularised equilibrium; their Sec. 3 theorem: the LAST iterate converges
    to it linearly for eta <= tau / L^2, L the Lipschitz constant of pi -> P pi from l1 to l_inf on the simplex,
    max_i (max_j P_ij - min_j P_ij) / 2: 1/2 on rps (any game with a sure win and a sure loss in one row), 0.470 on
    random_10, 0.375 on weighted_rps. At L = 1/2 that is eta <= 4 tau: the CLI's eta = 0.5 is OUTSIDE the bound for
    its tau = 0.1 and the panel's 0.03, 0.01 (bounds 0.4, 0.12, 0.04). Measured anyway (docs/last_iterate.md): it
    converges on every game and tau of the sweep but rps at tau = 0.01, where pi*_tau is unstable at eta = 0.5 (the
    step's Jacobian there has spectral radius sqrt(1 + eta^2/12) / (1 + eta tau) = 1.005) and the iterate cycles."""
    return _normalise((log_pi + eta * _payoff(P, pi) + eta * tau * log_mu) / (1 + eta * tau)), mem  # Sokota Sec. 3


def _inpo(P, log_pi, pi, eta, tau, log_mu, mem):
    """INPO's online mirror descent (Zhang et al. 2024, arXiv 2407.00617, Eq. (5); their eta is 1/eta here):
    pi_{t+1} ∝ pi_t^(1 - eta tau) mu^(eta tau) exp(eta P pi_t): Nash-MD's pull towards mu with the payoff at pi_t
    itself, not at the mixture. Their Thm: the last iterate converges to pi*_tau (eta tau < 1)."""
    return _normalise((1 - eta * tau) * log_pi + eta * tau * log_mu + eta * _payoff(P, pi)), mem  # Zhang Eq. (5)


def _mirror_prox(P, log_pi, pi, eta, tau, log_mu, mem):
    """Nash Mirror Prox (Tiapkin et al. 2025, arXiv 2505.19731): mirror prox (Nemirovski 2004) on the regularised game,
    each half an MMD step from pi_t: pi_{t+1/2} = _mmd(pi_t; P pi_t), pi_{t+1} = _mmd(pi_t; P pi_{t+1/2}). With tau -> 0
    it is _extragradient. Converges linearly to pi*_tau in the last iterate."""
    half = np.exp(_mmd(P, log_pi, pi, eta, tau, log_mu, None)[0])  # pi_{t+1/2}
    return _normalise((log_pi + eta * _payoff(P, half) + eta * tau * log_mu) / (1 + eta * tau)), mem


def _regret_matching_plus(P, log_pi, pi, eta, tau, log_mu, mem):
    """Regret matching+: Q_{t+1} = [Q_t + P pi_t - <pi_t, P pi_t>]^+, pi_{t+1} ∝ Q_{t+1}, uniform if Q_{t+1} = 0 (Hart &
    Mas-Colell 2000; Tammelin 2014, CFR+). Regret O(sqrt(n T)), so AVERAGE gap O(sqrt(n / T)). eta is unused."""
    u = _payoff(P, pi)
    Q = np.maximum((0.0 if mem is None else mem) + u - (pi * u).sum(-1, keepdims=True), 0.0)  # Tammelin 2014
    with np.errstate(divide="ignore"):
        return _normalise(np.log(np.where(Q.sum(-1, keepdims=True) > 0, Q, 1.0))), Q


def _fictitious_play(P, log_pi, pi, eta, tau, log_mu, mem):
    """Fictitious play: pi_{t+1} = a best response to pi_bar_t, ties split evenly (Brown 1951). The AVERAGE converges
    in zero-sum games (Robinson 1951), possibly slowly (Daskalakis & Pan 2014); the last iterate is pure. eta unused."""
    total = pi + (0.0 if mem is None else mem)  # t pi_bar_t
    u = _payoff(P, total)
    return _normalise(np.where(u == u.max(-1, keepdims=True), 0.0, -np.inf)), total  # Brown 1951


METHODS = {f.__name__[1:]: f for f in (_hedge, _optimistic_hedge, _extragradient, _nash_md, _mmd, _inpo,
                                       _mirror_prox, _regret_matching_plus, _fictitious_play)}
REGULARISED = ("nash_md", "mmd", "inpo", "mirror_prox")  # they take tau and mu, and solve the KL-regularised game


def _magnet_loop(step, P, eta, log_pi, tau, log_mu, every):
    """hedge_toy._loop with MPO's magnet schedule (Wang et al. 2024, arXiv 2410.16714, Sec. 3.2): the magnet mu of
    step t = 0, 1, ... is the iterate of step M floor(t/M), the first one included: regularised games solved in
    turn, each centred on where the last left off, whose solutions approach the unregularised equilibrium."""
    mem, t = None, 0
    while True:
        pi = np.exp(log_pi)
        yield pi
        if t % every == 0:
            log_mu = log_pi
        log_pi, mem = step(P, log_pi, pi, eta, tau, log_mu, mem)
        t += 1


def _log_reference(mu, batch, n):
    """log mu (..., n) for the reference / magnet mu (uniform by default); a ValueError unless mu > 0 everywhere."""
    mu = np.full(n, 1.0 / n) if mu is None else _validate_policy(mu, n, "mu")
    if (mu <= 0).any():
        raise ValueError(f"mu must be > 0 for every action (else KL(pi || mu) is infinite); got mu = {mu}")
    return np.log(np.broadcast_to(mu, (*batch, n)))


def _iterates(P, method, eta, T, pi1, options, flat):
    """Check play's arguments; return the generator of pi_t, over P flattened to (R, n, n) if `flat`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}; got method = {method!r}")
    if set(options) - set(("tau", "mu", "magnet_every") if method in REGULARISED else ()):
        raise ValueError(f"only {REGULARISED} take options (tau, mu, magnet_every); got {sorted(options)} for "
                         f"{method!r}")
    every = options.get("magnet_every", 0)
    if not (isinstance(every, int) and every >= 0) or (every and options.get("mu") is not None):
        raise ValueError(f"magnet_every must be an integer >= 0 (0: the magnet stays mu), and the magnet then starts "
                         f"at pi1, so mu is not given; got magnet_every = {every!r}, mu = {options.get('mu')}")
    batch, n = P.shape[:-2], P.shape[-1]
    (eta, T), tau = _check_eta_T(eta, T, batch), _positive("tau", options.get("tau", 0.1), batch)
    if method in ("nash_md", "inpo") and (eta * tau > 1).any():
        raise ValueError(f"{method} needs eta * tau <= 1; got eta * tau = {(eta * tau).max():g}")
    pi1 = np.full(n, 1.0 / n) if pi1 is None else _validate_policy(pi1, n, "pi1")
    if method in REGULARISED and (pi1 <= 0).any():
        raise ValueError(f"{method} needs pi1 > 0 for every action; got pi1 = {pi1}")
    with np.errstate(divide="ignore"):
        args = [eta, np.log(np.broadcast_to(pi1, (*batch, n))), tau, _log_reference(options.get("mu"), batch, n)]
    if flat:
        P, args = P.reshape(-1, n, n), [a.reshape(-1, a.shape[-1]) for a in args]
    return _magnet_loop(METHODS[method], P, *args, every) if every else _loop(METHODS[method], P, *args)


def play(P, method, eta, T, pi1=None, **options):
    """Self-play of `method` (a key of METHODS) for T steps from pi1 (uniform by default). Returns (pi_bar, pi_last).

    pi_bar = (1/T) sum_{t <= T} pi_t and pi_last = pi_T, each (..., n); P (..., n, n) batches games as hedge_batch does,
    and eta > 0 broadcasts against its batch axes. Options of the REGULARISED methods: tau > 0 (default 0.1), the KL
    weight, and mu > 0 (default uniform), the reference / magnet, or magnet_every = M (_magnet_loop, MPO).
    play(P, "hedge", ...) equals hedge(P, ...) exactly.
    """
    P = validate_preference(P)
    batch, n = P.shape[:-2], P.shape[-1]
    pi_bar, pi_last = _average(_iterates(P, method, eta, T, pi1, options, True), np.full(math.prod(batch), T), n)
    return pi_bar.reshape(*batch, n), pi_last.reshape(*batch, n)


def trajectory(P, method, eta, T, pi1=None, **options):
    """The iterates pi_1 .. pi_T of `method`, an array (T, ..., n); arguments as for play."""
    P = validate_preference(P)
    iterates = _iterates(P, method, eta, T, pi1, options, False)  # checks T before range(T) sees it
    return np.stack([pi for _, pi in zip(range(T), iterates)])


def regularized_gap(P, pi, tau, mu=None):
    """Duality gap of the KL-regularised game that Nash-MD and MMD solve; 0 exactly at regularized_equilibrium.

    The game (Munos et al. 2023, Sec. 3): P_tau(pi' > pi) = P(pi' > pi) - tau KL(pi' || mu) + tau KL(pi || mu). As in
    duality_gap, gap_tau(pi) = 2 max_pi' P_tau(pi' > pi) - 1; the max sits at b = softmax(log mu + P pi / tau) (Gibbs),
    and with pi^T P pi = 1/2, gap_tau(pi) = 2 tau [log sum_y mu(y) e^((P pi)_y / tau) + KL(pi || mu)] - 1
    = 2 tau KL(pi || b) -> duality_gap as tau -> 0. Quadratic near pi*_tau: |pi - pi*_tau|_1 <= sqrt(gap_tau / tau).
    """
    P = validate_preference(P)
    pi = _validate_policy(pi, P.shape[-1])
    batch = np.broadcast_shapes(P.shape[:-2], pi.shape[:-1])
    tau = _positive("tau", tau, batch)
    log_b = _normalise(_log_reference(mu, batch, P.shape[-1]) + _payoff(P, pi) / tau)  # regularised best response
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2 * tau[..., 0] * np.where(pi > 0, pi * (np.log(pi) - log_b), 0.0).sum(-1)


def regularized_equilibrium(P, tau, mu=None, tol=1e-11, max_iter=10**6):
    """pi*_tau ∝ mu exp(P pi*_tau / tau), by mirror descent on the convex f = regularized_gap / 2 (not Nash-MD or MMD).

    With b = softmax(log mu + P pi / tau) and P^T b = 1 - P b, grad f = tau (log pi - log mu) - P b + const; the
    entropic step of size s = 1/L is log pi' = (1 - s tau) log pi + s tau log mu + s P b - log Z. Linear rate: for
    sum(d) = 0, P d = A d / 2 and d^T Hess(f) d = tau d^T diag(1/pi) d + Var_b(A d) / (4 tau), with Var_b(A d) <=
    |d|_1^2 <= d^T diag(1/pi) d (|A_ij| <= 1): f is tau-strongly convex and (tau + 1/(4 tau))-smooth relative to the
    entropy, so f(pi_k) <= const (1 + 4 tau^2)^-k (Lu, Freund & Nesterov 2018, Thm 3.1). Stops on a certificate:
    KL(pi || pi*_tau) <= gap/(2 tau) = KL(pi || b) <= chi2(pi || b), so |pi - pi*_tau|_1 <= sqrt(2 chi2) <= tol.
    """
    P = validate_preference(P)
    batch = P.shape[:-2]
    tau, log_mu = _positive("tau", tau, batch), _log_reference(mu, batch, P.shape[-1])
    s, log_pi = 1.0 / (tau + 1.0 / (4.0 * tau)), log_mu
    for _ in range(max_iter):
        pi = np.exp(log_pi)
        b = np.exp(_normalise(log_mu + _payoff(P, pi) / tau))
        if (np.sqrt(2 * ((pi - b) ** 2 / b).sum(-1)) <= tol).all():
            return pi
        log_pi = _normalise((1 - s * tau) * log_pi + s * tau * log_mu + s * _payoff(P, b))  # Lu et al. 2018
    raise RuntimeError(f"regularized_equilibrium: no certificate <= {tol:g} in {max_iter} steps (tau = {tau.min():g})")


# ------------------------------------------------------------------------------- over seeds (experiments.py)
STEPLESS = ("regret_matching_plus", "fictitious_play")
"""Methods whose update ignores eta: the tuned table gives them a one-point grid (their step is a label only)."""

TABLE_GAMES = ("rps", "weighted_rps", "random_10")
"""The games of the seeded table: two fixed games (the seed draws pi_1) and one drawn from the seed too."""


def selfplay_world(method, step, seed, game="weighted_rps", T=10_000, tau=0.1, checkpoints=41):
    """One run of `method` at eta = step for experiments.py: self-play for T steps on GAMES[game](seed) (rps and
    weighted_rps ignore the seed; random_10 is drawn from it) from pi_1 ~ Dirichlet(1, ..., 1), drawn by
    np.random.default_rng([1, seed]): a stream of its own, since random_game draws from default_rng(seed) and the
    same stream would make pi_1 a function of the game's first row. nash_md and mmd run at KL weight tau, mu uniform:
    they converge to pi*_tau, whose unregularised gap is O(tau) (0.08 on weighted RPS at tau = 0.1), a floor under
    their gap_last and gap_avg that no step removes.

    Records at `checkpoints` log-spaced iterations i in 1..T (1 and T included; fewer when T is small), one each,
    experiments.py's `t` being the record's index: `iteration` i; gap_last = duality_gap(pi_i) and gap_avg =
    duality_gap(pi_bar_i), pi_bar_i = (1/i) sum_{s <= i} pi_s (at i = T: play's pi_last and pi_bar); for nash_md and
    mmd also reg_gap_last = regularized_gap(pi_i, tau), the gap of the game they solve."""
    P = GAMES[game](seed)
    pi1 = np.random.default_rng([1, seed]).dirichlet(np.ones(P.shape[-1]))
    reg = method in REGULARISED
    traj = trajectory(P, method, step, T, pi1, **(dict(tau=tau) if reg else {}))  # (T, n): row i-1 is pi_i
    its = np.unique(np.geomspace(1, T, checkpoints).round().astype(int))          # (K,) iterations, 1 .. T
    last, avg = traj[its - 1], np.cumsum(traj, 0)[its - 1] / its[:, None]          # pi_i, pi_bar_i: (K, n)
    gap_last, gap_avg = duality_gap(P, last), duality_gap(P, avg)                  # (K,)
    reg_last = regularized_gap(P, last, tau) if reg else None
    return [{"t": k, "iteration": int(i), "gap_last": float(gap_last[k]), "gap_avg": float(gap_avg[k]),
             **({"reg_gap_last": float(reg_last[k])} if reg else {})} for k, i in enumerate(its)]


# ------------------------------------------------------------------------------------------- the CLI
MAGNET_EVERY = 50
"""The figures' MPO line: mmd at --tau with its magnet moved to the iterate every 50 steps (_magnet_loop)."""

T_MAX = 10**6
"""--t cap: the sweep keeps every iterate of every method and game (T x n floats each, plus the tau panel's T x 4 x n:
~1.4 KB a step in all) and takes its steps in Python (~1 ms a step for the whole sweep): 10^6 is ~1.4 GB and ~20 min."""


@dataclass
class Config:
    """Every knob of `python last_iterate.py`; each field is a flag; RULES is checked (cli.check) before any work."""

    out: str = cli.arg("figures", path="out_dir", help="folder for the two PNG figures, or --table's "
                                                       "last_iterate_table.json (made if missing)")
    seed: int = cli.arg(0, help="seed of the random game (the figures' run)")
    eta: float = cli.arg(0.5, help="step eta of every method in the sweep (the figures' run)")
    t: int = cli.arg(10_000, help="iterations T of every run (at most 10^6)")
    tau: float = cli.arg(0.1, help="KL weight tau of nash_md and mmd")
    taus: list[float] = cli.arg(default_factory=lambda: [0.3, 0.1, 0.03, 0.01], help="taus of the tau -> 0 panel")
    table: bool = cli.arg(False, help="the seeded, tuned table instead of the figures (--t and --tau apply to both)")
    seeds: int = cli.arg(10, help="--table: report seeds 100..100+N-1, fresh (never tuned on)")
    tuning_seeds: int = cli.arg(3, help="--table: tuning seeds 0..N-1")
    grid: list[float] = cli.arg(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0],
                                help=f"--table: the steps eta tried; {', '.join(STEPLESS)} ignore eta: the first only")
    records: str = cli.arg("runs/last_iterate", path="out_dir", help="--table: record files, one per game, method, "
                                                                     "step and seed; reused if settings and code match")
    jobs: int = cli.arg(0, help="--table: processes at a time (0: the cores this process may use)")

    RULES = (
        # field   the test                                                  what it must be
        ("seed",  lambda c: _count(0)(c.seed),                              "an integer >= 0 (a NumPy seed)"),
        ("eta",   lambda c: _step(c.eta),                                   "finite and > 0"),
        ("t",     lambda c: _count(1)(c.t),                                 "an integer >= 1"),
        ("t",     lambda c: c.t <= T_MAX,                                   "<= 10^6: the sweep keeps every iterate "
                                                                            "(~1.4 KB a step) and steps in Python "
                                                                            "(~1 ms a step): 10^6 is ~1.4 GB, ~20 min"),
        ("tau",   lambda c: _step(c.tau),                                   "finite and > 0"),
        ("taus",  lambda c: _each(_step)(c.taus),                           "finite and > 0"),
        ("eta",   lambda c: c.eta * max(c.tau, *c.taus) <= 1,               "<= 1 / the largest of --tau and --taus: "
                                                                            "nash_md needs eta * tau <= 1"),
        ("seeds", lambda c: 2 <= c.seeds <= 1000,                           "in [2, 1000]: an interval needs 2 seeds"),
        ("tuning_seeds", lambda c: 1 <= c.tuning_seeds <= 100,              "in [1, 100]"),
        ("grid",  lambda c: len(c.grid) >= 1 and _each(_step)(c.grid),     "one or more steps, finite and > 0"),
        ("grid",  lambda c: max(c.grid) * c.tau <= 1,                       "<= 1 / --tau: nash_md needs eta tau <= 1"),
        ("jobs",  lambda c: c.jobs >= 0,                                    ">= 0"),
        # a flag of the other mode would be ignored without a word: refused instead
        *((name, lambda c, n=name: c.table or getattr(c, n) == _default(c, n), "left at its default without --table "
           "(a setting of the seeded table)") for name in ("seeds", "tuning_seeds", "grid", "records", "jobs")),
        *((name, lambda c, n=name: not c.table or getattr(c, n) == _default(c, n), "left at its default with --table "
           "(a setting of the figures' single run)") for name in ("seed", "eta", "taus")),
    )


def _default(cfg, name):
    """The default of cfg's field `name`."""
    f = next(f for f in dataclasses.fields(cfg) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def report(cfg):
    """Every method at eta = cfg.eta for cfg.t steps on rps, weighted_rps (from (0.6, 0.3, 0.1)) and random_10.

    Prints the table; figure (d), dynamics_last_iterate.png: gap against t of the last iterate (row 1) and the average
    (row 2), the regularised gap for the REGULARISED methods (dashed), and the unregularised gap of nash_md and mmd
    as tau shrinks, and of mmd whose magnet moves every MAGNET_EVERY steps (MPO), which reaches the equilibrium (row 3);
    figure (e), dynamics_simplex.png: each method's trajectory on weighted_rps. cli.check(cfg) first: a bad setting
    raises cli.ConfigError (a ValueError) before anything is computed; cfg.out is made before the sweep.
    """
    cli.check(cfg)
    import matplotlib.pyplot as plt

    os.makedirs(cfg.out, exist_ok=True)

    fig, axes = plt.subplots(3, 3, figsize=(18, 15))
    t, taus, rows, simplex = np.arange(1, cfg.t + 1), np.array(cfg.taus), [], []
    s = np.unique(np.geomspace(1, cfg.t, 400).astype(int)) - 1  # plotted steps, log-spaced
    for j, (g, pi1) in enumerate((("rps", [0.6, 0.3, 0.1]), ("weighted_rps", [0.6, 0.3, 0.1]), ("random_10", None))):
        P = GAMES[g](cfg.seed)
        for i, m in enumerate(METHODS):
            reg = m in REGULARISED
            traj = trajectory(P, m, cfg.eta, cfg.t, pi1, **(dict(tau=cfg.tau) if reg else {}))  # (T, n)
            avg = np.cumsum(traj, 0) / t[:, None]  # pi_bar_t, (T, n)
            for row, x in enumerate((traj, avg)):
                gap = regularized_gap(P, x, cfg.tau) if reg else duality_gap(P, x)
                axes[row, j].loglog(t[s], np.maximum(gap[s], 1e-16), "--" if reg else "-", color=f"C{i}", lw=1,
                                    label=m + f" (regularised gap, tau={cfg.tau:g})" * reg)
            last, mean = duality_gap(P, traj[-1]), duality_gap(P, avg[-1])
            rows.append([m, g, f"{cfg.eta:g}", str(cfg.t), f"{last:.2e}", f"{mean:.2e}",
                         f"{regularized_gap(P, traj[-1], cfg.tau):.2e}" if reg else "-"])
            if g == "weighted_rps":
                eq = (regularized_equilibrium(P, cfg.tau), "pi*_tau") if reg else (weighted_rps_equilibrium(),)
                simplex.append((f"{m}, eta = {cfg.eta:g}" + f", tau = {cfg.tau:g}" * reg
                                + f", T = {min(cfg.t, 3000)}", traj[:3000], *eq))
            if m in ("nash_md", "mmd"):  # the unregularised gap of the last iterate as tau shrinks, batched
                Ps = np.broadcast_to(P, (len(taus), *P.shape))
                gaps = duality_gap(Ps, trajectory(Ps, m, cfg.eta, cfg.t, pi1, tau=taus))  # (T, len(taus))
                for k, tau in enumerate(taus):
                    axes[2, j].loglog(t[s], np.maximum(gaps[s, k], 1e-16), ":" if m == "nash_md" else "-",
                                      color=f"C{k}", lw=1, label=f"{m}, tau={tau:g}")
            if m == "mmd":  # MPO: the magnet moved to the iterate every MAGNET_EVERY steps removes the tau floor
                gap = duality_gap(P, trajectory(P, m, cfg.eta, cfg.t, pi1, tau=cfg.tau, magnet_every=MAGNET_EVERY))
                axes[2, j].loglog(t[s], np.maximum(gap[s], 1e-16), "k-", lw=1.5,
                                  label=f"mmd, tau={cfg.tau:g}, magnet every {MAGNET_EVERY} (MPO)")
        for ax, what in zip(axes[:, j], ("last iterate pi_t", "average pi_bar_t",
                                         "nash_md / mmd / MPO: unregularised gap")):
            ax.set(title=f"{g}: {what}", xlabel=f"t (eta = {cfg.eta:g})", ylabel="duality gap", ylim=(1e-16, 3))
    for ax in axes[[0, 2], -1]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.subplots_adjust(hspace=0.3)
    fig.savefig(os.path.join(cfg.out, "dynamics_last_iterate.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"Hedge's neighbours: gap of the last iterate and of the average (eta = {cfg.eta:g}, T = {cfg.t}); "
          f"regularised gap of the last iterate for nash_md and mmd (tau = {cfg.tau:g}, mu uniform). One run per "
          f"cell, the figures' run, not a comparison: over seeds at tuned steps, --table")
    print_table(["method", "game", "eta", "T", "last-iterate gap", "average gap", "regularised gap"], rows)
    plot_simplex(simplex, os.path.join(cfg.out, "dynamics_simplex.png"), cols=4)
    print(f"wrote dynamics_last_iterate.png, dynamics_simplex.png to {cfg.out}/")
    return 0


def _e(mean, half):
    """'2.50e-01 ± 1.2e-02': experiments.fmt in powers of ten, since the gaps here span 1 to 1e-17."""
    return f"{mean:.2e}" + ("" if math.isnan(half) else f" ± {half:.1e}")


def table(cfg):
    """The seeded, tuned table (experiments.py's protocol 1) on each of TABLE_GAMES: every method's eta chosen over
    cfg.grid (STEPLESS methods: its first step only) on tuning seeds 0..cfg.tuning_seeds-1 by experiments.RULE on
    gap_last, the last-iterate gap at T (this file's question), then each method at its chosen eta on seeds
    100..100+cfg.seeds-1. Prints per game the mean ± 95% t-interval at T of the last-iterate and average gaps (and
    the regularised gap of nash_md and mmd); writes them to cfg.out/last_iterate_table.json."""
    cli.check(cfg)
    tuning, fresh = list(range(cfg.tuning_seeds)), list(range(100, 100 + cfg.seeds))
    grids = {m: cfg.grid[:1] if m in STEPLESS else cfg.grid for m in METHODS}
    summary = {"level": experiments.LEVEL, "interval": "Student t, mean +- t_{0.975,N-1} s/sqrt(N) over seeds",
               "rule": f"{experiments.RULE}; selection metric: gap_last, the duality gap of pi_T", "T": cfg.t,
               "tau": cfg.tau, "mu": "uniform", "grid": cfg.grid, "stepless": list(STEPLESS), "tuning_seeds": tuning,
               "report_seeds": fresh, "start": "pi_1 ~ Dirichlet(1, ..., 1) from np.random.default_rng([1, seed])",
               "games": {}}
    print(f"Hedge's neighbours over seeds: gap at T = {cfg.t} of the last iterate and of the average, mean ± 95% "
          f"t-interval over {cfg.seeds} fresh seeds (pi_1 ~ Dirichlet(1, ..., 1); random_10 drawn per seed); eta "
          f"chosen over {cfg.grid} on {cfg.tuning_seeds} tuning seeds by: {summary['rule']}. nash_md, mmd: tau = "
          f"{cfg.tau:g}, mu uniform; '-': the method ignores eta")
    for game in TABLE_GAMES:
        result = experiments.tune("last_iterate:selfplay_world", list(METHODS), grids, tuning, fresh,
                                  Path(cfg.records) / game, {"game": game, "T": cfg.t, "tau": cfg.tau},
                                  metric="gap_last", jobs=cfg.jobs or None)
        rows, final = [], {}
        for m, step in result["chosen"].items():
            at_T = [r[-1] for sp, r in result["records"].items() if sp.method == m]   # one record per seed
            final[m] = {k: list(experiments.interval([r[k] for r in at_T]))
                        for k in ("gap_last", "gap_avg", *(("reg_gap_last",) if m in REGULARISED else ()))}
            rows.append([m, "-" if m in STEPLESS else f"{step:g}", *(_e(*final[m][k][:2]) for k in ("gap_last",
                         "gap_avg")), _e(*final[m]["reg_gap_last"][:2]) if m in REGULARISED else "-"])
        summary["games"][game] = {"chosen": result["chosen"], "final": final,
                                  "tuning": {f"{m} step {s:g}": list(v) for (m, s), v in result["tuning"].items()}}
        print(f"\n{game}:")
        print_table(["method", "eta", "last-iterate gap", "average gap", "regularised gap (last)"], rows)
    path = Path(cfg.out) / "last_iterate_table.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} (records under {cfg.records}/)")
    return 0


def main(argv=None):
    """`python last_iterate.py [flags]`: cli.main (a bad flag or setting: one line, exit 2, before any work); the
    figures' single run, or with --table the seeded comparison."""
    return cli.main("last_iterate.py", Config, timed(lambda cfg: table(cfg) if cfg.table else report(cfg)), argv,
                    __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
