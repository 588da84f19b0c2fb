"""`pebr eval` / `pebr infer` and the evaluation function: grading agrees with the reward functions."""
from __future__ import annotations

import json

from pebr_mega.cli import main
from pebr_mega.rewards import accuracy_reward, format_reward
from pebr_mega.rewards.perception import description_scores


def test_eval_cli_grades_each_answer(tiny_model_dir, tmp_path, capsys):
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "synth", SynthConfig(num=4, num_sft=1, num_eval=5, seed=1)).out_dir
    results = tmp_path / "res.jsonl"
    rc = main(["eval", "--model", str(tiny_model_dir), "--dataset", str(data / "eval.json"), "--max-samples", "3",
               "--max-new-tokens", "6", "--results", str(results)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 questions | accuracy" in out and "exact description" in out
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(rows) == 3
    references = {r["qid"]: r["description"] for r in json.loads((data / "eval.json").read_text())}
    for r in rows:
        assert r["accuracy"] == accuracy_reward(r["response"], r["ground_truth"])
        assert r["format"] == format_reward(r["response"])
        assert r["description_exact"] == description_scores(r["response"], references[r["qid"]])[0]


def test_eval_cli_takes_its_generation_length_and_grading_from_the_config(tiny_model_dir, tmp_path, capsys):
    """Without --max-new-tokens / --grading, `pebr eval` generates and grades as the run's config says
    (rollout.max_new_tokens, rewards.answer_grading); the flags still win."""
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "synth", SynthConfig(num=4, num_sft=1, num_eval=3, seed=2)).out_dir
    config = tmp_path / "run.yaml"
    config.write_text("rollout:\n  max_new_tokens: 3\nrewards:\n  answer_grading: lenient\n")
    results = tmp_path / "res.jsonl"
    base = ["eval", "--model", str(tiny_model_dir), "--dataset", str(data / "eval.json"), "--config", str(config)]
    assert main([*base, "--results", str(results)]) == 0
    assert "(at most 3, graded lenient)" in capsys.readouterr().out
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    for r in rows:
        assert r["accuracy"] == accuracy_reward(r["response"], r["ground_truth"], "lenient")
    assert main([*base, "--max-new-tokens", "2", "--grading", "upstream"]) == 0
    assert "(at most 2, graded upstream)" in capsys.readouterr().out


def test_infer_cli_prints_an_answer_and_rejects_missing_image(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    assert main(["infer", "--model", str(tiny_model_dir), "--image", str(img), "--question", "How many?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["infer", "--model", str(tiny_model_dir), "--image", str(tmp_path / "nope.png"),
                 "--question", "How many?"]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_eval_and_infer_are_library_calls_the_cli_prints(tiny_model_dir, tmp_path, capsys):
    """`pebr eval` and `pebr infer` parse, call `trainer.evaluate.evaluate_model` / `rollout.inference.answer_question`
    and print what they return."""
    import numpy as np
    from PIL import Image

    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
    from pebr_mega.rollout.inference import answer_question
    from pebr_mega.trainer.evaluate import evaluate_model

    data = write_synthetic_dataset(tmp_path / "synth", SynthConfig(num=4, num_sft=1, num_eval=2, seed=1)).out_dir
    done = evaluate_model(str(tiny_model_dir), str(data / "eval.json"), 5, "lenient", max_samples=2, log=print)
    assert done.metrics["eval/count"] == 2 and "(at most 5, graded lenient)" in done.line()
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(data / "eval.json"), "--max-samples", "2",
                 "--max-new-tokens", "5", "--grading", "lenient"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == done.line()  # greedy: the same answers
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    text = answer_question(str(tiny_model_dir), str(img), "How many?", max_new_tokens=4)
    assert main(["infer", "--model", str(tiny_model_dir), "--image", str(img), "--question", "How many?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
