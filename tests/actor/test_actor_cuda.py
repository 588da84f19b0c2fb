"""The Megatron actor on a CUDA device (skipped without CUDA): fused kernels, packed attention, the GPU
optimizer, resume.

On a GPU the actor runs what the CPU tests cannot: the compiled Triton log-prob and GRPO-loss kernels inside
the Megatron schedule, the flash variable-length attention (torch's varlen_attn or flash-attn) in bf16, and
the optimizer `distributed_optimizer=auto` picks there (Megatron's distributed optimizer where Transformer
Engine or Apex provides a fused Adam, else the plain one). Every packed micro-batch is padded to 16 tokens
(the padding path). Checked:
- fp32: one GRPO step against the float64 transformers reference of test_actor.py (loss, grad norm, AdamW
  weights); then a checkpoint is saved, two more steps run, and an actor resumed from the checkpoint repeats
  them;
- bf16 with `model.attention=auto`: log-probs against the float64 reference at bf16 precision, from both
  log-prob paths; exactly one attention kernel per layer per micro-batch (text layers and ViT blocks),
  counted with the profiler; a GRPO step is finite.
"""
from __future__ import annotations

import pytest
import torch

from pebr_mega.parallel.launch import spawn
from helpers import (OPT, TEMPERATURE, actor_sequences, add_grpo_inputs, grpo_loss_spec, hf_model, hf_target_logprobs,
                     hf_weights, make_actor, make_sequences, max_abs_diff, reference_step)

pytestmark = pytest.mark.gpu

BATCHES = [[0, 1, 2], [3, 4, 5], [1, 3, 4]]


def _cuda_actor(path):
    """The actor of test_actor.py, with the fused kernels and the optimizer `auto` picks on this machine."""
    return make_actor(path, 1, 1, kernels="triton", distributed_optimizer="auto", **OPT)


def _attention_kernels(actor, seqs) -> tuple[int, int]:
    """(flash attention kernels launched by one log-prob pass, the count one per layer per micro-batch gives)."""
    from torch.profiler import ProfilerActivity, profile

    layers, blocks = actor.arch.text.num_layers, actor.arch.vision.depth
    expected = sum(layers + (blocks if mb.pixel_values is not None else 0) for mb in actor.micro_batches(seqs))
    actor.compute_logprobs(seqs, TEMPERATURE)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        actor.compute_logprobs(seqs, TEMPERATURE)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(1 for n in names if "flash_fwd" in n and "combine" not in n), expected


def _worker(rank, tiny, seqs_plain, root):
    from pebr_mega.parallel.groups import init_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_parallel(1, 1)
    seqs = actor_sequences(seqs_plain)
    actor = _cuda_actor(tiny)
    out = {"optimizer": type(actor.optimizer).__name__ + "/" + "/".join(
        type(o).__name__ for o in getattr(actor.optimizer, "chained_optimizers", []))}
    out["first"] = actor.train_step(seqs, grpo_loss_spec())
    out["weights_first"] = {n: t.cpu() for n, t in hf_weights(actor).items()}
    actor.save(f"{root}/ckpt")
    out["straight"] = [actor.train_step([seqs[i] for i in b], grpo_loss_spec()) for b in BATCHES[:2]]
    out["w_straight"] = {n: t.cpu() for n, t in hf_weights(actor).items()}
    resumed = _cuda_actor(f"{root}/ckpt")
    out["updates_loaded"] = resumed.updates
    out["resumed"] = [resumed.train_step([seqs[i] for i in b], grpo_loss_spec()) for b in BATCHES[:2]]
    out["w_resumed"] = {n: t.cpu() for n, t in hf_weights(resumed).items()}
    del actor, resumed
    for path in ("logits", "hidden"):
        bf16 = make_actor(tiny, 1, 1, kernels="triton", params_dtype="bfloat16", logprobs_from=path, lr=0.0)
        out[f"bf16_lp_{path}"] = bf16.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
        out[f"bf16_step_{path}"] = bf16.train_step(seqs, grpo_loss_spec())
        if path == "logits":
            out["attention_kernels"] = _attention_kernels(bf16, seqs)
        del bf16
    return out


@pytest.fixture(scope="module")
def cuda_step_and_reference(tiny_model_dir, tmp_path_factory):
    """(the actor's steps on the GPU, the float64 reference step, the reference log-probs)."""
    seqs = make_sequences(tiny_model_dir, 5)
    rng = torch.Generator().manual_seed(0)
    add_grpo_inputs(seqs, [-4 - torch.rand(sum(s["target_mask"]), generator=rng) for s in seqs], seed=6)
    got = spawn(_worker, 1, str(tiny_model_dir), seqs, str(tmp_path_factory.mktemp("actor_cuda")))[0]
    with torch.no_grad():
        lp_ref = hf_target_logprobs(hf_model(tiny_model_dir), seqs, TEMPERATURE)
    return got, reference_step(tiny_model_dir, seqs, opt=OPT), lp_ref


def test_grpo_step_on_cuda_matches_the_float64_reference(cuda_step_and_reference):
    got, want, _ = cuda_step_and_reference
    from pebr_mega.actor.megatron_actor import fused_adam_available

    assert got["optimizer"].endswith("DistributedOptimizer") == fused_adam_available(), got["optimizer"]
    m = got["first"]
    assert m["skipped"] == 0.0
    # float32 on the GPU (Triton kernels, cuBLAS without TF32) against float64 on the CPU
    assert abs(m["loss"] - want["loss"]) < 1e-4, (m["loss"], want["loss"])
    assert abs(m["grad_norm"] - want["grad_norm"]) / want["grad_norm"] < 1e-4, (m["grad_norm"], want["grad_norm"])
    assert max_abs_diff(got["weights_first"], want["weights"]) < 1e-4
    # the padding path ran: every micro-batch padded to a multiple of 16
    assert m["actor/padding_fraction"] > 0 and m["actor/microbatch_tokens_max"] % 16 == 0


def test_checkpoint_resumes_training_on_cuda(cuda_step_and_reference):
    got, _, _ = cuda_step_and_reference
    assert got["updates_loaded"] == 1
    for a, b in zip(got["straight"], got["resumed"]):
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # CUDA's embedding backward adds with atomics, so the runs may differ in the last bits only
    assert max_abs_diff(got["w_straight"], got["w_resumed"]) < 1e-5
    assert max_abs_diff(got["w_straight"], got["weights_first"]) > 1e-4  # the two steps moved the weights


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_bf16_flash_attention_actor_log_probs_match_the_float64_reference(cuda_step_and_reference, path):
    got, _, lp_ref = cuda_step_and_reference
    for (lp, ent), (ref_lp, ref_ent) in zip(got[f"bf16_lp_{path}"], lp_ref):
        # bf16 weights and activations: log-probs of a ~1k-token vocabulary agree to a few 1e-2
        assert float((lp.double() - ref_lp).abs().max()) < 0.1
        assert float((ent.double() - ref_ent).abs().max()) < 0.1
    m = got[f"bf16_step_{path}"]
    assert m["skipped"] == 0.0 and torch.isfinite(torch.tensor(m["loss"]))


def test_one_attention_kernel_per_layer_per_micro_batch(cuda_step_and_reference):
    launched, expected = cuda_step_and_reference[0]["attention_kernels"]
    assert launched == expected, f"{launched} flash attention kernels for {expected} (layer, micro-batch) pairs"
