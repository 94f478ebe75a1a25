"""Tests for --lora-rank (training.add_adapters / merge_adapters, through peft): one LoRA step against a hand-written
low-rank update (W + (alpha/r) B A on plain tensors, torch autograd, no peft), merge -> save -> from_pretrained against
the adapted model's log-probs, a whole run whose checkpoints change only where the adapters reach and only by rank r,
the settings' checks before any work, and the manifest (sppo.py) and resume record (train_7b.py) that carry them."""
import dataclasses
import json

import pytest
import torch
from torch.func import functional_call

import cli
import distributed
import policy
import runs
import sppo
import sppo_config
import sppo_toy
import train_7b
import training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """pi_t: a random-init tiny Llama (2 layers, hidden 32) and its tokenizer, saved and loaded via from_pretrained."""
    return sppo_toy.build_tiny_policy(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def dataset(n=4):
    rows = sppo_toy.synthetic_dataset(n, seed=5)
    for i, r in enumerate(rows):
        r["ref_logp"] = -20.0 + 2 * i
    return rows


def module_of(peft_name):
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' -> 'model.layers.0.self_attn.q_proj'."""
    return peft_name.removeprefix("base_model.model.").split(".lora_")[0]


def adapters(peft_model):
    """{module name: (A (r, d_in), B (d_out, r))} of every adapted module, as peft holds them."""
    found = {}
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            found.setdefault(module_of(name), {})["A" if ".lora_A." in name else "B"] = p
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}


def randomise_b(peft_model, std, seed=1):
    """B starts at 0 (the adapted model is pi_t), where dL/dA = (alpha/r) B^T dL/dW is 0: random B makes both
    gradients, and the adapters' effect, non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in adapters(peft_model).values():
            b.copy_(torch.randn(b.shape, generator=g) * std)


# -------------------------------------------------------------------------------------------------- one step by hand
def test_a_lora_step_is_the_hand_written_low_rank_update(tiny):
    """One optimizer step of train_policy on fresh adapters against the same step written out: the loss of Eq. (4.7)
    on the plain model whose adapted weights are W + (alpha/r) B A (torch.func.functional_call, no peft), gradients
    by autograd w.r.t. A and B, then RMSprop's first step by hand. Same gradients and weights to fp32 rounding; the
    base weights untouched (only A and B are in the optimizer); the merged weight is W + (alpha/r) B_1 A_1."""
    cfg = sppo.SPPOConfig(lora_rank=4, lora_alpha=8.0, lora_targets=["q_proj", "v_proj", "down_proj"], eta=4.0,
                          global_batch=4, micro_batch=4, lr=1e-3, warmup_ratio=0.0, max_grad_norm=1e9,
                          max_length=48, max_prompt_length=16, progress=False)
    rows = dataset()
    model, tok = runs.load_policy(tiny, cfg, "cpu")
    torch.manual_seed(0)
    lora = training.add_adapters(model, cfg)
    randomise_b(lora, 0.05)
    start = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in adapters(lora).items()}
    assert sorted(start) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                   for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert all(a.shape[0] == 4 == b.shape[1] for a, b in start.values())
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if ".lora_" not in n}
    assert not any(p.requires_grad for n, p in lora.named_parameters() if ".lora_" not in n)

    history = training.train_policy(lora, tok, rows, cfg, "cpu")
    assert len(history) == 1

    # the same loss on plain tensors: W + (alpha/r) B A in place of each adapted weight, one row at a time
    plain, _ = runs.load_policy(tiny, cfg, "cpu")
    plain.eval()
    W = {n: p.detach() for n, p in plain.named_parameters()}
    leaves = {m: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for m, (a, b) in start.items()}
    scale = cfg.lora_alpha / cfg.lora_rank
    params = dict(W, **{f"{m}.weight": W[f"{m}.weight"] + scale * b @ a for m, (a, b) in leaves.items()})
    pairs, _ = training.encode_rows(tok, rows, cfg)
    losses = []
    for (p, r), row in zip(pairs, rows):
        ids = torch.tensor(p + r)
        logits = functional_call(plain, params, kwargs={"input_ids": ids[None]}).logits[0]       # (T, V)
        logp = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None])[len(p) - 1:].sum()         # response tokens
        losses.append((logp - row["ref_logp"] - cfg.eta * (row["win_prob"] - 0.5)) ** 2)          # Eq. (4.7)
    loss = torch.stack(losses).mean()
    assert history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    flat = [t for ab in leaves.values() for t in ab]
    grads = dict(zip([(m, k) for m in leaves for k in "AB"], torch.autograd.grad(loss, flat)))

    got = adapters(lora)
    for m, (a, b) in got.items():
        for k, param, g in (("A", a, grads[m, "A"]), ("B", b, grads[m, "B"])):
            assert g.abs().max() > 1e-3, f"{m} {k}: the hand gradient is ~0, the test would not see a difference"
            torch.testing.assert_close(param.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
            # RMSprop's first step (torch defaults alpha 0.99, eps 1e-8): v = 0.01 g^2, x <- x - lr g / (sqrt v + eps)
            x0 = start[m][0 if k == "A" else 1]
            want = x0 - cfg.lr * g / ((0.01 * g * g).sqrt() + 1e-8)
            torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6 * cfg.lr)
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if ".lora_" not in n)

    merged = training.merge_adapters(lora).state_dict()
    for name, w in W.items():
        m = name.removesuffix(".weight")
        if m in got:                                                 # W + (alpha/r) B_1 A_1, rounded once
            torch.testing.assert_close(merged[name], w + scale * got[m][1].detach() @ got[m][0].detach())
        else:
            assert torch.equal(merged[name], w), name


# -------------------------------------------------------------------------------------------------- merge and reload
def test_merged_saved_and_reloaded_model_has_the_adapted_log_probs(tiny, tmp_path):
    """merge_adapters -> runs.save_policy -> runs.load_policy (from_pretrained): a plain Llama checkpoint, no adapter
    files, pi_t's tensor names, and the log-probs the adapted model gave before the merge."""
    cfg = sppo.SPPOConfig(lora_rank=4, max_length=48, max_prompt_length=16, progress=False)
    model, tok = runs.load_policy(tiny, cfg, "cpu")
    names = sorted(model.state_dict())
    torch.manual_seed(0)
    lora = training.add_adapters(model, cfg)
    randomise_b(lora, 0.2)
    pairs, _ = training.encode_rows(tok, dataset(6), cfg)
    adapted = torch.tensor(policy.batched_logps(lora, pairs, policy.pad_id(tok)))
    base = torch.tensor(policy.batched_logps(runs.load_policy(tiny, cfg, "cpu")[0], pairs, policy.pad_id(tok)))
    assert (adapted - base).abs().max() > 0.1                                    # the adapters do change pi

    runs.save_policy(training.merge_adapters(lora), tok, tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("adapter_*"))
    reloaded, _ = runs.load_policy(tmp_path / "merged", cfg, "cpu")
    assert type(reloaded).__name__ == "LlamaForCausalLM" and sorted(reloaded.state_dict()) == names
    again = torch.tensor(policy.batched_logps(reloaded, pairs, policy.pad_id(tok)))
    torch.testing.assert_close(again, adapted, rtol=1e-5, atol=1e-4)


