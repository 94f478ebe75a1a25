"""torch.distributed for train_7b.py: the process group and its mesh, a clean teardown, and checkpoints.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675; the paper trains on
8 x A100 (train_7b.py). What is here is plumbing, no SPPO: torchrun's environment -> nccl on GPUs / gloo on CPU
(init_distributed, Dist), an exit that does not hang or abort (shutdown; docs/train_7b.md), gathers to rank 0, and
torch.distributed.checkpoint (DCP) checkpoints that are complete or absent whenever a job is killed, resumed only
into the run they belong to, and the final export for AutoModelForCausalLM.from_pretrained.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh

import runs


# ----------------------------------------------------------------------------------------------------------------
# Process group and mesh; the clean teardown.
@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: object
    timeout: datetime.timedelta

    def barrier(self, what):
        """All ranks meet after `what`. On gloo a monitored barrier: a rank that does not arrive within the
        collective timeout is NAMED in rank 0's error, instead of every rank waiting silently."""
        if self.device.type == "cpu" and self.world > 1:
            try:
                dist.monitored_barrier(timeout=self.timeout)
            except RuntimeError as e:
                raise RuntimeError(f"after {what}: {e}") from None
        else:
            dist.barrier()

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def decide(self, fn):
        """Rank 0 runs fn() (a filesystem check) and every rank gets its answer, or its exception: ranks that see a
        shared filesystem (NFS) at different moments cannot take different branches."""
        try:
            box = [(fn(), None) if self.rank == 0 else None]
        except Exception as e:                           # e.g. StaleStage: raised on every rank, not a hang
            box = [(None, e)]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0][1] is not None:
            raise box[0][1]
        return box[0][0]


def init_distributed(timeout_s=None, deterministic=False) -> Dist:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> nccl on GPUs / gloo on CPU, and an explicit 1-D mesh.

    Without torchrun (`python train_7b.py ...`) this is a 1-rank group, so the same code runs on one device.
    Collectives time out after timeout_s (default: 5 minutes on CPU/gloo, 3 hours on GPU, where ranks wait for the
    slowest generation shard); under torchrun each worker also dies with the torchrun agent (no orphans).
    deterministic: torch.use_deterministic_algorithms(True); on GPU also cuBLAS's fixed workspace (set before the
    first cuBLAS call) and deterministic cuDNN without autotuning.
    """
    if "RANK" in os.environ and sys.platform == "linux":       # PR_SET_PDEATHSIG: SIGKILL when the agent dies
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        if os.getppid() == 1:                                   # the agent died before prctl took effect
            os._exit(1)
    cuda = torch.cuda.is_available()
    if deterministic:
        if cuda:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s or (3 * 3600 if cuda else 300))
    kw = dict(backend="nccl" if cuda else "gloo", timeout=timeout, device_id=device if cuda else None)
    if "RANK" in os.environ:
        dist.init_process_group(**kw)
    else:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kw)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return Dist(dist.get_rank(), dist.get_world_size(), device, mesh, timeout)


def shutdown():
    """Clean exit, in this order: collect the FSDP states, DTensors and optimizer state that train() left behind;
    a barrier (no rank leaves while another still talks to it); destroy_process_group(); flush; os._exit (in
    __main__). Why the last step: after any functional collective - DTensor.full_tensor, clip_grad_norm_ on
    DTensors, get_model_state_dict(full_state_dict=True) - torch 2.13 keeps the gloo group's C++ threads
    (pt_gloo_runloop, gloo_tcp_loop) alive past destroy_process_group; a normal exit then tears them down in C++
    static destructors after the interpreter is finalised, racing the peer rank's exit: the "terminate called
    without an active exception" abort of docs/train_7b.md. os._exit skips that teardown; all files are closed."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def gather_to_rank0(part, d):
    """{index: record} from every rank, merged (all ranks get it; only rank 0 writes)."""
    parts = [None] * d.world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint) and the export for from_pretrained.
