"""The length-only baselines of real_run.py --baselines (issue 28): pi_0 changed only in length. Each transform by
hand at tiny sizes - the first-sentence cut on hand-written records, the stop-token bias against logits computed
directly on a tiny random Llama, the smaller cap against the full cap's samples cut - and the report with
--baselines end to end on hand-made samples (no model)."""
import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import arena
import conftest
import policy
import real_run
import runs
import sppo
import sppo_toy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["play rps", "play weighted rps", "rock paper", "big sharp lizard"]


# ----------------------------------------------------------------------------------------------------------------
# (b) pi_0's own answers cut after their first sentence end.
@pytest.mark.parametrize("pieces, finished, cut, k", [
    (["Paris", " is", " the", " capital", ".", " It", " is", " big", "."], True, "Paris is the capital.", 5),
    (["Version", " 3", ".", "5", " is", " out", "!", " Yes", " it", " is"], False, "Version 3.5 is out!", 7),
    (["Is", " it", "?", " yes"], False, "Is it?", 3),
    (["Hi", ".\n", "There", " you", " go"], False, "Hi.", 2),                # a token across the cut counts whole
    (["Ends", " here", "."], False, "Ends here.", 3),                     # cut by the cap just after a period
    (["e", ".g", ".,", " no", " end", " 1", ".2"], False, None, None),        # no '.', '!' or '?' before a space/end
    (["The", " chemical", " symbol", " is", " \"Au", ".\"", " It"], False, None, None),   # '."' is not an end
])
def test_first_sentence_cut_by_hand(pieces, finished, cut, k):
    decode = lambda ids: "".join(pieces[i] for i in ids)                        # noqa: E731 (a token = a piece)
    ids = list(range(len(pieces)))
    g = {"responses": [decode(ids)], "finished": [finished], "token_ids": [ids], "stop_ids": [9 if finished else None]}
    new = real_run.cut_at_first_sentence(g, decode, stop_id=7)
    if cut is None:                                                             # unchanged: text, flag, ids, stop
        assert new == g
    else:
        assert new == {"responses": [cut], "finished": [True], "token_ids": [ids[:k]], "stop_ids": [7]}
    assert g["token_ids"] == [ids]                                              # the input record is not changed


def test_first_sentence_cut_refuses_ids_that_are_not_the_text():
    g = {"responses": ["One. Two."], "finished": [True], "token_ids": [[0, 1]], "stop_ids": [2]}
    with pytest.raises(runs.ArtifactError, match="token_ids do not decode to its text"):
        real_run.cut_at_first_sentence(g, lambda ids: "Uno. Dos."[:len(ids) * 5], stop_id=2)


# ----------------------------------------------------------------------------------------------------------------
# (c) pi_0 with b added to the stop token's logit; (a) pi_0 with a smaller max_new_tokens. A tiny random Llama.
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = sppo_toy.build_tiny_policy(tmp_path_factory.mktemp("tiny") / "llama", seed=0)
    model, tok = runs.load_policy(d, sppo.SPPOConfig(), "cpu")
    return model.eval(), tok


@torch.no_grad()
@pytest.mark.parametrize("b", [0.0, 1.5, -2.0])
def test_eos_bias_raises_p_stop_as_the_logits_say(tiny, b):
    """Every step's sampling scores under generation_config(eos_bias=b) are (l + b e_stop) / T, l the model's logits
    recomputed here on the sampled prefix, so P(stop) has its odds multiplied by exp(b / T)."""
    model, tok = tiny
    T, stop = 0.7, policy.eos_ids(model, tok)
    assert stop == [2]
    cfg = sppo.SPPOConfig(K=1, temperature=T, top_p=1.0, max_new_tokens=6)
    x = torch.tensor([policy.prompt_ids(tok, PROMPTS[1])])
    gen_cfg = policy.generation_config(model, tok, cfg, b)
    gen_cfg.output_scores = gen_cfg.return_dict_in_generate = True
    torch.manual_seed(3)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
    assert len(out.scores) >= 1
    for t, scores in enumerate(out.scores):
        logits = model(input_ids=out.sequences[:, :x.shape[1] + t]).logits[0, -1].double()        # (V,)
        want = logits.clone()
        want[stop] += b
        np.testing.assert_allclose(scores[0].double().numpy(), (want / T).numpy(), rtol=1e-5, atol=1e-5)
        p_plain, p_biased = (torch.softmax(v / T, -1)[stop[0]].item() for v in (logits, want))
        odds = lambda p: p / (1 - p)                                              # noqa: E731
        assert odds(p_biased) == pytest.approx(odds(p_plain) * np.exp(b / T), rel=1e-6)
        assert (p_biased > p_plain) == (b > 0) and (p_biased < p_plain) == (b < 0)


