"""The tiny-LM world where every answer is exact: SPPO's demo, tabular SPPO, and the game oracle.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675. A language model
over a 16-token vocabulary answers two prompts, 'play rps' and 'play weighted rps', with one of three
well-formed responses (or anything else, 'malformed'). A synthetic preference game (hedge_toy) is the oracle, so
the model's policy pi(.|x) over responses, its duality gap and the Hedge step (Eq. 4.1) it should follow are all
computed exactly. sppo.py's Algorithm 1 runs unchanged on it; only the oracle object is new.

    python sppo_toy.py                       # the demo: 20 iterations, table + figures/demo_gap.png (~1 min CPU)
    python sppo_toy.py --iterations 2 --out runs/small --figure runs/small/gap.png
    python compare.py --world lm             # SPPO vs iterative DPO, IPO, sppo_hard, KTO here, over seeds
    python sppo_toy.py --help                # every setting with the demo's default

Contents: GameOracle (the oracle slot of sppo.run) -> the demo's games and tiny policy -> exact policies ->
tabular self-play with each --loss on a softmax table -> the demo's metrics, plots and CLI. The comparisons of
SPPO against its baselines in this world, over seeds, are compare.py's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import arena
import cli
import committee
import hedge_toy
import losses
import policy
import runs
import sppo


# ----------------------------------------------------------------------------------------------------------------
# The oracle: a preference game per prompt over a few well-formed responses.
class GameOracle:
    """A synthetic oracle: each prompt carries a preference game (hedge_toy) over a small set of responses.

    games: {prompt: (P, responses)} with P (n, n) over the n well-formed responses. A malformed response (any text
    not in the list, or an unfinished one) loses to every well-formed response and ties with other malformed ones,
    so the game the policy plays is the (n+1)-action `extended(prompt)`.
    """

    def __init__(self, games: dict[str, tuple[np.ndarray, list[str]]]):
        self.games = {x: (hedge_toy.validate_preference(P), list(ys)) for x, (P, ys) in games.items()}

    def identity(self):
        """What the run manifest records of this oracle: a hash of its games."""
        import hashlib
        return hashlib.sha256(json.dumps({x: [P.tolist(), ys] for x, (P, ys) in self.games.items()}).encode()).hexdigest()

    def extended(self, prompt):
        """(n+1, n+1) matrix: the game plus a last 'malformed' action."""
        P, ys = self.games[prompt]
        n = len(ys)
        Q = np.full((n + 1, n + 1), 0.5)
        Q[:n, :n], Q[:n, n], Q[n, :n] = P, 1.0, 0.0
        return Q

    def action(self, prompt, response):
        """Index of the response among the prompt's well-formed ones; n for a malformed response."""
        ys = self.games[prompt][1]
        return ys.index(response.strip()) if response.strip() in ys else len(ys)

    def __call__(self, prompt, responses):
        if prompt not in self.games:
            raise KeyError(f"GameOracle has no game for prompt {prompt!r}")
        a = [self.action(prompt, r) for r in responses]
        return self.extended(prompt)[np.ix_(a, a)]                                        # (K, K)


# ----------------------------------------------------------------------------------------------------------------
# The demo's world: two games, a 16-token vocabulary, a random-init tiny Llama warm-started away from equilibrium.
DEMO_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "user", "=>", "play", "rps", "weighted", "rock", "paper",
              "scissors", "big", "sharp", "lizard", "spock"]
DEMO_START = {"play rps": [0.7, 0.2, 0.1], "play weighted rps": [0.7, 0.2, 0.1]}
"""pi_0 of the demo: a warm start far from equilibrium, as an instruction-tuned model is (Sec. 5 starts from one)."""


def demo_games():
    """{prompt: (P, responses)}: RPS (uniform equilibrium) and weighted RPS (equilibrium (2/7, 1/7, 4/7));
    'big rock' and 'sharp scissors' are 2 tokens, so summed log-probs matter."""
    return {"play rps": (hedge_toy.rock_paper_scissors(), ["rock", "paper", "scissors"]),
            "play weighted rps": (hedge_toy.weighted_rps(), ["big rock", "paper", "sharp scissors"])}