# -------------------------------------------------------------------------------------------------- a whole run
class CharOracle:
    """P(y_i > y_j) = sigma(s_i - s_j), s = the sum of the response's character codes mod 7: random-init samples of
    the tiny Llama are rarely well-formed moves, so the game oracle would tie them all (and train nothing)."""

    def identity(self):
        return "chars mod 7"

    def __call__(self, prompt, responses):
        s = torch.tensor([sum(map(ord, y)) % 7 for y in responses], dtype=torch.float64)
        return torch.sigmoid(s[:, None] - s[None, :]).numpy()                     # (K, K)


def test_a_lora_run_saves_full_checkpoints_changed_by_rank_r_where_adapters_reach(tiny, tmp_path):
    """sppo.run, 2 iterations with --lora-rank 4 on q_proj and v_proj: each pi_{t+1} is a full checkpoint with
    pi_t's tensor names and a falling loss; against pi_t its q_proj and v_proj weights moved, by a matrix of rank <=
    4, and every other tensor (k_proj, o_proj, the MLP, norms, embeddings, lm_head) is bit for bit pi_t's. The train
    stage's manifest records the LoRA settings; resuming with another --lora-rank is refused, the setting named."""
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": x} for x in ["play rps", "play weighted rps"] * 2])
    cfg = sppo.SPPOConfig(model=tiny, prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"), iterations=2,
                          split_prompts=False, K=3, max_new_tokens=3, selection="all", eta=3.0, lr=1e-2,
                          global_batch=12, micro_batch=12, epochs=3, max_length=32, max_prompt_length=16, oracle="game",
                          lora_rank=4, lora_alpha=8.0, lora_targets=["q_proj", "v_proj"], progress=False)
    oracle = CharOracle()
    assert sppo.run(cfg, oracle=oracle) == tmp_path / "run" / "iter1" / "model"
    before = runs.load_policy(tiny, cfg, "cpu")[0].state_dict()
    for t in range(2):
        it = tmp_path / "run" / f"iter{t}"
        assert not list((it / "model").glob("adapter_*"))
        after = runs.load_policy(it / "model", cfg, "cpu")[0].state_dict()
        assert sorted(after) == sorted(before)
        for name, w in before.items():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                s = torch.linalg.svdvals((after[name] - w).double())
                assert s[0] > 1e-4 and s[4:].max() < 1e-5 * s[0], f"iter{t} {name}: singular values {s}"
            else:
                assert torch.equal(after[name], w), f"iter{t} {name}: changed where no adapter reaches"
        metrics = json.loads((it / "metrics.json").read_text())
        assert len(metrics["history"]) == 3 and metrics["last_loss"] < metrics["first_loss"]     # the adapters fit
        key = json.loads((it / "manifest.json").read_text())["stages"]["train"]["key"]
        assert {k: key[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")} == \
            {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_targets": ["q_proj", "v_proj"]}
        before = after
    manifest = (tmp_path / "run" / "iter1" / "manifest.json").read_text()
    assert sppo.run(cfg, oracle=oracle) is not None                              # resumes as itself: nothing redone
    assert (tmp_path / "run" / "iter1" / "manifest.json").read_text() == manifest
    with pytest.raises(runs.StaleStage, match=r"iter0/model: made with setting lora_rank = 4, but this run has "
                                              r"lora_rank = 8; .*--restart-from train"):
        sppo.run(dataclasses.replace(cfg, lora_rank=8), oracle=oracle)
    runs.unlock_run_dir(cfg.out)


# -------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "-1"], "--lora-rank -1: must be >= 0 (0: full fine-tuning)"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: must be finite and > 0"),
    (["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha nan: must be finite and > 0"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout 1.0: must be in [0, 1)"),
    (["--lora-rank", "4", "--lora-dropout", "-0.1"], "--lora-dropout -0.1: must be in [0, 1)"),
    (["--lora-rank", "4", "--config", "CONFIG"], "--lora-targets []: must be one or more module names"),
    (["--lora-rank", "4", "--lora-targets", "q_proj", "qkv_proj"], "--lora-targets q_proj qkv_proj: no Linear/"
     "Embedding module 'qkv_proj' in LlamaForCausalLM; it has down_proj, embed_tokens, gate_proj, k_proj, "
     "lm_head, o_proj, q_proj, up_proj, v_proj (--model ")])
def test_bad_lora_settings_are_one_line_before_any_work(tiny, tmp_path, capsys, args, message):
    (tmp_path / "c.yaml").write_text("lora_targets: []\n")
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "play rps"}])
    args = [str(tmp_path / "c.yaml") if a == "CONFIG" else a for a in args]
    out = tmp_path / "out"
    assert sppo.main(["--model", tiny, "--prompts", str(tmp_path / "p.jsonl"), "--oracle", "committee",
                      "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sppo.py: error: ") and message in err, err
    assert not out.exists()                                                       # nothing written, not even .lock


def test_train_7b_checks_lora_targets_in_one_line_before_any_work(tiny, tmp_path, capsys):
    """train_7b.py checks --lora-targets against pi_t's config before the process group, as sppo.py does."""
    out = tmp_path / "out"
    runs.write_jsonl(tmp_path / "d.jsonl", dataset())
    assert train_7b.main(["--model", tiny, "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--lora-rank",
                          "4", "--lora-targets", "q_proj", "qkv_proj", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train_7b.py: error: --lora-targets q_proj qkv_proj: no Linear/"
                                                   "Embedding module 'qkv_proj' in LlamaForCausalLM; it has "), err
    assert not out.exists()


def test_adapters_on_a_loaded_model_check_its_modules(tiny):
    """The check at load time (a .gguf pi_0 is only known then): the same one line, from add_adapters."""
    cfg = sppo.SPPOConfig(lora_rank=2, lora_targets=["self_attn.q_proj", "c_attn"])
    model, _ = runs.load_policy(tiny, cfg, "cpu")
    with pytest.raises(cli.ConfigError, match=r"^--lora-targets self_attn.q_proj c_attn: no Linear/Embedding module "
                                              r"'c_attn' in LlamaForCausalLM; it has down_proj, "):
        training.add_adapters(model, cfg)
    assert training.lora_problem(model, ["self_attn.q_proj", "mlp.up_proj", "lm_head"]) is None   # peft's suffix rule


def test_train_7b_takes_the_lora_settings_and_its_resume_record_carries_them(tmp_path):
    """train_7b.py takes the four LoRA settings (FSDP2 with LoRA: tests/test_train_7b.py checks it against one
    process). Its --resume record (run.json, runs.TRAIN_SETTINGS) holds them, reads back equal, and a changed one is
    refused by name."""
    got = cli.check(cli.parse(train_7b.TrainConfig, ["--lora-rank", "8", "--lora-alpha", "32", "--lora-dropout", "0.1",
                                                     "--lora-targets", "q_proj", "v_proj"]))
    assert (got.lora_rank, got.lora_alpha, got.lora_dropout, got.lora_targets) == (8, 32.0, 0.1, ["q_proj", "v_proj"])
    cfg = cli.check(train_7b.TrainConfig())
    names = train_7b.resume_settings(cfg)
    assert {"lora_rank", "lora_alpha", "lora_dropout", "lora_targets"} <= set(names)
    run_info = {k: getattr(cfg, k) for k in names}
    (tmp_path / "run.json").write_text(json.dumps(run_info))
    assert distributed.check_run_info(tmp_path, run_info)["lora_targets"] == list(sppo_config.LORA_TARGETS)
    (tmp_path / "run.json").write_text(json.dumps(dict(run_info, lora_rank=8)))
    with pytest.raises(runs.ArtifactError, match="field 'lora_rank' is 8 but this run has 0"):
        distributed.check_run_info(tmp_path, run_info)
