"""experiments.py (the runner over seeds) and compare.py (the tuned comparisons), against independent references:
Student-t quantiles from a printed table, intervals and means recomputed by hand from the per-seed record files,
the tiny LM's one step against the exact tabular minimiser of the same loss on the same rows."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import compare
import experiments
from experiments import ExperimentError, Spec

T_975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157, 29: 2.045230, 1000: 1.962339}
"""t_{0.975, df}, from a printed table (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2), not from our code."""


def counting_world(method, step, seed, iterations=3, calls=None):
    """A world whose records are known: gap_avg = step * seed / (t + 1); each call appends a line to `calls`."""
    if calls:
        with open(calls, "a") as f:
            f.write(f"{method} {step} {seed}\n")
    return [{"t": t, "gap_avg": step * seed / (t + 1), "gap_last": float(seed), "kl_step": None if t == 0 else 0.5}
            for t in range(iterations + 1)]


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_printed_table(df):
    assert experiments.t_quantile(0.975, df) == pytest.approx(T_975[df], abs=2e-6)


def test_interval_by_hand():
    mean, half, n = experiments.interval([1.0, 2.0, 3.0, 4.0, float("nan")])
    s = math.sqrt(((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3)
    assert (mean, n) == (2.5, 4) and half == pytest.approx(3.182446 * s / 2, rel=1e-6)
    assert experiments.interval([7.0])[:1] == (7.0,) and math.isnan(experiments.interval([7.0])[1])


def test_code_hash_follows_the_imports_of_the_world_module():
    import compare as c
    assert experiments.code_hash("compare:tabular_world") != experiments.code_hash("sppo_toy:tabular_selfplay")
    assert len(experiments.code_hash(c.WORLDS["lm"][0])) == 16


def test_records_are_written_reused_and_refused_when_made_otherwise(tmp_path):
    calls = tmp_path / "calls.txt"
    world = "test_experiments:counting_world"
    specs = [Spec(world, "m", 2.0, seed, {"iterations": 3, "calls": str(calls)}) for seed in (0, 1, 2)]
    got = experiments.run_all(specs, tmp_path / "out", jobs=1)
    assert [r["gap_avg"] for r in got[specs[2]]] == [4.0, 2.0, 4 / 3, 1.0]
    lines = specs[1].path(tmp_path / "out").read_text().splitlines()
    assert json.loads(lines[0])["manifest"]["seed"] == 1 and len(lines) == 5
    experiments.run_all(specs, tmp_path / "out", jobs=1)                        # all on disk: nothing reruns
    assert len(calls.read_text().splitlines()) == 3
    other = Spec(world, "m", 2.0, 0, {"iterations": 4, "calls": str(calls)})
    with pytest.raises(ExperimentError, match=r"step2_seed0.jsonl: made with iterations=3 \(now 4\); use another "):
        experiments.run_all([other], tmp_path / "out", jobs=1)
    made = json.loads(lines[0])
    made["manifest"]["code"] = "0" * 16                                       # as if another version had made it
    specs[1].path(tmp_path / "out").write_text(json.dumps(made) + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ExperimentError, match="step2_seed1.jsonl: made with other code"):
        experiments.run_all(specs, tmp_path / "out", jobs=1)
    specs[0].path(tmp_path / "out").write_text(lines[0] + "\n" + lines[1] + "\n{broken\n")
    with pytest.raises(ExperimentError, match="line 3: not JSON"):
        experiments.run_all(specs, tmp_path / "out", jobs=1)


def test_two_processes_give_the_records_of_one(tmp_path):
    specs = [Spec("test_experiments:counting_world", m, 1.0, seed) for m in ("a", "b") for seed in range(3)]
    one = experiments.run_all(specs, tmp_path / "one", jobs=1)
    two = experiments.run_all(specs, tmp_path / "two", jobs=2)
    assert one == two


def test_tune_chooses_by_the_stated_rule_on_tuning_seeds_and_reports_fresh_ones(tmp_path):
    world = "test_experiments:counting_world"
    r = experiments.tune(world, ["a"], [3.0, 1.0, 2.0], [1, 2], [5, 6, 7], tmp_path, jobs=1)
    assert r["chosen"] == {"a": 1.0}                     # gap_avg at T = step * seed / 4: the smallest step wins
    assert r["tuning"]["a", 2.0][0] == pytest.approx(2.0 * 1.5 / 4)
    assert sorted(sp.seed for sp in r["records"]) == [5, 6, 7]
    with pytest.raises(ExperimentError, match="overlap at \\[2\\]"):
        experiments.tune(world, ["a"], [1.0], [1, 2], [2, 3], tmp_path, jobs=1)


def test_per_nat_by_hand():
    rows = counting_world("m", 2.0, 3)                    # gap_avg 6, 3, 2, 1.5; KL 0.5 per step
    assert experiments.per_nat(rows) == pytest.approx((6 - 1.5) / 1.5)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`python compare.py --quick` (tabular): 2 tuning seeds, 3 report seeds, 3 iterations."""
    d = tmp_path_factory.mktemp("quick")
    assert compare.main(["--quick", "--out", str(d / "runs"), "--figures", str(d / "fig")]) == 0
    return d


