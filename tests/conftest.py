"""Shared test setup: the repository root on sys.path, one thread per process, and `run`/`spawn`, the one way tests
start a process (a timeout that kills everything it started, torchrun's workers included).

The tests run tiny models (hidden 32) on a 2-core machine, often with a subprocess or two torchrun ranks beside
the pytest process: several OpenMP thread pools spinning on 2 cores made a 5 s demo take 100 s. One thread each
is faster for models this small, and subprocesses inherit OMP_NUM_THREADS.
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import runs  # noqa: E402

torch.set_num_threads(1)


# ---- starting processes: one helper, so that every test that starts one has a timeout and leaves nothing behind --
TAG = "SPPO_TEST_PROCESS"
"""Environment variable set (to a fresh token) in every process a test starts; children inherit it. torchrun starts
its workers in sessions of their own (os.killpg of the agent's group misses them) and a killed agent's workers are
re-parented (no longer its descendants), so the token is how a test finds all of them."""


def tagged(token):
    """Pids of the live processes whose environment carries TAG=token."""
    mark, found = f"{TAG}={token}".encode(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:                                   # gone meanwhile, or a zombie
                pass
    return found


def signal_quietly(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tagged(token):
    """SIGKILL every process carrying `token`: first SIGSTOP them until no new one appears (a stopped process cannot
    start another), then SIGKILL all. Returns the pids killed."""
    stopped = set()
    for _ in range(100):
        new = set(tagged(token)) - stopped
        if not new:
            break
        for pid in new:
            signal_quietly(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        signal_quietly(pid, signal.SIGKILL)
    return sorted(stopped)


@contextmanager
def spawn(cmd, **popen):
    """subprocess.Popen(cmd) in a session of its own, tagged; on leaving the block, however it is left, every process
    it started that is still alive (torchrun's workers included) is killed and the Popen reaped."""
    token = uuid.uuid4().hex
    env = popen.pop("env", None)
    env = {**(os.environ if env is None else env), TAG: token}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, **popen)
    proc.tag = token
    try:
        yield proc
    finally:
        kill_tagged(token)
        try:
            proc.communicate(timeout=30)                       # reaps it and closes its pipes
        except subprocess.TimeoutExpired:
            pass


def run(cmd, *, timeout, check=False, **popen):
    """subprocess.run(cmd, capture_output=True, text=True) with a timeout that kills the whole process tree (torchrun's
    workers included, see spawn), not only the direct child; then raises subprocess.TimeoutExpired with the output so
    far. check=True: CalledProcessError on a nonzero exit. Returns the CompletedProcess."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    with spawn(cmd, **popen) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tagged(p.tag)
            out, err = p.communicate(timeout=30)
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    if check and p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def wait_until(condition, timeout, poll=0.05):
    """Poll condition() until it is true or `timeout` seconds pass. Returns its last value."""
    deadline = time.monotonic() + timeout
    while not (ok := condition()) and time.monotonic() < deadline:
        time.sleep(poll)
    return ok


def alive(pid):
    """True while pid runs (a zombie has finished: every write it made is done)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---- a finished real-model run on disk, for real_run.py's report without a model --------------------------------
REAL_RUN_PROMPTS = ["What is the capital of Japan?", "How do I plant a seed?", "What is the largest mammal?"]


def hand_made_real_run(root, prompts_with_cycle, iterations=1):
    """A finished sppo.py run directory under root (config, iter{t}/metrics.json with the cycle count out of 4
    prompts, generations, an empty iter{t}/model per iteration and a pi_0 folder) and root/p.jsonl with
    REAL_RUN_PROMPTS: what real_run.report reads once held_out_samples is patched. Returns (run directory, prompts
    file)."""
    root = Path(root)
    runs.write_jsonl(root / "p.jsonl", [{"prompt": x} for x in REAL_RUN_PROMPTS])
    out = root / "run"
    (root / "pi0").mkdir()
    out.mkdir()
    runs.write_json(out / "config.json", {"iterations": iterations, "model": str(root / "pi0"), "temperature": 0.7,
                                          "top_p": 0.9, "max_new_tokens": 48, "judges": "concise,informs,plain",
                                          "K": 4, "loss": "sppo", "estimate_from": "all", "seed": 42})
    for t in range(iterations):
        (out / f"iter{t}" / "model").mkdir(parents=True)
        runs.write_json(out / f"iter{t}" / "metrics.json", {"prompts_with_cycle": prompts_with_cycle, "prompts": 4,
                                                            "history": [{"loss": 1.0}]})
        runs.write_jsonl(out / f"iter{t}" / "generations.jsonl",
                         [{"prompt": x, "responses": ["a", "b"]} for x in REAL_RUN_PROMPTS])
    return out, root / "p.jsonl"

