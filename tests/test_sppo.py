"""Tests for sppo.py: each loss against a hand computation, the tabular minimiser of Eq. (4.4) against Hedge,
sequence_logps against a one-token-at-a-time loop, generation, the resumable run directory, and the demo."""
import dataclasses
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
import experiments
import hedge_toy
import losses
import policy
import cli
import runs
import sppo
import sppo_toy
import training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny Llama and its word-level tokenizer, saved and loaded back through from_pretrained."""
    d = tmp_path_factory.mktemp("tiny") / "llama"
    sppo_toy.build_tiny_policy(d, seed=0)
    cfg = sppo.SPPOConfig(progress=False)
    return d, *runs.load_policy(d, cfg, "cpu")


# -------------------------------------------------------------------------------------------------- losses
def t(*xs):
    return [torch.tensor([x], dtype=torch.float64) for x in xs]


def test_sppo_loss_by_hand():
    logp, ref, wp = t(-1.0, -2.0, 0.75)
    # Eq. (4.7): (log ratio 1 - eta (0.75 - 1/2))^2 with eta = 2 -> (1 - 0.5)^2
    assert losses.sppo_loss(logp, ref, wp, 2.0).item() == pytest.approx(0.25)
    # Eq. (4.5) target eta*P - log Z = 1.5 - 1.2 = 0.3 -> (1 - 0.3)^2
    assert losses.sppo_loss(logp, ref, wp, 2.0, log_z=1.2).item() == pytest.approx(0.49)
    # no reduction: one value per example
    assert losses.sppo_loss(torch.zeros(4), torch.zeros(4), torch.full((4,), 0.5), 1000.0).shape == (4,)


def test_sppo_pair_loss_by_hand():
    lw, rw, ll, rl = t(-1.0, -1.5, -3.0, -2.0)          # log ratios l_w = 0.5, l_l = -1.0
    eta = 4.0
    # Eq. (4.12), P(y_w > y_l) = 0.8: (0.5 - 4*0.3)^2 + (-1 - 4*(0.2 - 0.5))^2 = 0.49 + 0.04
    assert losses.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.8]), eta).item() == pytest.approx(0.53)
    # released form, row means 0.7 / 0.3, averaged: ((0.5 - 0.8)^2 + (-1 + 0.8)^2) / 2 = (0.09 + 0.04) / 2
    got = losses.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.7]), eta, prob_l=torch.tensor([0.3]), form="released")
    assert got.item() == pytest.approx(0.065)
    with pytest.raises(ValueError, match="prob_l"):
        losses.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.7]), eta, form="released")
    with pytest.raises(ValueError, match="form"):
        losses.sppo_pair_loss(lw, rw, ll, rl, torch.tensor([0.7]), eta, form="nope")


def test_dpo_ipo_kto_hard_by_hand():
    lw, rw, ll, rl = t(-1.0, -1.5, -3.0, -2.0)
    beta = 0.5                                           # a = 0.25, b = -0.5
    a, b = 0.25, -0.5
    assert losses.dpo_loss(lw, rw, ll, rl, beta).item() == pytest.approx(-math.log(1 / (1 + math.exp(-(a - b)))))
    assert losses.ipo_loss(lw, rw, ll, rl, beta, target=1.0).item() == pytest.approx((a - b - 1) ** 2)   # Eq. (4.14)
    c = beta * 0.4
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert losses.kto_loss(lw, rw, ll, rl, beta, kl=0.4).item() == pytest.approx(sig(-a + c) + sig(b - c))
    # SPPO with a hard label (Sec. 4.5): eta^2 [(a - 1/2)^2 + (b + 1/2)^2] with beta = 1/eta
    eta = 1 / beta
    assert losses.sppo_hard_loss(lw, rw, ll, rl, eta).item() == pytest.approx(eta ** 2 * ((a - .5) ** 2 + (b + .5) ** 2))


def test_ipo_minimiser_at_half_and_one():
    """IPO's minimiser: a - b = 1/2 by default (Azar et al.: h = 1/(2 beta) nats, TRL's (h - 1/(2 beta))^2 times
    beta^2), a - b = 1 with Eq. (4.14)'s target. Hand values, then gradient descent on a free winner log-prob."""
    eta = 4.0
    beta = 1 / eta
    zero = torch.zeros(1, dtype=torch.float64)
    h = torch.tensor([2.0], dtype=torch.float64)                     # margin of 2 nats = eta/2: a - b = 1/2
    assert losses.ipo_loss(h, zero, zero, zero, beta).item() == 0.0
    assert losses.ipo_loss(h, zero, zero, zero, beta, target=1.0).item() == pytest.approx(0.25)   # (1/2 - 1)^2
    assert losses.ipo_loss(h + 1, zero, zero, zero, beta).item() == pytest.approx(beta ** 2 * (3 - 1 / (2 * beta)) ** 2)
    for target, want in [(0.5, eta / 2), (1.0, eta)]:                # the margin in nats where the loss is 0
        lw = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([lw], lr=4.0)
        for _ in range(200):
            opt.zero_grad()
            losses.ipo_loss(lw, zero, zero - 1.0, zero, beta, target=target).sum().backward()
            opt.step()
        assert lw.item() + 1.0 == pytest.approx(want, abs=1e-9)        # a - b = target, i.e. h = target * eta


def test_ipo_is_the_peers_ipo_times_beta_squared():
    """Azar et al.'s IPO (tau = beta), TRL's loss_type="ipo" and the authors' trainer: (h - target/beta)^2, h the
    log-ratio margin in nats, written here from that definition. losses.ipo_loss is beta^2 times it (docs/sppo.md)."""
    g = torch.Generator().manual_seed(0)
    lw, rw, ll, rl = (20 * torch.randn(64, generator=g, dtype=torch.float64) for _ in range(4))
    h = (lw - rw) - (ll - rl)                                                       # (64,) nats
    for beta in (1 / 3, 0.1, 1e-3):
        for target in (0.5, 1.0):
            theirs = (h - target / beta) ** 2
            torch.testing.assert_close(losses.ipo_loss(lw, rw, ll, rl, beta, target) * (1 / beta ** 2), theirs,
                                       rtol=1e-9, atol=0)


