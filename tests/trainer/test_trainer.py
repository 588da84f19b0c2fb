"""The trainers end to end on the tiny model: SFT learns, a GRPO stage runs every phase and logs its
metrics, every rollout samples from the actor's current weights, an interrupted run resumes to exactly the
metrics of an uninterrupted one, and the pipeline skips finished stages.

The trainers run in their own process, as `pebr` runs them (tests/trainer_scenarios.py, started by
conftest beside the rest of the suite): Megatron enters the CPU compatibility layer only inside its own calls there, and
this pytest process never initialises process groups or touches Megatron's globals. The tests below check
what that process reports.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from pebr_mega.logging import read_metrics

pytestmark = pytest.mark.slow

# Metrics that measure the machine, not the computation: excluded from the resume comparison.
_TIMING = ("time/", "tokens_per_s", "tflops", "mfu", "wall")


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in rows]


@pytest.fixture(scope="module")
def runs(trainer_runs):
    return {"tmp": trainer_runs["tmp"] / "trainers" / "trainers", **trainer_runs["trainers"]}


def _ok(runs, name):
    got = runs[name]
    if "error" in got:
        pytest.fail(f"the {name} scenario raised in the trainer worker:\n{got['error']}")
    return got


# ------------------------------------------------------------------------------------------------ tests
def test_sft_lowers_the_loss_and_exports_a_loadable_model(runs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    res = _ok(runs, "sft")
    losses = [r["loss"] for r in read_metrics(runs["tmp"] / "sft" / "run" / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    Qwen2_5_VLForConditionalGeneration.from_pretrained(res["model_dir"])
    # the run's format prompt goes with the model, for inference
    assert Path(res["model_dir"], "format_prompt.jinja").read_bytes() == Path(res["template"]).read_bytes()


def test_every_rollout_samples_from_the_actors_current_weights(runs):
    """Issue 11, defect 1: the engine's weights are gone after each release (SGLang; the HF engine enforces
    it), so every rollout phase after the first must sync them from the actor. With lr 1e-3 the actor moves
    each step: the engine's log-probs equal the actor's (mismatch 1) at every step, and the evaluations before,
    during (step 2) and after training run on the synced weights too."""
    res = _ok(runs, "grpo")["result"]
    rows = read_metrics(runs["tmp"] / "grpo" / "full" / "metrics.jsonl")
    steps = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isclose(r["mismatch/token_mult_prob_error"], 1.0, abs_tol=5e-3), r["step"]
        assert r["sync/bytes"] > 0
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2]
    assert res["eval_before"] and res["eval_after"]


def test_grpo_stage_resumes_to_the_uninterrupted_metrics(runs):
    got = _ok(runs, "grpo")
    rows = read_metrics(runs["tmp"] / "grpo" / "full" / "metrics.jsonl")
    for key in ("reward/total", "reward/accuracy", "loss", "kl", "entropy", "clip_frac", "grad_norm", "lr",
                "time/rollout", "time/logprobs", "time/update", "time/sync", "tokens_per_s",
                "mismatch/token_mult_prob_error", "response_length/mean", "sync/bytes"):
        assert key in rows[-1] and rows[-1][key] is not None, key
    assert Path(got["result"]["model_dir"], "config.json").is_file()
    resumed = read_metrics(runs["tmp"] / "grpo" / "part" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "reward/total" in r] == [1, 2, 3]
    generations = [json.loads(line) for line in
                   (runs["tmp"] / "grpo" / "full" / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [1, 1, 2, 2, 3, 3]
    assert all(g["prompt"] and "<|image_pad|>" not in g["prompt"] and isinstance(g["reward"], float)
               for g in generations)
    assert _comparable(resumed) == _comparable(rows)


def test_first_ctrl_c_saves_the_finished_step_and_a_second_aborts(runs):
    got = _ok(runs, "grpo")
    full = _comparable(read_metrics(runs["tmp"] / "grpo" / "full" / "metrics.jsonl"))
    # One SIGINT in step 2: step 2 is finished and saved (its data position past exactly two batches).
    stop = got["stop"]
    assert stop["how"] == "stopped" and list(stop["saved"]) == ["step_2"] and stop["steps_logged"] == [1, 2, 2]
    assert stop["saved"]["step_2"] == {"epoch": 0, "offset": 2 * 4}
    # A second SIGINT in step 3's update: nothing more is saved, step 2's checkpoint is untouched.
    abort = got["abort"]
    assert abort["how"] == "aborted" and sorted(abort["saved"]) == ["step_1", "step_2"]
    assert abort["after_resume"]["step_2"] == abort["manifests"]["step_2"]
    for name in ("part", "part_abort"):
        assert _comparable(read_metrics(runs["tmp"] / "grpo" / name / "metrics.jsonl")) == full, name


def test_non_finite_reward_skips_the_update(runs):
    got = _ok(runs, "nan")
    assert got["skipped_updates"] == 2 and got["unchanged"]


def test_a_batch_with_no_buildable_request_is_skipped_and_counted(runs):
    got = _ok(runs, "nan")
    empty = got["empty"]
    assert empty["skipped_batches"] == 1.0 and empty["requests/skipped_image"] == 2, empty
    assert "loss" not in empty and got["position"] == {"epoch": 1, "offset": 0}  # past both batches of the file


def test_stage2_epochs_drop_the_partial_batch_in_upstreams_order_with_a_holdout(runs):
    """Issue 13, items 4-6 on a real run: grpo.stage=stage2 alone gives the stage-2 rewards; 2 of the 12
    questions are held out by the seed and evaluated on; the 10 others make floor(10 / 4) = 2 steps per epoch
    for 2 epochs, each step a full batch in the order torch's RandomSampler (seeded once, as upstream's loader)
    draws epoch after epoch, the 2 left over each epoch sitting out; `pebr train --dry-run` printed that plan."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    got = _ok(runs, "epochs")
    qids = [r["qid"] for r in json.loads((runs["tmp"].parent / "synth" / "grpo.json").read_text())]
    held = set(torch.randperm(12, generator=torch.Generator().manual_seed(0))[:2].tolist())
    assert got["holdout_qids"] == [q for i, q in enumerate(qids) if i in held]
    train = [q for i, q in enumerate(qids) if i not in held]
    assert got["train_qids"] == train
    g = torch.Generator()
    g.manual_seed(0)  # run.seed
    loader = DataLoader(train, batch_size=4, sampler=RandomSampler(train, generator=g), drop_last=True,
                        collate_fn=list)
    assert got["batches"] == [list(b) for _ in range(2) for b in loader]
    assert got["total_steps"] == 4 and got["epochs"] == [0, 0, 1, 1]
    assert ("stage2: 10 prompts (2 held out for evaluation), rollout batch 4 -> 2 steps per epoch (2 prompts sit out "
            "each epoch) x 2 epochs = 4 steps; 1 updates and 8 samples per step") in got["started"]
    assert got["reward_weights"] == {"clip": 0.0, "keyword": 0.0, "format": 0.1, "length": 0.0, "accuracy": 0.9}
    assert got["result"]["eval_before"]["eval/count"] == got["result"]["eval_after"]["eval/count"] == 2
    plan = got["plan"]
    assert got["rc"] == 0 and not got["dry_run_wrote"]
    assert {k: plan[k] for k in ("stage", "prompts", "rollout_batch", "mini_batch", "epochs", "steps_per_epoch",
                                 "total_steps", "updates_per_step", "samples_per_step", "grading")} == {
        "stage": "stage2", "prompts": 10, "rollout_batch": 4, "mini_batch": 4, "epochs": 2, "steps_per_epoch": 2,
        "total_steps": 4, "updates_per_step": 1, "samples_per_step": 8, "grading": "upstream"}
    assert plan["reward_weights"] == got["reward_weights"] and plan["dropped_per_epoch"] == 2
    assert plan["eval"] == {"source": "grpo.eval_holdout", "records": 2, "max_samples": 0}
    assert plan["skipped"] == {} and not plan["filters_not_applied"]


