"""SPPO against iterative DPO, IPO, sppo_hard and KTO where exploitability is exact: over seeds, at tuned steps.

Two worlds, one protocol (experiments.py). In **tabular self-play** (`tabular_world`) each method is Algorithm 1 on a
softmax table fitted exactly each iteration (sppo_toy.tabular_selfplay); in the **tiny LM** (`lm_world`) it is
sppo.run itself on sppo_toy.py's 16-token Llama and two preference games, each iteration fitted until its loss stops
falling (--fit-tol, --epochs the cap). Every method's step eta (beta = 1/eta for DPO, IPO, KTO) is chosen on tuning
seeds over --grid by experiments.RULE on the gap of the average at the last iteration, then reported on fresh seeds
as mean ± the 95% Student-t interval. Per (seed, iteration) each world records:

    gap_avg, gap_last   exact duality gap (hedge_toy.duality_gap) of the average pi-bar_t and of the last iterate pi_t
    kl_step             KL(pi_t || pi_{t-1}), the step actually taken (protocol 2 reads the gap against its running sum)
    target_share        how much of its loss's target the fit reached (losses.target_share; NaN for DPO and KTO): the
                        slope over D_t's rows, so the noise of P-hat lowers it even for an exact fit
    target_share_exact  (LM) the same for the exact tabular minimiser on the same rows: the reachable share
    tv_hedge            TV(pi_t, Hedge step from pi_{t-1} at eta' = eta (K-1)/K), the step SPPO aims at (Eq. 4.1)
    tv_exact            (LM) TV(pi_t, the exact tabular minimiser of the same loss on the same rows from pi_{t-1})
    frozen              (LM) true from the iteration where every prompt's K samples tied (no pair left to train on)

    python compare.py                         # tabular: rps, weighted rps, a random 5-response game (~1 min)
    python compare.py --world lm              # the tiny LM (~10 min on 2 cores)
    python compare.py --world demo            # `make demo` over 10 seeds at its own eta = 3 (~10 min on 2 cores)
    python compare.py --quick                 # 2 + 3 seeds, 2 steps, few iterations: the suite's smoke run

Runs resume: each (method, step, seed) is one record file under --out, reused when its manifest matches.
"""
import contextlib
import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

import cli
import experiments
import hedge_toy
import losses
import runs
import sppo
import sppo_toy

METHODS = {"sppo": ("sppo", "all"), "sppo@pair": ("sppo", "pair"), "sppo_hard": ("sppo_hard", "pair"),
           "dpo": ("dpo", "pair"), "ipo": ("ipo", "pair"), "kto": ("kto", "pair"),
           "optimistic": ("optimistic", "all"), "extragradient": ("extragradient", "all"),
           "mirror_prox": ("mirror_prox", "all"), "nash_md": ("nash_md", "all"), "mmd": ("mmd", "all"),
           "mpo": ("mmd", "all"), "inpo": ("inpo", "pair"), "dno": ("dno", "pair")}
"""Method name -> (--loss, --selection); METHOD_SETTINGS adds other settings. 'sppo' is Eq. (4.7) on all K samples (Eq.
4.4); 'sppo@pair' the same loss on each prompt's winner and loser only, with their row win rates (the authors'
released form); sppo_hard, dpo, ipo, kto are Sec. 4.5's losses on the same pair, beta = 1/eta. The rest are SPPO's
successors (losses.py) at KL weight TAU towards mu = pi_0; 'mpo' is mmd whose magnet moves to the current policy
every 5 iterations (MPO, arXiv 2410.16714)."""

METHOD_SETTINGS = {"mpo": {"magnet_every": 5}}
"""Settings a method adds to its loss's (method_settings): mpo is mmd with a magnet that moves."""

SUITES = {"peers": ("sppo", "sppo@pair", "sppo_hard", "dpo", "ipo", "kto"),
          "successors": ("sppo", "optimistic", "extragradient", "mirror_prox", "nash_md", "mmd", "mpo", "inpo", "dno")}
"""--suite: the methods compared by default, and the question. 'peers': SPPO against iterative DPO/IPO (the paper's
baselines), steps chosen on the gap of the average. 'successors': SPPO against the methods built for a converging
last iterate, steps chosen on the gap of the LAST iterate (SUITE_METRIC)."""