def test_ipo_first_step_gradient_norms_at_both_scales_by_hand(tiny):
    """bench/ipo_scale.py's measurement on a tiny LM: at h = 0 (pi_theta = pi_ref, an iteration's first step) the
    gradient norm is 2 target beta G at our scale and 2 target G / beta at the peers' (G = |grad of the mean margin|,
    by autograd on h alone): a ratio of 1/beta^2, so at eta = 1000 theirs is clipped at max_grad_norm and ours not."""
    from bench import ipo_scale
    d, model, tok = tiny
    cfg = sppo.SPPOConfig(selection="pair", optimizer="adamw", lr=1e-3, global_batch=4, micro_batch=4, epochs=1,
                          max_length=48, max_prompt_length=16, progress=False)
    rows = sppo.reference_logps(model, tok, sppo_toy.synthetic_dataset(8, seed=2), cfg)      # h = 0 at the start
    res = {(r["eta"], r["scale"]): r for r in ipo_scale.measure(d, rows, cfg, [3.0, 1000.0])}
    assert "ipo_peer" not in sppo.LOSSES                                            # the table is sppo.py's again
    for (eta, scale), r in res.items():
        beta = 1 / eta
        assert r["steps"] == 1 and r["G"] > 0
        assert r["first"] == pytest.approx((beta if scale == "ours" else 1 / beta) * r["G"], rel=1e-4)   # target 1/2
    for eta in (3.0, 1000.0):
        assert res[eta, "peers"]["first"] / res[eta, "ours"]["first"] == pytest.approx(eta ** 2, rel=1e-5)
    assert res[1000.0, "ours"]["first"] < cfg.max_grad_norm < res[1000.0, "peers"]["first"]


def test_hedge_update_minimises_eq_4_4_tabular():
    """Under exact expectations (y ~ pi_t, exact P(y > pi_t), exact log Z), the minimiser of (4.4) over all
    policies is the Hedge step (4.1): it makes every squared term zero."""
    P = hedge_toy.weighted_rps()
    pi_t = np.array([0.5, 0.3, 0.2])
    eta = 1.7
    win = torch.tensor(P @ pi_t)                                                        # P(y > pi_t)
    log_z = float(hedge_toy.log_partition(P, pi_t, eta))
    ref = torch.log(torch.tensor(pi_t))
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.tensor(pi_t) * losses.sppo_loss(torch.log_softmax(theta, 0), ref, win, eta, log_z)).sum()
        loss.backward()
        return loss
    opt.step(closure)
    np.testing.assert_allclose(torch.softmax(theta, 0).detach().numpy(), hedge_toy.hedge_step(P, pi_t, eta),
                               atol=1e-6)


# -------------------------------------------------------------------------------------------------- win rates
def test_win_rates_and_select_pair_by_hand():
    P = np.array([[0.5, 0.9, 0.6], [0.1, 0.5, 0.2], [0.4, 0.8, 0.5]])
    np.testing.assert_allclose(sppo.win_rates(P), [2.0 / 3, 0.8 / 3, 1.7 / 3])       # self-term 1/2 included
    batch = np.stack([P, P.T[[0, 1, 2]][:, [0, 1, 2]]])                               # (2, 3, 3)
    batch[1] = 1 - P
    w, l = sppo.select_pair(sppo.win_rates(batch))
    assert w.tolist() == [0, 1] and l.tolist() == [1, 0]
    w, l = sppo.select_pair(np.full(4, 0.5))                                          # all tied: no pair, w == l
    assert (w, l) == (0, 0)
    assert torch.is_tensor(sppo.win_rates(torch.tensor(P)))
    with pytest.raises(ValueError, match="diagonal"):
        sppo.win_rates(np.array([[0.4, 0.5], [0.5, 0.5]]))


TIED = np.full((3, 3), 0.5)                                          # three responses, every pair a tie
RPS_ONCE_EACH = hedge_toy.rock_paper_scissors()                      # rock, paper, scissors once each: win rates 1/2
CLEAR = np.array([[0.5, 0.9, 0.6], [0.1, 0.5, 0.2], [0.4, 0.8, 0.5]])   # y_0 wins, y_1 loses


def test_a_prompt_whose_responses_all_tie_has_no_pair():
    """--selection pair: every selection score equal (all K tied, or a cycle that evens out) -> select_pair's w == l,
    and kept_rows keeps no row (a tie is no preference); any difference gives the pair. Batched: per prompt."""
    w, l = sppo.select_pair(np.stack([sppo.win_rates(P) for P in (TIED, CLEAR, RPS_ONCE_EACH)]))     # (3,), (3,)
    assert w.tolist() == [0, 0, 0] and l.tolist() == [0, 1, 0]
    assert sppo.select_pair(np.array([0.5, 0.5, 0.5 + 1e-12]))[0] == 2               # not tied: a pair, however small
    for estimate_from in ("all", "pair"):
        cfg = sppo.SPPOConfig(selection="pair", estimate_from=estimate_from)
        for P in (TIED, RPS_ONCE_EACH):
            assert sppo.kept_rows(P, cfg)[0] == []
            assert sppo.kept_rows(P, cfg, np.zeros((3, 3)))[0] == []                    # PairRM logits, all equal
        assert [(k, role) for k, role, _ in sppo.kept_rows(CLEAR, cfg)[0]] == [(0, "winner"), (1, "loser")]
    assert [k for k, _, _ in sppo.kept_rows(TIED, sppo.SPPOConfig(selection="all"))[0]] == [0, 1, 2]   # target 0


def generations(n, K=3):
    return [{"responses": [f"r{i}.{k}" for k in range(K)], "finished": [True] * K, "token_ids": [[i, k] for k in
             range(K)], "stop_ids": [2] * K} for i in range(n)]


def test_dataset_of_a_mixed_batch_has_pairs_for_untied_prompts_only():
    """Prompts 0 and 3 tied, 1 and 2 not: D_t holds 4 rows, prompt 1's (winner, loser) then prompt 2's; the source
    check, the pair grouping and the schedule accept 0 or 2 rows per prompt; the train stage counts the tied ones."""
    mats, cfg = [TIED, CLEAR, CLEAR.T.copy(), RPS_ONCE_EACH], sppo.SPPOConfig(selection="pair", loss="dpo", K=3)
    gens = generations(4)
    rows = sppo.build_dataset([f"x{i}" for i in range(4)], gens, mats, cfg)
    assert [(r["prompt_id"], r["k"], r["role"]) for r in rows] == [(1, 0, "winner"), (1, 1, "loser"),
                                                                   (2, 1, "winner"), (2, 0, "loser")]
    assert [r["pair_prob"] for r in rows] == [0.9, 0.1, 0.9, 0.1]                  # P(this row > the other kept row)
    sppo.check_dataset_sources(rows, gens, mats, cfg, "d")
    with pytest.raises(runs.ArtifactError, match="d: 6 rows for 4 prompts whose preferences keep 4"):
        sppo.check_dataset_sources(rows + rows[:2], gens, mats, cfg, "d")
    with pytest.raises(runs.ArtifactError, match="record 1: not prompt 1's generation k=0"):
        sppo.check_dataset_sources([dict(rows[0], prompt_id=0)] + rows[1:], gens, mats, cfg, "d")
    assert training.group_size(rows, cfg) == 2
    steps, _, _ = training.train_schedule(rows, dataclasses.replace(cfg, global_batch=1, epochs=1))
    assert sorted(map(tuple, steps)) == [(0, 1), (2, 3)]                            # one pair per step, kept whole


