"""The layering of the package (`.importlinter`: cli > {trainer, plan} > config > components > models/checkpoint/algo >
parallel/kernels > config_fields > errors) holds: `lint-imports` passes, so a new cycle or an upward import
fails the suite."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _package_view(tmp: Path) -> Path:
    """`pebr_mega/` as installed, with `kernels/` in place as `pebr_mega/kernels` (setup.py's package_dir):
    a folder of links to this checkout's files, so the kernels' imports are checked too."""
    view = tmp / "pebr_mega"
    view.mkdir()
    for entry in (ROOT / "pebr_mega").iterdir():
        if entry.name not in ("kernels", "__pycache__"):
            (view / entry.name).symlink_to(entry)
    (view / "kernels").symlink_to(ROOT / "kernels")
    return tmp


def lint_imports(tmp: Path) -> subprocess.CompletedProcess:
    """Run `lint-imports` with the checkout's contracts on the package view under `tmp`."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(_package_view(tmp))}
    return subprocess.run([exe, "--no-cache", str(ROOT / ".importlinter")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept(tmp_path):
    r = lint_imports(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "pebr_mega.kernels" not in r.stderr