def test_eos_bias_through_generate_responses(tiny):
    """0 is the plain sampler; +60 stops every answer at once; -60 lets none stop; +3 shortens them."""
    model, tok = tiny
    cfg = sppo.SPPOConfig(K=8, temperature=1.0, top_p=1.0, max_new_tokens=10, gen_batch=2, seed=4, progress=False)
    gen = lambda b: policy.generate_responses(model, tok, PROMPTS, cfg, eos_bias=b)   # noqa: E731
    plain, zero, stops, never, some = (policy.generate_responses(model, tok, PROMPTS, cfg), gen(0.0), gen(60.0),
                                       gen(-60.0), gen(3.0))
    assert zero == plain
    assert all(g["token_ids"] == [[]] * 8 and g["finished"] == [True] * 8 and g["stop_ids"] == [2] * 8 for g in stops)
    assert all(len(ids) == 10 and not f for g in never for ids, f in zip(g["token_ids"], g["finished"]))
    mean = lambda gs: arena.token_lengths(gs).mean()                            # noqa: E731
    assert mean(some) < 0.5 * mean(plain) and np.mean([f for g in some for f in g["finished"]]) > 0.9


def test_smaller_cap_is_pi0_cut_at_the_cap(tiny):
    """Under the same seeds, pi_0 with max_new_tokens 4 draws what pi_0 with 10 drew, up to token 4: each sample is
    the long one's first 4 tokens, finished exactly where the long one stopped within them."""
    model, tok = tiny
    cfg = sppo.SPPOConfig(K=6, temperature=0.7, top_p=0.9, max_new_tokens=10, gen_batch=2, seed=1, progress=False)
    long = policy.generate_responses(model, tok, PROMPTS, cfg)
    short = policy.generate_responses(model, tok, PROMPTS, sppo.SPPOConfig(**{**vars(cfg), "max_new_tokens": 4}))
    n_cut = 0
    for gl, gs in zip(long, short):
        for ids_l, f_l, ids_s, f_s in zip(gl["token_ids"], gl["finished"], gs["token_ids"], gs["finished"]):
            assert ids_s == ids_l[:4] and f_s == (f_l and len(ids_l) < 4)
            n_cut += len(ids_l) >= 4
    assert 0 < n_cut < 24                                                       # both cases occur


def test_baseline_samples_are_cached_by_their_settings(tiny, tmp_path, monkeypatch):
    """held_out_samples samples once per setting: a second call reads the file; the bias and the cap each give their
    own file; with eos_bias 0 the name is the iterates' (no bias term in the key)."""
    d = sppo_toy.build_tiny_policy(tmp_path / "pi0", seed=0)
    gen = sppo.SPPOConfig(K=2, temperature=0.7, top_p=0.9, max_new_tokens=6, gen_batch=2, seed=1, progress=False)
    folder = tmp_path / "cache"
    plain = real_run.held_out_samples(d, "pi_0", PROMPTS, gen, folder)
    biased = real_run.held_out_samples(d, "pi_0_eos+9", PROMPTS, gen, folder, eos_bias=9.0)
    short = real_run.held_out_samples(d, "pi_0_cap3", PROMPTS, sppo.SPPOConfig(**{**vars(gen), "max_new_tokens": 3}),
                                      folder)
    assert len({p.name for p in folder.glob("*.jsonl")}) == 3
    assert arena.token_lengths(biased).mean() < arena.token_lengths(plain).mean()
    assert [g["token_ids"] for g in short] == [[ids[:3] for ids in g["token_ids"]] for g in plain]
    monkeypatch.setattr(policy, "generate_responses", lambda *a, **k: 1 / 0)      # now every call reads its file
    assert real_run.held_out_samples(d, "pi_0_eos+9", PROMPTS, gen, folder, eos_bias=9.0) == biased
    assert real_run.held_out_samples(d, "pi_0", PROMPTS, gen, folder) == plain
    key = hashlib.sha256(json.dumps([d, runs.Hashes(folder)(d), PROMPTS, dataclasses.asdict(gen)]).encode())
    assert real_run.samples_path(d, "pi_0", PROMPTS, gen, folder).name == f"pi_0_{key.hexdigest()[:16]}.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# The report: real_run.py --baselines on a finished 1-iteration run with hand-made samples (no model).
