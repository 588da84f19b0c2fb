"""Records -> rollout requests: prompt token ids with expanded image pads, and preprocessed images.

The prompt is the format-prompt template (`data.format_prompt`) rendered with the record's problem; the
request keeps the record's images as the policy sees them (after the pixel-bound resize) for the CLIP reward.

Every record is checked here, at the boundary between data and generation: one whose image is missing,
unreadable or outside the pixel bounds, or whose prompt is longer than `max_prompt_length` tokens, is
skipped with its reason counted and its qid kept for the report; nothing else stops the batch.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pebr_mega.data.images import (ImageConfig, ImageDecoder, load_image, num_image_tokens, open_image, policy_view,
                                   target_size)
from pebr_mega.data.prompts import render_prompt_ids
from pebr_mega.data.records import DataConfig, GRPORecord
from pebr_mega.data.template import PromptTemplate
from pebr_mega.errors import DataError, ImageError
from pebr_mega.rollout.types import RolloutRequest


@dataclass
class RequestReport:
    """How many records became requests, and why the others did not (reason -> qids)."""

    built: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, qid: str, detail: str = "") -> None:
        """Count one skipped record."""
        self.skipped[reason] += 1
        self.examples[reason].append(f"{qid}: {detail}" if detail else qid)

    def metrics(self, prefix: str = "requests") -> dict[str, float]:
        """Counts as step metrics: `requests/built`, `requests/skipped_<reason>`."""
        out = {f"{prefix}/built": float(self.built)}
        out.update({f"{prefix}/skipped_{r}": float(n) for r, n in self.skipped.items()})
        return out

    def summary(self, max_examples: int = 3) -> str:
        """One line per skip reason with a few qids."""
        lines = [f"built {self.built} requests, skipped {sum(self.skipped.values())}"]
        for reason, n in sorted(self.skipped.items()):
            ex = "; ".join(self.examples[reason][:max_examples])
            lines.append(f"  {reason}: {n} (e.g. {ex})")
        return "\n".join(lines)


@dataclass
class RequestBuilder:
    """Turns records into rollout requests with one tokenizer, image decoder, prompt template and prompt-length
    rule: the one way requests are built (trainers, evaluation, difficulty sampling, `pebr eval`, `pebr infer`).
    """

    tokenizer: Any
    decoder: ImageDecoder
    max_prompt_length: int = 1 << 30
    filter_overlong: bool = True
    merge_size: int = 2
    template: PromptTemplate | None = None  # None: the packaged format prompt

    @classmethod
    def from_config(cls, data: DataConfig | None, images: ImageConfig, tokenizer, decoder: ImageDecoder,
                    template: PromptTemplate | None = None) -> "RequestBuilder":
        """The builder the `data` and `images` config sections describe: the one place a builder is made.
        `data` None: no prompt-length rule (a one-shot command prompting an exported model, which reads no
        `data` section)."""
        if data is None:
            return cls(tokenizer, decoder, merge_size=images.merge_size, template=template)
        return cls(tokenizer, decoder, data.max_prompt_length, data.filter_overlong_prompts, images.merge_size,
                   template)

    def build_one(self, record: GRPORecord, image_root: str | Path) -> RolloutRequest:
        """One record's request; raises ImageError / DataError naming the record when it cannot be built."""
        paths = record.image_paths(image_root)
        images = [load_image(p) for p in paths]
        if images:
            processed = self.decoder.decode_and_preprocess(images).to("cpu")
            tokens = num_image_tokens(processed.image_grid_thw, self.merge_size)
            pixel_values, grid = processed.pixel_values, processed.image_grid_thw
        else:
            tokens, pixel_values, grid = [], None, None
        ids = render_prompt_ids(self.tokenizer, record.problem, tokens, where=f"record {record.qid}",
                                template=self.template)
        views = [policy_view(im, self.decoder.cfg, str(p)) for im, p in zip(images, paths)]
        return RolloutRequest(record_id=record.qid, prompt_ids=ids, pixel_values=pixel_values,
                              image_grid_thw=grid, images=views, record=record)

    def build(self, records: Sequence[GRPORecord], image_root: str | Path) -> tuple[list[RolloutRequest], RequestReport]:
        """Requests for every usable record, in order, and the report of those skipped."""
        report = RequestReport()
        return list(self.iter_build(records, image_root, report)), report

    def iter_build(self, records: Iterable[GRPORecord], image_root: str | Path,
                   report: RequestReport) -> Iterator[RolloutRequest]:
        """`build`, one record at a time: a request (with its pixel values) exists only once it is asked for,
        so a caller that consumes a batch at a time holds one batch of images. `report` counts as it goes; it
        is complete once the iterator is exhausted."""
        for record in records:
            req = self._admit(record, report, lambda: self.build_one(record, image_root),
                              lambda r: len(r.prompt_ids))
            if req is not None:
                report.built += 1
                yield req

    def prompt_length(self, record: GRPORecord, image_root: str | Path) -> int:
        """The token count of `record`'s prompt without decoding its images: each image's size comes from its
        file header, its token count from the smart-resize target under the decoder's bounds (what `build_one`
        gets from the decoded pixels: both backends take the grid from `target_size`). ImageError / DataError
        as `build_one` (an image that fails only when its pixels are decoded passes here)."""
        cfg = self.decoder.cfg
        tokens = []
        for path in record.image_paths(image_root):
            image = open_image(path)
            try:
                h, w = target_size(image.height, image.width, cfg, str(path))
            finally:
                image.close()
            tokens += num_image_tokens([[1, h // cfg.patch_size, w // cfg.patch_size]], self.merge_size)
        return len(render_prompt_ids(self.tokenizer, record.problem, tokens, where=f"record {record.qid}",
                                     template=self.template))

    def screen(self, records: Sequence[GRPORecord], image_root: str | Path,
               lengths: bool = True) -> tuple[list[GRPORecord], RequestReport]:
        """The records `build` would turn into requests, decided from image headers (no pixel decode), and the
        report of the others, with `build`'s reasons. `lengths=False` checks the images only (no tokenizer)."""
        report = RequestReport()
        kept = []
        for record in records:
            if lengths:
                n = self._admit(record, report, lambda: self.prompt_length(record, image_root), lambda n: n)
            else:
                n = self._admit(record, report, lambda: self._check_images(record, image_root), lambda n: None)
            if n is not None:
                kept.append(record)
        report.built = len(kept)
        return kept, report

    def _admit(self, record: GRPORecord, report: RequestReport, make: Callable[[], Any],
               prompt_len: Callable[[Any], int | None]) -> Any:
        """`make()`, or None with the skip counted in `report` under `build`'s reasons: an image that fails, a
        bad record, or (when `prompt_len` of the result is known) a prompt over `max_prompt_length`."""
        try:
            made = make()
        except ImageError as e:
            report.skip("image", record.qid, str(e))
            return None
        except DataError as e:
            report.skip("record", record.qid, str(e))
            return None
        n = prompt_len(made)
        if n is not None and n > self.max_prompt_length and self.filter_overlong:
            report.skip("prompt_too_long", record.qid, f"{n} > {self.max_prompt_length} tokens")
            return None
        return made

    def _check_images(self, record: GRPORecord, image_root: str | Path) -> int:
        for path in record.image_paths(image_root):
            image = open_image(path)
            try:
                target_size(image.height, image.width, self.decoder.cfg, str(path))
            finally:
                image.close()
        return 0
