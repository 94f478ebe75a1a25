"""Exact Hedge on small preference games: the update SPPO approximates, checked against Theorem 4.1 and App. A.

SPPO (Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675) is a
least-squares approximation of one Hedge / multiplicative-weights step per iteration (Sec. 4.1):

    pi_{t+1}(y)  ∝  pi_t(y) · exp(eta · P(y > pi_t))                                     Eq. (4.1)

On a finite game this step can be run exactly, so this file checks the paper's two claims about it, and one gap:
  1. Thm 4.1 (proof in App. B): the mixture pi_bar_T = (1/T) sum_t pi_t has duality gap O(1/sqrt(T))
     for eta ~ 1/sqrt(T). We compare the gap with the explicit bound and show that the last iterate cycles.
  2. App. A: log Z of the K-sample empirical policy lies between eta/2 ("chaotic" preferences) and
     log((e^eta - 1)/eta) ("ordered" preferences); SPPO replaces it by eta/2 (Eq. (4.6)).
Hedge's last iterate cycles; the methods whose last iterate converges (OMWU, extragradient, Nash-MD, MMD) are in
last_iterate.py, which builds on this file.

Conventions. A game is a preference matrix P (n x n), P[i, j] = P(y_i > y_j), with P + P^T = 1 and diagonal 1/2;
every game here is built as P = (1 + A)/2 with A skew-symmetric. A policy is a probability vector pi (n,), and
P(y > pi) = (P pi)_y. eta is the Hedge step; the paper's beta is 1/eta, and its LLM runs use eta = 1000.
NumPy, float64 throughout; arrays may carry leading batch dimensions (..., n, n) / (..., n).

Run:  python hedge_toy.py [--out figures] [--t-max 100000] [--seed 0] [--trials 200]
It prints one table per claim, writes three PNGs into --out, and exits 1 if a Theorem 4.1 bound fails.
"""
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

import cli  # the one CLI convention: standard library and PyYAML only, so this file stays NumPy-only

# ----------------------------------------------------------------------------------------- validation


def validate_preference(P, atol=1e-6):
    """Return P as a float64 array (..., n, n), or raise ValueError naming the problem and the first bad entry.

    Checks, in order: square in its last two axes, finite, inside [0, 1], diagonal 1/2 (P(y > y) = 1/2), and
    P + P^T = 1 (P(y > y') + P(y' > y) = 1), the last two up to `atol`. Takes array-likes and torch tensors of real
    numbers; bool, complex, text and None are refused, not cast. This is THE validator of the repository (sppo.py uses
    it on its K x K matrices batched over prompts).
    """
    if hasattr(P, "detach"):  # a torch tensor
        P = P.detach().cpu().numpy()
    P = np.asarray(P)
    bad = None if P.dtype.kind in "iuf" else next((i for i, x in np.ndenumerate(P) if isinstance(x, (bool, np.bool_))
                                                  or not isinstance(x, numbers.Real)), None)
    if bad is not None:
        raise ValueError(f"preference entries must be real numbers (int or float; not bool, complex or text); "
                         f"P[{', '.join(map(str, bad))}] = {P[bad]!r} (dtype {P.dtype})")
    P = P.astype(np.float64)
    if P.ndim < 2 or P.shape[-1] != P.shape[-2] or P.shape[-1] == 0:
        raise ValueError(f"preference matrix must have shape (..., n, n) with n >= 1; got shape {P.shape}")

    def entry(bad, swap=False):  # "P[b, i, j]" for the first True of `bad`, or its mirror "P[b, j, i]"
        idx = [int(k) for k in np.argwhere(bad)[0]]
        if swap:
            idx[-2:] = idx[-1], idx[-2]
        return "P[" + ", ".join(map(str, idx)) + "]"

    bad = ~np.isfinite(P)
    if bad.any():
        raise ValueError(f"preference matrix has a non-finite entry: {entry(bad)} = {P[bad][0]:.6g}")
    bad = (P < 0) | (P > 1)
    if bad.any():
        raise ValueError(f"preference entries must lie in [0, 1]; {entry(bad)} = {P[bad][0]:.6g}")
    bad = np.eye(P.shape[-1], dtype=bool) & (np.abs(P - 0.5) > atol)  # (..., n, n), diagonal only
    if bad.any():
        raise ValueError(f"diagonal must be 1/2 (P(y > y) = 1/2, atol={atol:g}); {entry(bad)} = {P[bad][0]:.6g}")
    total = P + np.swapaxes(P, -1, -2)  # (..., n, n)
    bad = np.abs(total - 1) > atol
    if bad.any():
        raise ValueError(f"P + P^T must equal 1 (P(y > y') + P(y' > y) = 1, atol={atol:g}); "
                         f"{entry(bad)} + {entry(bad, swap=True)} = {total[bad][0]:.6g}")
    return P


