"""EasyR1 users' data and keys: GRPO files in EasyR1's layouts and EasyR1 config files read into pebr's tree.

The EasyR1 config below is written in the layout of PeBR-R1's own stage configs (an EasyR1 fork:
`examples/pebr_stage1.yaml`): the same keys with the recipe's values. Images are checked by their pixels, read
back through the same image loader the trainer uses.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pebr_mega.cli import main
from pebr_mega.config import load_config
from pebr_mega.config_fields import ConfigError
from pebr_mega.data.images import load_image
from pebr_mega.data.records import load_grpo_file

EASYR1_STAGE1 = """\
data:
  train_files: {train}
  val_files: null
  prompt_key: question
  answer_key: solution
  image_key: pictures
  image_dir: {images}
  max_prompt_length: 2048
  max_response_length: 1024
  rollout_batch_size: 560
  mini_rollout_batch_size: null
  val_batch_size: 1024
  shuffle: true
  seed: 1
  max_pixels: 802816
  min_pixels: 576
  filter_overlong_prompts: true
algorithm:
  adv_estimator: grpo
  disable_kl: false
  use_kl_loss: true
  kl_penalty: low_var_kl
  kl_coef: 1.0e-2
  online_filtering: false
  filter_key: accuracy
worker:
  actor:
    global_batch_size: 112
    micro_batch_size_per_device_for_update: 4
    max_grad_norm: 1.0
    clip_ratio_low: 0.2
    clip_ratio_high: 0.3
    model:
      model_path: {model}
      freeze_vision_tower: false
    optim:
      lr: 1.0e-6
      weight_decay: 1.0e-2
      strategy: adamw
      lr_warmup_ratio: 0.0
      betas: [0.9, 0.98]
    fsdp:
      enable_full_shard: true
    offload:
      offload_params: true
  rollout:
    n: 8
    temperature: 1.2
    top_p: 0.99
    gpu_memory_utilization: 0.6
    tensor_parallel_size: 4
    enforce_eager: false
    val_override_config:
      temperature: 0.5
      n: 1
  reward:
    reward_type: batch
    reward_function: ./examples/reward_function/pebr_2.py:compute_score
trainer:
  total_epochs: 2
  max_steps: null
  project_name: easy_r1
  experiment_name: pebr_stage2
  logger: ["console", "wandb"]
  nnodes: 1
  n_gpus_per_node: 8
  val_freq: -1
  val_before_train: false
  save_freq: -1
  save_limit: 3
  save_checkpoint_path: {out}
  load_checkpoint_path: null
