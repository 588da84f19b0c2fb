"""Difficulty split: easy/medium/hard by correct count, and every anomaly reported instead of dropped."""
from __future__ import annotations

import json
import random

import pytest

from pebr_mega.cli import main
from pebr_mega.data.split import load_rollouts, rollout_score, split_by_difficulty, split_files
from pebr_mega.data.records import load_grpo_records
from pebr_mega.errors import DataError


def _record(qid):
    return {"qid": qid, "problem": f"<image> question {qid}?", "answer": "1", "images": [f"{qid}.png"],
            "key_words": ["k"], "source": "test"}


def _line(qid, score, form="number"):
    d = {"qid": qid, "response": "### The final answer is: 1", "ground_truth": "1"}
    if form == "number":
        d["score"] = score
    elif form == "dict":
        d["score"] = {"overall": 0.3, "accuracy": score}
    else:
        d["accuracy"] = score
    return json.dumps(d)


def _setup(tmp_path, n=8, seed=0):
    """A dataset of 12 questions and rollouts with a known expected outcome per question, shuffled."""
    rng = random.Random(seed)
    qids = [f"q{i}" for i in range(12)]
    (tmp_path / "data.json").write_text(json.dumps([_record(q) for q in qids]))
    correct = {"q0": n, "q1": 0, "q2": 1, "q3": n - 1, "q4": 3, "q5": n, "q6": 0, "q7": 4}
    lines = []
    for q, k in correct.items():
        scores = [1.0] * k + [0.0] * (n - k)
        rng.shuffle(scores)
        lines += [_line(q, s, rng.choice(["number", "dict", "top"])) for s in scores]
    lines += [_line("q8", 1.0)] * (2 * n)  # a re-run appended to the file: 16 samples
    lines += [_line("q9", 1.0)] * (n - 1)  # a lost sample
    # q10, q11: no rollouts at all
    lines += [_line("ghost", 1.0)] * 3  # not in the dataset
    rng.shuffle(lines)
    lines.insert(5, "{truncated")
    lines.insert(9, json.dumps({"qid": "q0"}))  # no score
    lines.insert(11, json.dumps({"score": 1.0}))  # no qid
    (tmp_path / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    return qids, correct


def test_rollout_score_precedence():
    assert rollout_score({"score": 0.5, "accuracy": 1.0}) == 0.5
    assert rollout_score({"score": {"accuracy": 1, "overall": 0.2}}) == 1.0
    assert rollout_score({"accuracy": 0.0}) == 0.0
    assert rollout_score({"score": {"overall": 1.0}}) is None
    assert rollout_score({"score": True}) is None and rollout_score({"score": float("nan")}) is None


def test_split_files_every_qid_in_exactly_one_bucket(tmp_path):
    qids, correct = _setup(tmp_path)
    res = split_files(tmp_path / "rollouts.jsonl", tmp_path / "data.json", tmp_path / "out")
    expect = {q: ("easy" if k == 8 else "hard" if k == 0 else "medium") for q, k in correct.items()}
    for bucket in ("easy", "medium", "hard"):
        got = [r.qid for r in getattr(res, bucket)]
        assert got == [q for q in qids if expect.get(q) == bucket]  # dataset order
        on_disk = json.loads((tmp_path / "out" / f"{bucket}case.json").read_text())
        assert [r["qid"] for r in on_disk] == got and all(r["source"] == "test" for r in on_disk)
    assert res.wrong_count == {"q8": 16, "q9": 7}
    assert res.no_rollouts == ["q10", "q11"]
    assert res.unknown_qids == {"ghost": 3}
    assert sorted(s.reason for s in res.malformed) == ["malformed_json", "no_qid", "no_score"]
    filed = [r.qid for b in (res.easy, res.medium, res.hard) for r in b]
    everything = filed + list(res.wrong_count) + res.no_rollouts
    assert sorted(everything) == sorted(qids) and len(everything) == len(set(everything))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"easy": 2, "medium": 4, "hard": 2, "wrong_count": 2, "no_rollouts": 2}
    assert summary["correct_histogram"] == {"0": 2, "1": 1, "3": 1, "4": 1, "7": 1, "8": 2}
    assert summary["wrong_count"] == {"q8": 16, "q9": 7} and summary["unknown_qids"] == {"ghost": 3}


def test_rerun_overwrites_instead_of_appending(tmp_path):
    _setup(tmp_path)
    first = split_files(tmp_path / "rollouts.jsonl", tmp_path / "data.json", tmp_path / "out").counts()
    again = split_files(tmp_path / "rollouts.jsonl", tmp_path / "data.json", tmp_path / "out").counts()
    assert first == again
    assert len(json.loads((tmp_path / "out" / "easycase.json").read_text())) == first["easy"]


def test_threshold_and_n_are_respected(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([_record("a"), _record("b")]))
    lines = [_line("a", s) for s in (0.6, 0.7, 0.9, 0.5)] + [_line("b", s) for s in (0.1, 0.2, 0.3, 0.4)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines))
    recs = load_grpo_records(tmp_path / "data.json").records
    ro = load_rollouts(tmp_path / "r.jsonl")
    res = split_by_difficulty(recs, ro, n=4, threshold=0.5)
    assert ([r.qid for r in res.easy], [r.qid for r in res.hard]) == (["a"], ["b"])
    res = split_by_difficulty(recs, ro, n=4, threshold=0.65)
    assert [r.qid for r in res.medium] == ["a"]
    assert split_by_difficulty(recs, ro, n=8).wrong_count == {"a": 4, "b": 4}
    with pytest.raises(DataError, match="n must be"):
        split_by_difficulty(recs, ro, n=0)


def test_cli_split_prints_summary(tmp_path, capsys):
    _setup(tmp_path)
    rc = main(["split", "--rollouts", str(tmp_path / "rollouts.jsonl"), "--dataset", str(tmp_path / "data.json"),
               "--out-dir", str(tmp_path / "out"), "--n", "8"])
    assert rc == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0][:3] == ["split:", "12", "questions"]
    assert ["easy", "2"] == lines[1][:2] and ["medium", "4"] == lines[2][:2] and ["hard", "2"] == lines[3][:2]
    assert any(line[:2] == ["wrong_count", "2"] for line in lines)
    assert any(line[:3] == ["wrong", "count:", "q8"] for line in lines)
    assert any(line[:2] == ["unknown_qids", "1"] for line in lines)
    assert any(line[:2] == ["malformed", "3"] for line in lines)
    rc = main(["split", "--rollouts", str(tmp_path / "nope.jsonl"), "--dataset", str(tmp_path / "data.json"),
               "--out-dir", str(tmp_path / "out")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err


def test_a_rollouts_file_with_a_utf8_bom_reads_every_line(tmp_path):
    f = tmp_path / "rollouts.jsonl"
    lines = [json.dumps({"qid": "q1", "score": 1.0}), json.dumps({"qid": "q1", "score": 0.0})]
    f.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    rollouts = load_rollouts(f)
    assert rollouts.scores == {"q1": [1.0, 0.0]} and not rollouts.malformed
