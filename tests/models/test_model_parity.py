"""Megatron Qwen2.5-VL vs transformers on image+text input: logits, gradients, packing, at TP/PP 1 and 2.

One launch of two gloo ranks (CPU) runs every layout in turn and reports back; the tests below check the
pieces. References are computed here with transformers' Qwen2_5_VLForConditionalGeneration in float32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pebr_mega.parallel.launch import spawn
from helpers import build_parity_model, hf_parity_reference, make_parity_batch, model_inputs, vision_grads

pytestmark = pytest.mark.slow
LOGIT_TOL = 1e-4


# ------------------------------------------------------------------------------------------------ inputs


# ----------------------------------------------------------------------------------------------- workers


def _schedule(model, batch, forward_only):
    """One micro-batch through Megatron's schedule; returns per-token losses (last stage) or logits."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mask = batch["attention_mask"].float()
    inputs = model_inputs(getattr(model, "module", model), batch, with_labels=not forward_only)
    out_store = {}

    def step(it, m):
        mb = next(it)
        out = m(**mb, runtime_gather_output=True)

        def loss_fn(o, non_loss_data=False):
            if forward_only:
                return o.detach()
            out_store["token_loss"] = o.detach()
            return (o * mask).sum(), {"loss": (o * mask).sum().detach()}

        return out, loss_fn

    got = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([inputs]), model=[model],
                                      num_microbatches=1, seq_length=inputs["input_ids"].shape[1],
                                      micro_batch_size=inputs["input_ids"].shape[0], forward_only=forward_only,
                                      collect_non_loss_data=forward_only)
    return got[0] if forward_only and got else out_store.get("token_loss")


def _packed_vs_padded(model, batch):
    """Per-token losses and logits of the padded batch and of the same samples packed into one row by the
    actor's packer (with its trailing padding segment), and the target-only hidden states."""
    from pebr_mega.actor.packing import ActorSequence, pack
    from pebr_mega.models.packing import packed_seq_params
    from pebr_mega.models.rope_index import get_rope_index

    arch = model.arch
    mask = batch["attention_mask"].bool()
    grids = list(torch.split(batch["image_grid_thw"], batch["images_per_row"].tolist()))
    pixels = list(torch.split(batch["pixel_values"], [int(g.prod(-1).sum()) for g in grids]))
    seqs = [ActorSequence(r[m].tolist(), [0] * int(m.sum()), px if len(g) else None, g if len(g) else None)
            for r, m, px, g in zip(batch["input_ids"], mask, pixels, grids)]

    def positions(ids, grid):
        return get_rope_index(torch.tensor([ids]), grid, image_token_id=arch.image_token_id,
                              spatial_merge_size=arch.vision.spatial_merge_size)[0][:, 0]

    # a multiple 5 tokens above the total forces a 5-token trailing pad segment
    mb = pack(seqs, positions, multiple=int(mask.sum()) + 5)
    labels = torch.cat([r[m] for r, m in zip(batch["labels"], mask)] + [torch.zeros(mb.pad, dtype=torch.long)])[None]
    packed = {"input_ids": mb.input_ids, "position_ids": mb.position_ids, "pixel_values": mb.pixel_values,
              "image_grid_thw": mb.image_grid_thw, "packed_seq_params": packed_seq_params(mb.lengths, "torch", "cpu")}
    n_valid = int(mask.sum())
    rows = torch.arange(0, n_valid, 7)  # some positions of every sample, as target_index
    with torch.no_grad():
        padded = model_inputs(model, batch, with_labels=True)
        padded_loss = model(**padded)
        padded_logits = model(**{k: v for k, v in padded.items() if k != "labels"}, runtime_gather_output=True)
        packed_loss = model(**packed, labels=labels)
        packed_logits = model(**packed, runtime_gather_output=True)
        hidden = model(**packed, target_index=rows)
        target_logits = torch.nn.functional.linear(hidden, model.output_weight())
    cu = torch.tensor([0, *mb.lengths]).cumsum(0)
    return {"padded_loss": padded_loss[mask], "packed_loss": packed_loss[0, :n_valid],
            "padded_logits": padded_logits[mask], "packed_logits": packed_logits[0, :n_valid],
            "target_logits": target_logits, "target_rows": rows,
            "pad": mb.pad, "rows": int(mb.input_ids.shape[1]),
            "first_positions": [int(mb.position_ids[0, 0, s]) for s in cu[:-1].tolist()]}


