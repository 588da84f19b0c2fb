"""Contract of `pebr_mega/rollout/sglang_engine.py` against the real SGLang source, at both ends of the window.

What it proves: for the lowest and the highest SGLang setup.py allows (`WINDOW_ENDS`), the wheel's own source
(downloaded once by `tests/upstream.py`, read with `ast`, never imported) has every `Engine` method our engine
calls, with every keyword argument it passes; every ServerArgs field and sampling-params key it sends; the
memory tags, the output fields and shapes `parse_output` reads (`meta_info` keys, `(logprob, token_id, text)`
log-prob entries, the finish-reason dicts); the request-major order of SGLang's own `n`; the `(success,
message)` answers of the weight-update calls; the weight-update session where the scheduler requires one; the
environment variables the constructor sets that `sglang_env_cleared` restores; the per-rank weight payloads
of rollout TP > 1 (`sglang_ipc_helpers`); and the Qwen2.5-VL processor
building M-RoPE from `processor_output` image grids (which 0.5.12, just below the window, does not: checked
too, so the lower bound is the source's, not a guess).

What our code uses is read from our code where it can be (the `self.engine.<method>(...)` calls and their
keywords, by `ast`; the keys `generate_inputs`, `sglang_sampling_params` and `engine_server_args` produce),
so a new call in the engine is checked without editing this file. `test_a_renamed_method_or_keyword_fails_
the_contract` runs the same checks on a copy of the wheel's source with one method and one keyword renamed
and asserts both are reported: a rename upstream fails here, not in a user's first GPU hour.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from pebr_mega.rollout import sglang_engine as ours
from pebr_mega.rollout.types import RolloutRequest, SamplingParams
import upstream
from test_gpu_windows import window

WINDOW_ENDS = ("0.5.22", "0.5.23")  # the lowest and highest release of setup.py's sglang window
WRONG_MROPE = "0.5.12"  # the last release whose Qwen2.5-VL processor ignores processor_output grids
# SGLang publishes compiled wheels per CPython and glibc; naming one makes the download the same on any CI
# machine (an older glibc than the wheel's would otherwise find none). Only its Python source is read.
SGLANG_WHEEL = ("--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_34_x86_64")


def sglang_source(version: str) -> Path:
    """The unpacked `sglang/` package of `version`."""
    return upstream.unpacked("sglang", version, "sglang", pip_args=SGLANG_WHEEL)


@pytest.fixture(scope="module", params=WINDOW_ENDS)
def sglang_src(request) -> Path:
    """The unpacked `sglang/` package of one end of the window."""
    return sglang_source(request.param)


# ------------------------------------------------------------------------------------ what our code uses
def engine_calls() -> dict[str, set[str]]:
    """`self.engine.<method>` uses in our engine, with the keyword names passed (`**inputs`: the keys of
    `generate_inputs`'s result); also methods only probed (`hasattr`) or passed on as callables."""
    tree = ast.parse(Path(ours.__file__).read_text())
    used: dict[str, set[str]] = {}
    for node in ast.walk(tree):  # every attribute of self.engine, and hasattr(self.engine, "...") probes
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.engine":
            used.setdefault(node.attr, set())
        if (isinstance(node, ast.Call) and ast.unparse(node.func) == "hasattr" and len(node.args) == 2
                and ast.unparse(node.args[0]) == "self.engine" and isinstance(node.args[1], ast.Constant)):
            used.setdefault(node.args[1].value, set())
    for node in ast.walk(tree):  # the keywords of each call
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and ast.unparse(node.func.value) == "self.engine":
            for kw in node.keywords:
                used[node.func.attr] |= {kw.arg} if kw.arg else _generate_input_keys()
    return used


def _generate_input_keys() -> set[str]:
    req = RolloutRequest(record_id="r", prompt_ids=[1, 9, 2], pixel_values=torch.zeros(16, 4),
                         image_grid_thw=torch.tensor([[1, 4, 4]]))
    return set(ours.generate_inputs([req], SamplingParams(n=2), 0, image_token_id=9, merge_size=2))


def sampling_keys() -> set[str]:
    """Every key `sglang_sampling_params` can send (all options on, with SGLang's `n`)."""
    full = SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=5, max_new_tokens=3, stop_token_ids=[1],
                          seed=0, banned_token_ids=[2])
    return set(ours.sglang_sampling_params(full, seed=0, n=4))


