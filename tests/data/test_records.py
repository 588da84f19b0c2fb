"""GRPO records: JSON/JSONL reading, boundary validation with counted skips, round trip, and the data config."""
from __future__ import annotations

import json

import pytest

from pebr_mega.config import load_config
from pebr_mega.data.records import GRPORecord, load_grpo_records, save_records
from pebr_mega.errors import DataError


def _rec(qid, n_images=1, **kw):
    d = {"qid": qid, "problem": "Q " + "<image> " * n_images + "how many?", "answer": "3",
         "images": [f"img/{qid}_{i}.png" for i in range(n_images)], "key_words": ["red", "circle"]}
    d.update(kw)
    return d


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_json_list_loads_all_good_records_in_order(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([_rec("a"), _rec("b", n_images=2), _rec("c")]))
    res = load_grpo_records(f)
    assert [r.qid for r in res.records] == ["a", "b", "c"]
    assert res.records[1].images == ["img/b_0.png", "img/b_1.png"]
    assert res.skipped == [] and res.total == 3
    assert res.records[0].key_words == ["red", "circle"]


def test_every_bad_record_is_skipped_with_reason_location_and_qid(tmp_path):
    recs = [
        _rec("ok1"),
        "just a string",
        {k: v for k, v in _rec("noanswer").items() if k != "answer"},
        _rec("badimg", images="img/x.png"),
        _rec("badkw", key_words="red"),
        _rec("notoken", problem="how many circles?"),
        _rec("mismatch", problem="<image> <image> count"),
        _rec("ok1"),  # duplicate qid
        _rec(7),  # integer qid -> "7"
        _rec("numans", answer=5),
        _rec("badans", answer=None),
        _rec(True),  # a bool is not a qid
    ]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    res = load_grpo_records(f)
    assert [r.qid for r in res.records] == ["ok1", "7", "numans"]
    assert res.records[2].answer == "5"
    assert res.counts == {"not_an_object": 1, "missing_field": 1, "bad_field": 4, "no_image_token": 1,
                          "image_count_mismatch": 1, "duplicate_qid": 1}
    by_qid = {s.qid: s for s in res.skipped}
    assert by_qid["noanswer"].detail == "answer" and by_qid["noanswer"].location == "index 2"
    assert "first seen at index 0" in by_qid["ok1"].detail and by_qid["ok1"].location == "index 7"
    assert by_qid["mismatch"].reason == "image_count_mismatch"
    assert len(res.records) + len(res.skipped) == res.total == len(recs)
    report = res.report()
    assert "3 of 12 records loaded" in report and "duplicate_qid" in report and "index 7 qid=ok1" in report


def test_empty_answer_and_empty_problem_are_named_counted_skips(tmp_path):
    recs = [_rec("ok"), _rec("blank", answer=""), _rec("spaces", answer="  \n"), _rec("noq", problem="<image>"),
            _rec("noq2", problem=" <image> \n"), _rec("zero", answer=0)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    res = load_grpo_records(f)
    assert [r.qid for r in res.records] == ["ok", "zero"]  # the number 0 is an answer ("0"), not an empty one
    assert res.counts == {"empty_answer": 2, "empty_problem": 2}
    assert {s.qid for s in res.skipped if s.reason == "empty_answer"} == {"blank", "spaces"}
    report = res.report()
    assert "empty_answer" in report and "index 1 qid=blank" in report and "empty_problem" in report


def test_jsonl_malformed_lines_are_counted_not_fatal(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(_rec("a")), "{not json", "", json.dumps(_rec("b")),
                                            '{"qid": "c", "problem": "<image>"'])
    res = load_grpo_records(f)
    assert [r.qid for r in res.records] == ["a", "b"]
    bad = [s for s in res.skipped if s.reason == "malformed_json"]
    assert [s.location for s in bad] == ["line 2", "line 5"]
    assert res.total == 4