def test_an_iteration_whose_every_prompt_ties_is_refused_in_one_line():
    cfg = sppo.SPPOConfig(selection="pair", K=3)
    with pytest.raises(runs.ArtifactError) as e:
        sppo.build_dataset(["x", "y"], generations(2), [TIED, RPS_ONCE_EACH], cfg, where="it/preferences.jsonl")
    assert str(e.value).startswith("it/preferences.jsonl: the K = 3 responses of every one of the 2 prompts tie")
    assert "--selection all" in str(e.value) and "\n" not in str(e.value)
    assert len(sppo.build_dataset(["x"], generations(1), [TIED], sppo.SPPOConfig(selection="all", K=3))) == 3


def test_log_z_estimate_eq_4_5():
    wp = np.array([0.9, 0.5, 0.1])
    assert float(sppo.log_z_estimate(wp, 2.0)) == pytest.approx(math.log(np.exp(2 * wp).mean()))


# -------------------------------------------------------------------------------------------------- log-probs
def naive_logps(model, pairs):
    """One sequence at a time, one token at a time: sum_t log softmax(logits_{t-1})[y_t] over response tokens."""
    out = []
    for p, r in pairs:
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()                            # (T, V)
        out.append(sum(torch.log_softmax(logits[len(p) + i - 1], -1)[tok].item() for i, tok in enumerate(r)))
    return np.array(out)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_matches_naive_loop(tiny, side):
    _, model, tok = tiny
    prompts = ["play rps", "play weighted rps", "rock paper rock paper"]
    resps = [("rock", True), ("big rock", True), ("sharp", False)]
    pairs = [policy.encode_example(tok, x, y, f, 64, 32)[:2] for x, (y, f) in zip(prompts, resps)]
    b = policy.collate(pairs, tok.pad_token_id, padding_side=side)
    with torch.no_grad():
        got = policy.sequence_logps(model, **b)
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), naive_logps(model, pairs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_logps_and_gradients_equal_padded(tmp_path, arch):
    """Rows packed into one sequence (collate packed=True, use_packed_attention) against the same rows padded: the
    same log-probs and gradients to fp32 rounding (rtol 1e-5: the rows' matmuls are cut differently); the first
    packed batch switches the model from sdpa to packed attention (else its rows would attend to each other)."""
    model, tok = runs.load_policy(sppo_toy.build_tiny_policy(tmp_path / arch, arch=arch, seed=2),
                                  sppo.SPPOConfig(progress=False), "cpu")
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 16, (int(p),), generator=g).tolist(), torch.randint(3, 16, (int(r),), generator=g)
              .tolist()) for p, r in [(3, 9), (1, 1), (7, 20), (2, 5), (12, 30)]]

    def logps_grads(packed):
        model.zero_grad()
        lp = policy.sequence_logps(model, **policy.collate(pairs, tok.pad_token_id, packed=packed))
        (lp * torch.arange(1.0, 6.0)).sum().backward()                  # a different weight per row
        return lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert model.config._attn_implementation == "sdpa"
    padded = logps_grads(False)
    packed = logps_grads(True)
    assert model.config._attn_implementation == policy.PACKED
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0], torch.tensor(naive_logps(model, pairs), dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)
    assert (packed[1] - padded[1]).abs().max() <= 1e-5 * padded[1].abs().max()


def test_long_rows_sum_to_the_correctly_rounded_total():
    """policy._summed_logps (both log-prob paths add a row's token log-probs with it): over 1,500-token rows the
    fp32 result is the exact sum of the fp32 token log-probs (math.fsum), rounded once. An fp32 accumulator that adds
    one token at a time (index_add) drifts ~1e-3 nats over such a row, several fp32 steps at its magnitude."""
    import math
    g = torch.Generator().manual_seed(0)
    logits, targets = 3 * torch.randn(3000, 50, generator=g), torch.randint(0, 50, (3000,), generator=g)
    rows = torch.arange(3000) % 2                                          # two rows, interleaved as a batch's mask
    got = policy._summed_logps(logits, targets, rows, 2, chunk=512)
    token = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)          # the same fp32 token values
    exact = [math.fsum(token[rows == k].double().tolist()) for k in range(2)]
    assert got.dtype == torch.float32 and got.tolist() == torch.tensor(exact, dtype=torch.float32).tolist()


def test_sequence_logps_bf16_weights(tiny):
    d, model, tok = tiny
    m16 = runs.load_policy(d, sppo.SPPOConfig(dtype="bfloat16"), "cpu")[0]
    pairs = [policy.encode_example(tok, "play rps", y, True, 64, 32)[:2] for y in ["rock", "big rock", "paper"]]
    for side in ["right", "left"]:
        with torch.no_grad():
            got = policy.sequence_logps(m16, **policy.collate(pairs, tok.pad_token_id, side))
        assert got.dtype == torch.float32                                                # fp32 accumulation
        np.testing.assert_allclose(got.numpy(), naive_logps(m16, pairs), atol=2e-2)       # bf16 forward noise
    np.testing.assert_allclose(got.numpy(), naive_logps(model, pairs), atol=0.1)


