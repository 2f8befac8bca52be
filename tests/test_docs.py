"""Every reference to the documentation resolves inside the repository.

- Relative markdown links in README.md and docs/*.md point at files that exist (and, with a
  #fragment into a markdown file, at a heading that exists).
- Every `docs/<name>.md` path named in the code, tests, scripts and docs exists; when it is
  followed by a quoted section (`docs/correctness.md, "The GPU check"`), that heading exists.
- Nothing points at the design notes that lived outside the repository.
- The README links docs/ and keeps its install and test commands.
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".cpp", ".h", ".cu", ".cuh", ".toml", ".cfg", ".in", ".txt",
                 ".yml", ".yaml", ""}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
DOC_PATH = re.compile(r"(docs/[A-Za-z0-9_./-]+?\.md)(?:,? \"([^\"]+)\")?")
# built from pieces so that this file does not match itself
OUTSIDE = ["shared" + "/design", "../" + "shared", "VERIFY" + ".md", "PERF" + ".md", "API" + ".md",
           "STYLE" + ".md"]


def _repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [REPO / n for n in names]
    return [f for f in files if f.is_file() and f.suffix in TEXT_SUFFIXES
            and "benchmarks/results" not in f.as_posix()]


def _markdown_files() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.MULTILINE)]


def test_docs_folder_has_the_topics():
    for name in ("architecture", "api", "correctness", "performance", "extending", "build"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in map(_slug, _headings(dest)):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: outside the repository")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_docs_paths_named_in_files_resolve():
    broken = []
    for f in _repo_files():
        text = f.read_text(errors="replace")
        for match in DOC_PATH.finditer(text):
            path, section = match.group(1), " ".join((match.group(2) or "").split())
            where = f"{f.relative_to(REPO)}: {match.group(0)}"
            if not (REPO / path).is_file():
                broken.append(f"{where} (no such file)")
            elif section and section not in _headings(REPO / path):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


def test_nothing_points_outside_the_repository():
    found = [f"{f.relative_to(REPO)}:{i}: {line.strip()}"
             for f in _repo_files() for i, line in enumerate(
                 f.read_text(errors="replace").splitlines(), 1)
             if any(s in line for s in OUTSIDE)]
    assert not found, "\n".join(found)


def test_readme_links_docs_and_keeps_its_commands():
    readme = (REPO / "README.md").read_text()
    assert re.search(r"\]\(docs/", readme), "README.md does not link docs/"
    assert 'pip install torch==2.14.1 && pip install -e ".[test]" && python -m pytest -q' in readme
    assert 'pip install torch==2.14.1 && pip install -e ".[test]" && albert-kernels bench' in readme
