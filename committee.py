"""A committee of rule judges: a transparent preference oracle for real text, without PairRM weights.

SPPO (Wu et al., arXiv 2405.00675) only needs an oracle P(y > y' | x) in [0, 1] with P(y > y'|x) + P(y' > y|x) = 1
(Sec. 3); it need not be transitive. PairRM (pairrm.py) is the paper's oracle and stays the one to use whenever its
weights are given. This file is the oracle for a machine without them: each judge scores a response by one rule that
a reader can check by eye, and

    P(y_i > y_j | x) = (1/J) sum_judges [ 1{s(y_i) > s(y_j)} + 1/2 1{s(y_i) = s(y_j)} ]

is the share of the J judges that prefer y_i, a tie counting 1/2 (so P + P^T = 1 and the diagonal is 1/2). Each
judge ranks by a score, so each judge alone is transitive; their majority need not be. Three criteria can order
three responses as a Latin square (y_1 shortest but densest, y_2 plainest but saying least, y_3 saying most but
longest), and then y_1 beats y_2, y_2 beats y_3 and y_3 beats y_1, each 2 to 1: Condorcet's paradox, the kind of
preference the paper's game formulation is built for. `has_cycle` finds such cycles in any K x K matrix; the run
records how many prompts' matrices contain one (sppo.py, metrics.json: `prompts_with_cycle` of `prompts`).

    python sppo.py --model M.gguf --prompts data/prompts_train.jsonl --oracle committee \
        --judges concise,informs,plain --out runs/real

The judges (any comma-separated list of JUDGES, repeats allowed: a repeated judge counts twice); the default is
concise,informs,plain, whose pairs all conflict (DEFAULT_JUDGES):
  concise      fewer words is better.
  informs      more distinct content words (first 5 letters, stop words and words of <= 2 letters left out) that
               the prompt does not contain: an echo of the prompt informs nothing, a loop repeats what it said.
  plain        a larger share of function words (stop words, words of <= 2 letters): lower lexical density.
  on_topic     a larger share of the prompt's content words (first 5 letters, stop words left out) appears in y.
  well_formed  finished + ends_sentence + no_repeats (0 to 3), the three below in one judge.
  finished     y ended with the model's EOS (not cut at max_new_tokens).
  ends_sentence  y's last character closes a sentence (. ! ? or a closing quote or bracket).
  no_repeats   no word 3-gram occurs twice in y.
"""
from __future__ import annotations

import re

import numpy as np

import hedge_toy

STOP_WORDS = frozenset("""a an and are as at be by can could do does for from give how i in is it its me my name of
on or please short tell than that the their them then there these this those three to two was what when where which
who why will with would write you your list explain describe define make rewrite sentence word words one simple
simpler about some say""".split())
"""Words that say what to do, not what about: left out of the prompt's content words (`on_topic`)."""


def words(text):
    """Lower-case alphanumeric words of `text`."""
    return re.findall(r"[a-z0-9]+", text.lower())


def content_stems(prompt):
    """The prompt's content words, as their first 5 letters (a crude stem: 'politely' and 'polite' match)."""
    return {w[:5] for w in words(prompt) if w not in STOP_WORDS and len(w) > 2}


def concise(prompt, response, finished):
    return -len(words(response))


def on_topic(prompt, response, finished):
    want = content_stems(prompt)
    return len(want & {w[:5] for w in words(response)}) / len(want) if want else 1.0


def ends_sentence(prompt, response, finished):
    return float(response.rstrip()[-1:] in tuple(".!?\"')]\u201d"))


def no_repeats(prompt, response, finished):
    w = words(response)
    grams = list(zip(w, w[1:], w[2:]))
    return float(len(set(grams)) == len(grams))


def informs(prompt, response, finished):
    """How much y says that the prompt did not: the number of y's distinct content stems not among the prompt's."""
    return len(content_stems(response) - content_stems(prompt))


