"""pairrm.py against independent references, on tiny random checkpoints written in both published layouts.

References: ids built by transformers' AutoTokenizer with its own truncation, as the PairRM-hf model card's
`tokenize_pair` does (not by pairrm.encode); f computed one row at a time with no padding (not by the batched path);
the spec's formulas for scores and P. The real checkpoint's published numbers run when PAIRRM_DIR names a local copy.
"""
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

import conftest
import pairrm
from pairrm import PREFIX_TOKENS, PairRM, PairRMOracle

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("PairRM-hf", "PairRM")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairrm")
    return {layout: pairrm.save_tiny_random_checkpoint(root / layout, layout=layout, seed=0) for layout in LAYOUTS}


@pytest.fixture(scope="session")
def model(ckpts):
    return PairRM.from_pretrained(ckpts["PairRM-hf"], device="cpu")


@pytest.fixture(scope="session")
def tok(ckpts):
    return AutoTokenizer.from_pretrained(ckpts["PairRM-hf"])


def reference_row(tok, x, a, b, src_max=1224, cand_max=412):
    """ids and prefix positions of one row, by the model card's recipe: each segment encoded with [CLS] ... [SEP]
    and transformers' truncation; candidates get (src_max + 2 cand_max - len(source)) // 2 tokens."""
    def segment(prefix, text, limit):
        return tok(prefix + text.replace("[SEP]", " "), truncation=True, max_length=limit)["input_ids"]
    src = segment("<|source|>", x, src_max)
    limit = (src_max + 2 * cand_max - len(src)) // 2
    c1, c2 = segment("<|candidate1|>", a, limit), segment("<|candidate2|>", b, limit)
    return src + c1 + c2, [1, len(src) + 1, len(src) + len(c1) + 1]


def reference_f(model, tok, x, a, b):
    """f(x; a, b) from one row alone: no padding, no batching."""
    ids, pos = reference_row(tok, x, a, b)
    return model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([pos])).item()


def rows_of(model, x, a, b):
    enc = model.encode([x], [[a, b]], torch.tensor([[0, 0, 1]]))
    ids, mask, pos = enc.take(torch.arange(1), model.pad_id)
    return ids[0].tolist(), mask[0].tolist(), pos[0].tolist()


PROMPTS = ["hello!", "Explain why the sky is blue in one sentence, please.", "What is the capital of France?"]
CANDIDATES = [["hi!", "Please go away.", "", "Hello! How are you today? I am fine."],
              ["Sunlight is scattered by the air.", "The sea is blue.", "blue light scatters most [SEP] in air", "no"],
              ["Paris.", "The capital of France is Paris, a large city on the river Seine.", "Berlin", "I hate you."]]


def test_both_layouts_load_the_same_model_and_tokens(ckpts, tok):
    a, b = (PairRM.from_pretrained(ckpts[layout], device="cpu") for layout in LAYOUTS)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    # Prefix ids are read from the tokenizer (tiny vocab: far from the real 128001..128004) and agree with
    # AutoTokenizer and with the ids PairRM-hf's config.json repeats.
    config = json.loads((Path(ckpts["PairRM-hf"]) / "config.json").read_text())
    assert a.prefix_ids == b.prefix_ids == tok.convert_tokens_to_ids(list(PREFIX_TOKENS))
    assert a.prefix_ids == [config[k] for k in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id",
                                                "cand_prefix_id")]
    assert a.prefix_ids[0] < 1000 and a.prefix_ids == list(range(a.prefix_ids[0], a.prefix_ids[0] + 4))
    assert tok.convert_tokens_to_ids("[MASK]") == a.prefix_ids[0] - 1  # [MASK] then the four, as 128000..128004
    x, ya, yb = "hello!", ["hi!"], ["Please go away."]
    torch.testing.assert_close(a.pair_logits([x], ya, yb), b.pair_logits([x], ya, yb), atol=1e-6, rtol=0)