def test_encode_example_eos_and_truncation(tiny):
    _, _, tok = tiny
    p, r, cut = policy.encode_example(tok, "play rps", "big rock", True, 64, 32)
    assert p == tok.apply_chat_template([{"role": "user", "content": "play rps"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert r == tok.convert_tokens_to_ids(["big", "rock"]) + [tok.eos_token_id] and not cut
    p, r, cut = policy.encode_example(tok, "play rps " * 10, "rock " * 10, False, 12, 5)
    assert len(p) == 5 and p[-1] == tok.convert_tokens_to_ids("=>") and len(r) == 7 and cut


# -------------------------------------------------------------------------------------------------- generation
def test_generation_k_per_prompt_and_reproducible(tiny):
    _, model, tok = tiny
    cfg = sppo.SPPOConfig(K=4, max_new_tokens=3, gen_batch=2, progress=False, seed=3)
    prompts = ["play rps", "play weighted rps", "play rps"]
    a = policy.generate_responses(model, tok, prompts, cfg)
    b = policy.generate_responses(model, tok, prompts, cfg)
    c = policy.generate_responses(model, tok, prompts, dataclasses.replace(cfg, seed=4))
    assert a == b and a != c
    assert len(a) == 3 and all(len(g["responses"]) == 4 == len(g["finished"]) for g in a)
    for g in a:                                          # a finished response re-tokenises within the cap
        for y, done in zip(g["responses"], g["finished"]):
            n = len(tok(y, add_special_tokens=False)["input_ids"])
            assert n < 3 if done else n == 3
    # the seeding rule is keyed by the batch's global prompt index: generating from batch 1 alone (start = 2)
    # reproduces the third prompt's samples of the full run
    assert policy.generate_responses(model, tok, prompts[2:], cfg, start=2) == a[2:]
    assert policy.generate_responses(model, tok, prompts[2:], cfg, iteration=1, start=2) != a[2:]



@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_shared_prefill_samples_the_tokens_of_generate(arch, tmp_path):
    """policy.sample_k runs each prompt once and repeats its KV cache K times; the reference, HF generate with
    num_return_sequences=K, runs each prompt K times. Under one seed both sample the same tokens: ragged prompts
    (left padding, one prompt of a single token), K = 1 and K = 4, rows that stop at EOS while others run on."""
    from transformers import GenerationConfig
    model, tok = runs.load_policy(sppo_toy.build_tiny_policy(tmp_path / arch, arch=arch, seed=0),
                                  sppo.SPPOConfig(), "cpu")
    xs = [policy.prompt_ids(tok, x) for x in ["play rps", "play weighted rps rock big"]] + [[tok.bos_token_id]]
    b = policy.collate([(x, []) for x in xs], tok.pad_token_id, padding_side="left")   # (3, T), left padded; the
    # one-token prompt is all padding in the shared prefill of T - 1 tokens
    T, shapes, mixed = b["input_ids"].shape[1], [], 0
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    for K in (1, 4):
        gen = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=12, num_return_sequences=K,
                               pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
        for seed in range(3):
            torch.manual_seed(seed)
            ref = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], generation_config=gen)
            torch.manual_seed(seed)
            shapes.clear()
            got = policy.sample_k(model, b["input_ids"], b["attention_mask"], gen)
            assert torch.equal(got, ref)
            assert shapes[0] == (3, T - 1) and set(shapes[1:]) == {(3 * K, 1)}              # each prompt ran once
            ended = (got[:, T:] == tok.eos_token_id).any(1)
            mixed += bool(ended.any() and not ended.all())
    assert mixed                                                   # some rows ended at EOS, others ran to the cap

# -------------------------------------------------------------------------------------------------- run directory
def test_diverged_loss_stops_and_keeps_weights(tiny):
    _, model, tok = tiny
    rows = [{"prompt_id": 0, "prompt": "play rps", "response": "rock", "finished": True, "win_prob": 0.5,
             "ref_logp": 1e30}]
    before = [p.detach().clone() for p in model.parameters()]
    cfg = sppo.SPPOConfig(global_batch=1, micro_batch=1, lr=1e-3, selection="all", progress=False)
    with pytest.raises(training.DivergedError, match="not finite"):
        training.train_policy(model, tok, rows, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_prompt_files(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(runs.ArtifactError, match=r"p\.jsonl:2: missing field 'prompt'"):
        runs.load_prompts(f)
    f.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(runs.ArtifactError, match=r"p\.jsonl:2: field 'prompt' should be str"):
        runs.load_prompts(f)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"instruction": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(runs.ArtifactError, match=r"no column 'prompt'; columns are \['instruction'\]"):
        runs.load_prompts(tmp_path / "p.parquet")
    assert runs.load_prompts(tmp_path / "p.parquet", column="instruction") == ["x", "y"]
    with pytest.raises(runs.ArtifactError, match="record 1: field 'win_prob' should be"):
        runs.check_dataset([{"prompt_id": 0, "prompt": "x", "response": "y", "finished": True, "win_prob": "1",
                             "ref_logp": 0.0}], "d.jsonl")


def test_rank_stage_with_pairrm(tmp_path, tiny):
    """`--oracle pairrm`: the rank stage fills each prompt's K x K matrix with PairRM's batched preference matrix."""
    import pairrm
    d, _, _ = tiny
    rm_dir = pairrm.save_tiny_random_checkpoint(tmp_path / "pairrm", layout="PairRM-hf", seed=0)
    prompts = tmp_path / "p.jsonl"
    runs.write_jsonl(prompts, [{"prompt": x} for x in ["play rps", "play weighted rps", "rock paper"]])
    out = tmp_path / "run"
    args = ["--model", str(d), "--prompts", str(prompts), "--oracle", "pairrm", "--pairrm", str(rm_dir),
            "--iterations", "1", "--K", "3", "--max-new-tokens", "4", "--out", str(out), "--stop-after", "rank",
            "--no-progress"]
    assert sppo.main(args) == 0
    gens = runs.read_jsonl(out / "iter0" / "generations.jsonl")
    prefs = runs.read_jsonl(out / "iter0" / "preferences.jsonl")
    assert len(prefs) == 3
    ranker = pairrm.PairRM.from_pretrained(rm_dir)
    for g, p in zip(gens, prefs):                                     # one prompt at a time, as the reference
        want = ranker.preference_matrix(g["prompt"], g["responses"], mode="pairwise").double().numpy()
        np.testing.assert_allclose(np.array(p["P"]), want, atol=1e-6)
        M = ranker.logit_matrices([g["prompt"]], [g["responses"]])[0].double().numpy()    # kept for selection
        np.testing.assert_allclose(np.array(p["logits"]), M, atol=1e-5)
    # the next stages run from these files: D_t keeps the winner and loser of each prompt
    assert sppo.main(args[:-3] + ["--stop-after", "dataset", "--no-progress"]) == 0
    rows = runs.read_jsonl(out / "iter0" / "dataset.jsonl")
    assert [r["role"] for r in rows] == ["winner", "loser"] * 3
    for r in rows:                                                    # P-hat: Eq. (4.5); the pair: s_PairRM's
        wp = sppo.win_rates(np.array(prefs[r["prompt_id"]]["P"]))     # argmax / argmin (Sec. 5.1)
        s = pairrm.scores_from_logits(torch.tensor(prefs[r["prompt_id"]]["logits"])).numpy()
        assert r["win_prob"] == pytest.approx(wp[r["k"]])
        assert s[r["k"]] == (s.max() if r["role"] == "winner" else s.min())



# Chat templates of the authors' base models (tokenizer_config.json of Mistral-7B-Instruct-v0.2, Meta-Llama-3-8B-
# Instruct, gemma-2-9b-it), for the oracle's templated prompt.
CHAT_TEMPLATES = {
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) "
               "%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role']"
               " == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and "
               "assistant roles are supported!') }}{% endif %}{% endfor %}",
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
              " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
              "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
              "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "gemma2": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
              "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if"
              " (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
              "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"}


def rank_py_prompt(tokenizer, text):
    """uclaml/SPPO scripts/rank.py's apply_template, transcribed: what their PairRM reads as x."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}, {"role": "assistant", "content": "None"}],
                                         tokenize=False).split("None")[0]


class RecordingOracle:
    """A preference oracle that records the prompt text it is given (the responses' lengths decide)."""

    def __init__(self):
        self.seen = []

    def identity(self):
        return "recording"

    def __call__(self, prompt, responses):
        self.seen.append(prompt)
        n = np.array([len(r) for r in responses], dtype=float)
        return 1 / (1 + np.exp(n[None, :] - n[:, None]))                           # (K, K), longer wins


class TieOracle(RecordingOracle):
    """RecordingOracle's preferences (the longer response wins, equal lengths tie), except that on a prompt starting
    with 'tie' every response ties."""

    def identity(self):
        return "ties"

    def __call__(self, prompt, responses):
        P = super().__call__(prompt, responses)
        return np.full_like(P, 0.5) if prompt.startswith("tie") else P


def test_a_run_trains_on_the_untied_prompts_and_refuses_an_all_tied_iteration(tmp_path):
    """End to end with --selection pair --loss dpo: D_t has a (winner, loser) pair for exactly the prompts whose win
    rates are not all equal (recomputed here from the oracle), none for the 'tie' prompts; the run trains, records
    how many prompts had no pair, and resumes as itself. A run whose every prompt ties stops at the dataset stage."""
    d = sppo_toy.build_tiny_policy(tmp_path / "pol", seed=0)
    prompts = ["tie rps", "play rps", "tie weighted", "play weighted rps"] * 2
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": x} for x in prompts])
    cfg = sppo.SPPOConfig(model=d, prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"), iterations=2,
                          split_prompts=False, K=3, max_new_tokens=4, selection="pair", loss="dpo", optimizer="adamw",
                          lr=1e-2, global_batch=2, micro_batch=2, progress=False, oracle="game")
    assert sppo.run(cfg, oracle=TieOracle()) is not None
    for t in range(2):
        it = tmp_path / "run" / f"iter{t}"
        gens = runs.read_generations(it / "generations.jsonl", prompts, cfg.K)
        rows = runs.read_dataset(it / "dataset.jsonl")
        wp = [TieOracle()(x, g["responses"]).mean(1) for x, g in zip(prompts, gens)]              # Eq. (4.5)
        untied = [i for i, p in enumerate(wp) if p.max() > p.min()]
        assert untied and all(not prompts[i].startswith("tie") for i in untied)
        assert [r["prompt_id"] for r in rows] == [i for i in untied for _ in range(2)]
        assert [r["k"] for r in rows] == [k for i in untied for k in (wp[i].argmax(), wp[i].argmin())]
        metrics = json.loads((it / "metrics.json").read_text())
        assert metrics["prompts_without_pair"] == len(prompts) - len(untied) and len(metrics["history"]) >= 1
    before = (tmp_path / "run" / "iter1" / "manifest.json").read_text()
    assert sppo.run(cfg, oracle=TieOracle()) is not None                            # resumes: nothing redone
    assert (tmp_path / "run" / "iter1" / "manifest.json").read_text() == before
    runs.write_jsonl(tmp_path / "tied.jsonl", [{"prompt": "tie rps"}] * 3)
    tied = dataclasses.replace(cfg, prompts=str(tmp_path / "tied.jsonl"), out=str(tmp_path / "tied"))
    with pytest.raises(runs.ArtifactError, match=r"iter0/preferences.jsonl: the K = 3 responses of every one of the 3 "
                                                 r"prompts tie.*--selection all"):
        sppo.run(tied, oracle=TieOracle())
    assert not (tmp_path / "tied" / "iter0" / "dataset.jsonl").exists()


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_chat_prompt_is_rank_py_prompt(tiny, template):
    _, _, tok = tiny
    tok = __import__("copy").deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATES[template]
    for x in ["play rps", "  two words, then a line\nbreak  ", "what is 2 + 2?"]:
        assert policy.chat_prompt(tok, x) == rank_py_prompt(tok, x)


def test_oracle_reads_templated_prompt_and_manifest_refuses_raw(tmp_path):
    """--oracle-prompt templated: the oracle receives exactly rank.py's templated string for each prompt; the rank
    stage of a run made with raw prompts is refused (StaleStage naming the setting)."""
    d = sppo_toy.build_tiny_policy(tmp_path / "pol", seed=0)
    model, tok = runs.load_policy(d, sppo.SPPOConfig(), "cpu")
    tok.chat_template = CHAT_TEMPLATES["mistral"]
    runs.save_policy(model, tok, d)
    prompts = ["play rps", "play weighted rps", "rock paper"]
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": x} for x in prompts])
    cfg = sppo.SPPOConfig(model=d, prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"), iterations=1, K=2,
                          max_new_tokens=2, stop_after="rank", progress=False, oracle="game")
    raw, templated = RecordingOracle(), RecordingOracle()
    sppo.run(cfg, oracle=raw)
    assert raw.seen == prompts
    with pytest.raises(runs.StaleStage, match="setting oracle_prompt = 'raw', but this run has oracle_prompt = "
                       "'templated'"):
        sppo.run(dataclasses.replace(cfg, oracle_prompt="templated"), oracle=templated)
    sppo.run(dataclasses.replace(cfg, oracle_prompt="templated", out=str(tmp_path / "run2")), oracle=templated)
    assert templated.seen == [rank_py_prompt(tok, x) for x in prompts]
    assert templated.seen[0] == "<s>[INST] play rps [/INST]"
    tok.chat_template = None
    runs.save_policy(model, tok, d)
    with pytest.raises(runs.ConfigError, match="no chat template; use --oracle-prompt raw"):
        sppo.validate_config(dataclasses.replace(cfg, oracle_prompt="templated"))


def test_held_out_win_rates_equal_a_direct_computation(tmp_path):
    """--eval-prompts: metrics.json of iteration t holds P(pi_{t+1} > pi_t) and P(pi_{t+1} > pi_0) with s.e., raw and
    length-controlled; here recomputed from the saved policies, one prompt at a time, with the same oracle and the same
    sampling seeds, the LC rate by experiments.lc_win_rate on those labels and the sampled lengths."""
    d = sppo_toy.build_tiny_policy(tmp_path / "pol", seed=0)
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": x} for x in ["play rps", "play weighted rps"] * 2])
    held = ["play rps", "rock paper", "play weighted rps", "paper scissors", "big rock", "spock"]
    runs.write_jsonl(tmp_path / "held.jsonl", [{"prompt": x} for x in held])
    out = tmp_path / "run"
    cfg = sppo.SPPOConfig(model=d, prompts=str(tmp_path / "p.jsonl"), eval_prompts=str(tmp_path / "held.jsonl"),
                          out=str(out), iterations=2, split_prompts=False, K=2, max_new_tokens=4, optimizer="adamw",
                          lr=3e-2, global_batch=4, micro_batch=4, epochs=2, progress=False, oracle="game")
    sppo.run(cfg, oracle=RecordingOracle())
    pols = [runs.load_policy(p, cfg, "cpu") for p in (d, out / "iter0" / "model", out / "iter1" / "model")]
    ys, lens = zip(*[sppo.answers(m, tok, held, cfg)[::2] for m, tok in pols])
    oracle = RecordingOracle()
    for t in range(2):
        got = json.loads((out / f"iter{t}" / "metrics.json").read_text())["held_out"]
        assert got["prompts"] == len(held)
        for s in (t, 0):
            p = [oracle(x, [a, b])[0, 1] for x, a, b in zip(held, ys[t + 1], ys[s])]   # one prompt at a time
            key = "t" if s == t else "0"
            assert got[f"win_rate_vs_pi_{key}"] == pytest.approx(np.mean(p), abs=1e-12)
            assert got[f"se_vs_pi_{key}"] == pytest.approx(np.std(p, ddof=1) / math.sqrt(len(p)), abs=1e-12)
            try:
                lc = np.array(experiments.lc_win_rate(p, lens[t + 1], lens[s])) / 100
            except ValueError as e:
                assert got[f"lc_win_rate_vs_pi_{key}"] is None and got[f"lc_why_vs_pi_{key}"] == str(e)
            else:
                assert [got[f"lc_win_rate_vs_pi_{key}"], got[f"lc_se_vs_pi_{key}"]] == pytest.approx(lc, abs=1e-12)
    assert got["win_rate_vs_pi_t"] != got["win_rate_vs_pi_0"]                   # t = 1: two different baselines
    assert "eval_prompts" in runs.STAGE_SETTINGS["train"]



# -------------------------------------------------------------------------------------------------- training plumbing
def test_make_scheduler_by_hand():
    """Warm-up ceil(0.1 * 25) = 3 steps: lr (s+1)/3 * peak for s < 3, then (25 - s)/(25 - 3) * peak down to 1/22."""
    peak = 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = training.make_scheduler(opt, total_steps=25, warmup_ratio=0.1)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = {0: peak / 3, 2: peak, 3: peak, 4: peak * 21 / 22, 24: peak / 22}       # steps 0, w-1, w, w+1, T-1
    for step, lr in want.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12), step
    assert lrs[1] == pytest.approx(2 * peak / 3)


def test_batch_schedule_covers_every_row_once_per_epoch():
    steps = training.batch_schedule(10, global_batch=4, epochs=3, seed=7)
    assert [len(s) for s in steps] == [4, 4, 2] * 3
    for e in range(3):
        assert sorted(i for s in steps[3 * e:3 * e + 3] for i in s) == list(range(10))
    assert steps == training.batch_schedule(10, 4, 3, seed=7) and steps != training.batch_schedule(10, 4, 3, seed=8)
    assert steps[:3] != steps[3:6]                                                      # reshuffled each epoch


def test_grouped_micro_batches_keep_pairs_sort_by_length_and_cover_each_row_once():
    lengths = [5, 9, 30, 2, 7, 7, 1, 40, 12, 3, 6, 6]                           # 6 pairs: rows 2i, 2i+1
    pairs = [([0] * 2, [0] * (n - 2)) if n > 2 else ([0] * n, []) for n in lengths]
    steps = training.batch_schedule(len(pairs), global_batch=4, epochs=2, seed=3, group=2)
    for e in range(2):
        epoch = [mb for s in steps[2 * e:2 * e + 2] for mb in training.micro_batches(s, pairs, 2, group=2)]
        assert sorted(i for mb in epoch for i in mb) == list(range(12))                 # every row once per epoch
        assert all(mb[k] % 2 == 0 and mb[k + 1] == mb[k] + 1 for mb in epoch for k in range(0, len(mb), 2))
    idx = steps[0]
    grouped = training.micro_batches(idx, pairs, 2, group=2)
    longest = [max(lengths[i], lengths[i ^ 1]) for mb in grouped for i in mb[::2]]
    assert longest == sorted(longest, reverse=True)                                     # longest pair first
    assert training.micro_batches(idx, pairs, 2, group=2, by_length=False) == [idx[:4], idx[4:]]   # the plain cut
    pad = lambda mbs: sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb) for mb in mbs)  # noqa
    assert pad(grouped) < pad([idx[:4], idx[4:]])


