"""Merge SFT files into the one warm-up set (`pebr merge-sft`): filtered Mulberry-SFT plus PeBR's own SFT set.

Upstream's README says to "merge its images and JSON files with the filtered Mulberry-SFT data" by hand. Here
the records of every input are concatenated in the order given, unchanged except their image paths: each
relative path is resolved against its own input's image folder and rewritten relative to the output file's
folder, which is where `pebr sft` (and LLaMA-Factory, as its `dataset_dir`) looks for them. No image is
copied or moved, so nothing can be lost; an image that does not exist where its record says is reported by
name and the record kept as it is (`pebr filter-sft` and the SFT start-up are the places that drop records).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pebr_mega.data.records import read_json_items, write_json_atomic
from pebr_mega.errors import DataError


@dataclass
class MergeSource:
    """One input: its file, the folder its relative image paths resolve against, and its records' count."""

    path: Path
    image_root: Path
    records: int = 0
    missing_images: list[str] = field(default_factory=list)


@dataclass
class MergeResult:
    """What `merge_sft_files` wrote."""

    output: Path
    sources: list[MergeSource]
    skipped: Counter = field(default_factory=Counter)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.sources)


def _rebase(image: Any, source: MergeSource, out_dir: Path) -> Any:
    """`image` (a path string) made relative to `out_dir`; anything else (a URL, bytes) unchanged."""
    if not isinstance(image, str) or "://" in image:
        return image
    where = Path(image) if os.path.isabs(image) else source.image_root / image
    if not where.is_file():
        source.missing_images.append(image)
    return os.path.relpath(where.resolve() if where.exists() else where.absolute(), out_dir.resolve())


def _rebase_record(record: dict, source: MergeSource, out_dir: Path) -> dict:
    images = record.get("images")
    if images is None:
        return record
    rebased = [_rebase(i, source, out_dir) for i in images] if isinstance(images, list) else \
        _rebase(images, source, out_dir)
    return {**record, "images": rebased}


def merge_sft_files(inputs: list[tuple[str | Path, str | Path | None]], output: str | Path) -> MergeResult:
    """Concatenate the SFT files `inputs` ((file, image folder or None for the file's own folder) pairs) into the
    JSON list `output`, image paths rebased onto `output`'s folder. Lines that are not JSON, and items that are
    not objects, are counted skips (by reason); a missing input is a `DataError` naming it."""
    out = Path(output)
    merged: list[dict] = []
    result = MergeResult(out, [])
    for path, root in inputs:
        source = MergeSource(Path(path), Path(root) if root else Path(path).parent)
        if not source.image_root.is_dir():
            raise DataError(f"image folder of {path} not found: {source.image_root}")
        items, bad = read_json_items(path)
        result.skipped.update(s.reason for s in bad)
        for item in items:
            if not isinstance(item.value, dict):
                result.skipped["not_an_object"] += 1
                continue
            merged.append(_rebase_record(item.value, source, out.parent))
            source.records += 1
        result.sources.append(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, merged)
    return result
