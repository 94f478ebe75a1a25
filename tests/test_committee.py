"""committee.py, the rule-judge oracle, against matrices computed by hand (each judge's score written out below),
including Condorcet's cycle; has_cycle against hand-drawn relations; sppo.rank passing the EOS flags."""
import numpy as np
import pytest

import committee
import sppo

# The first committee (committee.FIRST_JUDGES: concise, on_topic, well_formed).
# "Describe a red apple and a green pear.": content stems {red, apple, green, pear} ('describe', 'and', 'a' are stop
# words). Scores by hand (concise = -words, on_topic = share of the 4 stems, well_formed = finished + ends a
# sentence + no repeated 3-gram):
#   a "Red."                                  finished no  ->  concise -1, on_topic 1/4, well_formed 0+1+1 = 2
#   b "A red apple and a green pear"          finished no  ->  concise -7, on_topic 4/4, well_formed 0+0+1 = 1
#   c "It is an apple and a pear, I think."   finished yes ->  concise -9, on_topic 2/4, well_formed 1+1+1 = 3
# a > b on concise and well_formed (2 of 3), b > c on concise and on_topic, c > a on on_topic and well_formed:
# a cycle, each link won 2 to 1.
PROMPT = "Describe a red apple and a green pear."
LATIN = ["Red.", "A red apple and a green pear", "It is an apple and a pear, I think."]
LATIN_FINISHED = [False, False, True]
CYCLE = np.array([[1 / 2, 2 / 3, 1 / 3],
                  [1 / 3, 1 / 2, 2 / 3],
                  [2 / 3, 1 / 3, 1 / 2]])


def test_judge_scores_by_hand():
    assert committee.content_stems(PROMPT) == {"red", "apple", "green", "pear"}
    scores = {n: [committee.JUDGES[n](PROMPT, y, f) for y, f in zip(LATIN, LATIN_FINISHED)]
              for n in ("concise", "on_topic", "well_formed", "finished", "ends_sentence", "no_repeats")}
    assert scores == {"concise": [-1, -7, -9], "on_topic": [0.25, 1.0, 0.5], "well_formed": [2, 1, 3],
                      "finished": [0, 0, 1], "ends_sentence": [1, 0, 1], "no_repeats": [1, 1, 1]}
    assert committee.no_repeats("", "the cat sat on the cat sat", True) == 0.0      # "the cat sat" twice
    assert committee.on_topic("How are you?", "Fine.", True) == 1.0                  # no content words: all tie


def test_condorcet_cycle():
    P = committee.preference_matrix(PROMPT, LATIN, LATIN_FINISHED, judges=committee.FIRST_JUDGES)
    np.testing.assert_allclose(P, CYCLE, atol=1e-12)
    assert committee.has_cycle(P)
    # without the EOS flags every response counts as finished: a's well_formed rises to 3 and ties c's, so c no
    # longer beats a (1/2: on_topic for c, concise for a, a tie) and the cycle is gone
    P = committee.preference_matrix(PROMPT, LATIN, judges=committee.FIRST_JUDGES)
    np.testing.assert_allclose(P, [[1 / 2, 2 / 3, 1 / 2], [1 / 3, 1 / 2, 2 / 3], [1 / 2, 1 / 3, 1 / 2]], atol=1e-12)
    assert not committee.has_cycle(P)


# The default committee, concise + informs + plain, on "How do I plant a seed?" (content stems {plant, seed}).
# Scores by hand (concise = -words; informs = distinct content stems, first 5 letters, not in the prompt;
# plain = share of words that are stop words or have <= 2 letters):
#   a "Dig, sow, then water."        4 words, informs {dig, sow, water} = 3, plain 1/4 (then)
#   b "Put it in the soil."          5 words, informs {put, soil} = 2, plain 3/5 (it in the)
#   c "Dig a hole, sow it, cover with soil, then water."
#                                    10 words, informs {dig, hole, sow, cover, soil, water} = 6,
#                                    plain 4/10 (a it with then)
# concise a > b > c, informs c > a > b, plain b > c > a: a Latin square. a beats b (concise, informs), b beats c
# (concise, plain), c beats a (informs, plain), each 2 to 1. The echo "Plant seed." (2 words, informs 0, plain 0)
# wins concise only and loses 1 to 2 to each of a, b, c.
SEED = "How do I plant a seed?"
SEED_LATIN = ["Dig, sow, then water.", "Put it in the soil.", "Dig a hole, sow it, cover with soil, then water."]


def test_default_committee_cycles_on_a_hand_built_latin_square():
    scores = {n: [committee.JUDGES[n](SEED, y, True) for y in SEED_LATIN] for n in ("concise", "informs", "plain")}
    assert scores == {"concise": [-4, -5, -10], "informs": [3, 2, 6], "plain": [0.25, 0.6, 0.4]}
    P = committee.preference_matrix(SEED, SEED_LATIN)
    np.testing.assert_allclose(P, CYCLE, atol=1e-12)
    assert committee.has_cycle(P) and committee.DEFAULT_JUDGES == "concise,informs,plain"
    P = committee.preference_matrix(SEED, ["Plant seed."] + SEED_LATIN)
    np.testing.assert_allclose(P[0, 1:], 1 / 3, atol=1e-12)
    assert committee.informs(SEED, "Seed, seed, plant the seed.", True) == 0            # an echo says nothing new
    assert committee.plain(SEED, "", True) == 0.0