@pytest.mark.parametrize("pack", [False, True])
def test_grouped_step_gives_the_loss_and_gradient_of_one_row_at_a_time(tiny, pack):
    """Length-grouped micro-batches of 2 pairs (padded, or packed into one sequence; in another order) against each
    row alone: the same step loss, gradient and grad norm to fp32 rounding (rel 1e-6 on the loss, 1e-5 of the largest
    gradient entry); train_policy's step reports the same loss and norm."""
    d, _, tok = tiny
    rows = sppo_toy.synthetic_dataset(8, seed=11)                                      # 1..12 words per response
    for n, r in enumerate(rows):
        r["ref_logp"] = -20.0 + n
    cfg = sppo.SPPOConfig(eta=4.0, global_batch=4, micro_batch=2, max_length=48, max_prompt_length=16,
                          max_grad_norm=1e9, pack=pack, progress=False)
    pairs, _ = training.encode_rows(tok, rows, cfg)
    idx = training.train_schedule(rows, cfg)[0][0]                                          # all 8 rows, seeded order
    mbs = training.micro_batches(idx, pairs, cfg.micro_batch, 2)
    assert mbs != [idx[:4], idx[4:]]                                                    # grouping changed the cut

    def grads(model, batches):
        model.zero_grad()
        loss = sum(training.example_losses(model, training.make_batch(pairs, rows, b, tok.pad_token_id, cfg, "cpu"),
                                       cfg).sum() for b in batches) / len(idx)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    model, _ = runs.load_policy(d, cfg, "cpu")
    loss_g, g_g = grads(model, mbs)
    loss_1, g_1 = grads(model, [[i] for i in idx])                                     # one row at a time
    assert loss_g == pytest.approx(loss_1, rel=1e-6)
    assert (g_g - g_1).abs().max().item() <= 1e-5 * g_1.abs().max().item()
    history = training.train_policy(model, tok, rows, cfg, "cpu")
    assert history[0]["loss"] == pytest.approx(loss_1, rel=1e-6)
    assert history[0]["grad_norm"] == pytest.approx(g_1.norm().item(), rel=1e-5)


