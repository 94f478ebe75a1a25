"""runs.py: the run directory of Algorithm 1 and its records -- what a run writes, reads back, and may reuse.

sppo.py runs Algorithm 1 (generate -> rank -> dataset -> train); this file holds what every stage of it shares
with the others and with train_7b.py, so that each exists once:
  * errors the user can fix (a CLI prints them as one line and exits 2);
  * records: prompts in; generations, preferences and D_t out, as JSONL written atomically, one reader and one
    writer per artifact, one field check whose errors name the file, the line and the field;
  * the run directory's integrity: OUT/iter{t}/manifest.json records each finished stage with the settings and
    inputs it depends on (STAGE_SETTINGS, sha256 of pi_t and of its input files) and what it wrote; a stage is
    reused only when all of that matches, otherwise the run stops before any work (or --restart-from moves the
    stale artifacts aside, deleting nothing);
  * policies on disk (a save_pretrained directory, written atomically), and the one CLI convention.

    OUT/config.json, OUT/hashes.json, OUT/iter{t}/{generations,preferences,dataset}.jsonl, model/, metrics.json,
    manifest.json; OUT/stale/<time>/ for what --restart-from moved aside.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from transformers import HfArgumentParser

import hedge_toy
import policy


# ----------------------------------------------------------------------------------------------------------------
# Errors the user can fix: a CLI prints them as one line and exits 2.


class ArtifactError(ValueError):
    """A prompt file or run artifact that cannot be used; the message names the file and line."""


class ConfigError(ValueError):
    """A setting that cannot work, found before any work starts; the CLIs print it as one line and exit 2."""


class StaleStage(ArtifactError):
    """A finished stage whose artifacts were made with other settings or inputs, or changed since."""

    def __init__(self, stage, path, why):
        self.stage, self.path = stage, path
        super().__init__(f"{path}: {why}; ways out: another --out, or --restart-from {stage} (moves it and every "
                         f"later artifact aside to OUT/stale/, deleting nothing)")


def user_errors(prog, fn):
    """Run fn(); a ConfigError or ArtifactError (the user's to fix) becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except (ConfigError, ArtifactError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


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
"""Schema of D_t (dataset.jsonl), one row per kept response; train_7b.py reads the same file.
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


def read_jsonl(path, required: dict | None = None):
    """Read a JSONL file; every line must be a JSON object with the `required` fields of the given types."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    f"a truncated or corrupt file - delete it to recompute") from None
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
    """Prompts from JSONL (one object per line with a string `column`) or parquet (a string column)."""
    path = Path(path)
    if path.suffix != ".parquet":
        prompts = [row[column] for row in read_jsonl(path, required={column: str})]
    elif not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    else:
        import pyarrow.parquet as pq                 # UltraFeedback's splits, as the SPPO authors ship them
        if column not in pq.read_schema(path).names:
            raise ArtifactError(f"{path}: no column {column!r}; columns are {pq.read_schema(path).names}")
        prompts = pq.read_table(path, columns=[column]).column(column).to_pylist()
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
            raise ArtifactError(f"{path}:{n + 1}: expected {expected(n)}; the file belongs to another run or "
                                f"config - delete it to recompute")
    if len(recs) != n_prompts:
        raise ArtifactError(f"{path}: {len(recs)} records for {n_prompts} prompts; delete it to recompute")
    return recs


def write_generations(path, prompts, generations):
    write_jsonl(path, ({"prompt_id": i, "prompt": x, **g} for i, (x, g) in enumerate(zip(prompts, generations))))


def read_generations(path, prompts, K):
    """generations.jsonl for exactly these prompts, in order, K responses each with their token ids."""
    try:
        return _per_prompt(path, GENERATION_FIELDS, len(prompts), lambda n, g: g["prompt"] == prompts[n] and
                           len(g["responses"]) == K == len(g["finished"]) == len(g["token_ids"]) == len(g["stop_ids"]),
                           lambda n: f"prompt {n} with K={K} responses and their token ids")
    except ArtifactError as e:
        if "missing field 'token_ids'" not in str(e) and "missing field 'stop_ids'" not in str(e):
            raise
        raise ArtifactError(f"{e} (written before sampled token ids were stored: --restart-from generate)") from None


def write_preferences(path, matrices, logits=None):
    write_jsonl(path, ({"prompt_id": i, "P": np.asarray(m).tolist(), **({} if logits is None else
                        {"logits": np.asarray(logits[i]).tolist()})} for i, m in enumerate(matrices)))


def read_preferences(path, n_prompts, K, with_logits=False):
    """preferences.jsonl: one valid K x K matrix per prompt, in prompt order. Returns a list of arrays, and with
    with_logits the list of logit matrices too (None when the oracle gave none: all records or none have one)."""
    recs = _per_prompt(path, PREFERENCE_FIELDS, n_prompts, lambda n, r: np.shape(r["P"]) == (K, K) and np.shape(
                       r.get("logits", r["P"])) == (K, K), lambda n: f"prompt {n}'s {K} x {K} matrix")
    if len({"logits" in r for r in recs}) > 1:
        raise ArtifactError(f"{path}: some records have 'logits' and some do not; delete it to recompute")
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


STAGE_SETTINGS = {
    "generate": ("K", "seed", "temperature", "top_p", "max_new_tokens", "gen_batch", "max_prompt_length", "dtype"),
    "rank": ("oracle", "pairrm_mode", "oracle_prompt", "judges"),
    "dataset": ("selection", "estimate_from", "reference", "eta", "max_length", "max_prompt_length", "truncation",
                "micro_batch", "dtype"),
    "train": ("loss", "ipo_target", "log_z", "eta", "optimizer", "lr", "warmup_ratio", "weight_decay",
              "max_grad_norm", "epochs", "schedule_epochs", "global_batch", "micro_batch", "group_by_length", "pack",
              "seed",
              "max_length", "max_prompt_length", "truncation", "dtype", "eval_prompts")}
"""The settings each stage's artifacts depend on (its input files and pi_t are recorded by hash besides)."""


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


def stage_key(cfg, stage, d, model_dir, prompts, oracle_id, hashes):
    """Everything stage's artifacts in folder d depend on: its settings, pi_t, the prompts, the oracle, inputs."""
    key = {k: getattr(cfg, k) for k in STAGE_SETTINGS[stage]}
    key.update({f: hashes(Path(d) / f) for f in STAGE_INPUTS.get(stage, ())})
    if stage != "rank":
        key["model"] = hashes(model_dir)
    if stage == "generate":
        key["prompts"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        key["sampler"] = policy.SAMPLER                         # generations from before it are not reused
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
        self.stages = json.loads(self.path.read_text())["stages"] if self.path.is_file() else {}

    def done(self, stage, key, hashes, ignore=()):
        """True: finished with exactly `key` (its fields in `ignore` aside), files unchanged. False: not finished (no
        record, or its files were deleted to recompute it; a file without a record is an interrupted write).
        StaleStage otherwise."""
        rec, files = self.stages.get(stage), [self.d / f for f in STAGE_FILES[stage]]
        if rec is None or not all(f.exists() for f in files):
            return False
        for k in sorted(set(rec["key"]) | set(key)):
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
        write_json(self.path, {"stages": self.stages})


def iteration_prompts(prompts, cfg, t):
    """The prompts of iteration t: its own slice when cfg.split_prompts (the paper's 3 x 20k), else all."""
    if not cfg.split_prompts:
        return list(prompts)
    parts = np.array_split(np.arange(len(prompts)), cfg.iterations)
    return [prompts[i] for i in parts[t]]


def check_run(cfg, prompts, oracle_id, hashes):
    """Walk every finished stage without doing any work. Returns (t, StaleStage) for the first stage whose
    artifacts do not match this run, or None when everything that exists does."""
    model_dir = cfg.model
    for t in range(cfg.iterations):
        d = Path(cfg.out) / f"iter{t}"
        man, p = Manifest(d), iteration_prompts(prompts, cfg, t)
        for name in STAGES:
            try:
                if not man.done(name, stage_key(cfg, name, d, model_dir, p, oracle_id, hashes), hashes):
                    return None
            except StaleStage as e:
                return t, e
        model_dir = d / "model"
    return None


def move_aside(out, t, stage):
    """--restart-from: move iteration t's artifacts of `stage` and later stages, and every later iteration, into
    OUT/stale/<UTC time>/ (nothing is deleted), and drop their manifest records."""
    dest = Path(out) / "stale" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    d, later = Path(out) / f"iter{t}", STAGES[STAGES.index(stage):]
    man = Manifest(d)
    for f in [d / f for s in later for f in STAGE_FILES[s]] + sorted(Path(out).glob("iter*")):
        if f.exists() and (f.parent == d or int(f.name[4:] or -1) > t):
            (dest / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), dest / f.relative_to(out))
    for s in later:
        man.stages.pop(s, None)
    write_json(man.path, {"stages": man.stages})
    print(f"--restart-from {stage}: moved iteration {t}'s {'/'.join(later)} artifacts and later iterations to {dest}")


# ----------------------------------------------------------------------------------------------------------------
# Policies on disk: pi_t is a local save_pretrained directory (or a .gguf file, converted once).


def resolve_device(name):
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


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
    except (ValueError, KeyError, OSError) as e:
        raise ArtifactError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: {e})") from None
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


