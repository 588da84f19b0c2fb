"""Filter ShareGPT SFT records with the Mulberry rules (PEBR_FACTS, recipe step 1).

A record is `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...], "images": [path, ...]}`.
It is dropped, with exactly one reason counted (the first that applies, in this order), when it is

- malformed: `not_an_object`, `bad_messages` (missing/empty list, a message that is not {role, content} with a
  known role and string content), `no_assistant_message`, `bad_images` (not a list of strings),
  `image_count_mismatch` (number of `<image>` in the messages != number of images);
- `reflection`: an assistant message contains "let me rethink it" (any case);
- `missing_image`: an image file does not exist under the image root;
- `corrupt_image`: PIL cannot open, verify or decode it (a truncated file included);
- `small_image`: width or height < 28 px (one 14-px patch x the 2x2 merge).

Records are never fixed up: a kept record is written exactly as it was read. Every dropped record's index
and reason goes to a sidecar JSON next to the output, so nothing is lost silently.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pebr_mega.data.records import IMAGE_TOKEN, read_json_items, write_json_atomic
from pebr_mega.errors import DataError

REFLECTION_MARKER = "let me rethink it"
MIN_IMAGE_SIDE = 28
ROLES = ("user", "assistant", "system")

# The order in which reasons are reported in summaries (the order in which the rules are applied).
REASONS = ("malformed_json", "not_an_object", "bad_messages", "no_assistant_message", "bad_images",
           "image_count_mismatch", "reflection", "missing_image", "corrupt_image", "small_image")


@dataclass
class Dropped:
    """A record that was filtered out: where it was in the input, why, and which image if an image rule."""

    location: str  # "index 12" or "line 13"
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON form for the sidecar file."""
        return {"location": self.location, "reason": self.reason, "detail": self.detail}


@dataclass
class FilterResult:
    """The kept records (unchanged, in input order) and every dropped one with its reason."""

    kept: list[dict[str, Any]]
    dropped: list[Dropped]
    total: int
    images_checked: int = 0

    @property
    def counts(self) -> Counter:
        """Number of dropped records per reason."""
        return Counter(d.reason for d in self.dropped)

    def summary_lines(self) -> list[str]:
        """A readable summary: records read, kept, and dropped per reason (every reason, zeros included)."""
        counts = self.counts
        lines = [f"{'records read':<30}{self.total:>8}", f"{'kept':<30}{len(self.kept):>8}"]
        lines += [f"{'dropped ' + r:<30}{counts.get(r, 0):>8}" for r in REASONS]
        return lines


@dataclass
class ImageCheck:
    """The outcome of checking one image file: None when usable, else (reason, detail)."""

    problem: tuple[str, str] | None
    size: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------- rules
def structure_problem(rec: Any) -> tuple[str, str] | None:
    """(reason, detail) when `rec` is not a well-formed ShareGPT record, else None."""
    if not isinstance(rec, dict):
        return "not_an_object", f"got {type(rec).__name__}"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "bad_messages", "messages must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return "bad_messages", f"message {i} must be {{role: one of {list(ROLES)}, content: string}}"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no_assistant_message", ""
    images = rec.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return "bad_images", "images must be a list of strings"
    n_tokens = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
    if n_tokens != len(images):
        return "image_count_mismatch", f"{n_tokens} {IMAGE_TOKEN} in messages, {len(images)} images"
    return None


def has_reflection(rec: dict[str, Any]) -> bool:
    """Whether any assistant message contains the reflection marker, case-insensitively."""
    return any(m["role"] == "assistant" and REFLECTION_MARKER in m["content"].lower() for m in rec["messages"])


