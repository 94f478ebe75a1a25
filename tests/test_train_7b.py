"""train_7b.py (FSDP2, 2 gloo ranks under torchrun) against sppo.py's single-process training, the independent
reference: same tiny random Llama / Mistral, same data and batch order, fp32 on CPU.

Tolerances. Both sides compute the same sums in fp32 but in different orders (the global batch is split over 2
ranks and micro-batches of 2 instead of 8, so padding lengths differ; gradients are reduce-scattered), so each
number carries a few ulps of rounding per reduction: losses (~1e5) agree to relative 1e-6 (observed <= 1.3e-7),
grad norms to 1e-5 (observed <= 1.7e-7). Parameters: RMSprop's update lr g / (sqrt(v) + eps) does not depend on
the scale of g, except for the few gradient entries whose size is near eps = 1e-8, where a rounding difference
dg changes the update by up to lr |dg| / eps; we allow 0.2 lr = 2e-5 absolute on weights that move by 3e-3..1e-2
(observed: 2.6e-6 on one element of the tiny Llama after 6 steps, all others <= 1e-6; 4.3e-7 on Mistral after 60).
Resume is checked for EXACT equality: DCP restores model, optimizer, schedule and data position bit for bit.

Every launch also asserts a clean exit: no 'terminate called' (the teardown flake of docs/train_7b.md).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cli
import conftest
import costs
import distributed
import losses
import pairrm
import policy
import runs
import sppo
import sppo_toy
import train_7b
import training

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TRAIN = dict(global_batch=4, micro_batch=1, seed=40, lr=1e-4, max_length=48, max_prompt_length=16, optimizer="rmsprop")
"""seed 40: in step 2 (the one --measure-memory tracks) the long row's pair is rank 0's LAST micro-batch, so the
peak comes with every gradient shard present and two units in flight, the moment memory_plan accounts for (with
the pair first, the peak falls inside the first backward, with about half the gradient shards)."""
LOSS_RTOL, PARAM_ATOL = 1e-6, 0.2 * TRAIN["lr"]
PLAIN = dict(TRAIN, group_by_length=False)
"""llama_run's settings: micro-batches cut in schedule order (the seed-40 scenario above); the other runs group them
by length (the default), so the FSDP = one process checks cover both."""


def flags(**kw):
    return [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


def torchrun(*args, check=True, timeout=600, **popen):
    """train_7b.py under `torchrun --standalone --nproc_per_node 2` (gloo). Returns the CompletedProcess. On timeout
    the agent and both workers are killed (conftest.run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_7b.py"), *args]
    p = conftest.run(cmd, timeout=timeout, cwd=REPO, **popen)
    out = p.stdout + p.stderr
    if check:
        assert p.returncode == 0, out[-4000:]
        assert "terminate called" not in out, out[-4000:]
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny random Llama and Mistral (hidden 32, 2 layers) and D_t: 24 rows without ref_logp, one response of
    100 words (over max_length, so it is truncated)."""
    root = tmp_path_factory.mktemp("train_7b")
    w = {arch: sppo_toy.build_tiny_policy(root / arch, arch=arch, seed=3) for arch in ("llama", "mistral")}
    for arch in ("llama", "mistral"):
        (root / f"data_{arch}").mkdir()
        runs.write_jsonl(root / f"data_{arch}" / "dataset.jsonl", sppo_toy.synthetic_dataset(24, seed=1, long_rows=1))
    w["root"] = root
    return w


def data(world, arch):
    return world["root"] / f"data_{arch}" / "dataset.jsonl"


@pytest.fixture(scope="module")
def llama_run(world):
    """Uninterrupted 2-rank run (6 steps), with FSDPMemTracker on its second step (optimizer state exists), and
    the bf16 copy of the export that GPUs write by default."""
    out = world["root"] / "llama_A"
    p = torchrun(*flags(model=world["llama"], data=data(world, "llama"), out=out, epochs=2, save_every=2, **PLAIN),
                 "--measure-memory", "--export-bf16")
    return out, p.stdout


@pytest.fixture(scope="module")
def mistral_run(world):
    """Uninterrupted 2-rank run, 60 steps."""
    out = world["root"] / "mistral_A"
    p = torchrun(*flags(model=world["mistral"], data=data(world, "mistral"), out=out, epochs=20, **TRAIN))
    return out, p.stdout


def single_process(world, arch, epochs, out, model_dir=None, **extra):
    """training.train_policy on one process: same model, rows (with the ref_logp train_7b cached in its OUT), order,
    micro-batch 8; `extra`: other settings, as train_7b.py was given them. With lora_rank, sppo.train's LoRA path:
    torch.manual_seed(seed), add_adapters, train_policy, merge_adapters (the state dict returned is the merged one)."""
    d = data(world, arch)
    ref = json.loads((out / "ref_logp.json").read_text())["ref_logp"]
    rows = [dict(r, ref_logp=lp) for r, lp in zip(runs.read_jsonl(d), ref)]
    cfg = sppo.SPPOConfig(**{**TRAIN, "micro_batch": 8, **extra}, epochs=epochs, progress=False)
    model, tok = runs.load_policy(model_dir or world[arch], cfg, "cpu")
    pairs, _ = training.encode_rows(tok, rows, cfg)
    ref_single = policy.batched_logps(model, pairs, tok.pad_token_id, 8)
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)
        model = training.add_adapters(model, cfg)
    history = training.train_policy(model, tok, rows, cfg, "cpu")
    if cfg.lora_rank:
        model = training.merge_adapters(model)
    return ref, ref_single, history, model.state_dict()


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("arch, epochs", [("llama", 2), ("mistral", 20)])
def test_fsdp_matches_single_process(world, llama_run, mistral_run, arch, epochs):
    out, log = {"llama": llama_run, "mistral": mistral_run}[arch]
    ref, ref_single, history, params = single_process(world, arch, epochs, out)
    # pi_ref = pi_t, computed sharded across ranks, equals one process's log-probs
    assert max(abs(a - b) for a, b in zip(ref, ref_single)) < 1e-4
    steps = runs.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in steps] == list(range(len(history)))
    for h, m in zip(history, steps):
        assert abs(m["loss"] - h["loss"]) <= LOSS_RTOL * abs(h["loss"]), (h, m)
        assert abs(m["grad_norm"] - h["grad_norm"]) <= 1e-5 * h["grad_norm"]
        assert m["lr"] == pytest.approx(h["lr"], rel=1e-12, abs=1e-15)
    exported = load_file(out / "model" / "model.safetensors")
    start = load_file(Path(world[arch]) / "model.safetensors")
    assert max_diff(exported, start) > 50 * PARAM_ATOL                # training moved the weights...
    assert max_diff(exported, params) < PARAM_ATOL                    # ...exactly as one process does
    assert "1 truncated" in log and "none skipped" in log
    assert "FSDP units: embed_tokens | 2 layers | lm_head | root (norm)" in log


SUCCESSORS = ("optimistic", "extragradient", "mirror_prox", "nash_md", "mmd", "inpo", "dno")


@pytest.mark.slow
@pytest.mark.parametrize("loss", SUCCESSORS)
def test_fsdp_matches_single_process_with_each_successor(world, tmp_path, loss):
    """Every successor loss (losses.py) on 2 ranks gives sppo.py's losses, grad norms and weights: D_t carries the
    columns each reads (mu_logp, and the win rates against pi_{t-1}, the mixture, the half step, as sppo.py's step 3
    writes them), here set by hand."""
    rows = sppo_toy.synthetic_dataset(24, seed=1, long_rows=1)
    rng = np.random.default_rng(4)
    for r in rows:
        r.update({c: float(v) for c, v in zip(("prev_win_prob", "half_win_prob", "mix_win_prob"), rng.uniform(size=3))},
                 mu_logp=float(rng.normal(-40.0, 5.0)))
    (tmp_path / "data").mkdir()
    runs.write_jsonl(tmp_path / "data" / "dataset.jsonl", rows)
    extra = dict(loss=loss, eta=3.0, selection="all" if losses.LOSSES[loss].kind == "row" else "pair",
                 **({"tau": 0.2} if "tau" in losses.LOSSES[loss].settings else {}))
    out = tmp_path / loss
    torchrun(*flags(model=world["llama"], data=tmp_path / "data" / "dataset.jsonl", out=out, epochs=1, **extra,
                    **TRAIN))
    ref = json.loads((out / "ref_logp.json").read_text())["ref_logp"]
    cfg = sppo.SPPOConfig(**{**TRAIN, "micro_batch": 8, **extra}, epochs=1, progress=False)
    model, tok = runs.load_policy(world["llama"], cfg, "cpu")
    history = training.train_policy(model, tok, [dict(r, ref_logp=lp) for r, lp in zip(rows, ref)], cfg, "cpu")
    steps = runs.read_jsonl(out / "metrics.jsonl")
    assert len(steps) == len(history) >= 3
    for h, m in zip(history, steps):        # losses ~0.4 at eta = 3 with grad norms ~15: the last ulps of the fp32
        assert abs(m["loss"] - h["loss"]) <= 1e-5 * abs(h["loss"]), (h, m)       # sums move them by <= 2e-6 relative
        assert abs(m["grad_norm"] - h["grad_norm"]) <= 1e-5 * h["grad_norm"]
    exported = load_file(out / "model" / "model.safetensors")
    assert max_diff(exported, load_file(Path(world["llama"]) / "model.safetensors")) > 50 * PARAM_ATOL
    assert max_diff(exported, model.state_dict()) < PARAM_ATOL


def test_fsdp_matches_single_process_with_dpo(world, tmp_path):
    """--loss dpo (a pair loss: each pair on one rank, in one micro-batch) gives sppo.py's losses on 2 ranks."""
    out = tmp_path / "dpo"
    torchrun(*flags(model=world["llama"], data=data(world, "llama"), out=out, epochs=1, loss="dpo", eta=10, **TRAIN))
    ref, ref_single, history, params = single_process(world, "llama", 1, out, loss="dpo", eta=10.0)
    steps = runs.read_jsonl(out / "metrics.jsonl")
    assert len(steps) == len(history) == 3
    for h, m in zip(history, steps):
        assert abs(m["loss"] - h["loss"]) <= LOSS_RTOL * abs(h["loss"]), (h, m)
        assert abs(m["grad_norm"] - h["grad_norm"]) <= 1e-5 * h["grad_norm"]
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)      # pi = pi_ref: -log sigma(0)
    assert max_diff(load_file(out / "model" / "model.safetensors"), params) < PARAM_ATOL