def server_arg_names() -> set[str]:
    """ServerArgs names the engine sends or reads."""
    return set(ours.engine_server_args("/m", 1, 0, 0, {})) | {"enable_deterministic_inference"}


# -------------------------------------------------------------------------------------- the checks
def contract_problems(src: Path) -> list[str]:
    """Every way the SGLang source under `src` (an unpacked `sglang/`) breaks what our engine assumes."""
    problems: list[str] = []
    engine_tree = upstream.parse(src / "srt" / "entrypoints" / "engine.py")
    engine = upstream.find_class(engine_tree, "Engine")
    if engine is None:
        return ["srt/entrypoints/engine.py has no class Engine"]
    have = upstream.methods(engine)
    optional = {"begin_weight_update", "end_weight_update"}  # probed with hasattr: 0.5.21+ only
    for method, keywords in sorted(engine_calls().items()):
        if method not in have:
            if method not in optional:
                problems.append(f"Engine.{method} is gone")
            continue
        names, var_kw = upstream.parameters(have[method])
        missing = sorted(k for k in keywords if k not in names and not var_kw)
        if missing:
            problems.append(f"Engine.{method} takes no keyword {missing}")
    init_names, init_kw = upstream.parameters(have["__init__"])
    if not init_kw:
        problems.append(f"Engine.__init__ no longer takes **kwargs (ServerArgs): {sorted(init_names)}")
    problems += _server_args_problems(src)
    problems += _sampling_problems(src)
    problems += _session_problems(src, have)
    problems += _env_problems(engine_tree)
    problems += _output_problems(src)
    problems += _parallel_sampling_problems(src)
    problems += _memory_tag_problems(src)
    problems += mrope_problems(src)
    problems += _ipc_problems(src)
    return problems


def _ipc_problems(src: Path) -> list[str]:
    """What `sglang_ipc_helpers` imports (rollout TP > 1), at the paths it tries, and its use by the scheduler."""
    problems = []
    utils_init = (src / "srt" / "utils" / "__init__.py").read_text()
    serializer = upstream.find_class(upstream.parse(src / "srt" / "utils" / "common.py"), "MultiprocessingSerializer")
    if "from sglang.srt.utils.common import *" not in utils_init or serializer is None \
            or "serialize" not in upstream.methods(serializer):
        problems.append("sglang.srt.utils no longer exports MultiprocessingSerializer.serialize")
    if upstream.find_function(upstream.parse(src / "srt" / "utils" / "patch_torch.py"), "monkey_patch_torch_reductions") is None:
        problems.append("sglang.srt.utils.patch_torch has no monkey_patch_torch_reductions")
    runner = src / "srt" / "model_executor"
    homes = [runner / "model_runner_components" / "weight_updater.py", runner / "model_runner.py"]
    home = next((h for h in homes if h.exists() and upstream.find_class(upstream.parse(h), "LocalSerializedTensor")), None)
    if home is None:
        return problems + ["LocalSerializedTensor is at neither path sglang_ipc_helpers imports"]
    tree = upstream.parse(home)
    cls = upstream.find_class(tree, "LocalSerializedTensor")
    unwrap = upstream.find_function(tree, "_unwrap_tensor")
    if "values" not in upstream.annotated_fields(cls) or unwrap is None or "tensor.get(tp_rank)" not in ast.unparse(unwrap):
        problems.append(f"{home.name}: LocalSerializedTensor(values=...) is no longer unwrapped per TP rank")
    return problems


def _server_args_problems(src: Path) -> list[str]:
    # 0.5.13 declares ServerArgs' fields in its class body; 0.5.23 assembles them from srt/arg_groups/fields/.
    fields = upstream.annotated_fields(upstream.find_class(upstream.parse(src / "srt" / "server_args.py"), "ServerArgs"))
    for path in sorted((src / "srt" / "arg_groups" / "fields").glob("*.py")):
        for cls in (n for n in ast.walk(upstream.parse(path)) if isinstance(n, ast.ClassDef)):
            fields |= upstream.annotated_fields(cls)
    return [f"ServerArgs has no field {name!r}" for name in sorted(server_arg_names() - fields)]