SUITE_METRIC = {"peers": "gap_avg", "successors": "gap_last"}

TAU = 0.1
"""The KL weight of the regularised successors (nash_md, mmd, mpo, mirror_prox, inpo), fixed, not tuned: their fixed
point is the tau-regularised equilibrium pulled towards mu = pi_0, whose gap on weighted RPS is 0.153 (0.078 with mu
uniform: last_iterate.py), a floor that only mpo's moving magnet removes."""


def method_settings(method):
    """(--loss, --selection, {other settings}) of a METHODS entry; the regularised ones get tau = TAU."""
    (loss, selection), extra = METHODS[method], dict(METHOD_SETTINGS.get(method, {}))
    if "tau" in losses.LOSSES[loss].settings:
        extra.setdefault("tau", TAU)
    return loss, selection, extra

TABULAR_GAMES = {"rps": (hedge_toy.rock_paper_scissors, [0.1, 0.2, 0.7]),
                 "weighted_rps": (hedge_toy.weighted_rps, [0.7, 0.2, 0.1]),
                 "random5": (lambda: hedge_toy.random_game(5, seed=2), [0.6, 0.1, 0.1, 0.1, 0.1])}
"""The tabular games and their pi_1, each far from the equilibrium (gap 0.50, 0.65, 0.44): from notebook 06's
earlier starts, weighted RPS (0.1, 0.2, 0.7) and random5 uniform, the gap was already 0.075 and 0.089, which left
the step sizes little to show. random5's equilibrium is fully mixed."""


def _kl(p, q):
    """KL(p || q) in nats over the last axis (0 log 0 = 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum())


def _tv(p, q):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def trajectory_records(P, pis, eta, K):
    """Records t = 0..T of one trajectory pi_0..pi_T (T+1, n) on game P: the two gaps, kl_step and tv_hedge."""
    last, avg = sppo_toy.selfplay_gaps(P, pis)
    step = sppo_toy.effective_eta(eta, K)
    return [{"t": t, "gap_last": float(last[t]), "gap_avg": float(avg[t]),
             "kl_step": _kl(pis[t], pis[t - 1]) if t else None,
             "tv_hedge": _tv(pis[t], hedge_toy.hedge_step(P, pis[t - 1], step)) if t else None}
            for t in range(len(pis))]


def tabular_world(method, step, seed, game="rps", iterations=20, K=5, groups=64):
    """One run of `method` at eta = step in tabular self-play on TABULAR_GAMES[game] (sppo_toy.tabular_selfplay).
    Returns records t = 0..iterations (see the module docstring)."""
    make, pi1 = TABULAR_GAMES[game]
    P, (loss, selection, extra), shares = make(), method_settings(method), []
    pis = sppo_toy.tabular_selfplay(P, loss, step, iterations + 1, K, groups, pi1, seed, selection=selection,
                                    record=shares, **extra)
    records = trajectory_records(P, pis, step, K)
    for t in range(1, len(records)):
        records[t]["target_share"] = shares[t - 1]["target_share"]
    return records


def lm_world(method, step, seed, iterations=10, groups=40, K=5, epochs=200, fit_tol=1e-3, lr=3e-3):
    """One run of `method` at eta = step through sppo.run on the tiny LM (sppo_toy's games and GameOracle), from
    pi_0 = a tiny Llama of this seed warm-started to sppo_toy.DEMO_START, each iteration fitted to --fit-tol
    (training.train_policy; epochs the cap); an epoch is one full-batch AdamW step at a constant lr (no warm-up, no
    decay), so the loss it judges is exact. Unpacked batches: the same log-probs as --pack, 2.5x faster on CPU at
    these 2-4 token responses. Records t = 0..iterations: the gaps and steps averaged over the two games (and per
    game: `gap_avg/<prompt>`, `gap_last/<prompt>`), plus the fit's quality per iteration (_lm_fit_quality). The
    run's own directory is temporary: the records are the experiment."""
    loss, selection, extra = method_settings(method)
    games, oracle = sppo_toy.demo_games(), sppo_toy.GameOracle(sppo_toy.demo_games())
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="compare_lm_") as d, contextlib.redirect_stdout(io.StringIO()):
        cfg = sppo_toy.check_demo(sppo_toy.DemoConfig(
            out=d, figure=str(Path(d) / "gap.png"), iterations=iterations, groups=groups, K=K, eta=step, loss=loss,
            selection=selection, epochs=epochs, fit_tol=fit_tol, lr=lr, warmup_ratio=0.0, schedule_epochs=10 ** 9,
            global_batch=2 * groups * K, micro_batch=2 * groups * K, pack=False, seed=seed, progress=False, **extra))
        cfg = sppo_toy.demo_start(cfg, games)
        done = _run_until_frozen(cfg, oracle, iterations)
        dirs = [Path(cfg.model)] + [Path(d) / f"iter{t}" / "model" for t in range(done)]
        dirs += [dirs[-1]] * (iterations - done)                       # frozen: pi_{t+1} = pi_t from then on
        pis = {x: [] for x in games}
        for m in dirs:
            model, tok = runs.load_policy(m, cfg, "cpu")
            for x, (_, ys) in games.items():
                pis[x].append(sppo_toy.exact_policy(model, tok, x, ys))
        per_game = {x: trajectory_records(oracle.extended(x), np.array(pis[x]), step, K) for x in games}
        records = [{k: (None if rs[0][k] is None else float(np.mean([r[k] for r in rs])))
                    for k in rs[0]} for rs in zip(*per_game.values())]
        for t, r in enumerate(records):
            r["t"] = t
            r.update({f"gap_avg/{x}": per_game[x][t]["gap_avg"] for x in games})
            r.update({f"gap_last/{x}": per_game[x][t]["gap_last"] for x in games})
        for t in range(done):
            records[t + 1].update(_lm_fit_quality(cfg, Path(d) / f"iter{t}", dirs[t + 1], games, pis, t))
        for t in range(done, iterations):
            records[t + 1]["frozen"] = True
    return records