def test_tied_embeddings_stay_in_one_unit_and_match_single_process(world, tmp_path):
    """tie_word_embeddings: embed_tokens = lm_head is one parameter, kept in the root unit; same losses and weights
    as one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tied = tmp_path / "llama_tied"
    m = AutoModelForCausalLM.from_pretrained(world["llama"])
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight
    m.save_pretrained(tied)
    AutoTokenizer.from_pretrained(world["llama"]).save_pretrained(tied)
    out = tmp_path / "out"
    p = torchrun(*flags(model=tied, data=data(world, "llama"), out=out, epochs=2, **TRAIN))
    assert "FSDP units: 2 layers | root (norm, tied embed_tokens = lm_head)" in p.stdout
    _, _, history, params = single_process(world, "llama", 2, out, model_dir=tied)
    steps = runs.read_jsonl(out / "metrics.jsonl")
    assert len(steps) == len(history) == 6
    for h, m in zip(history, steps):
        assert abs(m["loss"] - h["loss"]) <= LOSS_RTOL * abs(h["loss"]), (h, m)
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert max_diff(exported.state_dict(), params) < PARAM_ATOL


LORA = dict(lora_rank=8, lora_alpha=32.0, lr=1e-3)
"""--lora-rank 8 with alpha 32 (scale 4) at lr 1e-3: B starts at 0, so the merged update (alpha/r) B A after 6 steps
is ~5e-2, far above the tolerance (0.2 lr, the RMSprop argument of the module docstring, on A and B)."""


def test_fsdp_lora_matches_single_process_and_resumes_exactly(world, tmp_path):
    """--lora-rank 8 on 2 ranks: fresh adapters on pi_t added before fully_shard, the base frozen and sharded, only
    A and B in the optimizer, the merged model exported. Against one process (sppo.train's LoRA path: seed,
    add_adapters, train_policy, merge_adapters): the same losses and grad norms, and the exported checkpoint is a
    plain one (pi_t's tensor names, no adapter keys) with the merged weights, changed only where adapters reach.
    Its DCP checkpoints hold the adapters and their optimizer state only; stop + --resume is bit-exact."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out, atol = tmp_path / "lora", 0.2 * LORA["lr"]
    args = flags(model=world["llama"], data=data(world, "llama"), out=out, epochs=2, save_every=2, **{**PLAIN, **LORA})
    p = torchrun(*args)
    assert "LoRA rank 8: 0.008 M trained" in p.stdout
    _, _, history, params = single_process(world, "llama", 2, out, group_by_length=False, **LORA)
    steps = runs.read_jsonl(out / "metrics.jsonl")
    assert len(steps) == len(history) == 6
    for h, m in zip(history, steps):
        assert abs(m["loss"] - h["loss"]) <= LOSS_RTOL * abs(h["loss"]), (h, m)
        assert abs(m["grad_norm"] - h["grad_norm"]) <= 1e-5 * h["grad_norm"]
    exported = load_file(out / "model" / "model.safetensors")
    start = load_file(Path(world["llama"]) / "model.safetensors")
    assert sorted(exported) == sorted(start) and not list((out / "model").glob("adapter_*"))
    assert max_diff(exported, params) < atol                                   # sppo.py's merge, to rounding
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert min(max_diff({k: exported[k]}, {k: start[k]}) for k in start if k.endswith(
        tuple(f"{m}.weight" for m in adapted))) > 50 * atol                   # every adapted W moved...
    assert all(torch.equal(exported[k], start[k]) for k in start if not k.endswith(
        tuple(f"{m}.weight" for m in adapted)))                                # ...nothing else did

    dcp_to_torch_save(distributed.checkpoints(out)[-1], tmp_path / "final.pt")
    saved = torch.load(tmp_path / "final.pt")["train"]
    assert saved["model"] and all(".lora_A." in k or ".lora_B." in k for k in saved["model"])   # no frozen base
    resumed = tmp_path / "lora_resumed"
    args = [str(resumed) if a == str(out) else a for a in args]
    torchrun(*args, "--stop-at-step", "3")
    assert "resumed from" in torchrun(*args, "--resume").stdout
    b = runs.read_jsonl(resumed / "metrics.jsonl")
    assert [(m["loss"], m["grad_norm"], m["lr"]) for m in steps] == [(m["loss"], m["grad_norm"], m["lr"]) for m in b]
    assert max_diff(exported, load_file(resumed / "model" / "model.safetensors")) == 0.0


def test_export_reloads_and_matches_fsdp_parameters(world, llama_run):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM
    out, _ = llama_run
    final = distributed.checkpoints(out)[-1]
    assert final.name == "step_000006"
    dcp_to_torch_save(final, out / "final.pt")                        # the sharded FSDP parameters, gathered offline
    saved = torch.load(out / "final.pt")["train"]
    assert saved["step"] == 6 and {"rng_rank0", "rng_rank1"} <= saved.keys()
    fsdp = saved["model"]
    exported = load_file(out / "model" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.float32}       # fp32: small updates survive the export
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert max_diff(model.state_dict(), fsdp) == 0.0
    bf16 = load_file(out / "model_bf16" / "model.safetensors")         # --export-bf16 (the default on GPU)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], v.bfloat16()) for k, v in exported.items())
    start = load_file(Path(world["llama"]) / "model.safetensors")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bf16_unchanged_fraction"] == distributed.bf16_unchanged_fraction(start, exported)
    loaded, tok = runs.load_policy(out / "model", sppo.SPPOConfig(), "cpu")   # sppo.py's next --model
    assert type(loaded).__name__ == "LlamaForCausalLM" and tok.pad_token_id == 0


def test_memory_plan_matches_measured_tiny(world, llama_run):
    """The accounting of --plan, on the tiny model, next to FSDPMemTracker's measurement of the first step."""
    report = json.loads((llama_run[0] / "memory.json").read_text())
    plan, measured = report["plan"], report["measured"]
    sharded = plan["sharded fp32 params (4N/W)"]
    assert abs(measured["Sharded Param"] - sharded) <= 0.02 * sharded           # shard padding only
    assert abs(measured["Sharded Grad"] - plan["sharded fp32 grads (4N/W)"]) <= 0.02 * sharded
    assert abs(measured["OptState"] - plan["rmsprop state (4N/W)"]) <= 0.02 * sharded
    in_flight = measured["Unsharded Param"] + measured["All Gather"]             # root + current + prefetched unit
    assert abs(in_flight - plan["unsharded params: root + 2 units in flight"]) <= 0.02 * in_flight
    kept = plan["activations: layer inputs kept (L B T d)"]
    saved_logits = plan["logits (2 copies) + fp32 log-softmax saved"]             # autograd keeps these too
    assert 0.5 * kept <= measured["Activation"] <= kept + saved_logits
    assert measured["Total"] <= sum(plan.values())                              # the plan is an upper bound


def test_stop_and_resume_is_exact(world, llama_run):
    out = world["root"] / "llama_B"
    args = flags(model=world["llama"], data=data(world, "llama"), out=out, epochs=2, save_every=2, **PLAIN)
    first = torchrun(*args, "--stop-at-step", "3")
    assert "stopped after step 3" in first.stdout and not (out / "model").exists()
    refused = torchrun(*args, check=False)
    assert refused.returncode != 0 and "pass --resume" in refused.stdout + refused.stderr
    second = torchrun(*args, "--resume")
    assert "resumed from" in second.stdout and "step_000003" in second.stdout
    a, b = runs.read_jsonl(llama_run[0] / "metrics.jsonl"), runs.read_jsonl(out / "metrics.jsonl")
    assert [(m["loss"], m["grad_norm"], m["lr"]) for m in a] == [(m["loss"], m["grad_norm"], m["lr"]) for m in b]
    assert max_diff(load_file(llama_run[0] / "model" / "model.safetensors"),
                    load_file(out / "model" / "model.safetensors")) == 0.0


def test_resume_refuses_changed_settings(world, llama_run):
    """--resume against a checkpoint made with other settings: refused before the model is built, the field named
    (the optimizer too, which used to give a cryptic DCP error)."""
    out = world["root"] / "llama_R"
    args = flags(model=world["llama"], data=data(world, "llama"), out=out, epochs=2, save_every=2, **TRAIN)
    torchrun(*args, "--stop-at-step", "2")
    for flag, value, field in [("--warmup-ratio", "0.2", "'warmup_ratio' is 0.1 but this run has 0.2"),
                               ("--optimizer", "adamw", "'optimizer' is 'rmsprop' but this run has 'adamw'"),
                               ("--max-length", "40", "'max_length' is 48 but this run has 40"),
                               ("--pack", "false", "'pack' is True but this run has False")]:
        p = torchrun(*args, flag, value, "--resume", check=False)             # the last flag wins
        line = next((x for x in p.stderr.splitlines() if x.startswith("train_7b.py: error: ")), "")
        assert p.returncode != 0 and field in line, p.stderr[-2000:]      # one line (torchrun adds its own report)
    other = world["root"] / "llama_copy"
    shutil.copytree(world["llama"], other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"rms_norm_eps": 1e-06',
                                                                                   '"rms_norm_eps": 1e-05'))
    p = torchrun(*args, "--model", str(other), "--resume", check=False)
    assert p.returncode != 0 and "field 'model' is" in p.stderr