def test_iteration_prompts_are_disjoint_slices():
    prompts = [f"p{i}" for i in range(10)]
    cfg = sppo.SPPOConfig(iterations=3)
    parts = [runs.iteration_prompts(prompts, cfg, t) for t in range(3)]
    assert parts == [prompts[0:4], prompts[4:7], prompts[7:10]]                       # in order, all used once
    assert runs.iteration_prompts(prompts, dataclasses.replace(cfg, split_prompts=False), 2) == prompts


def test_readers_refuse_files_of_other_prompts(tmp_path):
    prompts = ["a", "b", "c"]
    old = [{"responses": ["x", "y"], "finished": [True, False]}] * 3
    f = tmp_path / "generations.jsonl"
    runs.write_generations(f, prompts, old)                          # texts without token ids
    with pytest.raises(runs.ArtifactError, match=r"generations\.jsonl:1: missing field 'token_ids'"):
        runs.read_generations(f, prompts, K=2)
    gens = [dict(g, token_ids=[[5], [6, 7]], stop_ids=[2, None]) for g in old]
    runs.write_generations(f, prompts, gens)
    assert [g["prompt"] for g in runs.read_generations(f, prompts, K=2)] == prompts
    with pytest.raises(runs.ArtifactError, match=r"generations\.jsonl:2: expected prompt 1"):
        runs.read_generations(f, ["a", "z", "c"], K=2)
    with pytest.raises(runs.ArtifactError, match="K=3"):
        runs.read_generations(f, prompts, K=3)
    with pytest.raises(runs.ArtifactError, match="3 records for 4 prompts"):
        runs.read_generations(f, prompts + ["d"], K=2)
    p = tmp_path / "preferences.jsonl"
    runs.write_preferences(p, [np.array([[0.5, 0.9], [0.1, 0.5]])] * 3)
    assert len(runs.read_preferences(p, 3, K=2)) == 3
    runs.write_jsonl(p, [{"prompt_id": 1, "P": [[0.5, 0.9], [0.1, 0.5]]}])
    with pytest.raises(runs.ArtifactError, match=r"preferences\.jsonl:1: expected prompt 0"):
        runs.read_preferences(p, 1, K=2)


