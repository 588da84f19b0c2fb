"""The trainers end to end on the tiny model: SFT learns, a GRPO stage runs every phase and logs its
metrics, an interrupted run resumes to exactly the metrics of an uninterrupted one, and the pipeline skips
finished stages."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pebr_mega.config import load_config
from pebr_mega.logging import read_metrics

# Metrics that measure the machine, not the computation: excluded from the resume comparison.
_TIMING = ("time/", "tokens_per_s", "tflops", "mfu", "wall")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"),
                                   SynthConfig(num=12, num_sft=16, num_eval=4, seed=3)).out_dir


def _cfg(tmp: Path, model: Path, data: Path, *extra: str):
    return load_config(None, [
        f"run.output_dir={tmp}", "model.spec=torch", "model.params_dtype=float32",
        "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false",
        f"data.eval_file={data / 'eval.json'}", "rollout.n=4", "rollout.max_new_tokens=12",
        "rollout.val_temperature=0.0", "actor.micro_batch_tokens=2048", *extra])


def _grpo(tmp, model, data, *extra):
    return _cfg(tmp, model, data, "rewards.stage=stage2", "grpo.stage=stage2", f"grpo.init_model={model}",
                f"grpo.train_file={data / 'grpo.json'}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=2",
                "actor.lr=1e-3", *extra)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in rows]


def test_sft_lowers_the_loss_and_exports_a_loadable_model(tiny_model_dir, data, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pebr_mega.trainer.sft import SFTTrainer

    template = tmp_path / "my_format.jinja"
    template.write_text("Answer in sections.\n\n{{ content | trim }}\n")
    cfg = _cfg(tmp_path / "run", tiny_model_dir, data, f"sft.init_model={tiny_model_dir}",
               f"sft.train_file={data / 'sft.json'}", "sft.lr=3e-3", "sft.epochs=3", "sft.batch_size=8",
               "sft.freeze_vision=false", "sft.freeze_projector=false", "data.eval_file=",
               f"data.format_prompt={template}")
    res = SFTTrainer(cfg).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    Qwen2_5_VLForConditionalGeneration.from_pretrained(res.model_dir)
    assert Path(res.model_dir, "format_prompt.jinja").read_bytes() == template.read_bytes()  # for inference


def test_grpo_stage_resumes_to_the_uninterrupted_metrics(tiny_model_dir, data, tmp_path, monkeypatch):
    from pebr_mega.trainer.grpo import GRPOTrainer

    full = _grpo(tmp_path / "full", tiny_model_dir, data, "grpo.max_steps=3", "grpo.save_every=0",
                 "logging.log_generations=2")
    res = GRPOTrainer(full).train()
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    generations = [json.loads(line) for line in (tmp_path / "full" / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [1, 1, 2, 2, 3, 3]
    assert all(g["prompt"] and "<|image_pad|>" not in g["prompt"] and isinstance(g["reward"], float)
               for g in generations)
    for key in ("reward/total", "reward/accuracy", "loss", "kl", "entropy", "clip_frac", "grad_norm", "lr",
                "time/rollout", "time/logprobs", "time/update", "time/sync", "tokens_per_s",
                "mismatch/token_mult_prob_error", "response_length/mean", "sync/bytes"):
        assert key in rows[-1] and rows[-1][key] is not None, key
    assert math.isclose(rows[0]["mismatch/token_mult_prob_error"], 1.0, abs_tol=5e-3)
    assert res.eval_before and res.eval_after and Path(res.model_dir, "config.json").is_file()

    # Interrupt the same run after step 2 (Ctrl-C): it saves and exits; a new run resumes at step 2.
    part = _grpo(tmp_path / "part", tiny_model_dir, data, "grpo.max_steps=3", "grpo.save_every=0")
    original = GRPOTrainer.train_step
    calls = {"n": 0}

    def interrupting(self):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(GRPOTrainer, "train_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        GRPOTrainer(part).train()
    monkeypatch.setattr(GRPOTrainer, "train_step", original)
    assert (tmp_path / "part" / "checkpoints" / "step_2" / "COMPLETE").is_file()
    GRPOTrainer(part).train()
    resumed = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert _comparable(resumed) == _comparable(rows)


def test_non_finite_reward_skips_the_update(tiny_model_dir, data, tmp_path, monkeypatch):
    from pebr_mega.trainer.grpo import GRPOTrainer

    cfg = _grpo(tmp_path, tiny_model_dir, data, "grpo.max_steps=1", "grpo.save_every=0", "data.eval_file=")
    trainer = GRPOTrainer(cfg)
    real_score = trainer.session.reward_model.score

    def nan_scores(batch):
        out = real_score(batch)
        for r in out:
            r.total = float("nan")
        return out

    trainer.session.reward_model.score = nan_scores
    before = [p.detach().clone() for p in trainer.session.actor.module.parameters()]
    m = trainer.train_step()
    assert m["skipped_updates"] == 2
    assert all((a == p).all() for a, p in zip(before, trainer.session.actor.module.parameters()))


def test_pipeline_skips_finished_stages(tiny_model_dir, data, tmp_path, capsys):
    from pebr_mega.trainer.pipeline import run_pipeline, stage_result

    cfg = _cfg(tmp_path, tiny_model_dir, data, f"pipeline.work_dir={tmp_path / 'work'}",
               f"pipeline.base_model={tiny_model_dir}", f"pipeline.sft_file={data / 'sft.json'}",
               f"pipeline.grpo_file={data / 'grpo.json'}", "sample.n=2", "sample.batch_size=8",
               "pipeline.stages=[sft,sample,split]", "sft.epochs=1", "sft.batch_size=8", "data.eval_file=")
    first = run_pipeline(cfg)
    assert set(first) == {"sft", "sample", "split"}
    rollouts = (tmp_path / "work" / "sample" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 12 * 2 and {"qid", "response", "ground_truth", "score"} <= set(json.loads(rollouts[0]))
    counts = stage_result(tmp_path / "work", "split")["counts"]
    assert counts["easy"] + counts["medium"] + counts["hard"] == 12
    capsys.readouterr()
    again = run_pipeline(cfg)
    assert "sft: already done" in capsys.readouterr().out and again["split"]["counts"] == counts

    # Stage 2 on a medium set written by the split (its images resolve against the source data's folder),
    # stage 1 skipped when the easy set is empty, and the final export.
    split = tmp_path / "work" / "split"
    (split / "easycase.json").write_text("[]")
    (split / "mediumcase.json").write_text(json.dumps(json.loads((data / "grpo.json").read_text())[:2]))
    cfg.pipeline.stages = ["sft", "sample", "split", "stage1", "stage2", "export"]
    cfg.grpo.max_steps, cfg.grpo.rollout_batch_size, cfg.grpo.mini_batch_size = 1, 2, 2
    res = run_pipeline(cfg)
    assert "skipped" in res["stage1"] and res["stage2"]["steps"] == 1
    assert Path(res["export"]["model_dir"], "model.safetensors").is_file()
    assert res["export"]["source"] == res["stage2"]["model_dir"]


def test_sampling_uses_its_own_pixel_cap(tiny_model_dir, tmp_path):
    """Upstream samples at a larger image cap than RL (examples/pebr_sample.yaml): with a prompt limit between
    the two prompt lengths, the question is sampled under one cap and filtered as too long under the other."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from pebr_mega.data.images import ImageConfig, PilImageDecoder
    from pebr_mega.data.records import GRPORecord
    from pebr_mega.rollout.requests import build_requests
    from pebr_mega.trainer.sample import run_sampling

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "grpo.json").write_text(json.dumps([{"qid": "q", "problem": "<image>How many?", "answer": "3",
                                                     "images": ["a.png"], "key_words": []}]))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rec = [GRPORecord("q", "<image>How many?", "3", ["a.png"])]
    small, large = (len(build_requests(rec, tok, PilImageDecoder(ImageConfig(min_pixels=3136, max_pixels=cap)),
                                       tmp_path, 1 << 30)[0][0].prompt_ids) for cap in (3136 * 4, 50176))
    assert small < large

    def sample(cap, out):
        cfg = load_config(None, [f"sample.model={tiny_model_dir}", f"sample.dataset={tmp_path / 'grpo.json'}",
                                 f"sample.output={tmp_path / out}", "sample.n=2", f"sample.max_pixels={cap}",
                                 "images.min_pixels=3136", "images.max_pixels=50176", "rollout.max_new_tokens=8",
                                 f"data.max_prompt_length={small}", "run.device=cpu"])
        return run_sampling(cfg, progress=False)

    assert sample(50176, "big.jsonl")["skipped"] == {"prompt_too_long": 1}
    kept = sample(3136 * 4, "small.jsonl")
    assert kept["questions"] == 1 and not kept["skipped"] and kept["samples"] == 2
