"""What one training step costs: FLOPs (for throughput and MFU) and memory (planned per GPU, and measured).

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675: the paper trains
Mistral-7B and Llama-3-8B on 8 x A100. train_7b.py logs step_flops / peak_flops as MFU and peak_memory_gb every step;
`python train_7b.py --plan mistral-7b --world 8 --micro-batch 8 --max-length 1024` prints memory_plan without a GPU;
`python train_7b.py --plan-table mistral-7b llama-3-8b` its totals on 1-8 GPUs of 24-80 GB, full fine-tuning vs LoRA;
--measure-memory writes FSDPMemTracker's measured peak beside the plan (write_memory_report); bench.py reuses them.
"""
from __future__ import annotations

import json
import resource

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------
# Models by name: the published configs (config.json of the hub repos), so --plan needs no download.
_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False)


PUBLISHED = {"mistral-7b": ("mistral", dict(_7B, vocab_size=32000, rope_theta=1e6, max_position_embeddings=32768,
                                            sliding_window=None)),
             "llama-3-8b": ("llama", dict(_7B, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192))}
"""Mistral-7B-Instruct-v0.2 and Llama-3-8B-Instruct."""


def model_config(name):
    """A transformers config: a PUBLISHED name or a local model/config directory."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig
    if name in PUBLISHED:
        arch, kw = PUBLISHED[name]
        return {"llama": LlamaConfig, "mistral": MistralConfig}[arch](**kw)
    return AutoConfig.from_pretrained(name)


def param_counts(config):
    """(N, params of one decoder layer, params outside the layers) from a model built on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    n, layer = sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.model.layers[0].parameters())
    return n, layer, n - config.num_hidden_layers * layer


# ----------------------------------------------------------------------------------------------------------------
# FLOPs: what a step computes, and the GPU's peak (MFU = achieved / peak).
def step_flops(config, n_params, tokens, sum_len_sq, response_tokens):
    """Training FLOPs of one optimizer step (forward + backward; recomputation not counted: MFU, not HFU), summed
    over the global batch's rows i, each of T_i real tokens (no padding) with R_i response tokens:

        6 N_body sum_i T_i  +  12 L h sum_i T_i^2  +  6 V d sum_i R_i

    N_body = N - V d (tied embeddings) or N - 2 V d: the matmul weights the tokens run through (the embedding is a
    lookup); the attention scores are PaLM's 12 L h T per token at the row's own length T_i (Chowdhery et al. 2022,
    App. B; h = heads x head_dim); the lm_head (V x d) runs only on the kept positions, the response tokens
    (logits_to_keep in policy.sequence_logps)."""
    V, d, L = config.vocab_size, config.hidden_size, config.num_hidden_layers
    h = config.num_attention_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    n_body = n_params - V * d * (1 if config.tie_word_embeddings else 2)
    return 6 * n_body * tokens + 12 * L * h * sum_len_sq + 6 * V * d * response_tokens


def encoder_flops(config, lengths, attention=True):
    """Forward FLOPs of a DeBERTa encoder (PairRM's backbone, He et al. 2021, arXiv 2006.03654) over rows of T_i real
    tokens each (no padding), counted as MFU counts: the model's work, not an implementation's:

        sum_i  2 L T_i (4 d^2 + 2 d I)  +  8 L d T_i^2

    The linears q, k, v, o (d x d) and the MLP (d x I, I x d) per token; attention 2 d T^2 for each of the content
    scores q.k, the c2p and p2c terms (one d-long product per (i, j), as q.k) and probs.v. Not counted: the
    projections of the relative position embeddings (per layer, shared by every row of a batch: the redundant work a
    one-row-at-a-time caller repeats), embeddings, layer norms and PairRM's head (2 d^2 per row, < 0.1%).
    attention=False: the linears alone."""
    d, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens, sq = sum(int(t) for t in lengths), sum(int(t) ** 2 for t in lengths)
    return 2 * L * tokens * (4 * d * d + 2 * d * inter) + (8 * L * d * sq if attention else 0)


PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("H800", 989e12), ("A100", 312e12), ("A800", 312e12)]
"""Dense bf16 tensor-core peak by device-name substring (first match wins), from NVIDIA's data sheets."""


