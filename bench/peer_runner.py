"""bench/peer_runner.py: the peers' side of bench_peers.py's rows, run under a peer's own interpreter.

    .venv-trl/bin/python bench/peer_runner.py trl DIR         # TRL's DPOTrainer(loss_type="sppo_hard") on DIR's rows
    .venv-blender/bin/python bench/peer_runner.py blender DIR  # llm-blender 0.0.2's Blender.rank on DIR's texts

`make bench` builds the two environments and bench_peers.py starts this file as a subprocess: it writes DIR (the
model via save_pretrained, the token rows as JSONL, PairRM's random checkpoint in the layout llm-blender loads, the
texts as JSON, the settings as DIR/peer.json), then drives the peer line by line so that the two paths' timed
blocks alternate (the one timing rule of workloads.py): each `go` on stdin runs one timed block here, and every answer
is one stdout line `@peer {json}` (other lines are the library's own chatter, skipped). EOF ends it.

This file imports only the peer library, torch, transformers (whatever version the peer's environment pins: TRL
runs on our transformers 5, llm-blender needs transformers 4) and the standard library: never this repository's
modules, which need the runtime pins of requirements.txt.
"""
import json
import sys
import time
from pathlib import Path

import torch


def say(**fields):
    """One answer to bench_peers.py: a `@peer` line of JSON."""
    print("@peer " + json.dumps(fields), flush=True)


def wait_for_go():
    """Block until bench_peers.py asks for the next timed block; exit quietly when it has closed our stdin."""
    if not sys.stdin.readline():
        raise SystemExit(0)


# ----------------------------------------------------------------------------------------------------------------
# TRL 1.16: DPOTrainer(loss_type="sppo_hard"), fp32, on token rows laid out in bench_peers.py's step order.
def run_trl(work, s):
    """s: peer.json. Builds the trainer on the rows (their reference log-probs given, as precompute_ref_log_probs
    would leave them), reports TRL's loss of each of the first s['pairs'] rows at the first weights (one pair a
    batch) and TRL's own reference log-probs of them (compute_ref_log_probs with s['ref_model']), then trains
    s['steps'] optimizer steps, one per `go`, each timed from Trainer's on_step_begin to on_step_end (forward and
    backward of every micro-batch, clipping, optimizer and scheduler step; Trainer collates a step's micro-batches
    just before on_step_begin, outside the timing)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class TokenRowsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset                      # the rows arrive as token ids (prompt_ids, chosen_ids, rejected_ids)

        def _precompute_ref_logps(self, dataset, *args, **kwargs):
            return dataset                      # ... with ref_chosen_logps / ref_rejected_logps already computed

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            wait_for_go()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            say(step=state.global_step, seconds=time.perf_counter() - self.t0)

    rows = [json.loads(line) for line in (work / s["rows"]).read_text().splitlines()]
    load = dict(dtype=torch.float32, attn_implementation=s["attn_implementation"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], **load)
    args = DPOConfig(
        output_dir=str(work / "trl_out"), loss_type=["sppo_hard"], beta=s["beta"],
        bf16=False, fp16=False, gradient_checkpointing=False, optim=s["optimizer"],   # DPOConfig's defaults turned off
        learning_rate=s["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=s["micro_batch"], gradient_accumulation_steps=s["accumulation"],
        max_steps=s["steps"], max_length=None, precompute_ref_log_probs=True, train_sampling_strategy="sequential",
        use_cpu=True, dataloader_num_workers=0, report_to="none", logging_steps=10 ** 6, save_strategy="no",
        disable_tqdm=True, seed=0)
    ref = AutoModelForCausalLM.from_pretrained(s["ref_model"], **load)   # held, unused by the steps (columns given)
    trainer = TokenRowsDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=AutoTokenizer.from_pretrained(s["model"]), callbacks=[Timer()])
    first, collate = [trainer.train_dataset[i] for i in range(s["pairs"])], trainer.data_collator
    with torch.no_grad():                       # TRL's loss of each pair and its own reference log-probs
        losses = [float(trainer.compute_loss(trainer.model, collate([row]))) for row in first]
        refs = [[float(x) for x in trainer.compute_ref_log_probs(trainer.ref_model, collate([row]))] for row in first]
    say(losses=losses, ref_chosen=[c for c, _ in refs], ref_rejected=[r for _, r in refs],
        settings={k: getattr(args, k) for k in ("bf16", "gradient_checkpointing", "optim", "train_sampling_strategy",
                                                "padding_free")}
        | {"threads": torch.get_num_threads(), "attn": model.config._attn_implementation})
    trainer.train()


# ----------------------------------------------------------------------------------------------------------------
# llm-blender 0.0.2: Blender.rank as uclaml/SPPO's scripts/rank.py calls it, then compute_prob.py's P.
def run_blender(work, s):
    """s: peer.json. Loads the ranker from s['checkpoint'] (fp32 on CPU, as loadranker does), then one rank() call
    per `go`; the first answer also carries the scores and P_ij = sigma(s_i - s_j) (scripts/compute_prob.py)."""
    import llm_blender

    texts = json.loads((work / s["texts"]).read_text())
    blender = llm_blender.Blender()
    blender.loadranker(s["checkpoint"], device="cpu")
    say(ready=True, torch_threads=torch.get_num_threads(), dtype=str(next(blender.ranker.parameters()).dtype))
    first = True
    while True:
        wait_for_go()
        t0 = time.perf_counter()
        scores = blender.rank(texts["prompts"], texts["candidates"], return_scores=True,
                              batch_size=s["batch_size"], disable_tqdm=True)            # (N, K)
        seconds = time.perf_counter() - t0
        if first:
            sc = torch.as_tensor(scores, dtype=torch.float64)
            P = 1 / (1 + torch.exp(sc[:, None, :] - sc[:, :, None]))                  # P[n, i, j], compute_prob.py
            say(seconds=seconds, scores=sc.tolist(), P=P.tolist())
            first = False
        else:
            say(seconds=seconds)


def main(argv=None):
    kind, work = (argv or sys.argv[1:])[:2]
    work = Path(work)
    s = json.loads((work / "peer.json").read_text())
    torch.set_num_threads(s["threads"])
    {"trl": run_trl, "blender": run_blender}[kind](work, s)
    say(done=True)


if __name__ == "__main__":
    main()
