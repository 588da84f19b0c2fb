"""GRPO records: the data config, reading JSON/JSONL datasets, and validating every record at the boundary.

A GRPO record (PEBR_FACTS, "Data records") is

    {"qid": "...", "problem": "... <image> ...", "answer": "...", "images": ["rel/path.png"], "key_words": [...]}

`load_grpo_records` reads a JSON list or a JSONL file and returns the good records together with a counted
report of every record it skipped (reason, line or index, qid), so no record disappears silently. A file
that cannot be parsed at all is a `DataError` naming the file (and the line, for JSONL).

Leniencies, each lossless: an integer `qid` becomes its decimal string; a numeric `answer` becomes its
string; a missing `key_words` becomes `[]` and is counted as a note (the keyword reward then warns per
sample). Keys other than the five are kept in `GRPORecord.extra` and written back by `save_records`.

EasyR1's layouts read too (`Columns`, from `data.prompt_key` / `answer_key` / `image_key`): JSON, JSONL or
parquet (`read_data_items`), the problem, answer and images under other column names, a record without a qid
(it gets `<file stem>-<position>`, counted as a note), and images
embedded as bytes (Hugging Face `datasets` stores an Image column as `{"bytes": ..., "path": ...}`): those are
written once, named by their content's hash, under `embedded_image_dir()`, and the record names that file, so
every later stage (split files included) reads a path as for any other record.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pebr_mega.config_fields import check_fields, positive
from pebr_mega.data.template import IMAGE_TOKEN
from pebr_mega.errors import DataError
from pebr_mega.outputs import write_bytes_atomic, write_text_atomic



@dataclass
class DataConfig:
    """Where the datasets live and the length/size limits applied when building prompts.

    Images are read only from under the image root by default: a record naming an image that resolves outside
    it (`../outside/x.png`, an absolute path, a symlink out of the root) is skipped and counted as
    `image_outside_root` (GRPO and SFT records alike); `allow_images_outside_root: true` reads them.
    """

    image_root: str | None = None  # images are resolved against this; default: the dataset file's folder
    eval_file: str | None = None  # GRPO-format validation set (a stage's own `eval_file` wins); none = no evaluation
    # A Jinja2 template rendered with the problem as `content` (EasyR1's format_prompt convention; upstream's
    # examples/format_prompt/pebr_format.jinja works unchanged); none = pebr_mega/templates/pebr_format.jinja.
    format_prompt: str | None = None
    max_prompt_length: int = 2048  # tokens; longer prompts are filtered out (and counted)
    # Response length is `rollout.max_new_tokens`; image pixel bounds are `images.min_pixels/max_pixels`.
    filter_overlong_prompts: bool = True
    require_images: bool = True  # a record whose image file is missing is skipped at load time
    # An image path that resolves (after `..` and symlinks) outside the image root - `../x.png`, an absolute path,
    # a symlink pointing out - makes its record a counted `image_outside_root` skip, unless this is true.
    allow_images_outside_root: bool = False
    # Column names of a GRPO file (EasyR1's data.prompt_key, answer_key, image_key).
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"

    def __post_init__(self) -> None:
        check_fields("data", {"max_prompt_length": positive(self.max_prompt_length),
                              "prompt_key": (bool(self.prompt_key), self.prompt_key, "must name a column"),
                              "answer_key": (bool(self.answer_key), self.answer_key, "must name a column"),
                              "image_key": (bool(self.image_key), self.image_key, "must name a column")})

    @property
    def columns(self) -> "Columns":
        return Columns(self.prompt_key, self.answer_key, self.image_key)


@dataclass(frozen=True)
class Columns:
    """Where a GRPO file keeps the problem, the answer and the images (EasyR1's prompt/answer/image keys)."""

    problem: str = "problem"
    answer: str = "answer"
    images: str = "images"


@dataclass
class GRPORecord:
    """One GRPO question: the problem text (with one `<image>` per image), its answer and key words."""

    qid: str
    problem: str
    answer: str
    images: list[str]
    key_words: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # any other keys of the source record, kept as-is

    def image_paths(self, image_root: str | Path) -> list[Path]:
        """The record's images resolved against `image_root` (absolute paths are kept)."""
        return [Path(image_root) / p for p in self.images]

    def to_dict(self) -> dict[str, Any]:
        """The record as it is written to JSON: the five fields, then the extra keys."""
        d: dict[str, Any] = {"qid": self.qid, "problem": self.problem, "answer": self.answer,
                             "images": list(self.images), "key_words": list(self.key_words)}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d


@dataclass
class Skip:
    """A record (or JSONL line) that was not loaded, and why."""

    reason: str
    location: str  # "line 7" (JSONL) or "index 3" (JSON list)
    qid: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        who = f" qid={self.qid}" if self.qid is not None else ""
        return f"{self.location}{who}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class LoadResult:
    """The records that passed validation, plus every skip and note, counted by reason."""

    path: str
    records: list[GRPORecord]
    skipped: list[Skip]
    total: int  # records (or JSONL lines holding something) read from the file
    notes: Counter = field(default_factory=Counter)  # lossless fixes applied, e.g. "key_words missing -> []"

    @property
    def counts(self) -> Counter:
        """Number of skipped records per reason."""
        return Counter(s.reason for s in self.skipped)

    def report(self, max_examples: int = 5) -> str:
        """A readable multi-line report: totals, skips per reason with a few examples, notes."""
        lines = [f"{self.path}: {len(self.records)} of {self.total} records loaded"]
        for reason, n in sorted(self.counts.items()):
            examples = [str(s) for s in self.skipped if s.reason == reason][:max_examples]
            lines.append(f"  skipped {n:>6}  {reason}: " + "; ".join(examples) + (" ..." if n > max_examples else ""))
        for note, n in sorted(self.notes.items()):
            lines.append(f"  note    {n:>6}  {note}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading JSON
@dataclass
class RawItem:
    """One object read from a JSON list or a JSONL line, with where it came from."""

    location: str
    value: Any


def image_root_for(data_file: str | Path, image_root: str | Path | None = None) -> str:
    """Where a dataset's images live: `image_root` when set, else the dataset file's folder."""
    return str(image_root) if image_root else str(Path(data_file).parent)


def outside_root(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, with `..` and symlinks resolved, lies outside `root` (resolved the same way)."""
    return not Path(path).resolve().is_relative_to(Path(root).resolve())


def outside_root_detail(paths: Sequence[str | Path], root: str | Path) -> str:
    """What an `image_outside_root` skip says: each offending path and where it resolves."""
    shown = ", ".join(f"{p} -> {Path(p).resolve()}" for p in paths)
    return f"{shown} is outside the image root {Path(root).resolve()} (data.allow_images_outside_root=true reads it)"


def read_data_items(path: str | Path) -> tuple[list[RawItem], list[Skip]]:
    """`read_json_items`, or the rows of a parquet file (`.parquet`; needs pyarrow: pip install pyarrow)."""
    p = Path(path)
    if p.suffix != ".parquet":
        return read_json_items(p)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p} is parquet, which needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        raise DataError(f"cannot read {p} as parquet: {type(e).__name__}: {e}") from None
    return [RawItem(f"row {i}", row) for i, row in enumerate(rows)], []


def embedded_image_dir() -> Path:
    """Where images embedded in data files are written (`$PEBR_CACHE`, else ~/.cache/pebr-mega)."""
    base = os.environ.get("PEBR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pebr-mega")
    return Path(base) / "embedded-images"


def _is_embedded(path: Path) -> bool:
    return path.resolve().is_relative_to(embedded_image_dir().resolve())


def _image_suffix(data: bytes) -> str:
    signatures = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp"}
    return next((ext for sig, ext in signatures.items() if data.startswith(sig)), ".img")


def write_embedded_image(data: bytes) -> str:
    """The path of a file holding `data`, named by its SHA-256 (written once, atomically; the same bytes from
    any record, process or rank share one file)."""
    folder = embedded_image_dir()
    path = folder / (hashlib.sha256(data).hexdigest()[:32] + _image_suffix(data))
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    return str(path)


def _image_entry(entry: Any) -> tuple[Any, bool]:
    """One image of an EasyR1 row as a path string: a path, bytes, or `{"bytes": ..., "path": ...}`; and whether
    it was embedded (written to a file here)."""
    data = entry.get("bytes") if isinstance(entry, dict) else entry
    if isinstance(data, (bytes, bytearray)) and data:
        return write_embedded_image(bytes(data)), True
    return (entry.get("path") if isinstance(entry, dict) else entry), False


def normalise_columns(raw: Any, columns: Columns, qid: str, notes: Counter) -> Any:
    """An EasyR1-layout row as a pebr record: columns renamed, a position qid where none is given, images as a
    list of path strings (embedded bytes written to files). Anything else is left for `parse_grpo_record` to
    judge, so a bad row is skipped with the usual reasons."""
    if not isinstance(raw, dict):
        return raw
    row = dict(raw)
    for ours, theirs in (("problem", columns.problem), ("answer", columns.answer), ("images", columns.images)):
        if theirs != ours and theirs in row:
            row[ours] = row.pop(theirs)
    if "qid" not in row:
        row["qid"] = qid
        notes["qid missing (made from the file name and position)"] += 1
    images = row.get("images")
    if isinstance(images, (dict, bytes, bytearray)):  # one Image column value, not a list of them
        images = [images]
    if isinstance(images, list):
        converted = [_image_entry(entry) for entry in images]
        embedded = sum(was_embedded for _, was_embedded in converted)
        if embedded:
            notes["images embedded as bytes (written to files)"] += embedded
        row["images"] = [path for path, _ in converted]
    return row


def read_json_items(path: str | Path) -> tuple[list[RawItem], list[Skip]]:
    """Read a JSON list or a JSONL file into items; malformed JSONL lines come back as skips.

    A file whose first non-blank character is `[` is one JSON list; anything else is JSONL (blank lines are
    ignored). A UTF-8 byte-order mark at the start is accepted (Windows editors write one). Raises `DataError` naming the file when it is missing or unparseable as a whole (a broken JSON
    list, or a JSONL file in which no line parses).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")  # utf-8-sig: the same text, less a leading BOM
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        return [RawItem(f"index {i}", v) for i, v in enumerate(data)], []
    items: list[RawItem] = []
    bad: list[Skip] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(RawItem(f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(Skip("malformed_json", f"line {lineno}", detail=e.msg))
    if bad and not items:
        raise DataError(f"{p} is neither a JSON list nor JSONL: line {bad[0].location.split()[1]} "
                        f"does not parse ({bad[0].detail})")
    return items, bad


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON to `path` atomically (`outputs.write_text_atomic`: no half-written file on a crash)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(p, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


# ------------------------------------------------------------------------------------------ validation
_REQUIRED = ("qid", "problem", "answer", "images")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def parse_grpo_record(raw: Any, notes: Counter | None = None) -> GRPORecord:
    """Validate one raw JSON value as a GRPO record; raises `ValueError("<reason>: <detail>")` when unusable."""
    if not isinstance(raw, dict):
        raise ValueError(f"not_an_object: got {type(raw).__name__}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"missing_field: {', '.join(missing)}")
    qid = raw["qid"]
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str) or not qid:
        raise ValueError(f"bad_field: qid must be a non-empty string, got {raw['qid']!r}")
    if not isinstance(raw["problem"], str):
        raise ValueError(f"bad_field: problem must be a string, got {type(raw['problem']).__name__}")
    answer = raw["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"bad_field: answer must be a string, got {type(raw['answer']).__name__}")
    # A blank answer cannot be graded (MathRuler would call it equal to a blank response), and a problem that
    # is nothing but its image tokens asks nothing: both are named skips, never trained on.
    if not answer.strip():
        raise ValueError(f"empty_answer: answer is {answer!r}")
    if not raw["problem"].replace(IMAGE_TOKEN, "").strip():
        raise ValueError(f"empty_problem: problem is {raw['problem']!r}")
    if not _is_str_list(raw["images"]):
        raise ValueError("bad_field: images must be a list of strings")
    key_words = raw.get("key_words")
    if key_words is None:
        key_words = []
        if notes is not None:
            notes["key_words missing (set to [])"] += 1
    elif not _is_str_list(key_words):
        raise ValueError("bad_field: key_words must be a list of strings")
    n_tokens = raw["problem"].count(IMAGE_TOKEN)
    if n_tokens == 0:
        raise ValueError(f"no_image_token: problem has no {IMAGE_TOKEN}")
    if n_tokens != len(raw["images"]):
        raise ValueError(f"image_count_mismatch: {n_tokens} {IMAGE_TOKEN} in problem, {len(raw['images'])} images")
    extra = {k: v for k, v in raw.items() if k not in (*_REQUIRED, "key_words")}
    return GRPORecord(qid=qid, problem=raw["problem"], answer=answer, images=list(raw["images"]),
                      key_words=list(key_words), extra=extra)


def _raw_qid(raw: Any) -> str | None:
    if isinstance(raw, dict) and isinstance(raw.get("qid"), (str, int)) and not isinstance(raw.get("qid"), bool):
        return str(raw["qid"])
    return None


def load_grpo_records(path: str | Path, image_root: str | Path | None = None,
                      require_images: bool = False, allow_outside_root: bool = False,
                      columns: Columns = Columns()) -> LoadResult:
    """Load and validate GRPO records from a JSON list or JSONL file.

    Skipped (counted, with location and qid): malformed JSONL lines, non-objects, missing or ill-typed fields,
    a blank answer (`empty_answer`), a problem with no text besides its `<image>` tokens (`empty_problem`),
    a problem without `<image>` or whose `<image>` count differs from `len(images)`, a repeated qid (the
    first one is kept), unless `allow_outside_root` a record with an image path that resolves outside
    `image_root` (`image_outside_root`), and, when `require_images`, a record with an image file that does not
    exist under `image_root` (default: the dataset file's folder).
    """
    items, skipped = read_data_items(path)
    root = Path(image_root) if image_root is not None else Path(path).parent
    notes: Counter = Counter()
    records: list[GRPORecord] = []
    seen: dict[str, str] = {}
    for position, item in enumerate(items):
        raw = normalise_columns(item.value, columns, f"{Path(path).stem}-{position}", notes)
        qid = _raw_qid(raw)
        try:
            rec = parse_grpo_record(raw, notes)
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            skipped.append(Skip(reason, item.location, qid, detail))
            continue
        if rec.qid in seen:
            skipped.append(Skip("duplicate_qid", item.location, rec.qid, f"first seen at {seen[rec.qid]}"))
            continue
        seen[rec.qid] = item.location
        if not allow_outside_root:
            outside = [p for p in rec.image_paths(root) if outside_root(p, root) and not _is_embedded(p)]
            if outside:
                skipped.append(Skip("image_outside_root", item.location, rec.qid, outside_root_detail(outside, root)))
                continue
        if require_images:
            absent = [str(p) for p in rec.image_paths(root) if not p.is_file()]
            if absent:
                skipped.append(Skip("missing_image", item.location, rec.qid, ", ".join(absent)))
                continue
        records.append(rec)
    total = len(items) + sum(1 for s in skipped if s.reason == "malformed_json")
    return LoadResult(str(path), records, skipped, total, notes)


def load_grpo_file(path: str | Path, data: DataConfig) -> LoadResult:
    """`load_grpo_records` under the data section's rules (image root, missing images, images outside the root)."""
    return load_grpo_records(path, data.image_root, require_images=data.require_images,
                             allow_outside_root=data.allow_images_outside_root, columns=data.columns)


def save_records(path: str | Path, records: Sequence[GRPORecord]) -> Path:
    """Write records as a JSON list (atomically); `load_grpo_records` reads it back unchanged."""
    return write_json_atomic(path, [r.to_dict() for r in records])

