"""PairRM, SPPO's preference oracle: a pairwise ranker on transformers' DeBERTa-v2, batched over all pairs.

PairRM (Jiang, Ren & Lin 2023, "LLM-Blender: Ensembling Large Language Models with Pairwise Ranking and Generative
Fusion", arXiv 2306.02561) reads a prompt x and two responses a, b in ONE sequence and outputs f(x; a, b) > 0 when
a is better. SPPO (Wu et al. 2024, arXiv 2405.00675, Sec. 5.1) uses it as the oracle of the preference game:

    P(y > y' | x) = sigma(s(y, y'; x)),        s_PairRM(y_i; x) = (1/K) sum_k s(y_i, y_k; x).

This file is the network of docs/pairrm.md on `DebertaV2Model` (no copy of the encoder), a loader for a
LOCAL folder in either published layout (llm-blender/PairRM, llm-blender/PairRM-hf; no hub, no pickle, no remote
code), and a batched evaluator: the K(K-1) ordered pairs of many prompts go through the encoder in length-sorted
batches of a token budget instead of one forward per pair, with DeBERTa's attention computed in fewer passes
(FewerPassAttention; README, "PairRM on CPU"). It imports nothing else from this repository.

Run (prints the K x K preference matrix and the scores):
    python pairrm.py --model /path/to/PairRM --prompt "hello!" --candidates "hi!" "f**k off!" "hey, how are you?"
    python pairrm.py --model /tmp/pairrm-tiny --make-tiny --prompt "hi" --candidates a b c   # random tiny weights
"""
import copy
import hashlib
import json
import math
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import DebertaV2Config, DebertaV2Model
from transformers.initialization import no_init_weights
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

import cli
import runs

PREFIX_TOKENS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")  # added tokens, in this order
SOURCE_MAXLENGTH, CANDIDATE_MAXLENGTH = 1224, 412  # llm-blender/PairRM config.json; a row has <= 1224 + 2 * 412 tokens
# Padded tokens per forward (rows x longest row); batch_tokens=None picks by device. On a 2-core CPU, 4096 was as
# fast per row as 16384 or faster (up to 2x at hidden 64: smaller attention tensors); a GPU wants large batches.
BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
PROMPTS_PER_CHUNK = 256  # prompts tokenised at a time by logit_matrices (bounds host memory for 20k-prompt runs)
MODES = ("pairwise", "official")

# microsoft/deberta-v3-large, the backbone that the ranker-style config.json of llm-blender/PairRM names by
# `model_name`; vocab_size is replaced by the checkpoint's embedding rows (128005 after resize_token_embeddings).
DEBERTA_V3_LARGE = dict(
    vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
    position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p",
    position_biased_input=False, pad_token_id=0,
)
KNOWN_BACKBONES = {"microsoft/deberta-v3-large": DEBERTA_V3_LARGE}