def _sampling_problems(src: Path) -> list[str]:
    cls = upstream.find_class(upstream.parse(src / "srt" / "sampling" / "sampling_params.py"), "SamplingParams")
    init = upstream.methods(cls).get("__init__")  # 0.5.13: __init__ keywords; 0.5.23: a msgspec.Struct's fields
    names = upstream.parameters(init)[0] if init is not None else upstream.annotated_fields(cls)
    return [f"SamplingParams takes no {key!r}" for key in sorted(sampling_keys() - names)]


def _session_problems(src: Path, engine_methods: dict) -> list[str]:
    """Where the scheduler refuses weights outside a session, the Engine must open one, and say how it went."""
    path = src / "srt" / "managers" / "scheduler_components" / "weight_updater.py"
    needs_session = path.exists() and "begin_weight_update() and end_weight_update()" in path.read_text()
    problems = []
    if needs_session and not {"begin_weight_update", "end_weight_update"} <= set(engine_methods):
        problems.append("the scheduler requires a weight-update session but Engine has no begin/end_weight_update")
    control = upstream.parse(src / "srt" / "managers" / "tokenizer_control_mixin.py")
    for name in ["update_weights_from_tensor", *(("begin_weight_update", "end_weight_update") if needs_session else ())]:
        fn = upstream.find_function(control, name)
        if fn is None or fn.returns is None or ast.unparse(fn.returns) != "Tuple[bool, str]":
            problems.append(f"TokenizerManager.{name} no longer answers Tuple[bool, str]")
    return problems


def _env_problems(engine_tree: ast.Module) -> list[str]:
    """NCCL_* / CUDA_* variables `_set_envs_and_config` writes into the trainer must be ones we restore."""
    fn = upstream.find_function(engine_tree, "_set_envs_and_config")
    written = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and "environ" in ast.unparse(node.value):
            written.add(ast.literal_eval(node.slice) if isinstance(node.slice, ast.Constant) else ast.unparse(node.slice))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault"
                and "environ" in ast.unparse(node.func.value) and isinstance(node.args[0], ast.Constant)):
            written.add(node.args[0].value)
    trainer_facing = {v for v in written if isinstance(v, str) and v.startswith(("NCCL_", "CUDA_"))}
    unrestored = sorted(trainer_facing - set(ours.ENV_SET_BY_SGLANG))
    return [f"_set_envs_and_config sets {unrestored}, which sglang_env_cleared does not restore"] if unrestored else []


def _output_problems(src: Path) -> list[str]:
    problems = []
    tm = (src / "srt" / "managers" / "tokenizer_manager.py").read_text()
    for key in ('"prompt_tokens"', '"finish_reason"', '"output_token_logprobs"'):
        if key not in tm:
            problems.append(f"TokenizerManager's meta_info has no {key}")
    fn = upstream.find_function(upstream.parse(src / "srt" / "managers" / "tokenizer_manager.py"),
                                "detokenize_logprob_tokens")
    if fn is None or "(logprob, token_id, None)" not in ast.unparse(fn):
        problems.append("output_token_logprobs entries are no longer (logprob, token_id, text)")
    batch = upstream.parse(src / "srt" / "managers" / "schedule_batch.py")
    for cls, expected in (("FINISH_MATCHED_TOKEN", {"type": "stop", "matched": None}),
                          ("FINISH_LENGTH", {"type": "length", "length": None})):
        node = upstream.find_class(batch, cls)
        ret = next((n.value for n in ast.walk(upstream.methods(node)["to_json"]) if isinstance(n, ast.Return)), None) \
            if node is not None else None
        keys = {} if not isinstance(ret, ast.Dict) else {
            k.value: (v.value if isinstance(v, ast.Constant) else None) for k, v in zip(ret.keys, ret.values)}
        if any(keys.get(k, "<absent>") != v for k, v in expected.items()):
            problems.append(f"{cls}.to_json() is not {expected} (got {keys})")
    return problems


def _parallel_sampling_problems(src: Path) -> list[str]:
    """SGLang's own n answers request-major: `for i in range(batch_size): for _ in range(obj.parallel_sample_num)`."""
    fn = upstream.find_function(upstream.parse(src / "srt" / "managers" / "tokenizer_manager.py"), "_handle_batch_request")
    for outer in (n for n in ast.walk(fn) if isinstance(n, ast.For)):
        if ast.unparse(outer.iter) == "range(batch_size)":
            for inner in (n for n in ast.walk(outer) if isinstance(n, ast.For) and n is not outer):
                if ast.unparse(inner.iter) == "range(obj.parallel_sample_num)":
                    return []
    return ["TokenizerManager._handle_batch_request no longer sends the n samples of a request together"]


