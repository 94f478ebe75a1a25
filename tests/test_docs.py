"""The README is a front page and docs/ holds the rest: the README stays short, every relative link in README.md and
docs/*.md reaches an existing file (and, for `page.md#anchor`, an existing heading of that page, by GitHub's anchor
rule), every repository path the README names in backticks exists, the root stays tidy, and no tracked file points
at notes outside the repository."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES, MAX_LINE, MAX_ROOT_ENTRIES = 200, 160, 30   # 30: losses.py (#25) and training.py (sppo.py's step 4)

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")   # [text](target), ![alt](target)
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)", re.M)          # [name]: target
CODE_SPAN = re.compile(r"`[^`\n]+`")


def prose(text: str) -> str:
    """The text without fenced code blocks (links and headings there are not links and headings)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, '_', '-' and spaces stay),
    spaces turned into '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a Markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = github_anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(page.read_text(encoding="utf-8")))
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of page that do not resolve: a missing file, or a missing heading for `#anchor`."""
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto: are not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.relative_to(root)}: {target} (no heading with that anchor)")
    return bad


def tracked_files() -> list[str]:
    try:
        r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in r.stdout.decode().split("\0") if f]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move the detail to docs/"
    long = [f"README.md:{i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > MAX_LINE]
    assert not long, long


def test_every_relative_link_resolves():
    assert len(PAGES) > 5                                                # README and the docs pages
    assert all(links(p) for p in PAGES), "every page links somewhere (at least back to the README)"
    bad = [b for page in PAGES for b in broken_links(page)]
    assert not bad, "\n".join(bad)


def test_link_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    """The checker itself: a missing page, a missing heading and a good link, on a page written here."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A heading: with `code`, and punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code-and-punctuation) [gone](missing.md) "
                    "[bad](other.md#no-such-heading) [web](https://example.org/x.md) `[not](a-link.md)`\n"
                    "```\n[nor](in-code.md)\n```\n[ref]: other.md#other-page\n[badref]: other.md#nope\n")
    bad = broken_links(page, root=tmp_path)
    assert bad == ["page.md: missing.md (no such file)",
                   "page.md: other.md#no-such-heading (no heading with that anchor)",
                   "page.md: other.md#nope (no heading with that anchor)"], bad


def test_paths_the_readme_names_exist():
    """Each path-like word of a code span in the README's prose (`hedge_toy.py`, `python compare.py --world lm`,
    `tests/test_sppo.py`) names a file or folder of the repository, and so does every docs/ page it mentions
    anywhere, code blocks included."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    words = {w for span in CODE_SPAN.findall(prose(readme)) for w in span.strip("`").split()}
    paths = {w for w in words if re.fullmatch(r"[\w.][\w.-]*/[\w./-]*|[\w-]+\.(py|md|ipynb|yaml|txt|jsonl?|png)", w)}
    paths |= set(re.findall(r"\bdocs/[\w.-]+\.md\b", readme))
    assert {"tests/test_sppo.py", "hedge_toy.py", "docs/conventions.md"} <= paths   # the check sees what it should
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_root_is_tidy():
    """`ls` at the root (tracked entries, hidden ones not counted) stays short enough to read at a glance."""
    entries = {f.split("/")[0] for f in tracked_files()} - {""}
    entries = {e for e in entries if not e.startswith(".")}
    assert len(entries) <= MAX_ROOT_ENTRIES, sorted(entries)


def test_no_tracked_file_points_outside_the_repository():
    """Private notes live outside the repository; what they say that the code needs is in docs/, in our words."""
    needle = "shared" + "/"
    hits = []
    for name in tracked_files():
        f = ROOT / name
        if not f.is_file():
            continue
        data = f.read_bytes()
        if b"\0" in data:                                                # binary (figures): nothing to read
            continue
        hits += [f"{name}:{i}" for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1)
                 if needle in line]
    assert not hits, hits


def test_the_file_map_lists_every_module_and_nothing_else():
    """The README's `## Files` block names every tracked module at the root, and every name in it exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Files", 1)[1].split("```", 2)[1]
    listed = {line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")}
    modules = {f for f in tracked_files() if "/" not in f and f.endswith(".py")}
    assert modules <= listed, sorted(modules - listed)
    assert all((ROOT / name).exists() for name in listed), sorted(n for n in listed if not (ROOT / n).exists())


def test_imports_run_the_way_the_readme_draws_them():
    """Each root module imports only modules on the README's import-graph lines above its own (no cycles), read from
    its source (ast), so the graph cannot drift from the code."""
    import ast
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Imports run one way", 1)[1].split("```", 2)[1]
    rank = {}
    for i, line in enumerate(block.strip().splitlines()):
        names = line.split("<-")[0] if "<-" in line else line.split("none of ours")[0]
        for name in re.findall(r"[\w/]+", names):
            rank.setdefault(name, i)
    ours = {f[:-3] for f in tracked_files() if "/" not in f and f.endswith(".py")}
    assert ours <= set(rank), sorted(ours - set(rank))
    for mod in sorted(ours):
        tree = ast.parse((ROOT / f"{mod}.py").read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = sorted(m for m in imported & ours if rank[m] >= rank[mod])
        assert not bad, f"{mod} imports {bad}, drawn on the same line or below it in the README"
