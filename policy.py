"""The policy pi as a causal LM: what goes in and what comes out, the same for every program here.

Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675 (Algorithm 1).
In: x through the tokenizer's chat template, y as the token ids that were sampled, both cut to the training lengths
(truncate: ours, or the authors' released rule), padded into batches. Out: samples y ~ pi(.|x) (step 1 of
Algorithm 1, under one seeding rule, sample_seed) and log pi(y|x) (sequence_logps), the quantity every loss of
sppo.py is written in. Convention (sppo.py's docstring states them all): log pi(y|x) is SUMMED over the response
tokens of y (the sampled ids, and the sampled stop token when the response ended); prompt and padding never count.
"""
from __future__ import annotations

import copy

import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------------
# Tokens: x through the chat template, y as sampled (with its stop token when it finished), both cut to the
# training lengths.
def pad_id(tokenizer):
    """The padding id: the tokenizer's pad token, else its EOS (models without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_prompt(tokenizer, prompt):
    """The prompt as text through the tokenizer's chat template, up to the assistant's turn (the policy's x)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, prompt):
    """Token ids of the prompt, through the tokenizer's chat template when it has one (Algorithm 1: x ~ X)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def truncate(group, max_length, max_prompt_length, rule="ours"):
    """Cut the (prompt_ids, response_ids) of one group - a prompt's winner and loser (selection=pair), or one row -
    to the training lengths. Returns [(prompt_ids, response_ids, truncated)].

    ours: each prompt keeps its LAST max_prompt_length tokens, each response its first max_length - len(prompt).
    released (uclaml/SPPO, sppo/trainer.py, SPPOTrainer.tokenize_row, truncation_mode keep_end): with L the longer
        response of the group, a prompt is cut to its last max_prompt_length tokens only when len(prompt) + L >
        max_length; then, if len(prompt) + L is still > max_length, EVERY response of the group is cut to its first
        max_length - max_prompt_length tokens (so a short response can lose its end too, and a sequence may stay
        shorter than max_length).
    """
    if rule not in ("ours", "released"):
        raise ValueError(f"truncation must be 'ours' or 'released', got {rule!r}")
    longer, out = max(len(r) for _, r in group), []
    for p, r in group:
        if rule == "ours":
            p_cut = p[-max_prompt_length:]
            r_cut = r[:max_length - len(p_cut)]
        else:
            p_cut = p[-max_prompt_length:] if len(p) + longer > max_length else p
            r_cut = r[:max_length - max_prompt_length] if len(p_cut) + longer > max_length else r
        out.append((p_cut, r_cut, len(p_cut) < len(p) or len(r_cut) < len(r)))
    return out


def response_tokens(tokenizer, row, rule="ours"):
    """y's token ids: the sampled ids (row['response_ids']) when the row has them, else its text tokenised; then the
    sampled stop id (else the tokenizer's EOS) when it finished. rule='released' appends EOS to unfinished responses
    too, as the authors' trainer appends it to every response (sppo/trainer.py, tokenize_row)."""
    ids = row.get("response_ids")
    ids = list(ids) if ids is not None else tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    stop = row.get("stop_id") if row["finished"] and row.get("stop_id") is not None else tokenizer.eos_token_id
    return ids + ([stop] if row["finished"] or rule == "released" else [])


def encode_example(tokenizer, prompt, response, finished, max_length, max_prompt_length):
    """(prompt_ids, response_ids, truncated) of one text response under the `ours` rule (truncate): y's tokens are
    the response's, plus EOS when it finished. `truncated` says whether either was cut, so callers can count it."""
    row = {"response": response, "finished": finished}
    return truncate([(prompt_ids(tokenizer, prompt), response_tokens(tokenizer, row))], max_length,
                    max_prompt_length)[0]


# ----------------------------------------------------------------------------------------------------------------
# Batches: (prompt_ids, response_ids) pairs padded left (generation) or right (training).
def pad_multiple(device):
    """Training batches are padded to a multiple of 64 tokens on CUDA, exactly on CPU. cuDNN's attention builds a plan
    for every new (B, T): on an H200 (1.1 B model, micro-batch 8, lengths 1-1000) steps took 1.2 s with 2.3 s spikes
    at new lengths, 0.86 s with T rounded up to 64 (docs/train_7b.md, "train_7b.py on a GPU"). Padding is masked out."""
    return 64 if torch.device(device).type == "cuda" else 1


def collate(pairs, pad, padding_side="right", multiple=1, packed=False):
    """Pack (prompt_ids, response_ids) pairs into input_ids, attention_mask, response_mask, each (B, T); T is the
    longest pair rounded up to `multiple` (pad_multiple).

    packed=True: padding-free, all rows in ONE sequence (1, sum of lengths), with cu_seq_lens (B + 1,), the rows'
    boundaries (flash-attention's varlen convention); sequence_logps then restarts the position ids at each row and
    the attention keeps each row to itself (use_packed_attention)."""
    if packed:
        ids = torch.tensor([t for p, r in pairs for t in p + r], dtype=torch.long)[None]            # (1, T)
        resp = torch.tensor([k >= len(p) for p, r in pairs for k in range(len(p) + len(r))], dtype=torch.long)[None]
        cu = torch.tensor([0] + [len(p) + len(r) for p, r in pairs]).cumsum(0)                     # (B + 1,)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp, "cu_seq_lens": cu}
    T = -(-max(len(p) + len(r) for p, r in pairs) // multiple) * multiple
    ids = torch.full((len(pairs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(pairs), T), dtype=torch.long)
    resp = torch.zeros((len(pairs), T), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        s = 0 if padding_side == "right" else T - n
        ids[i, s:s + n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, s:s + n] = 1
        resp[i, s + len(p):s + n] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


# ----------------------------------------------------------------------------------------------------------------
# Padding-free batches: rows packed into one sequence, each attending to itself only.
PACKED = "sppo_packed"
"""The attention implementation of packed batches (use_packed_attention): SDPA, one causal call per row."""


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     sliding_window=None, **kwargs):
    """Attention for a model set to PACKED. Without cu_seq_lens_q: transformers' SDPA, unchanged. With it (a packed
    batch, collate(packed=True)): query (1, H, T, d_head), key and value (1, H_kv, T, d_head) hold the rows one after
    another; each row gets its own causal SDPA call, so no row sees another and no mask or padding is built (on CPU
    the block-diagonal mask transformers would build is dense: it costs (sum T_i)^2, this costs sum T_i^2 / 2).
    Returns (1, T, H, d_head), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    if sliding_window is not None and max(b - a for a, b in zip(bounds, bounds[1:])) > sliding_window:
        raise ValueError(f"a packed row is longer than the model's sliding window ({sliding_window}); train this "
                         f"model with --no-pack")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):   # no cuDNN:
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(       # it plans for every new length
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout if module.training else 0.0,
            is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
            for a, b in zip(bounds, bounds[1:])], dim=2)                                         # (1, H, T, d_head)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model):
    """Let `model` take packed batches (sequence_logps calls it on the first one; train_7b before sharding): SDPA and
    eager models switch to PACKED (the same SDPA on padded batches); flash-attention models read cu_seq_lens
    themselves (varlen kernels, GPU). Returns the implementation in use."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, sdpa_mask)
    if model.config._attn_implementation in ("sdpa", "eager"):
        model.set_attn_implementation(PACKED)
    return model.config._attn_implementation


# ----------------------------------------------------------------------------------------------------------------
# log pi(y|x), summed over response tokens.
def sequence_logps(model, input_ids, attention_mask, response_mask, chunk=4096, cu_seq_lens=None):
    """log pi(y|x) for each row: the sum of token log-probs where response_mask is 1. Returns fp32 (B,).

    input_ids, attention_mask, response_mask: (B, T); left or right padding (position ids are derived from the
    mask, so both give the same result). Logits are only computed from the first position that predicts a
    response token (logits_to_keep), only the response positions are gathered (N, V) in the model's dtype,
    and log-softmax is done in fp32 chunks of `chunk` rows: no fp32 (B, T, V) tensor is built. Under autograd the
    chunks' fp32 log-softmax (N, V) are kept for backward (~4 N V bytes; train_7b's memory plan counts them).
    cu_seq_lens: a packed batch (collate(packed=True)) of B rows in one sequence; same result, no padding.
    """
    if cu_seq_lens is not None:
        return _packed_logps(model, input_ids, response_mask, cu_seq_lens, chunk)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                # (B, T)
    T = input_ids.shape[1]
    first = int(response_mask.float().argmax(-1).min())                                 # earliest response token
    keep = T - max(first - 1, 0)                                                         # positions first-1 .. T-1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=keep).logits                           # (B, keep, V)
    pred = logits[:, :-1]                                                                # predicts tokens T-keep+1 ..
    labels = input_ids[:, T - keep + 1:]                                                 # (B, keep-1)
    mask = response_mask[:, T - keep + 1:].bool()                                        # (B, keep-1)
    rows = mask.nonzero(as_tuple=True)[0]                                                # (N,) batch index per token
    return _summed_logps(pred[mask], labels[mask], rows, input_ids.shape[0], chunk)       # (B,)


def _summed_logps(logits, targets, rows, n_rows, chunk):
    """Per-row sums of log softmax(logits)[target]: logits (N, V) in the model's dtype, log-softmax in fp32 chunks of
    `chunk` positions, rows (N,) the row of each position. Returns fp32 (n_rows,)."""
    token_logps = torch.cat([
        logits[i:i + chunk].float().log_softmax(-1).gather(-1, targets[i:i + chunk, None]).squeeze(-1)
        for i in range(0, len(targets), chunk)
    ]) if len(targets) else logits.new_zeros(0, dtype=torch.float32)                    # (N,) fp32
    # index_add adds one value at a time: an fp32 accumulator drifts ~1e-3 nats from the exact sum over a 1,500-token
    # row; an fp64 one keeps the sum of the fp32 token log-probs to ~1e-12 relative, rounded once to fp32: the
    # correctly rounded sum but in near-ties (tests/test_sppo.py).
    sums = torch.zeros(n_rows, dtype=torch.float64, device=logits.device).index_add(0, rows, token_logps.double())
    return sums.float()


def _packed_logps(model, input_ids, response_mask, cu_seq_lens, chunk):
    """sequence_logps of a packed batch: positions restart at 0 in each row; logits only where the next token is a
    response token (logits_to_keep as indices). Returns fp32 (B,)."""
    if use_packed_attention(model) not in (PACKED, "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"a packed batch needs sdpa, eager or flash attention: with "
                         f"{model.config._attn_implementation!r} attention, rows would attend to each other")
    cu = cu_seq_lens.to(input_ids.device)
    lengths = cu.diff()                                                                  # (B,)
    row = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)   # (T,) row of each token
    position_ids = (torch.arange(input_ids.shape[1], device=cu.device) - cu[row])[None]    # (1, T)
    keep = response_mask[0, 1:].nonzero(as_tuple=True)[0]                               # (N,) predict a response
    mask = None if model.config._attn_implementation != PACKED else torch.ones_like(input_ids)  # no dense mask built
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lengths.max()),
                   max_length_k=int(lengths.max())).logits[0]                           # (N, V)
    return _summed_logps(logits, input_ids[0, keep + 1], row[keep + 1], len(lengths), chunk)


@torch.no_grad()
def batched_logps(model, pairs, pad, batch_size=16, device="cpu", progress=False, desc="log-probs"):
    """sequence_logps over many encoded pairs, in batches, no grad. Returns a float64 list (one per pair)."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        b = {k: v.to(device) for k, v in collate(pairs[i:i + batch_size], pad, multiple=pad_multiple(device)).items()}
        out += sequence_logps(model, **b).double().tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling (Algorithm 1, step 1): y_1..y_K ~ pi_t(.|x), per batch of prompts one prefill, then K samples each.
def sample_seed(seed, iteration, index):
    """THE seeding rule of generation: the prompts of iteration t are cut into batches of gen_batch from index 0,
    and the batch starting at prompt `index` is sampled under this seed. It depends on nothing else - not on the
    process, rank or number of GPUs - so sppo.py and train_7b.py draw identical samples for the same settings."""
    return ((seed * 1_000_003 + iteration) * 1_000_003 + index) % 2 ** 63


def eos_ids(model, tokenizer):
    """Every token id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return sorted(i for i in ids if i is not None)



@torch.no_grad()
def sample_k(model, input_ids, attention_mask, gen_cfg, shared_prefill=True):
    """K = gen_cfg.num_return_sequences continuations of each left-padded prompt: (B*K, T + new) ids, prompt i's
    samples in rows i*K .. i*K+K-1, the order of HF generate.

    shared_prefill (default): the prompts' first T-1 tokens are run once, B rows, and the KV cache is repeated to
    B*K rows; generate() then runs the last prompt token of all B*K rows and samples on. HF's generate with
    num_return_sequences=K repeats each prompt K times BEFORE the prefill, so it runs every prompt K times. Both
    make the same random draws (one (B*K, V) draw per step); the logits can differ by fp32 rounding only, and no
    sampled token differed in the comparisons of docs/benchmarks.md. False: that plain call, kept as the reference.
    """
    K, T = gen_cfg.num_return_sequences, input_ids.shape[1]
    if not shared_prefill or T < 2:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                 # generate's rule: (B, T)
    cache = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                  position_ids=position_ids[:, :-1], use_cache=True, logits_to_keep=1).cache   # (B, T-1) prefill
    cache.batch_repeat_interleave(K)                                                    # (B*K, T-1), in place
    one = copy.deepcopy(gen_cfg)
    one.num_return_sequences = 1
    return model.generate(input_ids=input_ids.repeat_interleave(K, 0), cache=cache, generation_config=one,
                          attention_mask=attention_mask.repeat_interleave(K, 0))     # (B*K, T + new)


