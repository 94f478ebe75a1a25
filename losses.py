"""Step 4's objective: each method of the loop as a loss on pi_theta's log-ratios, and what each drives them to.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675 (equation numbers
below are this paper's unless another paper is named). Conventions: sppo.py's docstring (log-probs summed over
response tokens; eta the Hedge step, beta = 1/eta; the paper's runs use eta = 1000).

One idea, many targets. SPPO fits log pi_{t+1}(y|x) - log pi_t(y|x) to eta (P(y > pi_t|x) - 1/2) (Eq. 4.7), which at
the optimum of a tabular policy with exact win rates IS Hedge's step (Eq. 4.1). The methods after it whose LAST
iterate converges are, in the same regression form, other targets for the same log-ratio: pi_{t+1} ∝ pi_t exp(s(y)),
s(y) the method's step, regressed as [log pi/pi_t - (s(y) - c)]^2 with c standing in for log Z as eta/2 does in
Eq. (4.6). Their tabular updates are last_iterate.py's; tests/test_successors.py checks each loss's exact tabular
minimiser against them. What each needs besides P-hat(y > pi_t) is a column of D_t, computed in step 3 from the
prompt's K x K preference matrix and the K samples' log-probs (successor_columns): the win rate against another
policy q (pi_{t-1}, Nash-MD's mixture, a half step) is estimated on pi_t's own K samples, weighted by q/pi_t
(self-normalised importance weights), so no method here costs an oracle query or a generation more than SPPO;
log mu(y|x), the reference / magnet's log-prob, costs one forward pass of mu over D_t.

The table LOSSES (--loss) holds every method: a new one is its function and one line there.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from sppo_config import ESTIMATED, LOSSES


# ----------------------------------------------------------------------------------------------------------------
# The objective (Sec. 4). Every loss returns one value per example: no reduction.
def sppo_loss(logp, ref_logp, win_prob, eta, log_z=None):
    """Per-example square loss of SPPO.

    Eq. (4.6)/(4.7):  [log pi(y|x)/pi_t(y|x) - eta (P(y > pi_t|x) - 1/2)]^2           (log_z=None: log Z = eta/2)
    Eq. (4.4)/(4.5):  [log pi(y|x)/pi_t(y|x) - (eta P(y > pi_t|x) - log Z_{pi_t}(x))]^2   (log_z given)
    logp, ref_logp: summed log-probs under pi_theta and pi_t; win_prob: P-hat(y > pi_t | x); all shape (B,).
    """
    target = eta * (win_prob - 0.5) if log_z is None else eta * win_prob - log_z
    return (logp - ref_logp - target) ** 2


def sppo_pair_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, prob_w, eta, prob_l=None, form="paper"):
    """SPPO on one (winner, loser) pair per prompt.

    form="paper", Eq. (4.12): prob_w = P(y_w > y_l | x), and the loser's target uses P(y_w < y_l) = 1 - prob_w:
        [l_w - eta (prob_w - 1/2)]^2 + [l_l - eta ((1 - prob_w) - 1/2)]^2.
    form="released" (uclaml/SPPO, loss 'sppo'): prob_w, prob_l are the ROW MEANS P-hat(y > pi_t) of the winner and
        the loser over all K responses (self-term 1/2 included, so prob_w <= 0.9 at K = 5), and the two terms are
        averaged:  ([l_w - eta (prob_w - 1/2)]^2 + [l_l - eta (prob_l - 1/2)]^2) / 2.
    The paper form compares the pair with each other only; the released form compares each with pi_t (Eq. 4.5),
    which is Eq. (4.7) on the two kept rows.
    """
    if form == "paper":
        if prob_l is not None:
            raise ValueError("form='paper' derives the loser's probability as 1 - prob_w; do not pass prob_l")
        return (sppo_loss(logp_w, ref_logp_w, prob_w, eta) + sppo_loss(logp_l, ref_logp_l, 1.0 - prob_w, eta))
    if form == "released":
        if prob_l is None:
            raise ValueError("form='released' needs prob_l, the loser's row-mean win rate")
        return (sppo_loss(logp_w, ref_logp_w, prob_w, eta) + sppo_loss(logp_l, ref_logp_l, prob_l, eta)) / 2
    raise ValueError(f"form must be 'paper' or 'released', got {form!r}")


def _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta):
    """a = beta log pi(y_w)/pi_ref(y_w), b = beta log pi(y_l)/pi_ref(y_l)   (Sec. 4.5 notation, beta = 1/eta)."""
    return beta * (logp_w - ref_logp_w), beta * (logp_l - ref_logp_l)


def dpo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta):
    """Eq. (4.13): -log sigma(a - b)."""
    a, b = _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta)
    return -F.logsigmoid(a - b)


def ipo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta, target=0.5):
    """IPO on Sec. 4.5's margins: [(a - b) - target]^2 = beta^2 (h - target/beta)^2, minimised at a - b = target.

    h = (a - b)/beta is the log-ratio margin in nats. target=1/2 (default): the minimiser of Azar et al. 2023's IPO
    (h = 1/(2 beta), their tau = beta), but NOT their scale: their loss, TRL's loss_type="ipo" and the authors'
    trainer are (h - 1/(2 beta))^2, which is this loss / beta^2, with gradients 1/beta^2 = eta^2 times ours (9x at
    eta = 3, 1e6x at eta = 1000). The minimiser is the same; gradient clipping and plain SGD see the difference: on
    the demo's first iteration with --selection pair (bench/ipo_scale.py, docs/sppo.md) the first step's gradient
    norm is 2.3 here and 20 at their scale at eta = 3 (both clipped at max_grad_norm 1), 0.007 here and 6812 there at
    eta = 1000 (theirs clipped at every step, ours at none). Kept at this scale: the golden losses and the
    comparisons are measured at it. target=1: Eq. (4.14) as printed, which is IPO with tau = beta/2 (a margin of
    eta nats instead of eta/2).
    """
    a, b = _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta)
    return (a - b - target) ** 2


def kto_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta, kl):
    """Eq. (4.15), simplified KTO: sigma(-a + c) + sigma(b - c), with c = beta KL(pi || pi_ref).

    `kl` is an estimate of KL(pi || pi_ref) in nats (KTO uses a detached batch estimate, clamped at 0).
    """
    a, b = _margins(logp_w, ref_logp_w, logp_l, ref_logp_l, beta)
    c = beta * torch.as_tensor(kl, dtype=a.dtype, device=a.device).clamp(min=0)
    return torch.sigmoid(-a + c) + torch.sigmoid(b - c)


def sppo_hard_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, eta):
    """Sec. 4.5 with a hard label P(y_w > y_l) = 1: eta^2 [(a - 1/2)^2 + (b + 1/2)^2] (TRL's `sppo_hard`)."""
    return (logp_w - ref_logp_w - eta / 2) ** 2 + (logp_l - ref_logp_l + eta / 2) ** 2


# ----------------------------------------------------------------------------------------------------------------
# SPPO's successors in the same loop (see the module docstring). Each row method is a step s(y) and a centre c:
# pi_{t+1} ∝ pi_t exp(s), regressed by regression_loss on the target s - c (c: log Z, or the batch's exact log_z).
# b: the collated batch (ref_logp = log pi_t, win_prob = P-hat(y > pi_t), and the method's columns); c: the config.
REGULARISED = ("tau", "magnet_every")
"""The settings of the methods pulled towards a reference / magnet mu (KL weight tau; mu = pi_0, or moved to pi_t
every magnet_every iterations: runs.loss_models)."""


def regression_loss(logp, ref_logp, target):
    """[log pi(y|x)/pi_t(y|x) - target]^2 per row: Eq. (4.7)'s square loss with another method's target."""
    return (logp - ref_logp - target) ** 2


def _kl_step(b, c):
    """eta tau (log mu(y|x) - log pi_t(y|x)): the pull towards the reference / magnet mu of the regularised methods."""
    return c.eta * c.tau * (b["mu_logp"] - b["ref_logp"])


def optimistic_step(b, c):
    """Optimistic Hedge (OMWU; Rakhlin & Sridharan 2013, Daskalakis & Panageas 2019): s = eta (2 P(y > pi_t) -
    P(y > pi_{t-1})), c = eta/2; pi_{-1} = pi_0. last_iterate._optimistic_hedge. ONPO (Zhang et al. 2025, arXiv
    2502.16852, Algorithm 1) runs optimistic mirror descent in its two-sequence form, two regressions per iteration;
    this is the one-sequence form (the same iterates for the Hedge mirror map), one regression."""
    return c.eta * (2 * b["win_prob"] - b["prev_win_prob"]), c.eta / 2


def mmd_step(b, c, win="win_prob"):
    """Magnetic mirror descent (Sokota et al., ICLR 2023, arXiv 2206.05825, Sec. 3, entropy case; MPO, Wang et al.
    2024, arXiv 2410.16714, Sec. 3.2, moves the magnet mu to the current policy periodically: --magnet-every N; MPO's
    own practical loss is a token-level policy gradient, this is the regression on the same step):
    pi_{t+1} ∝ (pi_t mu^(eta tau) exp(eta P(y > pi_t)))^(1/(1 + eta tau)), so
    s = [eta P(y > pi_t) + eta tau (log mu - log pi_t)] / (1 + eta tau), c = eta / (2 (1 + eta tau)).
    last_iterate._mmd (and its magnet schedule)."""
    return (c.eta * b[win] + _kl_step(b, c)) / (1 + c.eta * c.tau), c.eta / (2 * (1 + c.eta * c.tau))


def mirror_prox_step(b, c):
    """Nash Mirror Prox (Tiapkin et al. 2025, arXiv 2505.19731 v1): mirror prox (Nemirovski 2004) on the
    KL-regularised game, each half a proximal (MMD) step from pi_t: pi_{t+1/2} = MMD step at P(y > pi_t), pi_{t+1} =
    MMD step from pi_t at P(y > pi_{t+1/2}). s: mmd_step with half_win_prob = P-hat(y > pi_{t+1/2}), the half step
    estimated on pi_t's samples (successor_columns) where the paper solves it by policy gradient.
    last_iterate._mirror_prox."""
    return mmd_step(b, c, "half_win_prob")


def extragradient_step(b, c):
    """Extragradient (Korpelevich 1976): mirror prox without the regulariser (tau = 0): pi_{t+1/2} = the Hedge step,
    s = eta P(y > pi_{t+1/2}), c = eta/2. last_iterate._extragradient. EGPO (Zhou, Fazel & Du 2025, arXiv 2503.08942)
    trains the half step (an online-IPO loss on the regularised game) and steps again from pi_t; here the half step's
    win rate is estimated on pi_t's samples, no second fit."""
    return c.eta * b["half_win_prob"], c.eta / 2


def nash_md_step(b, c):
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886, Eq. (3)-(5)): pi_t^mu ∝ pi_t^(1 - eta tau) mu^(eta tau), then
    pi_{t+1} ∝ pi_t^mu exp(eta P(y > pi_t^mu)): s = eta tau (log mu - log pi_t) + eta P(y > pi_t^mu), c = eta/2.
    mix_win_prob = P-hat(y > pi_t^mu), on pi_t's samples; their Nash-MD-PG (Sec. 7) is a token-level policy gradient
    against samples of a per-token mixture. last_iterate._nash_md."""
    return c.eta * b["mix_win_prob"] + _kl_step(b, c), c.eta / 2


def inpo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, kl_w, kl_l, eta):
    """INPO (Zhang et al. 2024, arXiv 2407.00617, ICLR 2025): online mirror descent, Eq. (5): pi_{t+1} ∝
    pi_t^(1 - eta tau) mu^(eta tau) exp(eta P(y > pi_t)) (their eta is our 1/eta, their tau/eta our eta tau), fitted
    on the (winner, loser) pair alone, no win rate needed, Eq. (8): [h_w - h_l - (kl_w - kl_l) - eta/2]^2, h = log
    pi/pi_t, kl = eta tau (log mu - log pi_t) (_kl_step). Over y, y' ~ pi_t labelled by the oracle its minimiser
    has h(y) - kl(y) = eta P(y > pi_t) + const (their Prop. 6): the update. Their pairs are best and worst of K, as
    --selection pair keeps. last_iterate._inpo."""
    return (logp_w - ref_logp_w - (logp_l - ref_logp_l) - (kl_w - kl_l) - eta / 2) ** 2


def dno_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, r_w, r_l, eta):
    """DNO (Rosset et al. 2024, arXiv 2404.03715, Algorithm 1, Eq. (8)): the soft-label logistic regression of the
    pair's log-ratio margin on r = P(y > pi_t): -[sigma(r_w - r_l) log sigma(m) + sigma(r_l - r_w) log sigma(-m)],
    m = (h_w - h_l) / eta (their eta is our beta = 1/eta). Minimised at h_w - h_l = eta (r_w - r_l): pi_{t+1} ∝
    pi_t exp(eta P(y > pi_t)) (their Eq. (9)), Hedge's step (Eq. 4.1) by a batched regression rather than a square
    loss. Their practical DNO-Prct (Algorithm 2) is DPO against pi_t on large-margin pairs: --loss dpo here."""
    m = (logp_w - ref_logp_w - (logp_l - ref_logp_l)) / eta
    p = torch.sigmoid(r_w - r_l)
    return -(p * F.logsigmoid(m) + (1 - p) * F.logsigmoid(-m))


def _inpo(lp, b, c):
    kl = _kl_step(b, c)
    return inpo_loss(*pair(lp, b), kl[0::2], kl[1::2], c.eta)


def _inpo_target(ratio, b, c):
    """INPO: the pair's margin net of the pull to mu, h_w - h_l - (kl_w - kl_l), against eta/2. Each pair's eta/2 is
    a noisy label (the minimiser reaches eta (P(y_w > pi_t) - P(y_l > pi_t)) + const, not eta/2 per pair), so the
    share is read on the mean: a constant target, as IPO's."""
    kl = _kl_step(b, c)
    h = ratio[0::2] - ratio[1::2] - (kl[0::2] - kl[1::2])
    return h, torch.full_like(h, c.eta / 2)


