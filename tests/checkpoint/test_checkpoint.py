"""HF <-> Megatron conversion: mapping layouts, bit-exact round trips through the tools, loading at other
TP/PP layouts, atomic saves and clear errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pebr_mega.checkpoint.hf_io import HFWeights, atomic_dir
from pebr_mega.checkpoint.hf_mapping import (
    HFMapping,
    canonical_mcore_name,
    merge_tp_shards,
    split_for_tp,
    tp_split_dim,
)
from pebr_mega.errors import CheckpointError
from pebr_mega.models.arch import arch_from_hf_dir

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str, *args) -> subprocess.CompletedProcess:
    return _tools([(name, *args)])[0]


def _tools(calls: list[tuple]) -> list[subprocess.CompletedProcess]:
    """Run tool invocations concurrently (each is one CPU-bound process); results in call order."""
    procs = [(cmd := [sys.executable, str(ROOT / "tools" / c[0]), *map(str, c[1:]), "--quiet"],
              subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for c in calls]
    out = []
    for cmd, p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def _digests(d: Path) -> dict[str, str]:
    """Every file's SHA-256, but the directory's own MANIFEST.json (an export's describes the export)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name != "MANIFEST.json"}


def _hf_state(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# -------------------------------------------------------------------------------------- mapping (pure)
def test_qkv_fusion_is_megatrons_per_group_layout(tiny_model_dir_alt):
    arch = arch_from_hf_dir(tiny_model_dir_alt)  # 6 heads, 3 kv groups, head_dim 16
    m = HFMapping(arch)
    np_, ng, hn, h = 6, 3, 16, 96
    q, k, v = torch.randn(np_ * hn, h), torch.randn(ng * hn, h), torch.randn(ng * hn, h)
    fused = m.hf_to_mcore_tensor("language_model.decoder.layers.0.self_attention.linear_qkv.weight",
                                 {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
                                  "model.layers.0.self_attn.v_proj.weight": v}.__getitem__)
    rows = []  # built row by row: for each group, its query heads, then its key head, then its value head
    for g in range(ng):
        for j in range(np_ // ng):
            rows.append(q[(g * (np_ // ng) + j) * hn:(g * (np_ // ng) + j + 1) * hn])
        rows += [k[g * hn:(g + 1) * hn], v[g * hn:(g + 1) * hn]]
    assert torch.equal(fused, torch.cat(rows))
    back = dict(m.mcore_to_hf_tensors("language_model.decoder.layers.0.self_attention.linear_qkv.weight", fused))
    assert all(torch.equal(back[f"model.layers.0.self_attn.{x}_proj.weight"], t) for x, t in zip("qkv", (q, k, v)))


def test_tp_split_and_merge_are_inverse_and_glu_aware():
    fc1 = "language_model.decoder.layers.1.mlp.linear_fc1.weight"
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    full = torch.cat([gate, up])
    shards = [split_for_tp(fc1, full, 2, r) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))  # each rank: its gate rows, then its up rows
    assert torch.equal(merge_tp_shards(fc1, shards), full)
    proj = "language_model.decoder.layers.1.self_attention.linear_proj.weight"
    w = torch.randn(6, 8)
    assert tp_split_dim(proj) == 1 and torch.equal(merge_tp_shards(proj, [split_for_tp(proj, w, 4, r) for r in range(4)]), w)
    assert tp_split_dim("language_model.embedding.word_embeddings.weight") == 0
    assert tp_split_dim("language_model.decoder.layers.0.input_layernorm.weight") is None
    assert tp_split_dim("vision_model.blocks.0.attn.qkv.weight") is None
    assert canonical_mcore_name("module.language_model.decoder.layers.2.self_attention.linear_qkv.layer_norm_weight") \
        == "language_model.decoder.layers.2.input_layernorm.weight"
    assert tp_split_dim("language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight") is None


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_model_dir_alt"])
def test_state_mapping_round_trip_is_bit_exact(request, which):
    d = request.getfixturevalue(which)
    hf = _hf_state(d)
    m = HFMapping(arch_from_hf_dir(d))
    back = m.mcore_to_hf_state(m.hf_to_mcore_state(hf))
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) and back[k].dtype == hf[k].dtype for k in hf)
    # transformers 5 in-memory names are accepted as input too
    renamed = {("model.language_model." + k[6:]) if k.startswith("model.") else ("model." + k if k.startswith("visual.") else k): v
               for k, v in hf.items()}
    assert set(m.mcore_to_hf_state(m.hf_to_mcore_state(renamed))) == set(hf)


def test_mapping_errors_name_the_tensor(tiny_model_dir):
    hf = _hf_state(tiny_model_dir)
    m = HFMapping(arch_from_hf_dir(tiny_model_dir))
    bad = dict(hf)
    bad["model.layers.1.self_attn.k_proj.weight"] = bad["model.layers.1.self_attn.k_proj.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        m.hf_to_mcore_state(bad)
    missing = {k: v for k, v in hf.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        m.hf_to_mcore_state(missing)
    extra = dict(hf, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not use"):
        m.hf_to_mcore_state(extra)


def test_bad_directories_are_checkpoint_errors(tmp_path, tiny_model_dir):
    with pytest.raises(CheckpointError, match="not found"):
        arch_from_hf_dir(tmp_path / "nope")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"config\.json.*not Qwen2\.5-VL"):
        arch_from_hf_dir(tmp_path / "llama")
    (tmp_path / "noweights").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "noweights")
    with pytest.raises(CheckpointError, match="no \\*\\.safetensors"):
        HFWeights(tmp_path / "noweights")


def test_atomic_dir_keeps_the_old_directory_on_a_crash(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("half-written")
            raise RuntimeError("crash mid-save")
    assert (final / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    with atomic_dir(final) as d:
        (d / "b.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["b.txt"]


# ---------------------------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_model_dir, tiny_model_dir_alt):
    """Both tiny models converted to Megatron checkpoints by tools/convert_hf_to_mcore.py."""
    root = tmp_path_factory.mktemp("mcore")
    out = {"tiny": root / "tiny", "alt": root / "alt"}
    for r in _tools([("convert_hf_to_mcore.py", "--hf-dir", d, "--out", out[n])
                     for n, d in (("tiny", tiny_model_dir), ("alt", tiny_model_dir_alt))]):
        assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """Both converted checkpoints exported back by tools/export_to_hf.py, without --hf-template."""
    root = tmp_path_factory.mktemp("hf_back")
    for r in _tools([("export_to_hf.py", "--mcore-dir", ckpt, "--out", root / name) for name, ckpt in converted.items()]):
        assert r.returncode == 0, r.stderr[-3000:]
    return {name: root / name for name in converted}


@pytest.mark.parametrize("name,which", [("tiny", "tiny_model_dir"), ("alt", "tiny_model_dir_alt")])
def test_hf_to_megatron_to_hf_is_bit_exact(request, exported, name, which):
    src = request.getfixturevalue(which)
    a, b = _hf_state(src), _hf_state(exported[name])
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _digests(src) == _digests(exported[name])  # weights file and every non-weight file, byte for byte
    if name == "alt":
        assert not any(k.startswith("lm_head") for k in b)  # tied: still no lm_head tensor


def test_exported_directory_loads_in_transformers(exported, tiny_model_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = exported["tiny"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|image_pad|>" in tok.get_vocab()
    assert AutoImageProcessor.from_pretrained(out).merge_size == 2
    assert GenerationConfig.from_pretrained(out).eos_token_id == GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id


def test_tools_report_bad_input_in_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.2.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r, r2 = _tools([("convert_hf_to_mcore.py", "--hf-dir", bad, "--out", tmp_path / "out"),
                    ("export_to_hf.py", "--mcore-dir", tmp_path / "missing", "--out", tmp_path / "out2")])
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "model.layers.2.mlp.up_proj.weight" in last and "shape" in last and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert r2.returncode == 2 and "not found" in r2.stderr.strip().splitlines()[-1]


def _tool_main(name: str):
    """The `main` of tools/<name>, imported in this process (for checks that fail before any conversion)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name[:-3]}", ROOT / "tools" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_tools_never_destroy_their_source_or_a_full_out(tmp_path, converted, tiny_model_dir, capsys):
    """Issue 12, item 1: --out equal to, inside or holding the source, and a non-empty --out without --overwrite."""
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    shutil.copytree(converted["tiny"], mcore)
    shutil.copytree(tiny_model_dir, hf)
    before = {d: _digests(d) for d in (mcore, hf)}
    export, convert = _tool_main("export_to_hf.py"), _tool_main("convert_hf_to_mcore.py")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        for out in (mcore, mcore / "hf", tmp_path):
            assert export(["--mcore-dir", str(mcore), "--out", str(out), "--quiet", *flags]) == 2
            assert "replacing it would destroy the source" in capsys.readouterr().err
        for out in (hf, hf / "mcore", tmp_path):
            assert convert(["--hf-dir", str(hf), "--out", str(out), "--quiet", *flags]) == 2
            assert "replacing it would destroy the source" in capsys.readouterr().err
    assert export(["--mcore-dir", str(mcore), "--out", str(user), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert convert(["--hf-dir", str(hf), "--out", str(user), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert {d: _digests(d) for d in (mcore, hf)} == before and (user / "notes.txt").read_text() == "keep me"
    # With --overwrite, a non-empty --out is replaced by the export, written beside it and renamed into place.
    r = _tool("export_to_hf.py", "--mcore-dir", mcore, "--out", user, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(user) == _digests(tiny_model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mcore", "user"]  # no temporary left behind


# ------------------------------------------------------------------------- loading at other layouts
def _layout_worker(rank, tiny, tiny_ckpt, alt, alt_ckpt, tp2_out, inputs_tiny, inputs_alt):
    from megatron.core import parallel_state as mpu

    from pebr_mega.checkpoint.compare import megatron_logits
    from pebr_mega.checkpoint.dist import load_checkpoint, read_meta, save_checkpoint
    from pebr_mega.models.arch import arch_from_hf_dir
    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.qwen25_vl import build_model
    from pebr_mega.parallel.groups import init_parallel

    def build(hf_dir, tp, pp):
        cfg = ModelConfig(spec="torch", tp=tp, pp=pp, params_dtype="float32")
        return build_model(arch_from_hf_dir(hf_dir), cfg, mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()).eval()

    tin = {k: torch.as_tensor(v) for k, v in inputs_tiny.items()}
    ain = {k: torch.as_tensor(v) for k, v in inputs_alt.items()}
    out = {}
    init_parallel(2, 1)  # the TP=1-converted checkpoint loads at TP=2 ...
    model = build(tiny, 2, 1)
    load_checkpoint(model, tiny_ckpt)
    out["tp2_logits"] = megatron_logits(model, tin)
    save_checkpoint(model, tp2_out, {k: v for k, v in read_meta(tiny_ckpt).items() if k not in ("saved_tp", "saved_pp")},
                    template_dir=Path(tiny_ckpt) / "hf_template")
    init_parallel(1, 1)  # ... and a checkpoint saved at TP=2 loads at TP=1
    model = build(tiny, 1, 1)
    load_checkpoint(model, tp2_out)
    out["tp1_from_tp2_logits"] = megatron_logits(model, tin)
    init_parallel(1, 2)  # the tied model at PP=2 (its output layer copy on the last stage is filled too)
    model = build(alt, 1, 2)
    load_checkpoint(model, alt_ckpt)
    out["pp2_alt_logits"] = megatron_logits(model, ain)
    out["tp2_meta"] = read_meta(tp2_out)
    return out


@pytest.fixture(scope="module")
def layouts(converted, tiny_model_dir, tiny_model_dir_alt, tmp_path_factory):
    from pebr_mega.checkpoint.compare import hf_logits, sample_inputs
    from pebr_mega.parallel.launch import spawn

    tin, ain = sample_inputs(tiny_model_dir, seed=3), sample_inputs(tiny_model_dir_alt, seed=4, size=(112, 84))
    tp2 = tmp_path_factory.mktemp("tp2") / "ckpt"
    res = spawn(_layout_worker, 2, str(tiny_model_dir), str(converted["tiny"]), str(tiny_model_dir_alt),
                str(converted["alt"]), str(tp2), {k: v.numpy() for k, v in tin.items()}, {k: v.numpy() for k, v in ain.items()})
    return {"res": res, "tp2": tp2, "ref_tiny": hf_logits(tiny_model_dir, tin), "ref_alt": hf_logits(tiny_model_dir_alt, ain)}


def test_converted_checkpoint_loads_at_tp2_and_pp2(layouts):
    res = layouts["res"]
    assert float((torch.as_tensor(res[0]["tp2_logits"]) - layouts["ref_tiny"]).abs().max()) < 1e-4
    assert res[0]["pp2_alt_logits"] is None  # first stage: no logits
    assert float((torch.as_tensor(res[1]["pp2_alt_logits"]) - layouts["ref_alt"]).abs().max()) < 1e-4


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_logits(layouts):
    res = layouts["res"]
    tp2, tp1 = torch.as_tensor(res[0]["tp2_logits"]), torch.as_tensor(res[0]["tp1_from_tp2_logits"])
    assert float((tp1 - tp2).abs().max()) < 1e-5
    assert float((tp1 - layouts["ref_tiny"]).abs().max()) < 1e-4
    assert np.array_equal(res[0]["tp1_from_tp2_logits"], res[1]["tp1_from_tp2_logits"])
    assert res[0]["tp2_meta"]["saved_tp"] == 2


def test_checkpoint_saved_at_tp2_exports_bit_exact(layouts, tmp_path, tiny_model_dir):
    r = _tool("export_to_hf.py", "--mcore-dir", layouts["tp2"], "--out", tmp_path / "hf", "--hf-template", tiny_model_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(tmp_path / "hf") == _digests(tiny_model_dir)
    a, b = _hf_state(tiny_model_dir), _hf_state(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_checkpoint_with_a_stored_lm_head(tiny_model_dir_alt):
    hf = _hf_state(tiny_model_dir_alt)
    m = HFMapping(arch_from_hf_dir(tiny_model_dir_alt))
    with_head = dict(hf, **{"lm_head.weight": hf["model.embed_tokens.weight"].clone()})
    assert set(m.hf_to_mcore_state(with_head)) == set(m.hf_to_mcore_state(hf))  # accepted, nothing extra
    with_head["lm_head.weight"] = with_head["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        m.hf_to_mcore_state(with_head)