def test_pipeline_skips_finished_stages(runs):
    got = _ok(runs, "pipeline")
    work = runs["tmp"] / "pipeline" / "work"
    assert got["first"] == ["sample", "sft", "split"]
    rollouts = (work / "sample" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 12 * 2 and {"qid", "response", "ground_truth", "score"} <= set(json.loads(rollouts[0]))
    counts = got["counts"]
    assert counts["easy"] + counts["medium"] + counts["hard"] == 12
    assert any("sft: already done" in line for line in got["log"]) and got["again_counts"] == counts
    res = got["full"]
    assert "skipped" in res["stage1"] and res["stage2"]["steps"] == 1
    assert Path(res["export"]["model_dir"], "model.safetensors").is_file()
    assert res["export"]["source"] == res["stage2"]["model_dir"]
    # every stage's rollout engine (sampling, stage 2) was shut down before the next one was built
    engines = got["engines"]
    assert engines["built"] >= 2 and engines["shut_down"] == engines["built"]
    assert engines["running_at_build"] == [0] * engines["built"]


def test_sampling_uses_its_own_pixel_cap(tiny_model_dir, tmp_path):
    """Upstream samples at a larger image cap than RL (examples/pebr_sample.yaml): with a prompt limit between
    the two prompt lengths, the question is sampled under one cap and filtered as too long under the other.
    (Sampling runs no Megatron: it runs here, in the pytest process.)"""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from pebr_mega.config import load_config
    from pebr_mega.data.images import ImageConfig
    from pebr_mega.data.pil_backend import PilImageDecoder
    from pebr_mega.data.records import GRPORecord
    from pebr_mega.rollout.requests import RequestBuilder
    from pebr_mega.trainer.sample import run_sampling

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "grpo.json").write_text(json.dumps([{"qid": "q", "problem": "<image>How many?", "answer": "3",
                                                     "images": ["a.png"], "key_words": []}]))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rec = [GRPORecord("q", "<image>How many?", "3", ["a.png"])]
    small, large = (len(RequestBuilder(tok, PilImageDecoder(ImageConfig(min_pixels=3136, max_pixels=cap)))
                        .build(rec, tmp_path)[0][0].prompt_ids) for cap in (3136 * 4, 50176))
    assert small < large

    def sample(cap, out):
        cfg = load_config(None, [f"sample.model={tiny_model_dir}", f"sample.dataset={tmp_path / 'grpo.json'}",
                                 f"sample.output={tmp_path / out}", "sample.n=2", f"sample.max_pixels={cap}",
                                 "images.min_pixels=3136", "images.max_pixels=50176", "rollout.max_new_tokens=8",
                                 f"data.max_prompt_length={small}"])
        return run_sampling(cfg, progress=False)

    assert sample(50176, "big.jsonl")["skipped"] == {"prompt_too_long": 1}
    kept = sample(3136 * 4, "small.jsonl")
    assert kept["questions"] == 1 and not kept["skipped"] and kept["samples"] == 2


