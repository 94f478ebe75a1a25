"""Run integrity (sppo.py's run directory, train_7b.py's stages): a resumed run never mixes settings, never drops
or moves rows, never counts an untrained model as trained, and bad settings fail before any work.

Which test shows each case of the issue (numbers as in its text):
| case | what went wrong before | test |
|---|---|---|
| 1 | resume reused artifacts made with another model/seed/temperature/max-new-tokens/selection/eta, and a finished run re-run with new eta/lr/epochs "trained" nothing | test_changed_setting_is_refused_and_nothing_is_touched, test_restart_from_moves_stale_artifacts_aside, test_generations_from_the_old_sampler_are_refused |
| 2 | truncated, shortened or reordered preferences/dataset files were used | test_edited_artifacts_are_refused, test_readers_and_sources_refuse_moved_rows |
| 3 | an untrained model counted as trained (epochs 0, empty dataset, a kill before metrics) | test_model_without_its_record_is_trained_again, test_bad_settings_fail_before_any_work |
| 4 | K < 2, zero batches, max_length 0, eta <= 0, epochs 0, selection typos, empty or short prompt files failed late or not at all; long prompts were generated from in full | test_bad_settings_fail_before_any_work, test_long_prompts_are_cut_before_generation |
| 5 | train_7b: stale generations in --stage all, --resume with changed settings, late data checks, collective timeout, orphan workers | tests/test_train_7b.py: test_stage_all_refuses_stale_generations, test_resume_refuses_changed_settings, test_bad_rows_are_refused_before_the_model_is_built, test_workers_die_with_the_agent |
| 6 | PairRM and hedge_toy inputs | tests/test_pairrm.py, tests/test_hedge_toy.py, tests/test_hedge_neighbours.py |
| fault injection | SIGKILL at points in every stage, then the same command: byte-identical artifacts | test_sigkill_anywhere_then_resume_gives_identical_artifacts |

Reliability, round two (issue 22): each case, and the test that now refuses it with one line and exit 2 before
anything is written (or gives the right result). Tests named without a file are in this file.
| case | test |
|---|---|
| an oracle without identity() recorded by class name | test_an_oracle_without_identity_is_refused, test_another_oracle_of_the_same_class_is_refused_on_resume, test_committee_identity_follows_its_judges |
| two runs on one --out mixed their artifacts | test_two_runs_on_one_out_exactly_one_runs, test_a_killed_holder_does_not_block_the_next_run |
| train_7b --iteration -1 / 5, --global-batch 3 --micro-batch 2, a model without weights, settings it does not use | test_train_7b_refuses_bad_settings_before_the_process_group |
| sppo_toy --model / --prompts / --oracle ignored, --groups 0 | tests/test_sppo_toy.py: test_demo_cli_refuses_unused_and_bad_settings_before_any_work, test_demo_cli_refuses_an_unused_setting_in_a_subprocess |
| arena --labels ONLY, --max-prompts -1, --top-p 2, --temperature 0/nan/-1, --max-new-tokens 0, --gen-batch 0, devices | tests/test_arena.py: test_cli_bad_setting_is_one_line_and_nothing_is_written, test_cli_refuses_labels_for_fewer_policies_in_a_subprocess |
| a YAML key given twice, a missing --config file, a list for a one-value setting | tests/test_sppo.py: test_sppo_cli_choices_and_config_file |
| YAML lists for arena's models / labels | tests/test_arena.py: test_config_file_lists_stay_lists |
| hedge_toy --t-max / --trials 1e12 ran for minutes | tests/test_hedge_toy.py: test_cli_refuses_sizes_that_would_run_for_hours_at_once, test_cli_caps_hold_through_a_config_file |
| last_iterate --t too large, --out missing/ failed after the sweep | tests/test_hedge_neighbours.py: test_cli_refuses_a_horizon_it_cannot_hold_at_once, test_cli_table_and_figures, test_cli_out_that_cannot_be_made_is_refused_before_the_sweep |
| --restart-from crashed half-way on OUT/iter0.bak | test_restart_from_moves_only_iteration_folders_and_decides_first |
| a truncated GGUF | test_a_truncated_gguf_is_one_line |
| a model folder with config.json but no weights; prompts not UTF-8; a text file named .parquet; --out under a file or a read-only folder; sppo.py --device bogus / cuda without CUDA; a bad line in the user's prompts advised "delete it" | test_bad_settings_fail_before_any_work |
| a PairRM folder with only config.json | tests/test_pairrm.py: test_a_folder_with_only_config_json_names_every_missing_file; tests/test_arena.py: test_cli_bad_setting_is_one_line_and_nothing_is_written[pairrm-config-json-only] |
| pairrm.py's CLI | tests/test_pairrm.py: test_cli_bad_settings_are_one_line_before_loading |
| a run directory of an older version | test_a_run_directory_of_another_version_is_refused |
| the suite flaked: two ranks' JSON joined on one stdout; processes left behind on timeout | tests/test_train_7b.py: test_rank0_decides_for_all_and_peak_memory_is_the_max_over_ranks (each rank writes its own file); test_a_timed_out_command_leaves_no_process_behind (conftest.run kills the whole tree) |
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import conftest
import policy
import runs
import sppo
import sppo_toy
import training

ROOT = Path(__file__).resolve().parents[1]


def tree(out):
    """{relative path: sha256} of every file under out but hashes.json (a cache of file hashes, not an artifact) and
    .lock (the PID of the last run that held OUT)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file() and p.name not in ("hashes.json", ".lock")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny policies, a prompt file, and one finished 2-iteration run with the game oracle."""
    root = tmp_path_factory.mktemp("integrity")
    games = sppo_toy.demo_games()
    for name, seed in [("pi_a", 0), ("pi_b", 1)]:                   # warm-started, so samples are well-formed
        model, tok = runs.load_policy(sppo_toy.build_tiny_policy(root / f"{name}.init", seed=seed),
                                      sppo.SPPOConfig(), "cpu")
        sppo_toy.warm_start(model, tok, {x: (games[x][1], sppo_toy.DEMO_START[x]) for x in games}, steps=150)
        runs.save_policy(model, tok, root / name)
    a, b = str(root / "pi_a"), str(root / "pi_b")
    prompts = root / "prompts.jsonl"
    runs.write_jsonl(prompts, [{"prompt": x} for x in ["play rps", "play weighted rps"] * 4])
    cfg = sppo_toy.DemoConfig(model=a, prompts=str(prompts), out=str(root / "run"), iterations=2, epochs=1,
                              global_batch=16, micro_batch=16, progress=False)
    assert sppo.run(cfg, oracle=oracle()) is not None
    return {"root": root, "a": a, "b": b, "prompts": prompts, "cfg": cfg}


def oracle():
    return sppo_toy.GameOracle(sppo_toy.demo_games())


def copy_run(world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world["cfg"].out, out)
    return world["cfg"].__class__(**{**world["cfg"].__dict__, "out": str(out)}), out


@pytest.mark.parametrize("change", [dict(model="b"), dict(seed=1), dict(temperature=0.7), dict(max_new_tokens=2),
                                    dict(selection="pair"), dict(eta=2.0), dict(lr=1e-3), dict(epochs=2),
                                    dict(reference="initial"), dict(log_z="estimate")])
def test_changed_setting_is_refused_and_nothing_is_touched(world, tmp_path, change):
    cfg, out = copy_run(world, tmp_path)
    name, value = next(iter(change.items()))
    value = world["b"] if value == "b" else value
    before = tree(out)
    with pytest.raises(runs.StaleStage) as e:
        sppo.run(cfg.__class__(**{**cfg.__dict__, name: value}), oracle=oracle())
    msg = str(e.value)
    assert "iter0" in msg and "--restart-from" in msg and "another --out" in msg
    if name != "model":                                          # the setting, its old and its new value
        assert f"{name} = {getattr(cfg, name)!r}" in msg and f"{name} = {value!r}" in msg
    else:
        assert "pi_t model" in msg
    assert tree(out) == before                                   # config.json not rewritten, nothing else either



def test_a_run_directory_of_another_version_is_refused(world, tmp_path):
    """A run directory whose manifests have another layout (runs.FORMAT) is refused with the way out, untouched."""
    cfg, out = copy_run(world, tmp_path)
    man = json.loads((out / "iter0" / "manifest.json").read_text())
    (out / "iter0" / "manifest.json").write_text(json.dumps({"stages": man["stages"]}))      # no format: older
    before = tree(out)
    with pytest.raises(runs.ArtifactError, match=r"iter0/manifest.json: written by another version of this code "
                                                 r"\(layout before 3, this one reads 3\); use another --out"):
        sppo.run(cfg, oracle=oracle())
    assert tree(out) == before


def test_restart_from_moves_only_iteration_folders_and_decides_first(world, tmp_path):
    """A folder like iter0.bak in OUT is not an iteration: --restart-from leaves it (it crashed half-way before)."""
    cfg, out = copy_run(world, tmp_path)
    (out / "iter0.bak").mkdir()
    (out / "iter0.bak" / "note.txt").write_text("mine")
    (out / "iterations").mkdir()
    new = cfg.__class__(**{**cfg.__dict__, "eta": 2.0, "restart_from": "dataset", "stop_after": "dataset"})
    assert sppo.run(new, oracle=oracle()) is None
    assert (out / "iter0.bak" / "note.txt").read_text() == "mine" and (out / "iterations").is_dir()
    stale = next((out / "stale").iterdir())
    assert sorted(p.name for p in stale.iterdir()) == ["iter0", "iter1"]


def test_restart_from_moves_stale_artifacts_aside(world, tmp_path):
    cfg, out = copy_run(world, tmp_path)
    old = tree(out)
    new = cfg.__class__(**{**cfg.__dict__, "eta": 2.0})
    with pytest.raises(runs.ConfigError, match="restart from dataset or an earlier stage"):
        sppo.run(cfg.__class__(**{**new.__dict__, "restart_from": "train"}), oracle=oracle())
    assert sppo.run(cfg.__class__(**{**new.__dict__, "restart_from": "dataset"}), oracle=oracle()) is not None
    stale = next((out / "stale").iterdir())
    moved = tree(stale)
    for f in ["iter0/dataset.jsonl", "iter0/metrics.json", "iter1/generations.jsonl", "iter1/manifest.json"]:
        assert moved[f] == old[f], f                             # moved aside intact, never deleted
    now = tree(out)
    assert now["iter0/generations.jsonl"] == old["iter0/generations.jsonl"]      # kept: made as this run asks
    assert json.loads((out / "config.json").read_text())["eta"] == 2.0
    assert sppo.run(new, oracle=oracle()) is not None            # and the restarted run now resumes as itself


def test_edited_artifacts_are_refused(world, tmp_path):
    for name, edit in [("iter1/preferences.jsonl", lambda ls: ls[:-1]), ("iter0/preferences.jsonl", lambda ls: ls[::-1]),
                       ("iter0/dataset.jsonl", lambda ls: ls[:-5]), ("iter1/generations.jsonl", lambda ls: ls[1:])]:
        cfg, out = copy_run(world, tmp_path / name.replace("/", "_"))
        f = out / name
        f.write_text("".join(edit(f.read_text().splitlines(keepends=True))))
        with pytest.raises(runs.StaleStage, match=f"{name}: changed since it was written"):
            sppo.run(cfg, oracle=oracle())


def test_readers_and_sources_refuse_moved_rows(world, tmp_path):
    """Without the manifest too: the readers and the D_t cross-check refuse short, reordered or foreign rows."""
    d, cfg = Path(world["cfg"].out) / "iter0", world["cfg"]
    prompts = runs.iteration_prompts(runs.load_prompts(world["prompts"]), cfg, 0)
    gens = runs.read_generations(d / "generations.jsonl", prompts, cfg.K)
    mats = runs.read_preferences(d / "preferences.jsonl", len(prompts), cfg.K)
    rows = runs.read_dataset(d / "dataset.jsonl")
    sppo.check_dataset_sources(rows, gens, mats, cfg, "d")
    f = tmp_path / "p.jsonl"
    f.write_text("".join((d / "preferences.jsonl").read_text().splitlines(keepends=True)[::-1]))
    with pytest.raises(runs.ArtifactError, match=r"p\.jsonl:1: expected prompt 0"):
        runs.read_preferences(f, len(prompts), cfg.K)
    with pytest.raises(runs.ArtifactError, match="rows for 8 prompts"):
        sppo.check_dataset_sources(rows[:-3], gens, mats, cfg, "d")
    with pytest.raises(runs.ArtifactError, match="record 1: not prompt 0's generation"):
        sppo.check_dataset_sources([rows[5]] + rows[1:5] + [rows[0]] + rows[6:], gens, mats, cfg, "d")


def test_model_without_its_record_is_trained_again(world, tmp_path):
    """A kill after the model was saved but before the train record: the model does not count; training reruns
    from pi_t and gives the uninterrupted run's weights exactly."""
    cfg, out = copy_run(world, tmp_path)
    want = load_file(out / "iter1" / "model" / "model.safetensors")
    man = json.loads((out / "iter1" / "manifest.json").read_text())
    del man["stages"]["train"]
    (out / "iter1" / "manifest.json").write_text(json.dumps(man))
    (out / "iter1" / "metrics.json").unlink()
    runs.save_policy(*runs.load_policy(out / "iter0" / "model", cfg, "cpu"), out / "iter1" / "model")  # = pi_1
    assert sppo.run(cfg, oracle=oracle()) is not None
    got = load_file(out / "iter1" / "model" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "iter1" / "metrics.json").is_file()


