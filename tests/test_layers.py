"""The layering of the package (`.importlinter`: cli > recipe > {trainer, plan} > run > config > components >
models/checkpoint/algo > parallel/kernels > config_fields > errors) holds: `lint-imports` passes, so a new cycle
or an upward import fails the suite."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _package_view(tmp: Path, probe: str | None = None) -> Path:
    """`pebr_mega/` as installed, under `tmp`: links to this checkout's files, with `kernels/` as the real
    folder `pebr_mega/kernels`. `kernels/` is a namespace package (no `__init__.py`, so that the checkout does
    not shadow Hugging Face's `kernels`), and grimp only walks regular packages: the view adds an empty
    `__init__.py` there so the kernels' imports are checked too. `probe` is the text of one extra module
    placed in `pebr_mega/kernels/`, to show that an upward import is caught."""
    view = tmp / "pebr_mega"
    view.mkdir()
    for entry in (ROOT / "pebr_mega").iterdir():
        if entry.name not in ("kernels", "__pycache__"):
            (view / entry.name).symlink_to(entry)
    (view / "kernels").mkdir()
    for entry in (ROOT / "kernels").glob("*.py"):
        (view / "kernels" / entry.name).symlink_to(entry)
    (view / "kernels" / "__init__.py").write_text("")
    if probe is not None:
        (view / "kernels" / "_probe.py").write_text(probe)
    return tmp


def lint_imports(tmp: Path, probe: str | None = None) -> subprocess.CompletedProcess:
    """Run `lint-imports` with the checkout's contracts on the package view under `tmp`."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(_package_view(tmp, probe))}
    return subprocess.run([exe, "--no-cache", str(ROOT / ".importlinter")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept(tmp_path):
    r = lint_imports(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "pebr_mega.kernels" not in r.stderr


def test_an_upward_import_from_the_kernels_breaks_the_contract(tmp_path):
    r = lint_imports(tmp_path, probe="import pebr_mega.trainer\n")
    assert r.returncode != 0 and "1 broken" in r.stdout, r.stdout[-4000:]
    assert "pebr_mega.kernels._probe -> pebr_mega.trainer" in r.stdout, r.stdout[-4000:]
