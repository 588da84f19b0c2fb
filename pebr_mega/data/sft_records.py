"""SFT records as LLaMA-Factory reads them: ShareGPT conversations from JSON or JSONL, tokenised with the
loss on the assistant turns and truncated at the cutoff the way LLaMA-Factory truncates.

Upstream trains the warm-up with LLaMA-Factory (`docs/qwen2_5vl_full_sft.yaml` in cythu/PeBR-R1: template
`qwen2_vl`, `cutoff_len` 4096). What is reproduced here, read from hiyouga/LLaMA-Factory:

- Columns and tags (`data/parser.py`, `DatasetAttr`): a `dataset_info.json` entry names the messages and
  images columns and the role/content/user/assistant/system tags; its defaults are `conversations` with
  `from`/`value`/`human`/`gpt`. Without an entry, a record with `messages` is read with `role`/`content`/
  `user`/`assistant` (PeBR's `pebr_r1_warm_up` entry) and one with `conversations` with the defaults.
- Turns (`data/converter.py`, `SharegptDatasetConverter`): a leading system turn becomes the system prompt;
  the rest must alternate user, assistant, ... and be even in number, else the record is skipped (counted
  here, by reason). Tool turns (observation / function) are not supported and are skipped the same way.
- Images (`data/converter.py` `_find_medias`, `data/mm_plugin.py` `_preprocess_image`): a path is joined to
  the image root when that file exists, else used as written (here, one that resolves outside the image root
  is the skip `image_outside_root` unless `data.allow_images_outside_root`); the image is scaled down to at most
  `image_max_pixels` (768 x 768 by default) and up to at least `image_min_pixels` (32 x 32) with the sides
  truncated to integers, then `convert("RGB")` (transparency dropped, not composited); sides under 28 px are
  raised to 28 and aspect ratios over 200 squashed to 180 (Qwen2-VL plugin). The image decoder then applies
  the model's smart resize. Before all that, and unlike LLaMA-Factory, the EXIF orientation is applied and a
  16-bit (or 32-bit) image is scaled to 8 bits (`images.upright_8bit`), as for the RL images.
- Truncation (`data/processor/supervised.py`, `processor_utils.infer_seqlen`): the conversation is a list of
  (source, target) pairs: source = the system prompt (first pair only) + the user turn + the assistant header,
  target = the reply + `<|im_end|>\\n`. Pairs are taken in order while the running length is under the cutoff;
  each gets the remaining budget split by `infer_seqlen` (a short target keeps its length and the source is
  cut; a short source keeps its length and the target is cut; otherwise both are cut in proportion to their
  lengths), each keeping its beginning. Targets are the loss positions. A truncated conversation is kept and
  counted, never skipped.

One thing LLaMA-Factory does not guard and this reader does: a cut that falls inside an image block
(`<|vision_start|>` ... `<|vision_end|>`) would leave image pads without their image features. The cut moves
back to the start of that block, and that image (with any other image whose block is not whole) is dropped
from the conversation's pixels; such conversations are counted as `images_dropped`.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from pebr_mega.data.images import ImageDecoder, num_image_tokens, open_image, upright_8bit
from pebr_mega.data.prompts import VISION_END, VISION_START, expand_image_placeholders
from pebr_mega.data.records import outside_root, read_json_items
from pebr_mega.data.template import IMAGE_TOKEN
from pebr_mega.errors import DataError, ImageError

# LLaMA-Factory's defaults for Qwen2-VL images (hparams `image_max_pixels` / `image_min_pixels`).
LLAMAFACTORY_IMAGE_MAX_PIXELS = 768 * 768
LLAMAFACTORY_IMAGE_MIN_PIXELS = 32 * 32


@dataclass(frozen=True)
class ShareGPTColumns:
    """Where a ShareGPT record keeps its turns and images, and how it names the roles."""

    messages: str = "conversations"
    images: str | None = "images"
    system: str | None = None  # a column holding the system prompt (used when there is no system turn)
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str | None = "system"
    observation_tag: str = "observation"
    function_tag: str = "function_call"


FROM_VALUE = ShareGPTColumns()  # LLaMA-Factory's defaults
ROLE_CONTENT = ShareGPTColumns(messages="messages", role_tag="role", content_tag="content", user_tag="user",
                               assistant_tag="assistant")  # PeBR's `pebr_r1_warm_up` entry


def columns_from_dataset_info(dataset_info: str | Path, name: str) -> tuple[ShareGPTColumns, Path | None]:
    """The columns and tags of entry `name` of a LLaMA-Factory `dataset_info.json`, and its file (resolved
    against the json's folder, LLaMA-Factory's `dataset_dir`) when it names one; `DataError` when unusable."""
    path = Path(dataset_info)
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))  # a leading BOM is accepted
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(info, dict) or name not in info:
        known = sorted(info) if isinstance(info, dict) else []
        raise DataError(f"{path} has no dataset entry {name!r} (entries: {known})")
    entry = info[name]
    if entry.get("formatting", "alpaca") != "sharegpt" or entry.get("ranking", False):
        raise DataError(f"{path} entry {name!r}: only formatting 'sharegpt' without ranking is supported for SFT, "
                        f"got formatting {entry.get('formatting', 'alpaca')!r}")
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    defaults = ShareGPTColumns()
    cols = ShareGPTColumns(
        messages=columns.get("messages", defaults.messages),
        images=columns.get("images"),  # LLaMA-Factory reads images only when the entry names the column
        system=columns.get("system"),
        **{k: tags.get(k, getattr(defaults, k)) for k in ("role_tag", "content_tag", "user_tag", "assistant_tag",
                                                           "system_tag", "observation_tag", "function_tag")})
    file = path.parent / entry["file_name"] if entry.get("file_name") else None
    return cols, file


def resolve_sft_source(train_file: str, dataset_info: str = "", dataset_name: str = "") \
        -> tuple[Path, ShareGPTColumns | None]:
    """The SFT file and its columns: `train_file` (columns detected per record) or a `dataset_info.json` entry
    (its columns and tags; its file unless `train_file` is given)."""
    if dataset_name and not dataset_info:
        raise DataError(f"sft.dataset_name={dataset_name!r} needs sft.dataset_info (the dataset_info.json path)")
    if not dataset_info:
        if not train_file:
            raise DataError("no SFT data: set sft.train_file (or sft.dataset_info and sft.dataset_name)")
        return Path(train_file), None
    if not dataset_name:
        raise DataError(f"sft.dataset_info={dataset_info!r} needs sft.dataset_name (the entry to read)")
    cols, file = columns_from_dataset_info(dataset_info, dataset_name)
    if train_file:
        return Path(train_file), cols
    if file is None:
        raise DataError(f"{dataset_info} entry {dataset_name!r} has no file_name; set sft.train_file")
    return file, cols


def from_alpaca(record: dict[str, Any]) -> dict[str, Any]:
    """An Alpaca-format record (`instruction`, optional `input`, `output`, optional `history` of [query, response]
    pairs and `system`) as a `messages` record, the way LLaMA-Factory's AlpacaDatasetConverter builds its turns
    (`data/converter.py`): history first, then the instruction and the input joined by a newline; other keys
    (`images`) kept. A malformed history or non-string field is left for `to_conversation` to reject by name."""
    query = record.get("instruction")
    extra = record.get("input")
    if isinstance(query, str) and isinstance(extra, str) and extra:
        query = f"{query}\n{extra}"
    messages: list[Any] = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    history = record.get("history") or []
    if isinstance(history, list):
        for pair in history:
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            else:
                messages.append({"role": "user", "content": None})  # rejected downstream as bad_content
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": record.get("output")}]
    rest = {k: v for k, v in record.items() if k not in ("instruction", "input", "output", "history", "system")}
    return {**rest, "messages": messages}


def detect_columns(record: dict[str, Any]) -> ShareGPTColumns | None:
    """`messages` -> role/content/user/assistant; `conversations` -> LLaMA-Factory's defaults; else None."""
    if "messages" in record:
        return ROLE_CONTENT
    if "conversations" in record:
        return FROM_VALUE
    return None


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Conversation:
    """One usable record: turns as {"role": system|user|assistant, "content"} and its image paths."""

    location: str
    messages: list[dict[str, str]]
    images: list[str]