def build_tiny_policy(out_dir, arch="llama", vocab=DEMO_VOCAB, hidden=32, layers=2, seed=0):
    """Save a random-init tiny causal LM and a word-level tokenizer (with a chat template) to out_dir, locally.

    It loads back through the same AutoModelForCausalLM / AutoTokenizer.from_pretrained path as a real checkpoint.
    arch: "llama" or "mistral".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")                                        # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<s> user {{ m['content'] }} =>{% endfor %}"
    Config, Model = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    config = Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Model(config)
    runs.save_policy(model, tokenizer, out_dir)
    return str(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic D_t over the demo vocabulary, for the tests, bench.py and train_7b checks.
def synthetic_dataset(n, seed=0, long_rows=0, words=12):
    """n rows in runs.DATASET_FIELDS without ref_logp, over the demo's vocabulary (for tests and bench.py). The first
    `long_rows` responses are 100 words long, to exercise truncation."""
    g = torch.Generator().manual_seed(seed)
    vocab = ["rock", "paper", "scissors", "big", "sharp", "lizard", "spock"]
    rows = []
    for i in range(n):
        k = 100 if i < long_rows else 1 + int(torch.randint(words, (1,), generator=g))
        rows.append({"prompt_id": i // 2, "prompt": ["play rps", "play weighted rps"][i % 2],
                     "response": " ".join(vocab[int(j)] for j in torch.randint(len(vocab), (k,), generator=g)),
                     "finished": bool(torch.rand(1, generator=g) < 0.8), "win_prob": float(torch.rand(1, generator=g)),
                     "role": "winner" if i % 2 == 0 else "loser"})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Exact policies: teacher-forced log-probs of every well-formed response.
def response_logps(model, tokenizer, prompt, responses):
    """log pi(y|x) of each finished response (EOS included), exactly, by teacher forcing. Returns (n,) float64."""
    pairs = [policy.encode_example(tokenizer, prompt, y, True, 10 ** 6, 10 ** 6)[:2] for y in responses]
    pad = tokenizer.pad_token_id
    return np.array(policy.batched_logps(model, pairs, pad, batch_size=len(pairs), device=model.device))


def exact_policy(model, tokenizer, prompt, responses):
    """The model's exact distribution over the n well-formed responses plus 'malformed' (everything else): (n+1,)."""
    p = np.exp(response_logps(model, tokenizer, prompt, responses))
    return np.append(p, max(0.0, 1.0 - p.sum()))


def warm_start(model, tokenizer, targets, steps=300, lr=1e-2):
    """Fit pi_0(.|x) to a target distribution over well-formed responses: min -sum_y q(y|x) log pi(y|x)."""
    pairs, weights = [], []
    for x, (ys, q) in targets.items():
        for y, w in zip(ys, q):
            pairs.append(policy.encode_example(tokenizer, x, y, True, 10 ** 6, 10 ** 6)[:2])
            weights.append(w)
    batch, w = policy.collate(pairs, tokenizer.pad_token_id), torch.tensor(weights)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = -(w * policy.sequence_logps(model, **batch)).sum()
        loss.backward()
        opt.step()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Tabular SPPO: the loss of Eq. (4.7) on a softmax policy table, against exact Hedge (Eq. 4.1) from hedge_toy.