def _memory_tag_problems(src: Path) -> list[str]:
    consts = {}
    for node in upstream.parse(src / "srt" / "constants.py").body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            consts[node.targets[0].id] = node.value.value
    want = {"GPU_MEMORY_TYPE_WEIGHTS": ours.WEIGHTS, "GPU_MEMORY_TYPE_KV_CACHE": ours.KV_CACHE}
    return [f"srt/constants.py: {k} is {consts.get(k)!r}, not {v!r}" for k, v in want.items() if consts.get(k) != v]


def mrope_problems(src: Path) -> list[str]:
    """The Qwen2.5-VL processor must hand `get_rope_index` the image grids of the request's items, not
    `getattr(ret, "image_grid_thw", None)`: `ret` (the HF processor's output) is None when the request
    carries only `processor_output` data, and positions then fall back to text positions."""
    tree = upstream.parse(src / "srt" / "multimodal" / "processors" / "qwen_vl.py")
    fn = upstream.find_function(tree, "process_mm_data_async")
    for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("get_rope_index")):
        grid = next((kw.value for kw in call.keywords if kw.arg == "image_grid_thw"), None)
        if grid is not None and "getattr(ret" in ast.unparse(grid):
            return [f"qwen_vl.py process_mm_data_async: get_rope_index(image_grid_thw={ast.unparse(grid)}) ignores "
                    "processor_output grids (text M-RoPE positions for our image requests)"]
    return []


# -------------------------------------------------------------------------------------------- tests
def test_window_ends_are_setup_pys():
    spec = window("sglang")
    assert all(spec.contains(v) for v in WINDOW_ENDS) and not spec.contains(WRONG_MROPE)
    assert str(spec) == str(SpecifierSet(">=0.5.22,<0.5.24"))


def test_our_engine_uses_what_this_check_reads():
    """The extraction from our source finds the calls the engine makes (a guard against a check of nothing)."""
    used = engine_calls()
    assert {"generate", "update_weights_from_tensor", "flush_cache", "release_memory_occupation",
            "resume_memory_occupation", "shutdown", "begin_weight_update", "end_weight_update"} <= set(used)
    assert {"input_ids", "image_data", "sampling_params", "return_logprob"} <= used["generate"]
    assert used["update_weights_from_tensor"] == {"named_tensors", "flush_cache"}
    assert used["release_memory_occupation"] == {"tags"}


def test_sglang_source_keeps_the_contract(sglang_src):
    assert contract_problems(sglang_src) == []


def test_sglang_pins_fit_the_core_windows(sglang_src):
    pins = upstream.metadata_pins(sglang_src, ("torch", "transformers"))
    assert set(pins) == {"torch", "transformers"}
    for dist, version in pins.items():
        assert window(dist).contains(version), f"sglang pins {dist}=={version}, outside setup.py's {window(dist)}"


def test_the_release_below_the_window_builds_text_mrope_for_processor_output():
    """0.5.12 fails the M-RoPE check that both ends of the window pass (0.5.13 is where the source changed; the
    window starts later, at the first release whose transformers pin the suite passes on)."""
    src = sglang_source(WRONG_MROPE)
    assert mrope_problems(src) and "getattr(ret" in mrope_problems(src)[0]


def test_a_renamed_method_or_keyword_fails_the_contract(tmp_path):
    """The checks run on a copy of the newest wheel's source with `update_weights_from_tensor` renamed and the
    `tags` keyword of `release_memory_occupation` renamed: both are reported (and nothing else)."""
    src = sglang_source(WINDOW_ENDS[-1])
    copy = tmp_path / "sglang"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("models", "layers", "hardware_backend"))
    path = copy / "srt" / "entrypoints" / "engine.py"
    text = path.read_text()
    assert text.count("    def update_weights_from_tensor(") == 1
    text = text.replace("    def update_weights_from_tensor(", "    def update_weights_from_tensors(")
    text = text.replace("def release_memory_occupation(self, tags: Optional[List[str]] = None):",
                        "def release_memory_occupation(self, memory_tags: Optional[List[str]] = None):")
    path.write_text(text)
    assert contract_problems(copy) == ["Engine.release_memory_occupation takes no keyword ['tags']",
                                       "Engine.update_weights_from_tensor is gone"]