class SkipRecord(Exception):
    """A record that cannot be used; `args[0]` is the reason counted in the report."""


def to_conversation(record: Any, columns: ShareGPTColumns | None, image_root: str | Path,
                    location: str, allow_outside_root: bool = False) -> Conversation:
    """The record's aligned turns and resolved image paths (LLaMA-Factory's ShareGPT rules); `SkipRecord`.

    Unless `allow_outside_root`, an image path that resolves (after `..` and symlinks) outside `image_root` is
    the skip `image_outside_root` (LLaMA-Factory reads any path it is given).
    """
    if not isinstance(record, dict):
        raise SkipRecord("not_an_object")
    if columns is None and "messages" not in record and "conversations" not in record and \
            "instruction" in record and "output" in record:
        record = from_alpaca(record)  # Alpaca layout (LLaMA-Factory's other dataset format)
    cols = columns or detect_columns(record)
    if cols is None or not isinstance(record.get(cols.messages), list):
        raise SkipRecord("no_messages")
    turns = record[cols.messages]
    try:
        system = ""
        if cols.system_tag and turns and turns[0][cols.role_tag] == cols.system_tag:
            system, turns = turns[0][cols.content_tag], turns[1:]
        elif cols.system:
            system = record.get(cols.system) or ""
        if not isinstance(system, str):
            raise SkipRecord("bad_content")
        accept = ((cols.user_tag, cols.observation_tag), (cols.assistant_tag, cols.function_tag))
        names = {cols.user_tag: "user", cols.assistant_tag: "assistant"}
        # An empty system prompt means the template's default one, as in LLaMA-Factory.
        messages = [{"role": "system", "content": system}] if system else []
        for i, turn in enumerate(turns):
            role, content = turn[cols.role_tag], turn[cols.content_tag]
            if role not in accept[i % 2]:
                raise SkipRecord("bad_roles")
            if role not in names:
                raise SkipRecord("tool_turns")
            if not isinstance(content, str):
                raise SkipRecord("bad_content")
            messages.append({"role": names[role], "content": content})
    except (KeyError, TypeError):
        raise SkipRecord("bad_messages") from None
    if not turns or len(turns) % 2:
        raise SkipRecord("odd_turns" if turns else "no_messages")
    images = record.get(cols.images) if cols.images else None
    if images is None or images == []:
        paths: list[str] = []
    else:
        images = images if isinstance(images, list) else [images]
        if not all(isinstance(p, str) for p in images):
            raise SkipRecord("bad_images")
        paths = [_find_media(p, image_root) for p in images]
        # Only a file that exists can be read from outside; a missing one is the `image` skip when it is opened.
        if not allow_outside_root and any(outside_root(p, image_root) for p in paths if os.path.exists(p)):
            raise SkipRecord("image_outside_root")
    if sum(m["content"].count(IMAGE_TOKEN) for m in messages) != len(paths):
        raise SkipRecord("image_count_mismatch")  # LLaMA-Factory stops with a ValueError here
    return Conversation(location, messages, paths)


