"""pebr_mega.plan: the memory model against exact counts of the Megatron actor built on CPU, the start-up checks,
`pebr plan`'s layouts against what the start-up checks accept, and the command itself.

References are independent of the model under test: parameter counts of transformers' Qwen2.5-VL built on the
meta device; bytes of every parameter, gradient buffer and optimizer tensor of Megatron's DDP and optimizer;
activation bytes measured by a live-tensor tracker (tests/plan_calibration.py) during a forward and backward.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from pebr_mega.config import load_config
from pebr_mega.plan import Cluster, StartupCheckError, check_startup, gpu_spec, make_plan, plan_to_json, run_checks
from pebr_mega.plan import memory as mem
from pebr_mega.plan.shapes import BUILTIN_SHAPES, resolve_arch, shape_from_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"3b": ROOT / "launch/configs/qwen2_5_vl_3b.yaml", "7b": ROOT / "launch/configs/qwen2_5_vl_7b.yaml"}
ALT = dict(hidden=96, ffn=160, layers=3, heads=6, kv=3, tied=True, vdepth=3, vhidden=48, vffn=96, vheads=4, window=112,
           fullatt=(0, 2))
AFTER_FORWARD_TOL = 0.01  # saved activations + logits: measured to within 0.1% on every shape below
PEAK_TOL = 0.10  # forward + backward peak: -4.5% .. +8.3% measured (backward frees saved tensors as it goes)


# ------------------------------------------------------------------------------------------------ shapes
def _hf_parameter_count(arch) -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t, v = arch.text, arch.vision
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, tie_word_embeddings=t.tie_word_embeddings,
                         rope_parameters={"rope_type": "default", "mrope_section": list(t.mrope_section),
                                          "rope_theta": t.rope_theta}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, out_hidden_size=v.out_hidden_size,
                           fullatt_block_indexes=list(v.fullatt_block_indexes)),
        tie_word_embeddings=t.tie_word_embeddings)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", ["3b", "7b"])
def test_total_parameters_equal_transformers(shape):
    arch = BUILTIN_SHAPES[shape]
    assert mem.total_parameters(arch) == _hf_parameter_count(arch)


def test_architecture_sources(tiny_model_dir, tmp_path):
    from pebr_mega.models.arch import arch_from_hf_dir

    arch, source = resolve_arch(str(tiny_model_dir))
    assert arch == arch_from_hf_dir(tiny_model_dir) and source.endswith("config.json")
    assert resolve_arch(str(tiny_model_dir), "7b")[0] == BUILTIN_SHAPES["7b"]  # the option wins
    assert resolve_arch("checkpoints/pebr_3b/sft/hf")[0] == BUILTIN_SHAPES["3b"]
    assert shape_from_path("models/Qwen2.5-VL-7B-Instruct") == "7b" and shape_from_path("runs/x13b") is None
    with pytest.raises(Exception, match="--model-shape"):
        resolve_arch(str(tmp_path / "model"), key="grpo.init_model")


# ------------------------------------------------------------------------------------------------ calibration
def _calibration_worker(rank: int) -> dict:
    """Both ranks: the actor's state bytes at (TP, PP) = (1, 1) (DP 2), (2, 1), (1, 2); activations at PP 1;
    a 7B-shaped reduced model (real widths, one layer and one ViT block, vocabulary 4096) at TP 2."""
    torch.set_num_threads(1)
    import plan_calibration as cal

    from pebr_mega.parallel.groups import current_state, destroy_parallel, init_parallel

    out = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_parallel(tp, pp)
        stage = current_state().pp_rank
        for name, arch in (("tiny", cal.tiny_arch()), ("alt", cal.tiny_arch(**ALT))):
            if arch.text.num_kv_heads % tp:
                continue
            actor = cal.build_actor(arch, tp, pp)
            cal.zero_step(actor)
            rec = {"stage": stage, "state": cal.state_bytes(actor.model, actor.optimizer)}
            frozen = cal.build_actor(arch, tp, pp, freeze_vision=True)
            cal.zero_step(frozen)
            rec["state_frozen_vision"] = cal.state_bytes(frozen.model, frozen.optimizer)
            if (name, tp, pp) == ("tiny", 1, 1):
                rec["act_frozen_vision"] = cal.measure_activations(frozen.model, arch, tp)
            if pp == 1:
                variants = {"none": {}, "bf16": {"dtype": "bfloat16"}}
                if name == "tiny":
                    variants["full"] = {"recompute": "full"}
                if name == "tiny" and tp == 1:
                    variants.update(selective={"recompute": "selective"}, vision_recompute={"vision_recompute": True})
                for key, kw in variants.items():
                    model = actor.model if key == "none" else cal.wrap_ddp(cal.build_stage(arch, tp, pp, **kw)[0])
                    rec[f"act_{key}"] = cal.measure_activations(model, arch, tp)
            out[f"{name}/{tp}/{pp}"] = rec
        destroy_parallel()
    init_parallel(2, 1)
    arch = cal.seven_b_reduced()
    model = cal.wrap_ddp(cal.build_stage(arch, 2, 1, "bfloat16")[0])
    out["7b/2/1"] = {"stage": 0, "state": cal.state_bytes(model),
                     "act_bf16": cal.measure_activations(model, arch, 2, images=[(8, 8), (8, 12)], text_tokens=60)}
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def calibration():
    """One launch of two gloo ranks for both calibration tests (spawned ranks inherit pytest's sys.path)."""
    from pebr_mega.parallel.launch import spawn

    return spawn(_calibration_worker, 2)


def _arch(name: str):
    import plan_calibration as cal

    return {"tiny": cal.tiny_arch(), "alt": cal.tiny_arch(**ALT), "7b": cal.seven_b_reduced()}[name]


@pytest.mark.slow
def test_parameter_and_optimizer_bytes_equal_megatron(calibration):
    """Exact: every rank's parameters, fp32 gradient buffer and Adam moments (fp32 actor: Megatron's CPU path)."""
    checked = 0
    for rank_out in calibration:
        for key, rec in rank_out.items():
            name, tp, pp = key.split("/")
            tp, pp = int(tp), int(pp)
            arch = _arch(name)
            sp = mem.stage_params(arch, tp, pp, rec["stage"])
            dtype_bytes = 2 if name == "7b" else 4
            s = rec["state"]
            assert s["num_params"] == sp.total, key
            assert s["params"] == sp.total * dtype_bytes, key
            if name == "7b":  # bf16 model, DDP only: Megatron's mixed-precision optimizer refuses CPU tensors
                assert s["grads"] == 4 * sp.total, key
                checked += 1
                continue
            dp = 2 // (tp * pp)
            want = mem.optimizer_bytes(sp, sp.trainable(False, False), 4, distributed=False, dp=dp)
            assert (s["grads"], s["main"], s["adam"]) == (want.grads, want.main_params, want.adam), key
            f = rec["state_frozen_vision"]
            frozen = mem.optimizer_bytes(sp, sp.trainable(True, False), 4, distributed=False, dp=dp)
            assert (f["trainable"], f["grads"], f["adam"]) == (sp.trainable(True, False), frozen.grads, frozen.adam), key
            checked += 1
    assert checked == 2 * 6  # tiny and alt at three layouts (alt skips TP 2), the 7B shape, on both ranks


@pytest.mark.slow
def test_activation_bytes_match_the_live_tensor_tracker(calibration):
    """Saved activations + logits after the forward, and the forward + backward peak, against the CPU profile."""
    errors = {}
    for key, rec in calibration[0].items():
        name, tp, pp = key.split("/")
        arch, tp = _arch(name), int(tp)
        sp = mem.stage_params(arch, tp, int(pp), 0)
        for variant, m in rec.items():
            if not variant.startswith("act_"):
                continue
            kind = variant[4:]
            b = 2 if kind == "bf16" else 4
            recompute = kind if kind in ("selective", "full") else "none"
            mb = mem.MicroBatch(m["tokens"], tuple(tuple(g) for g in m["grids"]), m["slots"])
            acts = mem.stage_activation_bytes(arch, sp, mb, tp, b, recompute, 1, kind == "vision_recompute", mem.CPU,
                                              last=True, freeze_vision=kind == "frozen_vision")
            saved = sum(v for k, v in acts.items() if k not in ("recompute", "vision recompute"))
            logits = mem.logits_bytes(arch.text, mb.tokens, tp, b)
            after = saved + logits
            peak = after + acts.get("recompute", 0) + mem.backward_workspace_bytes(arch.text, sp, mb.tokens, tp, b, True)
            errors[f"{key} {kind}"] = (after / m["after_forward"] - 1, peak / m["peak"] - 1)
    assert len(errors) == 12  # tiny: 6 variants at TP 1, 3 at TP 2; alt: 2; the 7B shape: 1
    for case, (after_err, peak_err) in errors.items():
        assert abs(after_err) < AFTER_FORWARD_TOL, (case, after_err)
        assert abs(peak_err) < PEAK_TOL, (case, peak_err)
    # The two ranks measured the same thing (same seeds, same layout at TP 2, DP replicas at TP 1).
    assert calibration[0]["tiny/1/1"]["act_none"] == calibration[1]["tiny/1/1"]["act_none"]


# ------------------------------------------------------------------------------------------------ start-up checks
def _cfg(shape: str = "7b", *overrides: str):
    return load_config(CONFIGS[shape], list(overrides))


def test_startup_checks_name_keys_and_alternatives():
    cfg = _cfg("7b", "model.tp=8")
    with pytest.raises(StartupCheckError) as e:
        check_startup(cfg, 8, "train", gpus_per_node=8)
    lines = str(e.value).splitlines()
    assert "2 start-up check(s) failed" in lines[0]  # heads and KV heads; FFN and vocabulary divide by 8
    assert any("model.tp=8" in ln and "28 attention heads" in ln and "[1, 2, 4]" in ln for ln in lines)
    assert any("4 KV heads" in ln for ln in lines)

    r = run_checks(_cfg("7b", "model.tp=4", "model.pp=3"), 8, "train", 8)
    assert any("model.tp=4 x model.pp=3 = 12" in e and "does not divide the world size 8" in e for e in r.errors)

    r = run_checks(_cfg("7b", "model.tp=1", "model.pp=1", "grpo.mini_batch_size=1", "rollout.n=4"), 8, "train", 8)
    assert r.errors == ["grpo.mini_batch_size=1 x rollout.n=4 = 4 sequences per update (stage1) cannot feed 8 "
                        "data-parallel ranks; use grpo.mini_batch_size >= 2 or a larger model.tp x model.pp"]

    r = run_checks(_cfg("7b", "rollout.max_new_tokens=127000"), 8, "train", 8, rollout_engine="sglang")
    assert any("data.max_prompt_length=2048 + rollout.max_new_tokens=127000" in e and "<= 125952" in e for e in r.errors)

    r = run_checks(_cfg("7b", "model.spec=te", "model.fp8=hybrid", "actor.micro_batch_tokens=1000"), 8, "train", 8)
    assert any("actor.micro_batch_tokens=1000 must be a multiple of 16" in e and "=992" in e for e in r.errors)

    r = run_checks(_cfg("7b", "model.spec=te", "model.sequence_parallel=true", "actor.micro_batch_tokens=16382"), 8,
                   "train", 8)
    assert any("multiple of 4" in e and "sequence parallelism" in e for e in r.errors)

    r = run_checks(_cfg("7b", "rollout.sglang_tp_size=3"), 8, "train", 8, rollout_engine="sglang")
    assert any("rollout.sglang_tp_size=3" in e and "[1, 2, 4]" in e for e in r.errors)

    r = run_checks(_cfg("7b", "sft.cutoff_len=200000"), 8, "sft", 8)
    assert any("sft.cutoff_len=200000" in e for e in r.errors)

    r = run_checks(_cfg("3b", "model.tp=1", "model.pp=8"), 8, "train", 8, rollout_engine="sglang")
    assert r.ok and any("splits 36 layers unevenly" in n for n in r.notes)

    r = run_checks(_cfg("7b", "pipeline.stages=[sft]", "sft.batch_size=1", "model.tp=1"), 8, "pipeline", 8)
    assert any("sft.batch_size=1" in e for e in r.errors)


def test_startup_checks_skip_what_needs_the_architecture(tmp_path):
    cfg = load_config(None, [f"grpo.init_model={tmp_path / 'nowhere'}", "model.tp=3"])
    r = run_checks(cfg, 3, "train", rollout_engine="hf")
    assert r.ok and any("architecture unknown" in n for n in r.notes)


@pytest.mark.parametrize("shape", ["3b", "7b"])
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_plan_layouts_agree_with_startup_checks(shape, nodes):
    """Every layout the plan calls valid is accepted by check_startup with that layout, every invalid one refused
    (with the same first reason), and every layout that fits is valid."""
    cfg = _cfg(shape)
    cluster = Cluster(nodes, 8, gpu_spec("h100-80gb"))
    plan = make_plan(cfg, BUILTIN_SHAPES[shape], cluster)
    assert {(p.layout.tp, p.layout.pp) for p in plan.layouts} == {
        (tp, pp) for tp in (1, 2, 4, 8) for pp in range(1, 8 * nodes // tp + 1) if 8 * nodes // tp % pp == 0}
    for p in plan.layouts:
        trial = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tp=p.layout.tp, pp=p.layout.pp))
        if p.valid:
            check_startup(trial, cluster.world, "train", gpus_per_node=8)  # accepted: no exception
        else:
            with pytest.raises(StartupCheckError) as e:
                check_startup(trial, cluster.world, "train", gpus_per_node=8)
            assert p.reason in str(e.value)
        assert p.valid or not p.fits
    valid_tp = {p.layout.tp for p in plan.layouts if p.valid}
    assert valid_tp == ({1, 2} if shape == "3b" else {1, 2, 4})
    times = [p.step_seconds for p in plan.layouts if p.fits]
    assert times == sorted(times)


def test_suggested_memory_fraction_makes_the_rollout_fit():
    # A fraction sized before Adam's moments exist (0.6) leaves the rollout phase over the card.
    cfg = _cfg("7b", "model.recompute_granularity=full", "model.vision_recompute=true",
               "rollout.sglang_args.mem_fraction_static=0.6")
    cluster = Cluster(1, 8, gpu_spec("h100-80gb"))
    plan = make_plan(cfg, BUILTIN_SHAPES["7b"], cluster)
    d = plan.detail
    assert d.training.total <= cluster.gpu.memory_bytes < d.rollout.total
    frac = re.search(r"mem_fraction_static <= ([0-9.]+)", d.reason).group(1)
    fixed = make_plan(_cfg("7b", "model.recompute_granularity=full", "model.vision_recompute=true",
                           f"rollout.sglang_args.mem_fraction_static={frac}"), BUILTIN_SHAPES["7b"], cluster)
    assert fixed.detail.fits and fixed.detail.concurrency >= 1
    # KV cache = fraction of the memory free at start-up minus the engine's weights, as SGLang computes it.
    used = 2 * mem.CUDA_CONTEXT_BYTES + fixed.detail.rollout.get("actor: parameters + gradient buffer + main params") \
        + fixed.detail.rollout.get("reference model (bfloat16)")
    kv = next(r.bytes for r in fixed.detail.rollout.rows if r.name.startswith("SGLang KV cache"))
    assert kv == pytest.approx(float(frac) * (cluster.gpu.memory_bytes - used) - mem.engine_weight_bytes(BUILTIN_SHAPES["7b"], 1))


def test_measured_rates_are_in_the_documents_they_cite():
    """Each measured rate's figure appears in the row its source names (docs/PERFORMANCE.md, GPU_ANCHORS.md)."""
    perf = (ROOT / "docs/PERFORMANCE.md").read_text()
    rows = {"'Train step' row": "| 398.8 |", "bf16 8192^3 matmul": "matmul 728 TFLOP/s",
            "device copy bandwidth": "copy bandwidth 3.01 TB/s"}
    h100 = gpu_spec("h100-80gb")
    for name in ("train", "matmul", "copy"):
        rate = h100.rate(name)
        assert rate.measured and "commit a0fd210" in rate.source
        needle = next(v for k, v in rows.items() if k in rate.source)
        assert needle in perf, (name, needle)
    for gpu in ("a100-80gb", "a100-40gb"):
        assert not gpu_spec(gpu).rate("train").measured and "not measured" in gpu_spec(gpu).rate("train").source


# ------------------------------------------------------------------------------------------------ the command
def test_plan_command_json_and_table(capsys):
    from pebr_mega.cli import main

    assert main(["plan", "--config", str(CONFIGS["7b"]), "--nodes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_parameters"] == _hf_parameter_count(BUILTIN_SHAPES["7b"])
    assert out["layouts"] and all({"tp", "pp", "dp", "fits", "reason"} <= set(lay) for lay in out["layouts"])
    assert all(lay["tp"] * lay["pp"] * lay["dp"] == 16 for lay in out["layouts"] if lay["valid"])
    assert {"training", "rollout", "phase_seconds"} <= set(out["detail"])

    assert main(["plan", "--config", str(CONFIGS["3b"]), "--gpu", "h200-141gb", "model.vision_recompute=true",
                 "--response-tokens", "512"]) == 0
    text = capsys.readouterr().out
    for needle in ("Training phase", "Rollout phase", "Estimated step time", "GPU_ANCHORS.md", "Layouts", "invalid"):
        assert needle in text, needle
    assert main(["plan", "--config", str(CONFIGS["3b"]), "--gpu", "v100"]) == 2


def test_config_commands_check_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from pebr_mega.cli import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    out_dir = tmp_path / "run"
    assert main(["train", f"run.output_dir={out_dir}", f"grpo.init_model={tiny_model_dir}", "model.tp=3"]) == 2
    err = capsys.readouterr().err
    assert "model.tp=3 does not divide the model's 4 attention heads" in err and "model.tp x model.pp" not in err
    assert not out_dir.exists()  # nothing was set up or loaded
    assert main(["sample", f"sample.model={tiny_model_dir}", "rollout.max_new_tokens=5000",
                 f"sample.output={tmp_path / 'r.jsonl'}"]) == 2
    assert "max_position_embeddings 4096" in capsys.readouterr().err


def test_gpu_memory_check_predicts_on_cpu():
    """tools/check_plan_memory.py (run by tools/gpu_checks.sh on a GPU): its predictions are computed here, and are
    at least what its static state must occupy (bf16 parameters and, at the end of backward, their gradients; for
    the GRPO update the actor's 18 bytes per parameter and the bf16 reference), counted from transformers' model of
    the same shapes."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_plan_memory as tool
        from bench_train_step import qwen25_vl_7b_arch
    finally:
        sys.path.remove(str(ROOT / "tools"))
    arch = qwen25_vl_7b_arch(4, 4)
    n = _hf_parameter_count(arch)
    grid = (1, 72, 72)
    bench = tool.bench_prediction(arch, 4096, grid)
    assert 4 * n < bench < 2 * n + 12 * GIB_
    grpo = tool.grpo_prediction(arch, tool.grpo_config(4096, 2), grid)
    assert 20 * n < grpo < 20 * n + 24 * GIB_
    assert tool.main([]) == 2  # no CUDA here: nothing measured, a clear message


GIB_ = 2**30
