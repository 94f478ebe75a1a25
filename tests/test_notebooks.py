"""The teaching notebooks (notebooks/*.ipynb): committed with their outputs, and runnable top to bottom.

Two kinds of test:
  * fast: every committed notebook carries the outputs of one clean top-to-bottom run (cells numbered 1, 2, 3, ...
    in order, no error output, at least one embedded PNG), so it reads on the web without being run; each is a
    lesson of the course (an "## Exercises" section with checked solutions, a closing "## Summary", at most 500 KB,
    citing the paper itself and nothing outside the repository); and `make notebooks`' requirements are pinned;
  * slow: each notebook is executed by nbclient, as `make test` does, on an in-memory copy (the committed file is
    never rewritten), in a kernel started from THIS interpreter (the venv's python, with OMP_NUM_THREADS=1 inherited
    from conftest.py), with cwd = notebooks/. Any cell that raises fails the test, with the cell and traceback.
"""
import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
REQUIRED = ["01_hedge_and_theorem_4_1.ipynb", "02_log_partition.ipynb", "03_sppo_vs_dpo_ipo_kto.ipynb",
            "04_self_play_tiny_lm.ipynb", "05_last_iterate.ipynb", "06_sppo_vs_iterative_dpo.ipynb",
            "07_successors.ipynb"]
TIME_LIMIT_S = 120          # the budget per notebook on 2 CPU cores (they take 10-40 s)
MAX_BYTES = 500_000         # a committed notebook, outputs included: it must load quickly on the web
NOT_CITED = ("paper_notes.md", "../" + "shared", "translated paper")   # notes outside the repository, not sources


def test_required_notebooks_exist():
    missing = [n for n in REQUIRED if not (NOTEBOOK_DIR / n).is_file()]
    assert not missing, f"notebooks/ lacks {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; commit the outputs of one clean run "
        f"(Kernel > Restart & Run All, or nbclient) so the notebook reads on the web")
    errors = [i for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: error output in cell(s) {errors}"
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pngs >= 1, f"{path.name}: no embedded PNG output; the plots must be committed"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_is_a_lesson(path):
    """A lesson of the course: exercises whose solutions check themselves, a summary at the end, a size that loads
    on the web, and citations of the paper (arXiv 2405.00675, its equation numbers), never of private notes."""
    size = path.stat().st_size
    assert size <= MAX_BYTES, f"{path.name}: {size / 1000:.0f} KB; at most {MAX_BYTES / 1000:.0f} KB (smaller figures)"
    text = path.read_text(encoding="utf-8").lower()
    cited = [s for s in NOT_CITED if s.lower() in text]
    assert not cited, f"{path.name} mentions {cited}; cite the paper (arXiv 2405.00675, Eq. (N)) instead"
    nb = nbformat.read(path, as_version=4)
    starts = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("## Exercises")]
    assert starts, f"{path.name}: no markdown cell starting with '## Exercises'"
    checked = [c for c in nb.cells[starts[0] + 1:] if c.cell_type == "code" and re.search(r"\bassert", c.source)]
    assert len(checked) >= 2, f"{path.name}: {len(checked)} code cell(s) with an assert after '## Exercises'; at least 2"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.lstrip().startswith("## Summary"), (
        f"{path.name}: the last cell must be a markdown cell starting with '## Summary'")


def test_notebook_requirements_are_pinned():
    """`make notebooks` installs requirements/notebooks.txt: every requirement pinned with ==, and a package pinned
    there and in another requirements file (ipykernel: the kernel the tests run the notebooks in) at one version."""
    def pins(path):
        lines = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line and not line.startswith("-r")]
    reqs = pins(ROOT / "requirements" / "notebooks.txt")
    assert reqs, "requirements/notebooks.txt pins nothing"
    loose = [r for r in reqs if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[\w,-]+\])?==[\w.+!-]+", r)]
    assert not loose, f"requirements/notebooks.txt: not pinned with ==: {loose}"
    versions = {}
    for path in [ROOT / "requirements.txt", *sorted((ROOT / "requirements").glob("*.txt"))]:
        for r in pins(path):
            if "==" in r:
                name, version = r.split("==")
                versions.setdefault(re.sub(r"[-_.]+", "-", name.split("[")[0]).lower(), {})[path.name] = version
    clash = {n: v for n, v in versions.items() if "notebooks.txt" in v and len(set(v.values())) > 1}
    assert not clash, f"pinned at different versions: {clash}"
    assert {"jupyterlab", "ipykernel"} <= {re.sub(r"[-_.]+", "-", r.split("==")[0]).lower() for r in reqs}


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A 'python3' kernelspec that starts THIS interpreter, found first via JUPYTER_PATH.

    Without it, jupyter_client could pick a user-level or system-wide 'python3' spec that runs another python.
    """
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test interpreter)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, venv_kernel):
    committed, figures = path.read_bytes(), _mtimes(ROOT / "figures")
    nb = nbformat.read(path, as_version=4)                      # executed in memory only
    nb.cells.append(nbformat.v4.new_code_cell("import os, sys\nprint(sys.prefix, os.environ.get('OMP_NUM_THREADS'))"))
    client = NotebookClient(nb, timeout=300, kernel_name=venv_kernel, record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()                                            # raises CellExecutionError if any cell raises
    elapsed = time.perf_counter() - start
    print(f"{path.name}: executed in {elapsed:.1f} s")

    prefix, threads = nb.cells[-1].outputs[0].text.split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), f"kernel ran {prefix}, not this venv {sys.prefix}"
    assert threads == "1", "the kernel should inherit OMP_NUM_THREADS=1 from conftest.py"
    assert path.read_bytes() == committed, f"{path.name} was rewritten by its own execution"
    assert _mtimes(ROOT / "figures") == figures, f"{path.name} wrote into figures/; use a temp dir or runs/"
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.0f} s; the budget is {TIME_LIMIT_S} s on 2 CPU cores"
