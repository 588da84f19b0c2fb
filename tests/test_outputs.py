"""pebr_mega.outputs: outputs are checked against inputs and against files pebr did not write."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pebr_mega.errors import OutputError
from pebr_mega.outputs import (MARKER, check_replace_dir, claim_output_dir, claim_output_file, plot_path,
                               written_by_pebr)


def test_file_equal_to_an_input_is_refused_by_path_link_and_hard_link(tmp_path):
    data = tmp_path / "data.json"
    data.write_text("[1]")
    with pytest.raises(OutputError, match=r"data.json is also an input"):
        claim_output_file(data, [data])
    with pytest.raises(OutputError, match="is also an input"):
        claim_output_file(tmp_path / "sub" / ".." / "data.json", [data])  # same file, spelled differently
    (tmp_path / "link.json").symlink_to(data)
    with pytest.raises(OutputError, match="is also an input"):
        claim_output_file(tmp_path / "link.json", [data])
    os.link(data, tmp_path / "hard.json")
    with pytest.raises(OutputError, match="is also an input"):
        claim_output_file(tmp_path / "hard.json", [data])
    assert data.read_text() == "[1]"


def test_existing_file_not_written_by_pebr_is_refused_and_own_outputs_are_rewritable(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text("user data")
    with pytest.raises(OutputError, match=r"notes.json already exists and was not written by pebr"):
        claim_output_file(mine)
    (tmp_path / "empty.json").write_text("")
    claim_output_file(tmp_path / "empty.json")  # an empty file holds nothing to lose
    out = tmp_path / "new" / "results.jsonl"
    claim_output_file(out)
    assert out.parent.is_dir() and written_by_pebr(out)
    out.write_text("first run")
    claim_output_file(out)  # a re-run into its own output proceeds
    with pytest.raises(OutputError, match="is a directory"):
        claim_output_file(tmp_path)


def test_directory_claims(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "grpo.json").write_text("[]")
    with pytest.raises(OutputError, match=r"user already exists, is not empty and was not created by pebr"):
        claim_output_dir(user)
    assert not (user / MARKER).exists()
    run = claim_output_dir(tmp_path / "run")
    (run / "metrics.jsonl").write_text("{}")
    claim_output_dir(run)  # pebr's own directory: a re-run proceeds
    assert written_by_pebr(run / "metrics.jsonl")  # files inside a pebr directory are pebr's to rewrite
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_output_dir(empty)
    with pytest.raises(OutputError, match="is a file"):
        claim_output_dir(user / "grpo.json")


def test_ranks_claiming_one_directory_at_once_do_not_refuse_each_other(tmp_path, monkeypatch):
    """The ranks of a job claim run.output_dir together: one may look while another's marker is still its
    temporary (write_bytes_atomic). Seen twice in CI (`pebr train`, then `pebr sft`, under torchrun at 2 ranks):
    a rank refused its own job's new directory as "not created by pebr". The first fix matched a made-up temporary
    name; here the other rank claims from inside the real write, between the temporary and its rename."""
    import pebr_mega.outputs as outputs

    out = tmp_path / "run"
    real_replace = os.replace
    seen: list[list[str]] = []

    def replace_while_another_rank_claims(src, dst):
        if Path(dst).name == MARKER and not seen:
            seen.append(sorted(p.name for p in out.iterdir()))
            claim_output_dir(out)  # the other rank, while this rank's marker is only its temporary
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace_while_another_rank_claims)
    claim_output_dir(out)
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert seen and any(n != MARKER and MARKER in n for n in seen[0]), seen  # the claim ran mid-write
    assert written_by_pebr(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # no temporary left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / seen[0][0]).write_text("{")  # a marker temporary is bookkeeping; anything beside it is not
    (other / "notes.txt.tmp").write_text("mine")
    with pytest.raises(OutputError, match="not created by pebr"):
        claim_output_dir(other)


def test_directory_is_refused_when_it_is_inside_an_input_or_would_overwrite_one(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(OutputError, match="is or lies inside the input"):
        claim_output_dir(model, [model])
    with pytest.raises(OutputError, match="is or lies inside the input"):
        claim_output_dir(model / "run", [model])
    run = claim_output_dir(tmp_path / "run")
    (run / "hf").mkdir()
    with pytest.raises(OutputError, match=r"the input .*hf would be overwritten by .*hf"):
        claim_output_dir(run, [run / "hf"], writes=["hf", "metrics.jsonl"])
    claim_output_dir(run, [tmp_path / "data.json"], writes=["hf"])  # unrelated inputs are fine


def test_replacing_a_whole_directory(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "w").write_text("weights")
    for bad in (src, src / "inner", tmp_path):  # is, lies inside, holds the source
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="the source"):
                check_replace_dir(bad, [src], overwrite=overwrite)
    check_replace_dir(out, [src])  # absent
    out.mkdir()
    check_replace_dir(out, [src])  # empty
    (out / "x").write_text("old")
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_replace_dir(out, [src])
    check_replace_dir(out, [src], overwrite=True)


def test_plot_path(tmp_path):
    assert plot_path(None, tmp_path / "run" / "curves.png") == tmp_path / "run" / "curves.png"
    assert plot_path(tmp_path, "x") == tmp_path / "curves.png"
    assert plot_path(f"{tmp_path}/new/", "x") == tmp_path / "new" / "curves.png"
    assert plot_path(tmp_path / "a.png", "x") == tmp_path / "a.png"


def test_marker_is_not_copied_into_exported_model_directories(tmp_path):
    from pebr_mega.checkpoint.hf_io import copy_aux_files

    src = claim_output_dir(tmp_path / "model")
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    dst = tmp_path / "copy"
    dst.mkdir()
    assert copy_aux_files(src, dst) == ["config.json"] and not (dst / MARKER).exists()


def test_atomic_writes_leave_no_temporary_and_keep_the_old_file_on_failure(tmp_path, monkeypatch):
    """`write_bytes_atomic` (every small atomic write of the package): the new content whole, no temporary
    left; a write that fails midway leaves the old file as it was and removes its temporary."""
    import os

    from pebr_mega.outputs import write_bytes_atomic, write_text_atomic

    target = tmp_path / "state.json"
    write_text_atomic(target, "old\n")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    write_bytes_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n" and len(synced) == 2  # the file, then its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "half")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_one_file_hash_reads_in_blocks_and_matches_hashlib(tmp_path):
    """outputs.file_sha256 is the package's one file hash (checkpoint manifests, run fingerprints): the same
    digest as hashing the whole bytes, whatever the block size."""
    import hashlib
    import random

    from pebr_mega.checkpoint.manifest import _sha256
    from pebr_mega.outputs import file_sha256
    from pebr_mega.run.fingerprint import file_sha256 as fingerprint_sha256

    data = random.Random(0).randbytes(70_001)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert {file_sha256(path, chunk) for chunk in (1, 4096, 65536, 1 << 20)} == {want}
    assert _sha256(path) == fingerprint_sha256(path) == want


def test_a_streamed_file_appears_whole_or_not_at_all(tmp_path):
    """outputs.atomic_text_file (sampled rollouts are streamed through it): the old content stays until the block
    ends without an error, and no temporary is left either way."""
    from pebr_mega.outputs import atomic_text_file

    out = tmp_path / "rollouts.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_text_file(out) as f:
            f.write("half a line")
            raise RuntimeError("killed mid-write")
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl"]
    with atomic_text_file(out) as f:
        f.write('{"qid": "q0"}\n')
        assert out.read_text() == "old\n"  # not in place before the block ends
    assert out.read_text() == '{"qid": "q0"}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl"]