def _validate_policy(pi, n=None, name="pi"):
    """Return pi (..., n) as float64, or raise ValueError: finite, >= 0, sums to 1 (to 1e-6), last axis n."""
    pi = np.asarray(pi, dtype=np.float64)
    if pi.ndim < 1 or (n is not None and pi.shape[-1] != n):
        raise ValueError(f"{name} must have shape (..., {n}) to match P; got shape {pi.shape}")
    if not np.isfinite(pi).all() or (pi < 0).any():
        raise ValueError(f"{name} must be finite and non-negative; got {pi}")
    if (np.abs(pi.sum(-1) - 1) > 1e-6).any():
        raise ValueError(f"{name} must sum to 1 over its last axis; got sums {pi.sum(-1)}")
    return pi


def _positive(name, value, batch, zero_ok=False):
    """value as floats broadcast to batch + (1,); a ValueError naming `name` unless every entry is finite and > 0
    (>= 0 if zero_ok)."""
    v = np.asarray(np.nan if isinstance(value, str) else value, dtype=float)
    if v.size == 0 or not np.isfinite(v).all() or (v < 0).any() or (not zero_ok and (v == 0).any()):
        raise ValueError(f"{name} must be finite and >{'=' * zero_ok} 0; got {name} = {value!r}")
    return np.broadcast_to(v, batch)[..., None]


def _check_eta_T(eta, T, batch, eta_zero_ok=False, T_per_run=False):
    """(eta (*batch, 1), T) for the run functions, or a ValueError naming the bad one: eta as _positive checks it, T an
    integer >= 1 (numpy integers too, bool not); an int, or for hedge_batch (T_per_run) an array broadcast to batch."""
    t = np.asarray(T)
    if t.dtype.kind not in "iu" or t.size == 0 or (t < 1).any() or (t.ndim and not T_per_run):
        raise ValueError(f"T must be an integer number of steps T >= 1{' per run' * T_per_run}; got T = {T!r}")
    return _positive("eta", eta, batch, eta_zero_ok), (np.broadcast_to(t, batch) if T_per_run else int(t))


def _logsumexp(a, axis=-1):
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))).squeeze(axis)


# ---------------------------------------------------------------------------------------------- games


def _game(A):
    """P = (1 + A)/2 from a skew-symmetric A in [-1, 1]: A[i, j] = P(y_i > y_j) - P(y_j > y_i)."""
    return validate_preference(0.5 * (1.0 + np.asarray(A, dtype=np.float64)))


def _skew(upper):
    """Skew-symmetric matrix (..., n, n) from the strict upper triangle of `upper`."""
    U = np.triu(upper, 1)
    return U - np.swapaxes(U, -1, -2)


def rock_paper_scissors():
    """Rock, paper, scissors (actions 0, 1, 2): the winner wins surely. Unique equilibrium: uniform."""
    return weighted_rps((1.0, 1.0, 1.0))


def weighted_rps(margins=(1.0, 0.5, 0.25)):
    """RPS with win margins of different sizes: paper beats rock, scissors paper, rock scissors by margins m0, m1, m2.

    A[1, 0] = m0, A[2, 1] = m1, A[0, 2] = m2 (so P(paper > rock) = (1 + m0)/2, ...). For m > 0 the unique
    equilibrium is the kernel of A: pi* ∝ (m1, m2, m0), interior and, for the default, (2/7, 1/7, 4/7).
    See weighted_rps_equilibrium. Note the twist: rock gets weight from the scissors-paper margin.
    """
    m0, m1, m2 = margins
    if min(margins) <= 0 or max(margins) > 1:
        raise ValueError(f"weighted_rps margins must lie in (0, 1]; got {margins}")
    A = np.array([[0.0, -m0, m2], [m0, 0.0, -m1], [-m2, m1, 0.0]])
    return _game(A)


def weighted_rps_equilibrium(margins=(1.0, 0.5, 0.25)):
    """The unique equilibrium of weighted_rps(margins): (m1, m2, m0) / (m0 + m1 + m2), since A pi* = 0."""
    m0, m1, m2 = margins
    return np.array([m1, m2, m0]) / (m0 + m1 + m2)