def peak_flops(device_name):
    """bf16 dense peak of a GPU (torch.cuda.get_device_name) from PEAK_BF16_FLOPS, or None (unknown: no MFU)."""
    return next((f for key, f in PEAK_BF16_FLOPS if key in device_name), None)


# ----------------------------------------------------------------------------------------------------------------
# Memory: the per-GPU plan of FSDP2 training (--plan) and what a run measures (peak, FSDPMemTracker).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Linear layers LoRA adapts by default (--lora-targets; sppo_config.LORA_TARGETS is this tuple): every attention
and MLP projection of a Llama/Mistral decoder layer."""


def lora_param_counts(config, rank, targets=LORA_TARGETS):
    """(N_A, adapter params of one decoder layer, adapted Linears per layer): rank x (d_in + d_out) for every
    nn.Linear of a decoder layer whose name ends in one of `targets` (peft's lora_A is d_in -> r, lora_B r -> d_out,
    no bias), found in a model built on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    linears = [mod for name, mod in m.model.layers[0].named_modules()
               if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets]
    layer = sum(rank * (mod.in_features + mod.out_features) for mod in linears)
    return config.num_hidden_layers * layer, layer, len(linears)


def memory_plan(config, world, micro_batch, seq_len, optimizer="rmsprop", compute_bytes=2, ckpt=True, lora_rank=0,
                lora_targets=LORA_TARGETS):
    """Per-GPU bytes of each term of FSDP2 training, for one micro-batch of micro_batch x seq_len tokens.

    W = world, c = compute_bytes (2 for bf16 compute on GPU, 4 for fp32 on CPU), N = the model's params, B T =
    micro_batch x seq_len tokens, L layers of width d, MLP width I, vocab V; a "unit" is what apply_fsdp shards
    together (a decoder layer, or the V d embedding / lm_head when untied; the root holds the rest).

    Full fine-tuning (lora_rank = 0), every parameter trained:
        fp32 params 4N/W + fp32 grads 4N/W + optimizer state (RMSprop 4N/W, AdamW 8N/W), sharded;
        unsharded params in flight c (root + 2 units: the one running and the one prefetched);
        unsharded grads of one unit c, plus its fp32 reduce-scatter buffer 4.
    LoRA (lora_rank = r > 0; Hu et al. 2021, arXiv 2106.09685), the adapters alone trained. N_A = sum over the
    targeted Linears (lora_targets, in each layer) of r (d_in + d_out) (lora_param_counts):
        frozen base cN/W, sharded in the compute dtype (no fp32 master: it never changes);
        fp32 adapters 4N_A/W + their fp32 grads 4N_A/W + optimizer state of the adapters (4 or 8 N_A/W), sharded;
        unsharded params in flight c (root + 2 units, adapters included);
        unsharded adapter grads of one unit (c + 4) per adapter param (the base gets no gradient);
        no pi_ref copy in either case: D_t carries ref_logp (pi_ref = pi_t).
    Activations, both cases (LoRA's x A^T, r per token per targeted Linear, c bytes, come on top): the tensors
    autograd saves in a Llama/Mistral layer (SDPA without the T^2 matrix; GQA keys and values repeated to all
    heads), per token 4d fp32 + c d at each of 2 RMSNorms, c(6d + 4 d_kv) around attention, 4 c I in the SwiGLU
    MLP; with activation checkpointing (ckpt) the L layer inputs c B T d, plus one layer's saved tensors
    recomputed in backward; without, all L layers' saved tensors. A frozen Linear's input is still saved: the
    adapter beside it reads the same tensor (peft's lora_dropout = 0 is an identity; dropout > 0 would add a
    dropped copy c d_in per token per targeted Linear, not counted).
    Logits: the (B T, V) logits twice in c + their fp32 upcast 4, and the fp32 log-softmax of up to 4096 rows
    saved twice (policy.sequence_logps works in chunks).
    """
    n, n_layer, n_root = param_counts(config)
    d, L, V, I = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    n_a, a_layer, n_targets = lora_param_counts(config, lora_rank, lora_targets) if lora_rank else (0, 0, 0)
    n_layer += a_layer                                                           # a decoder layer's unit
    if not config.tie_word_embeddings:      # apply_fsdp: embed_tokens and lm_head (V d each) are units of their own
        n_root, n_layer = n_root - 2 * V * d, max(n_layer, V * d)                  # n_layer: the largest unit
    d_kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    c, tok = compute_bytes, micro_batch * seq_len
    layer_acts = tok * (2 * (4 * d + c * d) + c * (6 * d + 4 * d_kv) + 4 * c * I)
    state = {"rmsprop": 4, "adamw": 8}[optimizer]
    if lora_rank:
        weights = {
            f"sharded frozen base ({c}N/W)": c * n / world,
            "sharded fp32 adapters (4N_A/W)": 4 * n_a / world,
            "sharded fp32 adapter grads (4N_A/W)": 4 * n_a / world,
            f"{optimizer} state of adapters ({state}N_A/W)": state * n_a / world,
            "unsharded params: root + 2 units in flight": c * (n_root + 2 * n_layer),
            "unsharded adapter grads in flight (+ fp32 reduce)": (c + 4) * a_layer,
        }
        lora_acts = c * tok * lora_rank * n_targets * (1 if ckpt else L)
    else:
        weights = {
            "sharded fp32 params (4N/W)": 4 * n / world,
            "sharded fp32 grads (4N/W)": 4 * n / world,
            f"{optimizer} state ({state}N/W)": state * n / world,
            "unsharded params: root + 2 units in flight": c * (n_root + 2 * n_layer),
            "unsharded grads in flight (+ fp32 reduce)": (c + 4) * max(n_root, n_layer),
        }
    return {
        **weights,
        "activations: layer inputs kept (L B T d)" if ckpt else "activations: all layers":
            L * tok * d * c if ckpt else L * layer_acts,
        "activations: 1 layer recomputed in backward": layer_acts if ckpt else 0,
        **({"activations: LoRA x A^T (r per token per target)": lora_acts} if lora_rank else {}),
        "logits (2 copies) + fp32 log-softmax saved": tok * V * (2 * c + 4) + 2 * 4 * min(tok, 4096) * V,
    }


