"""bench/ipo_scale.py: losses.ipo_loss's scale against the peers' IPO, measured: gradient norms, clipping, the step.

losses.ipo_loss is [(a - b) - target]^2 on Sec. 4.5's margins a, b = beta x log-ratio (beta = 1/eta), that is
beta^2 (h - target/beta)^2 with h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), the margin in nats. Azar et
al. 2023 (tau = beta), TRL's loss_type="ipo" ((logits - 1/(2 beta))^2) and uclaml/SPPO's trainer minimise
(h - 1/(2 beta))^2: the same minimiser, a loss and a gradient 1/beta^2 = eta^2 times larger. By hand, at h = 0
(the first step of every iteration: pi_theta = pi_ref = pi_t) d loss/dh = -2 target beta (ours) and -2 target/beta
(theirs), so with G = |grad_theta of the batch's mean h| the gradient norms are 2 target beta G and 2 target G/beta,
and a step is clipped when its norm exceeds max_grad_norm (SPPOConfig's default: 1.0).

The world is the demo's with `--selection pair --loss ipo`: the demo's pi_0, its first iteration's D_t (--selection pair, K = 5, 100
prompts per game) and its training (AdamW, lr 5e-3, 12 steps). Both scales train from pi_0 on that D_t at eta = 3
(the comparison's step) and eta = 1000 (the paper's LLM runs). Printed per (eta, scale): the first step's gradient
norm, measured and by hand, the steps clipped, and the mean margin h reached against its target eta/2 nats.

    python -m bench.ipo_scale            # ~10 s on 2 CPU cores; docs/sppo.md quotes its table
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import cli
import losses
import policy
import runs
import sppo
import sppo_toy
import training


def ipo_peer_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta, target=0.5):
    """The peers' IPO, written from their definition, not from losses.ipo_loss: (h - target/beta)^2, h in nats."""
    h = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)
    return (h - target / beta) ** 2


SCALES = {"ours": "ipo", "peers": "ipo_peer"}                                       # scale -> --loss


@contextlib.contextmanager
def peer_loss():
    """sppo.LOSSES with an 'ipo_peer' entry (ipo_peer_loss) inside the block only: the table stays sppo.py's."""
    sppo.LOSSES["ipo_peer"] = losses.Loss(lambda lp, b, c: ipo_peer_loss(*losses.pair(lp, b), 1 / c.eta, c.ipo_target),
                                        "pair", ("ipo_target",))
    try:
        yield
    finally:
        del sppo.LOSSES["ipo_peer"]


def margins(model, tok, rows, cfg):
    """h of every pair of `rows` (winner, loser adjacent) under `model`, in one batch, with its graph: (pairs,)."""
    pairs, _ = training.encode_rows(tok, rows, cfg)
    b = training.make_batch(pairs, rows, list(range(len(rows))), policy.pad_id(tok), cfg, "cpu")
    ratio = policy.sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"],
                                  cu_seq_lens=b.get("cu_seq_lens")) - b["ref_logp"]                    # (2 pairs,)
    return ratio[0::2] - ratio[1::2]


def margin_gradient_norm(model_dir, tok, rows, cfg):
    """G = |grad_theta of mean_pairs h| at pi_0, by autograd on h alone (no loss involved)."""
    model, _ = runs.load_policy(model_dir, cfg, "cpu")
    margins(model, tok, rows, cfg).mean().backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                       if p.grad is not None])))


def measure(model_dir, rows, cfg, etas):
    """For each eta and scale: train_policy from model_dir on rows (cfg's optimizer, schedule and clipping). Returns
    [{eta, scale, G, first (the first step's norm), hand (2 target beta G or 2 target G / beta), clipped, steps,
    h (mean margin after training), target (ipo_target / beta nats)}]."""
    out = []
    for eta in etas:
        c = dataclasses.replace(cfg, eta=eta)
        beta = 1 / eta
        tok = runs.load_policy(model_dir, c, "cpu")[1]
        G = margin_gradient_norm(model_dir, tok, rows, c)
        for scale, loss in SCALES.items():
            model, tok = runs.load_policy(model_dir, c, "cpu")
            torch.manual_seed(c.seed)
            with peer_loss():
                history = training.train_policy(model, tok, rows, dataclasses.replace(c, loss=loss), "cpu")
            with torch.no_grad():
                h = float(margins(model, tok, rows, c).mean())
            norms = [s["grad_norm"] for s in history]
            out.append({"eta": eta, "scale": scale, "G": G, "first": norms[0],
                        "hand": 2 * c.ipo_target * (beta if scale == "ours" else 1 / beta) * G,
                        "clipped": sum(n > c.max_grad_norm for n in norms), "steps": len(norms), "h": h,
                        "target": c.ipo_target / beta})
    return out


def compare_world(out):
    """pi_0 and iteration 0's D_t of the demo with --selection pair --loss ipo, under `out`. Returns (the
    config, pi_0's folder, the rows)."""
    games = sppo_toy.demo_games()
    cfg = sppo_toy.demo_start(sppo_toy.DemoConfig(out=str(out), selection="pair", loss="ipo", stop_after="dataset",
                                                  progress=False), games)
    sppo.run(cfg, oracle=sppo_toy.GameOracle(games))
    return cfg, cfg.model, runs.read_dataset(Path(out) / "iter0" / "dataset.jsonl")


@dataclass
class Config:
    """`python -m bench.ipo_scale`'s settings."""
    etas: list[float] = cli.arg(default_factory=lambda: [3.0, 1000.0], help="Hedge steps eta (beta = 1/eta)")

    RULES = (("etas", lambda c: len(c.etas) > 0 and all(e > 0 for e in c.etas), "steps > 0"),)


def report(cfg):
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        world, model_dir, rows = compare_world(tmp)
        res = measure(model_dir, rows, world, cfg.etas)
    print(f"IPO at two scales on the demo's iteration 0 (--selection pair): {len(rows) // 2} pairs, {world.optimizer} lr "
          f"{world.lr:g}, {res[0]['steps']} steps, clipping at max_grad_norm = {world.max_grad_norm:g}")
    print("| eta | beta | scale | G = grad norm of mean h | first step's grad norm (by hand) | clipped? (first) "
          "| steps clipped | mean h after / target (nats) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        print(f"| {r['eta']:g} | {1 / r['eta']:.3g} | {r['scale']} | {r['G']:.4g} | {r['first']:.4g} ({r['hand']:.4g}) "
              f"| {'yes' if r['first'] > world.max_grad_norm else 'no'} | {r['clipped']} of {r['steps']} | "
              f"{r['h']:.3g} / {r['target']:.4g} |")
    for eta in cfg.etas:
        ours, peers = (next(r for r in res if r["eta"] == eta and r["scale"] == s) for s in SCALES)
        ratio = peers["first"] / ours["first"]
        print(f"eta = {eta:g}: first-step gradient norm, peers / ours = {ratio:.7g}; 1/beta^2 = {eta ** 2:g} "
              f"(relative difference {abs(ratio / eta ** 2 - 1):.1e})")
    return 0


def main(argv=None):
    return cli.main("bench/ipo_scale.py", Config, report, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