def test_workers_die_with_the_agent(world):
    """SIGKILL of the torchrun agent alone: the workers do not train on as orphans."""
    out = world["root"] / "mistral_orphans"
    args = flags(model=world["mistral"], data=data(world, "mistral"), out=out, epochs=20, **TRAIN)
    with conftest.spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         str(REPO / "train_7b.py"), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL) as proc:        # whatever happens, nothing outlives the block
        conftest.wait_until(lambda: (out / "metrics.jsonl").is_file() or proc.poll() is not None, 300)
        workers = [w for w in conftest.tagged(proc.tag) if w != proc.pid]
        assert len(workers) == 2 and proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        conftest.wait_until(lambda: not any(map(conftest.alive, workers)), 60)
        alive = [w for w in workers if conftest.alive(w)]
        assert not alive, f"workers {alive} outlived the agent"


def test_killed_run_resumes_exactly(world, mistral_run):
    """A real SIGKILL of both ranks and torchrun mid-run (checkpoint every step), then --resume."""
    out = world["root"] / "mistral_K"
    args = flags(model=world["mistral"], data=data(world, "mistral"), out=out, epochs=20, save_every=1,
                 keep_checkpoints=1000, **TRAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_7b.py"), *args]
    with conftest.spawn(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        conftest.wait_until(lambda: len(distributed.checkpoints(out)) >= 3 or proc.poll() is not None, 300, 0.02)
        # a node loss: SIGKILL both ranks (each in its own session) and torchrun itself, at once; then wait until
        # they are gone (a killed rank 0 may be inside a rename until it is), before reading the checkpoints
        killed = conftest.kill_tagged(proc.tag)
        proc.wait()
        assert conftest.wait_until(lambda: not any(map(conftest.alive, killed)), 60)
    last = distributed.checkpoints(out)[-1]
    assert not (out / "model").exists() and last.name < "step_000060", "the run finished before the kill"
    resumed = torchrun(*args, "--resume")
    assert f"resumed from {last} at step {int(last.name[5:])}" in resumed.stdout
    a, b = runs.read_jsonl(mistral_run[0] / "metrics.jsonl"), runs.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(60))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert max_diff(load_file(mistral_run[0] / "model" / "model.safetensors"),
                    load_file(out / "model" / "model.safetensors")) == 0.0


def test_stage_all_runs_one_iteration(world, tmp_path):
    """generate (K=2, each rank its prompt chunks) -> rank (tiny random PairRM) -> D_t on rank 0 -> FSDP training."""
    prompts = tmp_path / "prompts.jsonl"
    runs.write_jsonl(prompts, [{"prompt": x} for x in ["play rps", "play weighted rps"] * 4])
    rm = pairrm.save_tiny_random_checkpoint(tmp_path / "pairrm")
    out = tmp_path / "iter0"
    run = flags(stage="all", model=world["llama"], prompts=prompts, pairrm=rm, out=out, K=2, max_new_tokens=4,
                gen_batch=2, iterations=1, **{**TRAIN, "global_batch": 2})
    p = torchrun(*run, "--collective-timeout-s", "77")
    assert "collective timeout 77 s" in p.stdout
    gens = runs.read_jsonl(out / "generations.jsonl")
    assert [g["prompt_id"] for g in gens] == list(range(8)) and all(len(g["responses"]) == 2 for g in gens)
    rows = runs.read_jsonl(out / "dataset.jsonl")
    assert len(rows) == 16 and {r["role"] for r in rows} == {"winner", "loser"}
    assert len(runs.read_jsonl(out / "metrics.jsonl")) == 4 and (out / "model" / "config.json").is_file()
    # one seeding rule: sppo.py on one process samples exactly what the 2 ranks sampled, byte for byte
    one = tmp_path / "one"
    assert sppo.main(["--model", world["llama"], "--prompts", str(prompts), "--pairrm", rm, "--out", str(one), "--K", "2",
                      "--max-new-tokens", "4", "--gen-batch", "2", "--iterations", "1", "--stop-after", "generate",
                      "--seed", str(TRAIN["seed"]), "--no-progress"]) == 0
    assert (one / "iter0" / "generations.jsonl").read_bytes() == (out / "generations.jsonl").read_bytes()
    # generations made with another K are refused at once, named, never reused (and nothing is rewritten)
    before = (out / "generations.jsonl").read_bytes()
    bad = [*run]
    bad[bad.index("--K") + 1] = "3"
    p = torchrun(*bad, check=False)
    assert p.returncode != 0 and "generations.jsonl: made with setting K = 2, but this run has K = 3" in p.stderr
    assert (out / "generations.jsonl").read_bytes() == before


def test_bad_rows_are_refused_before_the_model_is_built(tmp_path):
    for field, value, message in [("win_prob", float("nan"), "win_prob nan is outside"),
                                  ("win_prob", 1.5, "win_prob 1.5 is outside"), ("finished", "yes", "'finished' should be")]:
        rows = sppo_toy.synthetic_dataset(4)
        rows[2][field] = value
        runs.write_jsonl(tmp_path / "d.jsonl", rows)
        with pytest.raises(runs.ArtifactError, match=message):
            train_7b.load_dataset(tmp_path / "d.jsonl", train_7b.TrainConfig())


def test_golden_losses_two_ranks(llama_run):
    """The 2-rank run of the llama_run fixture is the golden run of tests/golden_losses.py (same model, data and
    settings): its losses equal tests/assets/golden_losses.json to the file's rtol."""
    import golden_losses
    assert (golden_losses.TRAIN["epochs"], golden_losses.TRAIN["lr"]) == (2, TRAIN["lr"])
    gold = json.loads((REPO / "tests" / "assets" / "golden_losses.json").read_text())
    got = [m["loss"] for m in runs.read_jsonl(llama_run[0] / "metrics.jsonl")]
    np.testing.assert_allclose(got, gold["two_ranks"], rtol=gold["rtol"])
    np.testing.assert_allclose(gold["two_ranks"], gold["single_process"], rtol=gold["rtol"])


def test_deterministic_mode_gives_the_same_losses(world, llama_run):
    out = world["root"] / "llama_det"
    p = torchrun(*flags(model=world["llama"], data=data(world, "llama"), out=out, epochs=2, **PLAIN), "--deterministic")
    assert "deterministic algorithms True" in p.stdout
    a, b = runs.read_jsonl(llama_run[0] / "metrics.jsonl"), runs.read_jsonl(out / "metrics.jsonl")
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]


