"""The SGLang engine's CPU-testable parts: the unavailable-backend error, request sharding across rollout
groups and regrouping, and the translation to and from SGLang's request/response formats.

SGLang itself cannot run here; the SGLang-shaped dicts below follow its source (docs/ROLLOUT.md lists the
files and commits). The last test drives the real engine and runs only with CUDA and sglang installed.
"""
from __future__ import annotations

import random
import sys

import pytest
import torch

from pebr_mega.errors import BackendUnavailableError, DataError, PebrError
from pebr_mega.rollout.engine import group_samples
from pebr_mega.rollout.sglang_engine import (
    INSTALL_HINT,
    KV_CACHE,
    WEIGHTS,
    EngineOutput,
    SGLangRolloutEngine,
    engine_server_args,
    expand_image_pads,
    generate_inputs,
    parse_output,
    read_vision_ids,
    regroup_outputs,
    resume_phases,
    rollout_group_count,
    sglang_sampling_params,
    shard_bounds,
)
from pebr_mega.rollout.types import RolloutRequest, SamplingParams

# The API fields of SGLang's SamplingParams (python/sglang/srt/sampling/sampling_params.py, commit 00c17caf).
SGLANG_SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}


def _requests(count: int, with_images: bool = False, seed: int = 0) -> list[RolloutRequest]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        pixels = grid = None
        ids = [1, 2, 100 + i]
        if with_images and i % 2 == 0:
            grid = torch.tensor([[1, 4, 6]])  # 24 patches -> 6 merged tokens
            pixels = torch.randn(24, 12, generator=gen)
            ids = [1, 50] + [9] * 6 + [51, 100 + i]
        out.append(RolloutRequest(record_id=f"r{i}", prompt_ids=ids, pixel_values=pixels, image_grid_thw=grid))
    return out