def tabular_sppo(P, eta, T, K=5, groups=64, log_z="half", pi1=None, seed=0):
    """T iterations of SPPO on a softmax policy table; returns the iterates pi_1..pi_T as an array (T, n).

    Each iteration samples `groups` x K responses from pi_t, estimates P-hat(y_k > pi_t) from the K x K block
    (Eq. 4.5), and minimises the mean of sppo_loss over the samples by L-BFGS from pi_t:
    log_z="half" uses the constant eta/2 (Eq. 4.6), "exact" the exact log Z_{pi_t} at step eta (Eq. 4.2,
    hedge_toy), a number that constant (e.g. App. A's ordered value log((e^eta - 1)/eta)). With K -> inf and
    groups -> inf, "exact" approaches the Hedge step; "half" does NOT: eta/2 is not log Z_{pi_t}, and a normalised
    policy cannot absorb the difference, so the least-squares fit is another step (App. A: eta/2 is a baseline,
    not an estimate). Finite K also shrinks the step to eta (K-1)/K (the self-term 1/2 of P-hat).
    """
    return tabular_selfplay(P, "sppo", eta, T, K, groups, pi1, seed, log_z=log_z)


def tabular_selfplay(P, loss, eta, T, K=5, groups=64, pi1=None, seed=0, log_z="half", reference="previous",
                     ipo_target=0.5, selection=None, record=None, tau=0.1, magnet_every=0):
    """T iterations of Algorithm 1 with sppo.py's `--loss` (sppo.LOSSES) on a softmax table; returns pi_1..pi_T, (T, n).

    Each iteration samples `groups` x K responses from pi_t and their P-hat(y_k > pi_t) (Eq. 4.5), keeps them as
    --selection all (default for a row loss: every sample) or pair (default for the others: each group's winner
    and loser, sppo.select_pair, with P(y_w > y_l) for sppo_pair; a group whose K responses all tie gives no pair),
    and fits the table to the mean loss by L-BFGS from pi_t (fit_table). pi_ref = pi_t, or pi_1 with
    reference='initial'. beta = 1/eta for dpo, ipo and kto. record: a list that receives, per iteration, the fit's
    {"target_share": losses.target_share} (NaN for DPO, KTO). SPPO's successors (losses.py) get their columns as
    sppo.py computes them (sppo.add_successor_columns' losses.successor_columns over each group's K samples), with
    log mu = log pi_1's table (or the magnet's, moved every magnet_every iterations as runs.loss_models does), log
    pi_{t-1} = the previous table (pi_1's at t = 1), KL weight tau.
    A pair loss whose pairs all point one way (a transitive game) has no finite minimiser: L-BFGS stops at its
    tolerance or 200 iterations, far along the direction, as iterative DPO trained long on such data does.
    """
    P = hedge_toy.validate_preference(P)
    if log_z not in ("half", "exact") and not isinstance(log_z, (int, float)):
        raise ValueError(f"log_z must be 'half', 'exact' or a number, got {log_z!r}")
    selection = selection or ("all" if loss in sppo.LOSSES and sppo.LOSSES[loss].kind == "row" else "pair")
    if loss not in sppo.LOSSES or selection not in ("all", "pair") or (
            sppo.LOSSES[loss].kind == "pair" and selection != "pair"):
        raise ValueError(f"loss must be one of {', '.join(sppo.LOSSES)} with selection 'all' (row losses) or 'pair'; "
                         f"got {loss!r}, {selection!r}")
    n = P.shape[0]
    rng = np.random.default_rng(seed)
    pi = np.full(n, 1.0 / n) if pi1 is None else np.asarray(pi1, dtype=np.float64)
    theta = torch.tensor(np.log(pi), dtype=torch.float64, requires_grad=True)
    log_pi1 = torch.log_softmax(theta, 0).detach()
    cfg = cli.check(sppo.SPPOConfig(loss=loss, eta=eta, ipo_target=ipo_target, selection=selection, tau=tau,
                                    magnet_every=magnet_every, reference=reference))      # sppo.py's RULES
    out, spec = [], sppo.LOSSES[loss]
    for t in range(T):
        pi = torch.softmax(theta, 0).detach().numpy()
        out.append(pi)
        tables = {"ref": np.log(pi), "previous": np.log(out[max(t - 1, 0)]),
                  "mu": np.log(out[runs.magnet_iteration(t, magnet_every)])}
        y = rng.choice(n, size=(groups, K), p=pi)                                         # (G, K) samples
        wp = sppo.win_rates(P[y[:, :, None], y[:, None, :]])                              # (G, K) Eq. (4.5)
        batch = {}
        if selection == "all":
            idx, target = y.ravel(), wp.ravel()
            cols = losses.successor_columns(loss, P[y[:, :, None], y[:, None, :]], {m: v[y] for m, v in
                                                                                    tables.items()}, cfg)
            batch.update({k: torch.from_numpy(v.ravel()) for k, v in cols.items()})
        else:                                                                             # rows 2i, 2i+1: w, l
            w, l = sppo.select_pair(wp)
            g = np.flatnonzero(w != l)                                                    # all tied: no pair
            yw, yl = y[g, w[g]], y[g, l[g]]
            idx = np.stack([yw, yl], 1).ravel()                                           # (2G,)
            target = np.stack([wp[g, w[g]], wp[g, l[g]]], 1).ravel()
            batch["pair_prob"] = torch.from_numpy(np.stack([P[yw, yl], P[yl, yw]], 1).ravel())
        idx, batch["win_prob"] = torch.from_numpy(idx), torch.from_numpy(target)
        if "mu" in spec.models:
            batch["mu_logp"] = torch.from_numpy(tables["mu"])[idx]
        batch["ref_logp"] = (log_pi1 if reference == "initial" else torch.log_softmax(theta, 0).detach())[idx]
        lz = (None if log_z == "half" else float(hedge_toy.log_partition(P, pi, eta)) if log_z == "exact"
              else float(log_z))                                                          # Eq. (4.6) / (4.2)
        if lz is not None:
            batch["log_z"] = torch.full_like(batch["win_prob"], lz)
        if len(idx):
            fit_table(theta, idx, batch, cfg)
        if record is not None:
            ratio = torch.log_softmax(theta, 0).detach()[idx] - batch["ref_logp"]
            record.append({"target_share": losses.target_share(loss, ratio, batch, cfg) if len(idx) else math.nan})
    return np.array(out)


