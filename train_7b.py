"""train_7b.py: SPPO at 7B scale on one node (or many) with torch.distributed alone: FSDP2, DCP checkpoints, bf16.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. One SPPO step
trains pi_{t+1} from pi_t on D_t = {(x, y, P-hat(y > pi_t | x))} by Eq. (4.7):

    theta_{t+1} = argmin_theta  E_{D_t} [ log pi_theta(y|x)/pi_t(y|x) - eta (P-hat(y > pi_t|x) - 1/2) ]^2

sppo.py is the single-process reference: the loss, log-probs, dataset schema, optimizer and LR schedule are
imported from it, never repeated. This file adds the distributed concerns only, one function each, applied in
torchtitan's fixed order (pytorch/torchtitan, "FSDP2"):

    build on meta -> activation checkpointing -> fully_shard (embeddings, each layer, lm_head, root) -> materialise,
    pi_t's weights broadcast from rank 0 -> reference log-probs (pi_ref = pi_t, sharded, cached beside the data)
    -> optimizer + schedule -> load checkpoint (--resume) -> train -> DCP checkpoints -> fp32 save_pretrained on rank 0

Commands (OUT must be on a filesystem every node sees: checkpoints are written by all ranks):
  # one SPPO step on 8 GPUs, from sppo.py's dataset.jsonl (ref_logp optional):
  torchrun --standalone --nproc_per_node 8 train_7b.py --model PI_T --data D_T.jsonl --out runs/7b/iter0
  # a whole Algorithm-1 iteration on the node (generate + rank on a bf16 replica per GPU, then FSDP training):
  torchrun --standalone --nproc_per_node 8 train_7b.py --stage all --model PI_T --prompts P.jsonl \
      --pairrm PAIRRM_DIR --iteration 0 --out runs/7b/iter0
  # multi-node: the same command on every node, torchrun does the rendezvous
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id sppo \
      train_7b.py --model PI_T --data D_T.jsonl --out /shared/runs/7b/iter0
  # after a crash: the same command plus --resume.    Memory plan without a GPU:
  python train_7b.py --plan mistral-7b --world 8 --micro-batch 8 --max-length 1024
  # CPU check, 2 gloo ranks:  torchrun --standalone --nproc_per_node 2 train_7b.py --model TINY --data D.jsonl \
  #                               --out runs/t --global-batch 8 --micro-batch 2 --lr 1e-4
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.hf_argparser import HfArg

import runs
import sppo

# Published configs (config.json of the hub repos), so --plan needs no download.
_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False)
PUBLISHED = {"mistral-7b": ("mistral", dict(_7B, vocab_size=32000, rope_theta=1e6, max_position_embeddings=32768,
                                            sliding_window=None)),
             "llama-3-8b": ("llama", dict(_7B, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192))}
"""Mistral-7B-Instruct-v0.2 and Llama-3-8B-Instruct."""
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("H800", 989e12), ("A100", 312e12), ("A800", 312e12)]
"""Dense bf16 tensor-core peak by device-name substring (first match wins), from NVIDIA's data sheets."""


@dataclass
class TrainConfig(sppo.SPPOConfig):
    model: str | None = HfArg(default=None, help="pi_t: a local save_pretrained directory (Llama or Mistral), or a "
                              ".gguf file (converted once by runs.gguf_checkpoint, before the process group).")
    out: str = HfArg(default="runs/train_7b", help="This iteration's directory: dataset, checkpoints/, metrics.jsonl, "
                     "model/ (a filesystem every node sees).")
    data: str | None = HfArg(default=None, help="D_t as JSONL in runs.DATASET_FIELDS (sppo.py's dataset.jsonl; "
                             "ref_logp optional). Default: OUT/dataset.jsonl.")
    stage: Literal["generate", "rank", "train", "all"] = HfArg(default="train", help="`all` = one whole Algorithm-1 "
                                                               "iteration; finished stages are skipped.")
    iteration: int = HfArg(default=0, help="t of Algorithm 1 for --stage generate/all: the prompt slice and seeds.")
    gen_engine: Literal["hf", "vllm"] = HfArg(default="hf", help="transformers generate, or vLLM (requirements-vllm"
                                              ".txt, its own environment; --stage generate only: its own torchrun).")
    ref_logp: Literal["auto", "recompute"] = HfArg(default="auto", help="`auto`: on GPU computed like `recompute`; on "
                                                   "CPU the dataset's ref_logp when every row has one, else computed; "
                                                   "`recompute`: computed by pi_t in the training micro-batches.")
    export_bf16: bool = HfArg(default=False, help="Also write OUT/model_bf16 (for serving) on CPU; always on GPU.")
    deterministic: bool = HfArg(default=False, help="torch.use_deterministic_algorithms(True) (+ cuBLAS/cuDNN flags).")
    activation_checkpointing: bool = HfArg(default=True, help="Recompute each decoder layer in backward.")
    save_every: int = HfArg(default=100, help="DCP checkpoint every N optimizer steps (and always at the end).")
    keep_checkpoints: int = HfArg(default=2, help="Newest checkpoints kept under OUT/checkpoints.")
    resume: bool = HfArg(default=False, help="Continue exactly from the newest checkpoint in OUT/checkpoints.")
    collective_timeout_s: float | None = HfArg(default=None, help="Seconds before a collective gives up (a stalled "
                                               "rank is named on CPU/gloo); default 300 on CPU, 10800 on GPU.")
    stop_at_step: int | None = HfArg(default=None, help="Exit after this step and its checkpoint (tests --resume).")
    measure_memory: bool = HfArg(default=False, help="FSDPMemTracker on the second step; writes OUT/memory.json.")
    plan: str | None = HfArg(default=None, help="Print the per-GPU memory plan of `mistral-7b`, `llama-3-8b` or a "
                             "config dir, and exit (no GPU needed).")
    world: int = HfArg(default=8, help="--plan only: GPUs the model is sharded over.")
    gpu_gb: float = HfArg(default=80.0, help="--plan only: GPU memory (GB) the plan must fit in.")