def _run_until_frozen(cfg, oracle, iterations):
    """sppo.run; returns the iterations it trained. A pair method whose policy has become pure samples K equal
    responses for every prompt, so D_t has no (winner, loser) pair and sppo.run stops with that error: here the policy
    then stays as it is for the remaining iterations (what training on an empty D_t leaves), as in tabular
    self-play. Any other error is raised."""
    try:
        sppo.run(cfg, oracle=oracle)
        return iterations
    except cli.ArtifactError as e:
        t = next(t for t in range(iterations) if not (Path(cfg.out) / f"iter{t}" / "model").is_dir())
        if cfg.selection != "pair" or "keeps no (winner, loser) pair" not in str(e) or \
                not str(e).startswith(str(Path(cfg.out) / f"iter{t}")):
            raise
        return t


def _lm_fit_quality(cfg, it_dir, model_dir, games, pis, t):
    """Iteration t's fit: target_share of pi_{t+1} on D_t's rows, the epochs trained, and tv_exact: TV between the
    LM's pi_{t+1} and the exact tabular minimiser of the same loss on the same rows from pi_t (sppo_toy.fit_table over
    each game's responses plus 'malformed', one class; mean over the games)."""
    rows = runs.read_jsonl(it_dir / "dataset.jsonl")
    model, tok = runs.load_policy(model_dir, cfg, "cpu")
    ref = torch.tensor([r["ref_logp"] for r in rows], dtype=torch.float64)                 # log pi_t(y|x)
    logp = torch.tensor([r["ref_logp"] for r in sppo.reference_logps(model, tok, rows, cfg)],
                        dtype=torch.float64)                                               # log pi_{t+1}(y|x)
    cols = ("win_prob", "ref_logp", *sppo.LOSSES[cfg.loss].columns)
    batch = {c: torch.tensor([r[c] for r in rows], dtype=torch.float64) for c in cols}
    share = losses.target_share(cfg.loss, logp - ref, batch, cfg)
    xs = list(games)
    n = len(games[xs[0]][1]) + 1                                     # the responses and 'malformed'
    outcome = [xs.index(r["prompt"]) * n + (games[r["prompt"]][1].index(r["response"])
                                            if r["finished"] and r["response"] in games[r["prompt"]][1] else n - 1)
               for r in rows]
    log_pi = torch.tensor(np.log(np.maximum([pis[x][t] for x in xs], 1e-300)), dtype=torch.float64)
    theta = log_pi.clone().requires_grad_(True)
    idx = torch.tensor(outcome)
    sppo_toy.fit_table(theta, idx, dict(batch, ref_logp=log_pi.reshape(-1)[idx]), cfg)
    exact = torch.softmax(theta.detach(), -1).numpy()
    exact_ratio = torch.log_softmax(theta.detach(), -1).reshape(-1)[idx] - log_pi.reshape(-1)[idx]
    history = json.loads((it_dir / "metrics.json").read_text())["history"]
    return {"target_share": share, "target_share_exact": losses.target_share(cfg.loss, exact_ratio, batch, cfg),
            "tv_exact": float(np.mean([_tv(pis[x][t + 1], exact[i]) for i, x in enumerate(xs)])),
            "train_steps": len(history), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}