def default_batch_tokens(device) -> int:
    """The token budget of a batch on this device (BATCH_TOKENS)."""
    return BATCH_TOKENS.get(torch.device(device).type, BATCH_TOKENS["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# From the logit matrix M[n, i, j] = f(x_n; y_i, y_j) to scores and preference probabilities (cheap, pure functions)

def scores_from_logits(M: torch.Tensor) -> torch.Tensor:
    """s_PairRM of Sec. 5.1 as llm-blender computes it: s_i = (1/K) sum_{j != i} (M[i, j] - M[j, i]).

    M: (..., K, K), M[i, j] = f(x; y_i, y_j), diagonal 0. Returns (..., K); division by K, the self-term counted as 0.
    """
    return (M - M.transpose(-1, -2)).sum(-1) / M.shape[-1]


def preference_from_logits(M: torch.Tensor, mode: str = "pairwise") -> torch.Tensor:
    """P[..., i, j] = P(y_i > y_j | x) from M (..., K, K). P + P^T = 1 and the diagonal is 1/2 in both modes.

    "pairwise" (default, the paper, Sec. 5.1): P_ij = sigma(s(y_i, y_j; x)) with s(y_i, y_j) = f(i, j) - f(j, i), the
        relative reward of the pair itself. It may be intransitive, which is the case SPPO's game (a Nash
        equilibrium instead of a Bradley-Terry reward) is built for, and it costs no more than "official": both
        need all K(K-1) rows.
    "official" (uclaml/SPPO's released code): P_ij = sigma(s_i - s_j) from the aggregate scores; transitive by
        construction. Use it to reproduce the released pipeline's numbers.
    """
    if mode == "pairwise":
        return torch.sigmoid(M - M.transpose(-1, -2))
    if mode == "official":
        s = scores_from_logits(M)  # (..., K)
        return torch.sigmoid(s[..., :, None] - s[..., None, :])
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# Tokenised rows: each text is encoded once per role; a row is a ragged concatenation built by index arithmetic

def _pad(segments: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists with 0 into (n, L) and return it with the lengths (n,)."""
    lengths = torch.tensor([len(s) for s in segments])
    out = torch.zeros(len(segments), int(lengths.max()), dtype=torch.long)
    for k, s in enumerate(segments):
        out[k, : len(s)] = torch.tensor(s)
    return out, lengths


@dataclass
class EncodedPairs:
    """Rows [CLS]<|source|>x[SEP] [CLS]<|candidate1|>a[SEP] [CLS]<|candidate2|>b[SEP], stored as their parts."""
    src: torch.Tensor  # (N, Ls) source segments of the N prompts, right-padded
    src_len: torch.Tensor  # (N,)
    c1: torch.Tensor  # (M, L1) every candidate as candidate1, truncated to its prompt's candidate budget
    c1_len: torch.Tensor  # (M,)
    c2: torch.Tensor  # (M, L2) every candidate as candidate2
    c2_len: torch.Tensor  # (M,)
    rows: torch.Tensor  # (R, 3) row r = (prompt n, candidate index of a, candidate index of b) into the flat list

    def lengths(self) -> torch.Tensor:  # (R,) tokens in each row
        n, a, b = self.rows.unbind(1)
        return self.src_len[n] + self.c1_len[a] + self.c2_len[b]

    def take(self, idx: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows idx as input_ids (B, T), attention_mask (B, T) and prefix-token positions (B, 3), right-padded."""
        n, a, b = self.rows[idx].unbind(1)
        parts = [(self.src[n], self.src_len[n]), (self.c1[a], self.c1_len[a]), (self.c2[b], self.c2_len[b])]
        T = int(sum(length for _, length in parts).max())
        t = torch.arange(T)[None]  # (1, T)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # (B, T)
        start = torch.zeros(len(idx), dtype=torch.long)  # (B,) where the current segment begins
        positions = []
        for seg, seg_len in parts:
            u = t - start[:, None]  # (B, T) offset inside this segment
            inside = (u >= 0) & (u < seg_len[:, None])
            ids = torch.where(inside, seg.gather(1, u.clamp(0, seg.shape[1] - 1)), ids)
            positions.append(start + 1)  # the prefix token follows the segment's [CLS]
            start = start + seg_len
        return ids, (t < start[:, None]).long(), torch.stack(positions, 1)


def _ordered_pairs(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The R = N K(K-1) ordered pairs i != j of N prompts with K candidates each, prompt by prompt: (prompt n, i, j)
    (R,) each, and the rows (R, 3) = (n, flat index of y_i, flat index of y_j) that PairRM.encode takes."""
    i, j = (~torch.eye(K, dtype=torch.bool)).nonzero().unbind(1)  # (K(K-1),) each
    n, i, j = torch.arange(N).repeat_interleave(len(i)), i.repeat(N), j.repeat(N)
    return n, i, j, torch.stack([n, n * K + i, n * K + j], 1)


def _length_batches(lengths: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    """Row indices sorted longest first, cut so that rows x longest row <= batch_tokens (at least one row each)."""
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_len, batches, start = lengths[order].tolist(), [], 0
    while start < len(order):
        size = max(1, batch_tokens // sorted_len[start])  # the first row of a batch is its longest
        batches.append(order[start : start + size])
        start += size
    return batches


# ----------------------------------------------------------------------------------------------------------------
# The network (docs/pairrm.md, "The network")

class FewerPassAttention(DisentangledSelfAttention):
    """DeBERTa's disentangled self-attention (He et al. 2021, arXiv 2006.03654, Eq. 4), the same weights and sums as
    transformers' DisentangledSelfAttention in fewer passes over the (B, h, T, T) scores, which dominate at PairRM's
    row lengths on a CPU (README, "PairRM on CPU"). With s = sqrt(3 d) and delta(i, j) the bucketed i - j:

        A[i, j] = q_i.k_j / s + q_i.kr[delta(i, j)] / s + k_j.qr[delta(j, i)] / s    (content, c2p, p2c)

    transformers repeats the relative projections kr, qr once per row and head, divides each (B, h, T, T) term by s
    and masks and soft-maxes in separate passes. Here q and k are divided by s before their (B, h, T, d) products,
    kr and qr broadcast and keep only the distances that occur in T tokens, a padded key's p2c row is -inf before
    the gather (so no separate mask pass), and SDPA adds the content term and soft-maxes in one kernel. Only the
    order of fp32 roundings differs (tests/test_pairrm.py::test_fewer_pass_attention_equals_transformers).
    Dropout is not applied (eval only); anything else (training, attention maps) runs transformers' forward."""

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                rel_embeddings=None):
        if (self.training or output_attentions or query_states is not None or relative_pos is None
                or {"c2p", "p2c"} - set(self.pos_att_type)):
            return super().forward(hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                                   rel_embeddings)
        B, T, _ = hidden_states.shape
        heads = lambda x: x.view(*x.shape[:-1], self.num_attention_heads, -1).transpose(-3, -2)  # noqa: E731
        q, k, v = (heads(proj(hidden_states)) for proj in (self.query_proj, self.key_proj, self.value_proj))
        s = math.sqrt(3 * q.shape[-1])  # (B, h, T, d) each; 3 terms: content, c2p, p2c
        span = self.pos_ebd_size
        delta = relative_pos.reshape(T, T)  # bucketed i - j
        c2p_pos, p2c_pos = (torch.clamp(span + d, 0, 2 * span - 1) for d in (delta, -delta))  # (T, T)
        lo, hi = int(c2p_pos.min()), int(c2p_pos.max()) + 1  # the relative embeddings T tokens use
        rel = rel_embeddings[lo:hi]
        kr, qr = (heads(proj(rel)) for proj in ((self.key_proj, self.query_proj) if self.share_att_key
                                               else (self.pos_key_proj, self.pos_query_proj)))  # (h, R, d)
        key_pad = ~attention_mask.diagonal(dim1=-2, dim2=-1).bool()[..., None]  # (B, 1, T, 1): diagonal = key mask
        bias = torch.matmul(q / s, kr.transpose(-1, -2)).gather(-1, (c2p_pos - lo).expand(B, *q.shape[1:3], T))
        p2c = torch.matmul(k / s, qr.transpose(-1, -2)).masked_fill_(key_pad, float("-inf"))  # (B, h, T_key, R)
        bias += p2c.gather(-1, (p2c_pos - lo).expand(B, *q.shape[1:3], T)).transpose(-1, -2)  # (B, h, T, T)
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / s)
        return context.transpose(1, 2).reshape(B, T, -1), None


def transformers_attention(model: "PairRM") -> "PairRM":
    """A copy of model whose layers run transformers' own DisentangledSelfAttention.forward (same weights): the
    reference FewerPassAttention is tested and benchmarked against."""
    ref = copy.deepcopy(model)
    for layer in ref.pretrained_model.encoder.layer:
        layer.attention.self.__class__ = DisentangledSelfAttention
    return ref


class PairRM(nn.Module):
    """f(x; a, b) = head([h_src ; h_c1]) - head([h_src ; h_c2]) on DeBERTa's last layer; f > 0 prefers a."""

    def __init__(self, config: DebertaV2Config, tokenizer: Tokenizer, cls_token="[CLS]", sep_token="[SEP]",
                 pad_token="[PAD]", source_maxlength=SOURCE_MAXLENGTH, candidate_maxlength=CANDIDATE_MAXLENGTH,
                 n_tasks=1, drop_out=0.05):
        super().__init__()
        self.pretrained_model = DebertaV2Model(config)  # attribute names give the checkpoint's key prefixes
        for layer in self.pretrained_model.encoder.layer:  # same parameters, fewer passes (FewerPassAttention)
            layer.attention.self.__class__ = FewerPassAttention
        H = config.hidden_size
        self.head_layer = nn.Sequential(nn.Dropout(drop_out), nn.Linear(2 * H, H), nn.Tanh(), nn.Dropout(drop_out),
                                        nn.Linear(H, n_tasks))  # weights head_layer.1.*, head_layer.4.*
        self.tokenizer, self.sep_token = tokenizer, sep_token
        self.source_maxlength, self.candidate_maxlength = source_maxlength, candidate_maxlength
        # Every id comes from the tokenizer (128001.. in the real checkpoint, small numbers in a tiny one).
        ids = {t: tokenizer.token_to_id(t) for t in (cls_token, sep_token, pad_token, *PREFIX_TOKENS)}
        for token, i in ids.items():
            if i is None or i >= config.vocab_size:
                raise ValueError(f"tokenizer.json: token {token!r} has id {i}, "
                                 f"the embedding has {config.vocab_size} rows")
        for field, token in zip(("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id"),
                                PREFIX_TOKENS):
            if getattr(config, field, None) not in (None, ids[token]):  # PairRM-hf's config.json repeats the ids
                raise ValueError(f"config.json: {field} = {getattr(config, field)} but tokenizer.json gives "
                                 f"{token!r} the id {ids[token]}")
        self.cls_id, self.sep_id, self.pad_id = ids[cls_token], ids[sep_token], ids[pad_token]
        self.prefix_ids = [ids[t] for t in PREFIX_TOKENS]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, T), right-padded; positions (B, 3) of <|source|>, <|candidate1|>,
        <|candidate2|> in each row. Returns f(x; a, b) (B,), the mean over the head's n_tasks outputs."""
        T = int(attention_mask.sum(1).max())  # right padding: the columns from T on are padding in every row
        input_ids, attention_mask = input_ids[:, :T], attention_mask[:, :T]
        h = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        h = h.gather(1, positions[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, 3, H)
        h_src, h_c1, h_c2 = h.unbind(1)  # (B, H) each
        left = self.head_layer(torch.cat([h_src, h_c1], -1))  # (B, n_tasks)
        right = self.head_layer(torch.cat([h_src, h_c2], -1))  # (B, n_tasks)
        return (left - right).mean(-1)

    # ---- tokenisation (docs/pairrm.md, "Tokens and row layout") ----
    def _segments(self, texts: list[str], prefix: str, max_lens: list[int]) -> list[list[int]]:
        """[CLS] prefix text [SEP] per text; a literal [SEP] in the text becomes a space; the text is cut to
        max_lens[k] tokens in all, keeping its beginning (the tokenizer's own truncation of prefix + text)."""
        texts = [prefix + t.replace(self.sep_token, " ") for t in texts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [[self.cls_id] + e.ids[: m - 2] + [self.sep_id] for e, m in zip(encodings, max_lens)]

    def encode(self, prompts: list[str], candidates: list[list[str]], rows: torch.Tensor) -> EncodedPairs:
        """Tokenise prompts (N) and their candidates (N lists) once; rows (R, 3) = (n, i, j) with i, j indices
        into the flat list of all candidates (candidates[0] + candidates[1] + ...)."""
        src = self._segments(prompts, PREFIX_TOKENS[0], [self.source_maxlength] * len(prompts))
        budget = [self.candidate_maxlength + (self.source_maxlength - len(s)) // 2 for s in src]  # spec's rule
        flat = [c for cs in candidates for c in cs]
        flat_budget = [budget[n] for n, cs in enumerate(candidates) for _ in cs]
        c1 = self._segments(flat, PREFIX_TOKENS[1], flat_budget)
        c2 = self._segments(flat, PREFIX_TOKENS[2], flat_budget)
        return EncodedPairs(*_pad(src), *_pad(c1), *_pad(c2), rows=rows)

    @torch.inference_mode()
    def _run(self, enc: EncodedPairs, batch_tokens: int | None, bar=None) -> torch.Tensor:
        """f for every row of enc (R,), float32 on CPU, in length-sorted batches of <= batch_tokens padded tokens."""
        device = next(self.parameters()).device
        batch_tokens = batch_tokens or default_batch_tokens(device)
        out = torch.empty(len(enc.rows))
        for idx in _length_batches(enc.lengths(), batch_tokens):
            ids, mask, pos = (x.to(device) for x in enc.take(idx, self.pad_id))
            out[idx] = self(ids, mask, pos).float().cpu()
            if bar is not None:
                bar.update(len(idx))
        return out

    # ---- public API ----
    def pair_logits(self, prompts: list[str], cands_a: list[str], cands_b: list[str],
                    batch_tokens: int | None = None) -> torch.Tensor:
        """f(x; a, b) (N,) for one order: the number published with the checkpoint."""
        _check_same_length(prompts, cands_a, cands_b)
        N = len(prompts)
        rows = torch.stack([torch.arange(N), 2 * torch.arange(N), 2 * torch.arange(N) + 1], 1)  # (N, 3)
        return self._run(self.encode(prompts, [[a, b] for a, b in zip(cands_a, cands_b)], rows), batch_tokens)

    def compare(self, prompts: list[str], cands_a: list[str], cands_b: list[str],
                batch_tokens: int | None = None) -> torch.Tensor:
        """compare(a, b) = f(x; a, b) - f(x; b, a) (N,), both orders in the same batches; = -compare(b, a)."""
        _check_same_length(prompts, cands_a, cands_b)
        n, N = torch.arange(len(prompts)), len(prompts)
        rows = torch.cat([torch.stack([n, 2 * n, 2 * n + 1], 1), torch.stack([n, 2 * n + 1, 2 * n], 1)])  # (2N, 3)
        f = self._run(self.encode(prompts, [[a, b] for a, b in zip(cands_a, cands_b)], rows), batch_tokens)
        return f[:N] - f[N:]

    def logit_matrices(self, prompts: list[str], candidates: list[list[str]], batch_tokens: int | None = None,
                       progress: bool = False) -> torch.Tensor:
        """M (N, K, K) float32 on CPU: M[n, i, j] = f(x_n; y_i, y_j) for all K(K-1) ordered pairs, diagonal 0."""
        K = _check_candidates(prompts, candidates)
        M = torch.zeros(len(prompts), K, K)
        with tqdm(total=len(prompts) * K * (K - 1), desc="PairRM pairs", disable=not progress) as bar:
            for s in range(0, len(prompts), PROMPTS_PER_CHUNK):
                chunk = prompts[s : s + PROMPTS_PER_CHUNK]
                n, ii, jj, rows = _ordered_pairs(len(chunk), K)  # (R,) each, (R, 3)
                enc = self.encode(chunk, candidates[s : s + PROMPTS_PER_CHUNK], rows)
                M[s + n, ii, jj] = self._run(enc, batch_tokens, bar)
        return M

    def pair_lengths(self, prompts: list[str], candidates: list[list[str]]) -> torch.Tensor:
        """Tokens in each row logit_matrices runs (R,) = (N K(K-1),): the work a FLOP count needs (bench.py)."""
        K = _check_candidates(prompts, candidates)
        return self.encode(prompts, candidates, _ordered_pairs(len(prompts), K)[3]).lengths()

    def preference_matrices(self, prompts: list[str], candidates: list[list[str]], mode: str = "pairwise",
                            batch_tokens: int | None = None, progress: bool = False) -> torch.Tensor:
        """P (N, K, K) float32 on CPU, P[n, i, j] = P(y_i > y_j | x_n); see preference_from_logits for the modes."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return preference_from_logits(self.logit_matrices(prompts, candidates, batch_tokens, progress), mode)

    def preference_matrix(self, prompt: str, candidates: list[str], mode: str = "pairwise",
                          batch_tokens: int | None = None) -> torch.Tensor:
        """P (K, K) for one prompt: the N = 1 case of preference_matrices."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__} {prompt!r:.80}")
        return self.preference_matrices([prompt], [candidates], mode, batch_tokens)[0]

    def scores(self, prompts: list[str], candidates: list[list[str]], batch_tokens: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """s_PairRM (N, K) (Sec. 5.1); SPPO's winner / loser are its argmax / argmin."""
        return scores_from_logits(self.logit_matrices(prompts, candidates, batch_tokens, progress))

    def best_of_n(self, prompts: list[str], candidates: list[list[str]], batch_tokens: int | None = None) -> list[int]:
        """Index of the best candidate of each prompt by s_PairRM (the best-of-16 rows of SPPO's Table 1)."""
        return self.scores(prompts, candidates, batch_tokens).argmax(-1).tolist()

    # ---- loading (docs/pairrm.md, "Checkpoint layouts") ----
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "PairRM":
        """Load a LOCAL folder in the llm-blender/PairRM or llm-blender/PairRM-hf layout, strictly.
        device: default cuda if available, else cpu. dtype: default float16 on GPU (as llm-blender), float32 on CPU."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointFileMissing(f"{path}: no such folder (expected a local PairRM checkpoint folder)")
        missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).is_file()]
        missing += [] if any((path / w).is_file() for w in WEIGHT_FILES) else [" (or ".join(WEIGHT_FILES) + ")"]
        if missing:
            raise CheckpointFileMissing(f"{path} is not a PairRM checkpoint: missing {', '.join(missing)}")
        cfg = _read_json(path / "config.json")
        config = _backbone_config(cfg, path)
        state, weights_file = _load_state_dict(path)
        embedding = state.get("pretrained_model.embeddings.word_embeddings.weight")
        if embedding is not None:
            config.vocab_size = embedding.shape[0]  # the rows after llm-blender's resize_token_embeddings
        tokenizer, special = _load_tokenizer(path)
        with no_init_weights():  # every weight comes from the checkpoint: skip the 0.4B random init
            model = cls(config, tokenizer, **special, n_tasks=cfg.get("n_tasks", 1), drop_out=cfg.get("drop_out", 0.05),
                        source_maxlength=cfg.get("source_maxlength", SOURCE_MAXLENGTH),
                        candidate_maxlength=cfg.get("candidate_maxlength", CANDIDATE_MAXLENGTH))
        expected = set(model.state_dict())
        stale = {name for name, _ in model.named_buffers()} - expected  # non-persistent buffers (position_ids)
        state = {k: v for k, v in state.items() if k not in stale}  # old transformers saved them; they are recomputed
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise KeyError(f"{weights_file}: keys do not match the PairRM network; missing: {missing}; "
                           f"unexpected: {unexpected}")
        model.load_state_dict(state, strict=True, assign=True)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class PairRMOracle:
    """SPPO's oracle slot: oracle(prompt, responses) -> P (K, K) with P[i, j] = P(y_i > y_j | x);
    oracle.batch(prompts, candidates) -> (N, K, K) packs the pairs of all prompts into the same batches."""

    def __init__(self, model: PairRM, mode: str = "pairwise", batch_tokens: int | None = None, progress=False,
                 checkpoint_id: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode, self.batch_tokens, self.progress = model, mode, batch_tokens, progress
        self.checkpoint_id = checkpoint_id

    def identity(self) -> dict:
        """What a run manifest records of this oracle (sppo.Oracle): the checkpoint's hash (checkpoint_id, as the
        caller hashed its folder; else a sha256 of the weights in memory) and the mode."""
        if self.checkpoint_id is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode() + t.detach().cpu().float().numpy().tobytes())
            self.checkpoint_id = h.hexdigest()
        return self.identity_of(self.checkpoint_id, self.mode)

    @staticmethod
    def identity_of(checkpoint_id, mode):
        """The identity of a PairRM oracle from its checkpoint's hash and mode, known before the weights are loaded
        (train_7b.py checks its run directory before the process group)."""
        return {"pairrm": checkpoint_id, "mode": mode}

    def __call__(self, prompt: str, responses: list[str]) -> torch.Tensor:
        return self.model.preference_matrix(prompt, responses, self.mode, self.batch_tokens)

    def batch(self, prompts: list[str], candidates: list[list[str]]) -> torch.Tensor:
        return self.model.preference_matrices(prompts, candidates, self.mode, self.batch_tokens, self.progress)

    def batch_with_logits(self, prompts: list[str], candidates: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, M), each (N, K, K): the preferences and the logits f(x; y_i, y_j) they come from, so that SPPO picks
        its pair on s_PairRM = scores_from_logits(M) (Sec. 5.1), not on P's row means."""
        M = self.model.logit_matrices(prompts, candidates, self.batch_tokens, self.progress)
        return preference_from_logits(M, self.mode), M


# ----------------------------------------------------------------------------------------------------------------
# Input checks and checkpoint files

def _check_texts(name: str, texts) -> None:
    """A ValueError naming `name` unless texts is a list (or tuple, ...) of strings: a string is not a list of its
    characters, and None or a number is not a text."""
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__"):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__} {texts!r:.80}")
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{k}] must be a string, got {type(t).__name__} {t!r:.80}")


def _check_same_length(prompts, cands_a, cands_b):
    """compare's and pair_logits' inputs: three lists of strings, one a and one b per prompt, at least one prompt."""
    for name, texts in (("prompts", prompts), ("cands_a", cands_a), ("cands_b", cands_b)):
        _check_texts(name, texts)
    if not len(prompts) == len(cands_a) == len(cands_b):
        raise ValueError(f"need one candidate a and one b per prompt, got {len(prompts)} prompts, "
                         f"{len(cands_a)} a and {len(cands_b)} b")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: need at least one prompt")


def _check_candidates(prompts: list[str], candidates: list[list[str]]) -> int:
    """K, the number of candidates per prompt: at least 2 and the same for every prompt, at least one prompt, every
    prompt and candidate a string. Empty strings count."""
    _check_texts("prompts", prompts)
    if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__"):
        raise ValueError(f"candidates must be a list of lists of strings, got {type(candidates).__name__} "
                         f"{candidates!r:.80}")
    if len(prompts) != len(candidates):
        raise ValueError(f"need one list of candidates per prompt, got {len(prompts)} prompts and "
                         f"{len(candidates)} lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: need at least one prompt")
    for n, cs in enumerate(candidates):
        _check_texts(f"candidates[{n}]", cs)
        if len(cs) < 2:
            raise ValueError(f"prompt {n}: a preference needs at least 2 candidates, got {len(cs)}")
        if len(cs) != len(candidates[0]):
            raise ValueError(f"prompt {n} has {len(cs)} candidates but prompt 0 has {len(candidates[0])}; "
                             "all prompts need the same K")
    return len(candidates[0])


def _read_json(file: Path) -> dict:
    """The JSON object in file, or a ValueError naming the file: not UTF-8 JSON, or not an object {...}."""
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a JSON object {{...}}, got {type(obj).__name__} {obj!r:.80}")
    return obj


def _backbone_config(cfg: dict, path: Path) -> DebertaV2Config:
    """The DeBERTa-v2 config of either layout: PairRM-hf's config.json is one; PairRM's ranker config names it."""
    if "DebertaV2PairRM" in cfg.get("architectures", []):
        return DebertaV2Config.from_dict(cfg)
    if "model_name" in cfg:  # llm-blender ranker layout (RankerConfig)
        if cfg.get("ranker_type", "pairranker") != "pairranker":
            raise ValueError(f"{path / 'config.json'}: ranker_type {cfg['ranker_type']!r}, expected 'pairranker'")
        name = cfg["model_name"]
        if name in KNOWN_BACKBONES:
            return DebertaV2Config(**KNOWN_BACKBONES[name])
        local = path / name  # a local backbone folder, relative to the checkpoint (or absolute)
        if (local / "config.json").is_file():
            return DebertaV2Config.from_dict(_read_json(local / "config.json"))
        raise FileNotFoundError(f"{path / 'config.json'}: model_name {name!r} is neither one of "
                                f"{sorted(KNOWN_BACKBONES)} nor a local folder with a config.json")
    raise ValueError(f"{path / 'config.json'} is not a PairRM config: expected architectures ['DebertaV2PairRM'] "
                     "(PairRM-hf layout) or a 'model_name' field (PairRM ranker layout)")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights of a checkpoint folder, in the order they are looked for."""


class CheckpointFileMissing(cli.ArtifactError, FileNotFoundError):
    """A checkpoint folder without a file it needs; the message names the folder and every missing file. Both a
    FileNotFoundError and cli.ArtifactError: the CLIs print it as one line and exit 2."""


def _load_state_dict(path: Path) -> tuple[dict, Path]:
    """model.safetensors, else pytorch_model.bin read with weights_only=True. A pickled config.bin is never read."""
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"), device="cpu"), path / "model.safetensors"
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True), path / "pytorch_model.bin"
    raise CheckpointFileMissing(f"{path} is not a PairRM checkpoint: missing model.safetensors (or pytorch_model.bin)")


def _load_tokenizer(path: Path) -> tuple[Tokenizer, dict]:
    """tokenizer.json as saved (the fast tokenizer llm-blender ran), the four added tokens checked or added (as
    llm-blender's collator does: appended in order), and the [CLS]/[SEP]/[PAD] names from tokenizer_config.json."""
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception, without the file's name
        raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizers file ({e})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.add_tokens([t for t in PREFIX_TOKENS if tokenizer.token_to_id(t) is None])
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    if (path / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(path / "tokenizer_config.json")
        for key in special:
            value = tok_cfg.get(key) or special[key]
            special[key] = value["content"] if isinstance(value, dict) else value
    return tokenizer, special


# ----------------------------------------------------------------------------------------------------------------
# A tiny random checkpoint in either published layout (tests, benchmarks, demos without the real weights)

_TINY_TEXT = """Self-play preference optimization trains a language model against itself.
A preference model reads a prompt and two answers and says which answer is better.
Hello! How are you today? I am fine, thank you. I love you, too! I hate you. Please go away.
Write a short poem about the sea. The sea is blue and the waves are high.
Explain why the sky is blue in one sentence. Sunlight is scattered by the air, and blue light scatters most.
What is the capital of France? The capital of France is Paris. It is a large city on the river Seine.
Give me three tips for better sleep: keep a regular schedule, avoid screens at night, and exercise.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."""


def _tiny_tokenizer():
    """A Unigram tokenizer estimated here on _TINY_TEXT: every word is a piece scored by its log frequency, every
    ASCII character a rare fallback piece. DeBERTa-v3's layout: [PAD] [CLS] [SEP] [UNK] first, [MASK] after the
    vocabulary, then the four added tokens. Built as transformers' DebertaV2Tokenizer so that AutoTokenizer loads it.
    (tokenizers' UnigramTrainer, on so little text, returns near-character pieces in a run-dependent order.)"""
    from transformers import DebertaV2Tokenizer
    words = Counter("\u2581" + w for w in re.findall(r"\w+", _TINY_TEXT))  # "\u2581" marks a word start (Metaspace)
    total = sum(words.values())
    vocab = [(s, 0.0) for s in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")]
    vocab += [(w, math.log(c / total)) for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))]
    fallback = "\u2581" + string.ascii_letters + string.digits + string.punctuation
    vocab += [(ch, math.log(1e-4 / total)) for ch in fallback]
    tokenizer = DebertaV2Tokenizer(vocab=vocab)  # [MASK] is not in vocab: it is added after it, like id 128000
    tokenizer.add_tokens(list(PREFIX_TOKENS))
    return tokenizer


def save_tiny_random_checkpoint(out_dir, layout: str = "PairRM-hf", seed: int = 0, **config_overrides) -> str:
    """Write a random PairRM with a tiny DeBERTa-v2 backbone to out_dir, laid out like the released checkpoint:
    "PairRM-hf": DeBERTa-v2 config.json with architectures ["DebertaV2PairRM"] and the prefix ids;
    "PairRM": llm-blender's ranker config.json whose model_name names the backbone folder "backbone" (a local
    stand-in for microsoft/deberta-v3-large). Both: model.safetensors (pretrained_model.*, head_layer.*) and the
    tokenizer files. config_overrides replace DeBERTa fields (hidden_size=64, ...). Returns out_dir.
    out_dir must be new or empty: random weights never overwrite a checkpoint (FileExistsError otherwise)."""
    if layout not in ("PairRM-hf", "PairRM"):
        raise ValueError(f"layout must be 'PairRM-hf' or 'PairRM', got {layout!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder: a tiny RANDOM checkpoint is only written to a new or "
                              "empty one (it would overwrite what is there)")
    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = _tiny_tokenizer()
    backbone = {**DEBERTA_V3_LARGE, "vocab_size": len(hf_tokenizer), "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 64, "position_buckets": 32, "initializer_range": 0.1,
                **config_overrides}
    torch.manual_seed(seed)
    model = PairRM(DebertaV2Config(**backbone), hf_tokenizer.backend_tokenizer)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    hf_tokenizer.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json
    added = {t: hf_tokenizer.convert_tokens_to_ids(t) for t in ("[MASK]", *PREFIX_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: getattr(hf_tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                               "cls_token", "mask_token")}, indent=2))
    if layout == "PairRM-hf":
        ids = dict(zip(("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id"),
                       model.prefix_ids))
        DebertaV2Config(**backbone, **ids, architectures=["DebertaV2PairRM"], n_tasks=1, drop_out=0.05
                        ).save_pretrained(str(out))
    else:
        DebertaV2Config(**backbone).save_pretrained(str(out / "backbone"))
        ranker = dict(ranker_type="pairranker", model_type="deberta", model_name="backbone", cache_dir=None,
                      load_checkpoint=None, source_maxlength=SOURCE_MAXLENGTH, candidate_maxlength=CANDIDATE_MAXLENGTH,
                      n_tasks=1, num_pos=5, num_neg=5, sub_sampling_mode="all_pair", sub_sampling_ratio=0.4,
                      loss_type="instructgpt", reduce_type="linear", inference_mode="bubble", drop_out=0.05, fp16=True)
        (out / "config.json").write_text(json.dumps(ranker, indent=2))
    return str(out)


# ----------------------------------------------------------------------------------------------------------------
# CLI: a quick look at one prompt

@dataclass
class CLIConfig:
    """`python pairrm.py`'s settings (cli.py's convention: one field = one flag; RULES checked before any work)."""

    model: str = cli.arg(help="local folder of llm-blender/PairRM or llm-blender/PairRM-hf (with --make-tiny: a new "
                              "or empty folder to write a tiny RANDOM checkpoint to first)")
    prompt: str = cli.arg(help="the prompt x")
    candidates: list[str] = cli.arg(help="K >= 2 responses (empty strings allowed)")
    mode: str = cli.arg("pairwise", choices=MODES, help="pairwise = sigma(f(i,j) - f(j,i)) (paper, Sec. 5.1); "
                                                        "official = sigma(s_i - s_j) (released SPPO code)")
    device: str | None = cli.arg(None, help="cpu, cuda, ... (None: cuda if available)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = cli.arg(None, help="None: fp16 on GPU, fp32 on CPU")
    make_tiny: bool = cli.arg(False, help="first write a tiny RANDOM checkpoint to --model (a new or empty folder)")

    RULES = (
        ("candidates", lambda c: len(c.candidates) >= 2, "at least 2 candidates: a preference needs a pair"),
        ("device",     lambda c: c.device is None or runs.device_available(c.device),
                                                         "cpu, or a torch device this machine has (cuda needs a GPU)"),
    )


def preference_report(cfg: CLIConfig) -> int:
    """The CLI's work: (--make-tiny: write the checkpoint,) load it, print P, the scores and the best candidate."""
    cli.check_path("model", cfg.model, "out_dir" if cfg.make_tiny else "dir")
    if cfg.make_tiny:
        try:
            save_tiny_random_checkpoint(cfg.model)
        except FileExistsError as e:
            raise cli.ArtifactError(f"--model {e}") from None
    try:
        model = PairRM.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype)
    except (ValueError, KeyError, FileNotFoundError) as e:             # each names the file and what is wrong in it
        if isinstance(e, cli.ArtifactError):
            raise
        raise cli.ArtifactError(f"--model {cfg.model}: {e.args[0] if e.args else e}") from None
    M = model.logit_matrices([cfg.prompt], [cfg.candidates])  # (1, K, K)
    P, s = preference_from_logits(M, cfg.mode)[0], scores_from_logits(M)[0]  # (K, K), (K,)
    K = len(cfg.candidates)
    print(f"P[i, j] = P(y_i > y_j | x), mode={cfg.mode}")
    print("      " + "".join(f"{f'y{j}':>8}" for j in range(K)))
    for i in range(K):
        print(f"{f'y{i}':<6}" + "".join(f"{P[i, j].item():8.4f}" for j in range(K)))
    print("s_PairRM: " + "  ".join(f"y{i}={s[i].item():+.4f}" for i in range(K)))
    best = int(s.argmax())
    print(f"best: y{best} = {cfg.candidates[best]!r}")
    return 0


def main(argv=None):
    """`python pairrm.py --model DIR --prompt X --candidates A B ...`: cli.main (one line and exit 2 on a bad
    setting or checkpoint)."""
    return cli.main("pairrm.py", CLIConfig, preference_report, argv,
                    "PairRM preference matrix of K candidates for one prompt.")


if __name__ == "__main__":
    sys.exit(main())