def print_plan(cfg):
    """The --plan table: every term, the total, and whether it fits in --gpu-gb."""
    config = model_config(cfg.plan)
    n = param_counts(config)[0]
    rows = cfg.micro_batch * (2 if cfg.selection == "pair" else 1)           # a pair is 2 sequences
    rank = getattr(cfg, "lora_rank", 0)                                      # --lora-rank, where it exists
    plan = memory_plan(config, cfg.world, rows, cfg.max_length, cfg.optimizer, lora_rank=rank)
    total = sum(plan.values())
    print(f"memory plan per GPU: {cfg.plan} ({n / 1e9:.2f} B params, {config.num_hidden_layers} layers, vocab "
          f"{config.vocab_size}), {cfg.world} GPUs, micro-batch {cfg.micro_batch} "
          f"{'pairs' if rows > cfg.micro_batch else 'rows'} = {rows} x {cfg.max_length} tokens, "
          f"{cfg.optimizer}, bf16 compute / " + (f"LoRA rank {rank}" if rank else "fp32 master weights")
          + ", activation checkpointing")
    for k, v in plan.items():
        print(f"  {k:<46} {v / 1e9:7.2f} GB")
    fits = "yes" if total / 1e9 < cfg.gpu_gb else "NO"
    print(f"  {'total':<46} {total / 1e9:7.2f} GB   fits in {cfg.gpu_gb:g} GB: {fits} ({cfg.gpu_gb - total / 1e9:.1f} "
          f"GB left for the CUDA context, NCCL buffers, allocator fragmentation)")
    return plan


PLAN_WORLDS, PLAN_GPU_GB = (1, 2, 4, 8), (24, 48, 80)
"""--plan-table's grid: GPU counts, and GPU sizes in GB (a "24 GB" card holds 24 GiB = 25.8 GB: the plan's totals,
in 1e9 bytes, are compared with the nominal size, which leaves ~7% for the CUDA context, NCCL buffers and the
allocator's fragmentation)."""
PLAN_METHODS = (("full", 0), ("LoRA r16", 16), ("LoRA r64", 64))
"""Full fine-tuning (the paper's), then LoRA on LORA_TARGETS at rank 16 and 64."""