def _find_media(path: str, image_root: str | Path) -> str:
    joined = os.path.join(str(image_root), path)
    return joined if os.path.isfile(joined) else path


def load_sft_image(path: str, max_pixels: int = LLAMAFACTORY_IMAGE_MAX_PIXELS,
                   min_pixels: int = LLAMAFACTORY_IMAGE_MIN_PIXELS) -> Image.Image:
    """An SFT image as LLaMA-Factory's Qwen2-VL plugin prepares it (module docstring); `ImageError` naming it."""
    image = open_image(path)
    try:
        image.load()
        image = upright_8bit(image)  # ours, not LLaMA-Factory's: EXIF orientation, 16-bit scaled (not clipped)
        if image.width * image.height > max_pixels:
            f = (max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((int(image.width * f), int(image.height * f)))
        if image.width * image.height < min_pixels:
            f = (min_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((int(image.width * f), int(image.height * f)))
        if image.mode != "RGB":
            image = image.convert("RGB")
        if min(image.width, image.height) < 28:
            image = image.resize((max(image.width, 28), max(image.height, 28)))
        if image.width / image.height > 200:
            image = image.resize((image.height * 180, image.height))
        if image.height / image.width > 200:
            image = image.resize((image.width, image.width * 180))
        return image
    except Exception as e:
        raise ImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------- tokens
def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many source and target tokens a pair keeps within `cutoff_len` (LLaMA-Factory's rule)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def conversation_pairs(tokenizer, messages: Sequence[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) per assistant turn, rendered through the tokenizer's chat template.

    The ids of the conversation up to turn k are a prefix of those up to turn k+1 (Qwen's template renders
    each turn on its own), so each turn's ids are the difference; an assistant turn's header
    (`<|im_start|>assistant\\n`) goes to the source, the rest (reply, `<|im_end|>`, newline) is the target.
    """
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    pairs: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    source: list[int] = []
    for i, turn in enumerate(messages):
        text = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if full[: len(ids)] != ids:
            raise DataError("the chat template does not render turns as prefixes")
        new, ids = full[len(ids):], full
        if turn["role"] == "assistant":
            n_head = len(header) if new[: len(header)] == header else 0
            pairs.append((source + new[:n_head], new[n_head:]))
            source = []
        else:
            source += new
    return pairs


def _vision_blocks(ids: Sequence[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """(first, last) index of each vision block in `ids`."""
    blocks, open_at = [], None
    for j, t in enumerate(ids):
        if t == start_id:
            open_at = j
        elif t == end_id and open_at is not None:
            blocks.append((open_at, j))
            open_at = None
    return blocks


@dataclass
class EncodedConversation:
    """Token ids, the 0/1 loss mask (1 on target tokens) and which of the record's images are kept, in order."""

    input_ids: list[int]
    loss_mask: list[int]
    kept_images: list[int]
    truncated: bool


def encode_conversation(tokenizer, messages: Sequence[dict[str, str]], image_tokens: Sequence[int],
                        cutoff_len: int, where: str = "") -> EncodedConversation:
    """Tokenise a conversation with `image_tokens[i]` pads for its i-th `<image>`, truncated at `cutoff_len`
    as LLaMA-Factory does, never inside an image block (module docstring)."""
    counts = [m["content"].count(IMAGE_TOKEN) for m in messages]
    if sum(counts) != len(image_tokens):
        raise DataError(f"{where or 'conversation'} has {sum(counts)} '<image>' placeholders but "
                        f"{len(image_tokens)} images")
    expanded, k = [], 0
    for m, c in zip(messages, counts):
        expanded.append({"role": m["role"], "content": expand_image_placeholders(m["content"],
                                                                                  image_tokens[k:k + c], where)})
        k += c
    start_id, end_id = (tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END))
    ids: list[int] = []
    mask: list[int] = []
    kept: list[int] = []
    total, truncated, image = 0, False, 0
    for source, target in conversation_pairs(tokenizer, expanded):
        if total >= cutoff_len:
            truncated = True
            break
        s_len, t_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        truncated |= s_len < len(source) or t_len < len(target)
        for segment, budget, label in ((source, s_len, 0), (target, t_len, 1)):
            blocks = _vision_blocks(segment, start_id, end_id)
            keep = next((first for first, last in blocks if first < budget <= last), budget)
            kept += [image + i for i, (_, last) in enumerate(blocks) if last < keep]
            image += len(blocks)
            ids += segment[:keep]
            mask += [label] * keep
        total += s_len + t_len  # the budget is spent as LLaMA-Factory spends it
    return EncodedConversation(ids, mask, kept, truncated)


# ---------------------------------------------------------------------------------------------- files
@dataclass
class SFTReport:
    """What reading an SFT file did: records read and kept, skips by reason, truncations."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0  # conversations cut at the cutoff (kept)
    images_dropped: int = 0  # of those, conversations that lost an image whose block the cut reached

    def __bool__(self) -> bool:
        return bool(self.skipped or self.truncated)

    def __str__(self) -> str:
        parts = [f"{self.path}: kept {self.kept} of {self.total} conversations"]
        if self.skipped:
            parts.append(f"skipped {dict(sorted(self.skipped.items()))}")
        if self.truncated:
            parts.append(f"truncated at the cutoff {self.truncated} (of which lost an image: {self.images_dropped})")
        return "; ".join(parts)


@dataclass
class SFTExample:
    """One encoded conversation with its kept images' vision-tower inputs (None without images)."""

    input_ids: list[int]
    loss_mask: list[int]
    pixel_values: Any = None
    image_grid_thw: Any = None
    location: str = ""  # where the record was in the file ("index 3", "line 4")


def encode_sft_file(path: str | Path, tokenizer, decoder: ImageDecoder, image_root: str | Path, cutoff_len: int,
                    merge_size: int = 2, columns: ShareGPTColumns | None = None,
                    image_max_pixels: int = LLAMAFACTORY_IMAGE_MAX_PIXELS,
                    image_min_pixels: int = LLAMAFACTORY_IMAGE_MIN_PIXELS,
                    allow_outside_root: bool = False) -> tuple[list[SFTExample], SFTReport]:
    """Every usable conversation of a JSON or JSONL ShareGPT file, encoded; skips and truncations reported.

    `columns` None detects them per record (`detect_columns`); `allow_outside_root` reads images that resolve
    outside `image_root` (else they are the skip `image_outside_root`). A file that cannot be read is a
    `DataError`.
    """
    items, bad_lines = read_json_items(path)
    report = SFTReport(str(path), total=len(items) + len(bad_lines))
    report.skipped.update(s.reason for s in bad_lines)
    examples: list[SFTExample] = []
    for item in items:
        try:
            conv = to_conversation(item.value, columns, image_root, item.location, allow_outside_root)
            images = [load_sft_image(p, image_max_pixels, image_min_pixels) for p in conv.images]
            proc = decoder.decode_and_preprocess(images).to("cpu") if images else None
            tokens = num_image_tokens(proc.image_grid_thw, merge_size) if proc is not None else []
            enc = encode_conversation(tokenizer, conv.messages, tokens, cutoff_len, f"{path} {item.location}")
        except SkipRecord as e:
            report.skipped[e.args[0]] += 1
            continue
        except ImageError:
            report.skipped["image"] += 1
            continue
        except DataError:
            report.skipped["bad_record"] += 1
            continue
        if not any(enc.loss_mask):
            report.skipped["no_assistant_tokens"] += 1
            continue
        report.truncated += enc.truncated
        report.images_dropped += len(enc.kept_images) < len(tokens)
        pixel_values, grid = _select_images(proc, enc.kept_images)
        examples.append(SFTExample(enc.input_ids, enc.loss_mask, pixel_values, grid, item.location))
    report.kept = len(examples)
    return examples, report


def _select_images(proc, kept: list[int]):
    """The pixel rows and grid rows of the kept images (None when none is kept)."""
    if proc is None or not kept:
        return None, None
    grid = proc.image_grid_thw
    if len(kept) == grid.shape[0]:
        return proc.pixel_values, grid
    import torch

    rows = grid.prod(-1).tolist()
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    pieces = [proc.pixel_values[offsets[i]: offsets[i] + rows[i]] for i in kept]
    return torch.cat(pieces), grid[kept]
