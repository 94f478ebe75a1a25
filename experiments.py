"""Citable comparisons: a method over N seeds, one record per (seed, iteration), mean and a 95% interval.

A comparison here is a claim only with seeds and intervals. This file is the one runner every comparison goes through
(sppo_toy.py's tabular and tiny-LM comparisons, last_iterate.py's table, the notebooks):

- A **world** is a top-level function `world(method, step, seed, **settings) -> list[dict]`: one run of `method` at
  step `step` (eta; beta = 1/eta for the pair losses) from seed `seed`, one record per iteration t = 0..T with at
  least `t` and the metrics the world measures (`gap_avg`, `gap_last`, `kl_step`, ...).
- `run_all` runs a list of `Spec`s (world, method, step, seed, settings), up to `jobs` processes at a time, and keeps
  each run's records in OUT/<world>/<method>/step<step>_seed<seed>.jsonl, whose first line is its manifest (the spec
  and a hash of the code that made it). A file whose manifest matches is reused (an interrupted comparison resumes
  where it stopped); one whose manifest differs is refused, naming the file and the setting.
- `interval` is the statistics: mean +- t_{0.975, N-1} s / sqrt(N), the two-sided 95% Student-t interval of the mean
  over N seeds (s the sample standard deviation). `summarise` applies it per method, step and iteration.
- `tune` is protocol 1, **tuned**: each method's step is chosen on tuning seeds over a stated grid by a stated rule
  (`RULE`), then reported on fresh seeds. Protocol 2, **equal movement**, compares methods at the same distance
  travelled: the gap against cumulative KL(pi_{t+1} || pi_t) (`plot_tuned`'s right panel), and `per_nat`, the fall of
  the gap per nat moved.
- `plot_bands` draws each mean with its interval as a band.
- `lc_win_rate` (`lc_fit`) is AlpacaEval 2.0's length-controlled win rate of one model against a baseline, with its
  standard error over prompts (arena.py, sppo.py's --eval-prompts and real_run.py report it).

NumPy, the standard library and cli.py (matplotlib when plotting), so NumPy-only files (last_iterate.py) can use it.
"""
import ast
import atexit
import concurrent.futures
import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cli  # the user errors: standard library and PyYAML only

FORMAT = 1
"""Version of the record files' layout; a file of another version is refused."""

LEVEL = 0.95
"""Every interval is a two-sided 95% Student-t interval of the mean over the seeds."""

RULE = ("the step of the grid whose mean over the tuning seeds of the selection metric at the last iteration is "
        "lowest (ties: the smaller step)")
"""The tuned protocol's selection rule, as the docs and printed tables state it."""


class ExperimentError(cli.ArtifactError):
    """A record file that cannot be reused (another manifest, unreadable, incomplete), or seeds that overlap: a CLI
    prints it as one line and exits 2 (cli.main)."""


# ------------------------------------------------------------------------------------------------ statistics
@functools.cache
def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom (p in (0.5, 1), df >= 1), by bisection on its CDF.

    CDF(x) = 1/2 + integral_0^x f(u) du, f(u) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + u^2/df)^-((df+1)/2),
    integrated by Simpson's rule on 4001 points (error < 1e-9 for x <= 64; the 0.975-quantile is 12.71 at df = 1).
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1; got p = {p}, df = {df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x):
        u = np.linspace(0.0, x, 4001)
        f = c * (1 + u * u / df) ** (-(df + 1) / 2)
        return 0.5 + (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 64.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def interval(values):
    """(mean, half-width, n) of the 95% Student-t interval of the mean of `values` (NaNs dropped): the mean is in
    mean +- half-width with 95% confidence when the values are independent draws (one per seed). half-width is NaN
    for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, 0
    if len(v) == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), t_quantile((1 + LEVEL) / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)), len(v)


def fmt(mean, half, digits=3):
    """'0.143 ± 0.032' (the way every comparative number is printed)."""
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{mean:.{digits}f}"


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Spec:
    """One run: `world` (a module-level function, by "module:function" name), method, step, seed and the world's
    settings (JSON values). The record file's manifest is this, plus FORMAT."""
    world: str
    method: str
    step: float
    seed: int
    settings: dict = field(default_factory=dict, hash=False, compare=False)

    def manifest(self):
        return {"format": FORMAT, "world": self.world, "method": self.method, "step": float(self.step),
                "seed": int(self.seed), "settings": json.loads(json.dumps(self.settings, sort_keys=True)),
                "code": code_hash(self.world)}

    def path(self, out):
        return Path(out) / self.world.split(":")[-1] / self.method / f"step{self.step:g}_seed{self.seed}.jsonl"


@functools.cache
def code_hash(world):
    """sha256 (16 hex digits) of the code of the world's module and of every module of this repository it imports,
    transitively: each module's syntax tree without its docstrings (so a comment, a docstring or a line break does
    not count, any change to what runs does), read from the sources so every process gets the same hash. A record
    made by other code is not reused."""
    root = Path(__file__).resolve().parent
    todo, trees = [world.partition(":")[0]], {}
    while todo:
        name = todo.pop()
        if name in trees or not (root / f"{name}.py").is_file():
            continue
        trees[name] = tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module.split(".")[0])
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                    and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                    and isinstance(node.body[0].value.value, str):
                node.body[0] = ast.Pass()                                     # the docstring
    h = hashlib.sha256()
    for name in sorted(trees):
        h.update(name.encode() + b"\0" + ast.dump(trees[name]).encode())
    return h.hexdigest()[:16]


