"""The Megatron Qwen2.5-VL on a CUDA device against transformers on the same device (skipped without CUDA).

The CPU parity tests (test_model_parity.py) cover the numerics at every layout; this one catches what only a
GPU build shows: every parameter and buffer on the device, in the configured dtype, and logits and
vision-tower gradients that still match transformers' Qwen2_5_VLForConditionalGeneration there.
"""
from __future__ import annotations

import pytest
import torch

from pebr_mega.parallel.launch import spawn
from helpers import build_parity_model, hf_parity_reference, make_parity_batch, model_inputs, vision_grads

pytestmark = pytest.mark.gpu


def _cuda_worker(rank, hf_dir, batch):
    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.qwen25_vl import build_model
    from pebr_mega.models.arch import arch_from_hf_dir
    from pebr_mega.parallel.groups import init_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_parallel(1, 1)
    b = {k: torch.as_tensor(v).cuda() for k, v in batch.items()}
    model = build_parity_model(hf_dir, 1, 1, "torch").train()
    placement = sorted({f"{t.device.type}/{t.dtype}" for t in [*model.parameters(), *model.buffers()]
                        if t.is_floating_point()})
    logits = model(**model_inputs(model, b), runtime_gather_output=True)
    loss = (model(**model_inputs(model, b, with_labels=True)) * b["attention_mask"]).sum()
    loss.backward()
    bf16 = build_model(arch_from_hf_dir(hf_dir), ModelConfig(spec="torch", params_dtype="bfloat16"))
    bf16_placement = sorted({f"{p.device.type}/{p.dtype}" for p in bf16.parameters()})
    return {"placement": placement, "bf16_placement": bf16_placement, "logits": logits.detach().cpu(),
            "vision_grads": {k: v.cpu() for k, v in vision_grads(model).items()}}


def test_megatron_model_on_cuda_matches_transformers(tiny_model_dir):
    batch = make_parity_batch(tiny_model_dir, seed=5)
    got = spawn(_cuda_worker, 1, str(tiny_model_dir), {k: v.numpy() for k, v in batch.items()})[0]
    assert got["placement"] == ["cuda/torch.float32"], got["placement"]
    assert got["bf16_placement"] == ["cuda/torch.bfloat16"], got["bf16_placement"]
    ref = hf_parity_reference(tiny_model_dir, batch)  # float32 on the CPU, as in the CPU parity tests
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.as_tensor(got["logits"])[mask], ref["logits"][mask], rtol=1e-3, atol=1e-3)
    for name, want in ref["vision_grads"].items():
        torch.testing.assert_close(torch.as_tensor(got["vision_grads"][name]), want, rtol=1e-3, atol=1e-4, msg=name)
