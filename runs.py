"""runs.py: the run directory of Algorithm 1 and its records -- what a run writes, reads back, and may reuse.

sppo.py runs Algorithm 1 (generate -> rank -> dataset -> train); this file holds what every stage of it shares
with the others and with train_7b.py, so that each exists once:
  * records: prompts in; generations, preferences and D_t out, as JSONL written atomically, one reader and one
    writer per artifact, one field check whose errors name the file, the line and the field;
  * the run directory's integrity: OUT/iter{t}/manifest.json records each finished stage with the settings and
    inputs it depends on (STAGE_SETTINGS, sha256 of pi_t and of its input files) and what it wrote; a stage is
    reused only when all of that matches, otherwise the run stops before any work (or --restart-from moves the
    stale artifacts aside, deleting nothing);
  * the stage runner (Iteration.step): resuming, applied to each step of Algorithm 1 from outside it;
  * one run per run directory (OUT/.lock), and policies on disk (a save_pretrained directory, written atomically).

    OUT/config.json, OUT/hashes.json, OUT/.lock, OUT/iter{t}/{generations,preferences,dataset}.jsonl, model/,
    metrics.json, manifest.json; OUT/stale/<time>/ for what --restart-from moved aside.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow                     # parquet prompt sets: UltraFeedback's splits, as the SPPO authors ship them
import pyarrow.parquet as pq
import torch

import cli
import hedge_toy
from cli import ArtifactError, ConfigError  # noqa: F401 (runs.ConfigError: raised by the run functions)


# ----------------------------------------------------------------------------------------------------------------
# Errors the user can fix (cli.py's: a CLI prints them as one line and exits 2).
class StaleStage(ArtifactError):
    """A finished stage whose artifacts were made with other settings or inputs, or changed since."""

    def __init__(self, stage, path, why):
        self.stage, self.path = stage, path
        super().__init__(f"{path}: {why}; ways out: another --out, or --restart-from {stage} (moves it and every "
                         f"later artifact aside to OUT/stale/, deleting nothing)")


# ----------------------------------------------------------------------------------------------------------------
# Records: prompts in; generations, preferences and D_t out, as JSONL written atomically. One reader and one
# writer per artifact (sppo.py and train_7b.py use the same), one field check; errors name the file, the line and
# the field.


GENERATION_FIELDS = {"prompt_id": int, "prompt": str, "responses": list, "finished": list, "token_ids": list,
                     "stop_ids": list}
"""generations.jsonl, one record per prompt: K sampled texts, whether each ended with a stop token, the sampled
token ids (stop token excluded) and the stop id actually sampled (None when unfinished). Training reads the ids,
never the re-tokenised text (decode -> encode is not the identity for BPE tokenizers)."""


PREFERENCE_FIELDS = {"prompt_id": int, "P": list}
"""preferences.jsonl, one record per prompt: the K x K matrix P[i][j] = P(y_i > y_j | x), and `logits`, the
oracle's K x K logit matrix, when it gives one (PairRM: the pair and selection scores come from it)."""


DATASET_FIELDS = {"prompt_id": int, "prompt": str, "response": str, "finished": bool,
                  "win_prob": (int, float), "ref_logp": (int, float)}
"""Schema of D_t (dataset.jsonl), one row per kept response (K per prompt with --selection all; with pair, the
winner then the loser, or no row for a prompt whose responses all tie); train_7b.py reads the same file.
prompt_id: index of the prompt in this iteration; prompt: raw prompt text (the chat template is applied at
tokenisation); response: the sampled text; finished: it ended with EOS (EOS is then part of y); win_prob:
P-hat(y > pi_t|x) of Eq. (4.5); ref_logp: log pi_ref(y|x) summed over response tokens (pi_t, or pi_0 with
--reference initial). Optional: log_z (Eq. 4.5 estimate, used when present and log_z='estimate'), role ('winner',
'loser' or 'all'), k (sample index), pair_prob (--selection pair: P(y > the prompt's other kept response | x), for
--loss sppo_pair's Eq. 4.12), response_ids / stop_id (the sampled tokens: sppo.py always writes them; a dataset
made elsewhere without them is tokenised from its text), ref_by (the model hash, dtype and truncation ref_logp was
computed with)."""