# ------------------------------------------------------------------------------------------ availability
def test_unavailable_backend_names_reason_and_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` raise ImportError
    with pytest.raises(BackendUnavailableError) as info:
        SGLangRolloutEngine(tmp_path, tp_size=1)
    msg = str(info.value)
    assert isinstance(info.value, PebrError)
    assert INSTALL_HINT in msg and 'pip install "sglang[all]>=0.5"' in msg
    assert "sglang package cannot be imported" in msg
    if not torch.cuda.is_available():
        assert "no CUDA device" in msg


# ------------------------------------------------------------------------------ layout, sharding, regroup
def test_rollout_group_count():
    assert rollout_group_count(8, 2) == 4
    assert rollout_group_count(8, 8) == 1
    assert rollout_group_count(1, 1) == 1
    for world, tp in [(6, 4), (4, 0), (3, 2)]:
        with pytest.raises(ValueError, match="sglang_tp_size"):
            rollout_group_count(world, tp)


def test_shard_bounds_cover_all_requests_contiguously_and_balanced():
    rng = random.Random(0)
    for _ in range(200):
        num, groups = rng.randint(0, 100), rng.randint(1, 16)
        bounds = shard_bounds(num, groups)
        assert len(bounds) == groups
        assert bounds[0][0] == 0 and bounds[-1][1] == num
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the larger shards come first


@pytest.mark.parametrize("num_groups", [1, 3, 4, 7])
def test_shards_answered_per_group_regroup_into_request_order(num_groups):
    """Each group's share goes through generate_inputs; answers carry the seed each sample was given, so the
    regrouped samples show which (request, k) each came from."""
    requests = _requests(10, with_images=True)
    n, base = 3, 1000
    sampling = SamplingParams(n=n, temperature=1.0, seed=base)
    bounds = shard_bounds(len(requests), num_groups)
    per_group = []
    for start, stop in bounds:
        shard = requests[start:stop]
        inputs = generate_inputs(shard, sampling, start, image_token_id=9, merge_size=2)
        assert len(inputs["input_ids"]) == len(shard) * n
        rids = [r.record_id for r in shard for _ in range(n)]
        per_group.append([EngineOutput(rid, [p["sampling_seed"]], "", "length", [-0.5])
                          for rid, p in zip(rids, inputs["sampling_params"])])
    samples = regroup_outputs(requests, n, bounds, per_group)
    assert len(samples) == len(requests) * n
    for i, req in enumerate(requests):
        for k in range(n):
            s = samples[i * n + k]
            assert s.request is req and s.index == k
            assert s.response_ids == [base + i * n + k]  # distinct seeds for all samples of the batch
    groups = list(group_samples(samples))
    assert [g[0].record_id for g in groups] == [r.record_id for r in requests]
    assert all(len(g) == n for g in groups)


def test_regroup_rejects_wrong_counts_records_and_reports_group_failures():
    requests = _requests(4)
    bounds = shard_bounds(4, 2)
    good = [[EngineOutput(r.record_id, [1], "", "stop", [0.0]) for r in requests[s:e]] for s, e in bounds]
    assert len(regroup_outputs(requests, 1, bounds, good)) == 4
    with pytest.raises(PebrError, match="same requests on every rank"):
        regroup_outputs(requests, 1, bounds, [good[1], good[0]])
    with pytest.raises(PebrError, match="returned 1 outputs for 2 requests"):
        regroup_outputs(requests, 1, bounds, [good[0][:1], good[1]])
    with pytest.raises(PebrError, match="rollout group 1 returned none"):
        regroup_outputs(requests, 1, bounds, [good[0], None])
    with pytest.raises(PebrError, match="rollout group 0 failed to generate: RuntimeError: boom"):
        regroup_outputs(requests, 1, bounds, ["RuntimeError: boom", good[1]])


# ----------------------------------------------------------------------------------- request translation
def test_sampling_params_translation():
    s = SamplingParams(n=8, temperature=1.2, top_p=0.99, top_k=-1, max_new_tokens=2048, stop_token_ids=[7, 8])
    p = sglang_sampling_params(s, seed=None)
    assert p == {"temperature": 1.2, "top_p": 0.99, "top_k": -1, "max_new_tokens": 2048,
                 "skip_special_tokens": True, "stop_token_ids": [7, 8]}
    assert "n" not in p  # requests are repeated instead, so the batch order stays request-major
    p = sglang_sampling_params(SamplingParams(top_k=0, temperature=0.0), seed=5)
    assert p["top_k"] == -1 and p["temperature"] == 0.0 and p["sampling_seed"] == 5 and "stop_token_ids" not in p
    assert sglang_sampling_params(SamplingParams(top_k=20), seed=None)["top_k"] == 20
    assert set(p) <= SGLANG_SAMPLING_FIELDS


def test_expand_image_pads_against_the_prompt_renderer(tiny_model_dir):
    """Prompts rendered with expanded pads pass through; one pad per image is expanded to the same ids."""
    from transformers import AutoTokenizer

    from pebr_mega.data.prompts import render_prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad, merge = read_vision_ids(tiny_model_dir)
    assert pad == tok.convert_tokens_to_ids("<|image_pad|>") and merge == 2
    rng = random.Random(1)
    for _ in range(5):
        grid = torch.tensor([[1, 2 * rng.randint(1, 8), 2 * rng.randint(1, 8)] for _ in range(rng.randint(1, 3))])
        counts = [int(t * h * w) // merge ** 2 for t, h, w in grid.tolist()]
        problem = " and ".join(["<image>"] * len(counts)) + " what is shown?"
        expanded = render_prompt_ids(tok, problem, counts)
        single = render_prompt_ids(tok, problem, [1] * len(counts))
        assert expand_image_pads(expanded, grid, pad, merge) == expanded
        assert expand_image_pads(single, grid, pad, merge) == expanded
    text_only = render_prompt_ids(tok, "no image here", [])
    assert expand_image_pads(text_only, None, pad, merge) == text_only
    with pytest.raises(DataError, match="record 'x': 1 image-pad runs in the prompt but 2 images"):
        expand_image_pads(render_prompt_ids(tok, "<image>", [4]), torch.tensor([[1, 4, 4], [1, 2, 2]]), pad, merge,
                          "record 'x'")
    with pytest.raises(DataError, match=r"lengths \[3\] match neither the expected \[4\]"):
        expand_image_pads(render_prompt_ids(tok, "<image>", [3]), torch.tensor([[1, 4, 4]]), pad, merge)


def test_generate_inputs_repeat_requests_with_processor_output_images():
    requests = _requests(3, with_images=True)
    inputs = generate_inputs(requests, SamplingParams(n=2, seed=None), 0, image_token_id=9, merge_size=2)
    assert inputs["input_ids"] == [r.prompt_ids for r in requests for _ in range(2)]
    images = inputs["image_data"]
    assert len(images) == 6 and images[2] == [None] and images[3] == [None]
    for j in (0, 1, 4, 5):
        (item,) = images[j]
        req = requests[j // 2]
        assert item["format"] == "processor_output"
        assert torch.equal(item["pixel_values"], req.pixel_values)
        assert torch.equal(item["image_grid_thw"], req.image_grid_thw)
    assert all("sampling_seed" not in p for p in inputs["sampling_params"])
    text_only = generate_inputs(_requests(2), SamplingParams(n=1), 0, image_token_id=9, merge_size=2)
    assert text_only["image_data"] is None


# ------------------------------------------------------------------------------------ output translation
def _sglang_output(ids, logprobs, finish):
    """A generate() result shaped as SGLang's TokenizerManager builds it (text, output_ids, meta_info)."""
    trimmed = ids[:-1] if finish.get("type") == "stop" else ids
    return {"text": "decoded", "output_ids": list(trimmed),
            "meta_info": {"id": "abc", "finish_reason": finish, "prompt_tokens": 5, "completion_tokens": len(ids),
                          "output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, ids)]}}


def test_parse_output_keeps_the_stop_token_and_maps_finish_reasons():
    rng = random.Random(2)
    ids = [rng.randrange(1000) for _ in range(6)] + [151645]
    lps = [-rng.random() * 5 for _ in ids]
    out = parse_output(_sglang_output(ids, lps, {"type": "stop", "matched": 151645}), "q1")
    assert out == EngineOutput("q1", ids, "decoded", "stop", lps)
    out = parse_output(_sglang_output(ids[:4], lps[:4], {"type": "length", "length": 4}), "q1")
    assert (out.finish_reason, out.response_ids, out.logprobs) == ("length", ids[:4], lps[:4])
    with pytest.raises(PebrError, match="did not finish record 'q2'.*abort"):
        parse_output(_sglang_output(ids, lps, {"type": "abort", "message": "too long"}), "q2")
    with pytest.raises(PebrError, match="stopped on token 5 but it is not the last"):
        parse_output(_sglang_output(ids, lps, {"type": "stop", "matched": 5}), "q3")
    broken = _sglang_output(ids, lps, {"type": "length", "length": 7})
    del broken["meta_info"]["output_token_logprobs"]
    with pytest.raises(PebrError, match="no output_token_logprobs for record 'q4'"):
        parse_output(broken, "q4")


# ------------------------------------------------------------------------------------ server args, memory
def test_engine_server_args_pass_through_and_own_four_keys():
    args = engine_server_args("/m", 2, 4, 7, {"mem_fraction_static": 0.5})
    assert args == {"enable_memory_saver": True, "mem_fraction_static": 0.5, "model_path": "/m", "tp_size": 2,
                    "base_gpu_id": 4, "random_seed": 7}
    assert engine_server_args("/m", 1, 0, 0, {"enable_memory_saver": False})["enable_memory_saver"] is False
    with pytest.raises(ValueError, match=r"may not set \['base_gpu_id', 'tp_size'\]"):
        engine_server_args("/m", 1, 0, 0, {"tp_size": 2, "base_gpu_id": 1})


def test_resume_phases_bring_weights_back_before_the_rest():
    released = {WEIGHTS, KV_CACHE, "cuda_graph"}
    assert resume_phases(released, None) == [[WEIGHTS], ["cuda_graph", KV_CACHE]]
    assert resume_phases(released, [WEIGHTS]) == [[WEIGHTS]]
    assert resume_phases({KV_CACHE, "cuda_graph"}, None) == [["cuda_graph", KV_CACHE]]
    assert resume_phases({KV_CACHE}, [WEIGHTS, KV_CACHE]) == [[KV_CACHE]]
    assert resume_phases(set(), None) == []


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_sglang_matches_hf_engine_greedy_before_and_after_a_weight_sync(tiny_model_dir):
    """Never executed yet (no GPU in the sessions that wrote it): greedy SGLang vs HF generate on the tiny
    model, then release -> resume weights -> sync perturbed weights -> resume the rest -> generate again."""
    pytest.importorskip("sglang")
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer
    from PIL import Image

    from pebr_mega.data.prompts import render_prompt_ids
    from pebr_mega.rollout.hf_engine import HFRolloutEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    proc = AutoImageProcessor.from_pretrained(tiny_model_dir)
    rng = random.Random(3)
    requests = []
    for i in range(4):
        image = Image.frombytes("RGB", (112, 84), bytes(rng.randrange(256) for _ in range(112 * 84 * 3)))
        px = proc(images=[image], return_tensors="pt")
        count = int(px["image_grid_thw"].prod()) // 4
        ids = render_prompt_ids(tok, f"<image> question {i}?", [count])
        requests.append(RolloutRequest(f"r{i}", ids, px["pixel_values"], px["image_grid_thw"]))
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=12, stop_token_ids=[tok.eos_token_id])
    hf = HFRolloutEngine.from_pretrained(tiny_model_dir, device="cuda")
    sgl = SGLangRolloutEngine(tiny_model_dir, server_args={"mem_fraction_static": 0.2, "attention_backend": "triton"})
    try:
        def compare():
            a, b = sgl.generate(requests, sampling), hf.generate(requests, sampling)
            same = [x for x, y in zip(a, b) if x.response_ids == y.response_ids]
            assert len(same) >= 3
            for x, y in zip(a, b):
                if x.response_ids == y.response_ids:
                    assert max(abs(p - q) for p, q in zip(x.rollout_logprobs, y.rollout_logprobs)) < 2e-2

        compare()
        gen = torch.Generator().manual_seed(0)
        new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in load_file(tiny_model_dir / "model.safetensors").items()}
        bucket = [(k, v.cuda()) for k, v in new.items()]
        sgl.release_memory()
        sgl.resume_memory([WEIGHTS])
        sgl.update_weights([bucket[: len(bucket) // 2], bucket[len(bucket) // 2:]])
        sgl.resume_memory()
        hf.update_weights([bucket])
        compare()
    finally:
        sgl.shutdown()
