"""train_7b.py: SPPO at 7B scale on one node (or many) with torch.distributed alone: FSDP2, DCP checkpoints, bf16.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. One SPPO step
trains pi_{t+1} from pi_t on D_t = {(x, y, P-hat(y > pi_t | x))} by Eq. (4.7):

    theta_{t+1} = argmin_theta  E_{D_t} [ log pi_theta(y|x)/pi_t(y|x) - eta (P-hat(y > pi_t|x) - 1/2) ]^2

sppo.py is the single-process reference: the loss, log-probs (policy.py), dataset schema (runs.py), optimizer and LR
schedule are imported, never repeated. This file adds the distributed concerns only, one function each, applied in
torchtitan's fixed order (pytorch/torchtitan, "FSDP2"); the process group and DCP checkpoints are distributed.py, the
FLOPs/MFU and memory plan costs.py:

    build on meta (--lora-rank: + fresh adapters) -> activation checkpointing -> fully_shard (embeddings, each layer,
    lm_head, root) -> materialise, pi_t's weights (and adapters) broadcast from rank 0 -> reference log-probs (pi_ref =
    pi_t, sharded, cached beside the data) -> optimizer + schedule -> load checkpoint (--resume) -> train -> DCP
    checkpoints -> fp32 save_pretrained on rank 0 (--lora-rank: the adapters merged first)

Commands (OUT must be on a filesystem every node sees: checkpoints are written by all ranks):
  # one SPPO step on 8 GPUs, from sppo.py's dataset.jsonl (ref_logp optional):
  torchrun --standalone --nproc_per_node 8 train_7b.py --model PI_T --data D_T.jsonl --out runs/7b/iter0
  # a whole Algorithm-1 iteration on the node (generate + rank on a bf16 replica per GPU, then FSDP training):
  torchrun --standalone --nproc_per_node 8 train_7b.py --stage all --model PI_T --prompts P.jsonl \
      --pairrm PAIRRM_DIR --iteration 0 --out runs/7b/iter0
  # multi-node: the same command on every node, torchrun does the rendezvous
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id sppo \
      train_7b.py --model PI_T --data D_T.jsonl --out /scratch/runs/7b/iter0
  # after a crash: the same command plus --resume.    Memory plan without a GPU:
  python train_7b.py --plan mistral-7b --world 8 --micro-batch 8 --max-length 1024
  python train_7b.py --plan-table mistral-7b llama-3-8b     # 1/2/4/8 GPUs of 24/48/80 GB, full vs LoRA
  # CPU check, 2 gloo ranks:  torchrun --standalone --nproc_per_node 2 train_7b.py --model TINY --data D.jsonl \
  #                               --out runs/t --global-batch 8 --micro-batch 2 --lr 1e-4
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.utils import logging as hf_logging
import cli
import costs
import distributed
import pairrm
import policy
import committee
import runs
import sppo
import sppo_config
import training
from cli import arg


@dataclass
class TrainConfig(sppo.SPPOConfig):
    model: str | None = arg(default=None, path="model", help="pi_t: a local save_pretrained directory (Llama or "
                            "Mistral), or a "
                              ".gguf file (converted once by runs.gguf_checkpoint, before the process group).")
    out: str = arg(default="runs/train_7b", path="out_dir", help="This iteration's directory: dataset, "
                   "checkpoints/, metrics.jsonl, model/ (a filesystem every node sees).")
    data: str | None = arg(default=None, path="file", help="D_t as JSONL in runs.DATASET_FIELDS (sppo.py's "
                           "dataset.jsonl; ref_logp optional). Default: OUT/dataset.jsonl.")
    stage: Literal["generate", "rank", "train", "all"] = arg(default="train", help="`all` = one whole Algorithm-1 "
                                                               "iteration; finished stages are skipped.")
    iteration: int = arg(default=0, help="t of Algorithm 1 for --stage generate/all: the prompt slice and seeds.")
    gen_engine: Literal["hf", "vllm"] = arg(default="hf", help="transformers generate, or vLLM (requirements/vllm"
                                              ".txt, its own environment; --stage generate only: its own torchrun).")
    ref_logp: Literal["auto", "recompute"] = arg(default="auto", help="`auto`: on GPU computed like `recompute`; on "
                                                   "CPU the dataset's ref_logp when every row has one, else computed; "
                                                   "`recompute`: computed by pi_t in the training micro-batches.")
    export_bf16: bool = arg(default=False, help="Also write OUT/model_bf16 (for serving) on CPU; always on GPU.")
    deterministic: bool = arg(default=False, help="torch.use_deterministic_algorithms(True) (+ cuBLAS/cuDNN flags).")
    activation_checkpointing: bool = arg(default=True, help="Recompute each decoder layer in backward.")
    save_every: int = arg(default=100, help="DCP checkpoint every N optimizer steps (and always at the end).")
    keep_checkpoints: int = arg(default=2, help="Newest checkpoints kept under OUT/checkpoints.")
    resume: bool = arg(default=False, help="Continue exactly from the newest checkpoint in OUT/checkpoints.")
    collective_timeout_s: float | None = arg(default=None, help="Seconds before a collective gives up (a stalled "
                                               "rank is named on CPU/gloo); default 300 on CPU, 10800 on GPU.")
    stop_at_step: int | None = arg(default=None, help="Exit after this step and its checkpoint (tests --resume).")
    measure_memory: bool = arg(default=False, help="FSDPMemTracker on the second step; writes OUT/memory.json.")
    plan: str | None = arg(default=None, help="Print the per-GPU memory plan of `mistral-7b`, `llama-3-8b` or a "
                             "config dir, and exit (no GPU needed).")
    plan_table: list[str] | None = arg(default=None, help="Print per-GPU memory on 1/2/4/8 GPUs of 24/48/80 GB, "
                                         "full fine-tuning vs LoRA r16/r64, activation checkpointing off/on, for "
                                         "these models (as --plan), at --micro-batch and 1, and exit.")
    world: int = arg(default=8, help="--plan only: GPUs the model is sharded over.")
    gpu_gb: float = arg(default=80.0, help="--plan only: GPU memory (GB) the plan must fit in.")

    NOT_HERE = {"device": ("auto", "devices come from torchrun (LOCAL_RANK)"),
                "dtype": ("float32", "compute is bf16 on GPU over fp32 master weights, fp32 on CPU"),
                "stop_after": (None, "--stage picks the stages"), "oracle": ("pairrm", "the oracle is PairRM"),
                "judges": (committee.DEFAULT_JUDGES, "the oracle is PairRM; judges are sppo.py --oracle committee's"),
                "restart_from": (None, "this program's OUT is one iteration: move stale files aside or use a new "
                                       "--out"),
                "reference": ("previous", "pi_ref is pi_t, the --model trained here; a fixed pi_0 runs in sppo.py"),
                "eval_prompts": (None, "held-out win rates are sppo.py's, per iteration; judge models with arena.py"),
                "fit_tol": (0.0, "it trains --epochs epochs, its checkpoints count steps; fitting to a tolerance is "
                                 "sppo.py's")}
    """SPPOConfig settings of sppo.py's CLI that this program does not use: any other value is refused, with why."""

    RULES = cli.left_out(NOT_HERE, "this program") + sppo.SPPOConfig.RULES + (   # the unused settings first
        # field               the test                                                 what it must be
        ("iteration",         lambda c: 0 <= c.iteration < c.iterations,               "in [0, --iterations)"),
        ("global_batch",      lambda c: c.global_batch % (c.micro_batch * world_size()) == 0,
                                                                                       "a multiple of --micro-batch x "
                                                                                       "the world size (torchrun's)"),
        ("save_every",        lambda c: c.save_every >= 1,                             ">= 1"),
        ("keep_checkpoints",  lambda c: c.keep_checkpoints >= 1,                       ">= 1"),
        ("stop_at_step",      lambda c: c.stop_at_step is None or c.stop_at_step >= 1, ">= 1"),
        ("collective_timeout_s", lambda c: c.collective_timeout_s is None or sppo_config.positive(
                                 c.collective_timeout_s),                              "finite and > 0"),
        ("stage",             lambda c: c.stage in ("train", "generate") or not (
                                 sppo.LOSSES[c.loss].models or set(sppo.LOSSES[c.loss].columns)
                                 & sppo_config.ESTIMATED),
                                 lambda c: f"train or generate with --loss {c.loss}: its D_t columns (log mu, win "
                                           f"rates against other policies) need single-process log-probs; make D_t "
                                           f"with sppo.py --loss {c.loss} --stop-after dataset, then train_7b.py "
                                           f"--data"),
        ("world",             lambda c: c.world >= 1,                                  ">= 1"),
        ("gpu_gb",            lambda c: sppo_config.positive(c.gpu_gb),                "finite and > 0"),
    )


