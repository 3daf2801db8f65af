"""Every relative link in the documentation leads somewhere: README.md, DESIGN.md, docs/*.md and
course/**/*.md. A link names a file (or folder) that exists, and a #anchor names a heading of the
target page, slugged as GitHub does. Links inside code are not links and are not checked."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_pages(root=REPO):
    pages = [root / "README.md", root / "DESIGN.md", *sorted((root / "docs").glob("*.md")),
             *sorted((root / "course").glob("**/*.md"))]
    return [p for p in pages if p.exists()]


def prose_lines(text):
    """The lines outside fenced code blocks, with inline code spans removed."""
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield re.sub(r"`[^`]*`", "", line)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    """Every anchor a page offers; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, found = {}, set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page):
    """'target (why)' for every relative link of a page that leads nowhere."""
    broken = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == [], f"{page.relative_to(REPO)} has broken links"


def test_the_checker_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#two-words) [gone](docs/b.md) [bad](docs/a.md#three)\n"
                    "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`\n")
    assert broken_links(page) == ["docs/b.md (no such file)", "docs/a.md#three (no heading #three in a.md)"]


def test_headings_slug_as_github_does():
    assert slug("Mixture-of-Depths (`--variant mod`, mod.py)") == "mixture-of-depths---variant-mod-modpy"
    assert slug("Does each variant turn its FLOP savings into time?") == \
        "does-each-variant-turn-its-flop-savings-into-time"


def test_the_readme_stays_a_landing_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 260, f"README.md has {lines} lines: move the detail into docs/ (a landing page is about 250)"