# -------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
@pytest.mark.parametrize("script", ["sppo.py", "sppo_toy.py", "arena.py", "train_7b.py", "bench/bench.py",
                                    "hedge_toy.py", "last_iterate.py"])
def test_help_shows_defaults_and_unknown_flags_exit_at_once(script):
    """Every script parses its config dataclass the same way: --help lists true defaults; an unknown flag exits 2
    before any work starts. bench/ is a package: its script runs as `python -m bench.bench`."""
    module = script[:-3].replace("/", ".")
    cmd = [sys.executable, "-m", module] if "/" in script else [sys.executable, str(ROOT / script)]
    r = conftest.run([*cmd, "--help"], cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "(default: " in r.stdout, r.stderr[-2000:]
    assert "--config" in r.stdout                                                   # cli.py's, for every script
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--no-such-flag", "1"])
    assert e.value.code == 2


def test_sppo_cli_choices_and_config_file(tmp_path):
    r = conftest.run([sys.executable, str(ROOT / "sppo.py"), "--help"], cwd=ROOT, timeout=120,
                     env={**os.environ, "COLUMNS": "250"})                             # one line per flag
    assert "{generate,rank,dataset,train}" in r.stdout and "(default: 1000.0)" in r.stdout
    assert "(default: rmsprop)" in r.stdout and "{pair,all}" in r.stdout
    for bad in (["--stop-after", "ranking"], ["--selection", "best"], ["--K", "five"]):
        with pytest.raises(SystemExit) as e:
            sppo.main([*bad, "--out", str(tmp_path / "never")])
        assert e.value.code == 2 and not (tmp_path / "never").exists(), bad
    f = tmp_path / "recipe.yaml"
    f.write_text("K: 3\neta: 7.5\nsplit_prompts: false\ntemperature: 0.7\n")
    cfg = cli.parse(sppo.SPPOConfig, ["--config", str(f), "--eta", "9"])
    assert (cfg.K, cfg.eta, cfg.split_prompts, cfg.temperature) == (3, 9.0, False, 0.7)      # flags override
    for text, why in [("K: 3\nkay: 4\n", "unknown setting 'kay'"), ("selection: best\n", "invalid choice: 'best'"),
                      ("K: 3\neta: 2\nK: 4\n", "line 3: 'K' is given twice \\(first on line 1\\)"),
                      ("K: [3, 4]\n", "K takes one value")]:
        f.write_text(text)
        with pytest.raises(SystemExit):
            cli.parse(sppo.SPPOConfig, ["--config", str(f)])
        r = conftest.run([sys.executable, str(ROOT / "sppo.py"), "--config", str(f), "--out", str(tmp_path / "n")],
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2 and re.search(why, r.stderr) and not (tmp_path / "n").exists(), (text, r.stderr)
    r = conftest.run([sys.executable, str(ROOT / "sppo.py"), "--config", str(tmp_path / "missing.yaml")],
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "missing.yaml: no such file" in r.stderr


# -------------------------------------------------------------------------------------------------- golden losses
def test_golden_losses_single_process():
    """The per-step losses of a fixed, sampling-free run on one process equal tests/assets/golden_losses.json
    (rtol stated in the file; regenerate with the command it names)."""
    import golden_losses
    gold = json.loads((ROOT / "tests" / "assets" / "golden_losses.json").read_text())
    got = golden_losses.single_process_losses()
    assert len(got) == len(gold["single_process"])
    np.testing.assert_allclose(got, gold["single_process"], rtol=gold["rtol"])


# -------------------------------------------------------------------------------------------------- --loss
PAIR_LOSS = {  # the loss functions alone, on one pair (w, l): log-probs under pi_theta, pi_ref; P(w > l); beta = 1/eta
    "sppo_pair": lambda lw, rw, ll, rl, p, kl, eta: losses.sppo_pair_loss(lw, rw, ll, rl, p, eta),
    "dpo": lambda lw, rw, ll, rl, p, kl, eta: losses.dpo_loss(lw, rw, ll, rl, 1 / eta),
    "ipo": lambda lw, rw, ll, rl, p, kl, eta: losses.ipo_loss(lw, rw, ll, rl, 1 / eta, target=0.7),
    "sppo_hard": lambda lw, rw, ll, rl, p, kl, eta: losses.sppo_hard_loss(lw, rw, ll, rl, eta),
    "kto": lambda lw, rw, ll, rl, p, kl, eta: losses.kto_loss(lw, rw, ll, rl, 1 / eta, kl)}
TAU = 0.15
ROW_TARGET = {  # SPPO's successors, written out from their papers' updates (not from losses.py): the row's target
    "sppo": lambda r, eta: eta * (r["win_prob"] - 0.5),
    "optimistic": lambda r, eta: eta * (2 * r["win_prob"] - r["prev_win_prob"] - 0.5),
    "extragradient": lambda r, eta: eta * (r["half_win_prob"] - 0.5),
    "mirror_prox": lambda r, eta: (eta * r["half_win_prob"] + eta * TAU * (r["mu_logp"] - r["ref_logp"]) - eta / 2)
    / (1 + eta * TAU),
    "nash_md": lambda r, eta: eta * r["mix_win_prob"] + eta * TAU * (r["mu_logp"] - r["ref_logp"]) - eta / 2,
    "mmd": lambda r, eta: (eta * r["win_prob"] + eta * TAU * (r["mu_logp"] - r["ref_logp"]) - eta / 2) / (1 + eta * TAU)}


def successor_pair_loss(loss, lw, ll, rw, rl, eta):
    """INPO's and DNO's pair losses by hand: rw, rl the rows (ref_logp, mu_logp, win_prob)."""
    hw, hl = lw - rw["ref_logp"], ll - rl["ref_logp"]
    if loss == "inpo":                                         # Zhang et al. Eq. (8), their eta = 1/eta, tau/eta = eta tau
        kl = eta * TAU * ((rw["mu_logp"] - rw["ref_logp"]) - (rl["mu_logp"] - rl["ref_logp"]))
        return (hw - hl - kl - eta / 2) ** 2
    p = 1 / (1 + math.exp(-(rw["win_prob"] - rl["win_prob"])))  # Rosset et al. Eq. (8), their eta = 1/eta
    m = (hw - hl) / eta
    return -(p * torch.nn.functional.logsigmoid(m) + (1 - p) * torch.nn.functional.logsigmoid(-m))


@pytest.mark.parametrize("loss", list(sppo.LOSSES))            # every entry of the table: a new loss needs its line
def test_each_loss_trains_on_what_the_loss_function_computes(tiny, loss):
    """One optimizer step of train_policy with --loss X against a hand-made step: log-probs of the 4 rows (2 pairs),
    the loss function of X called on each pair alone, the mean over pairs (sppo: over rows), backward, clip, AdamW."""
    d, _, tok = tiny
    rows = sppo_toy.synthetic_dataset(4, seed=5)
    for n, r in enumerate(rows):
        r.update(ref_logp=-30.0 + 3 * n, pair_prob=[0.8, 0.2, 0.35, 0.65][n], mu_logp=-28.0 + 2.5 * n,
                 prev_win_prob=[0.3, 0.6, 0.55, 0.4][n], half_win_prob=[0.7, 0.35, 0.45, 0.5][n],
                 mix_win_prob=[0.65, 0.3, 0.5, 0.45][n])
    cfg = sppo.SPPOConfig(loss=loss, eta=4.0, ipo_target=0.7, global_batch=2, micro_batch=1, lr=1e-3, tau=TAU,
                          optimizer="adamw", max_length=48, max_prompt_length=16, progress=False)
    model, _ = runs.load_policy(d, cfg, "cpu")
    hand, _ = runs.load_policy(d, cfg, "cpu")
    history = training.train_policy(model, tok, rows, cfg, "cpu")
    assert len(history) == 1

    pairs, _ = training.encode_rows(tok, rows, cfg)
    lp = [policy.sequence_logps(hand, **policy.collate([p], tok.pad_token_id))[0] for p in pairs]     # one at a time
    ref = [torch.tensor(r["ref_logp"]) for r in rows]
    if loss == "sppo":
        terms = [losses.sppo_loss(lp[i], ref[i], torch.tensor(rows[i]["win_prob"]), cfg.eta) for i in range(4)]
    elif loss in ROW_TARGET:
        terms = [(lp[i] - ref[i] - ROW_TARGET[loss](rows[i], cfg.eta)) ** 2 for i in range(4)]
    elif loss in ("inpo", "dno"):
        terms = [successor_pair_loss(loss, lp[i], lp[i + 1], rows[i], rows[i + 1], cfg.eta) for i in (0, 2)]
    else:
        terms = [PAIR_LOSS[loss](lp[i], ref[i], lp[i + 1], ref[i + 1], torch.tensor(rows[i]["pair_prob"]),
                                 ((lp[i] - ref[i] + lp[i + 1] - ref[i + 1]) / 2).detach(), cfg.eta)
                 for i in (0, 2)]
    total = sum(terms) / len(terms)
    assert history[0]["loss"] == pytest.approx(total.item(), rel=1e-5)
    total.backward()
    torch.nn.utils.clip_grad_norm_(hand.parameters(), cfg.max_grad_norm)
    opt = torch.optim.AdamW(hand.parameters(), lr=cfg.lr, weight_decay=0.0)
    opt.step()
    start, _ = runs.load_policy(d, cfg, "cpu")
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), hand.parameters())) < 1e-2 * moved


def test_pair_losses_refuse_rows_that_are_not_pairs():
    with pytest.raises(runs.ConfigError, match="--loss"):
        sppo.validate_config(sppo.SPPOConfig(loss="dpo", selection="all"))
    rows = sppo_toy.synthetic_dataset(4)
    with pytest.raises(runs.ArtifactError, match="record 1: --loss sppo_pair needs .* pair_prob"):
        training.group_size(rows, sppo.SPPOConfig(loss="sppo_pair"))
    rows[0]["role"], rows[1]["role"] = "loser", "winner"
    with pytest.raises(runs.ArtifactError, match="record 1: --loss dpo needs each prompt's winner, then its loser"):
        training.group_size(rows, sppo.SPPOConfig(loss="dpo"))