def world_size():
    """The number of ranks torchrun starts (WORLD_SIZE), 1 outside torchrun: known before the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))




# ----------------------------------------------------------------------------------------------------------------
# Data: sppo.py's schema, with errors that name the file, the record and the field.
def load_dataset(path, cfg):
    """Rows of D_t (runs.read_dataset): ref_logp optional (then computed from pi_t); log_z when --log-z estimate."""
    return runs.read_dataset(path, need_ref=False, need_log_z=cfg.log_z == "estimate")


def resume_settings(cfg):
    """What --resume must find unchanged in the checkpoint's run.json (with pi_t's and the data's sha256): the train
    stage's settings (runs.TRAIN_SETTINGS) and the loss's own (sppo.LOSSES). A changed one is refused, named, before
    the model is built."""
    return runs.TRAIN_SETTINGS + sppo.LOSSES[cfg.loss].settings


def check_batch_sizes(cfg, world):
    """global batch = micro-batch x accumulation steps x world size (paper: 64 = 8 x 1 x 8). Returns accumulation."""
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"--global-batch {cfg.global_batch} must be a multiple of --micro-batch {cfg.micro_batch} "
                         f"x world size {world} = {cfg.micro_batch * world}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"--max-prompt-length {cfg.max_prompt_length} must be below --max-length {cfg.max_length}")
    return cfg.global_batch // (cfg.micro_batch * world)


def rank_micro_batches(idx, pairs, rank, world, cfg, group=1):
    """This rank's micro-batches of one global batch `idx` (row indices; a unit of `group` rows, a pair, stays on one
    rank and in one micro-batch). cfg.group_by_length: training.micro_batches of the whole global batch, sorted by
    length, dealt longest-first to the rank with the fewest padded tokens so far (rows x longest row) that still has
    a free slot, so ranks stay balanced; else each rank's contiguous share of idx, cut in order. Every rank gets the
    same number of micro-batches (None = a zero-weight stand-in) because every forward and backward runs FSDP
    collectives; a short last batch of an epoch leaves some ranks with less or no data."""
    if not cfg.group_by_length:                          # plain: a contiguous share per rank, in schedule order
        per = math.ceil(len(idx) / group / world) * group
        mine = idx[rank * per:(rank + 1) * per]
        return [mine[j:j + cfg.micro_batch * group] or None for j in range(0, per, cfg.micro_batch * group)]
    mbs = training.micro_batches(idx, pairs, cfg.micro_batch, group)
    slots, load, dealt = math.ceil(len(mbs) / world), [0] * world, [[] for _ in range(world)]
    cost = lambda mb: len(mb) * max(len(pairs[i][0]) + len(pairs[i][1]) for i in mb)    # noqa: E731 padded tokens
    for mb in sorted(mbs, key=cost, reverse=True):
        r = min((r for r in range(world) if len(dealt[r]) < slots), key=lambda r: load[r])
        dealt[r].append(mb)
        load[r] += cost(mb)
    return dealt[rank] + [None] * (slots - len(dealt[rank]))


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
    as in training.train_policy. Returns the units, in words."""
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