def random_game(n, seed=0):
    """P[i, j] ~ Uniform[0, 1] for i < j: generically intransitive, with a (generically unique) mixed equilibrium."""
    return _game(_skew(np.random.default_rng(seed).uniform(-1, 1, (n, n))))


def chaotic_game(n, seed=0):
    """App. A, chaotic case: for i < j, P(y_i > y_j) is 0 or 1 by a fair coin (a random tournament)."""
    return _game(_skew(np.random.default_rng(seed).choice([-1.0, 1.0], (n, n))))


def ordered_game(n, seed=0):
    """App. A, ordered case: a strict order (a random permutation) decides every pair; the top action is the winner."""
    r = np.random.default_rng(seed).permutation(n).astype(float)  # (n,) ranks
    return _game(np.sign(r[:, None] - r[None, :]))


def disc_game(n, seed=0):
    """Disc game (Balduzzi et al. 2019): points x_i uniform in the unit disc, A[i, j] = x_i^T [[0, 1], [-1, 0]] x_j.

    A has rank 2, so the equilibrium is typically NOT unique (a face of the simplex), unlike random_game.
    """
    rng = np.random.default_rng(seed)
    r, th = np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
    u, v = r * np.cos(th), r * np.sin(th)  # (n,), (n,)
    return _game(u[:, None] * v[None, :] - v[:, None] * u[None, :])


# The suite: name -> callable(seed=0) returning P. The CLI, the tests and the notebooks iterate this registry.
GAMES = {
    "rps": lambda seed=0: rock_paper_scissors(),
    "weighted_rps": lambda seed=0: weighted_rps(),
    "random_10": lambda seed=0: random_game(10, seed),
    "chaotic_10": lambda seed=0: chaotic_game(10, seed),
    "ordered_10": lambda seed=0: ordered_game(10, seed),
    "disc_10": lambda seed=0: disc_game(10, seed),
}

# ---------------------------------------------------------------------------------- Hedge, Eq. (4.1)-(4.3)


def _payoff(P, pi):
    """P(y > pi) = (P pi)_y for every response y: P (..., n, n), pi (..., n) -> (..., n)."""
    return (P @ pi[..., None])[..., 0]


def _normalise(a):
    """Log-softmax over the last axis, a - log sum_y exp(a_y); the max is subtracted first so exp stays in range."""
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def _log_step(P, log_pi, pi, eta):
    """Eq. (4.3): log pi_{t+1} = log pi_t + eta P(y > pi) - log Z, with the payoff taken at pi. No checks.

    Hedge takes pi = exp(log_pi); extragradient and Nash-MD take the payoff at another point. P (..., n, n),
    log_pi and pi (..., n), eta broadcastable to (..., 1). The hot loop of this file.
    """
    return _normalise(log_pi + eta * _payoff(P, pi))  # the normaliser is log Z, Eq. (4.2)


def log_partition(P, pi, eta):
    """Exact log Z_pi = log sum_y pi(y) exp(eta P(y > pi)), Eq. (4.2). eta broadcasts against P's batch axes."""
    P = validate_preference(P)
    pi = _validate_policy(pi, P.shape[-1])
    with np.errstate(divide="ignore"):
        return _logsumexp(np.log(pi) + np.asarray(eta, float)[..., None] * _payoff(P, pi))


def hedge_step(P, pi, eta):
    """One exact step of Eq. (4.1) from pi, computed in log space. Returns pi_{t+1} (..., n)."""
    P = validate_preference(P)
    pi = _validate_policy(pi, P.shape[-1])
    with np.errstate(divide="ignore"):
        return np.exp(_log_step(P, np.log(pi), pi, np.asarray(eta, float)[..., None]))


# One step (log pi_t, mem) -> (log pi_{t+1}, mem) and the one loop that drives it; last_iterate.py adds the
# other methods in the same form.
def _hedge(P, log_pi, pi, eta, tau, log_mu, mem):
    """Hedge, Eq. (4.1): log pi_{t+1} = log pi_t + eta P pi_t - log Z (Freund & Schapire 1999). AVERAGE gap
    O(1/sqrt T) (Thm 4.1). The last iterate: a step changes KL(pi* || pi_t) by log Z_t - eta <pi*, P pi_t>. For an
    INTERIOR pi* (P pi* = 1/2 everywhere: rps, weighted_rps) <pi*, P pi_t> = 1/2 <= log Z_t / eta (Jensen), so
    KL(pi* || pi_t) never decreases and the iterate cycles outwards (Bailey & Piliouras, EC 2018). For pi* on a face
    of the simplex it can fall: on ordered_10 (pi* its top action) from log 10 = 2.30 to 4.6e-5 in 245 steps at
    eta = 0.1, and the last iterate converges (tests/test_hedge_toy.py)."""
    return _log_step(P, log_pi, pi, eta), mem  # Eq. (4.3)