def test_reference_logps_record_how_they_were_computed(world, llama_run):
    out, log = llama_run
    key = json.loads((out / "ref_logp.json").read_text())["key"]
    assert key["model"] == runs.Hashes(out)(world["llama"])          # pi_t by content, not by path
    assert (key["dtype"], key["device"]) == ("float32", "cpu")
    assert key["batching"] == {"global_batch": 4, "micro_batch": 1, "group_by_length": False, "pack": True,
                               "seed": 40, "selection": "pair", "world": 2}
    assert "computed with pi_t (float32 on 2 x cpu, in the training micro-batches of epoch 1)" in log
    m = runs.read_jsonl(out / "metrics.jsonl")[0]
    assert m["mfu"] is None and m["peak_memory_gb"] > 0 and 0 < m["response_tokens"] < m["tokens"]


RANKS_SCRIPT = """
import json, os, sys, tempfile
sys.path.insert(0, {repo!r})
import resource, torch, costs, distributed
d = distributed.init_distributed()
ballast = torch.ones(100_000_000 if d.rank == 1 else 1)              # 400 MB touched on rank 1 only
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
decided = d.decide(lambda: os.environ["RANK"])                        # runs on rank 0 only
try:
    d.decide(lambda: 1 / 0)
    error = None
except ZeroDivisionError as e:
    error = str(e)
result = json.dumps(dict(rank=d.rank, decided=decided, error=error, own=own, **costs.peak_memory_gb(d)))
# each rank its own file, complete or absent: on torchrun's shared stdout two ranks' lines can join (with
# PYTHONUNBUFFERED=1 print writes the text and the newline in two writes)
fd, tmp = tempfile.mkstemp(dir=sys.argv[1])
with os.fdopen(fd, "w") as f:
    f.write(result)
os.replace(tmp, os.path.join(sys.argv[1], f"rank{{d.rank}}.json"))
distributed.shutdown()
os._exit(0)
"""