def test_judge_lists_ties_and_weights():
    # one judge alone is a score order: transitive, no cycle; P is 1, 0 or 1/2
    P = committee.preference_matrix(PROMPT, LATIN, LATIN_FINISHED, judges="concise")
    np.testing.assert_array_equal(P, [[.5, 1, 1], [0, .5, 1], [0, 0, .5]])
    assert not committee.has_cycle(P)
    # a repeated judge counts twice: concise, concise, on_topic -> a vs b: 2/3, b vs c: 1, a vs c: 2/3
    P = committee.preference_matrix(PROMPT, LATIN, LATIN_FINISHED, judges="concise, concise ,on_topic")
    np.testing.assert_allclose(P[[0, 1, 0], [1, 2, 2]], [2 / 3, 1, 2 / 3])
    # identical responses tie on every judge
    np.testing.assert_array_equal(committee.preference_matrix(PROMPT, ["Red."] * 3), np.full((3, 3), 0.5))
    np.testing.assert_array_equal(committee.preference_matrix(PROMPT, ["Red."] * 3, judges=committee.FIRST_JUDGES),
                                  np.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="unknown.*bogus.*choose from concise"):
        committee.parse_judges("concise,bogus")


@pytest.mark.parametrize("edges, cyclic", [
    ([(0, 1), (1, 2)], False),                        # a chain
    ([(0, 1), (1, 2), (2, 0)], True),                 # the 3-cycle
    ([(0, 1), (1, 2), (2, 3), (3, 1)], True),         # a cycle among 1, 2, 3 below a winner
    ([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], False),   # a strict order
    ([], False),                                      # all ties
])
def test_has_cycle_hand_drawn(edges, cyclic):
    P = np.full((4, 4), 0.5)
    for i, j in edges:
        P[i, j], P[j, i] = 0.8, 0.2
    assert committee.has_cycle(P) is cyclic


def test_rank_passes_eos_flags():
    """sppo.rank gives the committee each response's `finished`: two identical texts, one cut at the token cap,
    differ on well_formed only: P = (1/2 + 1/2 + 1) / 3 = 2/3."""
    oracle = sppo.ORACLES["committee"](sppo.SPPOConfig(oracle="committee", judges=committee.FIRST_JUDGES), "cpu",
                                       None)
    gens = [{"responses": ["Paris is the capital.", "Paris is the capital."], "finished": [True, False]}]
    (P,), _ = sppo.rank(oracle, ["What is the capital of France?"], gens)
    np.testing.assert_allclose(P, [[.5, 2 / 3], [1 / 3, .5]])
    assert oracle.identity() == {"oracle": "committee", "judges": "concise,on_topic,well_formed"}
    default = sppo.ORACLES["committee"](sppo.SPPOConfig(oracle="committee"), "cpu", None)
    assert default.identity() == {"oracle": "committee", "judges": "concise,informs,plain"}


def test_bad_judges_is_a_one_line_error(tmp_path, capsys):
    code = sppo.main(["--oracle", "committee", "--judges", "concise,longest", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--judges 'concise,longest'" in err
    assert "comma-separated judges of concise, informs, plain, on_topic" in err


def test_arena_oracle_averages_sample_pairs_then_prompts():
    """arena.arena_oracle against a one-pair-at-a-time loop: W[i, j] = mean over prompts of the mean over S x S
    sample pairs of the committee's P(y > y'), and s.e. = std over prompts / sqrt(N)."""
    import arena
    oracle = committee.CommitteeOracle()
    prompts = [PROMPT, "What is the capital of France?"]
    gens = [[{"responses": LATIN[:2], "finished": LATIN_FINISHED[:2]}, {"responses": ["Paris.", "Paris"],
                                                                         "finished": [True, False]}],
            [{"responses": LATIN[1:], "finished": LATIN_FINISHED[1:]}, {"responses": ["The capital is Paris.",
                                                                                       "France"], "finished": [True, True]}]]
    W, SE = arena.arena_oracle(oracle, prompts, gens)
    per_prompt = [np.mean([oracle(x, [a, b], [fa, fb])[0, 1]
                           for a, fa in zip(gens[0][n]["responses"], gens[0][n]["finished"])
                           for b, fb in zip(gens[1][n]["responses"], gens[1][n]["finished"])])
                  for n, x in enumerate(prompts)]
    assert W[0, 1] == pytest.approx(np.mean(per_prompt)) and W[1, 0] == pytest.approx(1 - np.mean(per_prompt))
    assert SE[0, 1] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(2))
    assert W[0, 0] == W[1, 1] == 0.5


def test_committee_refuses_the_templated_prompt_before_any_work():
    """on_topic counts the prompt's content words: with --oracle-prompt templated it would count the chat template's."""
    import runs
    with pytest.raises(runs.ConfigError, match="--oracle-prompt 'templated': must be raw with --oracle committee"):
        sppo.validate_config(sppo.SPPOConfig(oracle="committee", oracle_prompt="templated"))
    sppo.validate_config(sppo.SPPOConfig(oracle="committee"))                    # raw: fine


def test_cycle_shares_recounts_a_run_under_any_judges(tmp_path):
    """real_run.cycle_shares on a hand-made iter0/generations.jsonl: the Latin square cycles under the default
    committee and not under concise alone; a prompt whose answers all tie has no cycle."""
    import real_run
    import runs
    (tmp_path / "iter0").mkdir()
    runs.write_jsonl(tmp_path / "iter0" / "generations.jsonl", [
        {"prompt_id": 0, "prompt": SEED, "responses": SEED_LATIN, "finished": [True] * 3},
        {"prompt_id": 1, "prompt": PROMPT, "responses": ["Red."] * 3, "finished": [True] * 3}])
    assert real_run.cycle_shares(tmp_path, committee.DEFAULT_JUDGES, iterations=1) == [(1, 2)]
    assert real_run.cycle_shares(tmp_path, "concise", iterations=1) == [(0, 2)]
