"""The SGLang engine's CPU-testable parts: the unavailable-backend error, request sharding across rollout
groups and regrouping, the translation to and from SGLang's request/response formats, the torchrun variable
cleared around the constructor, and the collective side (gloo group, all-gathers, failure agreement) at world
size 2 over gloo.

SGLang itself cannot run here; the SGLang-shaped dicts below follow its source (docs/ROLLOUT.md lists the
files and commits). The stand-in for `sglang.Engine` in the two-rank test replaces SGLang only at the
`Engine.generate` / memory-call boundary. The last test drives the real engine and runs only with CUDA and
sglang installed.
"""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from pebr_mega.errors import BackendUnavailableError, DataError, PebrError
from pebr_mega.rollout.engine import group_samples
from pebr_mega.rollout.sglang_engine import (
    INSTALL_HINT,
    KV_CACHE,
    SGLANG_PORT_BASE,
    WEIGHTS,
    EngineOutput,
    RolloutGroups,
    SGLangRolloutEngine,
    engine_port,
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
    start_sglang_engine,
    sglang_env_cleared,
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
    assert INSTALL_HINT in msg and 'pip install -e ".[gpu]"' in msg and "sglang window of setup.py" in msg
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
        inputs = generate_inputs(shard, sampling, start, image_token_id=9, merge_size=2, parallel_sampling=False)
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
    assert "n" not in p  # one sample: SGLang's default n = 1
    assert sglang_sampling_params(s, seed=None, n=8)["n"] == 8
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


def test_generate_inputs_send_each_request_once_with_sglangs_own_n():
    """SGLang's `n`: one entry per request (its image data processed and its prompt prefilled once), all n
    samples of a request sharing one params dict, so no per-sample seed is sent; n = 1 keeps the seed."""
    requests = _requests(3, with_images=True)
    inputs = generate_inputs(requests, SamplingParams(n=4, seed=7), 10, image_token_id=9, merge_size=2)
    assert inputs["input_ids"] == [r.prompt_ids for r in requests]
    assert [len(item) for item in inputs["image_data"]] == [1, 1, 1]
    assert inputs["image_data"][1] == [None] and inputs["image_data"][0][0]["format"] == "processor_output"
    assert all(p["n"] == 4 and "sampling_seed" not in p for p in inputs["sampling_params"])
    single = generate_inputs(requests, SamplingParams(n=1, seed=7), 10, image_token_id=9, merge_size=2)
    assert [p["sampling_seed"] for p in single["sampling_params"]] == [17, 18, 19]
    assert all("n" not in p for p in single["sampling_params"])


def test_generate_inputs_repeat_requests_with_processor_output_images():
    requests = _requests(3, with_images=True)
    inputs = generate_inputs(requests, SamplingParams(n=2, seed=None), 0, image_token_id=9, merge_size=2,
                             parallel_sampling=False)
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
def _sglang_output(ids, logprobs, finish, prompt_tokens=5):
    """A generate() result shaped as SGLang's TokenizerManager builds it (text, output_ids, meta_info)."""
    trimmed = ids[:-1] if finish.get("type") == "stop" else ids
    return {"text": "decoded", "output_ids": list(trimmed),
            "meta_info": {"id": "abc", "finish_reason": finish, "prompt_tokens": prompt_tokens,
                          "completion_tokens": len(ids),
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
    assert parse_output(_sglang_output(ids, lps, {"type": "length"}, prompt_tokens=9), "q5", 9).response_ids == ids
    with pytest.raises(PebrError, match="record 'q5': SGLang generated from a prompt of 10 tokens, not the 9"):
        parse_output(_sglang_output(ids, lps, {"type": "length"}, prompt_tokens=10), "q5", 9)


# ------------------------------------------------------------------------------------ server args, memory
def test_engine_server_args_pass_through_and_own_five_keys():
    args = engine_server_args("/m", 2, 4, 7, {"mem_fraction_static": 0.5})
    assert args == {"enable_memory_saver": True, "mem_fraction_static": 0.5, "model_path": "/m", "tp_size": 2,
                    "base_gpu_id": 4, "random_seed": 7, "port": engine_port(4)}
    assert engine_server_args("/m", 1, 0, 0, {"enable_memory_saver": False})["enable_memory_saver"] is False
    with pytest.raises(ValueError, match=r"may not set \['base_gpu_id', 'port', 'tp_size'\]"):
        engine_server_args("/m", 1, 0, 0, {"tp_size": 2, "base_gpu_id": 1, "port": 30000})


def test_engines_on_one_node_get_ports_far_apart():
    """SGLang 0.4/0.5 picks the scheduler rendezvous port as `port + random.randint(100, 1000)` (then +42
    while taken) from the trainer's identically seeded `random`: distinct `port`s keep the picks distinct."""
    ports = [engine_server_args("/m", 1, gpu, 0, None)["port"] for gpu in range(8)]
    assert ports[0] == SGLANG_PORT_BASE and len(set(ports)) == 8
    offset = random.Random(0).randint(100, 1000)  # the same offset on every rank
    picks = {p + offset + 42 * k for p in ports for k in range(3)}  # even after two taken candidates each
    assert len(picks) == 8 * 3


def test_resume_phases_bring_weights_back_before_the_rest():
    released = {WEIGHTS, KV_CACHE, "cuda_graph"}
    assert resume_phases(released, None) == [[WEIGHTS], ["cuda_graph", KV_CACHE]]
    assert resume_phases(released, [WEIGHTS]) == [[WEIGHTS]]
    assert resume_phases({KV_CACHE, "cuda_graph"}, None) == [["cuda_graph", KV_CACHE]]
    assert resume_phases({KV_CACHE}, [WEIGHTS, KV_CACHE]) == [[KV_CACHE]]
    assert resume_phases(set(), None) == []


# ------------------------------------------------------------------------- torchrun variables, stub Engine
# What one SGLang scheduler does at start-up (python/sglang/srt/distributed/parallel_state.py
# `init_distributed_environment`): a tcp:// rendezvous with explicit rank and world size, here of one rank.
_SCHEDULER = textwrap.dedent("""
    import datetime, sys
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=1))
    except Exception as exc:
        print("rendezvous failed:", type(exc).__name__)
        sys.exit(3)
    dist.destroy_process_group()
""")


def _scheduler(env=None) -> subprocess.Popen:
    from pebr_mega.parallel.launch import free_port

    return subprocess.Popen([sys.executable, "-c", _SCHEDULER, str(free_port())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


class _StubSGLang:
    """Stands in for the `sglang` module at its constructor only: `Engine(**args)` records the environment
    and starts one scheduler-like child process, as SGLang's constructor spawns its schedulers."""

    seen: dict = {}

    class Engine:
        def __init__(self, **kwargs):
            _StubSGLang.seen = {"args": kwargs, "store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE"),
                                "master_port": os.environ.get("MASTER_PORT"),
                                "alloc": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
            # what SGLang's _set_envs_and_config does to the caller's environment (srt/entrypoints/engine.py)
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "8"
            os.environ["NCCL_CUMEM_ENABLE"] = os.environ["NCCL_NVLS_ENABLE"] = "0"
            child = _scheduler()  # inherits this process's environment, like a spawned scheduler
            _StubSGLang.seen["child_rc"] = child.wait(timeout=120)
            if kwargs.get("fail"):
                raise RuntimeError("engine start failed")


def test_torchrun_store_variable_is_cleared_around_the_engine_constructor(monkeypatch):
    """Under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) a scheduler's tcp:// rendezvous builds a client-only
    store and times out; inside start_sglang_engine the variable is gone (and the allocator setting that
    disables SGLang's memory saver), and both are back afterwards."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # the launch scripts' value (Megatron's overlap)
    monkeypatch.delenv("NCCL_CUMEM_ENABLE", raising=False)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    control = _scheduler(env=dict(os.environ))  # a scheduler started with torchrun's environment as is
    start_sglang_engine(_StubSGLang, {"model_path": "/m"})
    assert _StubSGLang.seen["store"] is None and _StubSGLang.seen["alloc"] is None
    assert _StubSGLang.seen["child_rc"] == 0
    assert _StubSGLang.seen["master_port"] == "29500" and _StubSGLang.seen["args"] == {"model_path": "/m"}
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # what the constructor set for its own processes is gone from the trainer's: owner ranks and the rest
    # create their NCCL communicators with one environment
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "NCCL_CUMEM_ENABLE" not in os.environ and "NCCL_NVLS_ENABLE" not in os.environ
    assert control.wait(timeout=120) == 3 and "rendezvous failed" in control.stdout.read()

    with pytest.raises(RuntimeError, match="engine start failed"):
        start_sglang_engine(_StubSGLang, {"fail": True})
    assert _StubSGLang.seen["store"] is None and os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"


def test_sglang_env_cleared_restores_the_state_before_it(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with sglang_env_cleared():
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # set inside: gone afterwards
    assert "TORCHELASTIC_USE_AGENT_STORE" not in os.environ
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    with pytest.raises(KeyError):
        with sglang_env_cleared():
            assert "TORCHELASTIC_USE_AGENT_STORE" not in os.environ
            raise KeyError("x")
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "False"


# ------------------------------------------------------------------------- collectives at world size 2
class _StandInEngine:
    """Replaces `sglang.Engine` at the generate and memory-call boundary: answers shaped as SGLang's
    TokenizerManager builds them (the response is [seed % 1000, stop token 7]), calls recorded."""

    def __init__(self, fail_generate: bool = False, fail_release: bool = False) -> None:
        self.calls: list = []
        self.fail_generate, self.fail_release = fail_generate, fail_release

    def generate(self, input_ids, image_data, sampling_params, return_logprob):
        assert return_logprob is True
        if self.fail_generate:
            raise RuntimeError("scheduler died")
        outs = []
        for ids, p in zip(input_ids, sampling_params, strict=True):
            # SGLang's own n answers request by request (TokenizerManager._handle_batch_request); without a
            # seed the answer names its prompt's last id and the sample's position
            for k in range(p.get("n", 1)):
                tag = p["sampling_seed"] % 1000 if "sampling_seed" in p else ids[-1] * 10 + k
                outs.append(_sglang_output([tag, 7], [-0.25, -0.5], {"type": "stop", "matched": 7},
                                           prompt_tokens=len(ids)))
        return outs

    def release_memory_occupation(self, tags):
        if self.fail_release:
            raise RuntimeError("release refused")
        self.calls.append(("release", sorted(tags)))

    def resume_memory_occupation(self, tags):
        self.calls.append(("resume", sorted(tags)))


def _engine_worker(rank: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return {tp_size: _engine_checks(rank, tp_size) for tp_size in (1, 2)}


def _engine_checks(rank: int, tp_size: int) -> dict:
    import torch.distributed as dist

    groups_used, real = [], {"all_gather_object": dist.all_gather_object, "barrier": dist.barrier}

    def recording(name):  # records the group of each call; the real collective still runs
        def call(*args, group=None, **kwargs):
            groups_used.append((name, group))
            return real[name](*args, group=group, **kwargs)
        return call

    dist.all_gather_object, dist.barrier = recording("all_gather_object"), recording("barrier")
    try:
        groups = RolloutGroups(tp_size)
        out = {"owner": groups.is_owner, "backend": dist.get_backend(groups.cpu_group),
               "not_world": groups.cpu_group is not dist.group.WORLD}
        tags = [KV_CACHE, WEIGHTS, "cuda_graph"]
        engine = SGLangRolloutEngine.__new__(SGLangRolloutEngine)
        stand_in = _StandInEngine() if groups.is_owner else None
        engine._attach(groups, stand_in, image_token_id=9, merge_size=2, memory_tags=tags, gpu=None)
        requests = _requests(5, with_images=True)
        samples = engine.generate(requests, SamplingParams(n=2, seed=100, stop_token_ids=[7]))
        out["samples"] = [(s.record_id, s.index, s.response_ids, s.rollout_logprobs, s.finish_reason) for s in samples]
        engine.release_memory()
        engine.resume_memory([WEIGHTS])
        engine.resume_memory()
        out["memory_calls"] = None if stand_in is None else stand_in.calls

        broken = SGLangRolloutEngine.__new__(SGLangRolloutEngine)  # the second group's owner fails to generate
        broken._attach(groups, _StandInEngine(fail_generate=groups.group == groups.num_groups - 1) if groups.is_owner
                       else None, 9, 2, tags, None)
        try:
            broken.generate(requests, SamplingParams(n=1, seed=0))
        except PebrError as exc:
            out["generate_error"] = str(exc)
        broken._attach(groups, _StandInEngine(fail_release=True) if rank == 0 else None, 9, 2, tags, None)
        try:
            broken.release_memory()
        except Exception as exc:
            out["release_error"] = f"{type(exc).__name__}: {exc}"
        if tp_size == 2:
            out["per_rank_update"] = _per_rank_update(groups, rank, tags)
        out["groups_used"] = [(name, group is groups.cpu_group) for name, group in groups_used]
        return out
    finally:
        dist.all_gather_object, dist.barrier = real["all_gather_object"], real["barrier"]


@dataclasses.dataclass
class _LocalSerialized:
    """Stands in for SGLang's LocalSerializedTensor: `values[r]` is TP rank r's payload."""

    values: list


def _per_rank_update(groups, rank: int, tags) -> dict:
    """Rollout TP 2: each rank serialises its own bucket (its values are rank + 1); the owner's Engine call
    gets one per-rank payload list per name. SGLang's serializer is replaced by a tag naming the rank and the
    tensor's sum (CUDA IPC cannot run here)."""
    stand_in = _WeightEngine(session=True) if groups.is_owner else None
    if stand_in is not None:
        received = []
        load = stand_in.update_weights_from_tensor
        stand_in.update_weights_from_tensor = lambda named_tensors, **kw: (received.append(named_tensors),
                                                                           load(named_tensors, **kw))[1]
    engine = SGLangRolloutEngine.__new__(SGLangRolloutEngine)
    serialize = lambda t: f"rank{rank}:{float(t.sum())}".encode()  # noqa: E731
    engine._attach(groups, stand_in, 9, 2, tags, gpu=None, ipc=(serialize, _LocalSerialized))
    buckets = ([(f"w{b}.{j}", torch.full((2,), float(rank + 1))) for j in range(2)] for b in range(2))
    engine.update_weights(buckets)
    if stand_in is None:
        return {}
    return {"calls": stand_in.calls,
            "named": [[(name, t.values) for name, t in named] for named in received]}


def test_engine_collectives_use_one_gloo_group_at_world_size_2():
    """Rollout TP 1 (two groups) and 2 (one group): both ranks get every sample in request order; every
    object all-gather and barrier of the engine runs on the gloo group made once by RolloutGroups, never on
    the default group; a failure on one rank is raised on both."""
    from pebr_mega.parallel.launch import spawn

    by_rank = spawn(_engine_worker, 2, timeout_s=300)
    for tp_size in (1, 2):
        _check_engine_collectives(tp_size, [r[tp_size] for r in by_rank])


def _check_engine_collectives(tp_size: int, results: list) -> None:
    assert [r["owner"] for r in results] == ([True, True] if tp_size == 1 else [True, False])
    assert all(r["backend"] == "gloo" and r["not_world"] for r in results)
    assert results[0]["samples"] == results[1]["samples"]
    expected = [(f"r{i}", k, [(100 + i) * 10 + k, 7], [-0.25, -0.5], "stop") for i in range(5) for k in range(2)]
    assert [tuple(s) for s in results[0]["samples"]] == expected
    owners = [r for r in results if r["owner"]]
    for r in owners:  # release everything held; weights resumed alone first, then the rest in one call
        assert r["memory_calls"] == [("release", ["cuda_graph", KV_CACHE, WEIGHTS]), ("resume", [WEIGHTS]),
                                     ("resume", ["cuda_graph", KV_CACHE])]
    last_group = 2 // tp_size - 1
    for r in results:
        assert f"rollout group {last_group} failed to generate: RuntimeError: scheduler died" in r["generate_error"]
        assert r["groups_used"] and all(on_gloo for _, on_gloo in r["groups_used"])
    if tp_size == 2:  # one engine for both ranks: each TP rank's scheduler gets the copy on its own GPU
        update = results[0]["per_rank_update"]
        assert update["calls"] == ["begin", "load 2", "load 2", "end", "flush"] and results[1]["per_rank_update"] == {}
        assert update["named"] == [[(f"w{b}.{j}", [b"rank0:2.0", b"rank1:4.0"]) for j in range(2)] for b in range(2)]
    assert results[0]["release_error"] == "RuntimeError: release refused"
    assert results[1]["release_error"] == ("PebrError: releasing SGLang's memory failed on rank 0: "
                                           "RuntimeError: release refused")


def test_agree_without_a_job_raises_the_error_itself():
    groups = RolloutGroups(1)
    assert groups.world_size == 1 and groups.cpu_group is None and groups.is_owner
    groups.agree(None, "x")
    groups.barrier()
    with pytest.raises(ValueError, match="bad"):
        groups.agree(ValueError("bad"), "x")
    assert groups.gather_from_owners("mine") == ["mine"]


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


# ------------------------------------------------------------------------------- weight-update session
class _WeightEngine:
    """SGLang's weight-update calls as 0.5.13 (`session=False`) and 0.5.21+ (`session=True`) answer them: the
    scheduler's WeightUpdater refuses update_weights_from_tensor outside begin/end_weight_update
    (srt/managers/scheduler_components/weight_updater.py, 0.5.23), and a second begin while one is open."""

    def __init__(self, session: bool, fail_bucket: int | None = None) -> None:
        self.calls: list[str] = []
        self.open = False
        self.fail_bucket = fail_bucket
        if session:
            self.begin_weight_update = self._begin
            self.end_weight_update = self._end

    def _begin(self, selector: str = "all"):
        self.calls.append("begin")
        if self.open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.open = True
        return True, "Success"

    def _end(self):
        self.calls.append("end")
        if not self.open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.open = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(f"load {len(named_tensors)}")
        if hasattr(self, "begin_weight_update") and not self.open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        if self.fail_bucket is not None and self.calls.count(f"load {len(named_tensors)}") == self.fail_bucket + 1:
            return False, "shape mismatch"
        return True, "Success"

    def flush_cache(self):
        self.calls.append("flush")
        return True


def _weight_engine(stand_in) -> SGLangRolloutEngine:
    engine = SGLangRolloutEngine.__new__(SGLangRolloutEngine)
    engine._attach(RolloutGroups(1), stand_in, 9, 2, [WEIGHTS, KV_CACHE], gpu=None)
    return engine


def _buckets(count: int):
    return ([(f"w{b}.{j}", torch.zeros(2)) for j in range(2)] for b in range(count))


@pytest.mark.parametrize("session", [False, True])
def test_update_weights_opens_sglangs_weight_update_session_when_the_engine_has_one(session):
    """0.5.21+ (begin/end present): every bucket loads inside one session, closed before the cache flush;
    0.5.13: no session call at all. A failed bucket still closes the session, so the next sync can open one."""
    stand_in = _WeightEngine(session)
    _weight_engine(stand_in).update_weights(_buckets(3))
    loads = ["load 2"] * 3
    assert stand_in.calls == (["begin", *loads, "end", "flush"] if session else [*loads, "flush"])

    failing = _WeightEngine(session, fail_bucket=1)
    engine = _weight_engine(failing)
    with pytest.raises(Exception, match="shape mismatch"):
        engine.update_weights(_buckets(3))
    assert failing.calls == (["begin", "load 2", "load 2", "end"] if session else ["load 2", "load 2"])
    assert not failing.open
    failing.fail_bucket = None
    engine.update_weights(_buckets(1))  # the next sync opens a fresh session
    assert failing.calls[-4:] == (["begin", "load 2", "end", "flush"] if session else ["load 2", "load 2", "load 2", "flush"])


def test_shutdown_stops_the_engine_and_refuses_later_calls():
    stand_in = _WeightEngine(session=True)
    stand_in.shutdown = lambda: stand_in.calls.append("shutdown")
    engine = _weight_engine(stand_in)
    engine.shutdown()
    assert stand_in.calls == ["shutdown"] and engine.engine is None
    for call in (lambda: engine.generate(_requests(1), SamplingParams(n=1)), lambda: engine.update_weights([]),
                 engine.release_memory, engine.resume_memory):
        with pytest.raises(PebrError, match="after the SGLang engine was shut down"):
            call()
