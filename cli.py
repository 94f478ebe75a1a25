"""cli.py: the one CLI convention of every script here, and the checks every setting passes before any work.

A script's settings are one @dataclass whose fields are declared with arg(default, help): one field = one flag
(--field-name or --field_name), `--help` shows each true default; Literal fields (or arg(choices=...)) list their
choices, bool fields take --x / --no-x / --x false, list fields take several values. `--config FILE.yaml|.json`
gives values first (a key given twice is refused); flags on the command line override them.

check(cfg), run by main() before any work and before any file is written (and by the libraries' run functions, for
configs built in Python): every choice valid; the config's RULES table, rows (field, test(cfg), what it must be);
every path field: an input file or folder exists and is readable, an output's nearest existing folder is writable.
Errors the user can fix (ConfigError, ArtifactError) are one line on stderr and exit code 2, never a traceback.

Standard library (and PyYAML for --config) only, so the NumPy files use it without torch or transformers.

    @dataclass
    class Config:
        out: str = arg("figures", help="folder for the figures", path="out_dir")
        t: int = arg(100, help="iterations T")
        RULES = (("t", lambda c: 1 <= c.t <= 10**6, "in [1, 1e6]"),)

    sys.exit(cli.main("my_script.py", Config, work))       # work(cfg) -> exit code
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A setting that cannot work, found before any work starts; the CLIs print it as one line and exit 2."""


class ArtifactError(ValueError):
    """A user's file or a run artifact that cannot be used; the message names the file, the line and the field."""


PATH_KINDS = ("file", "dir", "model", "out_dir", "out_file")
"""arg(path=...): an input `file` or `dir` (exists, readable); a `model` (a folder with config.json, or a .gguf
file); an output `out_dir` or `out_file` (the nearest existing folder above it is writable; an existing out_dir is a
folder, an existing out_file a file)."""


def arg(default=dataclasses.MISSING, *, help, default_factory=dataclasses.MISSING, choices=None, path=None):
    """A dataclass field that is one flag: its help text, optional choices (any container, read when parsing) and
    the kind of path it holds (PATH_KINDS), which check() tests before any work."""
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "choices": choices, "path": path})


def flag(name):
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------------------------
# From the command line to a config.
@functools.cache
def _field_types(cls):
    """name -> (value type, choices or None, is a list), from the annotations: Literal[...], X | None, list[X]."""
    out, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
            typing.Union, types.UnionType) else [hint]
        base, is_list = args[0], False
        if typing.get_origin(base) is list:
            base, is_list = typing.get_args(base)[0], True
        choices = f.metadata.get("choices")
        if typing.get_origin(base) is Literal:
            choices, base = typing.get_args(base), type(typing.get_args(base)[0])
        out[f.name] = (base, choices, is_list)
    return out


def _bool(text):
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser_for(cls, description=None):
    """argparse for a config dataclass: one flag per field, `--config FILE` besides."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML or JSON file of `field: value` lines; flags override it")
    kinds = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, choices, is_list = kinds[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        names = [flag(f.name)] + ([f"--{f.name}"] if "_" in f.name else [])
        text = f"{f.metadata.get('help', '')} " + ("(required)" if default is dataclasses.MISSING else
                                                   f"(default: {default})")
        if base is bool:
            p.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True, default=default, help=text)
            p.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                           help=f"same as {names[0]} false")
            continue
        metavar = names[0][2:].upper().replace("-", "_") if choices is None else "{" + ",".join(map(str, choices)) + "}"
        p.add_argument(*names, dest=f.name, type=base, nargs="+" if is_list else None, default=default,
                       choices=choices, required=default is dataclasses.MISSING, help=text, metavar=metavar)
    return p


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice (first on line "
                                  f"{seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_config_file(path, cls):
    """{field: value} from a YAML/JSON file; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected `field: value` lines, got a {type(values).__name__}")
    kinds, names = _field_types(cls), {f.name for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"--config {path}: unknown setting {k!r}")
        if isinstance(v, list) and not kinds[k][2]:
            raise ConfigError(f"--config {path}: {k} takes one value, got a list {v!r}")
        choices = kinds[k][1]
        if choices is not None and v is not None and not all(x in choices for x in (v if isinstance(v, list) else [v])):
            raise ConfigError(f"--config {path}: {k}: invalid choice: {v!r} (choose from "
                              f"{', '.join(map(str, choices))})")
    return {k: [v] if kinds[k][2] and not isinstance(v, list) else v     # one value of a list field: a list of one
            for k, v in values.items() if v is not None}                 # null: the default


