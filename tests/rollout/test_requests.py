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
    # reject_small_sides: the 10 px side of tiny.png is one more image skip (by default it is scaled up).
    dec = PilImageDecoder(ImageConfig(min_pixels=56 * 56, max_pixels=224 * 224, reject_small_sides=True))
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


def test_screen_from_headers_decides_as_build(tiny_model_dir, tmp_path):
    """The start-up screen reads image headers only: its prompt lengths equal the built requests' (several
    sizes, one above the pixel cap, one below the floor, two images), and it keeps and skips what `build`
    keeps and skips, except an image whose pixels are broken behind a valid header (found when built)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sizes = [(56, 84), (112, 140), (300, 500), (30, 40), (224, 224), (57, 201)]
    for i, (h, w) in enumerate(sizes):
        _png(tmp_path / f"s{i}.png", h, w, seed=i)
    good = tmp_path / "s0.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])  # a header, no pixels
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _png(tmp_path / "thin.png", 10, 300)
    recs = [GRPORecord(f"q{i}", "<image>How many?", "2", [f"s{i}.png"]) for i in range(len(sizes))]
    recs += [GRPORecord("two", "Compare <image> and <image>.", "1", ["s1.png", "s2.png"]),
             GRPORecord("long", "<image>" + " word" * 400, "1", ["s0.png"]),
             GRPORecord("thin", "<image>?", "1", ["thin.png"]), GRPORecord("bad", "<image>?", "1", ["bad.png"]),
             GRPORecord("gone", "<image>?", "1", ["missing.png"]), GRPORecord("np", "no placeholder", "1", ["s0.png"]),
             GRPORecord("trunc", "<image>?", "1", ["truncated.png"])]
    builder = RequestBuilder(tok, PilImageDecoder(ImageConfig(min_pixels=56 * 56, max_pixels=224 * 224,
                                                              reject_small_sides=True)), max_prompt_length=256)
    built, built_report = builder.build(recs, tmp_path)
    for req in built:
        assert builder.prompt_length(req.record, tmp_path) == len(req.prompt_ids), req.record_id
    kept, report = builder.screen(recs, tmp_path)
    assert [r.qid for r in kept] == [r.record_id for r in built] + ["trunc"]
    assert report.skipped == {"image": 3, "prompt_too_long": 1, "record": 1}
    assert built_report.skipped == {"image": 4, "prompt_too_long": 1, "record": 1}
    images_only, rep = builder.screen(recs, tmp_path, lengths=False)
    assert "long" in [r.qid for r in images_only] and rep.skipped == {"image": 3}


def test_iter_build_builds_on_demand(tiny_model_dir, tmp_path):
    """`iter_build` builds a record only when its request is asked for (sampling holds one batch of pixels);
    exhausted, its report equals `build`'s."""
    from itertools import islice

    from transformers import AutoTokenizer

    from pebr_mega.rollout.requests import RequestReport

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _png(tmp_path / "a.png", 56, 84)
    recs = [GRPORecord("q1", "<image>?", "1", ["a.png"]), GRPORecord("q2", "<image>?", "1", ["a.png"]),
            GRPORecord("q3", "<image>?", "1", ["missing.png"]), GRPORecord("q4", "<image>?", "1", ["a.png"])]
    builder = RequestBuilder(tok, PilImageDecoder(ImageConfig(min_pixels=56 * 56, max_pixels=224 * 224)))
    report = RequestReport()
    it = builder.iter_build(recs, tmp_path, report)
    assert [r.record_id for r in islice(it, 2)] == ["q1", "q2"] and report.built == 2 and not report.skipped
    assert [r.record_id for r in it] == ["q4"]
    _, whole = builder.build(recs, tmp_path)
    assert (report.built, report.skipped, dict(report.examples)) == (whole.built, whole.skipped, dict(whole.examples))