def demo_world(method, step, seed, iterations=20):
    """`make demo` (sppo_toy.demo: SPPO, its AdamW recipe, 12 epochs per iteration) at eta = step from this seed's
    pi_0. Records t = 0..iterations: per game the gap of the average (`gap_avg/<prompt>`), of exact averaged
    Hedge(eta') from the same pi_0 (`hedge_gap/<prompt>`) and the TV of the step to Hedge(eta') (`tv/<prompt>`);
    gap_avg, gap_last: their means over the two games. method must be 'sppo' (the demo's loss)."""
    if method != "sppo":
        raise ValueError(f"the demo trains --loss sppo; got {method!r}")
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="compare_demo_") as d, contextlib.redirect_stdout(io.StringIO()):
        metrics = sppo_toy.demo(sppo_toy.DemoConfig(out=d, figure=str(Path(d) / "gap.png"), iterations=iterations,
                                                    eta=step, seed=seed, progress=False))
    records = []
    for t in range(iterations + 1):
        r = {"t": t, "gap_avg": float(np.mean([m["gap"][t] for m in metrics.values()])),
             "gap_last": float(np.mean([m["last_gap"][t] for m in metrics.values()]))}
        for x, m in metrics.items():
            r.update({f"gap_avg/{x}": m["gap"][t], f"hedge_gap/{x}": m["hedge_gap"][t],
                      f"tv/{x}": m["tv"][t - 1] if t else None})
        records.append(r)
    return records


def demo_seeds(cfg):
    """`--world demo`: the demo over --seeds fresh seeds at its own eta = 3 (no tuning: the demo's setting is the
    question), per game the final gap of the average, of Hedge(eta') and the mean TV step, as mean ± 95% interval;
    written to figures/demo_seeds.json."""
    seeds = list(range(100, 100 + cfg.seeds))
    T = cfg.iterations or (3 if cfg.quick else 20)
    specs = [experiments.Spec("compare:demo_world", "sppo", 3.0, s, {"iterations": T}) for s in seeds]
    rec = experiments.run_all(specs, Path(cfg.out) / "demo", cfg.jobs or None, label="demo")
    out = {"seeds": seeds, "iterations": T, "eta": 3.0, "interval": "Student t, 95%, over seeds"}
    print(f"\nthe demo (SPPO, eta = 3, K = 5, T = {T}): mean ± 95% t-interval over {len(seeds)} seeds")
    for x in sppo_toy.demo_games():
        row = {k: experiments.interval([rows[-1][f"{k}/{x}"] for rows in rec.values()])
               for k in ("gap_avg", "hedge_gap")}
        row["start"] = experiments.interval([rows[0][f"gap_avg/{x}"] for rows in rec.values()])
        row["tv"] = experiments.interval([np.mean([r[f"tv/{x}"] for r in rows[1:]]) for rows in rec.values()])
        out[x] = {k: list(v) for k, v in row.items()}
        print(f"  '{x}': gap of the average {experiments.fmt(*row['start'][:2])} -> "
              f"{experiments.fmt(*row['gap_avg'][:2])}; averaged exact Hedge(eta') "
              f"{experiments.fmt(*row['hedge_gap'][:2])}; mean TV step to Hedge(eta') {experiments.fmt(*row['tv'][:2])}")
    Path(cfg.figures).mkdir(parents=True, exist_ok=True)
    (Path(cfg.figures) / "demo_seeds.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {Path(cfg.figures) / 'demo_seeds.json'}")
    return 0