def plan_table(names, micro_batches, seq_len, optimizer="rmsprop", pair=True):
    """The rows of --plan-table: for each model, micro-batch, method (PLAN_METHODS) and activation checkpointing
    (off, on), the per-GPU total of memory_plan (bf16 compute) on each of PLAN_WORLDS GPUs. A row is a dict:
    model, micro_batch (pairs when pair, else rows), method, lora_rank, ckpt, gb {world: GB}."""
    rows = []
    for name in names:
        config = model_config(name)
        for mb in micro_batches:
            for method, rank in PLAN_METHODS:
                for ckpt in (False, True):
                    gb = {w: sum(memory_plan(config, w, mb * (2 if pair else 1), seq_len, optimizer, ckpt=ckpt,
                                             lora_rank=rank).values()) / 1e9 for w in PLAN_WORLDS}
                    rows.append(dict(model=name, micro_batch=mb, method=method, lora_rank=rank, ckpt=ckpt, gb=gb))
    return rows


def fits(gb, gpu_gb):
    """A plan total (GB, 1e9 bytes) fits a GPU of gpu_gb nominal GB (see PLAN_GPU_GB)."""
    return gb < gpu_gb


def plan_table_markdown(rows, unit="pairs"):
    """Two markdown tables: per-GPU GB of every row with the GPU sizes it fits, and per GPU count and size the
    first recipe that fits for each model, in the order full fine-tuning, LoRA r64, LoRA r16, then the larger
    micro-batch, then without activation checkpointing (faster) before with it."""
    sizes = "/".join(map(str, PLAN_GPU_GB))
    lines = [f"| model | micro-batch ({unit}) | method | act. ckpt | "
             + " | ".join(f"{w} GPU{'s' if w > 1 else ''}: GB, fits {sizes}" for w in PLAN_WORLDS) + " |",
             "|---|---:|---|---|" + "---|" * len(PLAN_WORLDS)]
    for r in rows:
        cells = [f"{r['gb'][w]:.1f}, " + (", ".join(str(g) for g in PLAN_GPU_GB if fits(r["gb"][w], g)) or "none")
                 for w in PLAN_WORLDS]
        lines.append(f"| {r['model']} | {r['micro_batch']} | {r['method']} | {'on' if r['ckpt'] else 'off'} | "
                     + " | ".join(cells) + " |")
    ranked = sorted(rows, key=lambda r: (r["lora_rank"] != 0, -r["lora_rank"], -r["micro_batch"], r["ckpt"]))
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines += ["", "| GPUs | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for w in PLAN_WORLDS:
        for g in PLAN_GPU_GB:
            best = [next((f"{r['method']}, micro-batch {r['micro_batch']}, ckpt {'on' if r['ckpt'] else 'off'}"
                          for r in ranked if r["model"] == m and fits(r["gb"][w], g)), "nothing fits") for m in models]
            lines.append(f"| {w} x {g} GB | " + " | ".join(best) + " |")
    return "\n".join(lines)


def print_plan_table(cfg):
    """--plan-table: plan_table for the named models at --micro-batch (the recipe's per-device batch) and at 1 (the
    same global batch by gradient accumulation, which costs no memory), --max-length, --optimizer; bf16 compute."""
    pair = cfg.selection == "pair"
    mbs = tuple(dict.fromkeys((cfg.micro_batch, 1)))
    rows = plan_table(cfg.plan_table, mbs, cfg.max_length, cfg.optimizer, pair)
    print(f"memory per GPU (GB = 1e9 bytes), FSDP2 with bf16 compute, {cfg.optimizer}, sequences of "
          f"{cfg.max_length} tokens, micro-batch in {'pairs (2 sequences each)' if pair else 'rows'}; a cell gives "
          f"the GB and the GPU sizes it fits in (total < nominal GB; see costs.PLAN_GPU_GB)")
    print(plan_table_markdown(rows, "pairs" if pair else "rows"))
    return rows


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
                           cfg.optimizer, compute_bytes=2 if d.device.type == "cuda" else 4,
                           ckpt=cfg.activation_checkpointing, lora_rank=cfg.lora_rank,
                           lora_targets=tuple(cfg.lora_targets))                # the LoRA terms for a LoRA run
        (out / "memory.json").write_text(json.dumps({"seq_len": seq_len, "measured": measured, "plan": plan}, indent=1))