def check_fields(row, schema: dict, where: str):
    """THE field check: `row` is a dict with every key of `schema` of its type(s); errors start with `where`."""
    if not isinstance(row, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in schema.items():
        if key not in row:
            raise ArtifactError(f"{where}: missing field {key!r}")
        types = typ if isinstance(typ, tuple) else (typ,)
        ok = bool in types if isinstance(row[key], bool) else isinstance(row[key], types)
        if not ok:
            raise ArtifactError(f"{where}: field {key!r} should be {' or '.join(t.__name__ for t in types)}, "
                                f"got {type(row[key]).__name__}")
    return row


def read_jsonl(path, required: dict | None = None, artifact=True):
    """Read a JSONL file; every line must be a JSON object with the `required` fields of the given types. Errors
    name the file and line; artifact=False for a user's own file (prompts): never advise deleting it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    way_out = "; a truncated or corrupt artifact: --restart-from its stage, or another --out" if artifact else ""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ArtifactError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                                    f"{way_out}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}){way_out}") from None
            rows.append(check_fields(row, required or {}, f"{path}:{n}"))
    return rows


def write_jsonl(path, rows: Iterable[dict]):
    """Write rows atomically: a temporary file, flushed and fsynced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_prompts(path, column="prompt"):
    """Prompts from JSONL (one object per line with a string `column`) or parquet (a string column). Errors name
    the file, the line (or record) and the field."""
    path = Path(path)
    if path.suffix != ".parquet":
        prompts = [row[column] for row in read_jsonl(path, required={column: str}, artifact=False)]
    elif not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    else:
        try:
            names = pq.read_schema(path).names
            if column not in names:
                raise ArtifactError(f"{path}: no column {column!r}; columns are {names}")
            prompts = pq.read_table(path, columns=[column]).column(column).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise ArtifactError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    for n, p in enumerate(prompts, 1):
        if not isinstance(p, str) or not p.strip():
            raise ArtifactError(f"{path}: record {n}: field {column!r} should be a non-empty string, got {p!r}")
    return prompts


def _per_prompt(path, schema, n_prompts, fits, expected):
    """Records of `path`, one per prompt, in prompt order, each passing `fits(n, record)`; else the error names
    the line and what was `expected` there."""
    recs = read_jsonl(path, schema)
    for n, r in enumerate(recs):
        if r["prompt_id"] != n or n >= n_prompts or not fits(n, r):
            raise ArtifactError(f"{path}:{n + 1}: expected {expected(n)}; the file belongs to another run: "
                                f"--restart-from its stage, or another --out")
    if len(recs) != n_prompts:
        raise ArtifactError(f"{path}: {len(recs)} records for {n_prompts} prompts: --restart-from its stage")
    return recs


def write_generations(path, prompts, generations):
    write_jsonl(path, ({"prompt_id": i, "prompt": x, **g} for i, (x, g) in enumerate(zip(prompts, generations))))


def read_generations(path, prompts, K):
    """generations.jsonl for exactly these prompts, in order, K responses each with their token ids."""
    return _per_prompt(path, GENERATION_FIELDS, len(prompts), lambda n, g: g["prompt"] == prompts[n] and
                       len(g["responses"]) == K == len(g["finished"]) == len(g["token_ids"]) == len(g["stop_ids"]),
                       lambda n: f"prompt {n} with K={K} responses and their token ids")


def write_preferences(path, matrices, logits=None):
    write_jsonl(path, ({"prompt_id": i, "P": np.asarray(m).tolist(), **({} if logits is None else
                        {"logits": np.asarray(logits[i]).tolist()})} for i, m in enumerate(matrices)))


def read_preferences(path, n_prompts, K, with_logits=False):
    """preferences.jsonl: one valid K x K matrix per prompt, in prompt order. Returns a list of arrays, and with
    with_logits the list of logit matrices too (None when the oracle gave none: all records or none have one)."""
    recs = _per_prompt(path, PREFERENCE_FIELDS, n_prompts, lambda n, r: np.shape(r["P"]) == (K, K) and np.shape(
                       r.get("logits", r["P"])) == (K, K), lambda n: f"prompt {n}'s {K} x {K} matrix")
    if len({"logits" in r for r in recs}) > 1:
        raise ArtifactError(f"{path}: some records have 'logits' and some do not: --restart-from rank")
    try:
        mats = [hedge_toy.validate_preference(r["P"]) for r in recs]
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if not with_logits:
        return mats
    return mats, [np.asarray(r["logits"], dtype=np.float64) for r in recs] if recs and "logits" in recs[0] else None


def check_dataset(rows, path="dataset", need_ref=True, need_log_z=False):
    """Rows of D_t (DATASET_FIELDS; with need_ref=False ref_logp may be absent from every row, then pi_t computes
    it; need_log_z: --log-z estimate trains on each row's log_z): types, win_prob in [0, 1], finite ref_logp.
    Errors name `path`, the record and the field."""
    if not rows:
        raise ArtifactError(f"{path}: no rows")
    has_ref = [isinstance(r, dict) and "ref_logp" in r for r in rows]
    if any(has_ref) and not all(has_ref):
        raise ArtifactError(f"{path}: record {has_ref.index(False) + 1}: missing field 'ref_logp' (other records "
                            f"have one: give it to every record, or to none and it is computed from pi_t)")
    schema = {k: v for k, v in DATASET_FIELDS.items() if need_ref or k != "ref_logp"}
    schema.update({"log_z": (int, float)} if need_log_z else {})
    for n, row in enumerate(rows, 1):
        check_fields(row, schema, f"{path}: record {n}")
        if not 0.0 <= row["win_prob"] <= 1.0:
            raise ArtifactError(f"{path}: record {n}: win_prob {row['win_prob']} is outside [0, 1]")
        if "ref_logp" in row and not math.isfinite(row["ref_logp"]):
            raise ArtifactError(f"{path}: record {n}: ref_logp {row['ref_logp']} is not finite")
    return rows


def read_dataset(path, need_ref=True, need_log_z=False):
    """dataset.jsonl: field errors name the file and line, value errors the record (check_dataset)."""
    schema = {k: v for k, v in DATASET_FIELDS.items() if k != "ref_logp"}
    return check_dataset(read_jsonl(path, schema), path, need_ref, need_log_z)


# ----------------------------------------------------------------------------------------------------------------


# The run directory: OUT/iter{t}/{generations,preferences,dataset}.jsonl, model/, metrics.json and manifest.json.
# A stage is finished when OUT/iter{t}/manifest.json records it: the settings and inputs it depends on (pi_t's and
# the oracle's identity, the prompts, the sha256 of its input files) and the sha256 of what it wrote. Re-running
# the command resumes: a stage is reused only if all of that still matches; otherwise the run stops before any
# work, naming the setting or file, unless --restart-from moves the stale artifacts aside (never deletes them).
STAGES = ("generate", "rank", "dataset", "train")


STAGE_FILES = {"generate": ("generations.jsonl",), "rank": ("preferences.jsonl",), "dataset": ("dataset.jsonl",),
               "train": ("model", "metrics.json")}


STAGE_INPUTS = {"rank": ("generations.jsonl",), "dataset": ("generations.jsonl", "preferences.jsonl"),
                "train": ("dataset.jsonl",)}


TRAIN_SETTINGS = ("loss", "eta", "optimizer", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "epochs",
                  "schedule_epochs", "fit_tol", "global_batch", "micro_batch", "group_by_length", "pack", "seed",
                  "selection", "max_length", "max_prompt_length", "truncation", "dtype",
                  "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
"""The settings that change pi_{t+1} given D_t and pi_t, besides the loss's own (sppo.LOSSES[...].settings): the train
stage's key here, and what train_7b.py --resume must find unchanged in its checkpoint."""

STAGE_SETTINGS = {
    "generate": ("K", "seed", "temperature", "top_p", "max_new_tokens", "gen_batch", "max_prompt_length", "dtype"),
    "rank": ("oracle", "pairrm_mode", "oracle_prompt"),
    "dataset": ("selection", "estimate_from", "reference", "eta", "max_length", "max_prompt_length", "truncation",
                "micro_batch", "dtype"),
    "train": TRAIN_SETTINGS + ("eval_prompts",)}
"""The settings each stage's artifacts depend on (its input files, pi_t and the oracle's identity are recorded by hash
besides; the train stage adds the loss's own settings)."""

FORMAT = 3
"""The run directory's layout version, in every manifest.json. A directory made by another version of this code is
refused (one line, the way out), never read with guesses."""


class Hashes:
    """sha256 of files and directories (a directory: its files' names and hashes), cached in OUT/hashes.json by
    path, size and mtime, so a 7B checkpoint is read once per run directory, not once per resume."""

    def __init__(self, out):
        self.path = Path(out) / "hashes.json"
        self.known = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __call__(self, path):
        path = Path(path).resolve()
        if path.is_dir():
            parts = [f"{p.relative_to(path)}:{self(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()
        st, key = path.stat(), str(path)
        if self.known.get(key, [None])[:2] != [st.st_size, st.st_mtime_ns]:
            with open(path, "rb") as f:
                self.known[key] = [st.st_size, st.st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest()]
            tmp = self.path.with_name(f"hashes.json.{os.getpid()}.tmp")       # one tmp per writer: no races
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        return self.known[key][2]


def model_dir_of(cfg, t):
    """pi_t's directory: --model for t = 0, else OUT/iter{t-1}/model (what iteration t-1 trained)."""
    return cfg.model if t <= 0 else Path(cfg.out) / f"iter{t - 1}" / "model"


def magnet_iteration(t, every):
    """The iteration whose policy is the magnet mu at iteration t: 0 (pi_0) when every = 0, else every floor(t/every)
    (MPO's schedule; last_iterate._magnet_loop runs the same one on exact games)."""
    return every * (t // every) if every else 0


def loss_models(cfg, t, names):
    """{name: directory} of the policies besides pi_t whose log-probs a successor's loss reads in iteration t
    (losses.Loss.models): 'mu', the reference / magnet, pi_0 or, with --magnet-every M, pi_{M floor(t/M)} (MPO moves
    the magnet to the current policy every M iterations); 'previous', pi_{t-1} (pi_0 at t = 0, OMWU's pi_0 = pi_1)."""
    m = magnet_iteration(t, getattr(cfg, "magnet_every", 0))
    where = {"mu": lambda: model_dir_of(cfg, m), "previous": lambda: model_dir_of(cfg, t - 1)}
    return {n: where[n]() for n in names}


def stage_key(cfg, stage, d, model_dir, prompts, oracle_id, hashes, loss=None):
    """Everything stage's artifacts in folder d (OUT/iter{t}) depend on: its settings (STAGE_SETTINGS; the train
    stage adds the loss's own, loss.settings), pi_t, the prompts, the oracle's identity, the hashes of its input
    files; the dataset stage of a loss with columns of its own (losses.py's successors) adds the loss, its settings
    and the hashes of the other policies it reads (loss_models)."""
    own = tuple(loss.settings) if loss is not None and stage == "train" else ()
    key = {k: getattr(cfg, k) for k in STAGE_SETTINGS[stage] + own}
    if stage == "dataset" and loss is not None and (loss.models or set(loss.columns) - {"pair_prob"}):
        key.update({k: getattr(cfg, k) for k in ("loss", *loss.settings)})
        t = int(Path(d).name[len("iter"):])
        key.update({f"{n}_model": hashes(p) for n, p in loss_models(cfg, t, loss.models).items()})
    key.update({f: hashes(Path(d) / f) for f in STAGE_INPUTS.get(stage, ())})
    if stage != "rank":
        key["model"] = hashes(model_dir)
    if stage == "generate":
        key["prompts"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    if stage == "rank":
        key["oracle_id"] = oracle_id
    if stage == "dataset" and cfg.reference == "initial":       # ref_logp by pi_0, whatever pi_t is
        key["reference_model"] = hashes(cfg.model)
    if stage == "train" and cfg.eval_prompts:                   # metrics.json's held-out win rates: the file's hash
        key["eval_prompts"] = hashes(cfg.eval_prompts)
    return key


class Manifest:
    """OUT/iter{t}/manifest.json: one record per finished stage, {key, files: {name: sha256}, rows}."""

    def __init__(self, d):
        self.d, self.path = Path(d), Path(d) / "manifest.json"
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {"format": FORMAT, "stages": {}}
        if saved.get("format") != FORMAT:
            raise ArtifactError(f"{self.path}: written by another version of this code (layout "
                                f"{saved.get('format', 'before 3')}, this one reads {FORMAT}); use another --out, or "
                                f"move {self.d.parent} away")
        self.stages = saved["stages"]

    def done(self, stage, key, hashes, ignore=()):
        """True: finished with exactly `key` (its fields in `ignore` aside), files unchanged. False: not finished (no
        record, or its files were deleted to recompute it; a file without a record is an interrupted write).
        StaleStage otherwise."""
        rec, files = self.stages.get(stage), [self.d / f for f in STAGE_FILES[stage]]
        if rec is None or not all(f.exists() for f in files):
            return False
        for k in sorted(set(rec["key"]) | set(key), key=lambda k: (k not in rec["key"] or k not in key, k)):
            if k not in ignore and rec["key"].get(k) != key.get(k):
                what = "input file" if k.endswith(".jsonl") else "pi_t" if k == "model" else "setting"
                raise StaleStage(stage, files[0], f"made with {what} {k} = {rec['key'].get(k)!r}, but this run has "
                                 f"{k} = {key.get(k)!r}")
        for f in files:
            if hashes(f) != rec["files"][f.name]:
                raise StaleStage(stage, f, "changed since it was written (its sha256 is not manifest.json's)")
        return True

    def commit(self, stage, key, hashes, rows):
        """Record a finished stage (its files are already in place): the last write of every stage."""
        self.stages[stage] = {"key": key, "files": {f: hashes(self.d / f) for f in STAGE_FILES[stage]}, "rows": rows}
        self.save()

    def save(self):
        write_json(self.path, {"format": FORMAT, "stages": self.stages})


def iteration_prompts(prompts, cfg, t):
    """The prompts of iteration t: its own slice when cfg.split_prompts (the paper's 3 x 20k), else all."""
    if not cfg.split_prompts:
        return list(prompts)
    parts = np.array_split(np.arange(len(prompts)), cfg.iterations)
    return [prompts[i] for i in parts[t]]


# ----------------------------------------------------------------------------------------------------------------
# The stage runner: how each step of Algorithm 1 becomes resumable, applied from outside the algorithm.
class Stopped(Exception):
    """--stop-after: the named stage has finished; the run stops there (re-run the command to resume)."""


ARTIFACTS = {
    # stage      save the step's result into OUT/iter{t}/                 read it back (checked)
    "generate": (lambda it, gens: write_generations(it.path("generations.jsonl"), it.prompts, gens),
                 lambda it: read_generations(it.path("generations.jsonl"), it.prompts, it.cfg.K)),
    "rank":     (lambda it, res: write_preferences(it.path("preferences.jsonl"), *res),
                 lambda it: read_preferences(it.path("preferences.jsonl"), len(it.prompts), it.cfg.K, True)),
    "dataset":  (lambda it, rows: write_jsonl(it.path("dataset.jsonl"), rows),
                 lambda it: read_dataset(it.path("dataset.jsonl"), need_log_z=it.cfg.log_z == "estimate")),
    "train":    (lambda it, res: (save_policy(res[0], res[1], it.path("model")), write_json(it.path("metrics.json"),
                                                                                          res[2])),
                 lambda it: it.path("model")),
}
"""One writer and one reader per stage's artifact: the stage runner saves a step's result with the first, and
returns what the second reads back, whether the step ran now or in an earlier, interrupted run."""


class Iteration:
    """OUT/iter{t}/, one iteration of Algorithm 1 on disk. The algorithm calls each step through step(); that is
    where resuming lives: a step whose manifest record matches this run (its settings, pi_t, the oracle, its input
    files, the files it wrote) is not run again; otherwise it runs, its result is saved, read back and recorded.
    Either way step() returns the artifact as read from disk."""

    def __init__(self, cfg, t, prompts, model_dir, oracle_id, hashes, device, loss=None):
        self.cfg, self.t, self.prompts, self.model_dir, self.device = cfg, t, prompts, model_dir, device
        self.oracle_id, self.hashes, self.loss = oracle_id, hashes, loss
        self.dir = Path(cfg.out) / f"iter{t}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest, self._pi_t = Manifest(self.dir), None

    def path(self, name):
        return self.dir / name

    def pi_t(self):
        """(model, tokenizer) of pi_t, loaded once, and only when a step runs that needs it."""
        if self._pi_t is None:
            self._pi_t = load_policy(self.model_dir, self.cfg, self.device)
        return self._pi_t

    def key(self, stage):
        return stage_key(self.cfg, stage, self.dir, self.model_dir, self.prompts, self.oracle_id, self.hashes,
                         self.loss)

    def step(self, stage, work, *args):
        """work(*args) -> the stage's result, unless the manifest shows the stage finished as asked; then the
        artifact read back from disk. Raises Stopped after the stage --stop-after names."""
        key = self.key(stage)
        save, load = ARTIFACTS[stage]
        if not self.manifest.done(stage, key, self.hashes):
            save(self, work(*args))
            result = load(self)                              # what was written reads back and passes its checks
            self.manifest.commit(stage, key, self.hashes, len(result) if isinstance(result, list) else
                                 len(self.prompts))
        else:
            result = load(self)
        if self.cfg.stop_after == stage:
            raise Stopped(f"stopped after stage {stage!r} of iteration {self.t}; re-run the command to resume")
        return result


def check_run(cfg, prompts, oracle_id, hashes, loss=None):
    """Walk every finished stage without doing any work. Returns (t, StaleStage) for the first stage whose
    artifacts do not match this run, or None when everything that exists does."""
    model_dir = cfg.model
    for t in range(cfg.iterations):
        d = Path(cfg.out) / f"iter{t}"
        man, p = Manifest(d), iteration_prompts(prompts, cfg, t)
        for name in STAGES:
            key = stage_key(cfg, name, d, model_dir, p, oracle_id, hashes, loss)
            try:
                if not man.done(name, key, hashes):
                    return None
            except StaleStage as e:
                return t, e
        model_dir = d / "model"
    return None


def move_aside(out, t, stage):
    """--restart-from: move iteration t's artifacts of `stage` and later stages, and every later iteration folder
    (iter{n}, n > t: only folders this code names), into OUT/stale/<UTC time>/ (nothing is deleted), and drop their
    manifest records. Every move is decided and checked before the first one is made."""
    out, dest = Path(out), Path(out) / "stale" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    d, later = out / f"iter{t}", STAGES[STAGES.index(stage):]
    man = Manifest(d)
    moves = [d / f for s in later for f in STAGE_FILES[s] if (d / f).exists()]
    moves += sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"iter\d+", p.name) and int(p.name[4:]) > t)
    if dest.exists():
        raise ConfigError(f"--restart-from {stage}: {dest} exists already; wait a second and run again")
    for f in moves:
        (dest / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), dest / f.relative_to(out))
    for s in later:
        man.stages.pop(s, None)
    man.save()
    print(f"--restart-from {stage}: moved iteration {t}'s {'/'.join(later)} artifacts and later iterations to {dest}")


# ----------------------------------------------------------------------------------------------------------------
# One run per run directory: an exclusive lock on OUT/.lock, released by the OS when the process ends.
_LOCKS = {}


def lock_run_dir(out):
    """Take OUT/.lock for this process (fcntl.flock, non-blocking), or refuse at once naming the holder's PID. The
    OS releases it when the process exits or is killed, so a crashed run never blocks the next one."""
    out = Path(out).resolve()
    if out in _LOCKS:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        for _ in range(200):                     # the holder writes its PID just after taking the lock: wait for it
            f.seek(0)
            if holder := f.read().strip():
                break
            time.sleep(0.01)
        holder = holder or "unknown"
        f.close()
        raise ConfigError(f"--out {out}: another run is using it (PID {holder}, {out / '.lock'}); wait for it to end, "
                          f"or use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[out] = f


def unlock_run_dir(out):
    """Release OUT/.lock before the process ends (tests run several runs in one process)."""
    f = _LOCKS.pop(Path(out).resolve(), None)
    if f is not None:
        f.close()


# ----------------------------------------------------------------------------------------------------------------
# Policies on disk: pi_t is a local save_pretrained directory (or a .gguf file, converted once).


def resolve_device(name):
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def device_available(name):
    """--device: `auto`, or a torch device name this machine has (cuda:1 needs two GPUs)."""
    if name == "auto":
        return True
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        return False
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    if dev.type == "mps":
        return torch.backends.mps.is_available()
    return dev.type == "cpu"


def gguf_cache():
    """Where converted GGUF checkpoints live: $SPPO_GGUF_CACHE, else ~/.cache/sppo/gguf (XDG_CACHE_HOME honoured)."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sppo" / "gguf"
    return Path(os.environ.get("SPPO_GGUF_CACHE", home))


def gguf_checkpoint(path, cache=None):
    """A .gguf file -> a local checkpoint directory (config, fp32 safetensors, tokenizer, chat template), converted
    once and cached in cache/<sha256 of the file>/, so a changed file is converted again. Returns the directory.

    transformers de-quantises the GGUF tensors to fp32 on load (needs the `gguf` package: requirements/real.txt) and
    marks the model GGUF-quantised, which save_pretrained refuses; the marker is cleared before saving. Concurrent
    callers (ranks) each write a private temporary directory; the first rename wins, the others drop theirs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ArtifactError(f"{path}: not a GGUF file (its first bytes are not 'GGUF')")
        f.seek(0)
        dest = Path(cache or gguf_cache()) / hashlib.file_digest(f, "sha256").hexdigest()
    if (dest / "config.json").is_file():
        return dest
    try:
        import gguf  # noqa: F401   transformers reads GGUF through it
    except ImportError:
        raise ConfigError(f"{path}: reading GGUF needs the gguf package: pip install -r requirements/real.txt") \
            from None
    print(f"{path}: converting GGUF to safetensors in {dest} (once; cached by the file's sha256)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, EOFError, IndexError, struct.error) as e:    # a truncated file: struct
        raise ArtifactError(f"{path}: transformers cannot load this GGUF file, truncated or not a model "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    model.config.__dict__.pop("quantization_config", None)           # de-quantised: a plain fp32 checkpoint
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:                                                  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def checkpoint_dir(path):
    """A policy's checkpoint folder: the folder itself, or a .gguf file's converted checkpoint (gguf_checkpoint)."""
    return gguf_checkpoint(path) if str(path).endswith(".gguf") else path


def load_policy(path, cfg, device):
    """A causal LM and its tokenizer from a local directory (no hub), or from a .gguf file via gguf_checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = checkpoint_dir(path)
    if cli.model_dir_problem(path):
        raise ArtifactError(f"{path}: {cli.model_dir_problem(path)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).to(device)
    return model, AutoTokenizer.from_pretrained(path)


def save_policy(model, tokenizer, path):
    """save_pretrained into a temporary directory, then rename: a model directory is complete or absent."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