def fit_table(theta, idx, batch, cfg):
    """The exact tabular update of cfg.loss on one iteration's rows: theta (a log-policy table, any leading axes
    flattened by idx into theta.view(-1) per its last axis) minimises the mean loss by L-BFGS (strong Wolfe, 200
    iterations, gradient tolerance 1e-12), in place. idx: the rows' flat indices into theta (rows 2i, 2i+1 a pair)."""
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = sppo.LOSSES[cfg.loss].fn(torch.log_softmax(theta, -1).reshape(-1)[idx], batch, cfg).mean()
        value.backward()
        return value
    opt.step(closure)
    return theta


def selfplay_gaps(P, iterates):
    """Exact exploitability (hedge_toy.duality_gap) per iteration of the last iterate pi_t and of the average
    (1/t) sum_{s<=t} pi_s (Thm 4.1's output). iterates (T, n) -> two arrays (T,)."""
    avg = np.cumsum(iterates, 0) / np.arange(1, len(iterates) + 1)[:, None]
    return hedge_toy.duality_gap(P, iterates), hedge_toy.duality_gap(P, avg)


# ----------------------------------------------------------------------------------------------------------------
# The demo: Algorithm 1 (sppo.run) on the two games, tracked against exact Hedge.
def with_defaults(cls, name, **defaults):
    """A subclass of the config dataclass `cls` whose fields take new defaults (help texts kept), so that
    `--help` shows the values this script really uses."""
    hints = typing.get_type_hints(cls)
    new = [(f.name, hints[f.name], dataclasses.field(default=defaults[f.name], metadata=f.metadata))
           for f in dataclasses.fields(cls) if f.name in defaults]
    return dataclasses.make_dataclass(name, new, bases=(cls,))


