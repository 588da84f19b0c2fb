"""`pebr merge-sft`: two SFT files with their own image folders become one file whose image paths resolve from
one image root (the folder holding both image folders), inside it as the SFT reader requires; nothing is
dropped."""
from __future__ import annotations

import json

from PIL import Image

from pebr_mega.cli import main
from pebr_mega.data.sft_records import resolve_sft_source, to_conversation
from pebr_mega.data.records import read_json_items


def _record(*images: str) -> dict:
    return {"messages": [{"role": "user", "content": "<image>" * len(images) + "What is it?"},
                         {"role": "assistant", "content": "A square."}], "images": list(images)}


def test_merged_file_keeps_every_record_and_its_images_resolve_from_the_output_folder(tmp_path, capsys):
    (tmp_path / "mulberry" / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "pebr" / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "mulberry" / "imgs" / "sub" / "a.png")
    Image.new("RGB", (30, 40), (0, 200, 0)).save(tmp_path / "pebr" / "images" / "b.png")
    (tmp_path / "mulberry" / "filtered.json").write_text(json.dumps([_record("sub/a.png"), _record()]))
    (tmp_path / "pebr" / "sft.jsonl").write_text(json.dumps(_record("b.png")) + "\n{broken\n"
                                                 + json.dumps(_record("gone.png")) + "\n")
    out = tmp_path / "dataset" / "sft" / "pebr_sft.json"
    assert main(["merge-sft", "--input", str(tmp_path / "mulberry" / "filtered.json"), str(tmp_path / "mulberry" / "imgs"),
                 "--input", str(tmp_path / "pebr" / "sft.jsonl"), str(tmp_path / "pebr" / "images"),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 records" in printed and "1 image(s) not found (first: gone.png)" in printed
    assert "{'malformed_json': 1}" in printed and f"wrote {out} (4 records)" in printed
    root = tmp_path.resolve()  # the deepest folder holding mulberry/imgs and pebr/images
    assert f"train with sft.image_root={root}" in printed

    items, bad = read_json_items(out)
    assert len(items) == 4 and not bad
    path, columns = resolve_sft_source(str(out), "", "")
    # Read as the SFT run reads them (images outside the root refused): every path lies inside the root.
    convs = [to_conversation(item.value, columns, root, item.location) for item in items]
    # Text unchanged, order kept; each image opens from the output's folder and is the original file.
    assert [c.messages for c in convs] == [to_conversation(r, None, tmp_path, "x").messages
                                           for r in (_record("sub/a.png"), _record(), _record("b.png"),
                                                     _record("gone.png"))]
    assert Image.open(convs[0].images[0]).size == (40, 30) and Image.open(convs[2].images[0]).size == (30, 40)
    assert convs[1].images == [] and not (root / json.loads(out.read_text())[3]["images"][0]).exists()
    assert json.loads(out.read_text())[0]["images"] == ["mulberry/imgs/sub/a.png"]


def test_merge_refuses_to_write_over_an_input(tmp_path, capsys):
    src = tmp_path / "sft.json"
    src.write_text(json.dumps([_record()]))
    assert main(["merge-sft", "--input", str(src), str(tmp_path), "--output", str(src)]) == 2
    assert json.loads(src.read_text()) == [_record()]


def test_an_image_folder_outside_the_given_root_is_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "sft.json").write_text(json.dumps([_record()]))
    assert main(["merge-sft", "--input", str(tmp_path / "a" / "sft.json"), str(tmp_path / "a"),
                 "--output", str(tmp_path / "out.json"), "--image-root", str(tmp_path / "b")]) == 2
    assert f"image folder {(tmp_path / 'a').resolve()} is not inside --image-root" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