def _dno_target(ratio, b, c):
    """DNO: the pair's margin h_w - h_l against eta (r_w - r_l)."""
    return ratio[0::2] - ratio[1::2], c.eta * (b["win_prob"][0::2] - b["win_prob"][1::2])


# ----------------------------------------------------------------------------------------------------------------
# The losses' table (--loss): one entry per objective. A new loss is its function above and one line here.
@dataclass(frozen=True)
class Loss:
    """One --loss. fn(logp, batch, cfg): logp (B,) summed log-probs under pi_theta of a collated batch (ref_logp,
    win_prob and `columns`) -> (B,) per row (kind 'row') or (B/2,) per (winner, loser) pair (kind 'pair': rows 2i,
    2i+1; needs --selection pair). settings: the config fields it reads beyond eta (the train stage's key records
    them). target(ratio, batch, cfg) -> (achieved, wanted): the quantity the loss drives to a finite target and that
    target, from ratio = log pi(y|x) - log pi_ref(y|x) per row (None for a loss with no finite target: DPO, KTO);
    target_share reads how much of it a fit reached. models: the policies besides pi_t whose log-probs of D_t's
    responses it reads ('mu': the reference / magnet, column mu_logp; 'previous': pi_{t-1}, for prev_win_prob);
    a column of ESTIMATED needs every sample of a prompt (--selection all)."""
    fn: Callable
    kind: Literal["row", "pair"]
    settings: tuple = ()
    columns: tuple = ()
    target: Callable | None = None
    models: tuple = ()


