"""Upstream wheels for the contract tests: downloaded once with `pip download --no-deps`, unpacked, read with `ast`.

Nothing here imports the downloaded code (SGLang imports CUDA libraries at module level); the tests read
its source. Wheels are cached in `$PEBR_WHEEL_CACHE` (default `~/.cache/pebr-mega/wheels`), so a second run
costs only the parse. A download that fails is a test failure in CI (`CI=true`, where `.ci/run` has PyPI)
and a skip with the reason elsewhere (an offline laptop).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

DOWNLOAD_TIMEOUT_S = 300


def cache_dir() -> Path:
    """Where wheels and their unpacked sources live."""
    return Path(os.environ.get("PEBR_WHEEL_CACHE", Path.home() / ".cache" / "pebr-mega" / "wheels"))


def _unavailable(reason: str):
    """Fail in CI (the contract must be checked there), skip elsewhere; both say why."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"upstream source unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"upstream source unavailable: {reason}")


def wheel(dist: str, version: str, pip_args: tuple[str, ...] = ()) -> Path:
    """The cached wheel of `dist==version`, downloaded (no dependencies, binary only) when absent; `pip_args`
    name another interpreter or platform (e.g. a cp312-only wheel read on Python 3.11)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = dist.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", *pip_args, "-d", str(folder), f"{dist}=={version}"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _unavailable(f"`{' '.join(cmd)}` ran over {DOWNLOAD_TIMEOUT_S} s")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if run.returncode != 0 or not found:
        _unavailable(f"`{' '.join(cmd)}` exited {run.returncode}: {run.stderr.strip()[-500:]}")
    return found[0]


def unpacked(dist: str, version: str, package: str, pip_args: tuple[str, ...] = ()) -> Path:
    """The folder holding `package`'s Python sources from the wheel (unpacked once, .py files only)."""
    target = cache_dir() / "src" / f"{dist}-{version}"
    done = target / ".complete"
    if not done.exists():
        with zipfile.ZipFile(wheel(dist, version, pip_args)) as zf:
            for name in zf.namelist():
                if (name.endswith(".py") and name.startswith(f"{package}/")) or name.endswith("METADATA"):
                    zf.extract(name, target)
        done.write_text("ok\n")
    return target / package


def parse(path: Path) -> ast.Module:
    """The module's syntax tree."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def find_class(tree: ast.AST, name: str) -> ast.ClassDef | None:
    """The first class called `name` in `tree` (at any depth)."""
    return next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name), None)


def find_function(tree: ast.AST, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The first function or method called `name` in `tree` (at any depth)."""
    return next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == name), None)


def methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """The methods defined in the class body, by name."""
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[set[str], bool]:
    """(the names a caller may pass by keyword, whether **kwargs is accepted)."""
    a = fn.args
    names = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]} - {"self"}
    return names, a.kwarg is not None


def annotated_fields(cls: ast.ClassDef) -> set[str]:
    """Names declared with an annotation in the class body (dataclass fields)."""
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def metadata_pins(root: Path, dists: tuple[str, ...]) -> dict[str, str]:
    """`Requires-Dist: name==version` pins of the unpacked wheel's METADATA, for `dists`."""
    meta = next(root.parent.glob("*.dist-info/METADATA"))
    pins = {}
    for line in meta.read_text(encoding="utf-8").splitlines():
        if line.startswith("Requires-Dist:") and ";" not in line:
            spec = line.split(":", 1)[1].strip()
            for d in dists:
                if spec.startswith(f"{d}=="):
                    pins[d] = spec.split("==", 1)[1].strip()
    return pins
