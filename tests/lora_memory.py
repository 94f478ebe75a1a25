"""The memory plan's LoRA terms, measured: FSDPMemTracker on a tiny model with peft LoRA adapters under FSDP2.

    torchrun --standalone --nproc_per_node 2 tests/lora_memory.py MODEL_DIR OUT.json RANK {rmsprop,adamw}

The model is sharded as train_7b.py shards it (apply_activation_checkpointing, then apply_fsdp: each unit, then
the root) after peft has put adapters on costs.LORA_TARGETS; the base is frozen, the optimizer (training.make_optimizer)
holds the adapters alone. Two steps of losses.sppo_loss on 2 rows x 48 tokens per rank; the tracker watches the second
(the optimizer state exists), resetting its per-module stats before the micro-batch as train_7b --measure-memory
does. Rank 0 writes {"measured": the peak by category, "after_step": the categories after the optimizer step (the
sharded grads are all there), "plan": costs.memory_plan with fp32 compute (CPU)}.
tests/test_costs.py compares them. (Independent of train_7b.py's own --lora-rank, which this does not use.)
"""
import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import costs  # noqa: E402
import distributed  # noqa: E402
import losses  # noqa: E402
import policy  # noqa: E402
import sppo  # noqa: E402
import train_7b  # noqa: E402
import training  # noqa: E402

ROWS, T = 2, 48


def main(model_dir, out, rank, optimizer):
    d = distributed.init_distributed()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=list(costs.LORA_TARGETS)))
    train_7b.apply_activation_checkpointing(model)
    train_7b.apply_fsdp(model, d.mesh, MixedPrecisionPolicy())          # the HF model is the root, adapters inside
    opt = training.make_optimizer([p for p in model.parameters() if p.requires_grad],
                              sppo.SPPOConfig(optimizer=optimizer, lr=1e-3))
    g = torch.Generator().manual_seed(d.rank)
    ids = torch.randint(3, model.config.vocab_size, (ROWS, T), generator=g)          # (B, T)
    mask, response = torch.ones(ROWS, T, dtype=torch.long), torch.zeros(ROWS, T, dtype=torch.long)
    response[:, T // 2:] = 1                                                          # the second half answers
    model.train()
    for step in range(2):
        tracker = costs.start_memory_tracker(model, opt) if step == 1 else None
        opt.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.reset_mod_stats()
        logp = policy.sequence_logps(peft_model, ids, mask, response)                 # (B,) through the root
        losses.sppo_loss(logp, logp.detach() - 1.0, torch.full((ROWS,), 0.6), 10.0).sum().backward()
        opt.step()
        if tracker is not None:
            after = tracker.get_tracker_snapshot()[d.device]          # now: every sharded adapter grad is there
            tracker.__exit__(None, None, None)
    snap = tracker.get_tracker_snapshot("peak")[d.device]
    measured = {getattr(k, "value", str(k)): v for k, v in snap.items()}
    after = {getattr(k, "value", str(k)): v for k, v in after.items()}
    if d.rank == 0:
        plan = costs.memory_plan(model.config, d.world, ROWS, T, optimizer, compute_bytes=4, ckpt=True,
                                 lora_rank=rank)
        Path(out).write_text(json.dumps({"measured": measured, "after_step": after, "plan": plan}, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    model_dir, out, rank, optimizer = sys.argv[1:]
    main(model_dir, out, int(rank), optimizer)
    sys.stdout.flush()
    os._exit(0)                                 # as train_7b.py: no exit-time teardown of the gloo threads