NOT_HERE = {"device": ("auto", "devices come from torchrun (LOCAL_RANK)"),
            "dtype": ("float32", "compute is bf16 on GPU over fp32 master weights, fp32 on CPU"),
            "stop_after": (None, "--stage picks the stages"), "oracle": ("pairrm", "the oracle is PairRM"),
            "restart_from": (None, "this program's OUT is one iteration: move stale files aside or use a new --out"),
            "reference": ("previous", "pi_ref is pi_t, the --model trained here; a fixed pi_0 runs in sppo.py"),
            "eval_prompts": (None, "held-out win rates are sppo.py's, per iteration; judge these models with arena.py")}
"""SPPOConfig settings of sppo.py's CLI that this program does not use: any other value is refused, with why."""


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
    without an active exception" abort of shared/fsdp_notes.md. os._exit skips that teardown; all files are closed."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------------
# Data: sppo.py's schema, with errors that name the file, the record and the field.
def load_dataset(path, cfg):
    """Rows of D_t (runs.read_dataset): ref_logp optional (then computed from pi_t); log_z when --log-z estimate."""
    return runs.read_dataset(path, need_ref=False, need_log_z=cfg.log_z == "estimate")


def check_batch_sizes(cfg, world):
    """global batch = micro-batch x accumulation steps x world size (paper: 64 = 8 x 1 x 8). Returns accumulation."""
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"--global-batch {cfg.global_batch} must be a multiple of --micro-batch {cfg.micro_batch} "
                         f"x world size {world} = {cfg.micro_batch * world}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"--max-prompt-length {cfg.max_prompt_length} must be below --max-length {cfg.max_length}")
    return cfg.global_batch // (cfg.micro_batch * world)


def rank_micro_batches(idx, rank, world, micro, group=1):
    """This rank's contiguous share of one global batch `idx` (row indices, in units of `group` rows: a pair stays
    on one rank and in one micro-batch of `micro` units), cut into micro-batches. Every rank gets the same number
    of micro-batches (None = a zero-weight stand-in) because every forward and backward runs FSDP collectives; a
    short last batch of an epoch leaves some ranks with less or no data."""
    per = math.ceil(len(idx) / group / world) * group
    mine = idx[rank * per:(rank + 1) * per]
    return [mine[j:j + micro * group] or None for j in range(0, per, micro * group)]


# ----------------------------------------------------------------------------------------------------------------
# The model: meta -> activation checkpointing -> fully_shard -> materialise -> pi_t's weights.
def mixed_precision(device):
    """bf16 compute with fp32 master weights and fp32 gradient reduction on GPU; all fp32 on CPU (gloo; exact)."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_activation_checkpointing(model):
    """Each decoder layer is recomputed in backward (HF's GradientCheckpointingLayer, non-reentrant)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def apply_fsdp(model, mesh, mp_policy):
    """ZeRO-3 in torchtitan's units: the embeddings, every decoder layer, the lm_head, then the root (the final
    norm, d parameters); each unit is all-gathered only while it runs. (torchtitan groups norm + lm_head in one
    fully_shard([...]) call; FSDPMemTracker, --measure-memory, breaks on such groups in torch 2.13.) Tied
    embeddings (config.tie_word_embeddings) keep embed_tokens and lm_head in the root: the shared parameter lives
    in one unit. Gradient reduction SUMS
    over ranks - FSDP2 averages by default - because each rank's loss is already divided by the GLOBAL batch size,
    as in sppo.train_policy. Returns the units, in words."""
    tied, inner, n = model.config.tie_word_embeddings, model.model, len(model.model.layers)
    units = [*inner.layers] if tied else [inner.embed_tokens, *inner.layers, model.lm_head]
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)                         # plain SUM on nccl and gloo alike
    return f"{n} layers | root (norm, tied embed_tokens = lm_head)" if tied else \
        f"embed_tokens | {n} layers | lm_head | root (norm)"