def check_image(path: str | Path, decode: bool = True) -> ImageCheck:
    """Open `path` with PIL and classify it: missing, corrupt (unopenable, fails verify, or truncated), small.

    `Image.open` reads only the header (size); `verify()` checks the container (PNG chunk CRCs) but not
    every format's pixel data, so a JPEG cut short passes it: with `decode` the image is re-opened and fully
    decoded, which is what catches truncation.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        return ImageCheck(("missing_image", str(p)))
    try:
        with Image.open(p) as im:
            size = im.size
            im.verify()
        if decode and min(size) >= MIN_IMAGE_SIDE:
            with Image.open(p) as im:
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return ImageCheck(("corrupt_image", f"{p}: {type(e).__name__}: {e}"))
    if min(size) < MIN_IMAGE_SIDE:
        return ImageCheck(("small_image", f"{p}: {size[0]}x{size[1]}"), size)
    return ImageCheck(None, size)


def check_images(paths: Iterable[Path], decode: bool = True, workers: int = 1,
                 progress: bool = False) -> dict[Path, ImageCheck]:
    """Check each distinct path once (records often share images); threads help because PIL decodes without the GIL."""
    unique = list(dict.fromkeys(paths))
    from tqdm import tqdm

    bar = tqdm(total=len(unique), desc="checking images", unit="img", disable=not progress or len(unique) < 1000)
    results: dict[Path, ImageCheck] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for p, res in zip(unique, pool.map(lambda q: check_image(q, decode), unique)):
            results[p] = res
            bar.update()
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------- filter
def _location_order(d: Dropped) -> int:
    return int(d.location.split()[-1])  # "index 12" / "line 13": one kind per file, so numbers order them


def _resolve(image_root: Path, rel: str) -> Path:
    return image_root / rel  # an absolute `rel` replaces the root, as os.path.join does


def filter_records(items: Sequence[tuple[str, Any]], image_root: str | Path, decode: bool = True,
                   workers: int = 1, progress: bool = False) -> FilterResult:
    """Apply the Mulberry rules to `(location, record)` pairs; returns kept records and counted drops."""
    root = Path(image_root)
    dropped: list[Dropped] = []
    candidates: list[tuple[str, dict[str, Any]]] = []
    for loc, rec in items:
        problem = structure_problem(rec)
        if problem is None and has_reflection(rec):
            problem = ("reflection", "")
        if problem is not None:
            dropped.append(Dropped(loc, *problem))
        else:
            candidates.append((loc, rec))
    checks = check_images((_resolve(root, p) for _, rec in candidates for p in rec.get("images", [])),
                          decode=decode, workers=workers, progress=progress)
    kept: list[dict[str, Any]] = []
    for loc, rec in candidates:
        problems = [checks[_resolve(root, p)].problem for p in rec.get("images", [])]
        problems = [pr for pr in problems if pr is not None]
        if problems:
            # Report the most basic failure first (missing before corrupt before small), as the rules are ordered.
            dropped.append(Dropped(loc, *min(problems, key=lambda pr: REASONS.index(pr[0]))))
        else:
            kept.append(rec)
    dropped.sort(key=_location_order)
    return FilterResult(kept, dropped, len(items), len(checks))


def sidecar_path(output: str | Path) -> Path:
    """Where the list of dropped records goes: `<output stem>.dropped.json` beside the output."""
    out = Path(output)
    return out.with_name(out.stem + ".dropped.json")


def filter_sft_file(input_path: str | Path, output_path: str | Path, image_root: str | Path,
                    decode: bool = True, workers: int = 1, progress: bool = True) -> FilterResult:
    """Read a ShareGPT JSON/JSONL file, filter it, write the kept records (JSON list) and the dropped sidecar.

    Malformed JSONL lines are dropped as `malformed_json`; a file that does not parse at all, or an image root
    that is not a folder, is a `DataError`.
    """
    if not Path(image_root).is_dir():
        raise DataError(f"image root {image_root} is not a directory (every image would count as missing)")
    items, bad_lines = read_json_items(input_path)
    result = filter_records([(it.location, it.value) for it in items], image_root, decode, workers, progress)
    result.dropped = sorted([Dropped(s.location, "malformed_json", s.detail) for s in bad_lines] + result.dropped,
                            key=_location_order)
    result.total += len(bad_lines)
    write_json_atomic(output_path, result.kept)
    write_json_atomic(sidecar_path(output_path), {
        "input": str(input_path), "output": str(output_path), "image_root": str(image_root),
        "total": result.total, "kept": len(result.kept), "counts": dict(result.counts),
        "dropped": [d.to_dict() for d in result.dropped],
    })
    return result
