"""README.md and docs/*.md: every relative link points at a file or folder that exists, and every
#anchor at a heading of its target; README.md stays an entry point (at most 200 lines)."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README_MAX_LINES = 200

LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(?P<title>.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(path):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_anchor(title):
    """GitHub's rule: lower-case, drop punctuation but hyphens, underscores and spaces, spaces -> hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading anchors on its text
    title = title.lower()
    title = "".join(c for c in title if c.isalnum() or c in "-_ ")
    return title.replace(" ", "-")


def anchors(path):
    seen = {}
    result = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group("title"))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def relative_links(path):
    for number, line in prose_lines(path):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group("target")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s)://, mailto:, ...
                continue
            yield number, target


def broken_links(path):
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT)}:{number}"
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append((where, target, "no such file or folder"))
            continue
        if anchor:
            if destination.is_dir() or destination.suffix.lower() != ".md":
                broken.append((where, target, "anchor into a file that is not markdown"))
            elif anchor not in anchors(destination):
                broken.append((where, target, f"no heading with anchor #{anchor}"))
    return broken


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert list((ROOT / "docs").glob("*.md")), "docs/ has no pages"


def test_relative_links_resolve():
    broken = [item for path in markdown_files() for item in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(
        f"  {where}: ({target}) {why}" for where, target, why in broken
    )


def test_readme_is_an_entry_point():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move topics into docs/"
    )


def test_github_anchor_rule():
    assert github_anchor("Acceleration (`vla_runtime/accel/`)") == "acceleration-vla_runtimeaccel"
    assert github_anchor("Offline replay (`vla-replay`)") == "offline-replay-vla-replay"
    assert github_anchor("ROS 2 (`vla_runtime/ros/`)") == "ros-2-vla_runtimeros"