def load_weights(model, path, d):
    """pi_t's weights: rank 0 reads the checkpoint on CPU in fp32 and broadcasts; each rank keeps its shards.

    to_empty() leaves non-persistent buffers (the RoPE inv_freq) uninitialised, so they are rebuilt from the config.
    """
    from transformers import AutoModelForCausalLM
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict() if d.rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_type"):
            with torch.device(d.device):
                fresh = type(mod)(config=mod.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(mod, name).copy_(buf)


def build_model(cfg, d):
    """pi_t as an FSDP2 module with fp32 master weights; works for the Llama and Mistral classes of transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=torch.float32)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    d.log("FSDP units: " + apply_fsdp(model, d.mesh, mixed_precision(d.device)))
    model.to_empty(device=d.device)
    load_weights(model, cfg.model, d)
    return model


# ----------------------------------------------------------------------------------------------------------------
# pi_ref = pi_t: log pi_t(y|x) for the whole dataset, computed once by the policy before step 1, sharded over ranks.
@torch.no_grad()
def reference_logps(model, pairs, pad_id, schedule, group, cfg, d):
    """sppo.sequence_logps of every pair under the unchanged policy, in the micro-batches that the first epoch's
    training steps form (rank_micro_batches of schedule): the same rows padded together, the same precision (the
    FSDP policy itself, bf16 on GPU), so at the first visit of a row log pi_theta/pi_ref starts at exactly 0. Later
    epochs batch rows differently: on GPU a row's bf16 log-prob there can differ from pi_ref's by rounding."""
    out = {}
    model.eval()
    for idx in schedule[:math.ceil(len(pairs) // group / cfg.global_batch)]:      # epoch 1 covers every row once
        for mb in rank_micro_batches(idx, d.rank, d.world, cfg.micro_batch, group):
            b = sppo.collate([pairs[i] for i in mb or idx[:group]], pad_id,       # a stand-in keeps ranks in step
                             multiple=sppo.pad_multiple(d.device))               # as make_batch pads
            out.update(zip(mb or [], sppo.sequence_logps(model, **{k: v.to(d.device) for k, v in b.items()}).tolist()))
    model.reshard()                                       # the root stays unsharded after a no_grad forward
    shards = [None] * d.world
    dist.all_gather_object(shards, out)
    merged = {i: lp for s in shards for i, lp in s.items()}
    return [merged[i] for i in range(len(pairs))]


def reference_for(model, rows, pairs, pad_id, schedule, group, cfg, d, data_path, model_id):
    """ref_logp per row: the dataset's own (--ref-logp auto on CPU only, and only when every row's ref_by shows it
    was computed by this pi_t (`model_id`, its hash), in this dtype, with this truncation: sppo.py records it), or
    OUT/ref_logp.json when it was made for this model, data, truncation and computation (dtype, device, batching:
    rank 0 decides), or computed and cached there by rank 0, so a restart does not recompute them."""
    dtype = str(mixed_precision(d.device).param_dtype or torch.float32).removeprefix("torch.")
    mine = sppo.ref_by(cfg, model_id, dtype)
    if cfg.ref_logp == "auto" and d.device.type == "cpu" and all("ref_logp" in r for r in rows):
        if all(r.get("ref_by") == mine for r in rows):
            return [r["ref_logp"] for r in rows], "dataset"
        d.log(f"{data_path}: ref_logp made by {next(r.get('ref_by') for r in rows if r.get('ref_by') != mine)}, not "
              f"by this policy ({mine}); recomputing")
    cache = Path(cfg.out) / "ref_logp.json"
    key = {"model": str(Path(cfg.model).resolve()), "data_sha256": file_sha256(data_path), "max_length":
           cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "truncation": cfg.truncation,
           "device": d.device.type, "dtype": dtype, "batching": {k: getattr(cfg, k) for k in
           ("global_batch", "micro_batch", "seed", "selection")} | {"world": d.world}}
    how = f"{key['dtype']} on {d.world} x {d.device.type}, in the training micro-batches of epoch 1"

    def cached():
        saved = json.loads(cache.read_text()) if cache.is_file() else None
        if saved and saved["key"] == key and len(saved["ref_logp"]) == len(rows):
            return saved["ref_logp"]
        if saved:
            d.log(f"{cache}: made for another model, data, truncation or computation; recomputing")
    ref = d.decide(cached)
    if ref is not None:
        return ref, f"cache {cache} ({how})"
    ref = reference_logps(model, pairs, pad_id, schedule, group, cfg, d)
    if d.rank == 0:
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "ref_logp": ref}))
        os.replace(tmp, cache)
    return ref, f"computed with pi_t ({how}), cached in {cache}"


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step of Eq. (4.7), split over ranks and micro-batches.
def train_step(model, opt, sched, pairs, rows, idx, pad_id, group, cfg, d, before_micro=None):
    """Same arithmetic as sppo.train_policy: sum of per-example losses / len(idx), summed over micro-batches
    (local accumulation) and ranks (reduce-scatter with SUM), then global-norm clipping, optimizer and LR step.
    before_micro: called before each micro-batch (--measure-memory resets the tracker's per-module stats)."""
    opt.zero_grad(set_to_none=True)
    stats = torch.zeros(4, dtype=torch.float64, device=d.device)   # [sum of losses, tokens, sum T_i^2, responses]
    for mb in rank_micro_batches(idx, d.rank, d.world, cfg.micro_batch, group):
        if before_micro:
            before_micro()
        b = sppo.make_batch(pairs, rows, mb or idx[:group], pad_id, cfg, d.device)   # a stand-in: one whole pair
        losses = sppo.example_losses(model, b, cfg)                               # (micro,) cfg.loss
        (losses.sum() * (1.0 if mb else 0.0) / len(idx)).backward()
        if mb:
            lengths = b["attention_mask"].sum(-1).double()                        # (micro,) T_i without padding
            stats += torch.stack([losses.detach().sum().double(), lengths.sum(), (lengths ** 2).sum(),
                                  b["response_mask"].sum().double()])
    dist.all_reduce(stats)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)  # a collective on DTensors
    gnorm = float(gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm)
    loss = stats[0].item() / len(idx)
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise sppo.DivergedError(f"loss {loss}, grad norm {gnorm} is not finite; stopped before the update")
    lr = sched.get_last_lr()[0]                                                       # the rate of this step
    opt.step()
    sched.step()
    return {"loss": loss, "grad_norm": gnorm, "lr": lr, "tokens": int(stats[1]),
            "sum_len_sq": int(stats[2]), "response_tokens": int(stats[3])}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint) and the export for from_pretrained.
