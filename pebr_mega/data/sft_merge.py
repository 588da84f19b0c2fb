"""Merge SFT files into the one warm-up set (`pebr merge-sft`): filtered Mulberry-SFT plus PeBR's own SFT set.

Upstream's README says to "merge its images and JSON files with the filtered Mulberry-SFT data" by hand. Here
the records of every input are concatenated in the order given, unchanged except their image paths: each
relative path is resolved against its own input's image folder and rewritten relative to one image root, the
folder that holds every input's image folder (their deepest common folder unless given). `pebr sft` reads
them with `sft.image_root` set to that root; a path may not lead outside it (`data.allow_images_outside_root`),
which is why the paths are not made relative to the output file with `..`. No image is copied or moved, so
nothing can be lost; an image that does not exist where its record says, or that a record names by an
absolute path outside the root, is reported by name and the record kept as it is (`pebr filter-sft` and the
SFT start-up are the places that drop records).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pebr_mega.data.records import outside_root, read_json_items, write_json_atomic
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
    image_root: Path  # what the merged paths are relative to: the run's sft.image_root
    sources: list[MergeSource]
    skipped: Counter = field(default_factory=Counter)
    outside_root: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.sources)


def _rebase(image: Any, source: MergeSource, result: MergeResult) -> Any:
    """`image` (a path string) made relative to the merge's image root; anything else (a URL, bytes) unchanged,
    and so is a path that leads outside the root (reported)."""
    if not isinstance(image, str) or "://" in image:
        return image
    where = Path(image) if os.path.isabs(image) else source.image_root / image
    if not where.is_file():
        source.missing_images.append(image)
    if outside_root(where, result.image_root):
        result.outside_root.append(image)
        return image
    return os.path.relpath(os.path.realpath(where), result.image_root)


def _rebase_record(record: dict, source: MergeSource, result: MergeResult) -> dict:
    images = record.get("images")
    if images is None:
        return record
    rebased = [_rebase(i, source, result) for i in images] if isinstance(images, list) else \
        _rebase(images, source, result)
    return {**record, "images": rebased}


def merge_sft_files(inputs: list[tuple[str | Path, str | Path | None]], output: str | Path,
                    image_root: str | Path | None = None) -> MergeResult:
    """Concatenate the SFT files `inputs` ((file, image folder or None for the file's own folder) pairs) into the
    JSON list `output`, image paths rebased onto `image_root` (default: the deepest folder holding every input's
    image folder). Lines that are not JSON, and items that are not objects, are counted skips (by reason); a
    missing input or image folder, or an image folder outside `image_root`, is a `DataError` naming it."""
    out = Path(output)
    sources = [MergeSource(Path(path), Path(root) if root else Path(path).parent) for path, root in inputs]
    for source in sources:
        if not source.image_root.is_dir():
            raise DataError(f"image folder of {source.path} not found: {source.image_root}")
    folders = [os.path.realpath(s.image_root) for s in sources]
    root = Path(os.path.realpath(image_root) if image_root else os.path.commonpath(folders))
    outside = [f for f in folders if outside_root(f, root)]
    if outside:
        raise DataError(f"image folder {outside[0]} is not inside --image-root {root}")
    merged: list[dict] = []
    result = MergeResult(out, root, [])
    for source in sources:
        path = source.path
        items, bad = read_json_items(path)
        result.skipped.update(s.reason for s in bad)
        for item in items:
            if not isinstance(item.value, dict):
                result.skipped["not_an_object"] += 1
                continue
            merged.append(_rebase_record(item.value, source, result))
            source.records += 1
        result.sources.append(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, merged)
    return result
