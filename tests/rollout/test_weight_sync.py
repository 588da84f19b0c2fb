"""Weight sync: Megatron TP/PP shards -> HF-named tensors -> buckets -> the rollout engine.

`iter_hf_tensors` must produce, at TP=2 and at PP=2 (the tied model, layers split 1 + 2), exactly the
tensors of the original HF checkpoint before training, and exactly what `export_mcore_to_hf` (the function
`tools/export_to_hf.py` runs) writes for the same weights after a training step. A sync into the HF rollout
engine must leave it generating exactly what transformers generates from the exported directory.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pebr_mega.parallel.launch import spawn
from pebr_mega.rollout.weight_sync import SyncStats, bucketize
from helpers import OPT, actor_sequences, add_grpo_inputs, make_sequences, solo_world

pytestmark = pytest.mark.slow

BUCKET_MB = 1  # the tiny model's ~4 MB go in several buckets
SEED = 11


def _requests(seqs_plain) -> list:
    from pebr_mega.rollout.types import RolloutRequest

    out = []
    for i, s in enumerate(seqs_plain[:3]):
        n_prompt = s["target_mask"].index(1)
        out.append(RolloutRequest(record_id=f"q{i}", prompt_ids=s["input_ids"][:n_prompt],
                                  pixel_values=None if s["pixel_values"] is None else torch.as_tensor(s["pixel_values"]),
                                  image_grid_thw=None if s["image_grid_thw"] is None else torch.as_tensor(s["image_grid_thw"])))
    return out


def _sampling(tok_eos: int):
    from pebr_mega.rollout.types import SamplingParams

    return SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, stop_token_ids=[tok_eos], seed=SEED)


def _actor(path, tp: int, pp: int):
    from pebr_mega.actor.config import ActorConfig
    from pebr_mega.actor.megatron_actor import build_actor
    from pebr_mega.models.config import ModelConfig

    mc = ModelConfig(spec="torch", tp=tp, pp=pp, params_dtype="float32")
    return build_actor(path, mc, ActorConfig(micro_batch_tokens=200, kernels="torch", **OPT), total_updates=4)


def _hf_tensors(actor, keep: bool) -> dict | None:
    """Every (name, tensor) pair `iter_hf_tensors` yields (collective; only `keep` ranks return them)."""
    from pebr_mega.checkpoint.hf_mapping import HFMapping
    from pebr_mega.checkpoint.gather import iter_hf_tensors

    pairs = [(n, t.clone()) for n, t in iter_hf_tensors(actor.module, HFMapping(actor.arch))]
    assert len({n for n, _ in pairs}) == len(pairs), "a name came twice"
    return dict(pairs) if keep else None


def _train_and_save(actor, seqs, ckpt: str, keep: bool) -> dict:
    from pebr_mega.actor.megatron_actor import LossSpec
    from pebr_mega.algo.grpo import AlgoConfig

    before = _hf_tensors(actor, keep)
    metrics = actor.train_step(seqs, LossSpec("grpo", AlgoConfig(), 1.0))
    assert metrics["skipped"] == 0.0
    after = _hf_tensors(actor, keep)
    actor.save(ckpt)
    return {"before": before, "after": after}


def _sync_worker(rank, tiny, alt, seqs_plain, alt_plain, root):
    from pebr_mega.checkpoint.convert import export_mcore_to_hf
    from pebr_mega.checkpoint.hf_mapping import HFMapping
    from pebr_mega.parallel.groups import destroy_parallel, init_parallel
    from pebr_mega.rollout.hf_engine import HFRolloutEngine
    from pebr_mega.rollout.weight_sync import sync_weights

    torch.set_num_threads(1)
    keep = rank == 0
    out = {}

    init_parallel(2, 1)
    actor = _actor(tiny, 2, 1)
    out["tp2"] = _train_and_save(actor, actor_sequences(seqs_plain), f"{root}/tp2", keep)
    engine = HFRolloutEngine.from_pretrained(tiny) if rank == 0 else None
    stats = sync_weights(actor.module, HFMapping(actor.arch), engine, bucket_mb=BUCKET_MB)
    out["stats"] = stats.__dict__
    if engine is not None:
        state = {n: t for n, t in engine.model.state_dict().items()}
        from pebr_mega.checkpoint.hf_mapping import normalize_hf_name

        out["engine_weights"] = {normalize_hf_name(n): t.clone() for n, t in state.items()}
        out["synced_ids"] = [s.response_ids for s in engine.generate(_requests(seqs_plain), _sampling(engine.tokenizer.eos_token_id))]

    init_parallel(1, 2)
    out["pp2"] = _train_and_save(_actor(alt, 1, 2), actor_sequences(alt_plain), f"{root}/pp2", keep)
    destroy_parallel(process_group=True)

    solo_world()  # each rank exports one checkpoint in a one-rank world, as the export tool does
    name = "tp2" if rank == 0 else "pp2"
    export_mcore_to_hf(f"{root}/{name}/model", f"{root}/{name}_hf", progress=False)
    if rank == 0:
        fresh = HFRolloutEngine.from_pretrained(f"{root}/tp2_hf")
        out["fresh_ids"] = [s.response_ids for s in fresh.generate(_requests(seqs_plain), _sampling(fresh.tokenizer.eos_token_id))]
    return out


@pytest.fixture(scope="module")
def synced_weights(tiny_model_dir, tiny_model_dir_alt, tmp_path_factory):
    """The HF tensors the weight sync sent before and after a training step, per rank and layout (`results`),
    with the exported HF folders (`root`) and the source models (`src`)."""
    root = tmp_path_factory.mktemp("weight_sync")
    seqs, seqs_alt = make_sequences(tiny_model_dir, 7)[:4], make_sequences(tiny_model_dir_alt, 8)[:4]
    rng = torch.Generator().manual_seed(1)
    for s_list, seed in ((seqs, 9), (seqs_alt, 10)):
        add_grpo_inputs(s_list, [-4 - torch.rand(sum(s["target_mask"]), generator=rng) for s in s_list], seed=seed)
    results = spawn(_sync_worker, 2, str(tiny_model_dir), str(tiny_model_dir_alt), seqs, seqs_alt, str(root))
    return {"root": root, "results": results, "src": {"tp2": tiny_model_dir, "pp2": tiny_model_dir_alt}}


def _load_dir(d) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_identical(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))[:6]}"
    for n in want:
        g = torch.as_tensor(got[n])
        assert g.dtype == want[n].dtype and torch.equal(g, want[n]), f"{what}: {n}"


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_hf_tensors_equal_the_original_checkpoint_before_training(synced_weights, layout):
    _assert_identical(synced_weights["results"][0][layout]["before"], _load_dir(synced_weights["src"][layout]), layout)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_hf_tensors_equal_the_exported_checkpoint_after_training(synced_weights, layout):
    got = synced_weights["results"][0][layout]["after"]
    _assert_identical(got, _load_dir(synced_weights["root"] / f"{layout}_hf"), layout)
    before = synced_weights["results"][0][layout]["before"]
    assert all(not np.array_equal(got[n], before[n]) for n in got)  # the step moved every tensor
    if layout == "pp2":
        assert "lm_head.weight" not in got  # tied: no lm_head, as in the source checkpoint


def test_sync_into_the_hf_engine_generates_like_the_exported_model(synced_weights):
    r = synced_weights["results"][0]
    after = r["tp2"]["after"]
    _assert_identical({n: r["engine_weights"][n] for n in after}, {n: torch.as_tensor(t) for n, t in after.items()},
                      "engine")
    assert r["synced_ids"] == r["fresh_ids"] and len(r["synced_ids"]) == 6 and all(r["synced_ids"])


def test_sync_stats_count_every_byte_on_every_rank(synced_weights):
    after = synced_weights["results"][0]["tp2"]["after"]
    total = sum(t.nbytes for t in after.values())
    for r in synced_weights["results"]:
        s = r["stats"]
        assert s["bytes"] == total and s["tensors"] == len(after)
        assert 1 < s["buckets"] and s["max_bucket_bytes"] <= BUCKET_MB << 20 and s["seconds"] > 0


def test_bucketize_respects_the_bound():
    gen = torch.Generator().manual_seed(0)
    sizes = [100, 3000, 50, 5000, 20, 700, 300, 96, 1024, 1, 900]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    tensors = [(f"t{i}", torch.randn(n, generator=gen).to(dtypes[i % 3])) for i, n in enumerate(sizes)]
    bound = 4096
    stats = SyncStats()
    buckets = list(bucketize(iter(tensors), bound, stats))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]  # nothing lost, order kept
    sizes_b = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    for b, size in zip(buckets, sizes_b):
        assert size <= bound or len(b) == 1
    for b, nxt in zip(buckets, buckets[1:]):  # a bucket closes only when the next tensor does not fit
        first = nxt[0][1]
        assert sum(t.numel() * t.element_size() for _, t in b) + first.numel() * first.element_size() > bound
    assert stats.bytes == sum(sizes_b) and stats.tensors == len(tensors)
    assert stats.buckets == len(buckets) and stats.max_bucket_bytes == max(sizes_b)
    assert max(sizes_b) > bound  # the 5000-element float32 tensor sits alone in an oversized bucket
    assert SyncStats(bytes=5, tensors=1, buckets=1, seconds=0.5).metrics()["sync/bytes"] == 5.0