@pytest.mark.slow
def test_reported_means_and_intervals_are_recomputed_from_the_record_files(quick):
    """The acceptance test: the numbers figures/compare_*.json report, recomputed here from the per-seed files
    alone, with the printed t quantile for 3 seeds."""
    for game in compare.TABULAR_GAMES:
        summary = json.loads((quick / "fig" / f"compare_tabular_{game}.json").read_text())
        assert (quick / "fig" / f"compare_tabular_{game}.png").stat().st_size > 10_000
        for method, step in summary["chosen"].items():
            folder = quick / "runs" / "tabular" / game / "tabular_world" / method
            files = [folder / f"step{step:g}_seed{seed}.jsonl" for seed in summary["report_seeds"]]
            assert summary["report_seeds"] == [100, 101, 102] and summary["tuning_seeds"] == [0, 1]
            assert [json.loads(f.read_text().splitlines()[0])["manifest"]["seed"] for f in files] == [100, 101, 102]
            for metric in ("gap_avg", "gap_last"):
                v = np.array([json.loads(f.read_text().splitlines()[-1])[metric] for f in files])
                mean, half, n = summary["final"][method][metric]
                assert n == 3 and mean == pytest.approx(v.mean(), abs=1e-12)
                assert half == pytest.approx(4.302653 * v.std(ddof=1) / math.sqrt(3), rel=1e-5, abs=1e-12)


@pytest.mark.slow
def test_tabular_records_are_the_exact_gaps_of_the_iterates(quick):
    """A record's gaps and KL, recomputed from the same run's iterates (tabular_selfplay, same seed) by hand."""
    P, pi1 = compare.TABULAR_GAMES["rps"][0](), compare.TABULAR_GAMES["rps"][1]
    f = next((quick / "runs" / "tabular" / "rps" / "tabular_world" / "ipo").glob("*seed100.jsonl"))
    step = json.loads(f.read_text().splitlines()[0])["manifest"]["step"]
    rows = [json.loads(line) for line in f.read_text().splitlines()[1:]]
    pis = compare.sppo_toy.tabular_selfplay(P, "ipo", step, 4, pi1=pi1, seed=100)
    for t, r in enumerate(rows):
        avg = pis[:t + 1].mean(0)
        assert r["gap_last"] == pytest.approx(2 * (P @ pis[t]).max() - 1, abs=1e-9)
        assert r["gap_avg"] == pytest.approx(2 * (P @ avg).max() - 1, abs=1e-9)
        if t:
            assert r["kl_step"] == pytest.approx(float((pis[t] * np.log(pis[t] / pis[t - 1])).sum()), abs=1e-9)


def test_compare_refuses_bad_settings_before_any_work(tmp_path, capsys):
    for argv, message in ((["--methods", "sppo", "nope"], "--methods"), (["--seeds", "1"], "an interval needs 2"),
                          (["--grid", "0"], "steps finite and > 0"), (["--world", "mars"], "invalid choice")):
        try:
            code = compare.main([*argv, "--out", str(tmp_path / "o")])
        except SystemExit as e:                                  # argparse's own errors (a choice)
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o").exists()


def test_a_record_file_made_otherwise_stops_the_cli_with_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    spec = Spec("compare:tabular_world", "sppo", 1.0, 100, {"iterations": 2, "game": "rps"})
    experiments._write(spec.path(out / "tabular" / "rps"), spec, [{"t": 0}, {"t": 1}, {"t": 2}])
    argv = ["--quick", "--methods", "sppo", "--grid", "1", "--out", str(out), "--figures", str(tmp_path / "f")]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("step1_seed100.jsonl: made with iterations=2 (now 3); use another --out, or delete the file to "
                        "rerun it") and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sppo", "ipo"])
def test_lm_step_is_the_exact_tabular_minimiser_of_its_loss(method):
    """One iteration of the tiny LM, fitted to --fit-tol: its pi_1 is within 0.02 (TV) of the exact tabular
    minimiser of the same loss on the same rows, it reached the same share of the target, and the fit ended below
    where it started."""
    rows = compare.lm_world(method, 2.0, 0, iterations=1, groups=20)
    r = rows[1]
    assert r["tv_exact"] < 0.02 and r["target_share"] == pytest.approx(r["target_share_exact"], abs=0.1)
    assert r["loss_last"] < r["loss_first"] and 5 <= r["train_steps"] < 200
    assert rows[0]["gap_avg"] == pytest.approx(np.mean([rows[0][k] for k in rows[0] if k.startswith("gap_avg/")]))


@pytest.mark.slow
def test_lm_pair_method_whose_policy_turned_pure_stays_frozen():
    """sppo_hard at eta 5, seed 1: by iteration 9 every prompt's K samples tie, so D_9 has no pair; sppo.run stops
    there with its one-line error and lm_world keeps pi_9 as pi_10 (marked frozen), as tabular self-play keeps pi_t
    when no group gives a pair."""
    rows = compare.lm_world("sppo_hard", 5.0, 1, iterations=10)
    frozen = [r["t"] for r in rows if r.get("frozen")]
    assert frozen and frozen == list(range(frozen[0], 11))
    t = frozen[0]
    assert rows[t]["kl_step"] == 0 and rows[t]["gap_last"] == rows[t - 1]["gap_last"] and "tv_exact" not in rows[t]


def test_rebound_by_hand():
    """max_t (g_t - min_{s <= t} g_s): 0 for a fall; the largest climb back above the best so far otherwise."""
    rows = lambda *g: [{"gap_last": x} for x in g]                                             # noqa: E731
    assert experiments.rebound(rows(0.6, 0.5, 0.3, 0.2)) == 0.0
    assert experiments.rebound(rows(0.6, 0.3, 0.5, 0.2, 0.45)) == pytest.approx(0.25)          # 0.45 - 0.2
    assert experiments.rebound(rows(0.5, 0.7, 0.1)) == pytest.approx(0.2)                      # the start counts
