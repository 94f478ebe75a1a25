"""Golden losses (torchtitan's habit): the per-step losses of one fixed, sampling-free SPPO training run.

The run: sppo_toy's tiny random Llama (hidden 32, 2 layers, seed 3), D_t = sppo_toy.synthetic_dataset(24, seed=1,
long_rows=1) with ref_logp computed by pi_t itself, Eq. (4.7) at eta = 1000, RMSprop lr 1e-4, global batch 4 pairs
(12 pairs: 3 steps per epoch), 2 epochs = 6 steps, fp32 on CPU. It is computed two ways: training.train_policy on one process, and train_7b.py
under torchrun with 2 gloo ranks (FSDP2). tests/test_sppo.py and tests/test_train_7b.py compare today's losses
with the stored ones, so a change that moves the numbers - in the loss, the log-probs, the batching, the
optimizer, the schedule or the sharding - fails loudly and has to be re-blessed on purpose:

    .venv/bin/python tests/golden_losses.py          # rewrites tests/assets/golden_losses.json (~30 s)
"""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import conftest  # noqa: E402  (tests/: this file's directory)
import runs  # noqa: E402
import sppo  # noqa: E402
import sppo_toy  # noqa: E402
import training  # noqa: E402

TRAIN = dict(global_batch=4, micro_batch=1, seed=40, lr=1e-4, max_length=48, max_prompt_length=16, optimizer="rmsprop",
             epochs=2)
RTOL = 1e-5
"""Relative tolerance: the losses are ~1e5 (eta = 1000); fp32 sums in another order or on another CPU's SIMD
move them by ~1e-7 relative (one process vs 2 ranks: <= 1.3e-7 observed); 1e-5 still catches any real change."""
ASSET = ROOT / "tests" / "assets" / "golden_losses.json"


def make_world(root):
    """The tiny model and D_t of the golden run under `root`. Returns (model_dir, dataset_path)."""
    model_dir = sppo_toy.build_tiny_policy(Path(root) / "llama", arch="llama", seed=3)
    data = Path(root) / "data" / "dataset.jsonl"
    runs.write_jsonl(data, sppo_toy.synthetic_dataset(24, seed=1, long_rows=1))
    return model_dir, data


def single_process_losses():
    """training.train_policy on one process (micro-batch 8): the losses of the 6 steps."""
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = make_world(tmp)
        cfg = sppo.SPPOConfig(**{**TRAIN, "micro_batch": 8}, progress=False)
        model, tok = runs.load_policy(model_dir, cfg, "cpu")
        rows = sppo.reference_logps(model, tok, runs.read_dataset(data, need_ref=False), cfg)
        return [h["loss"] for h in training.train_policy(model, tok, rows, cfg, "cpu")]


def train_7b_args(model_dir, data, out):
    flags = {"model": model_dir, "data": data, "out": out, **TRAIN}
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


def two_rank_losses():
    """train_7b.py under torchrun with 2 gloo ranks: the losses of the 6 steps (from OUT/metrics.jsonl)."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = make_world(tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_7b.py"), *train_7b_args(model_dir, data, Path(tmp) / "out")]
        conftest.run(cmd, cwd=ROOT, check=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
        return [m["loss"] for m in runs.read_jsonl(Path(tmp) / "out" / "metrics.jsonl")]


def main():
    gold = {"command": "python tests/golden_losses.py", "about": __doc__.split("\n")[0], "rtol": RTOL,
            "settings": TRAIN, "single_process": single_process_losses(), "two_ranks": two_rank_losses()}
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_text(json.dumps(gold, indent=1) + "\n")
    print(json.dumps(gold, indent=1))


if __name__ == "__main__":
    main()