class TrainState:
    """What --resume restores (a DCP `Stateful`): model and optimizer shards, LR schedule, the data position (the
    optimizer step; the batch order is a pure function of the seed) and each rank's RNG states. Frozen parameters
    (LoRA's base weights: pi_t, read again from --model, whose hash run.json checks) are left out, so a LoRA
    checkpoint holds the adapters and their optimizer state only; strict=False lets the model load without them,
    while dcp.load still refuses a checkpoint that lacks any key that is saved."""

    OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)

    def __init__(self, model, opt, sched, d):
        self.model, self.opt, self.sched, self.d, self.step, self.with_rng = model, opt, sched, d, 0, True

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt, options=self.OPTIONS)
        sd = {"model": model_sd, "optim": optim_sd, "sched": self.sched.state_dict(), "step": self.step}
        if self.with_rng:
            rng = {"cpu": torch.get_rng_state()}
            if self.d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
            sd[f"rng_rank{self.d.rank}"] = rng                      # per-rank key: not deduplicated by DCP
        return sd

    def load_state_dict(self, sd):
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=self.OPTIONS)
        self.sched.load_state_dict(sd["sched"])
        self.step = sd["step"]
        rng = sd.get(f"rng_rank{self.d.rank}", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.d.device)


def checkpoints(out):
    """Finished checkpoints, oldest first (a .tmp directory is an interrupted save and never counts)."""
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / "run.json").is_file())


def save_checkpoint(state, out, keep, run_info, d):
    """dcp.save into step_N.tmp (every rank writes its shards), then rank 0 renames it: a checkpoint is complete
    or absent, never half-written, whenever the job is killed."""
    final = Path(out) / "checkpoints" / f"step_{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"train": state}, checkpoint_id=str(tmp))
    dist.barrier()
    if d.rank == 0:
        (tmp / "run.json").write_text(json.dumps({**run_info, "step": state.step, "world": d.world}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def check_run_info(path, run_info):
    """The checkpoint's run.json, when it belongs to this data, pi_t and settings (else refused, the field named)."""
    saved = json.loads((path / "run.json").read_text())
    for k, v in run_info.items():
        if saved.get(k) != v:
            raise runs.ArtifactError(f"{path / 'run.json'}: field {k!r} is {saved.get(k)!r} but this run has {v!r}; "
                                     f"resume with the original settings or use a new --out")
    return saved


def load_checkpoint(state, path, saved, d):
    """Restore checkpoint `path` (rank 0's choice; `saved` its checked run.json) in place."""
    state.with_rng = saved["world"] == d.world                      # RNG states are per rank
    dcp.load({"train": state}, checkpoint_id=str(path))
    state.with_rng = True


def export_model(model, tokenizer, src, out, bf16, d, plain=None):
    """pi_{t+1} for AutoModelForCausalLM.from_pretrained: OUT/model in fp32, always (sppo.py's and the next
    iteration's --model: in bf16 RMSprop's ~lr-sized updates round back to pi_t), and OUT/model_bf16 when `bf16`
    (serving, evaluation). The full state dict goes to rank 0 (a collective; the others get {}), is loaded into a
    meta-built model and written with save_pretrained. plain: rank 0's map from the gathered state dict to the
    checkpoint's (LoRA: the merge, train_7b.merged). Returns bf16_unchanged_fraction vs pi_t (None off rank 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    full, frac = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)), None
    if d.rank == 0:
        full = plain(full) if plain else full
        start = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()    # pi_t
        frac = bf16_unchanged_fraction(start, full)
        del start
        for dtype, name in [(torch.float32, "model")] + [(torch.bfloat16, "model_bf16")] * bf16:
            with torch.device("meta"):
                hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=dtype)
            hf.load_state_dict({k: v.to(dtype) for k, v in full.items()}, assign=True)
            if (Path(src) / "generation_config.json").is_file():
                hf.generation_config = GenerationConfig.from_pretrained(src)
            runs.save_policy(hf, tokenizer, out / name)
    del full
    dist.barrier()
    return frac


def bf16_unchanged_fraction(start, new):
    """Fraction of the weights (floating-point entries of state dicts `new` vs pi_t's `start`) that a bf16 export
    would leave exactly at pi_t's bf16 value: an update under half a bf16 step (2^-9 |w|: ~4e-5 at |w| ~ 0.02)
    rounds away, while RMSprop moves each weight by about the LR (5e-7) per step."""
    same = total = 0
    for k, w in new.items():
        if w.is_floating_point():
            same += (w.to(torch.bfloat16) == start[k].to(torch.bfloat16)).sum().item()
            total += w.numel()
    return same / total