@pytest.mark.parametrize("change, message", [
    (dict(K=1), "--K 1: must be >= 2"), (dict(global_batch=0), "--global-batch 0: must be >= 1"),
    (dict(micro_batch=0), "--micro-batch 0"), (dict(max_length=0), "--max-length 0: must be >= 2"),
    (dict(max_length=16), "--max-prompt-length 16: must be >= 1 and below"),
    (dict(device="bogus"), "--device 'bogus': must be auto, cpu, or a torch device"),
    (dict(device="cuda:7"), "--device 'cuda:7': must be"), (dict(out="RO/run"), "RO is not writable"),
    (dict(out="ONE/run"), "ONE is a file, not a folder"),
    (dict(model="NOWEIGHTS"), "--model .*NOWEIGHTS: config.json but no weights"),
    (dict(prompts="LATIN1"), "LATIN1:2: not UTF-8 text"), (dict(prompts="FAKE.parquet"), "not a readable parquet"),
    (dict(prompts="BADJSON"), r"BADJSON:2: not valid JSON \(Expecting value at column 1\)$"),
    (dict(device="cuda"), "--device 'cuda': must be"),
    (dict(eta=0.0), "--eta 0.0: must be finite and > 0"), (dict(eta=-3.0), "--eta -3.0"),
    (dict(eta=float("nan")), "--eta nan"), (dict(epochs=0), "--epochs 0: must be >= 1"),
    (dict(selection="best"), "--selection 'best': choose from"), (dict(top_p=0.0), "--top-p 0.0"),
    (dict(model="/nonexistent"), "--model /nonexistent: no such folder"),
    (dict(prompts="EMPTY"), "0 prompts for 2 disjoint iteration slices (the file is empty)"),
    (dict(prompts="ONE", split_prompts=True), "1 prompts for 2 disjoint iteration slices")])