def _parity_worker(rank, tiny, alt, batch_tiny, batch_alt):
    from megatron.core import parallel_state as mpu

    from pebr_mega.parallel.groups import init_parallel

    batches = {"tiny": {k: torch.as_tensor(v) for k, v in batch_tiny.items()},
               "alt": {k: torch.as_tensor(v) for k, v in batch_alt.items()}}
    dirs = {"tiny": tiny, "alt": alt}
    out = {}

    # Layout 1: TP=1, PP=1 (two data-parallel replicas): rank 0 checks the tiny model, rank 1 the tied one.
    init_parallel(1, 1)
    name = "tiny" if rank == 0 else "alt"
    b = batches[name]
    for spec in ("torch", "local"):
        model = build_parity_model(dirs[name], 1, 1, spec).eval()
        with torch.no_grad():
            out[f"tp1_{spec}_{name}_logits"] = model(**model_inputs(model, b), runtime_gather_output=True)
    model = build_parity_model(dirs[name], 1, 1)
    out[f"packing_{name}"] = _packed_vs_padded(model.eval(), b)
    model.train()
    loss = (model(**model_inputs(model, b, with_labels=True)) * b["attention_mask"]).sum()
    loss.backward()
    out[f"tp1_{name}_vision_grads"] = vision_grads(model)

    # Layout 2: TP=2 on the tiny model, wrapped in Megatron's DDP so finalize_model_grads does the TP averaging.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    init_parallel(2, 1)
    model = build_parity_model(tiny, 2, 1).eval()
    out["tp2_tiny_logits"] = _schedule(model, batches["tiny"], forward_only=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model.train())
    ddp.zero_grad_buffer()
    _schedule(ddp, batches["tiny"], forward_only=False)
    finalize_model_grads([ddp])
    out["tp2_tiny_vision_grads"] = vision_grads(model)
    out["tp_rank"] = mpu.get_tensor_model_parallel_rank()

    # Layout 3: PP=2 through the pipeline schedule, both models (alt has 3 layers: an uneven 1 + 2 split).
    init_parallel(1, 2)
    for name in ("tiny", "alt"):
        model = build_parity_model(dirs[name], 1, 2).eval()
        out[f"pp2_{name}_logits"] = _schedule(model, batches[name], forward_only=True)
        model.train()
        _schedule(model, batches[name], forward_only=False)
        out[f"pp2_{name}_vision_grads"] = vision_grads(model)
    out["pp_rank"] = mpu.get_pipeline_model_parallel_rank()
    return out


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def parity_logits(tiny_model_dir, tiny_model_dir_alt):
    """(the input batches, transformers' logits and gradients on them, Megatron's per rank and layout)."""
    batches = {"tiny": make_parity_batch(tiny_model_dir, 0), "alt": make_parity_batch(tiny_model_dir_alt, 1)}
    refs = {"tiny": hf_parity_reference(tiny_model_dir, batches["tiny"]), "alt": hf_parity_reference(tiny_model_dir_alt, batches["alt"])}
    plain = {k: {n: t.numpy() for n, t in b.items()} for k, b in batches.items()}
    results = spawn(_parity_worker, 2, str(tiny_model_dir), str(tiny_model_dir_alt), plain["tiny"], plain["alt"])
    return batches, refs, results


def _max_diff_on_valid(ref, out, mask):
    return float((ref - torch.as_tensor(out))[mask.bool()].abs().max())