class TrainState:
    """What --resume restores (a DCP `Stateful`): model and optimizer shards, LR schedule, the data position (the
    optimizer step; the batch order is a pure function of the seed) and each rank's RNG states."""

    def __init__(self, model, opt, sched, d):
        self.model, self.opt, self.sched, self.d, self.step, self.with_rng = model, opt, sched, d, 0, True

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        sd = {"model": model_sd, "optim": optim_sd, "sched": self.sched.state_dict(), "step": self.step}
        if self.with_rng:
            rng = {"cpu": torch.get_rng_state()}
            if self.d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
            sd[f"rng_rank{self.d.rank}"] = rng                      # per-rank key: not deduplicated by DCP
        return sd

    def load_state_dict(self, sd):
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
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


RESUME_SETTINGS = ("loss", "ipo_target", "global_batch", "micro_batch", "epochs", "schedule_epochs", "selection",
                   "seed", "eta", "log_z", "lr", "optimizer", "weight_decay", "warmup_ratio", "max_grad_norm",
                   "max_length", "max_prompt_length", "truncation")
"""What --resume must find unchanged in the checkpoint's run.json (with pi_t's and the data's sha256): every
setting that changes the result. A changed one is refused, named, before the model is built."""


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


def export_model(model, tokenizer, src, out, bf16, d):
    """pi_{t+1} for AutoModelForCausalLM.from_pretrained: OUT/model in fp32, always (sppo.py's and the next
    iteration's --model: in bf16 RMSprop's ~lr-sized updates round back to pi_t), and OUT/model_bf16 when `bf16`
    (serving, evaluation). The full state dict goes to rank 0 (a collective; the others get {}), is loaded into a
    meta-built model and written with save_pretrained. Returns bf16_unchanged_fraction vs pi_t (None off rank 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    full, frac = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)), None
    if d.rank == 0:
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


# ----------------------------------------------------------------------------------------------------------------
# Throughput, MFU and memory: what each step logs.
def step_flops(config, n_params, tokens, sum_len_sq, response_tokens):
    """Training FLOPs of one optimizer step (forward + backward; recomputation not counted: MFU, not HFU), summed
    over the global batch's rows i, each of T_i real tokens (no padding) with R_i response tokens:

        6 N_body sum_i T_i  +  12 L h sum_i T_i^2  +  6 V d sum_i R_i

    N_body = N - V d (tied embeddings) or N - 2 V d: the matmul weights the tokens run through (the embedding is a
    lookup); the attention scores are PaLM's 12 L h T per token at the row's own length T_i (Chowdhery et al. 2022,
    App. B; h = heads x head_dim); the lm_head (V x d) runs only on the kept positions, the response tokens
    (logits_to_keep in sppo.sequence_logps)."""
    V, d, L = config.vocab_size, config.hidden_size, config.num_hidden_layers
    h = config.num_attention_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    n_body = n_params - V * d * (1 if config.tie_word_embeddings else 2)
    return 6 * n_body * tokens + 12 * L * h * sum_len_sq + 6 * V * d * response_tokens


def peak_flops(device_name):
    """bf16 dense peak of a GPU (torch.cuda.get_device_name) from PEAK_BF16_FLOPS, or None (unknown: no MFU)."""
    return next((f for key, f in PEAK_BF16_FLOPS if key in device_name), None)


def peak_memory_gb(d):
    """Peak memory in GB, the max over ranks (all_reduce MAX): {peak_memory_gb: max allocated, peak_reserved_gb:
    max reserved} by the CUDA caching allocator on GPU; {peak_memory_gb: peak RSS of the process} on CPU."""
    cuda = d.device.type == "cuda"
    v = [torch.cuda.max_memory_allocated(d.device), torch.cuda.max_memory_reserved(d.device)] if cuda else \
        [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
    v = torch.tensor(v, dtype=torch.float64, device=d.device) / 1e9
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return dict(zip(["peak_memory_gb", "peak_reserved_gb"], v.tolist()))


def sync(device, reset_peak=False):
    """Wait for the GPU's queued work, so a step's wall time includes it (and restart the peak-memory count)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)