def resolve(world):
    """The function named "module:function"."""
    module, _, name = world.partition(":")
    __import__(module)
    return getattr(sys.modules[module], name)


def read_records(path, spec):
    """The records of `spec` from `path` if its manifest is spec's; None if the file does not exist. Raises
    ExperimentError naming the file, line and setting when it cannot be reused."""
    path = Path(path)
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        rows = [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise ExperimentError(f"{path}: line {e.doc and lines.index(e.doc) + 1}: not JSON ({e.msg}); delete the file "
                              f"to rerun that seed") from None
    want = spec.manifest()
    got = rows[0].get("manifest") if rows and isinstance(rows[0], dict) else None
    if got is None:
        raise ExperimentError(f"{path}: line 1 is not a manifest; delete the file to rerun that seed")
    for key in want:
        if got.get(key) != want[key]:
            if key == "code":
                what = "other code (a module of this repository changed since)"
            elif key == "settings":
                diff = sorted(k for k in set(got[key]) | set(want[key]) if got[key].get(k) != want[key].get(k))
                what = ", ".join(f"{k}={got[key].get(k)!r} (now {want[key].get(k)!r})" for k in diff)
            else:
                what = f"{key}={got.get(key)!r} (now {want[key]!r})"
            raise ExperimentError(f"{path}: made with {what}; use another --out, or delete the file to rerun it")
    records = rows[1:]
    if not records or any("t" not in r for r in records) or [r["t"] for r in records] != list(range(len(records))):
        raise ExperimentError(f"{path}: records are not t = 0, 1, ...; delete the file to rerun that seed")
    return records


def _write(path, spec, records):
    """The manifest, then one record per line; written to a temporary name and renamed, so a killed run leaves no
    partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in [{"manifest": spec.manifest()}, *records]:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _one(spec, out):
    """Run one spec in a worker process and write its file. Returns (spec, seconds)."""
    t0 = time.perf_counter()
    records = resolve(spec.world)(spec.method, spec.step, spec.seed, **spec.settings)
    records = [{"method": spec.method, "step": float(spec.step), "seed": int(spec.seed), **r} for r in records]
    _write(spec.path(out), spec, records)
    return spec, time.perf_counter() - t0


def default_jobs():
    """Worker processes: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_POOLS = {}


def _pool(jobs):
    """One process pool per size, kept for the life of this process (a worker imports the world's modules once)."""
    if jobs not in _POOLS:
        if not _POOLS:
            atexit.register(lambda: [p.shutdown(cancel_futures=True) for p in _POOLS.values()])
        _POOLS[jobs] = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    return _POOLS[jobs]


def run_all(specs, out, jobs=None, label="runs"):
    """Records of every spec: read back when a matching file exists, else run (up to `jobs` processes, 'spawn', so a
    world may use torch). Every existing file is checked before any run starts. A progress line per finished run.
    Returns {spec: records}."""
    specs = list(dict.fromkeys(specs))
    done = {s: read_records(s.path(out), s) for s in specs}
    todo = [s for s in specs if done[s] is None]
    if todo:
        jobs = max(1, min(jobs or default_jobs(), len(todo)))
        print(f"{label}: {len(specs) - len(todo)} of {len(specs)} runs on disk under {out}; running {len(todo)} "
              f"({jobs} at a time)", flush=True)
        t0 = time.perf_counter()
        if jobs == 1:
            finished = (_one(s, out) for s in todo)
        else:
            futures = [_pool(jobs).submit(_one, s, out) for s in todo]
            finished = (f.result() for f in concurrent.futures.as_completed(futures))
        try:
            for k, (s, secs) in enumerate(finished, 1):
                left = (time.perf_counter() - t0) / k * (len(todo) - k)
                print(f"  [{k}/{len(todo)}] {s.method} step {s.step:g} seed {s.seed}: {secs:.1f} s (~{left:.0f} s "
                      f"left)", flush=True)
        except BaseException:
            if jobs > 1:
                for f in futures:
                    f.cancel()
            raise
        done.update({s: read_records(s.path(out), s) for s in todo})
    return done


# ------------------------------------------------------------------------------------------------ aggregation
def lc_fit(p, len_model, len_base, tol=1e-10, max_iter=100):
    """The GLM of arXiv 2404.04475 (Sec. 3) for one model pair, without its instruction-difficulty term:

        logit P(model beats baseline | x_n) = theta + phi * tanh((len_model_n - len_base_n) / sd),

    sd = the sample standard deviation (ddof 1) of the N length differences, fitted by maximum likelihood with the
    per-prompt preference probabilities p_n in [0, 1] as soft labels: max sum_n p_n log s_n + (1 - p_n) log(1 - s_n),
    s_n = sigmoid(theta + phi z_n) (concave; Newton's method with step halving). The length-controlled win rate is
    the predicted win rate at equal lengths (z = 0): 100 sigmoid(theta).

    Its standard error is the sandwich (Huber-White) estimator, cov = N/(N-k) H^-1 B H^-1 with H = sum s(1-s) x x^T,
    B = sum (p - s)^2 x x^T, x_n = (1, z_n), k parameters, then the delta method, se = 100 s(1-s) sqrt(cov[0, 0]).
    Not the inverse Fisher information H^-1: that assumes Bernoulli labels, Var(p_n | x_n) = s_n(1 - s_n), and soft
    labels vary less (a mean of J judges' votes, or of S x S sample pairs), so H^-1 overstates the s.e. (by sqrt(3)
    for 3 independent votes); the sandwich holds for any label variance, and with equal lengths it equals the raw win
    rate's s.e., std(p, ddof=1) / sqrt(N), exactly (sppo.win_rate's).

    Equal lengths everywhere (sd = 0): the tanh term is 0, k = 1 and theta = logit(mean p), so the rate is
    100 mean(p). mean(p) of 0 or 1 (all lost or all won): the rate is 0 or 100 with s.e. 0 (theta is infinite).
    A length term that separates the labels (p_n = 1 for every longer answer and 0 for every shorter, say) has no
    finite fit: ValueError. Returns a dict: theta, phi, cov (k x k), sd, rate, se, raw (100 mean p), iterations."""
    p, lm, lb = (np.asarray(a, dtype=np.float64) for a in (p, len_model, len_base))
    for name, a in (("p", p), ("len_model", lm), ("len_base", lb)):
        if a.ndim != 1 or len(a) != len(p):
            raise ValueError(f"lc_win_rate: {name} must be 1-D with one entry per prompt ({len(p)} in p), "
                             f"got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"lc_win_rate: {name}[{int(np.flatnonzero(~np.isfinite(a))[0])}] is not finite")
    for name, a, bad, rule in (("p", p, (p < 0) | (p > 1), "in [0, 1]"), ("len_model", lm, lm < 0, ">= 0 (tokens)"),
                               ("len_base", lb, lb < 0, ">= 0 (tokens)")):
        if bad.any():
            n = int(np.flatnonzero(bad)[0])
            raise ValueError(f"lc_win_rate: {name}[{n}] = {a[n]:g} must be {rule}")
    N, d = len(p), lm - lb
    if N < 2:
        raise ValueError(f"lc_win_rate: needs at least 2 prompts for a standard error, got {N}")
    sd = float(d.std(ddof=1))
    X = np.stack([np.ones(N), np.tanh(d / sd)], 1) if sd > 0 else np.ones((N, 1))                 # (N, k)
    k, raw = X.shape[1], 100 * float(p.mean())
    if N <= k:
        raise ValueError(f"lc_win_rate: {N} prompts for 2 parameters (theta, phi): the sandwich s.e. needs more "
                         f"prompts than parameters")
    if p.mean() in (0.0, 1.0):
        return {"theta": math.copysign(math.inf, p.mean() - 0.5), "phi": 0.0, "cov": np.zeros((k, k)), "sd": sd,
                "rate": raw, "se": 0.0, "raw": raw, "iterations": 0}

    def loglik(b):
        eta = X @ b
        return float(np.sum(p * eta - np.logaddexp(0, eta)))      # p log s + (1 - p) log(1 - s), s = sigmoid(eta)

    b = np.zeros(k)
    b[0] = math.log(p.mean() / (1 - p.mean()))
    for it in range(1, max_iter + 1):
        s = 1 / (1 + np.exp(-(X @ b)))
        H = (X * (s * (1 - s))[:, None]).T @ X                                                     # (k, k)
        step = np.linalg.solve(H, X.T @ (p - s))                                                  # Newton
        t, ll = 1.0, loglik(b)
        while loglik(b + t * step) < ll - 1e-12 and t > 1e-8:
            t /= 2
        b = b + t * step
        if np.abs(t * step).max() < tol:
            break
        if np.abs(b).max() > 30:
            break
    if np.abs(b).max() > 30 or np.abs(t * step).max() >= tol:
        raise ValueError(f"lc_win_rate: no finite fit (theta, phi = {b.round(2).tolist()} after {it} Newton steps):"
                         f" the length term separates the preferences (e.g. p = 1 whenever the model is longer and "
                         f"0 whenever it is shorter), so the win rate at equal length is not identified")
    s = 1 / (1 + np.exp(-(X @ b)))
    Hinv = np.linalg.inv((X * (s * (1 - s))[:, None]).T @ X)
    B = (X * ((p - s) ** 2)[:, None]).T @ X
    cov = N / (N - k) * Hinv @ B @ Hinv                                                           # sandwich
    s0 = 1 / (1 + math.exp(-b[0]))
    return {"theta": float(b[0]), "phi": float(b[1]) if k == 2 else 0.0, "cov": cov, "sd": sd,
            "rate": 100 * s0, "se": 100 * s0 * (1 - s0) * math.sqrt(cov[0, 0]), "raw": raw, "iterations": it}


def lc_win_rate(p, len_model, len_base):
    """AlpacaEval 2.0's length-controlled win rate of a model against a baseline, in percent, with its standard
    error (lc_fit: the GLM of arXiv 2404.04475, Sec. 3, without the instruction term; sandwich s.e.). p[n] = P(model's
    answer beats the baseline's | x_n) in [0, 1]; len_model[n], len_base[n]: their lengths in tokens. Returns
    (rate, se)."""
    fit = lc_fit(p, len_model, len_base)
    return fit["rate"], fit["se"]


def summarise(records, metric):
    """{(method, step): {"t": [...], "mean": [...], "half": [...], "n": [...]}}: the 95% interval over seeds of
    `metric` at each iteration. records: {spec: [record, ...]} as run_all returns."""
    groups = {}
    for spec, rows in records.items():
        for r in rows:
            groups.setdefault((spec.method, float(spec.step)), {}).setdefault(r["t"], []).append(
                math.nan if r.get(metric) is None else r[metric])
    out = {}
    for key, by_t in sorted(groups.items()):
        ts = sorted(by_t)
        stats = [interval(by_t[t]) for t in ts]
        out[key] = {"t": ts, "mean": [m for m, _, _ in stats], "half": [h for _, h, _ in stats],
                    "n": [n for _, _, n in stats]}
    return out


def final(records, metric):
    """{(method, step): (mean, half, n)} of `metric` at each run's last iteration."""
    s = summarise(records, metric)
    return {k: (v["mean"][-1], v["half"][-1], v["n"][-1]) for k, v in s.items()}


def cumulative(rows, metric="kl_step"):
    """The running sum over t of `metric` (NaN at t = 0 counts as 0): cumulative KL(pi_{t+1} || pi_t)."""
    return np.cumsum([0.0 if r.get(metric) is None or math.isnan(r[metric]) else r[metric] for r in rows])


def per_nat(rows, metric="gap_avg", moved="kl_step"):
    """Protocol 2's number for one run: how far `metric` fell per nat of cumulative `moved` (KL(pi_t || pi_{t-1})
    summed over the run), (metric_0 - metric_T) / sum_t KL. NaN for a run that did not move."""
    total = cumulative(rows, moved)[-1]
    return (rows[0][metric] - rows[-1][metric]) / total if total > 0 else math.nan


def rebound(rows, metric="gap_last"):
    """How far `metric` climbs back after its best so far in one run: max_t (m_t - min_{s <= t} m_s); 0 for a run
    that never rises. A last iterate that cycles (Hedge's) shows a large rebound, one that converges a small one."""
    m = np.array([r[metric] for r in rows], dtype=np.float64)
    return float((m - np.minimum.accumulate(m)).max())


# ------------------------------------------------------------------------------------------------ protocol 1
def tune(world, methods, grid, tuning_seeds, report_seeds, out, settings=None, metric="gap_avg", jobs=None):
    """Protocol 1, tuned. Each method at every step of `grid` on `tuning_seeds`; its step is chosen by RULE on
    `metric`; then each method at its chosen step on `report_seeds` (which must not meet tuning_seeds).

    `grid` is one list for all methods or {method: list}. Returns {"chosen": {method: step}, "tuning": {(method,
    step): (mean, half, n)}, "records": {spec: records} of the report runs}."""
    if set(tuning_seeds) & set(report_seeds):
        raise ExperimentError(f"tuning and report seeds overlap at {sorted(set(tuning_seeds) & set(report_seeds))}: "
                              f"the reported numbers must come from fresh seeds")
    settings = settings or {}
    grids = grid if isinstance(grid, dict) else {m: grid for m in methods}
    specs = [Spec(world, m, s, seed, settings) for m in methods for s in grids[m] for seed in tuning_seeds]
    tuning = final(run_all(specs, out, jobs, label="tuning"), metric)
    chosen = {m: min(grids[m], key=lambda s: (tuning[m, float(s)][0], s)) for m in methods}
    specs = [Spec(world, m, chosen[m], seed, settings) for m in methods for seed in report_seeds]
    return {"chosen": chosen, "tuning": tuning, "records": run_all(specs, out, jobs, label="report")}


def write_summary(path, result, metrics):
    """The tuned result as JSON (what the docs quote): the chosen steps, the tuning table, and per method at its
    chosen step the last iteration's (mean, half-width, n) of each metric, of per_nat and of the last iterate's
    rebound, and each metric's (mean, half-width) at every iteration (by_iteration)."""
    rec = result["records"]
    summary = {"level": LEVEL, "interval": "Student t, mean +- t_{0.975,N-1} s/sqrt(N) over seeds", "rule": RULE,
               "chosen": result["chosen"],
               "tuning": {f"{m} step {s:g}": list(v) for (m, s), v in result["tuning"].items()},
               "final": {m: {k: list(final(rec, k)[m, float(s)]) for k in metrics}
                         for m, s in result["chosen"].items()},
               "per_nat": {m: list(interval([per_nat(r) for sp, r in rec.items() if sp.method == m]))
                           for m in result["chosen"]},
               "rebound": {m: list(interval([rebound(r) for sp, r in rec.items() if sp.method == m]))
                           for m in result["chosen"]},
               "by_iteration": {k: {m: {f: v[m, float(st)][f] for f in ("t", "mean", "half")}
                                    for m, st in result["chosen"].items()}
                                for k, v in ((k, summarise(rec, k)) for k in metrics)}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------ plots
def plot_bands(ax, x, mean, half, label, color, style="-"):
    """A mean curve and its interval as a shaded band."""
    x, mean, half = (np.asarray(v, dtype=np.float64) for v in (x, mean, half))
    ax.plot(x, mean, style, color=color, lw=1.5, label=label)
    ax.fill_between(x, mean - np.nan_to_num(half), mean + np.nan_to_num(half), color=color, alpha=0.2, lw=0)


def plot_tuned(result, path, title, metrics=(("gap_avg", "average"), ("gap_last", "last iterate"))):
    """Left panels: each metric against t, each method at its chosen step, mean and 95% band over the report seeds.
    Right panel: protocol 2, the gap of the average against cumulative KL(pi_{t+1} || pi_t) (means over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rec = result["records"]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 3.8))
    n = len({sp.seed for sp in rec})
    for i, (m, step) in enumerate(result["chosen"].items()):
        mine = {sp: r for sp, r in rec.items() if sp.method == m}
        for ax, (metric, what) in zip(axes, metrics):
            s = summarise(mine, metric)[m, float(step)]
            plot_bands(ax, s["t"], s["mean"], s["half"], f"{m} (step {step:g})", f"C{i}")
            ax.set(title=f"{title}: gap of the {what}", xlabel="iteration t", ylabel="duality gap (exact)")
        x = np.mean([cumulative(r) for r in mine.values()], 0)
        s = summarise(mine, "gap_avg")[m, float(step)]
        plot_bands(axes[-1], x, s["mean"], s["half"], m, f"C{i}")
    axes[-1].set(title="equal movement: gap of the average", xlabel="cumulative KL(pi_{t+1} || pi_t), mean over seeds",
                 ylabel="duality gap (exact)")
    for ax in axes:
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean and 95% t-interval over {n} seeds; each method at its tuned step", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
