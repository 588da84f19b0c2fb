"""setup.py's extras against the install commands the docs and CI give: no command may pull two DALI wheels.

DALI publishes one wheel per CUDA major (nvidia-dali-cuda120, nvidia-dali-cuda130) and every one installs
the same `nvidia/dali` package, so two in one environment overwrite each other's files.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `pip install ... -e ".[a,b]"` (quoted or not), in prose or in scripts.
INSTALL = re.compile(r"pip install[^\n`]*?\.\[([A-Za-z0-9_,\- ]+)\]")


def setup_extras() -> dict[str, list[str]]:
    """The EXTRAS dict literal of setup.py, read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXTRAS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no EXTRAS = {...} assignment")


def dali_wheels(requirements: list[str]) -> set[str]:
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}
    return {n for n in names if n.startswith("nvidia-dali")}


def told_combinations() -> dict[str, list[list[str]]]:
    """Every extras combination an install command in the README, docs, CI or tools names, by file."""
    files = [ROOT / "README.md", ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "tools").glob("*.sh")), *sorted((ROOT / "launch").rglob("*"))]
    found: dict[str, list[list[str]]] = {}
    for path in files:
        if path.is_file():
            combos = [[e.strip() for e in m.group(1).split(",")] for m in INSTALL.finditer(path.read_text(errors="ignore"))]
            if combos:
                found[str(path.relative_to(ROOT))] = combos
    return found


def test_each_dali_wheel_comes_from_its_own_extra_only():
    extras = setup_extras()
    owners = {name: dali_wheels(reqs) for name, reqs in extras.items() if dali_wheels(reqs)}
    assert all(len(w) == 1 for w in owners.values()), owners
    assert sorted(w for ws in owners.values() for w in ws) == ["nvidia-dali-cuda120", "nvidia-dali-cuda130"]
    assert not dali_wheels(extras["gpu"]) and not dali_wheels(extras["test"])


def test_no_install_command_in_docs_or_ci_pulls_two_dali_wheels():
    extras = setup_extras()
    combos = told_combinations()
    assert "README.md" in combos and ".ci/run" in combos
    for where, found in combos.items():
        for combo in found:
            unknown = [e for e in combo if e not in extras]
            assert not unknown, f"{where}: pip install names unknown extras {unknown}"
            wheels = set().union(*(dali_wheels(extras[e]) for e in combo))
            assert len(wheels) <= 1, f"{where}: .[{','.join(combo)}] installs {sorted(wheels)}"


def test_ci_installs_exactly_one_dali_wheel_and_runs_the_readme_command():
    extras = setup_extras()
    ci = told_combinations()[".ci/run"]
    assert len(ci) == 1
    assert len(set().union(*(dali_wheels(extras[e]) for e in ci[0]))) == 1  # the CPU tests of DALI need one
    readme_tests = [c for c in told_combinations()["README.md"] if "test" in c]
    assert readme_tests == ci  # .ci/run runs the README's test command


def test_the_checkout_does_not_shadow_hugging_face_kernels(tiny_model_dir):
    """Python started in the repository root (as `python -m pytest`, `python -c` or a notebook there) imports
    transformers' models and loads an HF model directory, while `pebr_mega.kernels` is still this checkout's
    kernels/ folder. A top-level kernels/__init__.py would shadow Hugging Face's `kernels` distribution, which
    transformers imports (ImportError: cannot import name 'CUDAProperties' from 'kernels')."""
    import subprocess
    import sys

    script = (
        "import sys, kernels, transformers.activations\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration as M\n"
        f"m = M.from_pretrained({str(tiny_model_dir)!r})\n"
        "assert sum(p.numel() for p in m.parameters()) > 0\n"
        "from pebr_mega.kernels import ops, reference\n"
        "print(kernels.__file__); print(ops.__file__); print(reference.__file__)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hf_kernels, ops_file, reference_file = (Path(line).resolve() for line in r.stdout.split())
    assert ROOT not in hf_kernels.parents, hf_kernels  # the distribution, not this checkout
    assert ops_file == ROOT / "kernels" / "ops.py" and reference_file == ROOT / "kernels" / "reference.py"


def test_kernels_folder_is_a_namespace_portion_linked_into_the_package():
    """The layout the test above relies on: no kernels/__init__.py, and pebr_mega/kernels links to kernels/."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "pebr_mega" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()