# ------------------------------------------------------------------------------------------------ the CLI
WORLDS = {"tabular": ("compare:tabular_world", list(TABULAR_GAMES)), "lm": ("compare:lm_world", ["tiny_lm"]),
          "demo": ("compare:demo_world", ["demo"])}
"""--world -> (the world function, the games it is run on: one comparison each). 'demo' is `make demo` over seeds,
at its own step (demo_seeds)."""

COLUMNS = (("gap_avg", "gap of the average"), ("gap_last", "gap of the last iterate"),
           ("target_share", "share of the target reached (mean over iterations)"),
           ("target_share_exact", "share reached by the exact tabular update (LM)"),
           ("kl_step", "KL per step (mean over iterations)"), ("tv_hedge", "TV to the Hedge(eta') step (mean)"),
           ("tv_exact", "TV to the exact tabular update (mean)"))


@dataclass
class Config:
    """Every knob of `python compare.py`; each is a flag, checked (RULES) before any work."""
    world: str = cli.arg("tabular", choices=tuple(WORLDS), help="tabular self-play (3 games), the tiny LM (sppo.run), "
                                                                     "or the demo over seeds")
    suite: str = cli.arg("peers", choices=tuple(SUITES), help="SPPO against iterative DPO/IPO (peers, steps tuned "
                                                               "on the gap of the average) or against its successors "
                                                               "(steps tuned on the last iterate's gap)")
    methods: list[str] | None = cli.arg(None, help="methods compared (compare.METHODS; default: the suite's)")
    grid: list[float] | None = cli.arg(None, help="the steps eta tried on the tuning seeds (default: tabular "
                                                  "0.5 1 2 3 5 8, lm 1 2 3 5)")
    tuning_seeds: int = cli.arg(0, help="tuning seeds 0..N-1 (default: tabular 5, lm 3)")
    seeds: int = cli.arg(10, help="report seeds 100..100+N-1, fresh (never tuned on)")
    iterations: int = cli.arg(0, help="iterations T per run (default: tabular 20, lm 10)")
    quick: bool = cli.arg(False, help="the suite's smoke run: 2 tuning and 3 report seeds, grid 1 3, 3 iterations")
    jobs: int = cli.arg(0, help="processes at a time (0: the cores this process may use)")
    out: str = cli.arg("runs/compare", path="out_dir", help="record files (one per method, step and seed)")
    figures: str = cli.arg("figures", path="out_dir", help="where compare_<game>.png and .json go")

    RULES = (
        ("methods", lambda c: c.methods is None or (len(c.methods) >= 1 and set(c.methods) <= set(METHODS)),
         f"one or more of {', '.join(METHODS)}"),
        ("grid", lambda c: c.grid is None or (len(c.grid) >= 1 and all(math.isfinite(s) and s > 0 for s in c.grid)),
         "steps finite and > 0"),
        ("tuning_seeds", lambda c: 0 <= c.tuning_seeds <= 100, "in [1, 100] (0: the world's default)"),
        ("seeds", lambda c: 2 <= c.seeds <= 1000, "in [2, 1000]: an interval needs 2 seeds"),
        ("iterations", lambda c: 0 <= c.iterations <= 1000, "in [1, 1000] (0: the world's default)"),
        ("jobs", lambda c: c.jobs >= 0, ">= 0"),
    )


def settings(cfg):
    """(grid, tuning seeds, report seeds, iterations) after the world's defaults and --quick."""
    tab = cfg.world == "tabular"
    if cfg.quick:
        return cfg.grid or [1.0, 3.0], [0, 1], [100, 101, 102], cfg.iterations or 3
    return (cfg.grid or ([0.5, 1.0, 2.0, 3.0, 5.0, 8.0] if tab else [1.0, 2.0, 3.0, 5.0]),
            list(range(cfg.tuning_seeds or (5 if tab else 3))), list(range(100, 100 + cfg.seeds)),
            cfg.iterations or (20 if tab else 10))


