"""bench/bench.py (`python -m bench.bench`) runs end to end at small sizes and prints one table row per measurement
(numbers are not asserted: speed targets are measured by the benchmark, not by timed tests), with the batched paths
agreeing with the one-at-a-time paths they are compared against. The peers' rows (TRL, llm-blender) need their own
environments and run in `make bench`, not here: here, the length mix they train on, and bench.py's answer when no
peer is given."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import bench, workloads
import conftest

ROOT = Path(__file__).resolve().parents[1]


def test_length_mix_is_the_stated_long_tailed_mix():
    mix = workloads.length_mix(400, seed=0)
    assert mix == workloads.length_mix(400, seed=0) and mix != workloads.length_mix(400, seed=1)   # seeded
    assert workloads.length_mix(5, seed=0) == mix[:5]                                # a prefix of a longer mix
    p = np.array([len(r["prompt"]) for r in mix])
    w, ll = (np.array([len(r[k]) for r in mix]) for k in ("winner", "loser"))
    assert p.min() == 20 and p.max() == 600                  # clipped to the stated bounds, and both bounds reached
    assert min(w.min(), ll.min()) >= 20 and max(w.max(), ll.max()) == 1500
    assert 80 <= np.median(p) <= 125 and 250 <= np.median(np.r_[w, ll]) <= 360           # medians 100 and 300
    assert (np.r_[w, ll] > 1000).mean() > 0.03                                           # a long tail, not a band
    assert abs(np.corrcoef(np.log(w), np.log(ll))[0, 1]) < 0.15                          # drawn independently
    ids = np.concatenate([r[k] for r in mix for k in ("prompt", "winner", "loser")])
    assert ids.min() == 3 and ids.max() == 15                        # the tiny vocabulary, specials 0-2 never drawn


def test_bench_without_peers_says_how_to_get_them(capsys):
    assert bench.main(["--only", "peers"]) == 0                     # no peer interpreter: no peer row, and the way
    out = capsys.readouterr()
    assert "| what |" in out.out and "make bench" in out.out and "--trl-python" in out.out
    assert "SPPO sppo_hard" not in out.out
    assert bench.main(["--only", "peers", "--trl-python", "/nonexistent/python"]) == 2    # refused before any work
    err = capsys.readouterr().err.strip()
    assert "--trl-python /nonexistent/python" in err and "make bench" in err and "\n" not in err


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_quick():
    r = conftest.run([sys.executable, "-m", "bench.bench", "--quick"], cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) == 8, r.stdout                   # our rows only: no peer interpreter given
    assert "make bench" in r.stdout                    # and how to get the peers' rows
    for line in rows[:3]:                              # Hedge and the two PairRM rows: same results on both paths
        diff = float(line.rstrip(" |").split("|")[-1])
        assert diff < 1e-5, line
    assert re.search(r"batched: [\d.]+ GFLOP/s = \d+% of the matmul limit", rows[3]), rows[3]   # PairRM's FLOP/s
    assert "rows that differ: 0 of 4" in rows[4], rows[4]      # generation: the same tokens on both paths
    for line in rows[:6]:
        assert re.search(r"\d[\d,.]* \[[\d,.]+-[\d,.]+\] (run-steps|pairs|tokens|GFLOP)/s", line), line


def test_a_torchrun_launch_past_its_timeout_is_killed_with_its_children(tmp_path):
    """bench._torchrun runs the launch in its own process group: past the timeout the launcher AND the processes it
    started (the ranks) are killed, and the row fails with the command named."""
    import os
    import time
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, time, pathlib; c = subprocess.Popen(['sleep', '60']); "
              f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid)); time.sleep(60)")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="ran past 2 s; killed with its ranks"):
        bench._torchrun([sys.executable, "-c", script], timeout=2)
    assert time.perf_counter() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):                                   # the killed child is reaped by init; wait until it is gone
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the launcher's child {child} survived the timeout")
