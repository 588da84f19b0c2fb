"""Write benchmark results into docs/PERFORMANCE.md, each under its own `## ` section.

The benchmarks (`tools/bench_*.py`) share these two functions so that a result always lands in the section
it belongs to, whatever order the benchmarks ran in:

- `append_to_section(path, heading, text)`: add a block of text at the end of a section;
- `add_table_row(path, heading, header, row)`: add a row to the first table of a section that starts with
  `header`, creating the table (at the end of the section) if the section has none.

A missing file or section is created. Sections are delimited by level-2 headings (`## ...`).
"""
from __future__ import annotations

from pathlib import Path


def _split(text: str, heading: str) -> tuple[list[str], list[str], list[str]]:
    """(lines before the section, the section's lines including its heading, lines after it)."""
    lines = text.split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        body = lines[:-1] if lines and lines[-1] == "" else lines
        return body + ([""] if body else []), [heading, ""], []
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[:start], lines[start:end], lines[end:]


def _join(before: list[str], section: list[str], after: list[str]) -> str:
    while section and section[-1] == "":
        section = section[:-1]
    parts = before + section + ([""] + after if after else [])
    return "\n".join(parts).rstrip("\n") + "\n"


def append_to_section(path: str | Path, heading: str, text: str) -> Path:
    """Append `text` (a markdown block) at the end of the `heading` section of `path`."""
    path = Path(path)
    existing = path.read_text() if path.exists() else "# Performance\n"
    before, section, after = _split(existing, heading)
    while section and section[-1] == "":
        section = section[:-1]
    section = section + [""] + text.strip("\n").split("\n") + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_join(before, section, after))
    return path


def add_table_row(path: str | Path, heading: str, header: str, row: str) -> Path:
    """Add `row` to the table starting with `header` (its first line) in the `heading` section of `path`."""
    path = Path(path)
    existing = path.read_text() if path.exists() else "# Performance\n"
    before, section, after = _split(existing, heading)
    first = header.split("\n")[0].strip()
    starts = [i for i, line in enumerate(section) if line.strip() == first]
    if not starts:
        while section and section[-1] == "":
            section = section[:-1]
        section = section + [""] + header.strip("\n").split("\n") + [row, ""]
    else:
        end = starts[0]
        while end + 1 < len(section) and section[end + 1].startswith("|"):
            end += 1
        section = section[: end + 1] + [row] + section[end + 1:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_join(before, section, after))
    return path
