"""bench.py runs end to end at small sizes and prints one table row per measurement (numbers are not asserted:
speed targets are measured by the benchmark, not by timed tests), with the batched paths agreeing with the
one-at-a-time paths they are compared against."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_quick():
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) == 6, r.stdout
    for line in rows[:2]:                              # Hedge and PairRM: same results on both paths
        diff = float(line.rstrip(" |").split("|")[-1])
        assert diff < 1e-5, line
    assert "rows that differ: 0 of 4" in rows[2], rows[2]      # generation: the same tokens on both paths
    for line in rows[:4]:
        assert re.search(r"\d[\d,]* \[[\d,]+-[\d,]+\] (run-steps|pairs|tokens)/s", line), line