def load_weights(model, cfg, d):
    """pi_t's weights: rank 0 reads the checkpoint on CPU in fp32 and broadcasts; each rank keeps its shards.
    --lora-rank: rank 0 first gives its copy fresh adapters exactly as sppo.train does (torch.manual_seed, then
    training.add_adapters: A Kaiming-uniform, B = 0), seeded by the batch order's seed (cfg.seed, which sppo.train passes
    to train_policy as seed + t), so the adapters do not depend on the number of ranks and equal one process's.

    to_empty() leaves non-persistent buffers (the RoPE inv_freq) uninitialised, so they are rebuilt from the config.
    """
    from transformers import AutoModelForCausalLM
    full = {}
    if d.rank == 0:
        pi_t = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        if cfg.lora_rank:
            rng = torch.get_rng_state()
            torch.manual_seed(cfg.seed)
            pi_t = training.add_adapters(pi_t, cfg).get_base_model()     # the HF model, adapters in place
            torch.set_rng_state(rng)                                  # rank 0's RNG stream as without LoRA
        full = pi_t.state_dict()
        del pi_t
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_type"):
            with torch.device(d.device):
                fresh = type(mod)(config=mod.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(mod, name).copy_(buf)


def build_model(cfg, d):
    """pi_t as an FSDP2 module with fp32 master weights; works for the Llama and Mistral classes of transformers.
    --lora-rank: the adapters go in on the meta model BEFORE fully_shard (training.add_adapters, in place), so each
    lora_A/lora_B lives in its decoder layer's unit beside the frozen W it adapts; their values come with pi_t's."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=torch.float32)
        if cfg.lora_rank:
            model = training.add_adapters(model, cfg).get_base_model()      # the HF model, its Linears now LoRA layers
    if cfg.pack:
        d.log(f"packed batches: {policy.use_packed_attention(model)} attention")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    d.log("FSDP units: " + apply_fsdp(model, d.mesh, mixed_precision(d.device)))
    model.to_empty(device=d.device)
    load_weights(model, cfg, d)
    return model


def merged(full, cfg):
    """pi_{t+1} = pi_t + (alpha/r) B A as a plain state dict (rank 0, fp32 on CPU): the gathered state dict of the
    adapted model goes into a meta-built copy with the same adapters and training.merge_adapters merges it, so the export
    is what sppo.py's merge gives: pi_t's tensor names, no adapter keys."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = training.add_adapters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model),
                                                                   dtype=torch.float32), cfg)
    model.get_base_model().load_state_dict(full, assign=True)
    return training.merge_adapters(model).state_dict()