def test_report_with_baselines_end_to_end_on_hand_made_samples(tmp_path, monkeypatch, capsys):
    """Each baseline is sampled with the arena's settings and seed but its one change (cap 24; eos_bias 2.5), the
    first-sentence cut is pi_0's answers cut, and every evaluator's row equals lc_against of pi_0 and that baseline
    computed here; the table is printed and the JSON holds it. Tokens are characters (decode: chr)."""
    prompts = conftest.REAL_RUN_PROMPTS
    out, _ = conftest.hand_made_real_run(tmp_path, prompts_with_cycle=0)
    answers = {"pi_0": (["Japan is an island country. Its capital, Tokyo, is large.", "Plant seed.",
                         "The largest mammal is a very big animal that lives in the sea and"], [True, True, False]),
               "pi_1": (["The capital of Japan is Tokyo.", "Dig a small hole, put the seed in, cover it, water it.",
                         "The blue whale."], [True, True, True]),
               "pi_0_cap24": (["Japan is an island count", "Plant seed.", "The largest mammal is a "],
                              [False, True, False]),
               "pi_0_eos+2.5": (["Japan is an island country.", "Plant.", "The blue whale is."], [True, True, True])}
    calls = {}

    def samples(model, label, ps, gen, folder, eos_bias=0.0):
        calls[label] = (str(model), gen.max_new_tokens, gen.seed, gen.temperature, gen.top_p, eos_bias, folder)
        return [{"responses": [y], "finished": [f], "token_ids": [[ord(c) for c in y]],
                 "stop_ids": [5 if f else None]} for y, f in zip(*answers[label])]
    monkeypatch.setattr(real_run, "held_out_samples", samples)
    monkeypatch.setattr(real_run, "load_tokenizer", lambda model: SimpleNamespace(
        decode=lambda ids: "".join(map(chr, ids)), eos_token_id=5))
    argv = ["--out", str(out), "--prompts", str(tmp_path / "p.jsonl"), "--figures", str(tmp_path / "figs"),
            "--cache", str(tmp_path / "cache"), "--references", str(ROOT / "data/reference_heldout.jsonl")]
    assert real_run.main(argv + ["--baselines", "--eos-bias", "2.5"]) == 0
    pi0 = str(tmp_path / "pi0")
    assert calls == {"pi_0": (pi0, 48, 1, 0.7, 0.9, 0.0, tmp_path / "cache"),
                     "pi_1": (str(out / "iter0" / "model"), 48, 1, 0.7, 0.9, 0.0, tmp_path / "cache"),
                     "pi_0_cap24": (pi0, 24, 1, 0.7, 0.9, 0.0, tmp_path / "cache"),
                     "pi_0_eos+2.5": (pi0, 48, 1, 0.7, 0.9, 2.5, tmp_path / "cache")}
    b = json.loads((tmp_path / "figs" / "real_run.json").read_text())["baselines"]
    cols = ["pi_1", "pi_0, cap 24", "pi_0, first sentence", "pi_0, EOS bias +2.5"]
    assert b["columns"] == cols
    assert b["settings"] == {"short_cap": 24, "eos_bias": 2.5, "sentence_end": r"[.!?](?=\s|$)"}
    cut = (["Japan is an island country.", "Plant seed.", answers["pi_0"][0][2]], [True, True, False])
    assert [e["pi_0, first sentence"] for e in b["examples"]] == cut[0]
    oracles, _ = real_run.evaluators("concise,informs,plain", prompts, ROOT / "data/reference_heldout.jsonl")
    assert list(b["evaluators"]) == list(oracles)
    for col, (texts, done) in zip(cols, [answers["pi_1"], answers["pi_0_cap24"], cut, answers["pi_0_eos+2.5"]]):
        pairs = (answers["pi_0"], (texts, done))
        gens = [[{"responses": [y], "finished": [f]} for y, f in zip(*pair)] for pair in pairs]
        lengths = [np.array([len(y) for y in pair[0]], dtype=float) for pair in pairs]
        for name, oracle in oracles.items():
            want = arena.lc_against(arena.oracle_matrices(oracle, prompts, gens), lengths)[1]
            got = b["evaluators"][name][col]
            assert got["raw"] == pytest.approx(want["raw"]) and (got["lc"] is None) == (want["lc"] is None)
            assert got["lc"] is None or got["lc"] == pytest.approx(want["lc"])
        assert b["mean_tokens"][col] == pytest.approx(np.mean(lengths[1]))
        assert b["finished"][col] == pytest.approx(np.mean(done))
    assert b["evaluators"]["concise alone"]["pi_0, first sentence"]["raw"][0] == pytest.approx(100 * 2 / 3)
    pi1 = [{"responses": [y], "finished": [f]} for y, f in zip(*answers["pi_1"])]
    for col, pair in zip(cols[1:], [answers["pi_0_cap24"], cut, answers["pi_0_eos+2.5"]]):     # head to head
        other = [{"responses": [y], "finished": [f]} for y, f in zip(*pair)]
        for name, oracle in oracles.items():
            W, SE = arena.arena_oracle(oracle, prompts, [pi1, other])
            assert b["pi_T_vs"][name][col] == pytest.approx([100 * W[0, 1], 100 * SE[0, 1]])
    printed = capsys.readouterr().out
    assert "against length-only baselines: win rate against pi_0 (3 prompts" in printed
    assert all(c in printed for c in cols) and "held-out judge, recall only (lambda 0)" in printed
    assert "pi_1 against each baseline head to head" in printed


def test_report_refuses_a_short_cap_that_is_not_shorter(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "iter0" / "model").mkdir(parents=True)
    (tmp_path / "pi0").mkdir()
    runs.write_json(out / "config.json", {"iterations": 1, "model": str(tmp_path / "pi0"), "max_new_tokens": 48})
    for name in ("metrics.json", "generations.jsonl"):
        (out / "iter0" / name).write_text("{}")
    runs.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    assert real_run.main(["--out", str(out), "--prompts", str(tmp_path / "p.jsonl"), "--figures",
                          str(tmp_path / "figs"), "--baselines", "--short-cap", "48"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "real_run.py: error: --short-cap 48: must be below the run's max_new_tokens (48), else " \
                          "baseline (a) is pi_0"
    assert not (tmp_path / "figs").exists() and not (out / "arena").exists()