_DemoBase = with_defaults(
    sppo.SPPOConfig, "_DemoBase", out="runs/demo", oracle="game", iterations=20, split_prompts=False, K=5, eta=3.0,
    selection="all", max_new_tokens=3, gen_batch=256, max_length=32, max_prompt_length=16, optimizer="adamw",
    lr=5e-3, warmup_ratio=0.1, epochs=12, global_batch=256, micro_batch=1024, seed=0)


@dataclass
class DemoConfig(_DemoBase):
    """The demo's settings: SPPOConfig for a 16-token world (eta = 3: 20 Hedge steps cut both gaps by ~4x)."""
    groups: int = cli.arg(default=100, help="Copies of each game prompt per iteration, each drawing K samples.")
    figure: str = cli.arg(default="figures/demo_gap.png", path="out_file", help="Where to save the gap plot (the "
                          "arena plot beside it).")

    RULES = sppo.SPPOConfig.RULES + (
        ("groups", lambda c: c.groups >= 1, ">= 1: copies of each game prompt per iteration"),
    )

    NOT_HERE = {
        "model": (None, "it builds its own pi_0 (OUT/pi0, a tiny Llama warm-started to DEMO_START); "
                        "sppo.py --model trains yours"),
        "prompts": (None, "the prompts are the two game prompts, --groups copies of each (OUT/prompts.jsonl)"),
        "prompt_column": ("prompt", "the demo writes its own prompt file"),
        "max_prompts": (0, "the demo's prompts are --groups copies of each game prompt: set --groups"),
        "oracle": ("game", "the oracle is the demo's preference game (GameOracle), exact"),
        "pairrm": (None, "the game oracle judges here, not PairRM"),
        "pairrm_mode": ("pairwise", "the game oracle judges here, not PairRM"),
        "judges": (committee.DEFAULT_JUDGES, "the game oracle judges here, not the committee"),
        "oracle_prompt": ("raw", "the game oracle knows its games by their raw prompts"),
        "eval_prompts": (None, "the demo measures exact duality gaps on its own games, not held-out win rates"),
    }
    """SPPOConfig settings the demo does not use (it builds its own pi_0, prompts and oracle): any other value is
    refused before any work, with why (DemoCLI.RULES). Not rows of DemoConfig.RULES: sppo.run checks those on the
    config the demo hands it, whose model and prompts the demo has filled in."""


@dataclass
class DemoCLI(DemoConfig):
    """`python sppo_toy.py`'s config: DemoConfig whose RULES first refuse the settings the demo does not use
    (NOT_HERE; before the paths are checked, so `--prompts /nonexistent` is named as unused, not as missing), then
    DemoConfig's. Work gets a DemoConfig (as_demo_config)."""

    RULES = cli.left_out(DemoConfig.NOT_HERE, "sppo_toy.py") + DemoConfig.RULES


def as_demo_config(cfg):
    """The same settings as a DemoConfig (the config sppo.run checks and records)."""
    return DemoConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(DemoConfig)})


def check_demo(cfg):
    """Before any work of demo() and compare.lm_world: DemoCLI's checks (NOT_HERE, choices, RULES, paths), the
    CLI's, for callers from Python too. Raises cli.ConfigError naming the flag. Returns cfg as a DemoConfig."""
    cfg = as_demo_config(cfg)
    cli.check(DemoCLI(**dataclasses.asdict(cfg)))
    return cfg


def effective_eta(eta, K):
    """The Hedge step that K-sample SPPO follows: eta' = eta (K-1)/K.

    P-hat(y_k > pi_t) averages y_k's own self-term 1/2 with K-1 independent opponents (Eq. 4.5), so
    E[P-hat | y] = 1/(2K) + ((K-1)/K) P(y > pi_t), and the target eta (P-hat - 1/2) of Eq. (4.7) is, in expectation,
    eta' (P(y > pi_t) - 1/2): the Hedge step (4.1) at eta', not at eta.
    """
    return eta * (K - 1) / K