def _loop(step, P, eta, log_pi, tau=None, log_mu=None):
    """The one loop: yield pi_1, pi_2, ... of the method `step` (here _hedge; last_iterate.py's methods too)."""
    mem = None
    while True:
        pi = np.exp(log_pi)  # pi_t
        yield pi
        log_pi, mem = step(P, log_pi, pi, eta, tau, log_mu, mem)


def hedge_trajectory(P, eta, T, pi1=None):
    """The iterates pi_1 .. pi_T of Eq. (4.1): an array (T, ..., n) whose row t-1 is pi_t. pi1: uniform by default.
    eta >= 0: eta = 0 is the identity (pi_t = pi_1), allowed here as a reference; hedge and play need eta > 0."""
    P = validate_preference(P)
    n = P.shape[-1]
    eta, T = _check_eta_T(eta, T, P.shape[:-2], eta_zero_ok=True)
    pi1 = np.full(P.shape[:-1], 1.0 / n) if pi1 is None else _validate_policy(pi1, n, "pi1")
    with np.errstate(divide="ignore"):
        log_pi = np.broadcast_to(np.log(pi1), P.shape[:-1])  # (..., n)
    iterates = _loop(_hedge, P, eta, log_pi)
    return np.array([pi for _, pi in zip(range(T), iterates)]).reshape(T, *log_pi.shape)


def _average(iterates, T, n):
    """The one loop: run a generator of pi_t (R, n) for T[r] steps in row r. Returns (pi_bar, pi_last), each (R, n)."""
    total, pi_bar, pi_last = np.zeros((len(T), n)), np.empty((len(T), n)), np.empty((len(T), n))
    stops = {int(t): np.flatnonzero(T == t) for t in np.unique(T)}  # step -> rows that end there
    for t, pi in zip(range(1, int(T.max()) + 1), iterates):
        total += pi  # sum_{s <= t} pi_s
        if t in stops:
            rows = stops[t]
            pi_bar[rows], pi_last[rows] = total[rows] / t, pi[rows]
    return pi_bar, pi_last


def hedge_batch(P, eta, T, pi1=None):
    """R independent runs of Eq. (4.1) as one array computation. Returns (pi_bar, pi_last), each (R, n).

    P (R, n, n); eta and T scalars or (R,); pi1 (R, n), uniform by default. Row r runs T[r] steps:
    pi_bar[r] = (1/T[r]) sum_{t <= T[r]} pi_t (the mixture of Thm 4.1) and pi_last[r] = pi_{T[r]}.
    Log weights stay normalised (log pi_t <= 0), so eta*T of any size neither overflows nor underflows.
    Actions with pi1 = 0 keep zero mass forever, which lets games of different sizes share one padded array.
    """
    P = validate_preference(P)
    R, n = P.shape[0], P.shape[-1]
    eta, T = _check_eta_T(eta, T, (R,), T_per_run=True)  # (R, 1), (R,)
    pi1 = np.full((R, n), 1.0 / n) if pi1 is None else _validate_policy(pi1, n, "pi1")
    with np.errstate(divide="ignore"):
        log_pi = np.log(np.broadcast_to(pi1, (R, n)))  # log pi_1, (R, n)
    return _average(_loop(_hedge, P, eta, log_pi), T, n)


def hedge(P, eta, T, pi1=None):
    """Run Eq. (4.1) for T steps from pi1 (uniform by default). Returns (pi_bar, pi_last), pi_bar = (1/T) sum_t pi_t."""
    P = validate_preference(P)
    if P.ndim != 2:
        raise ValueError(f"hedge takes one game (n, n); got shape {P.shape} (use hedge_batch)")
    pi1 = None if pi1 is None else _validate_policy(pi1, P.shape[-1], "pi1")[None]
    pi_bar, pi_last = hedge_batch(P[None], eta, T, pi1)
    return pi_bar[0], pi_last[0]


# ------------------------------------------------------------------------------------ Thm 4.1, App. B


