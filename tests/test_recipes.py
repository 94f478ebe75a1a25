"""Recipe fidelity (issue 11, part A): each place where the paper's or the authors' recipe is implemented, against a
hand computation or a transcription of the authors' code (uclaml/SPPO), at tiny sizes on CPU; and the two recipe
files, recipes/paper.yaml and recipes/released.yaml, running end to end on a tiny model."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
import losses
import pairrm
import policy
import runs
import sppo
import sppo_toy
import train_7b
import training

ROOT = Path(__file__).resolve().parents[1]
SIG = lambda z: 1 / (1 + math.exp(-z))                                                      # noqa: E731


# ------------------------------------------------------------------------------------------- 1. pair selection
def test_pair_is_chosen_on_the_mean_logit_not_the_win_rate():
    """Sec. 5.1 / scripts/compute_prob.py: winner and loser are argmax / argmin of s_PairRM = (1/K) sum_k s(y_i, y_k).
    Logits s(0,1) = 10, s(0,2) = -1, s(1,2) = -2: s_PairRM = (9/3, -12/3, 3/3), so y_0 wins on the mean logit, but
    its win rate (1/2 + sigma(10) + sigma(-1))/3 = 0.590 is below y_2's (1/2 + sigma(1) + sigma(2))/3 = 0.704."""
    M = torch.zeros(3, 3, dtype=torch.float64)
    M[0, 1], M[2, 0], M[2, 1] = 10.0, 1.0, 2.0                                               # f(i, j); f(j, i) = 0
    P = pairrm.preference_from_logits(M, "pairwise").numpy()
    np.testing.assert_allclose(sppo.selection_scores(P, M.numpy()), [3.0, -4.0, 1.0])
    np.testing.assert_allclose(sppo.win_rates(P), [(0.5 + SIG(10) + SIG(-1)) / 3, (0.5 + SIG(-10) + SIG(-2)) / 3,
                                                   (0.5 + SIG(1) + SIG(2)) / 3])
    cfg = sppo.SPPOConfig(selection="pair")
    keep, _ = sppo.kept_rows(P, cfg, M.numpy())
    assert [(k, role) for k, role, _ in keep] == [(0, "winner"), (1, "loser")]             # by the mean logit
    assert keep[0][2] == pytest.approx((0.5 + SIG(10) + SIG(-1)) / 3)                       # P-hat still Eq. (4.5)
    assert [k for k, _, _ in sppo.kept_rows(P, cfg)[0]] == [2, 1]          # no logits (a game oracle): win rate
    P_official = pairrm.preference_from_logits(M, "official").numpy()     # sigma(s_i - s_j): the orders agree
    assert [k for k, _, _ in sppo.kept_rows(P_official, cfg)[0]] == [0, 1]


# ------------------------------------------------------------------------------------------- 8. K = 2 estimate
def test_estimate_from_the_pair_is_sec_5_3_k2():
    """P-hat(y_w) = [P(y_w > y_w) + P(y_w > y_l)]/2 = 1/4 + P(y_w > y_l)/2 (the paper prints 1/2 + P/2: a slip)."""
    P = np.array([[0.5, 0.8, 0.9], [0.2, 0.5, 0.4], [0.1, 0.6, 0.5]])                     # y_0 wins, y_1 loses
    cfg = sppo.SPPOConfig(selection="pair", estimate_from="pair", eta=3.0)
    keep, lz = sppo.kept_rows(P, cfg)
    assert [(k, role) for k, role, _ in keep] == [(0, "winner"), (1, "loser")]
    assert [p for _, _, p in keep] == pytest.approx([0.25 + 0.8 / 2, 0.25 + 0.2 / 2])       # 0.65, 0.35
    assert lz == pytest.approx(math.log((math.exp(3 * 0.65) + math.exp(3 * 0.35)) / 2))     # Eq. (4.5), K = 2
    keep_all, _ = sppo.kept_rows(P, dataclasses.replace(cfg, estimate_from="all"))
    assert [p for _, _, p in keep_all] == pytest.approx([2.2 / 3, 1.1 / 3])                 # all K = 3
    with pytest.raises(runs.ConfigError, match="estimate-from"):
        sppo.validate_config(sppo.SPPOConfig(selection="all", estimate_from="pair"))


