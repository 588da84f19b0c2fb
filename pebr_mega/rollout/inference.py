"""Prompting an exported HF model as it was trained: `pebr infer` (one question) and the engine and prompts of
`pebr eval` (`pebr_mega.trainer.evaluate.evaluate_model`).

The model directory is checked before anything loads (`checkpoint.hf_io.check_hf_model_dir`), then loaded
with transformers (`HFRolloutEngine`). Prompts use the model's own image bounds (its preprocessor config) and
prompt template (its `format_prompt.jinja`, else the packaged one; `format_prompt` over both), and no
prompt-length rule: the model decides what it can read.
"""
from __future__ import annotations

from pathlib import Path

from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.data.decoders import make_image_decoder
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.records import GRPORecord
from pebr_mega.data.template import model_prompt_template
from pebr_mega.rollout.factory import sampling_params
from pebr_mega.rollout.hf_engine import HFRolloutEngine
from pebr_mega.rollout.requests import RequestBuilder


def model_request_builder(model_dir: str | Path, tokenizer, format_prompt: str | None = None) -> RequestBuilder:
    """The request builder for prompting `model_dir`: its own image bounds and prompt template (`format_prompt`
    over it), no prompt-length rule."""
    images = ImageConfig.of_model(model_dir)
    return RequestBuilder.from_config(None, images, tokenizer, make_image_decoder(images),
                                      model_prompt_template(model_dir, format_prompt))


def answer_question(model_dir: str | Path, image: str, question: str, temperature: float = 0.0,
                    max_new_tokens: int = 4096, seed: int = 0, format_prompt: str | None = None) -> str:
    """`pebr infer`: one answer of the model in `model_dir` (`--model`) to `question` about `image` (upstream's
    inference.py); an `<image>` is put before a question that has none."""
    check_hf_model_dir(model_dir, "--model")  # before anything loads: one line naming the file
    engine = HFRolloutEngine.from_pretrained(model_dir, batch_size=1)
    question = question if "<image>" in question else "<image>" + question
    record = GRPORecord(qid="infer", problem=question, answer="", images=[image])
    request = model_request_builder(model_dir, engine.tokenizer, format_prompt).build_one(record, ".")
    sampling = sampling_params(engine.tokenizer, 1, temperature, 1.0, max_new_tokens, seed)
    return engine.generate([request], sampling)[0].response_text
