"""CLIP alignment reward on a tiny CLIP built offline: similarity vs an independent float64 computation,
batching, the stage-1 total, failure isolation, and an FG-CLIP-style checkpoint with its own code."""
from __future__ import annotations

import json
import random
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pebr_mega.cli import main
from pebr_mega.data.corpus import tokenizer_corpus
from pebr_mega.errors import PebrError
from pebr_mega.rewards import (RewardConfig, RewardSample, build_reward, extract_description, format_reward,
                               keyword_reward, length_reward, summarize)
from pebr_mega.rewards.clip import ClipAlignmentScorer, similarity_to_reward
from pebr_mega.rewards.tiny_clip import TinyClipConfig, build_tiny_clip

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    cfg = TinyClipConfig(image_size=IMAGE_SIZE, patch_size=14, seed=3)
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), tokenizer_corpus(), cfg)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(30 + 11 * i, 70 - 3 * i, 3), dtype=np.uint8))
            for i in range(n)]


TEXTS = ["three red circles", "A blue square and two green triangles.", "red " * 400, "x",
         "There are 5 shapes in the image", "purple"]


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _reference_similarity(model_dir, image, text, image_size, text_projection=None):
    """Cosine similarity in float64, one pair at a time, without padding, through the HF model directly."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).double().eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    pv = torch.as_tensor(proc(images=[resized], return_tensors="pt")["pixel_values"]).double()
    ids = torch.tensor([tok(text, truncation=True, max_length=model.config.text_config.max_position_embeddings)
                        ["input_ids"]])
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=pv))
        if text_projection is None:
            txt = _features(model.get_text_features(input_ids=ids))
        else:  # FG-CLIP's long-text path: the pooled text state through its second projection
            txt = text_projection.double()(model.text_model(input_ids=ids).pooler_output)
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1).item()


def test_similarity_matches_float64_reference(clip_dir):
    scorer = ClipAlignmentScorer(clip_dir, "cpu", image_size=IMAGE_SIZE, max_text_tokens=248, batch_size=4)
    images = _images(len(TEXTS))
    sims = scorer.similarities(images, TEXTS)  # 6 pairs in batches of 4 and 2, padded to different lengths
    ref = [_reference_similarity(clip_dir, im, t, IMAGE_SIZE) for im, t in zip(images, TEXTS)]
    assert sims == pytest.approx(ref, abs=1e-5)
    assert len({round(s, 4) for s in sims}) == len(sims)  # not a constant
    # Batch size does not change the numbers.
    one = ClipAlignmentScorer(clip_dir, "cpu", image_size=IMAGE_SIZE, batch_size=1).similarities(images, TEXTS)
    assert one == pytest.approx(sims, abs=1e-5)
    with pytest.raises(ValueError):
        scorer.similarities(images[:2], TEXTS[:3])


def test_long_text_is_truncated_keeping_end_token(clip_dir):
    scorer = ClipAlignmentScorer(clip_dir, "cpu", image_size=IMAGE_SIZE, max_text_tokens=16)
    ids = scorer.text_inputs(["red " * 100, "red"])["input_ids"]
    eos = scorer.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids.shape[1] == 16 and ids[0, -1].item() == eos
    assert ClipAlignmentScorer(clip_dir, "cpu", max_text_tokens=10_000).max_text_tokens == 248


def test_similarity_to_reward():
    assert similarity_to_reward(0.4) == 1.0 and similarity_to_reward(0.9) == 1.0
    assert similarity_to_reward(0.3) == pytest.approx(0.75) and similarity_to_reward(0.1, threshold=0.2) == pytest.approx(0.5)
    assert similarity_to_reward(-0.2) == pytest.approx(-0.5)  # negative, as upstream's sim / 0.4


def _samples(n, seed=0):
    rng = random.Random(seed)
    images = _images(n, seed)
    out = []
    for i in range(n):
        desc = " ".join(rng.sample(["red", "blue", "circle", "square", "three", "two", "big"], 4))
        text = (f"### Image Description: {desc}\n### Rationales: r\n### Step 1: s\n"
                f"### The final answer is: {rng.randint(0, 3)}")
        out.append(RewardSample(response=text, response_tokens=rng.randint(100, 900), answer=str(rng.randint(0, 3)),
                                key_words=rng.sample(["red", "blue", "circle", "square"], 2), images=[images[i]]))
    return out


def test_stage1_total_with_clip(clip_dir):
    cfg = RewardConfig(clip_model_dir=str(clip_dir), clip_device="cpu", clip_threshold=0.05)
    model = build_reward(cfg, "stage1")
    batch = _samples(10)
    batch[3].images = [batch[3].images[0], _images(1, seed=9)[0]]  # two images: only the first is scored
    batch[7].response = batch[7].response.replace("### Image Description:", "Description:")
    results = model.score(batch)
    for i, (s, r) in enumerate(zip(batch, results)):
        # Upstream's caption: the text between the description and rationales headers, else "" (scored too).
        m = re.search(r"###\s*Image Description:\s*(.*?)###\s*Rationales:", s.response, re.DOTALL | re.IGNORECASE)
        caption = m.group(1).strip() if m else ""
        assert r.warnings == ([] if m else ["description_missing"])
        sim = _reference_similarity(clip_dir, s.images[0], caption, cfg.clip_image_size)
        clip = 1.0 if sim >= 0.05 else sim / 0.05
        assert r.components["clip"] == pytest.approx(clip, abs=1e-4)
        expect = (0.4 * clip + 0.4 * keyword_reward(s.response, s.key_words) + 0.1 * format_reward(s.response)
                  + 0.1 * length_reward(s.response_tokens, 512))
        assert r.total == pytest.approx(expect, abs=1e-5)
        assert "accuracy" in r.components
    # Not degenerate: the random tiny CLIP gives different similarities to different pairs.
    sims = model.clip_scorer.similarities([s.images[0] for s in batch],
                                          [extract_description(s.response) or "" for s in batch])
    assert len({round(x, 4) for x in sims}) > 2
    m = summarize(results)
    assert m["reward_failures/clip"] == 0 and m["reward_warnings/description_missing"] == 1


def test_bad_image_fails_only_its_sample(clip_dir):
    model = build_reward(RewardConfig(clip_model_dir=str(clip_dir), clip_device="cpu"), "stage1")
    batch = _samples(4, seed=1)
    good = [r.components["clip"] for r in model.score(batch)]
    closed = _images(1, seed=5)[0]
    closed.close()  # a closed PIL image cannot be converted: the batched call fails, then only this sample
    batch[2].images = [closed]
    batch[1].images = []
    results = model.score(batch)
    assert results[2].components["clip"] == 0.0 and results[2].failures == ["clip"]
    assert results[1].components["clip"] == 0.0 and results[1].warnings == ["image_missing"]
    assert [results[i].components["clip"] for i in (0, 3)] == pytest.approx([good[0], good[3]], abs=1e-6)
    assert summarize(results)["reward_failures/clip"] == 1 and "clip" in model.last_errors


def test_clip_build_errors_name_the_key(tmp_path, clip_dir):
    with pytest.raises(PebrError, match=r"rewards\.clip_model_dir=.*no config\.json"):
        build_reward(RewardConfig(clip_model_dir=str(tmp_path)), "stage1")
    if not torch.cuda.is_available():
        with pytest.raises(PebrError, match="CUDA is not available"):
            build_reward(RewardConfig(clip_model_dir=str(clip_dir), clip_device="cuda"), "stage1")


FG_MODULE = '''
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel


class FGTinyConfig(CLIPConfig):
    model_type = "fgtiny"


class FGTinyModel(CLIPModel):
    """An FG-CLIP-shaped model: a second text projection for long captions, chosen by walk_short_pos."""

    config_class = FGTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.text_filip_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)

    def get_image_features(self, pixel_values=None):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None, walk_short_pos=True):
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled) if walk_short_pos else self.text_filip_projection(pooled)
'''


def test_checkpoint_with_own_code_uses_long_text_path(tmp_path, clip_dir):
    from safetensors.torch import load_file, save_file

    fg = tmp_path / "fg"
    shutil.copytree(clip_dir, fg)
    (fg / "modeling_fgtiny.py").write_text(FG_MODULE)
    cfg = json.loads((fg / "config.json").read_text())
    cfg.update(model_type="fgtiny", architectures=["FGTinyModel"],
               auto_map={"AutoConfig": "modeling_fgtiny.FGTinyConfig",
                         "AutoModelForCausalLM": "modeling_fgtiny.FGTinyModel"})
    (fg / "config.json").write_text(json.dumps(cfg))
    weights = load_file(fg / "model.safetensors")
    proj = torch.nn.Linear(cfg["text_config"]["hidden_size"], cfg["projection_dim"], bias=False)
    torch.nn.init.normal_(proj.weight, generator=torch.Generator().manual_seed(11))
    weights["text_filip_projection.weight"] = proj.weight.detach().clone()
    save_file(weights, fg / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(PebrError, match="clip_trust_remote_code"):
        ClipAlignmentScorer(fg, "cpu", trust_remote_code=False)
    scorer = ClipAlignmentScorer(fg, "cpu", image_size=IMAGE_SIZE)
    assert type(scorer.model).__name__ == "FGTinyModel" and scorer._text_kwargs == {"walk_short_pos": False}
    images = _images(3, seed=4)
    sims = scorer.similarities(images, TEXTS[:3])
    ref = [_reference_similarity(clip_dir, im, t, IMAGE_SIZE, text_projection=proj) for im, t in zip(images, TEXTS)]
    assert sims == pytest.approx(ref, abs=1e-5)


def test_make_tiny_clip_cli(tmp_path, capsys):
    out = tmp_path / "clip"
    assert main(["make-tiny-clip", "--out", str(out), "--image-size", "28", "--patch-size", "14"]) == 0
    assert "wrote tiny CLIP" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert len(ClipAlignmentScorer(out, "cpu", image_size=28).similarities(_images(2), TEXTS[:2])) == 2
    assert main(["make-tiny-clip", "--out", str(out), "--image-size", "30"]) == 2
    assert "multiple of patch_size" in capsys.readouterr().err


FG_TORCHVISION_MODULE = FG_MODULE.replace("import torch\n", "import torch\nimport torchvision.ops\n", 1)


def test_missing_torchvision_is_one_line_with_the_install_command(tmp_path, clip_dir, monkeypatch):
    fg = tmp_path / "fg_tv"
    shutil.copytree(clip_dir, fg)
    (fg / "modeling_fgtv.py").write_text(FG_TORCHVISION_MODULE)
    cfg = json.loads((fg / "config.json").read_text())
    cfg.update(model_type="fgtiny", auto_map={"AutoConfig": "modeling_fgtv.FGTinyConfig",
                                              "AutoModelForCausalLM": "modeling_fgtv.FGTinyModel"})
    (fg / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # absent, whether or not the [clip] extra is installed
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    with pytest.raises(PebrError) as err:
        build_reward(RewardConfig(clip_model_dir=str(fg), clip_device="cpu"), "stage1")
    msg = str(err.value)
    assert "\n" not in msg and "torchvision" in msg and 'pip install -e ".[clip]"' in msg
    assert msg.startswith(f"rewards.clip_model_dir={fg}")


def test_clip_scores_the_first_image_as_the_policy_sees_it(tmp_path, tiny_model_dir):
    """The request keeps the record's images after the pixel-bound resize; the reward reads the first one."""
    from transformers import AutoTokenizer

    from pebr_mega.data.images import ImageConfig, smart_resize
    from pebr_mega.data.pil_backend import PilImageDecoder
    from pebr_mega.data.records import GRPORecord
    from pebr_mega.rollout.requests import RequestBuilder
    from pebr_mega.trainer.evaluate import to_reward_sample
    from pebr_mega.rollout.types import Sample

    big, small = _images(1, seed=7)[0].resize((300, 200)), _images(1, seed=8)[0]
    big.save(tmp_path / "big.png")
    small.save(tmp_path / "small.png")
    cfg = ImageConfig(min_pixels=56 * 56, max_pixels=112 * 112)
    rec = GRPORecord("q", "<image> and <image>?", "1", ["big.png", "small.png"])
    req = RequestBuilder(AutoTokenizer.from_pretrained(tiny_model_dir), PilImageDecoder(cfg)).build_one(rec, tmp_path)
    h, w = smart_resize(200, 300, 28, cfg.min_pixels, cfg.max_pixels)
    assert req.images[0].size == (w, h) and h * w <= cfg.max_pixels
    expected = Image.open(tmp_path / "big.png").convert("RGB").resize((w, h), Image.BICUBIC)
    assert np.array_equal(np.asarray(req.images[0]), np.asarray(expected))
    sample = to_reward_sample(Sample(req, 0, [], "### Image Description: x ### Rationales: y", "stop"))
    assert sample.images[0] is req.images[0]