def generation_config(model, tokenizer, cfg, eos_bias=0.0):
    """generate()'s settings for Algorithm 1's sampling: plain ancestral sampling at cfg.temperature / cfg.top_p
    (top-k off), cfg.max_new_tokens, cfg.K samples per prompt, stopping at any of eos_ids.

    eos_bias = b != 0 (real_run.py's length-only baseline, issue 28) adds b to the logit of every stop token at every
    step, before temperature and top-p (transformers' sequence_bias, a SequenceBiasLogitsProcessor that generate()
    runs ahead of its warpers): the policy's next-token distribution becomes softmax((l + b e_stop) / T), i.e. the
    odds of stopping are multiplied by exp(b / T) and every other token keeps its relative odds."""
    from transformers import GenerationConfig
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    bias = [[[i], float(eos_bias)] for i in stop] if eos_bias else None
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                            max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.K, pad_token_id=pad,
                            eos_token_id=stop, sequence_bias=bias)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts, cfg, iteration=0, device="cpu", start=0, eos_bias=0.0):
    """K samples per prompt. Returns one dict per prompt (GENERATION_FIELDS): {"responses": [K str], "finished":
    [K bool], "token_ids": [K lists of int], "stop_ids": [K int or None]}.

    `prompts` are the iteration's prompts from index `start` on (start: a multiple of cfg.gen_batch); batch by batch
    they are sampled under sample_seed(cfg.seed, iteration, start + i) by sample_k (one prefill per prompt), with
    generation_config's settings (eos_bias: see there; 0 everywhere but real_run.py's baseline). A response is cut at
    its first EOS; one that never emits EOS within cfg.max_new_tokens is kept and flagged finished=False. The text
    (for the oracle and for people) keeps special tokens; training uses the stored ids, since decode -> encode is not
    the identity for BPE tokenizers.
    """
    model.eval()
    gen_cfg, stop = generation_config(model, tokenizer, cfg, eos_bias), eos_ids(model, tokenizer)
    pad = gen_cfg.pad_token_id
    out, xs = [], [prompt_ids(tokenizer, p) for p in prompts]
    if sum(len(x) > cfg.max_prompt_length for x in xs):                # the training rule: keep the prompt's END
        print(f"generate: {sum(len(x) > cfg.max_prompt_length for x in xs)} of {len(xs)} prompts cut to their last "
              f"max_prompt_length={cfg.max_prompt_length} tokens, as training cuts them")
    for i in tqdm(range(0, len(prompts), cfg.gen_batch), desc="generate", disable=not cfg.progress, leave=False):
        chunk = prompts[i:i + cfg.gen_batch]
        b = collate([(x[-cfg.max_prompt_length:], []) for x in xs[i:i + cfg.gen_batch]], pad, padding_side="left")
        torch.manual_seed(sample_seed(cfg.seed, iteration, start + i))
        seqs = sample_k(model, b["input_ids"].to(device), b["attention_mask"].to(device), gen_cfg)
        new = seqs[:, b["input_ids"].shape[1]:].tolist()
        for j in range(len(chunk)):
            g = {"responses": [], "finished": [], "token_ids": [], "stop_ids": []}
            for ids in new[j * cfg.K:(j + 1) * cfg.K]:
                end = next((n for n, tok in enumerate(ids) if tok in stop), None)
                g["token_ids"].append(ids[:end])                                 # what was sampled, for training
                g["stop_ids"].append(None if end is None else ids[end])          # which stop token (Llama-3 has 2)
                g["responses"].append(tokenizer.decode(ids[:end], skip_special_tokens=False))
                g["finished"].append(end is not None)
            out.append(g)
    return out