@pytest.mark.parametrize("spec", ["torch", "local"])
@pytest.mark.parametrize("name,rank", [("tiny", 0), ("alt", 1)])
def test_tp1_logits_match_transformers(parity_logits, name, rank, spec):
    batches, refs, results = parity_logits
    diff = _max_diff_on_valid(refs[name]["logits"], results[rank][f"tp1_{spec}_{name}_logits"], batches[name]["attention_mask"])
    assert diff < LOGIT_TOL, f"{name} {spec}: max |logit diff| {diff:.2e}"


def test_tp2_logits_match_transformers(parity_logits):
    batches, refs, results = parity_logits
    r0 = next(r for r in results if r["tp_rank"] == 0)
    diff = _max_diff_on_valid(refs["tiny"]["logits"], r0["tp2_tiny_logits"], batches["tiny"]["attention_mask"])
    assert diff < LOGIT_TOL, f"TP=2 max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("name", ["tiny", "alt"])
def test_pp2_logits_match_transformers(parity_logits, name):
    batches, refs, results = parity_logits
    last = next(r for r in results if r["pp_rank"] == 1)
    diff = _max_diff_on_valid(refs[name]["logits"], last[f"pp2_{name}_logits"], batches[name]["attention_mask"])
    assert diff < LOGIT_TOL, f"PP=2 {name}: max |logit diff| {diff:.2e}"


def _assert_grads_close(ref: dict, got: dict, what: str):
    assert set(ref) == set(got), what
    for k, g in ref.items():
        mine = torch.as_tensor(got[k])
        assert float(g.abs().max()) > 0, f"{what}: reference grad of {k} is zero"
        err = float((mine - g).abs().max()) / float(g.abs().max())
        assert err < 1e-4, f"{what}: {k} relative grad error {err:.2e}"


@pytest.mark.parametrize("name,rank", [("tiny", 0), ("alt", 1)])
def test_gradients_reach_the_vision_tower(parity_logits, name, rank):
    _, refs, results = parity_logits
    _assert_grads_close(refs[name]["vision_grads"], results[rank][f"tp1_{name}_vision_grads"], f"TP=1 {name}")


def test_tp2_vision_grads_equal_on_both_ranks_after_finalize(parity_logits):
    _, refs, results = parity_logits
    for r in results:
        _assert_grads_close(refs["tiny"]["vision_grads"], r["tp2_tiny_vision_grads"], f"TP=2 rank {r['tp_rank']}")


@pytest.mark.parametrize("name", ["tiny", "alt"])
def test_pp2_vision_grads_through_the_schedule(parity_logits, name):
    _, refs, results = parity_logits
    first = next(r for r in results if r["pp_rank"] == 0)
    assert next(r for r in results if r["pp_rank"] == 1)[f"pp2_{name}_vision_grads"] is None  # tower on stage 0 only
    _assert_grads_close(refs[name]["vision_grads"], first[f"pp2_{name}_vision_grads"], f"PP=2 {name}")


@pytest.mark.parametrize("name,rank", [("tiny", 0), ("alt", 1)])
def test_packed_equals_padded(parity_logits, name, rank):
    batches, refs, results = parity_logits
    p = results[rank][f"packing_{name}"]
    n_valid = int(batches[name]["attention_mask"].sum())
    assert p["packed_loss"].shape == (n_valid,) and p["padded_loss"].shape == (n_valid,)
    assert p["pad"] == 5 and p["rows"] == n_valid + 5
    assert p["first_positions"] == [0] * len(p["first_positions"])  # positions restart per sample (and padding)
    assert np.abs(p["packed_loss"] - p["padded_loss"]).max() < 1e-5
    assert np.abs(p["packed_logits"] - p["padded_logits"]).max() < LOGIT_TOL
    # the output layer applied to the target positions' hidden states only: the same logits
    assert np.abs(p["target_logits"] - p["packed_logits"][p["target_rows"]]).max() < 1e-5
    # and both equal transformers on the valid tokens
    ref = refs[name]["logits"][batches[name]["attention_mask"].bool()]
    assert float((torch.as_tensor(p["packed_logits"]) - ref).abs().max()) < LOGIT_TOL