def test_bad_settings_fail_before_any_work(world, tmp_path, change, message):
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "ONE").write_text('{"prompt": "play rps"}\n')
    (tmp_path / "LATIN1").write_bytes('{"prompt": "play rps"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "FAKE.parquet").write_text('{"prompt": "play rps"}\n')
    (tmp_path / "BADJSON").write_text('{"prompt": "play rps"}\nplay rps\n')                  # the user's file: no
    if change.get("device") == "cuda" and torch.cuda.is_available():                    # "delete it" advice
        pytest.skip("this machine has CUDA")
    (tmp_path / "NOWEIGHTS").mkdir()
    shutil.copy(Path(world["a"]) / "config.json", tmp_path / "NOWEIGHTS")
    (tmp_path / "RO").mkdir(mode=0o555)
    files = ("EMPTY", "ONE", "LATIN1", "FAKE.parquet", "NOWEIGHTS", "RO/run", "ONE/run", "BADJSON")
    change = {k: str(tmp_path / v) if v in files else v for k, v in change.items()}
    out = Path(change.get("out", tmp_path / "run"))
    cfg = world["cfg"].__class__(**{**world["cfg"].__dict__, "out": str(out), **change})
    if change.get("out", "").endswith("RO/run") and os.access(tmp_path / "RO", os.W_OK):
        pytest.skip("root ignores the read-only bit here")
    with pytest.raises((runs.ConfigError, runs.ArtifactError), match=message if "\\(" in message else
                       message.replace("(", r"\(").replace(")", r"\)")):
        sppo.run(cfg, oracle=oracle())
    assert not out.exists() or not any(out.iterdir())            # nothing written


def test_one_line_errors_exit_2(world, tmp_path, capsys):
    """From the command line a user error is one line on stderr and exit code 2, never a traceback."""
    assert sppo.main(["--model", world["a"], "--prompts", str(world["prompts"]), "--eta", "-1", "--out",
                      str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sppo.py: error: --eta -1.0")
    assert sppo.main(["--model", world["a"], "--prompts", str(world["prompts"]), "--out", str(tmp_path / "x")]) == 2
    assert "--pairrm" in capsys.readouterr().err                 # --oracle pairrm without a checkpoint


def test_long_prompts_are_cut_before_generation(world, capsys):
    """A prompt past max_prompt_length (and past the tiny model's 64 positions) is cut by the training rule, the
    END kept, and counted; the samples equal those of the pre-cut prompt."""
    model, tok = runs.load_policy(world["a"], world["cfg"], "cpu")
    cfg = sppo.SPPOConfig(K=3, max_new_tokens=3, max_prompt_length=8, max_length=32, seed=1, progress=False)
    long = "rock " * 600 + "play rps"
    got = policy.generate_responses(model, tok, [long, "play rps"], cfg)
    assert "1 of 2 prompts cut to their last max_prompt_length=8 tokens" in capsys.readouterr().out
    ids = policy.prompt_ids(tok, long)[-8:]
    assert policy.encode_example(tok, long, "rock", True, 32, 8)[0] == ids          # the same rule as training
    assert len(got) == 2 and all(len(g["responses"]) == 3 for g in got)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_identical_artifacts(tmp_path):
    """The demo CLI, SIGKILLed when each stage's file appears (generate, rank, dataset, a model being saved, the
    next iteration), resumed each time with the same command: the final artifacts equal an uninterrupted run's
    byte for byte (models: tensor for tensor)."""
    def cmd(out):
        return [sys.executable, str(ROOT / "sppo_toy.py"), "--iterations", "2", "--groups", "6", "--epochs", "2",
                "--out", str(out), "--figure", str(out / "gap.png"), "--no-progress"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    conftest.run(cmd(full), check=True, cwd=ROOT, timeout=300)
    kills = 0
    for marker in ["iter0/generations.jsonl", "iter0/preferences.jsonl", "iter0/dataset.jsonl", "iter0/model.tmp",
                   "iter1/generations.jsonl", "iter1/model.tmp"]:
        with conftest.spawn(cmd(cut), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
            conftest.wait_until(lambda: p.poll() is not None or (cut / marker).exists(), 300, 0.005)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                kills += 1
            p.wait()
    assert kills >= 4
    conftest.run(cmd(cut), check=True, cwd=ROOT, timeout=300)
    a, b = tree(full), tree(cut)
    for f in a:
        if f.endswith(".jsonl") and "stale" not in f:
            assert a[f] == b[f], f
    for t in (0, 1):
        x, y = (load_file(o / f"iter{t}" / "model" / "model.safetensors") for o in (full, cut))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_reference_initial_keeps_pi_0_and_another_loss_is_refused(world, tmp_path):
    """--loss dpo --reference initial for 2 iterations: iteration 1's ref_logp are pi_0's log-probs (recomputed here),
    not pi_1's; the finished run re-run with --loss ipo is refused at iteration 0's train stage, the loss named."""
    cfg = world["cfg"].__class__(**{**world["cfg"].__dict__, "out": str(tmp_path / "run"), "selection": "pair",
                                    "loss": "dpo", "reference": "initial", "global_batch": 4, "micro_batch": 4})
    assert sppo.run(cfg, oracle=oracle()) is not None
    rows = runs.read_dataset(tmp_path / "run" / "iter1" / "dataset.jsonl")
    assert [r["role"] for r in rows[:2]] == ["winner", "loser"]
    pi_0, tok = runs.load_policy(cfg.model, cfg, "cpu")
    pi_1, _ = runs.load_policy(tmp_path / "run" / "iter0" / "model", cfg, "cpu")
    pairs, _ = training.encode_rows(tok, rows, cfg)
    lp_0, lp_1 = (policy.batched_logps(m, pairs, tok.pad_token_id) for m in (pi_0, pi_1))
    assert max(abs(r["ref_logp"] - a) for r, a in zip(rows, lp_0)) < 1e-4
    assert max(abs(r["ref_logp"] - b) for r, b in zip(rows, lp_1)) > 1e-2          # pi_1 moved: not its log-probs
    assert {r["ref_by"]["model"] for r in rows} == {runs.Hashes(tmp_path / "run")(cfg.model)}
    d, prompts = tmp_path / "run" / "iter1", runs.iteration_prompts(runs.load_prompts(world["prompts"]), cfg, 1)
    gens, mats = runs.read_generations(d / "generations.jsonl", prompts, cfg.K), runs.read_preferences(
        d / "preferences.jsonl", len(prompts), cfg.K)
    w, l = rows[0]["k"], rows[1]["k"]
    assert [rows[0]["pair_prob"], rows[1]["pair_prob"]] == [mats[0][w][l], mats[0][l][w]]       # P(y_w > y_l), back
    sppo.check_dataset_sources(rows, gens, mats, cfg, "d")
    with pytest.raises(runs.ArtifactError, match="record 2: not prompt 0's generation"):      # an edited pair_prob
        sppo.check_dataset_sources([rows[0], dict(rows[1], pair_prob=rows[1]["pair_prob"] + 0.25)] + rows[2:], gens,
                                   mats, cfg, "d")
    with pytest.raises(runs.StaleStage, match="loss = 'dpo'.*loss = 'ipo'"):
        sppo.run(cfg.__class__(**{**cfg.__dict__, "loss": "ipo"}), oracle=oracle())


# ------------------------------------------------------------------------------------------------------------------
# Oracles: identity() is required, and it tells oracles of one class apart.
class NoIdentity:
    def __call__(self, prompt, responses):
        return sppo_toy.GameOracle(sppo_toy.demo_games())(prompt, responses)


def test_an_oracle_without_identity_is_refused(world, tmp_path):
    cfg = world["cfg"].__class__(**{**world["cfg"].__dict__, "out": str(tmp_path / "run")})
    with pytest.raises(runs.ConfigError, match="oracle NoIdentity has no identity\\(\\)"):
        sppo.run(cfg, oracle=NoIdentity())
    assert not (tmp_path / "run").exists()


def test_another_oracle_of_the_same_class_is_refused_on_resume(world, tmp_path):
    """Two GameOracles with different games: different identities; resuming with the other one is refused at the
    rank stage (it would have reused preferences of another game)."""
    cfg, out = copy_run(world, tmp_path)
    games = sppo_toy.demo_games()
    other = {x: (P.T.copy(), ys) for x, (P, ys) in games.items()}                        # every preference reversed
    a, b = sppo_toy.GameOracle(games), sppo_toy.GameOracle(other)
    assert type(a) is type(b) and a.identity() != b.identity()
    before = tree(out)
    with pytest.raises(runs.StaleStage, match=r"iter0/preferences.jsonl: made with setting oracle_id"):
        sppo.run(cfg, oracle=b)
    assert tree(out) == before
    assert sppo.run(cfg, oracle=a) is not None                    # the same oracle resumes as before


def test_committee_identity_follows_its_judges():
    one, two = (sppo.ORACLES["committee"](sppo.SPPOConfig(oracle="committee", judges=j), "cpu", None)
                for j in ("concise,on_topic,well_formed", "concise,well_formed"))
    assert type(one) is type(two) and one.identity() != two.identity()


# ------------------------------------------------------------------------------------------------------------------
# One run per run directory (OUT/.lock).
def sppo_cli(world, out, *extra):
    """A 1-iteration sppo.py run with the committee. --selection all: the committee ties the two 3-token answers of
    every prompt here, and --selection pair keeps no pair of a tied prompt (it would stop at the dataset stage)."""
    return [sys.executable, str(ROOT / "sppo.py"), "--model", world["a"], "--prompts", str(world["prompts"]),
            "--oracle", "committee", "--iterations", "1", "--K", "2", "--max-new-tokens", "3", "--max-length", "32",
            "--max-prompt-length", "16", "--global-batch", "8", "--micro-batch", "8", "--selection", "all",
            "--no-progress", "--out", str(out), *extra]


def test_two_runs_on_one_out_exactly_one_runs(world, tmp_path):
    """Started together on one OUT: one runs to the end, the other exits 2 at once naming the holder's PID."""
    out = tmp_path / "run"
    with conftest.spawn(sppo_cli(world, out, "--seed", "1"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as one, conftest.spawn(sppo_cli(world, out, "--seed", "2"), cwd=ROOT,
                                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                          text=True) as two:
        res = {p.pid: (*p.communicate(timeout=300), p.returncode) for p in (one, two)}
    assert sorted(r[2] for r in res.values()) == [0, 2], res
    (winner, _), (_, loser) = sorted(res.items(), key=lambda kv: kv[1][2])
    assert loser[1].strip().count("\n") == 0 and f"another run is using it (PID {winner}" in loser[1], loser
    assert (out / "iter0" / "model").is_dir() and json.loads((out / "config.json").read_text())["seed"] == (
        1 if winner == one.pid else 2)                                  # the winner's run, not a mix of the two


def test_a_killed_holder_does_not_block_the_next_run(world, tmp_path):
    out = tmp_path / "run"
    with conftest.spawn(sppo_cli(world, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
        assert conftest.wait_until(lambda: (out / ".lock").is_file() and (out / ".lock").read_text().strip() ==
                                   str(p.pid), 120), "the run never took OUT/.lock"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    r = conftest.run(sppo_cli(world, out), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------------
# train_7b.py and the GGUF loader: refused before the process group, one line, exit 2.
@pytest.mark.parametrize("args, message", [
    (["--stage", "generate", "--iteration", "-1"], "--iteration -1: must be in [0, --iterations)"),
    (["--stage", "generate", "--iteration", "5"], "--iteration 5: must be in [0, --iterations)"),
    (["--global-batch", "3", "--micro-batch", "2"], "--global-batch 3: must be a multiple of --micro-batch"),
    (["--device", "cuda"], "--device 'cuda': must be left out: not a setting of this program"),
    (["--oracle", "committee"], "--oracle 'committee': must be left out: not a setting of this program"),
    (["--model", "NOWEIGHTS"], "NOWEIGHTS: config.json but no weights"),
    (["--save-every", "0"], "--save-every 0: must be >= 1")])
def test_train_7b_refuses_bad_settings_before_the_process_group(world, tmp_path, capsys, args, message):
    import train_7b
    (tmp_path / "NOWEIGHTS").mkdir()
    shutil.copy(Path(world["a"]) / "config.json", tmp_path / "NOWEIGHTS")
    data = tmp_path / "dataset.jsonl"
    runs.write_jsonl(data, sppo_toy.synthetic_dataset(4))
    args = [str(tmp_path / a) if a == "NOWEIGHTS" else a for a in args]
    base = ["--model", world["a"], "--data", str(data), "--prompts", str(world["prompts"]), "--pairrm", str(tmp_path),
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert train_7b.main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train_7b.py: error: ") and message in err, err
    assert not (tmp_path / "out").exists()                                              # nothing written


def test_a_truncated_gguf_is_one_line(tmp_path):
    """A GGUF cut short (an interrupted download) is refused as such, not with struct.error's traceback."""
    import real_run
    whole = Path(real_run.smollm2_gguf()).read_bytes()
    for n in (5000, 2_000_000):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(whole[:n])
        with pytest.raises(runs.ArtifactError, match=f"cut{n}.gguf: transformers cannot load this GGUF file, "
                                                     f"truncated or not a model"):
            runs.gguf_checkpoint(cut, cache=tmp_path / "cache")
        assert not any((tmp_path / "cache").glob("*/config.json"))


@pytest.mark.slow
def test_a_timed_out_command_leaves_no_process_behind():
    """conftest.run, which every test uses to start a command: on timeout it kills what the command started in a
    session of its own too (as torchrun starts its workers), not only the direct child."""
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
            " start_new_session=True); print(p.pid, flush=True); time.sleep(600)")
    with pytest.raises(subprocess.TimeoutExpired) as e:
        conftest.run([sys.executable, "-c", code], timeout=10)
    grandchild = int(e.value.stdout.split()[0])
    assert conftest.wait_until(lambda: not conftest.alive(grandchild), 30)