def test_rank0_decides_for_all_and_peak_memory_is_the_max_over_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(repo=str(REPO)))
    p = conftest.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      str(script), str(tmp_path)], timeout=300)
    assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-3000:]
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]   # never parsed from shared stdout
    assert [x["rank"] for x in r] == [0, 1]
    assert [x["decided"] for x in r] == ["0", "0"]                     # rank 0's answer on both ranks
    assert [x["error"] for x in r] == ["division by zero"] * 2           # rank 0's error raised on both, no hang
    assert r[1]["own"] > r[0]["own"] + 0.3                             # rank 1 holds the ballast...
    assert r[0]["peak_memory_gb"] == r[1]["peak_memory_gb"] == pytest.approx(r[1]["own"], rel=0.05)  # ...max of both


# ---- no torchrun needed -------------------------------------------------------------------------------------
def test_bf16_export_rounds_small_updates_back_to_pi_t():
    """pi_t in bf16 (every weight bf16-representable), updates of RMSprop's size: a bf16 export loses them."""
    start = {"w": torch.tensor([0.02, -0.02, 0.5, 1e-3]).bfloat16().float(), "step": torch.tensor([3])}
    new = {"w": start["w"] + torch.tensor([1e-5, 5e-5, 1e-5, 1e-5]), "step": torch.tensor([4])}
    # half a bf16 step is 2^-14 = 6.1e-5 at 0.02, 2^-9 at 0.5, but 2^-18 = 3.8e-6 at 1e-3: only the last survives
    assert distributed.bf16_unchanged_fraction(start, new) == 0.75
    assert (new["w"] != start["w"]).all()                              # fp32 (OUT/model) keeps all four updates
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(100_000, generator=g) * 0.02).bfloat16().float()
    w1 = w0 + 5e-7 * torch.randn(300, 100_000, generator=g).sign().sum(0)   # 300 RMSprop steps of lr 5e-7, +-
    frac = distributed.bf16_unchanged_fraction({"w": w0}, {"w": w1})
    assert frac > 0.85 and (w1 != w0).float().mean() > 0.95, frac      # measured: 89.7% lost in bf16, 4.6% in fp32