# ----------------------------------------------------------------------------------------------------------------
# pi_ref = pi_t: log pi_t(y|x) for the whole dataset, computed once by the policy before step 1, sharded over ranks.
@torch.no_grad()
def reference_logps(model, pairs, pad_id, schedule, group, cfg, d):
    """policy.sequence_logps of every pair under the unchanged policy, in the micro-batches that the first epoch's
    training steps form (rank_micro_batches of schedule): the same rows padded together, the same precision (the
    FSDP policy itself, bf16 on GPU), so at the first visit of a row log pi_theta/pi_ref starts at exactly 0. Later
    epochs batch rows differently: on GPU a row's bf16 log-prob there can differ from pi_ref's by rounding."""
    out = {}
    model.eval()
    for idx in schedule[:math.ceil(len(pairs) // group / cfg.global_batch)]:      # epoch 1 covers every row once
        for mb in rank_micro_batches(idx, pairs, d.rank, d.world, cfg, group):
            b = policy.collate([pairs[i] for i in mb or idx[:group]], pad_id,       # a stand-in keeps ranks in step
                               multiple=policy.pad_multiple(d.device), packed=cfg.pack)   # as make_batch does
            lps = policy.sequence_logps(model, **{k: v.to(d.device) for k, v in b.items()})
            out.update(zip(mb or [], lps.tolist()))
    model.reshard()                                       # the root stays unsharded after a no_grad forward
    shards = [None] * d.world
    dist.all_gather_object(shards, out)
    merged = {i: lp for s in shards for i, lp in s.items()}
    return [merged[i] for i in range(len(pairs))]


def reference_for(model, rows, pairs, pad_id, schedule, group, cfg, d, data_path, model_id):
    """ref_logp per row: the dataset's own (--ref-logp auto on CPU only, and only when every row's ref_by shows it
    was computed by this pi_t (`model_id`, its hash), in this dtype, with this truncation: sppo.py records it), or
    OUT/ref_logp.json when it was made for this model (by hash: a re-export to the same path is another model), data,
    truncation and computation (dtype, device, batching: rank 0 decides), or computed and cached there by rank 0, so
    a restart does not recompute them."""
    dtype = str(mixed_precision(d.device).param_dtype or torch.float32).removeprefix("torch.")
    mine = sppo.ref_by(cfg, model_id, dtype)
    if cfg.ref_logp == "auto" and d.device.type == "cpu" and all("ref_logp" in r for r in rows):
        if all(r.get("ref_by") == mine for r in rows):
            return [r["ref_logp"] for r in rows], "dataset"
        d.log(f"{data_path}: ref_logp made by {next(r.get('ref_by') for r in rows if r.get('ref_by') != mine)}, not "
              f"by this policy ({mine}); recomputing")
    cache = Path(cfg.out) / "ref_logp.json"
    key = {"model": model_id, "data_sha256": file_sha256(data_path), "max_length":
           cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "truncation": cfg.truncation,
           "device": d.device.type, "dtype": dtype, "batching": {k: getattr(cfg, k) for k in
           ("global_batch", "micro_batch", "group_by_length", "pack", "seed", "selection")} | {"world": d.world}}
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
    """Same arithmetic as training.train_policy: sum of per-example losses / len(idx), summed over micro-batches
    (local accumulation) and ranks (reduce-scatter with SUM), then global-norm clipping, optimizer and LR step.
    before_micro: called before each micro-batch (--measure-memory resets the tracker's per-module stats)."""
    opt.zero_grad(set_to_none=True)
    stats = torch.zeros(4, dtype=torch.float64, device=d.device)   # [sum of losses, tokens, sum T_i^2, responses]
    for mb in rank_micro_batches(idx, pairs, d.rank, d.world, cfg, group):
        if before_micro:
            before_micro()
        b = training.make_batch(pairs, rows, mb or idx[:group], pad_id, cfg, d.device)   # a stand-in: one whole pair
        losses = training.example_losses(model, b, cfg)                               # (micro,) cfg.loss
        (losses.sum() * (1.0 if mb else 0.0) / len(idx)).backward()
        if mb:
            lengths = (b["cu_seq_lens"].diff() if cfg.pack else b["attention_mask"].sum(-1)).double()   # (micro,) T_i
            stats += torch.stack([losses.detach().sum().double(), lengths.sum(), (lengths ** 2).sum(),
                                  b["response_mask"].sum().double()])
    dist.all_reduce(stats)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)  # a collective on DTensors
    gnorm = float(gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm)
    loss = stats[0].item() / len(idx)
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise training.DivergedError(f"loss {loss}, grad norm {gnorm} is not finite; stopped before the update")
    lr = sched.get_last_lr()[0]                                                       # the rate of this step
    opt.step()
    sched.step()
    return {"loss": loss, "grad_norm": gnorm, "lr": lr, "tokens": int(stats[1]),
            "sum_len_sq": int(stats[2]), "response_tokens": int(stats[3])}


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, steps 1-3 on the node: each rank generates / ranks its shard on a full replica; rank 0 gathers.


def free_device_memory(device):
    """Release a replica before the next stage (the caller dropped its references)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_replica(path, cfg, device):
    """A full generation replica. On GPU straight onto this rank's device (device_map; needs accelerate, see
    requirements/gpu.txt), so 8 ranks never hold 8 host copies of pi_t at once (~116 GB at 7B). On CPU (or without
    accelerate) runs.load_policy: load on the host, then move."""
    if device.type == "cuda" and importlib.util.find_spec("accelerate"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return (AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), device_map={"": device}),
                AutoTokenizer.from_pretrained(path))
    return runs.load_policy(path, cfg, device)


def generate_vllm(cfg, model_dir, tokenizer, prompts, indices):
    """Optional engine: vLLM on this rank's GPU (tensor parallel 1), in a --stage generate call of its own (vLLM
    frees its GPU memory only when the process exits; validate() refuses other stages). Same prompt tokens and text
    convention as policy.generate_responses; finished = stopped on EOS. Each request is seeded by policy.sample_seed of
    its global prompt index, so the samples do not depend on the number of GPUs. Not exercised by the CPU tests."""
    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, dtype="bfloat16", seed=cfg.seed, tensor_parallel_size=1,
              distributed_executor_backend="external_launcher")
    sp = [SamplingParams(n=cfg.K, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                         seed=policy.sample_seed(cfg.seed, cfg.iteration, i) % 2 ** 31, skip_special_tokens=False)
          for i in indices]
    outs = llm.generate([{"prompt_token_ids": policy.prompt_ids(tokenizer, p)} for p in prompts], sp)
    from transformers import GenerationConfig
    gen_cfg = GenerationConfig.from_pretrained(model_dir) if (Path(model_dir) / "generation_config.json").is_file() \
        else None
    stop = set(policy.eos_ids(SimpleNamespace(generation_config=gen_cfg), tokenizer))
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
    policy.generate_responses under sppo's seeding rule (keyed by the batch's first global prompt index), so the
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
        gens = [g for s in starts for g in policy.generate_responses(model, tok, prompts[s:s + cfg.gen_batch], gcfg,
                                                                    cfg.iteration, d.device, start=s)]
        del model
    free_device_memory(d.device)
    gens = distributed.gather_to_rank0(dict(zip(mine, gens)), d)
    if d.rank == 0:
        runs.write_generations(out / "generations.jsonl", prompts, [gens[i] for i in range(len(prompts))])
    d.barrier("generation")


def stage_rank(cfg, d, out):
    """Steps 2-3: each rank fills the K x K matrices of its prompts with the oracle (PairRM, sppo.ORACLES);
    rank 0 writes OUT/preferences.jsonl and D_t = OUT/dataset.jsonl (sppo.build_dataset; ref_logp comes later)."""
    prompts = stage_prompts(cfg)
    gens = runs.read_generations(out / "generations.jsonl", prompts, cfg.K)
    mine = list(range(d.rank, len(gens), d.world))
    oracle = sppo.ORACLES[cfg.oracle](cfg, d.device, runs.Hashes(out))
    xs = sppo.oracle_prompts([prompts[i] for i in mine], cfg, cfg.model)             # --oracle-prompt raw/templated
    mats, logits = sppo.rank(oracle, xs, [gens[i] for i in mine], progress=False)
    del oracle
    free_device_memory(d.device)
    P = distributed.gather_to_rank0(dict(zip(mine, zip(mats, logits or [None] * len(mats)))), d)
    if d.rank == 0:
        mats, logits = [P[i][0] for i in range(len(gens))], [P[i][1] for i in range(len(gens))]
        logits = None if logits[0] is None else logits
        runs.write_preferences(out / "preferences.jsonl", mats, logits)

    def write_dataset():             # rank 0; build_dataset's error (every prompt tied) is raised on every rank
        runs.write_jsonl(out / "dataset.jsonl", sppo.build_dataset(prompts, gens, mats, cfg, logits,
                                                                   out / "preferences.jsonl"))
    d.decide(write_dataset)
    d.barrier("ranking")


# ----------------------------------------------------------------------------------------------------------------
# Training: pi_t -> pi_{t+1} on D_t (Eq. 4.7).
def train(cfg, d):
    """The whole training stage on every rank. Returns a summary dict; the FSDP objects die with this frame."""
    from transformers import AutoTokenizer
    out, data = Path(cfg.out), Path(cfg.data or Path(cfg.out) / "dataset.jsonl")
    accumulation = check_batch_sizes(cfg, d.world)
    ckpt = d.decide(lambda: (distributed.checkpoints(out) or [None])[-1])   # rank 0 picks it for all ranks
    if ckpt and not cfg.resume:
        raise runs.ArtifactError(f"{out / 'checkpoints'} has checkpoints: pass --resume, or use a new --out")
    rows = load_dataset(data, cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = policy.pad_id(tok)
    pairs, n_cut = training.encode_rows(tok, rows, cfg)
    schedule, total, group = training.train_schedule(rows, cfg)                 # pairs stay in one micro-batch
    run_info = {"model": d.decide(lambda: runs.Hashes(out)(cfg.model)), "data_sha256": file_sha256(data),
                "total_steps": len(schedule), **{k: getattr(cfg, k) for k in resume_settings(cfg)}}
    saved = d.decide(lambda: distributed.check_run_info(ckpt, run_info)) if ckpt else None   # before the model
    d.log(f"{data}: {len(rows)} rows; {n_cut} truncated ({cfg.truncation} rule, max_length {cfg.max_length}, "
          f"max_prompt_length {cfg.max_prompt_length}); none skipped")
    model = build_model(cfg, d)                                       # meta -> AC -> fully_shard -> pi_t
    ref, source = reference_for(model, rows, pairs, pad_id, schedule, group, cfg, d, data, run_info["model"])
    for r, lp in zip(rows, ref):
        r["ref_logp"] = lp
    runs.check_dataset(rows, data)
    d.log(f"reference log-probs (pi_ref = pi_t): {source}")
    trainable = [p for p in model.parameters() if p.requires_grad]     # LoRA: A and B only; W stays frozen
    opt = training.make_optimizer(trainable, cfg)                          # on the sharded (DTensor) parameters
    sched = training.make_scheduler(opt, total, cfg.warmup_ratio)       # may run past the steps trained
    state = distributed.TrainState(model, opt, sched, d)
    if ckpt:
        distributed.load_checkpoint(state, ckpt, saved, d)
        d.log(f"resumed from {ckpt} at step {state.step}")
    elif cfg.resume:
        d.log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting at step 0")
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in trainable)
    lora = f"; LoRA rank {cfg.lora_rank}: {n_trained / 1e6:.3f} M trained" if cfg.lora_rank else ""
    peak = costs.peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    metrics_path = out / "metrics.jsonl"
    if d.rank == 0:                                    # a resumed run's log continues where the checkpoint was
        old = runs.read_jsonl(metrics_path) if metrics_path.is_file() else []
        runs.write_jsonl(metrics_path, [m for m in old if m["step"] < state.step])
    d.log(f"{n_params / 1e6:.2f} M params{lora} on {d.world} ranks ({d.device.type}); {len(schedule)} steps (LR "
          f"schedule {total}) of {cfg.global_batch} {'pairs' if group == 2 else 'rows'} = {cfg.micro_batch} x "
          f"{accumulation} x {d.world}; optimizer {cfg.optimizer}; "
          f"collective timeout {d.timeout.total_seconds():.0f} s; deterministic algorithms {cfg.deterministic}")
    model.train()
    measure_at = min(state.step + 1, len(schedule) - 1) if cfg.measure_memory else -1   # optimizer state exists
    for step in range(state.step, len(schedule)):
        tracker = costs.start_memory_tracker(model, opt) if step == measure_at else None
        costs.sync(d.device, reset_peak=True)
        t0 = time.perf_counter()
        m = train_step(model, opt, sched, pairs, rows, schedule[step], pad_id, group, cfg, d,
                       tracker.reset_mod_stats if tracker is not None else None)
        costs.sync(d.device)
        dt = time.perf_counter() - t0
        if tracker is not None:
            tracker.__exit__(None, None, None)
            seq_len = max(sum(map(len, pairs[i])) for i in schedule[step])
            costs.write_memory_report(tracker, model.config, cfg, seq_len, d, out)
        state.step = step + 1
        tps, flops = m["tokens"] / dt, costs.step_flops(model.config, n_params, m["tokens"], m.pop("sum_len_sq"),
                                                   m["response_tokens"])
        m.update(step=step, tokens_per_s=tps, tokens_per_s_per_device=tps / d.world, **costs.peak_memory_gb(d),
                 mfu=flops / dt / d.world / peak if peak else None)
        if d.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            print(f"step {state.step}/{len(schedule)} | loss {m['loss']:.6g} | grad norm {m['grad_norm']:.4g} | "
                  f"lr {m['lr']:.3g} | {tps:.0f} tok/s | peak {m['peak_memory_gb']:.2f} GB"
                  + (f" | MFU {m['mfu']:.1%}" if m["mfu"] is not None else ""), flush=True)
        last = state.step == len(schedule)
        if last or state.step % cfg.save_every == 0 or state.step == cfg.stop_at_step:
            distributed.save_checkpoint(state, out, cfg.keep_checkpoints, run_info, d)
        if state.step == cfg.stop_at_step and not last:
            d.log(f"stopped after step {state.step} (--stop-at-step); continue with --resume")
            return {"stopped_at": state.step}
    bf16 = cfg.export_bf16 or d.device.type == "cuda"
    plain = (lambda full: merged(full, cfg)) if cfg.lora_rank else None          # LoRA: exported merged
    frac = distributed.export_model(model, tok, cfg.model, out, bf16, d, plain)
    summary = {"steps": len(schedule), "truncated": n_cut, "model": str(out / "model"), "model_bf16": str(
               out / "model_bf16") if bf16 else None, "bf16_unchanged_fraction": frac}
    if d.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"pi_(t+1) saved in {out / 'model'} (fp32: the next --model)" + (f" and {out / 'model_bf16'} (bf16)"
              if bf16 else "") + f"; a bf16 export would leave {frac:.2%} of the weights exactly at pi_t", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# CLI: cli.main, the one convention (every TrainConfig field is a flag; --config FILE; RULES checked before work).
def validate(cfg):
    """Before any work (and before the process group): sppo's checks, the stage's inputs, a writable OUT."""
    if cfg.model is None:
        raise runs.ConfigError("--model DIR (pi_t, a local save_pretrained directory, or a .gguf file) is required")
    if cfg.gen_engine == "vllm" and cfg.stage != "generate":
        raise runs.ConfigError(f"--stage {cfg.stage} --gen-engine vllm: vLLM frees its GPU memory only when its process"
                               f" exits; run --stage generate --gen-engine vllm as its own torchrun call, then --stage "
                               f"rank and --stage train")
    if cfg.gen_engine == "vllm" and not importlib.util.find_spec("vllm"):
        raise runs.ConfigError("--gen-engine vllm: vllm is not installed here; install requirements/vllm.txt in an "
                               "environment of its own (it may replace the pinned torch and transformers)")
    sppo.validate_config(cfg)
    if str(cfg.model).endswith(".gguf"):              # every rank converts or finds the cache; the first rename wins
        cfg.model = str(runs.gguf_checkpoint(cfg.model))
    training.check_lora_targets(cfg)                      # --lora-targets against pi_t's modules, before any rank starts
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
    def work(cfg):
        if cfg.plan:
            costs.print_plan(cfg)
            return 0
        if cfg.plan_table:
            costs.print_plan_table(cfg)
            return 0
        return run(cfg)
    return cli.main("train_7b.py", TrainConfig, work, argv, description=__doc__.split("\n")[0])


def stage_key(cfg, stage, prompts, hashes):
    """runs.stage_key of OUT's stage, with the engine that samples: --gen-engine hf is sppo.py's sampler (its
    generations are reused by either script), vLLM's samples are other draws and are recorded as such."""
    oracle_id = pairrm.PairRMOracle.identity_of(hashes(cfg.pairrm), cfg.pairrm_mode) if cfg.pairrm else None
    key = runs.stage_key(cfg, stage, Path(cfg.out), cfg.model, prompts, oracle_id, hashes)
    if stage == "generate" and cfg.gen_engine != "hf":
        key["sampler"] = f"{cfg.gen_engine} {importlib.metadata.version(cfg.gen_engine)}, seeded per prompt"
    return key


