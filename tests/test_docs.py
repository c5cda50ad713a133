"""README.md and docs/*.md stay a short front door with one home per measured number.

- README.md is at most 250 lines, its quick start starts within the first 60 and it shows
  `make test` (the command .ci/run runs);
- every relative link of README.md and docs/*.md points to an existing file (and, for a
  Markdown target with `#anchor`, to one of its headings);
- every percentage (`75.0%`), bracketed interval (`[+1.2, +9.0]`), ratio (`8.86x`,
  `0.97-4.04x`) and decimal gain in points (`+4.6 points`) in those pages is found in the measured files: the generated tables and
  the hand-written reading under results/ (results/**/*.md) or the benchmark JSON
  (results/*.json). A figure typed into the docs without a home there fails.

No engine, no model: a few milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

MAX_README_LINES = 250
QUICK_START_WITHIN = 60

_NUM = r"\d+(?:\.\d+)?"
# `75.0%`, `+4.6 %`; not part of a longer token (`x75%` or `1.5.0%`).
PERCENT = re.compile(rf"(?<![\w.])[+-]?({_NUM})\s?%")
# `[+1.2, +9.0]`, `[-0.4, +1.7]`: decimals on both ends, so `[0, 1]` index lists or
# `[-100, 100]` limits are not claims.
INTERVAL = re.compile(r"\[\s*([+-]?\d+\.\d+)\s*,\s*([+-]?\d+\.\d+)\s*\]")
# `8.86x`, `0.97-4.04x`: a decimal ratio or a range of them.
RATIO = re.compile(r"(?<![\w.])(\d+\.\d+)(?:\s*-\s*(\d+\.\d+))?x(?![\w])")
# `+4.6 points`, `8.6 percentage points`: a decimal, signed or not.
POINTS = re.compile(r"(?<![\w.])([+-]?\d+\.\d+) (?:percentage )?points")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def normalize(text: str) -> str:
    """One spelling of minus signs and dashes, single spaces."""
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-")
    return re.sub(r"\s+", " ", text)


def doc_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def measured_sources(root: Path) -> tuple[str, list[float]]:
    """The text of every Markdown file under results/ (generated tables and the reading)
    and the ratios of the benchmark JSON files (results/*.json, their `ratios` entries)."""
    results = root / "results"
    text = "\n".join(normalize(path.read_text(encoding="utf-8"))
                     for path in sorted(results.rglob("*.md")))
    ratios: list[float] = []

    def collect(node, under_ratios: bool = False) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                collect(value, under_ratios or key == "ratios")
        elif isinstance(node, list):
            for value in node:
                collect(value, under_ratios)
        elif under_ratios and isinstance(node, (int, float)) and not isinstance(node, bool):
            ratios.append(float(node))

    for path in sorted(results.glob("*.json")):
        collect(json.loads(path.read_text(encoding="utf-8")))
    return text, ratios


def _percent_found(number: str, text: str) -> bool:
    """`NUM%` in the sources, or NUM leading a cell of a generated table (accuracy in %)."""
    n = re.escape(number)
    return bool(re.search(rf"(?<![\d.]){n}\s?%", text)
                or re.search(rf"\|\s*[+-]?{n}(?![\d.])(?:\s[^|]*)?\|", text))


def _ratio_found(low: str, high: str | None, text: str, ratios: list[float]) -> bool:
    if high is not None:        # a range is a reading: it must be written as such
        return bool(re.search(rf"(?<![\d.]){re.escape(low)}-{re.escape(high)}x", text))
    return (bool(re.search(rf"(?<![\d.]){re.escape(low)}\s?x(?![\w])", text))
            or any(round(value, 2) == float(low) for value in ratios))


def unsourced_numbers(page_text: str, text: str, ratios: list[float]) -> list[str]:
    """The percentages, intervals and ratios of `page_text` not found in the sources."""
    page = normalize(page_text)
    missing = []
    for match in INTERVAL.finditer(page):
        claim = f"[{match[1]}, {match[2]}]"
        if claim not in text:
            missing.append(claim)
    for match in RATIO.finditer(page):
        if not _ratio_found(match[1], match[2], text, ratios):
            missing.append(match[0])
    for match in POINTS.finditer(page):
        if not re.search(rf"(?<![\w.]){re.escape(match[1])}(?![\d.])", text):
            missing.append(match[0])
    for match in PERCENT.finditer(page):
        if not _percent_found(match[1], text):
            missing.append(match[0].strip())
    return missing


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: link text kept, code ticks dropped,
    punctuation removed, lower case, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    body = FENCE.sub("", path.read_text(encoding="utf-8"))
    for line in body.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_anchor(match[1])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file (or Markdown heading) does not exist."""
    body = FENCE.sub("", page.read_text(encoding="utf-8"))
    body = re.sub(r"`[^`\n]*`", "", body)          # inline code is not a link
    broken = []
    for target in LINK.findall(body):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):    # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(target)
    return broken


# ---- the repository's pages ----

def test_readme_is_a_front_door():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"
    quick = [n for n, line in enumerate(lines, 1) if line.startswith("## Quick start")]
    assert quick and quick[0] <= QUICK_START_WITHIN, f"quick start at line {quick}"
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and any(line.startswith("make test ") or line == "make test"
                                     for line in lines), "README must show `make test`"


@pytest.mark.parametrize("page", doc_pages(REPO_ROOT), ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_pages(REPO_ROOT), ids=lambda p: p.name)
def test_every_measured_number_has_its_home_in_results(page):
    text, ratios = measured_sources(REPO_ROOT)
    missing = unsourced_numbers(page.read_text(encoding="utf-8"), text, ratios)
    assert missing == [], (f"{page.name}: figures not found in results/ (put the measurement "
                           f"in results/README.md or a generated file, link to it): {missing}")


# ---- the checkers themselves, on a fake repository ----

@pytest.fixture
def fake_repo(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.md").write_text(
        "| model | ICL | DT | Δ |\n|---|---|---|---|\n"
        "| smol | 70.2 | 75.0 | +4.8 [+3.2, +6.4] |\n| smol | 51 positive | 88 positive | |\n")
    (results / "README.md").write_text("ran 0.97\u20134.04x faster, ICL 12.0% of the time; "
                                       "interval [\u22120.4, +1.7]\n")
    (results / "bench.json").write_text(json.dumps(
        {"runs": [{"ratios": {"deepthink/icl-apc": 8.8612}, "requests": 128}]}))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Two words `here`\n")
    return tmp_path


def test_number_check_accepts_numbers_found_in_the_sources(fake_repo):
    text, ratios = measured_sources(fake_repo)
    page = ("+4.8 [+3.2, +6.4], [-0.4, +1.7]; 75.0% against 70.2%; 51% positive; 12.0 %; "
            "0.97-4.04x; 8.86x (a JSON ratio); +4.8 points, 4.8 points; [0, 1] and [-100, 100] are not "
            "intervals")
    assert unsourced_numbers(page, text, ratios) == []


def test_number_check_reports_unknown_numbers(fake_repo):
    text, ratios = measured_sources(fake_repo)
    page = ("a gain of +4.9 points [+3.1, +6.4] (75.1%), 3.20x faster, 0.97-4.05x, 128% "
            "and [+3.2, +6.5]; -4.8 points (a sign is part of the claim)")
    assert unsourced_numbers(page, text, ratios) == [
        "[+3.1, +6.4]", "[+3.2, +6.5]", "3.20x", "0.97-4.05x", "+4.9 points", "-4.8 points",
        "75.1%", "128%"]
    # a number is matched whole: 4.8 is in the table, 4.80 and 48 are not
    assert unsourced_numbers("4.80% and 48%", text, ratios) == ["4.80%", "48%"]


def test_link_check_reports_missing_files_and_anchors(fake_repo):
    page = fake_repo / "README.md"
    page.write_text("[ok](docs/page.md) [ok](docs/page.md#two-words-here) [web](https://x.y/z)\n"
                    "[gone](docs/missing.md) [bad anchor](docs/page.md#nope) `[code](nowhere)`\n"
                    "```\n[in a block](nowhere.md)\n```\n[self](#also-missing)\n")
    assert broken_links(page) == ["docs/missing.md", "docs/page.md#nope", "#also-missing"]
