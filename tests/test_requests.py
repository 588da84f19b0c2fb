"""Records -> rollout requests: image pads match the grids, and bad records are skipped with a reason."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pebr_mega.data.images import ImageConfig
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.data.records import GRPORecord
from pebr_mega.rollout.requests import RequestBuilder


def _png(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_requests_built_and_skips_counted(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    _png(tmp_path / "a.png", 56, 84)
    _png(tmp_path / "b.png", 112, 140, seed=1)
    _png(tmp_path / "tiny.png", 10, 300)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    recs = [
        GRPORecord("q1", "<image>How many?", "2", ["a.png"]),
        GRPORecord("q2", "Compare <image> and <image>.", "1", ["a.png", "b.png"]),
        GRPORecord("q3", "<image>?", "1", ["tiny.png"]),
        GRPORecord("q4", "<image>?", "1", ["bad.png"]),
        GRPORecord("q5", "<image>?", "1", ["missing.png"]),
        GRPORecord("q6", "<image>" + " word" * 400, "1", ["a.png"]),
        GRPORecord("q7", "no placeholder", "1", ["a.png"]),
    ]
    dec = PilImageDecoder(ImageConfig(min_pixels=56 * 56, max_pixels=224 * 224))
    reqs, report = RequestBuilder(tok, dec, max_prompt_length=256).build(recs, tmp_path)
    assert [r.record_id for r in reqs] == ["q1", "q2"]
    for r in reqs:
        n_pad = sum(1 for t in r.prompt_ids if t == pad)
        assert n_pad == int(r.image_grid_thw.prod(-1).sum()) // 4
        assert r.pixel_values.shape[0] == int(r.image_grid_thw.prod(-1).sum())
        assert r.record.qid == r.record_id and len(r.images) == r.image_grid_thw.shape[0]
    assert report.skipped == {"image": 3, "prompt_too_long": 1, "record": 1}
    assert any(e.startswith("q3") for e in report.examples["image"])
    m = report.metrics()
    assert m["requests/built"] == 2 and m["requests/skipped_prompt_too_long"] == 1
    assert "prompt_too_long: 1" in report.summary()
    kept, rep2 = RequestBuilder(tok, dec, max_prompt_length=256, filter_overlong=False).build(recs[5:6], tmp_path)
    assert len(kept) == 1 and not rep2.skipped