# ------------------------------------------------------------------------------------------- 2-3. batches, schedule
def pair_rows(n_pairs, seed=0):
    rows = sppo_toy.synthetic_dataset(2 * n_pairs, seed=seed)
    return [dict(r, ref_logp=-5.0 - i % 3) for i, r in enumerate(rows)]


def test_pairs_share_a_micro_batch_and_the_loss_is_the_authors(tiny_llama, monkeypatch):
    """selection=pair: a prompt's winner and loser are in one micro-batch (here and on every train_7b rank), a
    step takes global_batch PAIRS, ceil(pairs / global_batch) x epochs steps, and the step's loss is the authors'
    mean over pairs of (l_w + l_l)/2 (sppo_pair_loss, form='released')."""
    model, tok = tiny_llama
    rows, n_pairs = pair_rows(11), 11
    cfg = sppo.SPPOConfig(global_batch=4, micro_batch=2, epochs=3, lr=1e-9, progress=False)
    seen, make_batch = [], training.make_batch
    monkeypatch.setattr(training, "make_batch", lambda pairs, rows, idx, *a: seen.append(list(idx)) or
                        make_batch(pairs, rows, idx, *a))
    start = policy.batched_logps(model, training.encode_rows(tok, rows, cfg)[0], tok.pad_token_id)
    history = training.train_policy(model, tok, rows, cfg)
    assert len(history) == math.ceil(n_pairs / 4) * 3 == 9
    for mb in seen:                                                       # whole pairs, at most micro_batch of them
        assert len(mb) <= 4 and sorted(mb) == sorted({i // 2 * 2 + j for i in mb for j in (0, 1)})
    steps, total, group = training.train_schedule(rows, cfg)
    assert (len(steps), total, group) == (9, 9, 2) and [len(s) for s in steps[:3]] == [8, 8, 6]
    idx = steps[0]                                                        # the first step's loss, by the authors' rule
    w, l = [i for i in idx if i % 2 == 0], [i for i in idx if i % 2 == 1]
    t = lambda ix, key=None: torch.tensor([start[i] if key is None else rows[i][key] for i in ix],  # noqa: E731
                                          dtype=torch.float64)
    want = losses.sppo_pair_loss(t(w), t(w, "ref_logp"), t(l), t(l, "ref_logp"), t(w, "win_prob"), cfg.eta,
                               prob_l=t(l, "win_prob"), form="released").mean()
    assert history[0]["loss"] == pytest.approx(want.item(), rel=1e-5)
    pairs = training.encode_rows(tok, rows, cfg)[0]
    for world in (2, 3):                                                  # train_7b: a pair never crosses ranks
        for s in steps:
            shares = [mb for r in range(world) for mb in train_7b.rank_micro_batches(s, pairs, r, world, cfg, 2) if mb]
            assert sorted(i for mb in shares for i in mb) == sorted(s)
            assert all(sorted(mb) == sorted({i // 2 * 2 + j for i in mb for j in (0, 1)}) for mb in shares)
    with pytest.raises(runs.ArtifactError, match="record 3: --selection pair needs rows in pairs"):
        training.train_schedule(rows[:2] + rows[3:], cfg)


def test_lr_at_the_end_of_epoch_1_of_an_18_epoch_schedule(tiny_llama):
    """Sec. 5.1: lr 5e-7, warm-up 0.1, 'total epochs 18', epoch 1 kept. 10 steps per epoch: the schedule is 180
    steps, warm-up ceil(18) = 18, so step 10 (the last of epoch 1) runs at 10/18 x 5e-7 = 2.78e-7."""
    model, tok = tiny_llama
    cfg = sppo.SPPOConfig(global_batch=1, micro_batch=1, epochs=1, schedule_epochs=18, lr=5e-7, progress=False)
    history = training.train_policy(model, tok, pair_rows(10), cfg)
    assert len(history) == 10
    assert history[-1]["lr"] == pytest.approx(5e-7 * 10 / 18, rel=1e-12)                   # 2.78e-7
    assert history[0]["lr"] == pytest.approx(5e-7 / 18, rel=1e-12)
    with pytest.raises(runs.ConfigError, match="schedule-epochs 1: must be >= --epochs 2"):
        sppo.validate_config(sppo.SPPOConfig(epochs=2, schedule_epochs=1))


@pytest.fixture
def tiny_llama(tmp_path):
    d = sppo_toy.build_tiny_policy(tmp_path / "llama", seed=0)
    return runs.load_policy(d, sppo.SPPOConfig(), "cpu")


# ------------------------------------------------------------------------------------------- 6. truncation
def released_tokenize_row(prompt, chosen, rejected, max_length, max_prompt_length):
    """uclaml/SPPO sppo/trainer.py, SPPOTrainer.tokenize_row, its truncation, transcribed (truncation_mode
    keep_end; EOS already appended to both answers, BOS to the prompt)."""
    chosen_tokens = {"prompt_input_ids": list(prompt), "input_ids": list(chosen)}
    rejected_tokens = {"prompt_input_ids": list(prompt), "input_ids": list(rejected)}
    longer_response_length = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    for answer_tokens in [chosen_tokens, rejected_tokens]:
        if len(answer_tokens["prompt_input_ids"]) + longer_response_length > max_length:
            answer_tokens["prompt_input_ids"] = answer_tokens["prompt_input_ids"][-max_prompt_length:]
    for answer_tokens in [chosen_tokens, rejected_tokens]:
        if len(answer_tokens["prompt_input_ids"]) + longer_response_length > max_length:
            answer_tokens["input_ids"] = answer_tokens["input_ids"][: max_length - max_prompt_length]
    return [(t["prompt_input_ids"], t["input_ids"]) for t in (chosen_tokens, rejected_tokens)]


def test_released_truncation_matches_the_authors_rule():
    L, LP = 12, 5
    # by hand: prompt 4 (<= 5, kept), responses 2 and 10: 4 + 10 > 12, so BOTH are cut to 12 - 5 = 7 tokens
    p, a, b = list(range(100, 104)), [1, 2], list(range(10))
    got = policy.truncate([(p, a), (p, b)], L, LP, "released")
    assert [(len(x), len(y), cut) for x, y, cut in got] == [(4, 2, False), (4, 7, True)]
    ours = policy.truncate([(p, a), (p, b)], L, LP, "ours")               # ours: the response fills up to 12
    assert [(len(x), len(y)) for x, y, _ in ours] == [(4, 2), (4, 8)]
    # by hand: prompt 8 > 5 but 8 + 3 <= 12: the released rule keeps the whole prompt; ours keeps its last 5
    got = policy.truncate([(list(range(8)), [1, 2]), (list(range(8)), [1, 2, 3])], L, LP, "released")
    assert [len(x) for x, _, _ in got] == [8, 8] and policy.truncate([(list(range(8)), [1])], L, LP)[0][0] == [3, 4, 5,
                                                                                                           6, 7]
    for n_p in (1, 5, 6, 9, 14):                                          # every case against the transcription
        for n_a in (1, 4, 7, 8, 12):
            for n_b in (1, 6, 9):
                p, a, b = list(range(50, 50 + n_p)), list(range(n_a)), list(range(20, 20 + n_b))
                want = released_tokenize_row(p, a, b, L, LP)
                assert [(x, y) for x, y, _ in policy.truncate([(p, a), (p, b)], L, LP, "released")] == want


def test_released_rule_appends_eos_to_unfinished_responses(tiny_llama):
    _, tok = tiny_llama
    row = {"response": "rock paper", "finished": False}
    assert policy.response_tokens(tok, row, "released")[-1] == tok.eos_token_id
    assert tok.eos_token_id not in policy.response_tokens(tok, row, "ours")
    rows = [dict(r, finished=False) for r in pair_rows(2)]
    cfg = sppo.SPPOConfig(truncation="released", max_length=48, max_prompt_length=16)
    assert all(r[-1] == tok.eos_token_id for _, r in training.encode_rows(tok, rows, cfg)[0])


# ------------------------------------------------------------------------------------------- 7. token ids
@pytest.fixture(scope="module")
def bpe_policy(tmp_path_factory):
    """A tiny Llama over a byte-level BPE trained here, with two stop tokens (as Llama-3: <|eot|> and </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["abab ab ba abba bab"] * 50, trainers.BpeTrainer(         # 12 tokens: stops are
        vocab_size=12, special_tokens=["<pad>", "<s>", "</s>", "<|eot|>"]))             # sampled often enough
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=[2, 3]))
    d = tmp_path_factory.mktemp("bpe") / "model"
    runs.save_policy(model, tok, d)
    return runs.load_policy(d, sppo.SPPOConfig(), "cpu")


def test_log_probs_are_on_the_sampled_ids_not_the_retokenised_text(bpe_policy):
    """Sampled 'a', 'b', 'ab' then <|eot|>: the text 'abab' re-tokenises to other ids, and the appended stop would
    be </s>; training must score exactly the sampled tokens (teacher forcing by hand, the reference)."""
    model, tok = bpe_policy
    a, b, ab, eot = (tok.convert_tokens_to_ids(t) for t in ("a", "b", "ab", "<|eot|>"))
    sampled = [a, b, ab]
    text = tok.decode(sampled)
    assert text == "abab" and tok(text, add_special_tokens=False)["input_ids"] != sampled   # decode -> encode differs
    row = {"prompt_id": 0, "prompt": "ba", "response": text, "finished": True, "response_ids": sampled,
           "stop_id": eot, "win_prob": 0.5}
    cfg = sppo.SPPOConfig(selection="all", max_length=32, max_prompt_length=16)
    (p, r), = training.encode_rows(tok, [row], cfg)[0]
    assert r == sampled + [eot]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        lp = model(ids).logits[0].double().log_softmax(-1)
    want = sum(lp[len(p) + i - 1, r[i]].item() for i in range(len(r)))                        # by hand
    got = policy.batched_logps(model, [(p, r)], tok.pad_token_id)[0]
    assert got == pytest.approx(want, abs=1e-4)
    text_only = {k: v for k, v in row.items() if k not in ("response_ids", "stop_id")}      # the old way
    old = policy.batched_logps(model, training.encode_rows(tok, [text_only], cfg)[0], tok.pad_token_id)[0]
    assert abs(old - got) > 1e-2


def test_generations_store_the_sampled_ids_and_stop_id(bpe_policy):
    model, tok = bpe_policy
    cfg = sppo.SPPOConfig(K=8, max_new_tokens=6, max_prompt_length=16, progress=False)
    gens = policy.generate_responses(model, tok, ["ab", "ba"], cfg)
    stops = set(policy.eos_ids(model, tok))
    assert stops == {2, 3}
    for g in gens:
        for text, ids, stop, done in zip(g["responses"], g["token_ids"], g["stop_ids"], g["finished"]):
            assert tok.decode(ids) == text and not stops & set(ids)
            assert (stop in stops) if done else (stop is None and len(ids) == 6)
    assert any(f for g in gens for f in g["finished"])
    rows = sppo.build_dataset(["ab", "ba"], gens, [np.full((8, 8), 0.5)] * 2, dataclasses.replace(cfg,
                                                                                                  selection="all"))
    assert [r["response_ids"] for r in rows] == [ids for g in gens for ids in g["token_ids"]]


# ------------------------------------------------------------------------------------------- recipes end to end
@pytest.mark.parametrize("recipe", ["paper", "released"])
def test_recipe_runs_end_to_end(recipe, tmp_path):
    """sppo.py --config recipes/<recipe>.yaml on a tiny Llama and a tiny random PairRM, sizes overridden by flags:
    one whole iteration; D_t's pair is PairRM's mean-logit argmax / argmin, and the recipe's settings are the run's."""
    d = sppo_toy.build_tiny_policy(tmp_path / "llama", seed=0)
    rm_dir = pairrm.save_tiny_random_checkpoint(tmp_path / "pairrm", layout="PairRM-hf", seed=0)
    prompts = tmp_path / "p.jsonl"
    runs.write_jsonl(prompts, [{"prompt": x} for x in ["play rps", "play weighted rps", "rock paper"]])
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), "--model", str(d), "--prompts", str(prompts),
            "--pairrm", str(rm_dir), "--iterations", "1", "--K", "3", "--max-new-tokens", "4", "--max-length", "40",
            "--max-prompt-length", "16", "--global-batch", "2", "--micro-batch", "1", "--out", str(out),
            "--no-progress"]
    assert sppo.main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["temperature"], cfg["pairrm_mode"], cfg["truncation"]) == (
        (1.0, "pairwise", "ours") if recipe == "paper" else (0.7, "official", "released"))
    assert cfg["schedule_epochs"] == (18 if recipe == "paper" else 1) and cfg["epochs"] == 1
    prefs = runs.read_jsonl(out / "iter0" / "preferences.jsonl")
    rows = runs.read_jsonl(out / "iter0" / "dataset.jsonl")
    for i, p in enumerate(prefs):
        s = pairrm.scores_from_logits(torch.tensor(p["logits"])).numpy()
        w, l = rows[2 * i]["k"], rows[2 * i + 1]["k"]
        assert (s[w], s[l]) == (s.max(), s.min()) and all(r["ref_by"]["truncation"] == cfg["truncation"]
                                                          for r in rows)
    metrics = json.loads((out / "iter0" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2                                   # 3 pairs / 2 per step
    if recipe == "paper":                                                 # epoch 1 of 18: warm-up ceil(3.6) = 4
        assert [h["lr"] for h in metrics["history"]] == pytest.approx([5e-7 / 4, 5e-7 / 2])


@pytest.mark.slow
def test_train_7b_recomputes_reference_made_in_another_dtype(tmp_path):
    """train_7b.py (one process, CPU) with --config recipes/released.yaml: a dataset whose ref_logp were made by
    this pi_t in fp32 with this truncation is used as is; one recorded as bf16 (or by another model) is recomputed."""
    d = sppo_toy.build_tiny_policy(tmp_path / "llama", seed=3)
    model, tok = runs.load_policy(d, sppo.SPPOConfig(), "cpu")
    cfg = sppo.SPPOConfig(truncation="released", max_length=48, max_prompt_length=16, micro_batch=4)
    rows = sppo.reference_logps(model, tok, sppo_toy.synthetic_dataset(8, seed=1), cfg,
                                model_id=runs.Hashes(tmp_path)(d))
    logs = {}
    for name, edit in [("same", {}), ("bf16", {"dtype": "bfloat16"})]:
        data = tmp_path / name / "dataset.jsonl"
        runs.write_jsonl(data, [dict(r, ref_by={**r["ref_by"], **edit}) for r in rows])
        p = conftest.run([sys.executable, str(ROOT / "train_7b.py"), "--config", str(ROOT / "recipes" /
                          "released.yaml"), "--model", str(d), "--data", str(data), "--out", str(tmp_path / name /
                          "out"), "--max-length", "48", "--max-prompt-length", "16", "--global-batch", "2",
                          "--micro-batch", "2", "--lr", "1e-4", "--no-progress"], cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        logs[name] = p.stdout
    assert "reference log-probs (pi_ref = pi_t): dataset" in logs["same"]
    assert "'dtype': 'bfloat16'" in logs["bf16"] and "recomputing" in logs["bf16"]
    assert "reference log-probs (pi_ref = pi_t): computed with pi_t" in logs["bf16"]
    assert "2 steps (LR schedule 2) of 2 pairs" in logs["same"]
