"""docs/deviations.md stays in step with the presets (fast: parses text and configs, builds no model).

* Every preset whose header says "Paper configuration" also says "except:" and each deviation it names has a row
  in docs/deviations.md (the row's first cell).
* Every ``--set`` in docs/deviations.md parses against the preset named on its line.
* Citations of the paper in presets use one numbering: arXiv v2 or, for what only the CVPR supplement has,
  "supplement" (see the top of docs/deviations.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from farmer_cli.config.files import apply_overrides, load_preset, preset_names

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deviations.md"
PRESETS = ROOT / "presets"
HEADER = re.compile(r"Paper configuration \((?P<cite>[^)]*)\) except: (?P<names>.+?) — see docs/deviations\.md")
SET = re.compile(r"--set\s+([A-Za-z_]+\.[A-Za-z_]+=[^\s`|]+)")
PRESET = re.compile(r"--preset\s+([A-Za-z0-9_.-]+)")
CITATION = re.compile(r"(Table|Tab\.|Fig\.|Figure|Eqs?\.|§|Appendix)\s*[0-9A-Z]")


def header(path: Path) -> str:
    """The leading comment block of a TOML file as one line of text."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def row_names() -> set[str]:
    """First cells of the rows of the table under "## Deviations" in docs/deviations.md, lower-cased (its header
    and rule rows excluded)."""
    section = DOC.read_text().split("\n## Deviations\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    return {line.split("|")[1].strip().strip("*`").lower() for line in rows[1:]}


PAPER_PRESETS = [p.stem for p in sorted(PRESETS.glob("*.toml")) if "Paper configuration" in header(p)]


def test_the_paper_presets_are_found():
    assert {"imagenet256-patch8", "imagenet256-patch16", "imagenet256-1.1b-patch8", "imagenet256-1.1b-patch16",
            "imagenet64-bpd"} <= set(PAPER_PRESETS)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_name_their_deviations(name: str):
    text = header(PRESETS / f"{name}.toml")
    match = HEADER.search(text)
    assert match, f"{name}: header must read 'Paper configuration (...) except: a, b — see docs/deviations.md'"
    assert "v2" in match["cite"] or "supplement" in match["cite"], match["cite"]
    names = [n.strip() for n in match["names"].split(",")]
    assert all(names), f"{name}: empty deviation name in {match['names']!r}"
    missing = [n for n in names if n.lower() not in row_names()]
    assert not missing, f"{name}: no row in docs/deviations.md for {missing}"


def test_every_set_in_the_doc_parses_against_its_preset():
    checked = 0
    for number, line in enumerate(DOC.read_text().splitlines(), 1):
        overrides = SET.findall(line)
        if not overrides:
            continue
        presets = set(PRESET.findall(line))
        assert len(presets) == 1, f"docs/deviations.md:{number}: name exactly one --preset beside --set, got {presets}"
        (preset,) = presets
        assert preset in preset_names(), f"docs/deviations.md:{number}: unknown preset {preset}"
        # raises ConfigError on an unknown key or bad value (a line may show one --set in two commands: once here)
        apply_overrides(load_preset(preset), list(dict.fromkeys(overrides)))
        checked += len(overrides)
    assert checked >= 10


def test_the_doc_states_its_numbering():
    text = DOC.read_text()
    assert "arXiv 2510.23588 v2" in text and "supplement" in text


@pytest.mark.parametrize("path", sorted(PRESETS.glob("**/*.toml")), ids=lambda p: str(p.relative_to(PRESETS)))
def test_preset_citations_say_which_numbering(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        comment = line.split("#", 1)[1] if "#" in line else ""
        if CITATION.search(comment):
            assert "v2" in comment or "supplement" in comment, f"{path.name}:{number}: {comment.strip()}"
