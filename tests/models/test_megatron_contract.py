"""Megatron-Core calls that only a GPU run exercises, against Megatron-Core's own source (read with `ast`).

CPU runs build the model and the optimizer with the `torch` spec, torch's AdamW and no distributed
optimizer; the `te` spec, FP8 and the distributed optimizer's checkpoint format run only on a GPU. This file
checks, in the installed megatron-core (0.16.1 in CI) and in 0.19.0 (the top of setup.py's window, the
Python 3.12 machines' release; its wheel is downloaded by tests/upstream.py), that:

- every keyword our code passes to `TransformerConfig`, `DistributedDataParallelConfig`, `OptimizerConfig` and
  `OptimizerParamScheduler` is a field or parameter there (the keywords are read from our source, so a new
  one is checked without editing this file);
- `get_gpt_layer_with_transformer_engine_spec()` (our `te` spec) can be called without arguments;
- the distributed optimizer reads the `distrib_optim_sharding_type` metadata with a `fully_reshardable`
  mode (our optimizer checkpoints) and knows `distrib_optim_fully_reshardable_mem_efficient`
  (docs/ROLLOUT.md, "GPU path: issue 22", item 6);
- the FP8 recipes our `model.fp8` names ("hybrid", "e4m3") are the strings Megatron compares against;
- `_apply_rotary_pos_emb_thd` still reads segment lengths back to the host (`.tolist()`), the reason the
  `torch` spec packs in "sbhd" (pebr_mega/models/specs.py).
"""
from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import pytest

import upstream

ROOT = Path(__file__).resolve().parents[2]
TOP_OF_WINDOW = "0.19.0"


def installed_megatron() -> Path:
    """The installed `megatron/` package folder, found without importing it."""
    spec = importlib.util.find_spec("megatron")
    return Path(list(spec.submodule_search_locations)[0])


def megatron_019() -> Path:
    """megatron-core 0.19.0's `megatron/` (cp312-only wheel: downloaded for Python 3.12, never imported)."""
    return upstream.unpacked("megatron-core", TOP_OF_WINDOW, "megatron",
                             pip_args=("--python-version", "3.12", "--platform", "manylinux_2_28_x86_64"))


@pytest.fixture(scope="module", params=["installed", TOP_OF_WINDOW])
def megatron_src(request) -> Path:
    return installed_megatron() if request.param == "installed" else megatron_019()


def our_keywords(path: str, callee: str) -> set[str]:
    """The keyword names of every call to `callee` (by its last dotted name) in our file `path`."""
    tree = ast.parse((ROOT / path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == callee:
            names |= {kw.arg for kw in node.keywords if kw.arg}
    return names


def fields_of(src: Path, relpath: str, cls: str) -> set[str]:
    """Dataclass fields of `cls` and of its bases defined in Megatron-Core (ModelParallelConfig)."""
    node = upstream.find_class(upstream.parse(src / "core" / relpath), cls)
    assert node is not None, f"{relpath} has no class {cls}"
    fields = upstream.annotated_fields(node)
    if any(ast.unparse(b) == "ModelParallelConfig" for b in node.bases):
        fields |= fields_of(src, "model_parallel_config.py", "ModelParallelConfig")
    return fields


def megatron_problems(src: Path) -> list[str]:
    """Every way the Megatron-Core source under `src` breaks what our GPU-only calls assume."""
    problems = []
    for path, callee, relpath, cls in (
            ("pebr_mega/models/qwen25_vl.py", "TransformerConfig", "transformer/transformer_config.py", "TransformerConfig"),
            ("pebr_mega/actor/megatron_actor.py", "DistributedDataParallelConfig",
             "distributed/distributed_data_parallel_config.py", "DistributedDataParallelConfig"),
            ("pebr_mega/actor/megatron_actor.py", "OptimizerConfig", "optimizer/optimizer_config.py", "OptimizerConfig")):
        missing = sorted(our_keywords(path, callee) - fields_of(src, relpath, cls))
        if missing:
            problems.append(f"{cls} has no field {missing} ({path} passes them)")
    sched = upstream.find_class(upstream.parse(src / "core" / "optimizer_param_scheduler.py"), "OptimizerParamScheduler")
    names, _ = upstream.parameters(upstream.methods(sched)["__init__"])
    missing = sorted(our_keywords("pebr_mega/actor/megatron_actor.py", "OptimizerParamScheduler") - names)
    if missing:
        problems.append(f"OptimizerParamScheduler takes no {missing}")
    te_spec = upstream.find_function(upstream.parse(src / "core" / "models" / "gpt" / "gpt_layer_specs.py"),
                                     "get_gpt_layer_with_transformer_engine_spec")
    if te_spec is None or len(te_spec.args.defaults) != len(te_spec.args.args):
        problems.append("get_gpt_layer_with_transformer_engine_spec() cannot be called without arguments")
    distrib = (src / "core" / "optimizer" / "distrib_optimizer.py").read_text()
    for text in ("distrib_optim_sharding_type", "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient"):
        if text not in distrib:
            problems.append(f"distrib_optimizer.py no longer knows {text!r}")
    fp8 = "".join(p.read_text() for p in (src / "core").rglob("fp8_utils.py"))
    if '"hybrid"' not in fp8 or '"e4m3"' not in fp8:
        problems.append("fp8_utils.py no longer compares config.fp8 with 'hybrid' / 'e4m3'")
    rope = upstream.find_function(upstream.parse(src / "core" / "models" / "common" / "embeddings" / "rope_utils.py"),
                                  "_apply_rotary_pos_emb_thd")
    if rope is None or ".tolist()" not in ast.unparse(rope):
        problems.append("rope_utils._apply_rotary_pos_emb_thd changed: re-read the packing note in models/specs.py")
    return problems


def test_our_calls_are_read():
    """The extraction finds the keywords the code passes (a guard against checking nothing)."""
    assert {"fp8", "tp_only_amax_red", "apply_rope_fusion", "mrope_section"} <= our_keywords(
        "pebr_mega/models/qwen25_vl.py", "TransformerConfig")
    assert {"use_distributed_optimizer", "grad_reduce_in_fp32"} <= our_keywords(
        "pebr_mega/actor/megatron_actor.py", "DistributedDataParallelConfig")
    assert "decoupled_weight_decay" in our_keywords("pebr_mega/actor/megatron_actor.py", "OptimizerConfig")


def test_megatron_source_keeps_the_contract(megatron_src):
    assert megatron_problems(megatron_src) == []


def test_a_renamed_megatron_field_fails_the_contract(tmp_path):
    """The same checks on a copy of the installed source with `tp_only_amax_red` renamed report it."""
    copy = tmp_path / "megatron"
    shutil.copytree(installed_megatron(), copy, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
    path = copy / "core" / "transformer" / "transformer_config.py"
    text = path.read_text()
    assert "    tp_only_amax_red: bool" in text
    path.write_text(text.replace("    tp_only_amax_red: bool", "    tp_only_amax_reduction: bool"))
    assert megatron_problems(copy) == ["TransformerConfig has no field ['tp_only_amax_red'] "
                                       "(pebr_mega/models/qwen25_vl.py passes them)"]