def param_counts(config):
    """(N, params of one decoder layer, params outside the layers) from a model built on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    n, layer = sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.model.layers[0].parameters())
    return n, layer, n - config.num_hidden_layers * layer


def memory_plan(config, world, micro_batch, seq_len, optimizer="rmsprop", compute_bytes=2, ckpt=True):
    """Per-GPU bytes of each term of FSDP2 training, for one micro-batch of micro_batch x seq_len tokens.

    compute_bytes: 2 for bf16 compute (GPU), 4 for fp32 (CPU). Activations are the tensors autograd saves in a
    Llama/Mistral layer (SDPA without the T^2 matrix; GQA keys and values repeated to all heads): per token
    4d fp32 + c d at each of 2 RMSNorms, c(6d + 4 d_kv) around attention, 4 c I in the SwiGLU MLP.
    """
    n, n_layer, n_root = param_counts(config)
    d, L, V, I = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    if not config.tie_word_embeddings:      # apply_fsdp: embed_tokens and lm_head (V d each) are units of their own
        n_root, n_layer = n_root - 2 * V * d, max(n_layer, V * d)                  # n_layer: the largest unit
    d_kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    c, tok = compute_bytes, micro_batch * seq_len
    layer_acts = tok * (2 * (4 * d + c * d) + c * (6 * d + 4 * d_kv) + 4 * c * I)
    return {
        "sharded fp32 params (4N/W)": 4 * n / world,
        "sharded fp32 grads (4N/W)": 4 * n / world,
        f"{optimizer} state ({ {'rmsprop': 4, 'adamw': 8}[optimizer]}N/W)":
            {"rmsprop": 4, "adamw": 8}[optimizer] * n / world,
        "unsharded params: root + 2 units in flight": c * (n_root + 2 * n_layer),
        "unsharded grads in flight (+ fp32 reduce)": (c + 4) * max(n_root, n_layer),
        "activations: layer inputs kept (L B T d)" if ckpt else "activations: all layers":
            L * tok * d * c if ckpt else L * layer_acts,
        "activations: 1 layer recomputed in backward": layer_acts if ckpt else 0,
        "logits (2 copies) + fp32 log-softmax saved": tok * V * (2 * c + 4) + 2 * 4 * min(tok, 4096) * V,
    }


def model_config(name):
    """A transformers config: a PUBLISHED name or a local model/config directory."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig
    if name in PUBLISHED:
        arch, kw = PUBLISHED[name]
        return {"llama": LlamaConfig, "mistral": MistralConfig}[arch](**kw)
    return AutoConfig.from_pretrained(name)


def print_plan(cfg):
    """The --plan table: every term, the total, and whether it fits in --gpu-gb."""
    config = model_config(cfg.plan)
    n = param_counts(config)[0]
    rows = cfg.micro_batch * (2 if cfg.selection == "pair" else 1)           # a pair is 2 sequences
    plan = memory_plan(config, cfg.world, rows, cfg.max_length, cfg.optimizer)
    total = sum(plan.values())
    print(f"memory plan per GPU: {cfg.plan} ({n / 1e9:.2f} B params, {config.num_hidden_layers} layers, vocab "
          f"{config.vocab_size}), {cfg.world} GPUs, micro-batch {cfg.micro_batch} "
          f"{'pairs' if rows > cfg.micro_batch else 'rows'} = {rows} x {cfg.max_length} tokens, "
          f"{cfg.optimizer}, bf16 compute / fp32 master weights, activation checkpointing")
    for k, v in plan.items():
        print(f"  {k:<46} {v / 1e9:7.2f} GB")
    fits = "yes" if total / 1e9 < cfg.gpu_gb else "NO"
    print(f"  {'total':<46} {total / 1e9:7.2f} GB   fits in {cfg.gpu_gb:g} GB: {fits} ({cfg.gpu_gb - total / 1e9:.1f} "
          f"GB left for the CUDA context, NCCL buffers, allocator fragmentation)")
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, steps 1-3 on the node: each rank generates / ranks its shard on a full replica; rank 0 gathers.
def gather_to_rank0(part, d):
    """{index: record} from every rank, merged (all ranks get it; only rank 0 writes)."""
    parts = [None] * d.world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def free_device_memory(device):
    """Release a replica before the next stage (the caller dropped its references)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_replica(path, cfg, device):
    """A full generation replica. On GPU straight onto this rank's device (device_map; needs accelerate, see
    requirements-gpu.txt), so 8 ranks never hold 8 host copies of pi_t at once (~116 GB at 7B). On CPU (or without
    accelerate) runs.load_policy: load on the host, then move."""
    if device.type == "cuda" and importlib.util.find_spec("accelerate"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return (AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), device_map={"": device}),
                AutoTokenizer.from_pretrained(path))
    return runs.load_policy(path, cfg, device)


def generate_vllm(cfg, model_dir, tokenizer, prompts, indices):
    """Optional engine: vLLM on this rank's GPU (tensor parallel 1), in a --stage generate call of its own (vLLM
    frees its GPU memory only when the process exits; validate() refuses other stages). Same prompt tokens and text
    convention as sppo.generate_responses; finished = stopped on EOS. Each request is seeded by sppo.sample_seed of
    its global prompt index, so the samples do not depend on the number of GPUs. Not exercised by the CPU tests."""
    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, dtype="bfloat16", seed=cfg.seed, tensor_parallel_size=1,
              distributed_executor_backend="external_launcher")
    sp = [SamplingParams(n=cfg.K, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                         seed=sppo.sample_seed(cfg.seed, cfg.iteration, i) % 2 ** 31, skip_special_tokens=False)
          for i in indices]
    outs = llm.generate([{"prompt_token_ids": sppo.prompt_ids(tokenizer, p)} for p in prompts], sp)
    from transformers import GenerationConfig
    gen_cfg = GenerationConfig.from_pretrained(model_dir) if (Path(model_dir) / "generation_config.json").is_file() \
        else None
    stop = set(sppo.eos_ids(SimpleNamespace(generation_config=gen_cfg), tokenizer))
    gens = []
    for o in outs:                                  # vLLM's token_ids end with the stop token when it stopped on one
        cut = [c.finish_reason == "stop" and bool(c.token_ids) and c.token_ids[-1] in stop for c in o.outputs]
        gens.append({"responses": [c.text for c in o.outputs],
                     "finished": [c.finish_reason == "stop" for c in o.outputs],
                     "token_ids": [list(c.token_ids[:len(c.token_ids) - e]) for c, e in zip(o.outputs, cut)],
                     "stop_ids": [c.token_ids[-1] if e else None for c, e in zip(o.outputs, cut)]})
    return gens


def stage_prompts(cfg):
    """The prompts of iteration cfg.iteration, sliced as sppo.py slices them."""
    return runs.iteration_prompts(runs.load_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts or None], cfg,
                                  cfg.iteration)


def stage_generate(cfg, d, out):
    """Step 1: y_1..y_K ~ pi_t(.|x). Batches of gen_batch prompts are dealt round-robin to ranks and sampled with
    sppo.generate_responses under sppo's seeding rule (keyed by the batch's first global prompt index), so the
    samples equal sppo.py's and do not depend on the number of GPUs. Rank 0 writes OUT/generations.jsonl."""
    prompts = stage_prompts(cfg)
    starts = list(range(0, len(prompts), cfg.gen_batch))[d.rank::d.world]
    gcfg = dataclasses.replace(cfg, dtype="bfloat16" if d.device.type == "cuda" else "float32",
                               progress=cfg.progress and d.rank == 0)
    mine = [i for s in starts for i in range(s, min(s + cfg.gen_batch, len(prompts)))]
    if cfg.gen_engine == "vllm":
        from transformers import AutoTokenizer
        gens = generate_vllm(gcfg, cfg.model, AutoTokenizer.from_pretrained(cfg.model), [prompts[i] for i in mine],
                             mine)
    else:
        model, tok = load_replica(cfg.model, gcfg, d.device)                      # a full bf16 replica per GPU
        gens = [g for s in starts for g in sppo.generate_responses(model, tok, prompts[s:s + cfg.gen_batch], gcfg,
                                                                    cfg.iteration, d.device, start=s)]
        del model
    free_device_memory(d.device)
    gens = gather_to_rank0(dict(zip(mine, gens)), d)
    if d.rank == 0:
        runs.write_generations(out / "generations.jsonl", prompts, [gens[i] for i in range(len(prompts))])
    d.barrier("generation")