def pair(logp, batch):
    """(log pi(y_w), log pi_ref(y_w), log pi(y_l), log pi_ref(y_l)), each (B/2,): rows 2i and 2i+1 of the batch."""
    ref = batch["ref_logp"]
    return logp[0::2], ref[0::2], logp[1::2], ref[1::2]


def row_method(step, columns, settings=(), models=()):
    """The Loss of a row method given its step(b, c) -> (s, c): regression_loss on the target s - c, c replaced by
    the batch's log_z when it has one (the exact log Z of the tabular-limit tests)."""
    def target(b, c):
        s, centre = step(b, c)
        return s - (b["log_z"] if "log_z" in b else centre)

    return Loss(lambda lp, b, c: regression_loss(lp, b["ref_logp"], target(b, c)), "row", settings, columns,
                lambda ratio, b, c: (ratio, target(b, c)), models)


def _row_target(ratio, b, c):
    """Eq. (4.7): each row's log-ratio against eta (P-hat - 1/2), or eta P-hat - log Z with --log-z estimate."""
    lz = b.get("log_z")
    return ratio, c.eta * (b["win_prob"] - 0.5) if lz is None else c.eta * b["win_prob"] - lz


def _margin_target(ratio, b, c):
    """IPO: the margin h = ratio_w - ratio_l (nats) against ipo_target / beta = ipo_target * eta."""
    h = ratio[0::2] - ratio[1::2]
    return h, torch.full_like(h, c.ipo_target * c.eta)