def _mean_over_t(rows, metric):
    """The mean of `metric` over iterations 1..T of one run (NaN when it has none: DPO's target share)."""
    v = [r[metric] for r in rows[1:] if r.get(metric) is not None and not math.isnan(r[metric])]
    return float(np.mean(v)) if v else math.nan


def table(name, result, grid, metric="gap_avg"):
    """The printed table of one comparison: per method its chosen step (starred at an end of `grid`) and each COLUMN
    as mean ± 95% interval."""
    rec, n = result["records"], len({sp.seed for sp in result["records"]})
    print(f"\n{name}: mean ± 95% t-interval over {n} fresh seeds; step chosen on the tuning seeds by: "
          f"{experiments.RULE} (selection metric: {metric})")
    print(f"{'method':>13} {'step':>5} " + " ".join(f"{c:>16}" for c, _ in COLUMNS))
    out = {}
    for m, step in result["chosen"].items():
        mine = {sp: r for sp, r in rec.items() if sp.method == m}
        cells = {}
        for c, _ in COLUMNS:
            if c in ("gap_avg", "gap_last"):
                cells[c] = experiments.final(mine, c)[m, float(step)]
            else:                                         # per seed: the mean over iterations 1..T, then the interval
                cells[c] = experiments.interval([_mean_over_t(rows, c) for rows in mine.values()])
        edge = step in (min(grid), max(grid))
        out[m] = {"step": step, "at_grid_edge": edge, **{c: list(v) for c, v in cells.items()}}
        print(f"{m:>13} {step:>4g}{'*' if edge else ' '} " + " ".join(f"{experiments.fmt(v[0], v[1]):>16}"
                                                                      for v in cells.values()))
    print("* the chosen step is at an end of the grid: the method's best step may lie beyond it")
    return out


def compare(cfg):
    """Protocol 1 (tuned) on each game of the world, with protocol 2 (equal movement) read from the same runs:
    tables printed; figures/compare_<game>.png and figures/compare_<game>.json (what the docs quote) written."""
    cli.check(cfg)
    if cfg.world == "demo":
        return demo_seeds(cfg)
    world, games = WORLDS[cfg.world]
    grid, tuning, report, T = settings(cfg)
    methods, metric = cfg.methods or list(SUITES[cfg.suite]), SUITE_METRIC[cfg.suite]
    prefix = "" if cfg.suite == "peers" else f"{cfg.suite}_"
    for game in games:
        kw = {"iterations": T, **({"game": game} if cfg.world == "tabular" else {})}
        where = Path(cfg.out) / cfg.world / game                         # one record file per (method, step, seed)
        result = experiments.tune(world, methods, grid, tuning, report, where, kw, metric=metric,
                                  jobs=cfg.jobs or None)
        rows = table(f"{cfg.world}, {game}, T = {T}", result, grid, metric)
        summary = experiments.write_summary(where / f"{prefix}summary.json", result, ("gap_avg", "gap_last"))
        print("equal movement: fall of the gap of the average per nat of cumulative KL(pi_t || pi_{t-1}): " + ", ".join(
            f"{m} {experiments.fmt(*summary['per_nat'][m][:2])}" for m in result["chosen"]))
        print("rebound of the last iterate, max_t (gap_t - min_{s <= t} gap_s): " + ", ".join(
            f"{m} {experiments.fmt(*summary['rebound'][m][:2])}" for m in result["chosen"]))
        summary.update(world=cfg.world, game=game, iterations=T, grid=grid, tuning_seeds=tuning, report_seeds=report,
                       table=rows, suite=cfg.suite, tuned_on=metric)
        if cfg.suite == "successors":
            summary["tau"] = TAU
        stem = f"compare_{prefix}{cfg.world}_{game}" if cfg.world == "tabular" else f"compare_{prefix}lm"
        Path(cfg.figures).mkdir(parents=True, exist_ok=True)
        (Path(cfg.figures) / f"{stem}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        experiments.plot_tuned(result, Path(cfg.figures) / f"{stem}.png", f"{cfg.world}, {game}")
        print(f"wrote {Path(cfg.figures) / stem}.png and .json")
    return 0


def main(argv=None):
    """`python compare.py [flags]`: cli.main (a bad setting: one line, exit 2, before any work)."""
    return cli.main("compare.py", Config, compare, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
