"""Prompt templates as files (`data.format_prompt`): EasyR1's rendering convention, the prompt ids EasyR1
would build, the packaged default, errors naming the key, and the template an exported model carries."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pebr_mega.config import ConfigError, load_config
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.data.records import GRPORecord
from pebr_mega.data.template import (DEFAULT_TEMPLATE_PATH, TEMPLATE_FILE_NAME, build_prompt_text, default_template,
                                     load_prompt_template, model_prompt_template, write_prompt_template)
from pebr_mega.rollout.requests import RequestBuilder

# A template written the way EasyR1's examples/format_prompt/*.jinja files are: instruction lines, a blank line,
# then the trimmed problem; here with stray whitespace around the file, which EasyR1 strips before compiling.
INSTRUCTION_LINES = ["Describe the picture first.", "Then reason step by step.", "", "### Step 1:", "..."]
EASYR1_STYLE = "\n  " + "\n".join(INSTRUCTION_LINES) + "\n\n{{ content | trim }}\n\n"


@pytest.fixture()
def template_file(tmp_path):
    path = tmp_path / "pebr_like.jinja"
    path.write_text(EASYR1_STYLE, encoding="utf-8")
    return path


def test_rendering_follows_easyr1s_rules(template_file):
    """EasyR1 (verl/utils/dataset.py, RLHFDataset._build_messages): Template(file_text.strip()).render(content=...),
    so the file's outer whitespace is gone and `| trim` strips the problem; nothing else changes."""
    problem = "  \n<image>What is the area of the triangle?\n  "
    rendered = load_prompt_template(template_file).render(problem)
    assert rendered == "\n".join(INSTRUCTION_LINES) + "\n\n" + "<image>What is the area of the triangle?"


def test_prompt_ids_equal_easyr1s(template_file, tmp_path, tiny_model_dir):
    """The whole prompt as EasyR1 builds it: the rendered text split at <image> into text and image parts, the
    chat template over that list, then one <|image_pad|> per merged patch. Ours must give the same ids."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    proc = AutoImageProcessor.from_pretrained(tiny_model_dir)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (90, 70)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    problem = "Compare <image> with <image>: which has more circles? "
    record = GRPORecord("q", problem, "1", ["a.png", "b.png"])
    cfg = ImageConfig(min_pixels=proc.size["shortest_edge"], max_pixels=proc.size["longest_edge"])
    req = RequestBuilder(tok, PilImageDecoder(cfg), template=load_prompt_template(template_file)).build_one(record, tmp_path)

    text = template_file.read_text().strip()  # EasyR1's steps, spelled out
    import jinja2

    prompt_str = jinja2.Template(text).render(content=problem)
    parts = []
    for i, piece in enumerate(prompt_str.split("<image>")):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    chat = tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False)
    grids = proc(images=[Image.open(tmp_path / n).convert("RGB") for n in ("a.png", "b.png")],
                 return_tensors="pt")["image_grid_thw"]
    for t, gh, gw in grids.tolist():
        chat = chat.replace("<|image_pad|>", "<|placeholder|>" * (t * gh * gw // proc.merge_size ** 2), 1)
    chat = chat.replace("<|placeholder|>", "<|image_pad|>")
    assert req.prompt_ids == tok(chat, add_special_tokens=False)["input_ids"]
    assert req.image_grid_thw.tolist() == grids.tolist()


def test_default_template_asks_for_the_sections_in_order():
    text = build_prompt_text("  <image>How many?  ")
    headers = ["### Image Description:", "### Rationales:", "### Let's think step by step.", "### Step 1:",
               "### The final answer is:"]
    positions = [text.index(h) for h in headers]
    assert positions == sorted(positions)
    instruction, problem = text.split("\n\n")
    assert problem == "<image>How many?" and "\n" not in instruction
    assert default_template().origin == str(DEFAULT_TEMPLATE_PATH)
    assert load_config(None, []).data.format_prompt is None


def test_bad_templates_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.format_prompt'.*not found"):
        load_prompt_template(tmp_path / "missing.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("Solve it.\n\n{{ content | trim ")
    with pytest.raises(ConfigError, match=r"'data\.format_prompt'.*invalid Jinja2 template at line 3"):
        load_prompt_template(bad)
    unused = tmp_path / "unused.jinja"
    unused.write_text("Solve it.\n\n{{ problem }}")
    with pytest.raises(ConfigError, match=r"never renders `content`"):
        load_prompt_template(unused)


def test_export_carries_the_template_and_inference_reads_it(tmp_path, template_file):
    model = tmp_path / "model"
    model.mkdir()
    assert model_prompt_template(model).source == default_template().source  # nothing carried: the default
    written = write_prompt_template(model, load_prompt_template(template_file))
    assert written.name == TEMPLATE_FILE_NAME and written.read_bytes() == template_file.read_bytes()
    assert model_prompt_template(model).render("x") == load_prompt_template(template_file).render("x")
    other = tmp_path / "other.jinja"
    other.write_text("Other.\n\n{{ content }}")
    assert model_prompt_template(model, other).render("x") == "Other.\n\nx"


def test_infer_defaults_are_upstreams():
    from pebr_mega.cli import build_parser

    args = build_parser().parse_args(["infer", "--model", "m", "--image", "i.png", "--question", "q"])
    assert args.max_new_tokens == 4096 and args.temperature == 0.0 and args.format_prompt is None