def stage_rank(cfg, d, out):
    """Steps 2-3: each rank fills the K x K matrices of its prompts with the oracle (PairRM, sppo.make_oracle);
    rank 0 writes OUT/preferences.jsonl and D_t = OUT/dataset.jsonl (sppo.build_dataset; ref_logp comes later)."""
    prompts = stage_prompts(cfg)
    gens = runs.read_generations(out / "generations.jsonl", prompts, cfg.K)
    mine = list(range(d.rank, len(gens), d.world))
    oracle = sppo.make_oracle(cfg, d.device)
    xs = sppo.oracle_prompts([prompts[i] for i in mine], cfg, cfg.model)             # --oracle-prompt raw/templated
    mats, logits = sppo.rank(oracle, xs, [gens[i] for i in mine], progress=False)
    del oracle
    free_device_memory(d.device)
    P = gather_to_rank0(dict(zip(mine, zip(mats, logits or [None] * len(mats)))), d)
    if d.rank == 0:
        mats, logits = [P[i][0] for i in range(len(gens))], [P[i][1] for i in range(len(gens))]
        logits = None if logits[0] is None else logits
        runs.write_preferences(out / "preferences.jsonl", mats, logits)
        runs.write_jsonl(out / "dataset.jsonl", sppo.build_dataset(prompts, gens, mats, cfg, logits))
    d.barrier("ranking")


