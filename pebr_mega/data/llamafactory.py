"""Register an SFT file in LLaMA-Factory's `dataset_info.json` (PEBR_FACTS, recipe step 1).

The entry is the one the PeBR-R1 README gives for `pebr_r1_warm_up`: ShareGPT formatting, `messages` and
`images` columns, and role/content tags with `user`/`assistant`. Other entries of an existing file are kept
as they are; a file that exists but does not parse is an error and is left untouched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pebr_mega.data.records import write_json_atomic
from pebr_mega.errors import DataError


def sharegpt_entry(file_name: str) -> dict[str, Any]:
    """The `dataset_info.json` entry for a ShareGPT file with messages and images."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }


def read_dataset_info(path: str | Path) -> dict[str, Any]:
    """The existing `dataset_info.json` as a dict ({} when the file does not exist); `DataError` if unusable."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        info = json.loads(p.read_text(encoding="utf-8-sig"))  # a leading BOM is accepted
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read existing {p} (left unchanged): {e}") from None
    if not isinstance(info, dict):
        raise DataError(f"{p} must hold a JSON object of dataset entries, got {type(info).__name__} (left unchanged)")
    return info


def register_dataset(dataset_info: str | Path, name: str, file_name: str) -> bool:
    """Add (or replace) entry `name` pointing at `file_name` in `dataset_info`; returns True if it replaced one.

    `file_name` is written as given: LLaMA-Factory resolves it against its `dataset_dir`.
    """
    if not name:
        raise DataError("dataset name must not be empty")
    info = read_dataset_info(dataset_info)
    replaced = name in info
    info[name] = sharegpt_entry(file_name)
    write_json_atomic(dataset_info, info)
    return replaced
