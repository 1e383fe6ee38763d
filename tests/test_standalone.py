"""The repository stands alone: no file points at documents outside it (a clone has no sibling folders), and every
`docs/methods.md §N` / `docs/design.md §N` reference names a section that exists."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("src", "notebooks", "tests", "bench", "profiles", "docs")
FILES = ("params.yaml", "README.md", "Makefile", "dvc.yaml", "pyproject.toml", "environment.yml", ".ci/run")
SKIP = ("__pycache__", ".egg-info")

# Built from pieces so that this file does not match its own patterns.
_M, _D = "METHODS", "DESIGN"
OUTSIDE = re.compile(rf"\b{_M}\.md|\b{_D}\.md|\b{_M} §|\b{_D} §|\.\./shared/")
DATA_MIRROR = "shared/datasets"   # the Makefile / conftest data mirror: data, not a document
REF = re.compile(r"docs/(methods|design)\.md ((?:§\d+(?:\.\d+)*(?:\s*[-–]\s*§?\d+(?:\.\d+)*)?(?:,\s*)?)+)")
NUMBER = re.compile(r"\d+(?:\.\d+)*")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)[.\s]", re.M)


def source_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files under DIRS and FILES (a glob where git is unavailable)."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *DIRS, *FILES],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
        paths = [ROOT / n for n in names]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for d in DIRS for p in (ROOT / d).rglob("*")] + [ROOT / f for f in FILES]
    return sorted(p for p in paths if p.is_file() and not any(s in part for part in p.parts for s in SKIP))


def lines():
    for path in source_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError):   # binary, or a temporary file gone meanwhile
            continue
        for i, line in enumerate(text.splitlines(), 1):
            yield f"{path.relative_to(ROOT)}:{i}", line


def sections(doc: str) -> set[str]:
    return set(HEADING.findall((ROOT / "docs" / f"{doc}.md").read_text()))


def test_no_references_outside_the_repository():
    bad = [f"{where}: {line.strip()}" for where, line in lines()
           if OUTSIDE.search(line.replace(DATA_MIRROR, ""))]
    assert not bad, "references to documents outside the repository (use docs/methods.md or docs/design.md):\n" \
        + "\n".join(bad)


def test_every_docs_section_reference_exists():
    known = {doc: sections(doc) for doc in ("methods", "design")}
    assert {"2.1", "3.4", "4.2", "5.6", "5.7", "6.2"} <= known["methods"] and {"4", "7", "8"} <= known["design"]
    bad = [f"{where}: docs/{m.group(1)}.md §{n}" for where, line in lines() for m in REF.finditer(line)
           for n in NUMBER.findall(m.group(2)) if n not in known[m.group(1)]]
    own = (ROOT / "docs" / "methods.md").read_text()   # its own bare § references
    bad += [f"docs/methods.md: §{n}" for n in re.findall(r"§(\d+(?:\.\d+)*)", own) if n not in known["methods"]]
    assert not bad, "references to sections that do not exist:\n" + "\n".join(bad)


def test_the_patterns_catch_what_they_should():
    assert OUTSIDE.search(f"see {_M} §2.1") and OUTSIDE.search(f"..{chr(47)}shared/{_D}.md")
    assert not OUTSIDE.search("make MIRROR=../shared/datasets".replace(DATA_MIRROR, ""))
    assert not OUTSIDE.search("config.METHODS, identify.METHODS, docs/methods.md §2")
    m = REF.search("(docs/methods.md §3.3-3.5, §4.1-§4.5; paper 2)")
    assert NUMBER.findall(m.group(2)) == ["3.3", "3.5", "4.1", "4.5"]