# ----------------------------------------------------------------------------------------------------------------
# Training: pi_t -> pi_{t+1} on D_t (Eq. 4.7).
def train(cfg, d):
    """The whole training stage on every rank. Returns a summary dict; the FSDP objects die with this frame."""
    from transformers import AutoTokenizer
    out, data = Path(cfg.out), Path(cfg.data or Path(cfg.out) / "dataset.jsonl")
    accumulation = check_batch_sizes(cfg, d.world)
    ckpt = d.decide(lambda: (checkpoints(out) or [None])[-1])         # rank 0 picks the checkpoint for all ranks
    if ckpt and not cfg.resume:
        raise runs.ArtifactError(f"{out / 'checkpoints'} has checkpoints: pass --resume, or use a new --out")
    rows = load_dataset(data, cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = sppo.pad_id(tok)
    pairs, n_cut = sppo.encode_rows(tok, rows, cfg)
    schedule, total, group = sppo.train_schedule(rows, cfg)                 # pairs stay in one micro-batch
    run_info = {"model": d.decide(lambda: runs.Hashes(out)(cfg.model)), "data_sha256": file_sha256(data),
                "total_steps": len(schedule), **{k: getattr(cfg, k) for k in RESUME_SETTINGS}}
    saved = d.decide(lambda: check_run_info(ckpt, run_info)) if ckpt else None     # before the model is built
    d.log(f"{data}: {len(rows)} rows; {n_cut} truncated ({cfg.truncation} rule, max_length {cfg.max_length}, "
          f"max_prompt_length {cfg.max_prompt_length}); none skipped")
    model = build_model(cfg, d)                                       # meta -> AC -> fully_shard -> pi_t
    ref, source = reference_for(model, rows, pairs, pad_id, schedule, group, cfg, d, data, run_info["model"])
    for r, lp in zip(rows, ref):
        r["ref_logp"] = lp
    runs.check_dataset(rows, data)
    d.log(f"reference log-probs (pi_ref = pi_t): {source}")
    opt = sppo.make_optimizer(model.parameters(), cfg)                # on the sharded (DTensor) parameters
    sched = sppo.make_scheduler(opt, total, cfg.warmup_ratio)       # may run past the steps trained
    state = TrainState(model, opt, sched, d)
    if ckpt:
        load_checkpoint(state, ckpt, saved, d)
        d.log(f"resumed from {ckpt} at step {state.step}")
    elif cfg.resume:
        d.log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting at step 0")
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    metrics_path = out / "metrics.jsonl"
    if d.rank == 0:                                    # a resumed run's log continues where the checkpoint was
        old = runs.read_jsonl(metrics_path) if metrics_path.is_file() else []
        runs.write_jsonl(metrics_path, [m for m in old if m["step"] < state.step])
    d.log(f"{n_params / 1e6:.2f} M params on {d.world} ranks ({d.device.type}); {len(schedule)} steps (LR schedule "
          f"{total}) of {cfg.global_batch} {'pairs' if group == 2 else 'rows'} = {cfg.micro_batch} x {accumulation} x "
          f"{d.world}; optimizer {cfg.optimizer}; "
          f"collective timeout {d.timeout.total_seconds():.0f} s; deterministic algorithms {cfg.deterministic}")
    model.train()
    measure_at = min(state.step + 1, len(schedule) - 1) if cfg.measure_memory else -1   # optimizer state exists
    for step in range(state.step, len(schedule)):
        tracker = start_memory_tracker(model, opt) if step == measure_at else None
        sync(d.device, reset_peak=True)
        t0 = time.perf_counter()
        m = train_step(model, opt, sched, pairs, rows, schedule[step], pad_id, group, cfg, d,
                       tracker.reset_mod_stats if tracker is not None else None)
        sync(d.device)
        dt = time.perf_counter() - t0
        if tracker is not None:
            tracker.__exit__(None, None, None)
            seq_len = max(sum(map(len, pairs[i])) for i in schedule[step])
            write_memory_report(tracker, model.config, cfg, seq_len, d, out)
        state.step = step + 1
        tps, flops = m["tokens"] / dt, step_flops(model.config, n_params, m["tokens"], m.pop("sum_len_sq"),
                                                   m["response_tokens"])
        m.update(step=step, tokens_per_s=tps, tokens_per_s_per_device=tps / d.world, **peak_memory_gb(d),
                 mfu=flops / dt / d.world / peak if peak else None)
        if d.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            print(f"step {state.step}/{len(schedule)} | loss {m['loss']:.6g} | grad norm {m['grad_norm']:.4g} | "
                  f"lr {m['lr']:.3g} | {tps:.0f} tok/s | peak {m['peak_memory_gb']:.2f} GB"
                  + (f" | MFU {m['mfu']:.1%}" if m["mfu"] is not None else ""), flush=True)
        last = state.step == len(schedule)
        if last or state.step % cfg.save_every == 0 or state.step == cfg.stop_at_step:
            save_checkpoint(state, out, cfg.keep_checkpoints, run_info, d)
        if state.step == cfg.stop_at_step and not last:
            d.log(f"stopped after step {state.step} (--stop-at-step); continue with --resume")
            return {"stopped_at": state.step}
    bf16 = cfg.export_bf16 or d.device.type == "cuda"
    frac = export_model(model, tok, cfg.model, out, bf16, d)
    summary = {"steps": len(schedule), "truncated": n_cut, "model": str(out / "model"), "model_bf16": str(
               out / "model_bf16") if bf16 else None, "bf16_unchanged_fraction": frac}
    if d.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"pi_(t+1) saved in {out / 'model'} (fp32: the next --model)" + (f" and {out / 'model_bf16'} (bf16)"
              if bf16 else "") + f"; a bf16 export would leave {frac:.2%} of the weights exactly at pi_t", flush=True)
    return summary