def plain(prompt, response, finished):
    """How easy y is to read: the share of its words that are function words (STOP_WORDS or at most 2 letters),
    i.e. 1 - lexical density (Ure 1971, "Lexical density and register differentiation"; Halliday 1985, "Spoken and
    Written Language": denser text is harder to read). An empty y scores 0."""
    w = words(response)
    return sum(x in STOP_WORDS or len(x) <= 2 for x in w) / len(w) if w else 0.0


def ended(prompt, response, finished):
    return float(finished)


def well_formed(prompt, response, finished):
    return ended(prompt, response, finished) + ends_sentence(prompt, response, finished) + \
        no_repeats(prompt, response, finished)


JUDGES = {"concise": concise, "informs": informs, "plain": plain, "on_topic": on_topic, "well_formed": well_formed,
          "finished": ended, "ends_sentence": ends_sentence, "no_repeats": no_repeats}
"""Every judge: name -> score(prompt, response, finished); a higher score is preferred."""
DEFAULT_JUDGES = "concise,informs,plain"
"""Three criteria that pull against each other in pairs, so that their majority cycles on real answers (the
docstring above; docs/committee.md measures how often): saying more new things costs words (informs vs concise),
new things are content words (informs vs plain), and function words cost words (plain vs concise)."""
FIRST_JUDGES = "concise,on_topic,well_formed"
"""The first committee (make real up to issue 28): transitive in practice, since with a 48-token cap the short
answer is the one that finishes (0 cycles in 120 prompts, docs/real_model.md)."""


def parse_judges(spec):
    """'concise,on_topic' -> ['concise', 'on_topic']; an unknown name raises ValueError naming the choices."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in JUDGES]
    if not names or bad:
        raise ValueError(f"judges {spec!r}: unknown {bad or 'empty list'}; choose from {', '.join(JUDGES)}")
    return names


def preference_matrix(prompt, responses, finished=None, judges=DEFAULT_JUDGES):
    """P[i, j] = share of judges preferring y_i to y_j, ties 1/2 (this file's docstring). Returns (K, K) float64.

    finished: whether each response ended with EOS (default: all did); only `finished` / `well_formed` read it."""
    finished = [True] * len(responses) if finished is None else finished
    names = parse_judges(judges)
    S = np.array([[JUDGES[n](prompt, y, f) for y, f in zip(responses, finished)] for n in names])  # (J, K)
    P = ((S[:, :, None] > S[:, None, :]) + 0.5 * (S[:, :, None] == S[:, None, :])).mean(0)      # (K, K)
    return hedge_toy.validate_preference(P)


def has_cycle(P):
    """True when the strict majority relation i > j  <=>  P[i, j] > 1/2 contains a directed cycle (Condorcet).

    Transitive closure by Warshall's algorithm on the K x K relation: a cycle is some i that reaches itself."""
    reach = np.asarray(P) > 0.5                                                          # (K, K)
    for k in range(len(reach)):
        reach = reach | (reach[:, k:k + 1] & reach[k:k + 1, :])
    return bool(reach.diagonal().any())


class CommitteeOracle:
    """sppo.py's oracle interface: oracle(prompt, responses, finished) -> P (K, K); batch(...) for many prompts."""
    reads_finished = True                        # sppo.rank passes each response's EOS flag

    def __init__(self, judges=DEFAULT_JUDGES):
        self.judges = ",".join(parse_judges(judges))

    def __call__(self, prompt, responses, finished=None):
        return preference_matrix(prompt, responses, finished, self.judges)

    def batch(self, prompts, candidates, finished=None):
        finished = finished or [None] * len(prompts)
        return [self(x, ys, f) for x, ys, f in zip(prompts, candidates, finished)]

    def identity(self):
        """What the manifest records of the oracle: its rules' names (the rules themselves are this file's)."""
        return {"oracle": "committee", "judges": self.judges}
