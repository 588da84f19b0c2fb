"""Shared fixtures: a tiny model built once per session, offline, on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides between its compiler and its interpreter when it is first imported (and transformers'
# Qwen2.5-VL imports triton), so the interpreter must be chosen before any test module imports anything:
# on a machine without CUDA the kernel tests run the very same Triton code under TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one intra-op thread avoids thread start-up and oversubscription costs that
# dominate small matmuls on a 2-core machine (spawned ranks set the same in their workers).
torch.set_num_threads(1)

_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true", default=False,
                     help="run the tests in reverse order (checks that no test depends on an earlier one)")


def pytest_sessionstart(session):
    """The test log's first line: the library versions this run resolved (a failure then names its release)."""
    from pebr_mega.versions import version_line

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"versions: {version_line()}")


def pytest_collection_modifyitems(config, items):
    import torch

    if config.getoption("--reverse"):
        items.reverse()
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Qwen2.5-VL (untied embeddings), built once per test session."""
    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), TinyModelConfig(seed=0), tokenizer_corpus())


@pytest.fixture(scope="session")
def tiny_model_dir_alt(tmp_path_factory) -> Path:
    """A differently shaped tiny model: other head counts, KV groups, window size, tied embeddings."""
    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model

    cfg = TinyModelConfig(seed=1, hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6,
                          num_kv_heads=3, tie_word_embeddings=True, vision_depth=3, vision_heads=4,
                          vision_hidden_size=48, vision_window_size=112, vision_fullatt_blocks=[0, 2])
    return build_tiny_model(tmp_path_factory.mktemp("tiny_alt"), cfg, tokenizer_corpus())


@pytest.fixture(scope="module")
def interpreted_kernel(request):
    """The kernel module a test module names in `INTERPRETED_KERNEL = (module, block constant, value)`, run
    by Triton's interpreter with that (small) block size, so odd shapes span several blocks; the environment
    and the constant are restored after the module's tests. Test modules use it with
    `pytestmark = pytest.mark.usefixtures("interpreted_kernel")`."""
    from kernel_checks import enable_interpreter

    module, undo = enable_interpreter(*request.module.INTERPRETED_KERNEL)
    yield module
    undo()


# The trainer, demo and kill jobs (tests/trainer_scenarios.py) run in their own processes beside the suite.
_JOBS = ("trainers", "demo", "kills")
_BACKGROUND: dict = {}


def _start_background_jobs(session) -> None:
    import subprocess
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pebr_trainer_runs_"))
    _BACKGROUND["root"] = root
    for job in _JOBS:
        log = (root / f"{job}.log").open("w")
        _BACKGROUND[job] = subprocess.Popen([sys.executable, str(Path(__file__).parent / "trainer_scenarios.py"), job,
                                             str(root / job)], stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                                p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)})


def pytest_collection_finish(session):
    """Start the trainer and demo jobs as soon as the tests are known, if a selected test needs them."""
    if any("trainer_runs" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_background_jobs(session)


def pytest_sessionfinish(session, exitstatus):
    import shutil

    for job in _JOBS:
        proc = _BACKGROUND.get(job)
        if proc is not None and proc.poll() is None:  # the session ended early (-x, Ctrl-C)
            proc.terminate()
            proc.wait(30)
    if "root" in _BACKGROUND:
        shutil.rmtree(_BACKGROUND["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def trainer_runs() -> dict:
    """What the trainer, demo and kill jobs reported (waiting for them): `{"tmp", "trainers", "demo", "kills"}`."""
    import json

    if "root" not in _BACKGROUND:
        pytest.skip("the background jobs were not started")
    root = _BACKGROUND["root"]
    out = {"tmp": root}
    for job in _JOBS:
        rc = _BACKGROUND[job].wait(timeout=1800)
        if rc != 0:
            pytest.fail(f"the {job} job exited with {rc}:\n" + (root / f"{job}.log").read_text()[-6000:])
        out[job] = json.loads((root / job / "result.json").read_text())
    return out