def load_policy(path, cfg, device):
    """A causal LM and its tokenizer from a local directory (no hub), or from a .gguf file via gguf_checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_checkpoint(path) if str(path).endswith(".gguf") else path
    if not (Path(path) / "config.json").is_file():
        raise ArtifactError(f"{path}: not a model directory (no config.json)")
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


# ----------------------------------------------------------------------------------------------------------------
# CLI: the one convention of every script here (transformers.HfArgumentParser, as TRL's users know it).


def parse_config(cls, argv=None, description=None):
    """A `cls` instance from the command line: one flag per field (--field_name or --field-name), its help the
    field's, its true default shown, Literal fields listing their choices and rejecting anything else at once
    (exit 2). `--config FILE.yaml|.json` gives field values first; flags on the command line override them."""
    parser = HfArgumentParser(cls, description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of `field: value` lines; flags override")
    given = parser.parse_known_args(argv)[0].config
    file_args = []
    if given:
        import yaml
        path = Path(given)
        try:
            values = yaml.safe_load(path.read_text()) if path.is_file() else None
        except yaml.YAMLError as e:
            parser.error(f"--config {path}: not valid YAML/JSON ({e})")
        if not isinstance(values, dict):
            parser.error(f"--config {path}: expected a file of `field: value` lines")
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in values.items():
            if k not in names:
                parser.error(f"--config {path}: unknown setting {k!r}")
            if v is not None:
                file_args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    args = vars(parser.parse_args(file_args + list(sys.argv[1:] if argv is None else argv)))
    args.pop("config")
    return cls(**args)