def test_step_flops_by_hand():
    from transformers import LlamaConfig
    c = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False)
    layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32    # q k v o, SwiGLU, 2 RMSNorms = 9280
    n = 2 * layer + 32 + 2 * 16 * 32                                         # + final norm, embed_tokens, lm_head
    assert costs.param_counts(c)[0] == n
    # two rows of 10 and 20 tokens (4 and 8 in the response): 6 N_body T + 12 L d T^2 + 6 V d R, summed
    flops = 6 * (2 * layer + 32) * 30 + 12 * 2 * 32 * (10 ** 2 + 20 ** 2) + 6 * 16 * 32 * (4 + 8)
    assert costs.step_flops(c, n, tokens=30, sum_len_sq=500, response_tokens=12) == flops == 3_767_424
    c.tie_word_embeddings = True                                          # the shared matrix is counted once in N
    assert costs.step_flops(c, n - 16 * 32, 30, 500, 12) == flops
    assert [costs.peak_flops(f"NVIDIA H100 {x}") for x in ("NVL", "PCIe", "80GB HBM3")] == [835e12, 756e12, 989e12]
    assert costs.peak_flops("NVIDIA GeForce RTX 4090") is None


def test_vllm_is_its_own_generate_call(tmp_path):
    prompts = tmp_path / "p.jsonl"
    runs.write_jsonl(prompts, [{"prompt": "hi"}])
    kw = dict(model="m", prompts=str(prompts), pairrm="rm", out=str(tmp_path / "o"), gen_engine="vllm")
    with pytest.raises(runs.ConfigError, match="--stage all --gen-engine vllm: vLLM frees its GPU memory only when "
                                               "its process exits; run --stage generate --gen-engine vllm as its own"):
        train_7b.validate(train_7b.TrainConfig(stage="all", **kw))
    import importlib.util
    if importlib.util.find_spec("vllm"):
        pytest.skip("vllm is installed here: the not-installed refusal is not reachable")
    with pytest.raises(runs.ConfigError, match="vllm is not installed here; install requirements/vllm.txt in an "
                                               "environment of its own"):
        train_7b.validate(train_7b.TrainConfig(stage="generate", **kw))