def parse(cls, argv=None, description=None):
    """A `cls` instance from the command line (and --config FILE). Wrong flags and values exit 2 (argparse)."""
    p = parser_for(cls, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    given = p.parse_known_args(argv)[0].config
    if given:
        try:
            values = read_config_file(given, cls)
        except ConfigError as e:
            p.error(str(e))
        p.set_defaults(**values)
        for action in p._actions:                       # a required field given by the file is no longer required
            if action.dest in values:
                action.required = False
    args = vars(p.parse_args(argv))
    args.pop("config")
    kinds = _field_types(cls)
    for k, v in args.items():                           # values from the file get the flag's type too
        base, _, is_list = kinds[k]
        if v is not None and base in (int, float, str) and not isinstance(v, bool):
            try:
                args[k] = [base(x) for x in v] if is_list else base(v)
            except (TypeError, ValueError):
                p.error(f"{flag(k)} {v!r}: expected {'a list of ' if is_list else ''}{base.__name__}")
    return cls(**args)


# ----------------------------------------------------------------------------------------------------------------
# Before any work: choices, the RULES table, paths.
def finite_positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def model_dir_problem(path):
    """What is missing from a save_pretrained folder (config.json, weight files, files its index names), or None."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return "not a model folder (no config.json)"
    if not any(next(path.glob(p), None) for p in WEIGHT_FILES):
        return f"config.json but no weights ({' or '.join(WEIGHT_FILES)}): an incomplete copy?"
    for index in path.glob("*.index.json"):
        try:
            named = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, UnicodeDecodeError):
            return f"{index.name} is not valid JSON"
        missing = sorted(f for f in named if not (path / f).is_file())
        if missing:
            return f"{index.name} names weight files that are missing ({', '.join(missing[:3])})"
    return None


def check_path(name, value, kind):
    """One path field (PATH_KINDS): a ConfigError naming the flag and the way out, or None."""
    p = Path(value)
    if kind in ("file", "dir", "model"):
        if kind == "model" and p.suffix == ".gguf":
            kind = "file"
        if not p.exists():
            raise ConfigError(f"{flag(name)} {value}: no such {'file' if kind == 'file' else 'folder'}")
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{flag(name)} {value}: is a folder, expected a file")
        if kind in ("dir", "model") and not p.is_dir():
            raise ConfigError(f"{flag(name)} {value}: is a file, expected a folder")
        if kind == "model" and model_dir_problem(p):
            raise ConfigError(f"{flag(name)} {value}: {model_dir_problem(p)} (expected a save_pretrained folder or a "
                              f".gguf file)")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{flag(name)} {value}: not readable")
        return
    if p.exists() and (kind == "out_dir") != p.is_dir():
        raise ConfigError(f"{flag(name)} {value}: exists and is {'not ' if kind == 'out_dir' else ''}a folder")
    parent = next(q for q in [*[p.absolute()] * (kind == "out_dir"), *p.absolute().parents] if q.exists())
    if not parent.is_dir():
        raise ConfigError(f"{flag(name)} {value}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag(name)} {value}: {parent} is not writable; choose another {flag(name)}")


def left_out(not_here, prog):
    """RULES rows for the settings a script inherits but does not use: {field: (the one value allowed, why)} -> a row
    per field that refuses any other value, naming the script and why."""
    return tuple((name, lambda c, n=name, v=value: getattr(c, n) == v, f"left out: not a setting of {prog} ({why})")
                 for name, (value, why) in not_here.items())


def check(cfg):
    """Every setting of cfg before any work: choices, cfg.RULES (field, test(cfg), what it must be: a text, or a
    function of cfg when the text names another setting's value), path fields.
    Raises ConfigError naming the flag, its value and what it must be. Returns cfg."""
    kinds = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        v, (_, choices, is_list) = getattr(cfg, f.name), kinds[f.name]
        if choices is not None and v is not None and not all(x in choices for x in (v if is_list else [v])):
            raise ConfigError(f"{flag(f.name)} {v!r}: choose from {', '.join(map(str, choices))}")
    for name, ok, want in getattr(cfg, "RULES", ()):
        if not ok(cfg):
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)!r}: must be {want(cfg) if callable(want) else want}")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("path") and v is not None:
            for one in (v if kinds[f.name][2] else [v]):                   # a list field: each of its paths
                check_path(f.name, one, f.metadata["path"])
    return cfg


def main(prog, cls, work, argv=None, description=None):
    """The one entry point of every script: parse the flags, check(cfg), then work(cfg) -> exit code. Errors the
    user can fix (ConfigError, ArtifactError) print as `prog: error: ...` on one line and return 2."""
    cfg = parse(cls, argv, description)
    try:
        return work(check(cfg))
    except (ConfigError, ArtifactError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
