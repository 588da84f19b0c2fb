"""The GPU libraries' version windows: where setup.py declares them, and the start-up refusal of a backend
whose installed version is outside its window (one line naming package, version and window).

The installed pebr-mega metadata may be another checkout's (the editable install), so the windows tested
here are read from this checkout's setup.py with `ast` and handed to `versions.outside_window` through
`declared_windows`; the installed versions are the test's own (a backend is judged only when chosen).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pebr_mega import versions
from pebr_mega.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]


def setup_literal(name: str):
    """The literal assigned to `name` at the top level of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name} = ... assignment")


def checkout_windows() -> dict[str, versions.Window]:
    """setup.py's windows (core and extras) in the form `versions.declared_windows` returns."""
    out: dict[str, versions.Window] = {}
    groups = [(None, setup_literal("CORE")), *setup_literal("EXTRAS").items()]
    for extra, reqs in groups:
        for line in reqs:
            req = Requirement(line)
            if str(req.specifier):
                out.setdefault(versions._canonical(req.name), versions.Window(req.name, str(req.specifier), extra))
    return out


def window(name: str) -> SpecifierSet:
    return SpecifierSet(checkout_windows()[name].specifier)


def test_every_gpu_library_has_a_bounded_window():
    """Each distribution a GPU backend is checked against has a lower and an upper bound in setup.py."""
    declared = checkout_windows()
    for backend, names in versions.GPU_BACKENDS.items():
        for name in names:
            spec = declared[name].specifier
            assert ">=" in spec and "<" in spec.replace("<=", ""), f"{backend}: {name} {spec} is not a window"


def test_sglang_window_excludes_the_wrong_mrope_releases_and_keeps_the_newest_read():
    sglang = window("sglang")
    assert not any(sglang.contains(f"0.5.{minor}") for minor in range(1, 13))  # text M-RoPE for our images
    assert not any(sglang.contains(f"0.5.{minor}") for minor in range(13, 22))  # transformers 5.8.1 / 5.12.1 pins
    assert sglang.contains("0.5.22") and sglang.contains("0.5.23")
    assert not sglang.contains("0.5.24") and not sglang.contains("0.6.0")  # not read yet


def test_a_backend_outside_its_window_is_refused_with_one_line_per_package(monkeypatch):
    monkeypatch.setattr(versions, "declared_windows", checkout_windows)
    installed = {"sglang": "0.5.12", "transformer-engine": "2.9.0", "megatron-core": "0.20.0"}
    monkeypatch.setattr(versions, "installed_version", lambda name: installed.get(name))
    with pytest.raises(BackendUnavailableError) as err:
        versions.require_in_window("sglang")
    msg = str(err.value)
    assert msg.startswith("backend 'sglang': sglang 0.5.12 is outside the tested window <0.5.24,>=0.5.22")
    assert "the 'gpu' extra of setup.py" in msg and "pip install -e '.[gpu]'" in msg
    with pytest.raises(BackendUnavailableError, match=r"megatron-core 0\.20\.0 is outside the tested window"):
        versions.require_in_window("te")  # TE 2.9.0 is inside; Megatron-Core is judged with it
    installed["sglang"] = "0.5.23"
    installed["megatron-core"] = "0.16.1"
    versions.require_in_window("sglang")
    versions.require_in_window("te")
    versions.require_in_window("flash_attn")  # not installed: nothing to judge (the factory decides need)


def test_sglang_engine_start_up_refuses_an_sglang_outside_the_window(monkeypatch, tmp_path):
    """`require_sglang` (the engine's start-up) runs the window check once sglang imports; here a module
    stands in for the import, and CUDA's absence is reported beside it."""
    import sys
    import types

    from pebr_mega.rollout import sglang_engine

    monkeypatch.setitem(sys.modules, "sglang", types.ModuleType("sglang"))
    monkeypatch.setattr(sglang_engine.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(versions, "declared_windows", checkout_windows)
    monkeypatch.setattr(versions, "installed_version", lambda name: "0.5.8" if name == "sglang" else None)
    with pytest.raises(BackendUnavailableError, match=r"sglang 0\.5\.8 is outside the tested window"):
        sglang_engine.require_sglang()


def test_fp8_without_the_te_spec_is_an_error_not_a_bf16_run():
    from pebr_mega.models.specs import resolve_spec, te_available

    if te_available() and torch.cuda.is_available():
        pytest.skip("auto resolves to te here")
    with pytest.raises(BackendUnavailableError, match=r"model.fp8=hybrid needs the 'te' layer spec, but "
                                                      r"model.spec=auto resolves to 'torch' here"):
        resolve_spec("auto", fp8="hybrid")
    assert resolve_spec("auto", fp8="none") == "torch"