def test_generations_record_their_engine(tmp_path, monkeypatch):
    """generations.jsonl sampled by vLLM is not reused by an --gen-engine hf run (nor the other way): the generate
    key names the engine; hf's key is sppo.py's, so either script reuses the other's HF samples."""
    out, prompts, model = tmp_path / "o", tmp_path / "p.jsonl", tmp_path / "m"
    out.mkdir()
    model.mkdir()
    (model / "config.json").write_text("{}")
    runs.write_jsonl(prompts, [{"prompt": "hi"}])
    kw = dict(model=str(model), prompts=str(prompts), out=str(out), oracle="committee")
    hashes, hf = runs.Hashes(out), train_7b.TrainConfig(**kw)
    assert train_7b.stage_key(hf, "generate", ["hi"], hashes) == runs.stage_key(hf, "generate", out, hf.model, ["hi"],
                                                                                None, hashes)
    monkeypatch.setattr(train_7b.importlib.metadata, "version", lambda name: "0.99")
    vllm = train_7b.stage_key(train_7b.TrainConfig(**kw, gen_engine="vllm"), "generate", ["hi"], hashes)
    assert vllm["sampler"] == "vllm 0.99, seeded per prompt"
    runs.write_generations(out / "generations.jsonl", ["hi"], [{"responses": ["a"], "finished": [True],
                                                                 "token_ids": [[5]], "stop_ids": [2]}])
    runs.Manifest(out).commit("generate", vllm, hashes, 1)
    with pytest.raises(runs.StaleStage, match="made with setting sampler = 'vllm 0.99, seeded per prompt', but this "
                                              "run has sampler = "):
        train_7b.generations_recorded(hf, ["hi"], hashes, reader=False)          # --stage generate / all: regenerate?
    # --stage rank (always the default engine: validate refuses vllm there) ranks vLLM's samples, as docs/train_7b.md says
    assert train_7b.generations_recorded(train_7b.TrainConfig(**kw, stage="rank"), ["hi"], hashes, reader=True)
    with pytest.raises(runs.StaleStage, match="made with setting prompts = "):           # any other field counts
        train_7b.generations_recorded(hf, ["hello"], hashes, reader=True)