def test_unreadable_files_raise_data_error_naming_file(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('[{"qid": "a",\n "problem": }]')
    with pytest.raises(DataError, match=r"broken\.json.*line 2"):
        load_grpo_records(f)
    g = _write_jsonl(tmp_path / "garbage.jsonl", ["not json", "neither"])
    with pytest.raises(DataError, match=r"garbage\.jsonl.*line 1"):
        load_grpo_records(g)
    with pytest.raises(DataError, match=r"not found.*nope\.json"):
        load_grpo_records(tmp_path / "nope.json")


def test_missing_key_words_defaults_to_empty_and_is_noted(tmp_path):
    d = _rec("a")
    del d["key_words"]
    f = tmp_path / "d.json"
    f.write_text(json.dumps([d, _rec("b")]))
    res = load_grpo_records(f)
    assert res.records[0].key_words == [] and len(res.records) == 2
    assert sum(res.notes.values()) == 1 and "key_words" in res.report()


def test_require_images_checks_files_under_image_root(tmp_path):
    root = tmp_path / "images"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a_0.png").write_bytes(b"x")
    f = tmp_path / "d.json"
    f.write_text(json.dumps([_rec("a"), _rec("b")]))
    res = load_grpo_records(f, image_root=root, require_images=True)
    assert [r.qid for r in res.records] == ["a"]
    (skip,) = res.skipped
    assert (skip.reason, skip.qid) == ("missing_image", "b") and "b_0.png" in skip.detail
    # Without require_images nothing is checked; without image_root paths resolve next to the file.
    assert len(load_grpo_records(f).records) == 2
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b_0.png").write_bytes(b"x")
    assert [r.qid for r in load_grpo_records(f, require_images=True).records] == ["b"]


def test_save_then_load_round_trips_including_extra_keys(tmp_path):
    recs = [GRPORecord("q1", "<image> a?", "\\frac{1}{2}", ["a.png"], ["red"], {"source": "geo3k"}),
            GRPORecord("q2", "<image><image> b?", "x", ["b.png", "c.png"], [])]
    out = save_records(tmp_path / "sub" / "r.json", recs)
    back = load_grpo_records(out)
    assert back.records == recs
    assert json.loads(out.read_text())[0]["source"] == "geo3k"


def test_data_config_is_part_of_root_schema():
    cfg = load_config(None, ["data.eval_file=g.json", "data.max_prompt_length=1024"])
    assert (cfg.data.eval_file, cfg.data.max_prompt_length) == ("g.json", 1024)
    assert cfg.data.image_root is None


def test_images_outside_the_image_root_are_named_skips_unless_allowed(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "img").mkdir(parents=True), outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "img" / "in.png").write_bytes(b"x")
    (root / "img" / "link.png").symlink_to(outside / "secret.png")  # points out of the root
    (root / "img" / "alias.png").symlink_to(root / "img" / "in.png")  # points inside: fine
    recs = [_rec("in", images=["img/in.png"]), _rec("up", images=["../outside/secret.png"]),
            _rec("abs", images=[str(outside / "secret.png")]), _rec("link", images=["img/link.png"]),
            _rec("alias", images=["img/alias.png"]), _rec("dots", images=["img/../img/in.png"])]
    f = root / "d.json"
    f.write_text(json.dumps(recs))
    res = load_grpo_records(f, require_images=True)
    assert [r.qid for r in res.records] == ["in", "alias", "dots"]
    assert res.counts == {"image_outside_root": 3}
    by_qid = {s.qid: s for s in res.skipped}
    assert "../outside/secret.png ->" in by_qid["up"].detail and str(outside / "secret.png") in by_qid["up"].detail
    assert "data.allow_images_outside_root" in by_qid["abs"].detail
    assert "image_outside_root" in res.report() and "qid=link" in res.report()
    allowed = load_grpo_records(f, require_images=True, allow_outside_root=True)
    assert len(allowed.records) == 6 and not allowed.skipped


def test_the_data_section_decides_about_images_outside_the_root(tmp_path):
    from pebr_mega.data.records import load_grpo_file

    (tmp_path / "outside.png").write_bytes(b"x")
    root = tmp_path / "data"
    root.mkdir()
    f = root / "d.json"
    f.write_text(json.dumps([_rec("up", images=["../outside.png"])]))
    cfg = load_config(None, [])
    assert cfg.data.allow_images_outside_root is False
    assert load_grpo_file(f, cfg.data).counts == {"image_outside_root": 1}
    cfg = load_config(None, ["data.allow_images_outside_root=true"])
    assert [r.qid for r in load_grpo_file(f, cfg.data).records] == ["up"]


BOM = "\ufeff"  # what Windows editors put at the start of a UTF-8 file


def test_a_utf8_bom_is_accepted_in_jsonl_and_json_files(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(BOM + json.dumps(_rec("a")) + "\n" + json.dumps(_rec("b")) + "\n", encoding="utf-8")
    res = load_grpo_records(jsonl)
    assert [r.qid for r in res.records] == ["a", "b"] and not res.skipped  # line 1 used to be malformed_json
    pretty = tmp_path / "d.json"
    pretty.write_text(BOM + json.dumps([_rec("a"), _rec("b")], indent=2), encoding="utf-8")
    assert [r.qid for r in load_grpo_records(pretty).records] == ["a", "b"]  # used to be "no usable records"
