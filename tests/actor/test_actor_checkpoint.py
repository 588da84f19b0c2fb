"""Actor checkpoints: exact resume, loading at another TP, fresh optimizers from the weights alone, export to
HF, atomic saves and clear errors.

One launch of two gloo ranks: at TP=2 an actor trains two steps, saves, trains two more (weights W); a
second actor built from the checkpoint trains the same two steps and must reach W bit for bit. Then at
TP=1 (DP=2) and at PP=2 the checkpoint is loaded again (same log-probs; training continues with the
restored Adam state) and its `model/` part starts a fresh optimizer. Finally rank 0 exports `model/` to HF with the
function `tools/export_to_hf.py` runs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pebr_mega.errors import CheckpointError
from pebr_mega.parallel.launch import spawn
from helpers import OPT, actor_sequences, add_grpo_inputs, make_sequences, max_abs_diff, solo_world

pytestmark = pytest.mark.slow

TEMPERATURE = 0.9
# Four different mini-batches; the last two are trained once straight on and once after a resume.
BATCHES = [[0, 1, 2], [3, 4, 5], [1, 3, 4], [0, 2, 5, 4]]


def _actor(path, tp: int, trainable: bool = True, pp: int = 1):
    from pebr_mega.actor.config import ActorConfig
    from pebr_mega.actor.megatron_actor import build_actor
    from pebr_mega.models.config import ModelConfig

    mc = ModelConfig(spec="torch", tp=tp, pp=pp, params_dtype="float32")
    return build_actor(path, mc, ActorConfig(micro_batch_tokens=200, kernels="torch", **OPT), trainable=trainable,
                       total_updates=8)


def _grpo():
    from pebr_mega.actor.megatron_actor import LossSpec
    from pebr_mega.algo.grpo import AlgoConfig

    return LossSpec("grpo", AlgoConfig(), TEMPERATURE)


def _weights(actor, keep: bool) -> dict[str, torch.Tensor] | None:
    """The HF-named weights (a collective: every rank iterates; only `keep` ranks return them)."""
    from pebr_mega.checkpoint.hf_mapping import HFMapping
    from pebr_mega.checkpoint.gather import iter_hf_tensors

    weights = {n: t.clone() for n, t in iter_hf_tensors(actor, HFMapping(actor.arch))}
    return weights if keep else None


def _train(actor, seqs, batches) -> list[dict]:
    return [actor.train_step([seqs[i] for i in b], _grpo()) for b in batches]


def _failing_optimizer_save(real_save):
    """dist_checkpointing.save that dies when it gets to the optimizer state (a crash mid-save)."""
    def save(state, path, *args, **kwargs):
        if path.endswith("optimizer"):
            raise OSError("disk full (simulated)")
        return real_save(state, path, *args, **kwargs)

    return save


def _ckpt_worker(rank, tiny, seqs_plain, root):
    from megatron.core import dist_checkpointing

    from pebr_mega.checkpoint.convert import export_mcore_to_hf
    from pebr_mega.parallel.groups import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    seqs = actor_sequences(seqs_plain)
    keep = rank == 0
    ckpt = f"{root}/ckpt"
    out = {}

    init_parallel(2, 1)
    try:  # Megatron's distributed optimizer cannot run here (CPU, torch AdamW): asking for it is an error
        from pebr_mega.actor.config import ActorConfig
        from pebr_mega.actor.megatron_actor import build_actor
        from pebr_mega.models.config import ModelConfig

        build_actor(tiny, ModelConfig(spec="torch", tp=2, params_dtype="float32"),
                    ActorConfig(kernels="torch", distributed_optimizer="on"))
    except ValueError as e:
        out["distributed_optimizer_on"] = str(e)
    actor = _actor(tiny, 2)
    _train(actor, seqs, BATCHES[:2])
    actor.save(ckpt)
    out["lp_saved"] = actor.compute_logprobs(seqs, TEMPERATURE)
    out["w_saved"] = _weights(actor, keep)
    out["straight"] = _train(actor, seqs, BATCHES[2:])
    out["w_straight"] = _weights(actor, keep)
    out["lr_straight"], out["updates_straight"] = actor.lr, actor.updates

    resumed = _actor(ckpt, 2)
    out["updates_loaded"] = resumed.updates
    out["resumed"] = _train(resumed, seqs, BATCHES[2:])
    out["w_resumed"] = _weights(resumed, keep)
    out["lr_resumed"], out["updates_resumed"] = resumed.lr, resumed.updates

    real_save = dist_checkpointing.save
    dist_checkpointing.save = _failing_optimizer_save(real_save)
    try:
        resumed.save(ckpt)  # would overwrite the checkpoint with the 4-update state, but crashes
    except OSError as e:
        out["crash"] = str(e)
    finally:
        dist_checkpointing.save = real_save

    init_parallel(1, 1)  # DP = 2: the TP=2 checkpoint resharded
    at_tp1 = _actor(ckpt, 1)
    out["updates_tp1"] = at_tp1.updates
    out["lp_tp1"] = at_tp1.compute_logprobs(seqs, TEMPERATURE)
    _train(at_tp1, seqs, BATCHES[2:])
    out["w_tp1"] = _weights(at_tp1, keep)
    fresh = _actor(f"{ckpt}/model", 1)  # the weights alone: a fresh optimizer
    out["updates_fresh"] = fresh.updates
    out["lp_fresh"] = fresh.compute_logprobs(seqs, TEMPERATURE)
    _train(fresh, seqs, BATCHES[2:])
    out["w_fresh"] = _weights(fresh, keep)
    frozen = _actor(ckpt, 1, trainable=False)
    out["lp_frozen"] = frozen.compute_logprobs(seqs, TEMPERATURE)

    init_parallel(1, 2)  # and at PP=2: each stage holds half the parameters and their Adam state
    at_pp2 = _actor(ckpt, 1, pp=2)
    out["lp_pp2"] = at_pp2.compute_logprobs(seqs, TEMPERATURE)
    _train(at_pp2, seqs, BATCHES[2:])
    out["w_pp2"] = _weights(at_pp2, keep)
    destroy_parallel(process_group=True)

    if rank == 0:  # a one-rank world, as the export tool runs
        solo_world()
        export_mcore_to_hf(f"{ckpt}/model", f"{root}/hf", progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint_round_trip(tiny_model_dir, tmp_path_factory):
    """Two ranks train, save a distributed checkpoint, export HF weights and resume in other layouts: the
    per-rank `results` and the `root` folder they wrote."""
    root = tmp_path_factory.mktemp("actor_ckpt")
    seqs = make_sequences(tiny_model_dir, 5)
    rng = torch.Generator().manual_seed(0)
    add_grpo_inputs(seqs, [-4 - torch.rand(sum(s["target_mask"]), generator=rng) for s in seqs], seed=6)
    results = spawn(_ckpt_worker, 2, str(tiny_model_dir), seqs, str(root))
    return {"root": root, "results": results}


def _lp_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for (x, _), (y, _) in zip(a, b))


def test_resume_reproduces_training_bit_for_bit(checkpoint_round_trip):
    r = checkpoint_round_trip["results"][0]
    assert r["updates_loaded"] == 2 and r["updates_straight"] == r["updates_resumed"] == 4
    assert r["straight"] == r["resumed"]  # every metric of steps 3 and 4, exactly
    assert all(m["skipped"] == 0.0 for m in r["straight"])
    assert r["lr_straight"] == r["lr_resumed"]
    w, w2 = r["w_straight"], r["w_resumed"]
    assert set(w) == set(w2) and all(np.array_equal(w[n], w2[n]) for n in w)
    assert max_abs_diff(w, r["w_saved"]) > 1e-3  # the two steps did move the weights


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(checkpoint_round_trip):
    for r in checkpoint_round_trip["results"]:
        for key in ("lp_tp1", "lp_fresh", "lp_frozen", "lp_pp2"):
            assert _lp_diff(r[key], r["lp_saved"]) < 1e-5, key
    r = checkpoint_round_trip["results"][0]
    assert r["updates_tp1"] == 2 and r["updates_fresh"] == 0
    # With the restored Adam moments, training at TP=1 or PP=2 follows the TP=2 run; a fresh optimizer does not.
    assert max_abs_diff(r["w_tp1"], r["w_straight"]) < 1e-5
    assert max_abs_diff(r["w_pp2"], r["w_straight"]) < 1e-5
    assert max_abs_diff(r["w_fresh"], r["w_straight"]) > 1e-4


def test_actor_checkpoint_layout_and_export(checkpoint_round_trip):
    from safetensors.torch import load_file

    ckpt = checkpoint_round_trip["root"] / "ckpt"
    record = json.loads((ckpt / "actor.json").read_text())
    assert record["format"] == "pebr-actor/1" and record["updates"] == 2 and record["saved_tp"] == 2
    assert (ckpt / "model" / "pebr_mcore.json").is_file() and (ckpt / "optimizer").is_dir()
    hf = checkpoint_round_trip["root"] / "hf"
    exported = load_file(str(hf / "model.safetensors"))
    saved = checkpoint_round_trip["results"][0]["w_saved"]
    assert set(exported) == set(saved) and all(np.array_equal(exported[n].numpy(), saved[n]) for n in saved)
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert (hf / name).is_file(), name


def test_a_crash_mid_save_keeps_the_last_checkpoint(checkpoint_round_trip):
    r = checkpoint_round_trip["results"][0]
    assert "disk full" in r["crash"]
    ckpt = checkpoint_round_trip["root"] / "ckpt"
    assert json.loads((ckpt / "actor.json").read_text())["updates"] == 2  # still the 2-update checkpoint
    assert r["updates_tp1"] == 2  # and it was loaded intact after the crash
    assert sorted(p.name for p in ckpt.iterdir()) == ["actor.json", "model", "optimizer"]


def test_distributed_optimizer_on_where_it_cannot_run_is_a_clear_error(checkpoint_round_trip):
    message = checkpoint_round_trip["results"][0].get("distributed_optimizer_on", "")
    assert "actor.distributed_optimizer=on needs CUDA and a fused Adam" in message, message


def test_build_actor_names_a_directory_it_cannot_use(tmp_path, tiny_model_dir):
    from pebr_mega.actor.config import ActorConfig
    from pebr_mega.actor.megatron_actor import build_actor, checkpoint_kind, read_actor_meta
    from pebr_mega.models.config import ModelConfig

    (tmp_path / "empty").mkdir()
    for path, match in ((tmp_path / "empty", "neither an HF model directory"), (tmp_path / "missing", "not found")):
        with pytest.raises(CheckpointError, match=match) as e:
            build_actor(path, ModelConfig(), ActorConfig())
        assert str(path) in str(e.value)
    assert checkpoint_kind(tiny_model_dir) == "hf"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "actor.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        read_actor_meta(tmp_path / "old")