def test_sampling_builds_per_batch_and_writes_the_all_at_once_output(tiny_model_dir, tmp_path):
    """Issue 13: sampling builds a batch of requests (pixel values) at a time. Its rollouts equal those of the
    former path, computed here from scratch: every request built first, the list cut into `sample.batch_size`
    pieces, piece k sampled with seed `run.seed + offset` and graded with upstream's rule. Records skipped while
    building (a corrupt image, an over-long prompt) shift the pieces; the skip report stays complete."""
    import numpy as np
    from PIL import Image

    from pebr_mega.config import load_config
    from pebr_mega.rewards import accuracy_reward
    from pebr_mega.rollout.factory import make_rollout_engine, sampling_params
    from pebr_mega.trainer.context import RunContext
    from pebr_mega.trainer.sample import run_sampling

    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"qid": f"q{i}", "problem": f"<image>How many shapes? ({i})", "answer": str(i % 3), "images": [f"{i % 3}.png"],
             "key_words": []} for i in range(6)]
    rows.insert(1, {"qid": "broken", "problem": "<image>?", "answer": "1", "images": ["broken.png"], "key_words": []})
    rows.insert(4, {"qid": "long", "problem": "<image>" + " word" * 300, "answer": "1", "images": ["0.png"],
                    "key_words": []})
    (tmp_path / "grpo.json").write_text(json.dumps(rows))
    cfg = load_config(None, [f"sample.model={tiny_model_dir}", f"sample.dataset={tmp_path / 'grpo.json'}",
                             f"sample.output={tmp_path / 'out.jsonl'}", "sample.n=2", "sample.batch_size=2",
                             "sample.temperature=1.0", "sample.max_pixels=50176", "images.min_pixels=3136",
                             "images.max_pixels=50176", "rollout.max_new_tokens=8", "data.max_prompt_length=200",
                             "run.seed=5"])
    summary = run_sampling(cfg, progress=False)
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    ctx = RunContext.for_generation(cfg, str(tiny_model_dir), "sample", images=dataclasses.replace(cfg.images, max_pixels=50176))
    requests, report = ctx.requests.build(ctx.load_records(str(tmp_path / "grpo.json"), "GRPO"), str(tmp_path))
    engine = make_rollout_engine(cfg.rollout, tiny_model_dir, ctx.device, seed=cfg.run.seed)
    want = []
    for start in range(0, len(requests), 2):
        params = sampling_params(ctx.tokenizer, 2, 1.0, cfg.sample.top_p, 8, seed=cfg.run.seed + start)
        for s in engine.generate(requests[start:start + 2], params):
            answer = s.request.record.answer
            want.append({"qid": s.record_id, "response": s.response_text, "ground_truth": answer,
                         "score": float(accuracy_reward(s.response_text, answer, "upstream"))})
    assert [r.record_id for r in requests] == [f"q{i}" for i in range(6)]
    assert got == want and len({r["response"] for r in got}) > 2  # sampled answers: the seeds matter
    assert summary["skipped"] == dict(report.skipped) == {"image": 1, "prompt_too_long": 1}
    assert (summary["questions"], summary["samples"]) == (6, 12)