def test_token_layout_against_hand_built_ids(model, tok):
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    src, c1, c2, _ = tok.convert_tokens_to_ids(list(PREFIX_TOKENS))
    ids, mask, pos = rows_of(model, "", "", "")  # empty texts are kept: [CLS] prefix [SEP] three times
    assert ids == [cls, src, sep, cls, c1, sep, cls, c2, sep] and mask == [1] * 9 and pos == [1, 4, 7]
    for x, a, b in [("hello!", "hi!", "Please go away."), ("a [SEP] b", "I love you, too! [SEP]", "[SEP]")]:
        ids, mask, pos = rows_of(model, x, a, b)
        ref_ids, ref_pos = reference_row(tok, x, a, b)
        assert ids == ref_ids and pos == ref_pos and mask == [1] * len(ids)
        assert [ids[p] for p in pos] == [src, c1, c2] and ids.count(sep) == 3 and ids.count(cls) == 3
        assert [ids[p - 1] for p in pos] == [cls] * 3 and ids[pos[1] - 2] == sep and ids[-1] == sep
    enc = model.encode(["hello!"], [["hi!", "a much longer answer than the other one"]], torch.tensor([[0, 0, 1],
                                                                                                    [0, 1, 1]]))
    ids, mask, _ = enc.take(torch.arange(2), model.pad_id)  # right padding of the shorter row
    short = mask[0].sum()
    assert (ids[0, short:] == pad).all() and (mask[0, short:] == 0).all() and mask[1].all()


def test_truncation_lengths(model, tok):
    long_text = "The quick brown fox jumps over the lazy dog. " * 400  # thousands of tokens
    ids, _, pos = rows_of(model, long_text, long_text, long_text)
    assert pos == [1, 1224 + 1, 1224 + 412 + 1]  # source 1224, candidates 412 + (1224 - 1224) // 2 = 412
    assert len(ids) == 2048 and (ids, pos) == reference_row(tok, long_text, long_text, long_text)
    head = tok(long_text, add_special_tokens=False)["input_ids"]
    assert ids[2:1223] == head[:1221] and ids[1223] == tok.sep_token_id  # the beginning of the text is kept
    for x in ["hello!", "What is the capital of France? " * 30]:
        ids, _, pos = rows_of(model, x, long_text, "short")
        ls = pos[1] - 1
        assert pos[2] - pos[1] == 412 + (1224 - ls) // 2  # spec's rule for the candidate budget
        assert (ids, pos) == reference_row(tok, x, long_text, "short")
    # The longest row runs and keeps compare(a, b) = -compare(b, a).
    ab = model.compare([long_text], [long_text], ["short"])
    ba = model.compare([long_text], ["short"], [long_text])
    assert ab.abs().item() > 1e-4 and torch.allclose(ab, -ba, atol=1e-5)


def test_compare_is_antisymmetric_and_matches_one_pair_at_a_time(model, tok):
    xs = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    a = [CANDIDATES[0][0], CANDIDATES[1][0], CANDIDATES[2][1], CANDIDATES[0][2]]
    b = [CANDIDATES[0][1], CANDIDATES[1][2], CANDIDATES[2][2], CANDIDATES[0][3]]
    ab, ba = model.compare(xs, a, b), model.compare(xs, b, a)
    ref = torch.tensor([reference_f(model, tok, *r) - reference_f(model, tok, r[0], r[2], r[1])
                        for r in zip(xs, a, b)])
    assert ab.abs().min() > 1e-4  # a random model still tells the answers apart
    torch.testing.assert_close(ab, -ba, atol=1e-5, rtol=0)
    torch.testing.assert_close(ab, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.pair_logits(xs, a, b),
                               torch.tensor([reference_f(model, tok, *r) for r in zip(xs, a, b)]), atol=1e-5, rtol=0)