def duality_gap(P, pi):
    """Thm 4.1's gap max_pi' P(pi' > pi) - min_pi' P(pi' < pi) = 2 max_i (P pi)_i - 1 (pure responses suffice).

    It is >= 0, and 0 exactly when pi is a von Neumann winner (Eq. (3.3)). P (..., n, n), pi (..., n) -> (...).
    """
    P = validate_preference(P)
    pi = _validate_policy(pi, P.shape[-1])
    return 2.0 * (P @ pi[..., None])[..., 0].max(-1) - 1.0


def theorem_4_1_bound(eta, T, pi1):
    """Explicit Thm 4.1 bound on duality_gap(P, pi_bar_T) for Hedge run with step eta from pi1 (an int n = uniform).

    Derivation (App. B): Freund & Schapire (1999, Thm 1) with losses P(pi < mu) in [0, 1] and beta = e^-eta gives
        sum_t P(pi_t < mu_t) <= eta/(1 - e^-eta) sum_t P(pi < mu_t) + KL(pi || pi1)/(1 - e^-eta)   for every pi.
    Self-play (mu_t = pi_t) makes the left side T/2, and P(pi < .) is linear, so
        P(pi < pi_bar_T) >= (1 - e^-eta)/(2 eta) - KL(pi || pi1)/(eta T).
    gap = 1 - 2 min_pi P(pi < pi_bar_T), the minimum sits at a pure y with KL(delta_y || pi1) = log 1/pi1(y):
        gap <= 1 - (1 - e^-eta)/eta + 2 max_y log(1/pi1(y)) / (eta T)  ~  eta/2 + 2 log n/(eta T),
    smallest near eta = 2 sqrt(log n / T) (see tuned_eta), where it is about 2 sqrt(log n / T).
    """
    pi1 = np.full(pi1, 1.0 / pi1) if isinstance(pi1, (int, np.integer)) else _validate_policy(pi1, name="pi1")
    eta, T = np.asarray(eta, float), np.asarray(T, float)
    if (eta <= 0).any() or (T < 1).any():
        raise ValueError(f"theorem_4_1_bound needs eta > 0 and T >= 1; got eta={eta}, T={T}")
    with np.errstate(divide="ignore"):
        kl_max = np.max(-np.log(pi1), -1)  # max_y KL(delta_y || pi1) = max_y log 1/pi1(y)
    return 1.0 + np.expm1(-eta) / eta + 2.0 * kl_max / (eta * T)  # Thm 4.1, App. B


def tuned_eta(n, T):
    """The step that (nearly) minimises the bound for a uniform start: eta = 2 sqrt(log n / T)."""
    return 2.0 * np.sqrt(np.log(n) / np.asarray(T, float))


# --------------------------------------------------------------------------------------- App. A, log Z

KINDS = ("chaotic", "ordered")


