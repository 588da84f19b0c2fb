"""tools/perf_docs.py: benchmark results land in their own section of docs/PERFORMANCE.md, whatever the order."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from perf_docs import add_table_row, append_to_section  # noqa: E402

DOC = """# Performance

Intro.

## Kernels

How to run.

## Train step

Prose.

| date | ms |
|---|---|
| 2026-01-01 | 5.0 |

More prose.

## GRPO step

Last section.
"""
HEADER = "| date | ms |\n|---|---|"


def test_rows_and_blocks_land_in_their_sections(tmp_path):
    path = tmp_path / "PERFORMANCE.md"
    path.write_text(DOC)
    append_to_section(path, "## Kernels", "### H100\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    add_table_row(path, "## Train step", HEADER, "| 2026-11-26 | 4.0 |")
    add_table_row(path, "## GRPO step", "| date | s |\n|---|---|", "| 2026-11-26 | 18.2 |")
    text = path.read_text()
    kernels, train, grpo = (text.index(h) for h in ("## Kernels", "## Train step", "## GRPO step"))
    assert kernels < text.index("### H100") < train  # the block stays inside Kernels, after its prose
    assert text.index("How to run.") < text.index("### H100")
    # the new row follows the existing one, inside the table, before the prose that follows the table
    assert train < text.index("| 2026-01-01 | 5.0 |") < text.index("| 2026-11-26 | 4.0 |") < text.index("More prose.")
    assert text.index("| 2026-11-26 | 4.0 |") < grpo
    # a section without the table gets one at its end
    assert grpo < text.index("Last section.") < text.index("| date | s |") < text.index("| 2026-11-26 | 18.2 |")
    assert text.startswith("# Performance\n\nIntro.") and text.endswith("| 2026-11-26 | 18.2 |\n")
    assert "\n\n\n" not in text


def test_missing_file_and_section_are_created(tmp_path):
    path = tmp_path / "docs" / "PERFORMANCE.md"
    add_table_row(path, "## Train step", HEADER, "| 2026-11-26 | 4.0 |")
    append_to_section(path, "## Kernels", "block")
    assert path.read_text() == ("# Performance\n\n## Train step\n\n| date | ms |\n|---|---|\n| 2026-11-26 | 4.0 |\n\n"
                                "## Kernels\n\nblock\n")