def test_missing_field_names_file_line_and_field(tmp_path):
    cfg = train_7b.TrainConfig()
    rows = sppo_toy.synthetic_dataset(4)
    del rows[2]["win_prob"]
    runs.write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(runs.ArtifactError, match=r"d\.jsonl:3: missing field 'win_prob'"):
        train_7b.load_dataset(tmp_path / "d.jsonl", cfg)
    rows = [dict(r, ref_logp=-1.0) for r in sppo_toy.synthetic_dataset(4)]
    del rows[1]["ref_logp"]
    runs.write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(runs.ArtifactError, match=r"e\.jsonl: record 2: missing field 'ref_logp'"):
        train_7b.load_dataset(tmp_path / "e.jsonl", cfg)


def test_settings_of_sppo_py_only_are_refused():
    for flag, value in [("--device", "cuda"), ("--dtype", "bfloat16"), ("--stop-after", "rank"),
                        ("--eval-prompts", "held.jsonl"), ("--judges", "concise")]:
        with pytest.raises(cli.ConfigError, match=f"{flag} '{value}': must be left out: not a setting of this program"):
            cli.check(cli.parse(train_7b.TrainConfig, [flag, value]))
    assert cli.check(cli.parse(train_7b.TrainConfig, ["--stage", "all", "--K", "3"])).K == 3


def test_batch_split_covers_the_global_batch_once():
    idx = list(range(100, 109))                                     # a short last batch: 9 rows, 4 ranks, micro 2
    plain = train_7b.TrainConfig(micro_batch=2, group_by_length=False)
    shares = [train_7b.rank_micro_batches(idx, None, r, 4, plain) for r in range(4)]
    assert shares[0] == [[100, 101], [102]] and shares[2] == [[106, 107], [108]]
    assert shares[3] == [None, None]                                # no rows left: two zero-weight stand-ins
    assert [i for s in shares for mb in s if mb for i in mb] == idx


def test_grouped_micro_batches_are_dealt_balanced_and_keep_pairs():
    """16 pairs of long-tailed lengths over 2 ranks, micro-batch 2 pairs: every row once, each pair in one
    micro-batch on one rank; grouped: micro-batches sorted by length and the ranks' padded tokens (rows x longest
    row) within one micro-batch of each other; the plain contiguous cut of the same batch pads more."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, size=32), 20, 1500).astype(int).tolist()
    pairs = [([1] * 10, [1] * (n - 10)) for n in lengths]
    idx = training.batch_schedule(32, global_batch=16, epochs=1, seed=0, group=2)[0]
    cost = lambda mb: len(mb) * max(lengths[i] for i in mb)                              # noqa: E731
    padded = {}
    for group_by_length in (True, False):
        cfg = train_7b.TrainConfig(micro_batch=2, group_by_length=group_by_length)
        shares = [train_7b.rank_micro_batches(idx, pairs, r, 2, cfg, group=2) for r in range(2)]
        assert sorted(i for s in shares for mb in s for i in mb) == sorted(idx)
        assert all(mb[k] % 2 == 0 and mb[k + 1] == mb[k] + 1 for s in shares for mb in s for k in range(0, len(mb), 2))
        assert [len(s) for s in shares] == [4, 4]
        loads = [sum(map(cost, s)) for s in shares]
        if group_by_length:                                                     # longest first, balanced
            assert all([cost(mb) for mb in s] == sorted(map(cost, s), reverse=True) for s in shares)
            assert abs(loads[0] - loads[1]) <= max(cost(mb) for s in shares for mb in s)
        padded[group_by_length] = sum(loads)
    assert padded[True] < 0.8 * padded[False]                                   # sorting by length pads less


def test_check_batch_sizes_names_the_multiple():
    with pytest.raises(ValueError, match="multiple of --micro-batch 8 x world size 3"):
        train_7b.check_batch_sizes(train_7b.TrainConfig(global_batch=64, micro_batch=8), 3)


def test_plan_mistral_7b_fits_80gb(capsys):
    plan = costs.print_plan(train_7b.TrainConfig(plan="mistral-7b", world=8, micro_batch=8, max_length=1024))
    assert "fits in 80 GB: yes" in capsys.readouterr().out
    assert plan["sharded fp32 params (4N/W)"] == pytest.approx(4 * 7.2416e9 / 8, rel=1e-3)   # 7.24 B params
    assert sum(plan.values()) < 80e9


def test_log_z_estimate_needs_log_z_in_every_row(tmp_path):
    """--log-z estimate trains on each row's Eq. (4.5) log Z: a row without one is refused with its record."""
    rows = sppo_toy.synthetic_dataset(3)
    runs.write_jsonl(tmp_path / "d.jsonl", rows)
    assert train_7b.load_dataset(tmp_path / "d.jsonl", train_7b.TrainConfig()) == rows
    with pytest.raises(runs.ArtifactError, match=r"d\.jsonl: record 1: missing field 'log_z'"):
        train_7b.load_dataset(tmp_path / "d.jsonl", train_7b.TrainConfig(log_z="estimate"))