def empirical_log_z(kind, K, eta, trials=200, seed=0):
    """Monte Carlo of log Z_K over the K-sample empirical policy (App. A). Returns (mean, standard_error).

    Each trial draws the K x K game among K distinct responses (kind "chaotic": fair coins; "ordered": a random
    strict order) and evaluates log Z_K = log (1/K) sum_i exp(eta P̂_i), P̂_i = (1/K) sum_j P(y_i > y_j) (Eq. (4.5),
    self-term 1/2 included), i.e. log_partition at the uniform policy over the K samples. eta may be an array: one draw of
    games serves every eta, and mean / standard_error then have eta's shape.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    rng, eta = np.random.default_rng(seed), np.asarray(eta, float)
    chunk = max(1, 2**20 // K**2)  # trials per array, to keep memory small
    log_z = []
    for start in range(0, trials, chunk):
        m = min(chunk, trials - start)
        if kind == "chaotic":  # App. A, chaotic case
            A = _skew(rng.choice([-1.0, 1.0], (m, K, K)))  # (m, K, K)
        else:  # App. A, ordered case
            x = rng.random((m, K))
            A = np.sign(x[:, :, None] - x[:, None, :])  # (m, K, K)
        log_z.append(log_partition(0.5 * (1 + A), np.full(K, 1.0 / K), eta[..., None]))  # (..., m)
    log_z = np.concatenate(log_z, -1)  # (..., trials)
    se = log_z.std(-1, ddof=1) / math.sqrt(trials) if trials > 1 else np.full(eta.shape, np.nan)
    return log_z.mean(-1), se


def log_z_limit(kind, eta):
    """K -> infinity limit of log Z_K (App. A): eta/2 (chaotic) and log((e^eta - 1)/eta) (ordered)."""
    eta = np.asarray(eta, float)
    if kind == "chaotic":
        return eta / 2
    if kind == "ordered":
        return eta + np.log(-np.expm1(-eta)) - np.log(eta)  # = log((e^eta - 1)/eta) without overflow
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


# ------------------------------------------------------------------------------------------- the CLI


T_MAX = 10**7
"""--t-max cap: the Thm 4.1 runs take one NumPy step per t over all (game, T) rows at once (~100 rows, ~60 us a step
on one core): 10^5 takes ~6 s, 10^7 ~10 min."""
TRIALS_MAX, K_MAX, APP_A_MAX = 10**5, 2000, 2 * 10**9
"""App. A caps: every (kind, K) draws --trials K x K games, in chunks of ~2^20 entries (K > 1024: one game, several
K x K float arrays, 32 MB each at K = 2000), so the Monte Carlo costs trials x sum(K^2) game entries per kind, at
7e6 (K ~ 1000) to 4e7 (K ~ 200) entries a second on one core: 2e9 is up to ~10 min for the two kinds."""


def _count(low, high=None):
    """An integer (numpy's too; not bool) in [low, high]."""
    return lambda x: (isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low
                      and (high is None or x <= high))


def _step(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _each(ok):
    """A non-empty list (or tuple) whose every entry passes ok."""
    return lambda xs: isinstance(xs, (list, tuple)) and len(xs) > 0 and all(map(ok, xs))


@dataclass
class Config:
    """Every knob of `python hedge_toy.py`; each field is a flag (--t-max, --ks 2 5 10, ...); RULES is checked
    (cli.check) before any work."""

    out: str = cli.arg("figures", help="folder for the three PNG figures (made if missing)", path="out_dir")
    t_max: int = cli.arg(100_000, help="largest horizon T of the Thm 4.1 runs (at most 10^7)")
    seed: int = cli.arg(0, help="seed of the random games and of the App. A Monte Carlo")
    trials: int = cli.arg(200, help="Monte Carlo trials per (kind, K) for App. A (at most 10^5)")
    etas: list[float] = cli.arg(default_factory=lambda: [1.0, 10.0, 1000.0],
                                help="App. A steps eta (1000: the paper's LLMs)")
    ks: list[int] = cli.arg(default_factory=lambda: [2, 3, 5, 10, 20, 50, 100, 200, 500],
                            help=f"App. A sample counts K (2 <= K <= {K_MAX})")

    RULES = (
        # field     the test                                            what it must be
        ("t_max",   lambda c: _count(1)(c.t_max),                       "an integer >= 1"),
        ("t_max",   lambda c: c.t_max <= T_MAX,                         "<= 10^7: the Thm 4.1 runs take one NumPy "
                                                                        "step per t over ~100 game rows (~60 us), "
                                                                        "so 10^7 is ~10 min"),
        ("seed",    lambda c: _count(0)(c.seed),                        "an integer >= 0 (a NumPy seed)"),
        ("trials",  lambda c: _count(1, TRIALS_MAX)(c.trials),          "an integer in [1, 10^5] (App. A draws "
                                                                        "--trials K x K games per kind and K)"),
        ("etas",    lambda c: _each(_step)(c.etas),                     "finite and > 0"),
        ("ks",      lambda c: _each(_count(2))(c.ks),                   "integers K >= 2"),
        ("ks",      lambda c: max(c.ks) <= K_MAX,                       f"each K <= {K_MAX}: a trial holds several "
                                                                        f"K x K float arrays (32 MB each at K = "
                                                                        f"{K_MAX})"),
        ("trials",  lambda c: c.trials * sum(int(k) ** 2 for k in c.ks) <= APP_A_MAX,
                                                                        "at most 2e9 / sum(K^2) over --ks: App. A "
                                                                        "costs trials x sum(K^2) game entries per "
                                                                        "kind, up to ~10 min at 2e9"),
    )


def timed(work):
    """work(cfg) -> exit code, printing `done in X s` after it (the NumPy files' CLIs)."""
    def run(cfg):
        start = time.perf_counter()
        code = work(cfg)
        print(f"done in {time.perf_counter() - start:.1f} s")
        return code
    return run


def run_gap_suite(games, horizons):
    """Thm 4.1 for every (game, T) with eta = tuned_eta(n, T), uniform start, one padded batch of rows.

    games: name -> P. Returns a list of dicts (game, n, T, eta, gap, bound, pi_bar) in (game, T) order.
    """
    names = [(g, T) for g in games for T in horizons]
    n_max = max(P.shape[0] for P in games.values())
    P_pad = np.full((len(names), n_max, n_max), 0.5)  # (R, n_max, n_max); padding actions start with mass 0
    pi1, eta, Ts = np.zeros((len(names), n_max)), np.empty(len(names)), np.empty(len(names), int)
    for r, (g, T) in enumerate(names):
        n = games[g].shape[0]
        P_pad[r, :n, :n], pi1[r, :n], eta[r], Ts[r] = games[g], 1.0 / n, tuned_eta(n, T), T
    pi_bar, _ = hedge_batch(P_pad, eta, Ts, pi1)
    rows = []
    for r, (g, T) in enumerate(names):
        n = games[g].shape[0]
        rows.append(dict(game=g, n=n, T=T, eta=eta[r], gap=float(duality_gap(games[g], pi_bar[r, :n])),
                         bound=float(theorem_4_1_bound(eta[r], T, n)), pi_bar=pi_bar[r, :n]))
    return rows


def print_table(header, rows):
    """Aligned columns; rows are lists of already formatted strings."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print()


def plot_gap(rows, path):
    """Figure (a): duality gap of pi_bar_T against T (log-log), with the Thm 4.1 bound and a 1/sqrt(T) guide."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for g in dict.fromkeys(r["game"] for r in rows):
        pts = np.array([(r["T"], r["gap"]) for r in rows if r["game"] == g and r["gap"] > 1e-9]).reshape(-1, 2)
        if len(pts):  # log axes cannot show a gap of 0
            ax.loglog(*pts.T, "o-", ms=3, label=g)
    if any(r["game"] == "rps" and r["gap"] <= 1e-9 for r in rows):
        ax.plot([], [], " ", label="rps: gap 0 (uniform start = equilibrium)")
    Ts = np.array(sorted({r["T"] for r in rows}), float)
    for n, style in zip(sorted({r["n"] for r in rows}), ("--", "-.", ":")):
        ax.loglog(Ts, theorem_4_1_bound(tuned_eta(n, Ts), Ts, n), "k" + style, lw=1, label=f"Thm 4.1 bound, n={n}")
    ax.loglog(Ts, 1 / np.sqrt(Ts), color="gray", lw=3, alpha=0.4, label="1/sqrt(T)")
    ax.set(xlabel="T (eta = 2 sqrt(log n / T))", ylabel="duality gap of pi_bar_T",
           title="Thm 4.1: the averaged Hedge iterate approaches the von Neumann winner")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_log_z(results, etas, path):
    """Figure (b): log Z_K / eta against K, chaotic (solid, ±2 s.e.) and ordered (dashed), limits as thin lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for c, eta in zip(("C0", "C1", "C2", "C3"), etas):
        for kind, style in zip(KINDS, ("o-", "s--")):
            K, mean, se = map(np.array, zip(*results[kind, eta]))
            ax.errorbar(K, mean / eta, 2 * se / eta, fmt=style, color=c, ms=3, label=f"{kind}, eta={eta:g}")
            ax.axhline(log_z_limit(kind, eta) / eta, color=c, lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(xlabel="K (samples per prompt)", ylabel="log Z_K / eta",
           title="App. A: log Z / eta between 1/2 (chaotic) and log((e^eta-1)/eta)/eta (ordered)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_simplex(runs, path, cols=None):
    """Figure (c): on 3-action games, the last iterate pi_t cycles outward while pi_bar_t converges to pi*.

    runs: (title, traj (T, 3), star) or (title, traj, star, star_label); `cols` panels per row (default: one row).
    """
    import matplotlib.pyplot as plt

    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])  # rock, paper, scissors
    cols = cols or len(runs)
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, (title, traj, eq, *star) in zip(axes.flat, runs):
        avg = np.cumsum(traj, 0) / np.arange(1, len(traj) + 1)[:, None]  # pi_bar_t, (T, 3)
        ax.fill(*corners.T, color="0.95", ec="k", lw=0.8)
        ax.plot(*(traj @ corners).T, lw=0.5, color="C3", label="last iterate pi_t")
        ax.plot(*(avg @ corners).T, lw=2, color="C0", label="average pi_bar_t")
        ax.plot(*(eq @ corners), "k*", ms=14, label=star[0] if star else "equilibrium pi*")
        for name, xy in zip(("rock", "paper", "scissors"), corners):
            ax.annotate(name, xy, xytext=(0, -12 if xy[1] == 0 else 5), textcoords="offset points", ha="center")
        ax.set(title=title, aspect="equal", xlim=(-0.1, 1.1), ylim=(-0.1, 0.95))
        ax.axis("off")
        ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def report(cfg):
    """The three claims' tables and figures (the CLI's work). cli.check(cfg) first: a bad setting raises
    cli.ConfigError (a ValueError) before anything is computed or written."""
    cli.check(cfg)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    os.makedirs(cfg.out, exist_ok=True)
    games = {name: make(cfg.seed) for name, make in GAMES.items()}
    decades = [10**k for k in range(2, 10) if 10**k <= cfg.t_max] or [cfg.t_max]
    grid = np.unique(np.r_[np.round(np.logspace(1, math.log10(max(cfg.t_max, 10)), 17)), decades]).astype(int)
    rows = run_gap_suite(games, [int(T) for T in grid if T <= cfg.t_max])
    print("Thm 4.1 (App. B): duality gap of pi_bar_T <= bound, eta = 2 sqrt(log n / T), pi_1 uniform")
    print_table(["game", "n", "T", "eta", "gap", "bound", "holds?"],
                [[r["game"], str(r["n"]), f"{r['T']:.0e}", f"{r['eta']:.4f}", f"{r['gap']:.3e}", f"{r['bound']:.3e}",
                  "yes" if r["gap"] <= r["bound"] else "NO"] for r in rows if r["T"] in decades])
    failed = [r for r in rows if r["gap"] > r["bound"]]

    eta_c, T_c = 0.1, 3000
    runs = [("rps", rock_paper_scissors(), np.array([0.6, 0.3, 0.1]), np.full(3, 1 / 3)),
            ("weighted_rps", weighted_rps(), np.full(3, 1 / 3), weighted_rps_equilibrium())]
    trajs = [hedge_trajectory(P, eta_c, T_c, pi1) for _, P, pi1, _ in runs]
    print(f"Last iterate vs average (fixed eta = {eta_c}, T = {T_c}): only the average converges")
    print_table(["game", "pi_1", "|pi_bar_T - pi*|_1", "|pi_T - pi*|_1", "pi*"],
                [[g, np.array2string(p1, precision=3), f"{np.abs(tr.mean(0) - eq).sum():.4f}",
                  f"{np.abs(tr[-1] - eq).sum():.4f}", np.array2string(eq, precision=3)]
                 for (g, _, p1, eq), tr in zip(runs, trajs)])

    results = {}
    for kind in KINDS:
        for K in cfg.ks:
            mean, se = empirical_log_z(kind, K, np.array(cfg.etas), cfg.trials, cfg.seed)
            for i, eta in enumerate(cfg.etas):
                results.setdefault((kind, eta), []).append((K, mean[i], se[i]))
    shown = [K for K in cfg.ks if K in (2, 5, 20, 100, 500)] or cfg.ks  # a subset of the K run, or all of them
    print(f"App. A: log Z_K / eta of the K-sample empirical policy ({cfg.trials} trials) and its K -> inf limit")
    print_table(["kind", "eta", "K", "log Z/eta", "s.e./eta", "limit/eta"],
                [[kind, f"{eta:g}", str(K), f"{m / eta:.4f}", f"{s / eta:.4f}", f"{log_z_limit(kind, eta) / eta:.4f}"]
                 for (kind, eta), res in results.items() for K, m, s in res if K in shown])

    plot_gap(rows, os.path.join(cfg.out, "hedge_gap.png"))
    plot_log_z(results, cfg.etas, os.path.join(cfg.out, "hedge_log_z.png"))
    plot_simplex([(f"{g}, pi_1 = {np.round(p1, 2)}, eta = {eta_c}, T = {T_c}", tr, eq)
                  for (g, _, p1, eq), tr in zip(runs, trajs)], os.path.join(cfg.out, "hedge_simplex.png"))
    print(f"wrote hedge_gap.png, hedge_log_z.png, hedge_simplex.png to {cfg.out}/")
    for r in failed:
        print(f"BOUND FAILED: {r['game']} T={r['T']} gap={r['gap']:.3e} > bound={r['bound']:.3e}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    """`python hedge_toy.py [flags]`: cli.main (a bad flag or setting: one line, exit 2, before any work)."""
    return cli.main("hedge_toy.py", Config, timed(report), argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