def start_memory_tracker(model, opt):
    """FSDPMemTracker (torch.distributed._tools) on this step: peak bytes by category, on CPU and GPU alike."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    tracker = FSDPMemTracker(model, opt)
    tracker.__enter__()
    return tracker


def write_memory_report(tracker, config, cfg, seq_len, d, out):
    """OUT/memory.json: rank 0's measured peak by category next to memory_plan for the same shapes."""
    snap = tracker.get_tracker_snapshot("peak")[d.device]
    measured = {getattr(k, "value", str(k)): v for k, v in snap.items()}
    if d.rank == 0:
        plan = memory_plan(config, d.world, cfg.micro_batch * (2 if cfg.selection == "pair" else 1), seq_len,
                           cfg.optimizer,
                           compute_bytes=2 if d.device.type == "cuda" else 4, ckpt=cfg.activation_checkpointing)
        (out / "memory.json").write_text(json.dumps({"seq_len": seq_len, "measured": measured, "plan": plan}, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# CLI: runs.parse_config, the one convention (every TrainConfig field is a flag; --config FILE; choices checked).
def parse_args(argv=None):
    cfg = runs.parse_config(TrainConfig, argv, description=__doc__.split("\n")[0])
    for name, (default, why) in NOT_HERE.items():
        if getattr(cfg, name) != default:
            raise SystemExit(f"train_7b.py: --{name.replace('_', '-')} {getattr(cfg, name)}: not a setting of this "
                             f"program ({why}); leave it out")
    return cfg


def validate(cfg):
    """Before any work (and before the process group): sppo's checks, the stage's inputs, a writable OUT."""
    if cfg.model is None:
        raise runs.ConfigError("--model DIR (pi_t, a local save_pretrained directory, or a .gguf file) is required")
    if cfg.gen_engine == "vllm" and cfg.stage != "generate":
        raise runs.ConfigError(f"--stage {cfg.stage} --gen-engine vllm: vLLM frees its GPU memory only when its process"
                               f" exits; run --stage generate --gen-engine vllm as its own torchrun call, then --stage "
                               f"rank and --stage train")
    if cfg.gen_engine == "vllm" and not importlib.util.find_spec("vllm"):
        raise runs.ConfigError("--gen-engine vllm: vllm is not installed here; install requirements-vllm.txt in an "
                               "environment of its own (it may replace the pinned torch and transformers)")
    sppo.validate_config(cfg)
    if str(cfg.model).endswith(".gguf"):              # every rank converts or finds the cache; the first rename wins
        cfg.model = str(runs.gguf_checkpoint(cfg.model))
    for need, flag, stages in [(cfg.prompts, "--prompts FILE", ("generate", "rank", "all")),
                               (cfg.pairrm, "--pairrm DIR", ("rank", "all"))]:
        if need is None and cfg.stage in stages:
            raise runs.ConfigError(f"--stage {cfg.stage} needs {flag}")
    if cfg.stage == "train" and not Path(cfg.data or Path(cfg.out) / "dataset.jsonl").is_file():
        raise runs.ConfigError(f"--stage train: no dataset at {cfg.data or Path(cfg.out) / 'dataset.jsonl'}")
    if cfg.stage in ("generate", "all") and len(stage_prompts(cfg)) == 0:
        raise runs.ConfigError(f"--prompts {cfg.prompts}: no prompts for iteration {cfg.iteration}")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if not os.access(cfg.out, os.W_OK):
        raise runs.ConfigError(f"--out {cfg.out}: not writable")


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.plan:
        print_plan(cfg)
        return 0
    return runs.user_errors("train_7b.py", lambda: run(cfg))


def run(cfg):
    """Validate, then the stages of --stage in order. Generation and ranking (with D_t) are reused only when
    OUT/manifest.json shows them made with these settings and inputs (runs.Manifest, as sppo.py's run directory)."""
    validate(cfg)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    out = Path(cfg.out)
    if cfg.stage != "train":
        hashes, prompts = runs.Hashes(out), stage_prompts(cfg)

        def key(stage):                                   # on rank 0 only: OUT/hashes.json has one writer
            oracle_id = sppo.pairrm_id(cfg, hashes) if cfg.pairrm else None
            return runs.stage_key(cfg, stage, out, cfg.model, prompts, oracle_id, hashes)

        def done(stage):                                  # rank 0 reads the files and decides for all ranks
            return d.decide(lambda: runs.Manifest(out).done(stage, key(stage), hashes))

        def commit(*stages):                              # rank 0 records what it wrote, then all ranks meet
            if d.rank == 0:
                for stage in stages:
                    runs.Manifest(out).commit(stage, key(stage), hashes, len(prompts))
            d.barrier(f"the {'/'.join(stages)} record")
        if cfg.stage in ("generate", "all") and os.environ.get("RANK", "0") == "0":   # stale files: refused now,
            runs.Manifest(out).done("generate", key("generate"), hashes)             # before the process group
    d = init_distributed(cfg.collective_timeout_s, cfg.deterministic)
    if cfg.stage in ("generate", "all") and not done("generate"):
        stage_generate(cfg, d, out)
        commit("generate")
    if cfg.stage in ("rank", "all"):
        if not done("generate"):
            raise runs.ArtifactError(f"{out / 'generations.jsonl'}: not recorded in {out / 'manifest.json'}; "
                                     f"run --stage generate first")
        if not (done("rank") and done("dataset")):
            stage_rank(cfg, d, out)
            commit("rank", "dataset")
    if cfg.stage in ("train", "all"):
        summary = train(cfg, d)
        d.log(json.dumps(summary))
    shutdown()                   # reached on success only: after an exception torchrun stops the other ranks
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)                                  # see shutdown(): no exit-time teardown of the gloo threads