def _hard_target(ratio, b, c):
    """sppo_hard: the winner's log-ratio against +eta/2, the loser's against -eta/2 (P(y_w > y_l) = 1)."""
    return ratio, c.eta / 2 * torch.tensor([1.0, -1.0], dtype=ratio.dtype).repeat(len(ratio) // 2)


LOSSES.update({
    # name                  the loss of a batch                                                     kind, settings
    "sppo":      Loss(lambda lp, b, c: sppo_loss(lp, b["ref_logp"], b["win_prob"], c.eta, b.get("log_z")),
                      "row", ("log_z",), target=_row_target),                                       # Eq. (4.7)
    "sppo_pair": Loss(lambda lp, b, c: sppo_pair_loss(*pair(lp, b), b["pair_prob"][0::2], c.eta),
                      "pair", columns=("pair_prob",),
                      target=lambda r, b, c: (r, c.eta * (b["pair_prob"] - 0.5))),                  # Eq. (4.12)
    "dpo":       Loss(lambda lp, b, c: dpo_loss(*pair(lp, b), 1 / c.eta), "pair"),                  # Eq. (4.13)
    "ipo":       Loss(lambda lp, b, c: ipo_loss(*pair(lp, b), 1 / c.eta, c.ipo_target), "pair",
                      ("ipo_target",), target=_margin_target),                                      # Eq. (4.14)
    "sppo_hard": Loss(lambda lp, b, c: sppo_hard_loss(*pair(lp, b), c.eta), "pair",
                      target=_hard_target),                                                         # Sec. 4.5
    "kto":       Loss(lambda lp, b, c: kto_loss(*pair(lp, b), 1 / c.eta, (lp - b["ref_logp"]).detach().mean()),
                      "pair"),                        # Eq. (4.15); KL(pi || pi_ref): the micro-batch's mean log-ratio
    # SPPO's successors (above): each a target for log pi_{t+1}/pi_t, or a pair loss (INPO, DNO)
    "optimistic":    row_method(optimistic_step, ("prev_win_prob",), models=("previous",)),
    "extragradient": row_method(extragradient_step, ("half_win_prob",)),
    "mirror_prox":   row_method(mirror_prox_step, ("half_win_prob", "mu_logp"), REGULARISED, ("mu",)),
    "nash_md":       row_method(nash_md_step, ("mix_win_prob", "mu_logp"), REGULARISED, ("mu",)),
    "mmd":           row_method(mmd_step, ("mu_logp",), REGULARISED, ("mu",)),
    "inpo":          Loss(_inpo, "pair", REGULARISED, ("mu_logp",), _inpo_target, ("mu",)),
    "dno":           Loss(lambda lp, b, c: dno_loss(*pair(lp, b), b["win_prob"][0::2], b["win_prob"][1::2], c.eta),
                          "pair", target=_dno_target),
})


def target_share(name, ratio, batch, cfg):
    """How much of its target a fit reached: the least-squares slope, with intercept, of the achieved quantity on
    the target (LOSSES[name].target): 1 reached, 0 not moved. The intercept is there because a normalised policy
    moves every log-ratio of a prompt by the same log Z, which no loss here controls (Eq. 4.6); a constant target
    (IPO's margin) is read as mean(achieved) / target. NaN for a loss with no finite target (DPO, KTO)."""
    fn = LOSSES[name].target
    if fn is None or len(ratio) == 0:
        return math.nan
    got, want = (torch.as_tensor(v, dtype=torch.float64) for v in fn(torch.as_tensor(ratio, dtype=torch.float64),
                                                                        batch, cfg))
    dw = want - want.mean()
    den = float((dw * dw).sum())
    if den > 1e-12 * float((want * want).sum()):
        return float(((got - got.mean()) * dw).sum()) / den
    return float(got.mean() / want.mean()) if float(want.abs().max()) > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------------
# The successors' columns of D_t (step 3), from one prompt's K x K matrix and its K samples' log-probs.
def reweighted_win_rates(P, log_w):
    """P-hat(y_i > q | x) = sum_k w_k P[i, k], w = softmax(log_w) over the K samples: the win rate against a policy
    q estimated on pi_t's samples y_k with self-normalised importance weights w_k ∝ q(y_k)/pi_t(y_k) = exp(log_w_k)
    (log_w known up to a constant). Uniform log_w: Eq. (4.5)'s P-hat(y_i > pi_t), the self-term 1/2 included.
    Exact when the 'samples' are every response and log_w = log q (the tabular limit). P (..., K, K), log_w (..., K)
    -> (..., K), float64."""
    log_w = np.asarray(log_w, dtype=np.float64)
    w = np.exp(log_w - log_w.max(-1, keepdims=True))
    return (np.asarray(P, dtype=np.float64) * (w / w.sum(-1, keepdims=True))[..., None, :]).sum(-1)


def successor_columns(name, P, logps, cfg):
    """The ESTIMATED columns LOSSES[name] reads, for the K samples of a prompt (any leading axes): P (..., K, K);
    logps {'ref': log pi_t(y_k), 'mu': log mu(y_k), 'previous': log pi_{t-1}(y_k)}, (..., K) each, those the
    method's models need. Each win rate is against the policy its update uses, by reweighted_win_rates:
      prev_win_prob  P-hat(y > pi_{t-1}),          q/pi_t = pi_{t-1}/pi_t                          (optimistic)
      mix_win_prob   P-hat(y > pi_t^mu),           q/pi_t ∝ (mu/pi_t)^(eta tau)                    (nash_md)
      half_win_prob  P-hat(y > pi_{t+1/2}),        q/pi_t ∝ exp(the half step's s: mmd_step at tau, or eta P-hat
                                                   at tau = 0 for extragradient)                   (mirror_prox)
    Returns {column: (..., K)}."""
    P = np.asarray(P, dtype=np.float64)
    cols, ref, out = set(LOSSES[name].columns) & ESTIMATED, logps.get("ref"), {}
    rows = {"win_prob": P.mean(-1), "ref_logp": ref, "mu_logp": logps.get("mu", ref)}     # the steps' batch, per row
    if "prev_win_prob" in cols:
        out["prev_win_prob"] = reweighted_win_rates(P, logps["previous"] - ref)
    if "mix_win_prob" in cols:
        out["mix_win_prob"] = reweighted_win_rates(P, _kl_step(rows, cfg))
    if "half_win_prob" in cols:                     # extragradient's half step is Hedge's: mmd_step at tau = 0
        tau = cfg.tau if "tau" in LOSSES[name].settings else 0.0
        out["half_win_prob"] = reweighted_win_rates(P, mmd_step(rows, dataclasses.replace(cfg, tau=tau))[0])
    return out

