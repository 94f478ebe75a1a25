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

The held-out judge (last section; for evaluation only, never one of JUDGES): SPPO reports its gains under evaluators
it was not trained on (Sec. 5.2: AlpacaEval 2.0, MT-Bench), and a win rate under the committee that produced D_t says
only that the optimiser worked. Each held-out prompt x has a short, correct reference answer r(x) written for this
repository (data/reference_heldout.jsonl), and a response y scores

    key(x)   = ref_stems(r) - ref_stems(x)   (what r says that the prompt does not; all of ref_stems(r) if empty)
    score(y) = |key(x) & ref_stems(y)| / |key(x)|  -  lambda max(0, words(y) - 2 words(r)) / words(r),  lambda = 1/2

ref_stems: first 5 letters of the words, number words read as digits, STOP_WORDS and FUNCTION_WORDS left out, any
length kept ("Au", "17"). P(a beats b | x) = 1{score(a) > score(b)} + 1/2 1{score(a) = score(b)}. An echo of the
prompt scores 0 (the prompt's words are not in the key), words that are not the reference's add nothing, and words
past twice the reference's length cost 1/2 per reference length: docs/committee.md works an example through.
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


# ----------------------------------------------------------------------------------------------------------------
# The held-out judge: overlap with a written reference answer (this file's docstring).
REFERENCE_LAMBDA = 0.5
"""The length penalty per reference length beyond FREE_LENGTH times the reference (recall is in [0, 1])."""
FREE_LENGTH = 2
"""A response of up to FREE_LENGTH times the reference's words pays no length penalty."""
MAX_REFERENCE_WORDS = 60
"""A reference answer is short: at most this many words (real_run.load_references checks the file)."""
NUMBER_WORDS = {w: str(n) for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                                "thirteen fourteen fifteen sixteen seventeen eighteen nineteen "
                                                "twenty".split())}
"""Number words read as digits, so "eight legs" and "8 legs" say the same."""
FUNCTION_WORDS = frozenset("""am as at be by he if in is it me my of on or so to up us we she her him his our they
them has have had not but also very just into over each other been being were than these s t m d ll re ve""".split())
"""Function words not in STOP_WORDS (that list is for prompts), left out of a reference's content."""


def ref_stems(text):
    """Content stems for the held-out judge: first 5 letters of each word, number words as digits, STOP_WORDS and
    FUNCTION_WORDS left out, words of any length kept."""
    ws = (NUMBER_WORDS.get(w, w) for w in words(text))
    return {w[:5] for w in ws if w not in STOP_WORDS and w not in FUNCTION_WORDS}


def reference_key(prompt, reference):
    """What the reference says that the prompt does not (all of the reference's stems when that is empty)."""
    return ref_stems(reference) - ref_stems(prompt) or ref_stems(reference)


def reference_score(prompt, reference, response, lam=REFERENCE_LAMBDA):
    """Recall of reference_key in the response, minus lam per reference length beyond FREE_LENGTH times the
    reference's words (this file's docstring)."""
    want, n_ref = reference_key(prompt, reference), len(words(reference))
    if not want:
        raise ValueError(f"reference {reference!r} for prompt {prompt!r} has no content words to compare with")
    excess = max(0, len(words(response)) - FREE_LENGTH * n_ref) / n_ref
    return len(want & ref_stems(response)) / len(want) - lam * excess


def reference_judge(prompt, reference, a, b, lam=REFERENCE_LAMBDA):
    """P(a beats b | prompt) under the held-out judge: 1, 0 or 1/2 (a tie) by reference_score."""
    sa, sb = (reference_score(prompt, reference, y, lam) for y in (a, b))
    return 0.5 if abs(sa - sb) <= 1e-12 else float(sa > sb)


class ReferenceOracle:
    """sppo.py's oracle interface, for evaluation only: oracle(prompt, responses) -> P (K, K) by reference_judge,
    the prompt's reference looked up in `references` ({prompt: reference}, real_run.load_references)."""
    reads_finished = False

    def __init__(self, references, lam=REFERENCE_LAMBDA):
        self.references, self.lam = dict(references), lam

    def __call__(self, prompt, responses, finished=None):
        if prompt not in self.references:
            raise KeyError(f"no reference answer for prompt {prompt!r}")
        s = np.array([reference_score(prompt, self.references[prompt], y, self.lam) for y in responses])   # (K,)
        tie = np.abs(s[:, None] - s[None, :]) <= 1e-12
        return hedge_toy.validate_preference(np.where(tie, 0.5, (s[:, None] > s[None, :]).astype(np.float64)))

    def batch(self, prompts, candidates):
        return [self(x, ys) for x, ys in zip(prompts, candidates)]

    def identity(self):
        return {"oracle": "reference", "references": len(self.references), "lambda": self.lam}