def generations_recorded(cfg, prompts, hashes, reader):
    """OUT's generations are recorded with this run's generate key (runs.Manifest.done). reader=True, for the rank
    stage that reads them: made by either engine (the sampler is recorded, not required: the samples of a --stage
    generate --gen-engine vllm call are ranked by a later --stage rank, which runs with the default engine)."""
    return runs.Manifest(cfg.out).done("generate", stage_key(cfg, "generate", prompts, hashes), hashes,
                                       ignore=("sampler",) if reader else ())


def run(cfg):
    """Validate, then the stages of --stage in order. Generation and ranking (with D_t) are reused only when
    OUT/manifest.json shows them made with these settings and inputs (runs.Manifest, as sppo.py's run directory)."""
    validate(cfg)
    if os.environ.get("RANK", "0") == "0":             # one run per OUT: rank 0 holds OUT/.lock until it exits
        runs.lock_run_dir(cfg.out)
    hf_logging.disable_progress_bar()
    out = Path(cfg.out)
    if cfg.stage != "train":
        hashes, prompts = runs.Hashes(out), stage_prompts(cfg)

        def key(stage):                                   # on rank 0 only: OUT/hashes.json has one writer
            return stage_key(cfg, stage, prompts, hashes)

        def done(stage):                                  # rank 0 reads the files and decides for all ranks
            return d.decide(lambda: runs.Manifest(out).done(stage, key(stage), hashes))

        def commit(*stages):                              # rank 0 records what it wrote, then all ranks meet
            if d.rank == 0:
                for stage in stages:
                    runs.Manifest(out).commit(stage, key(stage), hashes, len(prompts))
            d.barrier(f"the {'/'.join(stages)} record")
        if cfg.stage in ("generate", "all") and os.environ.get("RANK", "0") == "0":   # stale files: refused now,
            runs.Manifest(out).done("generate", key("generate"), hashes)             # before the process group
    d = distributed.init_distributed(cfg.collective_timeout_s, cfg.deterministic)
    if cfg.stage in ("generate", "all") and not done("generate"):
        stage_generate(cfg, d, out)
        commit("generate")
    if cfg.stage in ("rank", "all"):
        if not d.decide(lambda: generations_recorded(cfg, prompts, hashes, reader=True)):
            raise runs.ArtifactError(f"{out / 'generations.jsonl'}: not recorded in {out / 'manifest.json'}; "
                                     f"run --stage generate first")
        if not (done("rank") and done("dataset")):
            stage_rank(cfg, d, out)
            commit("rank", "dataset")
    if cfg.stage in ("train", "all"):
        summary = train(cfg, d)
        d.log(json.dumps(summary))
    distributed.shutdown()       # reached on success only: after an exception torchrun stops the other ranks
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)                         # see distributed.shutdown: no exit-time teardown of the gloo threads
