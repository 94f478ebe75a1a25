"""committee.py's held-out judge (reference_judge) against scores computed by hand (docs/committee.md's worked
example); data/reference_heldout.jsonl against data/prompts_heldout.jsonl, read line by line here, and the checks of
its loader, real_run.load_references."""
import json
from pathlib import Path

import numpy as np
import pytest

import committee
from committee import ref_stems, reference_judge, reference_key, reference_score
import real_run
import runs

ROOT = Path(__file__).resolve().parents[1]
SEED = "How do I plant a seed?"
ECHO = "Plant seed."
SHORT = "Dig a small hole, drop the seed in, cover it with soil and water it."
RAMBLE = ("The process of planting a seed is a sacred and ancient ritual in many cultures. It's often referred to as "
          "\"the night of the seed\" or \"the blessing of the moon.\" The process of planting a seed involves several "
          "steps, but")                                  # pi_0's held-out answer in the make-real run, cut at 48 tokens


def test_references_follow_the_held_out_prompts_one_to_one():
    """Read without load_references: same prompts in the same order, exactly the fields prompt and reference, each
    reference non-empty and at most 60 words; then load_references agrees."""
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "data/prompts_heldout.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (ROOT / "data/reference_heldout.jsonl").read_text().splitlines()]
    assert len(prompts) == len(rows) == 90
    for x, r in zip(prompts, rows):
        assert set(r) == {"prompt", "reference"} and r["prompt"] == x
        assert r["reference"].strip() and 1 <= len(r["reference"].split()) <= 60, r
    refs = real_run.load_references(ROOT / "data/reference_heldout.jsonl", prompts)
    assert list(refs) == prompts and all(refs[r["prompt"]] == r["reference"] for r in rows)


def test_worked_example_by_hand():
    """docs/committee.md: the reference for "How do I plant a seed?" has 33 words, and its key (its stems less the
    prompt's plant, seed) is 14 stems: cover deep gentl hole keep light moist put small soil twice warm water wide.
      echo "Plant seed."    2 words, no key stem                                 -> 0
      short, correct       15 words, small hole cover soil water: 5 of 14       -> 5/14
      pi_0's ramble        42 words, no key stem (process, sacred, ritual, ...)  -> 0
      the short one x 5    75 words, 5 of 14, 9 words past 2 x 33               -> 5/14 - 0.5 * 9/33
    """
    refs = real_run.load_references(ROOT / "data/reference_heldout.jsonl")
    ref = refs[SEED]
    assert len(committee.words(ref)) == 33
    assert reference_key(SEED, ref) == {"cover", "deep", "gentl", "hole", "keep", "light", "moist", "put", "small",
                                        "soil", "twice", "warm", "water", "wide"}
    scores = [reference_score(SEED, ref, y) for y in (ECHO, SHORT, RAMBLE, " ".join([SHORT] * 5))]
    np.testing.assert_allclose(scores, [0, 5 / 14, 0, 5 / 14 - 0.5 * 9 / 33], atol=1e-12)
    assert reference_judge(SEED, ref, SHORT, ECHO) == 1.0 and reference_judge(SEED, ref, ECHO, SHORT) == 0.0
    assert reference_judge(SEED, ref, ECHO, RAMBLE) == 0.5                              # both 0: a tie
    assert reference_judge(SEED, ref, SHORT, " ".join([SHORT] * 5)) == 1.0              # padding costs


def test_stems_numbers_short_words_and_the_fallback_key():
    assert ref_stems("A spider has eight legs.") == ref_stems("a spider has 8 legs") == {"spide", "8", "legs"}
    assert ref_stems("It is Au.") == {"au"}                                     # two-letter content words count
    # a rewrite whose answer only reuses the prompt's words: the key falls back to all of the reference's stems
    x = "Turn this into a question: The train leaves at noon."
    assert reference_key(x, "Does the train leave at noon?") == {"train", "leave", "noon"}
    assert reference_score("What is 2 plus 2?", "It is four.", "4") == 1.0      # four -> 4, not in the prompt


def test_oracle_matrix_equals_the_pairwise_judge_and_is_not_a_training_judge():
    """ReferenceOracle's K x K matrix against reference_judge one pair at a time; ties 1/2; P + P^T = 1. It is no
    judge of the training committee."""
    refs = real_run.load_references(ROOT / "data/reference_heldout.jsonl")
    oracle = committee.ReferenceOracle({SEED: refs[SEED]})
    ys = [ECHO, SHORT, RAMBLE, SHORT]
    P = oracle(SEED, ys)
    ref = oracle.references[SEED]
    want = [[reference_judge(SEED, ref, a, b) if i != j else 0.5 for j, b in enumerate(ys)] for i, a in enumerate(ys)]
    np.testing.assert_array_equal(P, want)
    assert P[1, 3] == 0.5 and P[0, 2] == 0.5
    assert oracle.batch([SEED], [ys])[0].tolist() == P.tolist()
    assert "reference" not in committee.JUDGES and committee.reference_score not in committee.JUDGES.values()
    with pytest.raises(KeyError, match="no reference answer for prompt 'Hello'"):
        oracle("Hello", ys)


@pytest.mark.parametrize("rows, prompts, words", [
    ([{"prompt": "a b", "reference": "cats"}, {"prompt": "c d", "reference": "dogs"}], ["c d", "a b"],
     "record 1: field 'prompt' is 'a b' but prompt 1 is 'c d': the references must follow the prompts one to one"),
    ([{"prompt": "a b", "reference": "cats"}], ["a b", "c d"],
     "record 2: field 'prompt' is None but prompt 2 is 'c d'"),
    ([{"prompt": "a b", "reference": "the"}], None, "record 1: field 'reference' 'the' has no content words"),
    ([{"prompt": "a b", "reference": "cat " * 61}], None, "record 1: field 'reference' has 61 words; at most 60"),
    ([{"prompt": "a b", "reference": "cats"}, {"prompt": "a b", "reference": "dogs"}], None,
     "record 2: field 'prompt' 'a b' appears twice"),
    ([{"prompt": "a b"}], None, "reference"),
])
def test_bad_reference_files_name_record_and_field(tmp_path, rows, prompts, words):
    runs.write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(runs.ArtifactError, match=words.replace("(", r"\(")):
        real_run.load_references(tmp_path / "r.jsonl", prompts)