def demo_metrics(cfg, games, model_dirs):
    """For each game: exact policies pi_0..pi_T; the duality gap of the averaged model policy and of averaged Hedge
    from the model's own pi_0 (Thm 4.1), at eta' = effective_eta (`hedge_gap`, the curve the model should follow)
    and at eta (`hedge_gap_eta`); and the one-step error TV(pi_{t+1}, Hedge step from pi_t) at each (`tv`,
    `tv_eta`)."""
    oracle = GameOracle(games)
    pis = {x: [] for x in games}
    for d in model_dirs:
        model, tok = runs.load_policy(d, cfg, "cpu")
        for x, (_, ys) in games.items():
            pis[x].append(exact_policy(model, tok, x, ys))
    out = {}
    for x in games:
        Q, pi = oracle.extended(x), np.array(pis[x])                                     # (n+1, n+1), (T+1, n+1)
        last, gap = selfplay_gaps(Q, pi)                                                 # pi_t and pi-bar_t
        out[x] = {"policy": pi.tolist(), "gap": gap.tolist(), "last_gap": last.tolist(),
                  "eta_eff": effective_eta(cfg.eta, cfg.K)}
        for key, step in (("", effective_eta(cfg.eta, cfg.K)), ("_eta", cfg.eta)):
            hedge = hedge_toy.hedge_trajectory(Q, step, len(pi), pi1=pi[0])              # Eq. (4.1) from pi_0
            out[x]["hedge_gap" + key] = selfplay_gaps(Q, hedge)[1].tolist()
            out[x]["tv" + key] = [0.5 * np.abs(pi[t + 1] - hedge_toy.hedge_step(Q, pi[t], step)).sum()
                                  for t in range(len(pi) - 1)]
    return out


DEMO_CRITERION = {"shrink": 3.0, "gap_slack": 0.05, "mean_tv": 0.04}
"""The demo passes on a game when the gap of the averaged model policy ends at most 1/shrink of its start, at most
gap_slack above averaged Hedge at eta' = eta (K-1)/K, and the model's step is on average within mean_tv (total
variation) of the Hedge(eta') step from the same pi_t."""


def demo_passes(m, c=DEMO_CRITERION):
    """DEMO_CRITERION on one game's demo_metrics entry m. Returns (ok, the numbers compared, as one line)."""
    g0, g, h, tv = m["gap"][0], m["gap"][-1], m["hedge_gap"][-1], float(np.mean(m["tv"]))
    ok = g <= g0 / c["shrink"] and g <= h + c["gap_slack"] and tv <= c["mean_tv"]
    return ok, (f"gap {g0:.4f} -> {g:.4f} (<= {g0 / c['shrink']:.4f}; Hedge(eta') {h:.4f} + {c['gap_slack']}), mean TV "
                f"step to Hedge(eta') {tv:.4f} (<= {c['mean_tv']}; to Hedge(eta) {np.mean(m['tv_eta']):.4f})")


