"""Shared test setup: the repository root on sys.path, and one thread per process.

The tests run tiny models (hidden 32) on a 2-core machine, often with a subprocess or two torchrun ranks beside
the pytest process: several OpenMP thread pools spinning on 2 cores made a 5 s demo take 100 s. One thread each
is faster for models this small, and subprocesses inherit OMP_NUM_THREADS.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)
