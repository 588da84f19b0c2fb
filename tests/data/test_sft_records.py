"""SFT records as LLaMA-Factory reads them: JSON/JSONL, both ShareGPT tag styles and dataset_info entries,
truncation at the cutoff against a re-statement of LLaMA-Factory's rule, images (convert("RGB"), its
pre-resize) and never a cut image block."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pebr_mega.config import ConfigError, load_config
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.data.sft_records import (FROM_VALUE, columns_from_dataset_info, encode_sft_file, infer_seqlen,
                                        resolve_sft_source)
from pebr_mega.errors import DataError

DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def decoder():
    return PilImageDecoder(ImageConfig(min_pixels=3136, max_pixels=50176))


# ---------------------------------------------------------------------------------------------- reference
# LLaMA-Factory's supervised encoding for the qwen2_vl template, restated from hiyouga/LLaMA-Factory
# (data/template.py "qwen2_vl", data/processor/supervised.py _encode_data_example, processor_utils.infer_seqlen).
def _lf_infer_seqlen(source_len, target_len, cutoff_len):
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def _lf_encode(tok, turns, cutoff_len, system=""):
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    input_ids, labels, total = [], [], 0
    for i, (user, reply) in enumerate(turns):
        source = f"<|im_start|>system\n{system or DEFAULT_SYSTEM}<|im_end|>\n" if i == 0 else ""
        source += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        s, t = ids(source), ids(f"{reply}<|im_end|>\n")
        if total >= cutoff_len:
            break
        s_len, t_len = _lf_infer_seqlen(len(s), len(t), cutoff_len - total)
        input_ids += s[:s_len] + t[:t_len]
        labels += [0] * s_len + [1] * t_len
        total += s_len + t_len
    return input_ids, labels


def _words(n, seed):
    rng = np.random.default_rng(seed)
    vocab = ["red", "circle", "two", "square", "count", "the", "blue", "shapes", "left", "answer"]
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


TURNS = [(_words(30, 0), _words(12, 1)), (_words(6, 2), _words(80, 3)), (_words(10, 4), _words(5, 5))]


def _write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def _role_content(turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def _from_value(turns):
    return {"conversations": [m for u, a in turns for m in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]}


# ---------------------------------------------------------------------------------------------- tests
def test_infer_seqlen_is_llamafactorys():
    for s in range(0, 60, 7):
        for t in range(0, 60, 5):
            for c in (1, 10, 33, 64, 200):
                assert infer_seqlen(s, t, c) == _lf_infer_seqlen(s, t, c)


@pytest.mark.parametrize("cutoff", [10_000, 150, 100, 70, 40, 12])
def test_truncation_matches_llamafactory(tmp_path, tok, decoder, cutoff):
    f = _write(tmp_path / "sft.json", [_role_content(TURNS, system="Be brief.")])
    examples, report = encode_sft_file(f, tok, decoder, tmp_path, cutoff)
    ids, labels = _lf_encode(tok, TURNS, cutoff, system="Be brief.")
    assert examples[0].input_ids == ids and examples[0].loss_mask == labels
    assert len(ids) <= cutoff and report.kept == 1 and not report.skipped
    full = len(_lf_encode(tok, TURNS, 10_000, system="Be brief.")[0])
    assert report.truncated == int(full > cutoff)


def test_both_tag_styles_json_jsonl_and_dataset_info_read_alike(tmp_path, tok, decoder):
    (tmp_path / "a.json").write_text(json.dumps([_role_content(TURNS[:2])]))
    _write(tmp_path / "b.jsonl", [_from_value(TURNS[:2])], jsonl=True)
    custom = {"dialog": [m for u, a in TURNS[:2] for m in ({"speaker": "person", "text": u},
                                                             {"speaker": "bot", "text": a})]}
    _write(tmp_path / "c.jsonl", [custom], jsonl=True)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {
        "file_name": "c.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog", "images": "pics"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot"}}}))
    path, cols = resolve_sft_source("", str(tmp_path / "dataset_info.json"), "mine")
    assert path == tmp_path / "c.jsonl" and (cols.messages, cols.images, cols.role_tag) == ("dialog", "pics", "speaker")
    outs = [encode_sft_file(tmp_path / "a.json", tok, decoder, tmp_path, 4096)[0],
            encode_sft_file(tmp_path / "b.jsonl", tok, decoder, tmp_path, 4096)[0],
            encode_sft_file(path, tok, decoder, tmp_path, 4096, columns=cols)[0]]
    expected = _lf_encode(tok, TURNS[:2], 4096)
    for out in outs:
        assert len(out) == 1 and (out[0].input_ids, out[0].loss_mask) == expected


def test_dataset_info_errors(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"a": {"file_name": "a.json"}, "b": {"formatting": "sharegpt"}}))
    with pytest.raises(DataError, match="no dataset entry 'zz'"):
        columns_from_dataset_info(info, "zz")
    with pytest.raises(DataError, match="only formatting 'sharegpt'"):
        columns_from_dataset_info(info, "a")
    cols, file = columns_from_dataset_info(info, "b")
    assert cols == FROM_VALUE.__class__(images=None) and file is None  # LLaMA-Factory's defaults, no images
    with pytest.raises(DataError, match="no file_name"):
        resolve_sft_source("", str(info), "b")
    with pytest.raises(ConfigError, match=r"sft\.dataset_info"):
        load_config(None, ["sft.dataset_name=b"])


def _png(path, h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    if mode == "RGBA":
        arr[: h // 2, :, 3] = 0  # the top half transparent
    Image.fromarray(arr, mode).save(path)


def test_images_are_converted_and_scaled_as_llamafactory_does(tmp_path, tok, decoder):
    _png(tmp_path / "rgba.png", 84, 112, 0, "RGBA")
    _png(tmp_path / "big.png", 150, 200, 1)
    rec = {"messages": [{"role": "user", "content": "<image><image>How many?"},
                        {"role": "assistant", "content": "### The final answer is: 2"}],
           "images": ["rgba.png", "big.png"]}
    f = _write(tmp_path / "sft.json", [rec])
    (ex,), _ = encode_sft_file(f, tok, decoder, tmp_path, 4096, image_max_pixels=20000)
    # LLaMA-Factory: convert("RGB") (transparent pixels keep their colour), and an area cap with sides truncated.
    rgba = Image.open(tmp_path / "rgba.png").convert("RGB")
    big = Image.open(tmp_path / "big.png")
    scale = (20000 / (150 * 200)) ** 0.5
    big = big.resize((int(200 * scale), int(150 * scale)))
    ref = decoder.decode_and_preprocess([rgba, big])
    assert torch.equal(ex.pixel_values, ref.pixel_values) and torch.equal(ex.image_grid_thw, ref.image_grid_thw)
    white = decoder.decode_and_preprocess([tmp_path / "rgba.png"])  # our RL loader composites onto white
    assert not torch.equal(ex.pixel_values[: white.pixel_values.shape[0]], white.pixel_values)


def test_a_cut_never_splits_an_image_block(tmp_path, tok, decoder):
    _png(tmp_path / "a.png", 112, 112, 2)
    _png(tmp_path / "b.png", 112, 112, 3)
    user, reply = "<image> and <image> " + _words(20, 6), "### The final answer is: 3"
    rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
           "images": ["a.png", "b.png"]}
    f = _write(tmp_path / "sft.json", [rec])
    (full,), _ = encode_sft_file(f, tok, decoder, tmp_path, 4096)
    start = tok.convert_tokens_to_ids("<|vision_start|>")
    second = [i for i, t in enumerate(full.input_ids) if t == start][1]
    target_len = sum(full.loss_mask)
    # A short target keeps its length (LLaMA-Factory's rule); the source is cut 5 tokens into the second block.
    cutoff = target_len + second + 5
    (ex,), report = encode_sft_file(f, tok, decoder, tmp_path, cutoff)
    source_kept = ex.loss_mask.index(1)
    assert source_kept == second  # the cut moved back to the block's start
    assert ex.input_ids == full.input_ids[:second] + full.input_ids[-target_len:]
    rows = int(full.image_grid_thw[0].prod())
    assert torch.equal(ex.pixel_values, full.pixel_values[:rows]) and ex.image_grid_thw.tolist() == [full.image_grid_thw[0].tolist()]
    assert (report.truncated, report.images_dropped, report.kept) == (1, 1, 1)
    assert "lost an image: 1" in str(report)


def test_bad_records_are_counted_by_reason(tmp_path, tok, decoder):
    _png(tmp_path / "a.png", 56, 56, 4)
    good = _role_content(TURNS[:1])
    records = [
        good,
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},  # bad_roles
        {"messages": [{"role": "user", "content": "x"}]},  # odd_turns
        {"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
         "images": ["missing.png"]},  # image
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "images": ["a.png"]},  # image_count_mismatch
        {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f()"}]},  # tool_turns
        {"other": 1},  # no_messages
    ]
    text = "\n".join(json.dumps(r) for r in records) + "\n{broken json\n"
    (tmp_path / "sft.jsonl").write_text(text)
    examples, report = encode_sft_file(tmp_path / "sft.jsonl", tok, decoder, tmp_path, 4096)
    assert len(examples) == 1 and report.total == 8
    assert report.skipped == {"bad_roles": 1, "odd_turns": 1, "image": 1, "image_count_mismatch": 1,
                              "tool_turns": 1, "no_messages": 1, "malformed_json": 1}
    assert "kept 1 of 8" in str(report)


def test_images_outside_the_image_root_are_refused_unless_allowed(tmp_path, tok, decoder):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    _png(root / "in.png", 56, 56, 5)
    _png(outside / "secret.png", 56, 56, 6)
    (root / "link.png").symlink_to(outside / "secret.png")  # a symlink pointing out of the root

    def rec(path):
        return {"messages": [{"role": "user", "content": "<image>How many?"},
                             {"role": "assistant", "content": "### The final answer is: 2"}], "images": [path]}

    f = _write(tmp_path / "sft.json", [rec("in.png"), rec("../outside/secret.png"), rec(str(outside / "secret.png")),
                                       rec("link.png")])
    examples, report = encode_sft_file(f, tok, decoder, root, 4096)
    assert [e.location for e in examples] == ["index 0"]
    assert report.skipped == {"image_outside_root": 3} and "image_outside_root" in str(report)
    examples, report = encode_sft_file(f, tok, decoder, root, 4096, allow_outside_root=True)
    assert len(examples) == 4 and not report.skipped


def test_sft_files_and_dataset_info_with_a_utf8_bom_are_read(tmp_path, tok, decoder):
    records = [_role_content(TURNS[:1]), _role_content(TURNS[1:2])]
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("\ufeff" + "\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    pretty = tmp_path / "sft.json"
    pretty.write_text("\ufeff" + json.dumps(records, indent=2), encoding="utf-8")
    for f in (jsonl, pretty):
        examples, report = encode_sft_file(f, tok, decoder, tmp_path, 4096)
        assert len(examples) == 2 and not report.skipped, f
    info = tmp_path / "dataset_info.json"
    info.write_text("\ufeff" + json.dumps({"warm": {"file_name": "sft.json", "formatting": "sharegpt",
                                                    "columns": {"messages": "messages"}}}), encoding="utf-8")
    cols, file = columns_from_dataset_info(info, "warm")
    assert file == pretty and cols.messages == "messages"


def test_sft_images_are_upright_and_16_bit_images_scaled(tmp_path):
    from pebr_mega.data.sft_records import load_sft_image

    values = np.tile(np.round(np.linspace(0, 65535, 64)).astype(np.uint16), (48, 1))
    Image.fromarray(values).save(tmp_path / "g16.png")
    gray = np.asarray(load_sft_image(str(tmp_path / "g16.png")))[..., 0]
    assert np.array_equal(gray, np.rint(values / 257.0).astype(np.uint8))  # 255 / 65535 = 1 / 257
    stored = Image.new("RGB", (90, 60), (200, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "portrait.jpg", exif=exif)
    assert load_sft_image(str(tmp_path / "portrait.jpg")).size == (60, 90)