def plot_demo(metrics, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, (x, m) in zip(axes[0], metrics.items()):
        t = np.arange(len(m["gap"]))
        ax.plot(t, m["gap"], "o-", label="tiny LM, averaged policy (SPPO)")
        ax.plot(t, m["hedge_gap"], "s--", label=f"exact Hedge (4.1) at eta' = eta (K-1)/K = {m['eta_eff']:g}, averaged")
        ax.plot(t, m["hedge_gap_eta"], "-", color="C2", lw=1, alpha=0.6, label="exact Hedge at eta, averaged")
        ax.plot(t, m["last_gap"], ":", color="gray", label="tiny LM, last iterate")
        ax.set(title=f"prompt: '{x}'", xlabel="iteration t", ylabel="duality gap", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo_start(cfg, games):
    """pi_0 (OUT/pi0: the tiny policy warm-started to DEMO_START, made once) and the prompt file (`groups` copies of
    each game's prompt). Returns cfg with --model and --prompts pointing at them."""
    torch.set_num_threads(1)                     # a 16-token, hidden-32 model: thread sync costs more than it saves
    out = Path(cfg.out)
    pi0 = out / "pi0"
    if not (pi0 / "config.json").exists():
        build_tiny_policy(out / "pi0.init", seed=cfg.seed)
        model, tok = runs.load_policy(out / "pi0.init", cfg, "cpu")
        warm_start(model, tok, {x: (games[x][1], DEMO_START[x]) for x in games})
        runs.save_policy(model, tok, pi0)
        shutil.rmtree(out / "pi0.init")
    runs.write_jsonl(out / "prompts.jsonl", ({"prompt": x} for x in games for _ in range(cfg.groups)))
    return dataclasses.replace(cfg, model=str(pi0), prompts=str(out / "prompts.jsonl"))


def demo(cfg):
    """Build pi_0, run Algorithm 1 with the game oracle, print the gap table and save the plots (cfg.figure and the
    arena beside it). Returns the metrics, or None when cfg.stop_after stopped the run. Every setting is checked
    first (check_demo), before pi_0 is built."""
    cfg = check_demo(cfg)
    figure, games, out = cfg.figure, demo_games(), Path(cfg.out)
    cfg = demo_start(cfg, games)
    pi0 = Path(cfg.model)
    if sppo.run(cfg, oracle=GameOracle(games)) is None:
        return None
    dirs = [pi0] + [out / f"iter{t}" / "model" for t in range(cfg.iterations)]
    metrics = demo_metrics(cfg, games, dirs)
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=1))
    cols = ("LM gap", "H(eta')", "H(eta)", "TV step")
    print(f"eta = {cfg.eta:g}, K = {cfg.K}, eta' = eta (K-1)/K = {effective_eta(cfg.eta, cfg.K):g}. H: gap of "
          f"averaged exact Hedge from the model's pi_0; TV step: to the Hedge(eta') step from the model's pi_t")
    print(f"{'t':>3} " + " ".join(f"| {x[:18]:>18}: " + " ".join(f"{c:>7}" for c in cols) + " " for x in games))
    for t in range(cfg.iterations + 1):
        row = [(m["gap"][t], m["hedge_gap"][t], m["hedge_gap_eta"][t], m["tv"][t - 1] if t else np.nan)
               for m in metrics.values()]
        print(f"{t:>3} " + " ".join(f"| {'':>18}  " + " ".join(f"{v:7.4f}" for v in r) + " " for r in row))
    for x, m in metrics.items():
        ok, what = demo_passes(m)
        print(f"'{x}': {what}: {'yes' if ok else 'NO'}")
    plot_demo(metrics, figure)
    # Fig. 3: P(pi_s > pi_t), exact, averaged over the two games' prompts.
    ts = sorted({0, 1, 2, 3, 5, 10, cfg.iterations} & set(range(cfg.iterations + 1)))
    oracle = GameOracle(games)
    W = np.mean([arena.arena_exact(np.array(m["policy"])[ts], oracle.extended(x)) for x, m in metrics.items()], 0)
    arena_png = Path(figure).with_name(Path(figure).stem.replace("_gap", "") + "_arena.png")
    arena.plot_arena(W, [f"pi_{t}" for t in ts], arena_png, title="demo: P(row beats column), exact")
    print(f"wrote {figure}, {arena_png} and {out / 'demo_metrics.json'}")
    return metrics


def main(argv=None):
    """`python sppo_toy.py [flags]`: cli.main (a bad or unused setting: one line, exit 2, before any work)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                       # weight loading/saving bars: noise next to ours

    def go(cfg):
        t0 = time.perf_counter()
        metrics = demo(as_demo_config(cfg))
        print(f"demo finished in {time.perf_counter() - t0:.1f} s")
        return 0 if metrics is not None or cfg.stop_after else 1
    return cli.main("sppo_toy.py", DemoCLI, go, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