"""


def _png(seed: int, size=(56, 42)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEBR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rows(images_dir: Path) -> list[dict]:
    """Three EasyR1 rows, no qid: an image by path, one embedded as HF datasets does, one as raw bytes."""
    (images_dir / "a.png").write_bytes(_png(0))
    return [{"question": "<image>How many circles?", "solution": "3", "pictures": ["a.png"]},
            {"question": "<image>What colour?", "solution": "red", "pictures": [{"bytes": _png(1), "path": None}]},
            {"question": "<image>How many left?", "solution": "2", "pictures": _png(2)}]


def _config(tmp_path, train: Path, model: Path) -> Path:
    path = tmp_path / "easyr1_stage2.yaml"
    path.write_text(EASYR1_STAGE1.format(train=train, images=train.parent, model=model, out=tmp_path / "out"))
    return path


def test_easyr1_config_reads_into_pebrs_tree_with_one_note_per_reason(tmp_path):
    cfg_path = _config(tmp_path, tmp_path / "train.jsonl", tmp_path / "model")
    with pytest.warns(UserWarning) as notes:
        cfg = load_config(cfg_path)
    assert (cfg.grpo.train_file, cfg.data.image_root, cfg.grpo.init_model) == (
        str(tmp_path / "train.jsonl"), str(tmp_path), str(tmp_path / "model"))
    assert (cfg.data.prompt_key, cfg.data.answer_key, cfg.data.image_key) == ("question", "solution", "pictures")
    assert (cfg.rollout.max_new_tokens, cfg.grpo.rollout_batch_size, cfg.grpo.mini_batch_size, cfg.grpo.epochs) == (
        1024, 560, 112, 2)
    assert (cfg.algo.kl_type, cfg.algo.kl_coef, cfg.algo.clip_low, cfg.algo.clip_high) == ("low_var_kl", 0.01, 0.2, 0.3)
    assert (cfg.actor.lr, cfg.actor.weight_decay, cfg.actor.adam_beta1, cfg.actor.adam_beta2, cfg.actor.clip_grad) == (
        1e-6, 0.01, 0.9, 0.98, 1.0)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.val_temperature, cfg.rollout.val_n) == (8, 1.2, 0.5, 1)
    assert cfg.rollout.sglang_args["mem_fraction_static"] == 0.6 and cfg.rollout.sglang_tp_size == 4
    assert cfg.grpo.stage == "stage2"  # pebr_2.py, upstream's stage-2 reward
    assert (cfg.grpo.max_steps, cfg.grpo.eval_every, cfg.grpo.eval_before, cfg.grpo.save_every, cfg.grpo.keep_last) == (
        -1, 0, False, 0, 3)
    assert (cfg.logging.wandb_mode, cfg.logging.wandb_project, cfg.run.output_dir, cfg.run.seed) == (
        "online", "easy_r1", str(tmp_path / "out"), 1)
    lines = [str(n.message) for n in notes]
    fsdp = [line for line in lines if "worker.actor.fsdp.enable_full_shard" in line]
    assert len(fsdp) == 1 and "worker.actor.offload.offload_params" in fsdp[0] and "Megatron-Core" in fsdp[0]


@pytest.mark.parametrize("override,expected", [
    ("worker.actor.optim.lr=2e-6", ("actor", "lr", 2e-6)),
    ("trainer.save_freq=10", ("grpo", "save_every", 10)),
    ("algorithm.kl_penalty=mse", ("algo", "kl_type", "k2")),
    ("worker.actor.clip_ratio_low=0.1", ("algo", "clip_low", 0.1)),
    ("data.train_files=/d/x.parquet", ("grpo", "train_file", "/d/x.parquet")),
])
def test_easyr1_keys_on_the_command_line_are_translated(override, expected):
    section, key, value = expected
    assert getattr(getattr(load_config(None, [override]), section), key) == value


@pytest.mark.parametrize("override,says", [
    ("algorithm.online_filtering=true", "pebr sample"),
    ("algorithm.use_kl_loss=false", "algo.kl_coef"),
    ("worker.reward.reward_function=./mine.py:score", "grpo.stage picks the preset"),
    ("data.train_files=hiyouga/math12k@train", "local JSON/JSONL/parquet"),
    ("trainer.val_only=true", "pebr eval"),
    ("worker.actor.not_a_key=1", "has no pebr counterpart"),
])
def test_easyr1_keys_pebr_cannot_honour_are_one_line_naming_what_to_use(override, says, capsys):
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load_config(None, [override])
    assert main(["config", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and override.split("=")[0] in err[0]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_easyr1_layout_grpo_file_with_paths_and_embedded_bytes(fmt, tmp_path, cache):
    rows = _rows(tmp_path)
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        for row in rows:  # JSON cannot hold bytes: EasyR1's JSON files name image files; keep the path row only
            row["pictures"] = ["a.png"]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        rows[2]["pictures"] = [{"bytes": _png(2), "path": None}]  # one column type per parquet file
        rows[0]["pictures"] = [{"bytes": None, "path": "a.png"}]
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = load_config(None, ["data.prompt_key=question", "data.answer_key=solution", "data.image_key=pictures",
                             f"data.image_root={tmp_path}"])
    loaded = load_grpo_file(path, cfg.data)
    assert not loaded.skipped, loaded.report()
    assert [r.qid for r in loaded.records] == ["train-0", "train-1", "train-2"]
    assert [r.answer for r in loaded.records] == ["3", "red", "2"]
    assert loaded.notes["qid missing (made from the file name and position)"] == 3
    for i, record in enumerate(loaded.records):
        seed = 0 if fmt == "jsonl" else i
        expected = np.asarray(Image.open(io.BytesIO(_png(seed))))
        got = np.asarray(load_image(record.image_paths(tmp_path)[0]))
        assert np.array_equal(got, expected), i
    if fmt == "parquet":
        assert loaded.notes["images embedded as bytes (written to files)"] == 2
        assert sorted(p.suffix for p in (cache / "embedded-images").iterdir()) == [".png", ".png"]
        again = load_grpo_file(path, cfg.data)  # content-addressed: the same files, nothing new written
        assert [r.images for r in again.records] == [r.images for r in loaded.records]
        assert len(list((cache / "embedded-images").iterdir())) == 2


def test_alpaca_sft_records_become_conversations_as_llamafactory_builds_them(tmp_path):
    """Alpaca layout (LLaMA-Factory's AlpacaDatasetConverter): history pairs first, then instruction and input
    joined by a newline, the output as the reply, the system prompt kept; a record with a bad history is a
    named skip, as any malformed conversation."""
    from pebr_mega.data.sft_records import SkipRecord, to_conversation

    (tmp_path / "a.png").write_bytes(_png(0))
    record = {"instruction": "<image>Count the shapes.", "input": "Answer with a number.", "output": "3",
              "system": "You are careful.", "history": [["Hi", "Hello."]], "images": ["a.png"]}
    conv = to_conversation(record, None, tmp_path, "line 1")
    assert conv.messages == [{"role": "system", "content": "You are careful."},
                             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "<image>Count the shapes.\nAnswer with a number."},
                             {"role": "assistant", "content": "3"}]
    assert conv.images == [str(tmp_path / "a.png")]
    plain = to_conversation({"instruction": "Say hi.", "output": "hi"}, None, tmp_path, "line 2")
    assert plain.messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    with pytest.raises(SkipRecord, match="bad_content"):
        to_conversation({"instruction": "x", "output": "y", "history": ["not a pair"]}, None, tmp_path, "line 3")


def test_every_easyr1_key_is_documented():
    from pebr_mega.config_easyr1 import EASYR1_KEYS

    text = (Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md").read_text()
    section = text[text.index("## Coming from EasyR1"):]
    section = section[:section.index("\n## ", 5)]
    missing = [k for k in EASYR1_KEYS if f"`{k}`" not in section]
    assert not missing, missing


def test_an_easyr1_config_and_parquet_file_train_the_tiny_model(tiny_model_dir, tmp_path):
    """The EasyR1 stage config above, a parquet file with embedded images, and the EasyR1 keys a user would
    change on the command line: `pebr train` runs its steps and exports the model (its own process, as a run)."""
    import os
    import subprocess
    import sys

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": "<image>How many circles?", "solution": str(i % 3), "pictures": [{"bytes": _png(i), "path": None}]}
            for i in range(4)]
    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), train)
    config = _config(tmp_path, train, tiny_model_dir)
    overrides = ["data.rollout_batch_size=2", "worker.actor.global_batch_size=2", "worker.rollout.n=2",
                 "data.max_response_length=8", "trainer.logger=[console]", "trainer.total_epochs=1",
                 "worker.rollout.tensor_parallel_size=1",
                 # CPU: the tiny model in fp32 with SDPA and its processor's pixel bounds (pebr keys).
                 "model.params_dtype=float32", "model.spec=torch", "images.min_pixels=3136", "images.max_pixels=50176",
                 "logging.progress_bar=false"]
    env = {**os.environ, "PEBR_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "pebr_mega", "train", "--config", str(config), *overrides],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"stage2 done: model {tmp_path / 'out' / 'hf'}" in out.stdout
    assert "pebr: note:" in out.stderr and "worker.actor.fsdp.enable_full_shard" in out.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "out" / "hf" / "config.json").is_file()
