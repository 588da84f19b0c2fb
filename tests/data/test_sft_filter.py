"""SFT filter (Mulberry rules), its sidecar of dropped records, LLaMA-Factory registration, and both CLIs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pebr_mega.cli import main
from pebr_mega.data.llamafactory import register_dataset, sharegpt_entry
from pebr_mega.data.sft_filter import check_image, filter_sft_file, sidecar_path
from pebr_mega.errors import DataError


def _img(path, w, h, fmt="PNG", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return path


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _img(root / "ok.png", 28, 28)
    _img(root / "big.jpg", 64, 48, "JPEG")
    _img(root / "tiny.png", 1, 1)
    _img(root / "thin.png", 27, 300)
    _img(root / "wide.png", 300, 27)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    full = (root / "big.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    _img(root / "whole.png", 64, 64, seed=1)
    png = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    return root


def _rec(images, answer="### The final answer is: 3", user="<image> How many?", **kw):
    rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "images": images}
    rec.update(kw)
    return rec


CASES = [  # (record, expected reason or None when kept)
    (_rec(["ok.png"]), None),
    (_rec(["big.jpg"]), None),
    (_rec([], user="What is 2 + 1?"), None),  # text-only, consistent: kept
    (_rec(["ok.png"], user="Let me rethink it: <image>"), None),  # the marker only counts in assistant turns
    (_rec(["ok.png"], answer="Step 1 ... I think I have made a mistake. LET me Rethink It. ..."), "reflection"),
    (_rec(["tiny.png"]), "small_image"),
    (_rec(["thin.png"]), "small_image"),
    (_rec(["wide.png"]), "small_image"),
    (_rec(["corrupt.png"]), "corrupt_image"),
    (_rec(["truncated.jpg"]), "corrupt_image"),
    (_rec(["truncated.png"]), "corrupt_image"),
    (_rec(["nope.png"]), "missing_image"),
    (_rec(["ok.png", "nope.png"], user="<image><image> Compare."), "missing_image"),
    (_rec(["ok.png"], user="How many?"), "image_count_mismatch"),  # no <image> but an image
    (_rec(["ok.png", "big.jpg"]), "image_count_mismatch"),
    ({"images": ["ok.png"]}, "bad_messages"),
    (_rec(["ok.png"], messages=[{"role": "user", "content": ["<image>"]}]), "bad_messages"),
    (_rec(["ok.png"], messages=[{"role": "robot", "content": "<image>"}]), "bad_messages"),
    (_rec(["ok.png"], messages=[{"role": "user", "content": "<image> hi"}]), "no_assistant_message"),
    (_rec("ok.png"), "bad_images"),
    ("not a record", "not_an_object"),
]


def test_check_image_classifies_each_file(image_root):
    assert check_image(image_root / "ok.png").problem is None
    assert check_image(image_root / "ok.png").size == (28, 28)
    assert check_image(image_root / "thin.png").problem[0] == "small_image"
    assert check_image(image_root / "truncated.jpg").problem[0] == "corrupt_image"
    # verify() alone lets a JPEG cut in half through; only decoding catches it.
    assert check_image(image_root / "truncated.jpg", decode=False).problem is None
    assert check_image(image_root / "missing.png").problem[0] == "missing_image"


def test_filter_applies_rules_and_writes_sidecar(tmp_path, image_root):
    inp = tmp_path / "sft.json"
    inp.write_text(json.dumps([c for c, _ in CASES]))
    out = tmp_path / "out" / "kept.json"
    res = filter_sft_file(inp, out, image_root, workers=2, progress=False)
    expected_kept = [c for c, r in CASES if r is None]
    assert json.loads(out.read_text()) == expected_kept == res.kept
    got = {d.location: d.reason for d in res.dropped}
    assert got == {f"index {i}": r for i, (_, r) in enumerate(CASES) if r is not None}
    side = json.loads(sidecar_path(out).read_text())
    assert side["total"] == len(CASES) and side["kept"] == len(expected_kept)
    assert [(d["location"], d["reason"]) for d in side["dropped"]] == [(d.location, d.reason) for d in res.dropped]
    assert side["counts"]["small_image"] == 3 and side["counts"]["corrupt_image"] == 3
    assert len(res.kept) + len(res.dropped) == res.total


def test_jsonl_input_with_malformed_lines(tmp_path, image_root):
    inp = tmp_path / "sft.jsonl"
    inp.write_text("\n".join([json.dumps(_rec(["ok.png"])), "{oops", json.dumps(_rec(["tiny.png"]))]) + "\n")
    res = filter_sft_file(inp, tmp_path / "o.json", image_root, progress=False)
    assert len(res.kept) == 1
    assert [(d.location, d.reason) for d in res.dropped] == [("line 2", "malformed_json"), ("line 3", "small_image")]


def test_unreadable_input_is_data_error_naming_file(tmp_path, image_root):
    inp = tmp_path / "broken.json"
    inp.write_text("[{]")
    with pytest.raises(DataError, match="broken.json"):
        filter_sft_file(inp, tmp_path / "o.json", image_root, progress=False)
    assert not (tmp_path / "o.json").exists()
    inp.write_text("[]")
    with pytest.raises(DataError, match="image root .*nowhere"):
        filter_sft_file(inp, tmp_path / "o.json", tmp_path / "nowhere", progress=False)


def test_cli_filter_sft_summary_and_exit_codes(tmp_path, image_root, capsys):
    inp = tmp_path / "sft.json"
    inp.write_text(json.dumps([c for c, _ in CASES]))
    out = tmp_path / "kept.json"
    assert main(["filter-sft", "--input", str(inp), "--output", str(out), "--image_root", str(image_root)]) == 0
    text = capsys.readouterr().out
    n_kept = sum(r is None for _, r in CASES)
    assert any(line.split() == ["kept", str(n_kept)] for line in text.splitlines())
    assert any(line.split() == ["dropped", "small_image", "3"] for line in text.splitlines())
    assert any(line.split() == ["dropped", "reflection", "1"] for line in text.splitlines())
    assert "kept.dropped.json" in text
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    assert main(["filter-sft", "--input", str(bad), "--output", str(out), "--image-root", str(image_root)]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_register_llamafactory_creates_and_preserves(tmp_path, capsys):
    info = tmp_path / "data" / "dataset_info.json"
    assert register_dataset(info, "pebr_r1_warm_up", "./pebr_sft.json") is False
    assert json.loads(info.read_text()) == {"pebr_r1_warm_up": {
        "file_name": "./pebr_sft.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    other = {"alpaca_en": {"file_name": "alpaca.json", "columns": {"prompt": "instruction"}}}
    info.write_text(json.dumps(other))
    assert main(["register-llamafactory", "--dataset-info", str(info), "--name", "mine", "--file", "m.json"]) == 0
    assert "added 'mine'" in capsys.readouterr().out
    assert main(["register-llamafactory", "--dataset-info", str(info), "--name", "mine", "--file", "m2.json"]) == 0
    assert "updated 'mine'" in capsys.readouterr().out
    assert json.loads(info.read_text()) == {**other, "mine": sharegpt_entry("m2.json")}


def test_register_llamafactory_refuses_unreadable_file(tmp_path, capsys):
    info = tmp_path / "dataset_info.json"
    info.write_text('{"alpaca": {')
    assert main(["register-llamafactory", "--dataset-info", str(info), "--file", "x.json"]) == 2
    assert "dataset_info.json" in capsys.readouterr().err
    assert info.read_text() == '{"alpaca": {'
    info.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        register_dataset(info, "x", "x.json")


def test_register_llamafactory_reads_a_dataset_info_with_a_utf8_bom(tmp_path):
    info = tmp_path / "dataset_info.json"
    other = {"alpaca_en": {"file_name": "alpaca.json"}}
    info.write_text("\ufeff" + json.dumps(other), encoding="utf-8")
    assert register_dataset(info, "mine", "m.json") is False
    assert json.loads(info.read_text(encoding="utf-8")) == {**other, "mine": sharegpt_entry("m.json")}