def test_batched_matrices_equal_one_pair_at_a_time(model, tok):
    K = len(CANDIDATES[0])
    ref = torch.zeros(len(PROMPTS), K, K)
    for n, (x, cs) in enumerate(zip(PROMPTS, CANDIDATES)):
        for i in range(K):
            for j in range(K):
                if i != j:
                    ref[n, i, j] = reference_f(model, tok, x, cs[i], cs[j])
    for batch_tokens in (150, 100_000):  # many small padded batches, and one batch
        M = model.logit_matrices(PROMPTS, CANDIDATES, batch_tokens=batch_tokens)
        torch.testing.assert_close(M, ref, atol=1e-5, rtol=0)
    # P from the spec's formulas on the reference logits.
    s_ref = torch.stack([(ref[:, i, :] - ref[:, :, i]).sum(-1) / K for i in range(K)], -1)  # (N, K)
    P = model.preference_matrices(PROMPTS, CANDIDATES, mode="pairwise", batch_tokens=150)
    torch.testing.assert_close(P, torch.sigmoid(ref - ref.transpose(1, 2)), atol=1e-5, rtol=0)
    P_off = model.preference_matrices(PROMPTS, CANDIDATES, mode="official", batch_tokens=150)
    torch.testing.assert_close(P_off, torch.sigmoid(s_ref[:, :, None] - s_ref[:, None, :]), atol=1e-5, rtol=0)
    for Q in (P, P_off):
        assert Q.shape == (3, K, K) and Q.dtype == torch.float32
        torch.testing.assert_close(Q + Q.transpose(1, 2), torch.ones_like(Q), atol=1e-6, rtol=0)
        assert torch.equal(Q.diagonal(dim1=1, dim2=2), torch.full((3, K), 0.5))
    torch.testing.assert_close(model.scores(PROMPTS, CANDIDATES), s_ref, atol=1e-5, rtol=0)
    assert model.best_of_n(PROMPTS, CANDIDATES) == s_ref.argmax(-1).tolist()
    # The single-prompt form and the oracle object give the same numbers.
    oracle = PairRMOracle(model, mode="official")
    torch.testing.assert_close(model.preference_matrix(PROMPTS[1], CANDIDATES[1]), P[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(oracle(PROMPTS[2], CANDIDATES[2]), P_off[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(oracle.batch(PROMPTS, CANDIDATES), P_off, atol=1e-5, rtol=0)


def test_fewer_pass_attention_equals_transformers(model):
    """The batched path (FewerPassAttention, packed length-sorted batches) against transformers' own attention run
    one pair per forward: ragged rows from 9 to ~400 tokens (log-bucketed distances, padded keys), K = 4 and K = 2,
    batch sizes that do not divide the pair count. Logits within 1e-5 (fp32 rounding order), P within 1e-4;
    in fp64 within 1e-12."""
    layers = model.pretrained_model.encoder.layer
    assert all(type(layer.attention.self) is pairrm.FewerPassAttention for layer in layers)
    ref = pairrm.transformers_attention(model)  # transformers' forward, same weights
    assert all(type(layer.attention.self) is DisentangledSelfAttention for layer in ref.pretrained_model.encoder.layer)
    long = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 12
    cases = [(PROMPTS, CANDIDATES), ([long, "hi"], [["", long[:150]], ["The sea is blue.", long]])]  # K = 4, K = 2
    for prompts, candidates in cases:
        M_ref = ref.logit_matrices(prompts, candidates, batch_tokens=1)  # one pair per forward
        K = len(candidates[0])
        assert (M_ref.flatten(1)[:, ~torch.eye(K, dtype=torch.bool).flatten()].abs() > 1e-4).all()
        for batch_tokens in (1, 333, 1000, 100_000):  # 1 row; batches of a size not dividing N K (K - 1); one batch
            M = model.logit_matrices(prompts, candidates, batch_tokens=batch_tokens)
            torch.testing.assert_close(M, M_ref, atol=1e-5, rtol=0)
            for mode in pairrm.MODES:
                torch.testing.assert_close(pairrm.preference_from_logits(M, mode),
                                           pairrm.preference_from_logits(M_ref, mode), atol=1e-4, rtol=0)
    # In fp64 the two are the same sums to rounding: the fp32 gap above is rounding order, not a different formula.
    m64 = pairrm.transformers_attention(model).double()  # a float64 copy, given FewerPassAttention back below
    for layer in m64.pretrained_model.encoder.layer:
        layer.attention.self.__class__ = pairrm.FewerPassAttention
    torch.testing.assert_close(m64.logit_matrices(*cases[1], batch_tokens=1000),
                               pairrm.transformers_attention(m64).logit_matrices(*cases[1], batch_tokens=1),
                               atol=1e-12, rtol=0)


def test_encoder_flops_match_torch_flop_counter(model):
    """costs.encoder_flops (bench's PairRM FLOP/s) against torch's FlopCounterMode on transformers' own attention, one
    row of T = 2 S tokens (S = position buckets, so the c2p and p2c products against the 2 S relative embeddings cost
    what the formula's T^2 terms count): the counter sees exactly the formula plus the relative projections it leaves
    out, 2 x 2 (2 S) d^2 a layer."""
    from torch.utils.flop_counter import FlopCounterMode

    import costs
    ref, c = pairrm.transformers_attention(model), model.pretrained_model.config
    S, d, L, T = c.position_buckets, c.hidden_size, c.num_hidden_layers, 2 * c.position_buckets
    with FlopCounterMode(display=False) as counter:
        ref.pretrained_model(input_ids=torch.randint(5, 50, (1, T)), attention_mask=torch.ones(1, T, dtype=torch.long))
    assert counter.get_total_flops() == costs.encoder_flops(c, [T]) + L * 8 * S * d * d
    # By hand at these sizes (hidden 32, MLP 64, 2 layers, T = 64): linears 2 L T (4 d^2 + 2 d I), attention 8 L d T^2.
    assert costs.encoder_flops(c, [T]) == 2 * 2 * 64 * (4 * 32 * 32 + 2 * 32 * 64) + 8 * 2 * 32 * 64 * 64 == 4_194_304
    assert costs.encoder_flops(c, [T, 3]) - costs.encoder_flops(c, [T], attention=False) == (
        costs.encoder_flops(c, [3]) + 8 * L * d * T * T)


def test_padding_and_trimming_do_not_change_f(model, tok):
    ids, pos = reference_row(tok, "hello!", "hi!", "Please go away.")
    long_ids, long_pos = reference_row(tok, PROMPTS[1], CANDIDATES[1][1], CANDIDATES[1][0])
    alone = reference_f(model, tok, "hello!", "hi!", "Please go away.")
    T = len(long_ids) + 9  # both rows right-padded, and 9 columns of padding in every row (trimmed by forward)
    batch = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    batch[0, : len(ids)], mask[0, : len(ids)] = torch.tensor(ids), 1
    batch[1, : len(long_ids)], mask[1, : len(long_ids)] = torch.tensor(long_ids), 1
    f = model(batch, mask, torch.tensor([pos, long_pos]))
    assert abs(f[0].item() - alone) < 1e-5
    assert abs(f[1].item() - reference_f(model, tok, PROMPTS[1], CANDIDATES[1][1], CANDIDATES[1][0])) < 1e-5
    assert torch.allclose(model(batch[:, : len(long_ids)], mask[:, : len(long_ids)], torch.tensor([pos, long_pos])),
                          f, atol=1e-6)


def test_bad_inputs(model, ckpts, capsys):
    with pytest.raises(ValueError, match="at least 2 candidates"):
        model.preference_matrix("hello!", ["only one"])
    with pytest.raises(ValueError, match="prompt 1 has 3 candidates"):
        model.preference_matrices(["a", "b"], [["x", "y"], ["x", "y", "z"]])
    with pytest.raises(ValueError, match="mode must be one of"):
        model.preference_matrix("hello!", ["a", "b"], mode="bradley-terry")
    with pytest.raises(ValueError, match="one candidate a and one b per prompt"):
        model.compare(["x", "y"], ["a"], ["b"])
    P = model.preference_matrix("hello!", ["", "hi!", ""])  # empty candidates are scored, not dropped
    assert P.shape == (3, 3) and torch.isfinite(P).all() and abs(P[0, 2].item() - 0.5) < 1e-6 and P[0, 1] != 0.5
    assert pairrm.main(["--model", ckpts["PairRM-hf"], "--prompt", "x", "--candidates", "only"]) == 2
    assert capsys.readouterr().err.splitlines() == ["pairrm.py: error: --candidates ['only']: must be at least 2 "
                                                    "candidates: a preference needs a pair"]


@pytest.mark.parametrize("call, words", [
    (lambda m: m.preference_matrices([], []), ["prompts is empty"]),
    (lambda m: m.scores([], []), ["prompts is empty"]),
    (lambda m: m.compare([], [], []), ["prompts is empty"]),
    (lambda m: m.compare("xy", "ab", "cd"), ["prompts must be a list of strings", "str 'xy'"]),  # not 2 prompts
    (lambda m: m.pair_logits(["x", "y"], ["a", "b"], "cd"), ["cands_b must be a list of strings", "'cd'"]),
    (lambda m: m.compare(["x"], [3], ["b"]), ["cands_a[0] must be a string", "int 3"]),
    (lambda m: m.pair_logits(["x"], ["a"], [None]), ["cands_b[0] must be a string", "None"]),
    (lambda m: m.preference_matrices(["x"], [["a", 3]]), ["candidates[0][1] must be a string", "int 3"]),
    (lambda m: m.best_of_n(["x", "y"], [["a", "b"], ["c", None]]), ["candidates[1][1] must be a string", "None"]),
    (lambda m: m.logit_matrices([None], [["a", "b"]]), ["prompts[0] must be a string", "None"]),
    (lambda m: m.scores("ab", [["x", "y"], ["z", "w"]]), ["prompts must be a list of strings", "'ab'"]),
    (lambda m: m.preference_matrix("x", "ab"), ["candidates[0] must be a list of strings", "'ab'"]),
    (lambda m: m.preference_matrix(["x"], ["a", "b"]), ["prompt must be a string", "['x']"]),
    (lambda m: PairRMOracle(m)("x", ["a", 1.5]), ["candidates[0][1] must be a string", "1.5"]),
    (lambda m: m.scores(["x"], None), ["candidates must be a list of lists of strings", "None"]),
    (lambda m: m.scores(["x", "y"], [["a", "b"]]), ["one list of candidates per prompt", "2 prompts and 1 lists"]),
])
def test_bad_inputs_name_the_argument(model, call, words):
    with pytest.raises(ValueError) as err:
        call(model)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def _copy(ckpt, tmp_path):
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strict_load_errors_name_keys_and_files(ckpts, tmp_path, layout):
    d = _copy(ckpts[layout], tmp_path)
    state = load_file(str(d / "model.safetensors"))
    dropped = state.pop("head_layer.4.bias")
    save_file({**state, "head_layer.7.weight": dropped}, str(d / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing: \['head_layer.4.bias'\]; unexpected: \['head_layer.7.weight'\]"):
        PairRM.from_pretrained(d, device="cpu")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        PairRM.from_pretrained(d, device="cpu")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        PairRM.from_pretrained(d, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        PairRM.from_pretrained(empty, device="cpu")


def test_a_folder_with_only_config_json_names_every_missing_file(ckpts, tmp_path, capsys):
    """A half-copied checkpoint (config.json alone) is one error naming the folder and each file it lacks, before
    anything is read: an ArtifactError (one line, exit 2, in every CLI) that is also a FileNotFoundError."""
    import cli
    d = tmp_path / "half"
    d.mkdir()
    shutil.copy(Path(ckpts["PairRM-hf"]) / "config.json", d / "config.json")
    with pytest.raises(cli.ArtifactError) as err:
        PairRM.from_pretrained(d, device="cpu")
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value) == f"{d} is not a PairRM checkpoint: missing tokenizer.json, model.safetensors (or " \
                             f"pytorch_model.bin)"
    with pytest.raises(cli.ArtifactError, match="no such folder"):
        PairRM.from_pretrained(tmp_path / "nope", device="cpu")
    r = conftest.run([sys.executable, "pairrm.py", "--model", str(d), "--prompt", "x", "--candidates", "a", "b"],
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"pairrm.py: error: {err.value}"]


@pytest.mark.parametrize("args, words", [
    pytest.param(["--candidates", "only"], ["--candidates ['only']: must be at least 2 candidates"],
                 id="one-candidate"),
    pytest.param(["--candidates", "a", "b", "--device", "bogus"], ["--device 'bogus': must be cpu, or a torch device"],
                 id="device-bogus"),
    pytest.param(["--candidates", "a", "b", "--model", "/nonexistent/pairrm"],
                 ["--model /nonexistent/pairrm: no such folder"], id="model-missing"),
])
def test_cli_bad_settings_are_one_line_before_loading(ckpts, capsys, args, words):
    """pairrm.main as `python pairrm.py` runs it (sys.exit(main())): exit 2, one line, nothing printed."""
    assert pairrm.main(["--model", ckpts["PairRM-hf"], "--prompt", "x", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()] and err.startswith("pairrm.py: error: ")
    for w in words:
        assert w in err, (w, err)


def test_config_and_tokenizer_checks(ckpts, tmp_path, model):
    d = _copy(ckpts["PairRM-hf"], tmp_path)
    # A tokenizer.json without the four added tokens gets them added, in order, with the same ids.
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in PREFIX_TOKENS]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    reloaded = PairRM.from_pretrained(d, device="cpu")
    assert reloaded.prefix_ids == model.prefix_ids
    args = (["hello!"], ["hi!"], ["bye"])
    torch.testing.assert_close(reloaded.compare(*args), model.compare(*args), atol=1e-6, rtol=0)
    # A config whose prefix id disagrees with the tokenizer is refused, naming the field.
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "cand2_prefix_id": 128003}))
    with pytest.raises(ValueError, match="cand2_prefix_id = 128003"):
        PairRM.from_pretrained(d, device="cpu")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="is not a PairRM config"):
        PairRM.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("layout, name, text, words", [
    ("PairRM-hf", "config.json", "{not json", ["config.json: not valid JSON", "line 1 column 2"]),
    ("PairRM-hf", "config.json", "[1, 2]", ["config.json: expected a JSON object", "list [1, 2]"]),
    ("PairRM-hf", "config.json", "\"DebertaV2PairRM\"", ["config.json: expected a JSON object", "str"]),
    ("PairRM", "backbone/config.json", "null", ["backbone/config.json: expected a JSON object", "NoneType"]),
    ("PairRM-hf", "tokenizer_config.json", "{'single': 'quotes'}", ["tokenizer_config.json: not valid JSON"]),
    ("PairRM-hf", "tokenizer.json", "{bad", ["tokenizer.json: not a tokenizers file"]),
])
def test_unreadable_json_files_are_named(ckpts, tmp_path, layout, name, text, words):
    d = _copy(ckpts[layout], tmp_path)
    (d / name).write_text(text)
    with pytest.raises(ValueError) as err:
        PairRM.from_pretrained(d, device="cpu")
    assert str(err.value).startswith(str(d / name) + ": "), str(err.value)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_pickles_are_never_loaded_and_bin_weights_load_safely(ckpts, tmp_path, model):
    d = _copy(ckpts["PairRM"], tmp_path)
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this creates `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "config.bin").write_bytes(pickle.dumps(Trap()))  # older revisions of llm-blender/PairRM ship one
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    loaded = PairRM.from_pretrained(d, device="cpu")  # weights from the .bin, read with weights_only=True
    assert not marker.exists()
    args = (["hello!"], ["hi!"], ["bye"])
    torch.testing.assert_close(loaded.compare(*args), model.compare(*args), atol=1e-6, rtol=0)
    torch.save({"head_layer.1.weight": Trap()}, d / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        PairRM.from_pretrained(d, device="cpu")
    assert not marker.exists()


def test_cli_prints_the_matrix(ckpts, model):
    cands = ["hi!", "Please go away.", ""]
    out = conftest.run([sys.executable, "pairrm.py", "--model", ckpts["PairRM"], "--prompt", "hello!",
                        "--candidates", *cands, "--mode", "official"],
                       cwd=REPO, timeout=120, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "P[i, j] = P(y_i > y_j | x), mode=official"
    P = torch.tensor([[float(v) for v in line.split()[1:]] for line in lines[2:5]])
    torch.testing.assert_close(P, model.preference_matrix("hello!", cands, mode="official"), atol=1e-4, rtol=0)
    s = model.scores(["hello!"], [cands])[0]
    assert lines[5].startswith("s_PairRM: y0=") and f"best: y{int(s.argmax())} = " in lines[6]


def test_make_tiny_refuses_a_non_empty_folder(ckpts, tmp_path, capsys):
    real = _copy(ckpts["PairRM-hf"], tmp_path)  # stands in for a real checkpoint
    before = {p.name: p.read_bytes() for p in real.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match=f"{real} is not an empty folder"):
        pairrm.save_tiny_random_checkpoint(real, seed=1)
    assert pairrm.main(["--model", str(real), "--make-tiny", "--prompt", "x", "--candidates", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert f"error: --model {real} is not an empty folder" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in real.iterdir() if p.is_file()} == before  # nothing overwritten
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="a_file is not an empty folder"):
        pairrm.save_tiny_random_checkpoint(tmp_path / "a_file")
    empty = tmp_path / "empty"  # an existing empty folder (bench.py's TemporaryDirectory) is fine
    empty.mkdir()
    assert PairRM.from_pretrained(pairrm.save_tiny_random_checkpoint(empty), device="cpu").prefix_ids == \
        PairRM.from_pretrained(ckpts["PairRM-hf"], device="cpu").prefix_ids


@pytest.mark.skipif(not os.environ.get("PAIRRM_DIR"), reason="set PAIRRM_DIR to a local llm-blender/PairRM(-hf) copy")
def test_real_checkpoint_published_numbers():
    real = PairRM.from_pretrained(os.environ["PAIRRM_DIR"], device="cpu", dtype=torch.float32)
    assert real.prefix_ids == [128001, 128002, 128003, 128004]
    sources, a, b = ["hello!", "I love you!"], ["hi!", "I hate you!"], ["f**k off!", "I love you, too!"]
    torch.testing.assert_close(real.pair_logits(sources, a, b), torch.tensor([1.9003, -1.2547]), atol=2e-4, rtol=0)
    torch.testing.assert_close(real.compare(sources, a, b), -real.compare(sources, b, a), atol=1e-4, rtol=0)
