"""README.md and docs/*.md: relative links and images resolve, anchors match headings (GitHub's
slug rule), the README stays short, and every docs page opens with a title and a paragraph."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target may carry a "title" after a space.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation other than hyphens, underscores and
    spaces removed, lowercase, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2, ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    found = []
    for i, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((i, m.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for line, target in links(path):
        if re.match(r"(?i)(https?:|mailto:)", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(path: Path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; move details into docs/"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_opens_with_title_and_paragraph(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert (lines and lines[0].startswith("# ")
            and lines[0][2:].strip()), f"{path}: first line is not a '# ' title"
    rest = iter(lines[1:])
    first = next((line for line in rest if line.strip()), "")
    assert first and not first.lstrip().startswith(("#", "```", "|", "!", "-", "*", ">")), (
        f"{path}: the title is not followed by a paragraph saying what the page covers"
    )


def test_checker_catches_broken_links(tmp_path: Path, monkeypatch):
    """The checks above can fail: a missing file, a wrong anchor, a link inside code is ignored."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Real-time control (`rollouts/realtime.py`)\n\n## Same\n\n## Same\n")
    page = tmp_path / "a.md"
    page.write_text(
        "# A\n\ntext [ok](b.md#real-time-control-rolloutsrealtimepy) [dup](b.md#same-1) [self](#a)\n"
        "![img](missing.png) [bad](b.md#nope) [web](https://example.com/x) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.png: no such file" in problems[0]
    assert "#nope" in problems[1]
    assert slug("Samplers (`policy/samplers/`, presets in `conf/sampler/`)") == (
        "samplers-policysamplers-presets-in-confsampler"
    )
