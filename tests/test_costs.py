"""costs.memory_plan's LoRA terms and the --plan-table, against independent references: peft's own adapters (their
parameters, gradients and optimizer state counted byte by byte), FSDPMemTracker under FSDP2 on 2 gloo ranks, and one
table cell computed by hand from Mistral-7B's published shapes. (The full fine-tuning terms are checked against
FSDPMemTracker in test_train_7b.py.)"""
import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import conftest
import costs
import sppo
import sppo_toy
import train_7b
import training

peft = pytest.importorskip("peft")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """sppo_toy's tiny random Llama (hidden 32, intermediate 64, 4 heads of which 2 KV, 2 layers, untied)."""
    return sppo_toy.build_tiny_policy(tmp_path_factory.mktemp("costs") / "tiny", arch="llama", seed=3)


def adapted(path, rank, dtype=torch.float32):
    """The tiny model with peft LoRA on costs.LORA_TARGETS, the frozen base in `dtype`, the adapters in fp32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(costs.LORA_TARGETS))
    return model, peft.get_peft_model(model, config, autocast_adapter_dtype=True)      # adapters: fp32


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adamw"])
def test_lora_terms_equal_peft_bytes_one_process(tiny, optimizer):
    """One process (W = 1), byte for byte: the frozen base in bf16 (the GPU layout: 2N), the fp32 adapters, their
    gradients after a backward, and the optimizer's per-parameter state after a step (RMSprop's square_avg; AdamW's
    exp_avg and exp_avg_sq; the scalar `step` counters, 4 bytes per tensor, are not planned)."""
    r = 4
    model, pm = adapted(tiny, r, torch.bfloat16)
    plan = costs.memory_plan(model.config, 1, 2, 16, optimizer, compute_bytes=2, lora_rank=r)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and {p.dtype for p in adapters} == {torch.float32}
    assert nbytes(frozen) == plan["sharded frozen base (2N/W)"]
    assert nbytes(adapters) == plan["sharded fp32 adapters (4N_A/W)"]
    c = model.config                                       # by hand: r (d_in + d_out) per targeted Linear
    d, kv, inter = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads, c.intermediate_size
    per_layer = r * (2 * (d + d) + 2 * (d + kv) + 3 * (d + inter))                   # q, o; k, v; gate, up, down
    assert costs.lora_param_counts(c, r) == (c.num_hidden_layers * per_layer, per_layer, 7)
    assert sum(p.numel() for p in adapters) == c.num_hidden_layers * per_layer

    model, pm = adapted(tiny, r)                           # fp32 base for a CPU step
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = training.make_optimizer(adapters, sppo.SPPOConfig(optimizer=optimizer, lr=1e-3))
    ids = torch.randint(3, c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)      # the base gets no gradient
    assert nbytes(p.grad for p in adapters) == plan["sharded fp32 adapter grads (4N_A/W)"]
    state = [t for p in adapters for t in opt.state[p].values() if t.shape == p.shape]
    assert nbytes(state) == plan[f"{optimizer} state of adapters ({ {'rmsprop': 4, 'adamw': 8}[optimizer]}N_A/W)"]
    assert len(opt.state) == len(adapters)                 # only the adapters have optimizer state


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["rmsprop", "adamw"])
def test_lora_terms_match_fsdp_mem_tracker(tiny, tmp_path, optimizer):
    """FSDP2 on 2 gloo ranks (tests/lora_memory.py: peft adapters, sharded as train_7b.py shards), FSDPMemTracker's
    peak of the second step next to memory_plan(lora_rank=8, fp32 compute). The tiny shapes divide by 2, so the
    sharded terms carry no padding and agree exactly."""
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "lora_memory.py"), tiny, str(out), "8", optimizer]
    p = conftest.run(cmd, timeout=300, cwd=REPO)
    assert p.returncode == 0 and "terminate called" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-4000:]
    report = json.loads(out.read_text())
    plan, peak, after = report["plan"], report["measured"], report["after_step"]
    state = {"rmsprop": 4, "adamw": 8}[optimizer]
    n_tensors = 2 * 2 * len(costs.LORA_TARGETS)           # lora_A and lora_B on 7 Linears in 2 layers
    assert peak["Sharded Param"] == plan["sharded frozen base (4N/W)"] + plan["sharded fp32 adapters (4N_A/W)"]
    assert after["Sharded Grad"] == plan["sharded fp32 adapter grads (4N_A/W)"]       # adapters' grads alone
    assert peak["OptState"] == plan[f"{optimizer} state of adapters ({state}N_A/W)"] + 4 * n_tensors  # + `step`s
    assert peak["Unsharded Param"] + peak["All Gather"] == plan["unsharded params: root + 2 units in flight"]
    kept = plan["activations: layer inputs kept (L B T d)"]
    assert 0.5 * kept <= peak["Activation"] <= kept + plan["logits (2 copies) + fp32 log-softmax saved"] + plan[
        "activations: LoRA x A^T (r per token per target)"]
    assert peak["Total"] <= sum(plan.values())             # the plan is an upper bound


def test_plan_table_structure_and_a_cell_by_hand():
    """24 rows (2 models x micro-batch 8 and 1 pair x full / r16 / r64 x checkpointing off / on) on 1, 2, 4, 8 GPUs;
    one cell by hand: Mistral-7B, LoRA r16, checkpointing on, 1 pair = 2 x 1024 tokens, 8 GPUs, bf16 (c = 2)."""
    rows = costs.plan_table(["mistral-7b", "llama-3-8b"], (8, 1), 1024)
    assert len(rows) == 24 and all(sorted(r["gb"]) == [1, 2, 4, 8] for r in rows)
    assert {(r["model"], r["micro_batch"], r["method"], r["ckpt"]) for r in rows} == {
        (m, mb, method, ck) for m in ("mistral-7b", "llama-3-8b") for mb in (8, 1)
        for method in ("full", "LoRA r16", "LoRA r64") for ck in (False, True)}
    N, W, c, r, tok, L, d, V = 7_241_732_096, 8, 2, 16, 2 * 1024, 32, 4096, 32000      # Mistral-7B's published
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096           # q, o; k, v; MLP; 2 norms
    a_layer = r * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))         # = 1,310,720
    by_hand = (c * N / W + 3 * 4 * L * a_layer / W                  # frozen base; adapters, grads, RMSprop state
               + c * (4096 + 2 * (layer + a_layer))                 # root (final norm) + 2 decoder layers in flight
               + (c + 4) * a_layer                                  # one layer's adapter grads + fp32 reduce buffer
               + L * tok * d * c                                    # checkpointed layer inputs
               + tok * (2 * (4 * d + c * d) + c * (6 * d + 4 * 1024) + 4 * c * 14336)   # one layer recomputed
               + c * tok * r * 7                                    # x A^T of the 7 adapters in that layer
               + tok * V * (2 * c + 4) + 2 * 4 * tok * V)           # logits and the saved fp32 log-softmax
    cell = next(r for r in rows if (r["model"], r["micro_batch"], r["method"], r["ckpt"]) ==
                ("mistral-7b", 1, "LoRA r16", True))
    assert cell["gb"][8] == pytest.approx(by_hand / 1e9, rel=1e-12)
    assert round(by_hand / 1e9, 1) == 4.8
    md = costs.plan_table_markdown(rows)
    assert "| mistral-7b | 1 | LoRA r16 | on | 17.9, 24, 48, 80 | 10.4, 24, 48, 80 | 6.7, 24, 48, 80 | " \
           "4.8, 24, 48, 80 |" in md
    assert "| mistral-7b | 8 | full | off | 210.3, none |" in md                         # does not fit anywhere
    assert "| 1 x 24 GB | LoRA r64, micro-batch 1, ckpt on | LoRA r16, micro-batch 1, ckpt on |" in md  # r64: 25.4
    assert "| 8 x 80 GB | full, micro-batch 8, ckpt on | full, micro-batch 8, ckpt on |" in md
    full = next(r for r in rows if (r["model"], r["micro_batch"], r["method"], r["ckpt"]) ==
                ("mistral-7b", 8, "full", True))
    assert full["gb"][8] == pytest.approx(26.205452288)     # the full fine-tuning plan of docs/train_7b.md


def test_plan_table_cli_prints_the_table():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert train_7b.main(["--plan-table", "mistral-7b", "--max-length", "2048", "--micro-batch", "2"]) == 0
    text = buf.getvalue()
    assert "sequences of 2048 tokens" in text
    assert sum(line.startswith("| mistral-7b | ") for line in text.splitlines()) == 12       # micro-batch 2 and 1
    assert "| 8 x 80 GB | full, micro-batch 2, ckpt " in text
