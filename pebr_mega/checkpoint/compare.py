"""Logit parity between the Megatron model (any TP/PP) and transformers' Qwen2.5-VL on one image+text input.

`compare_logits` is what `pebr compare-logits` runs: it builds an image+text prompt with the checkpoint's own
tokenizer, chat template and image processor, computes transformers' logits in this process, launches
tp*pp ranks (gloo on CPU, NCCL on GPU) that load the Megatron checkpoint (or the HF weights directly) and
run the forward through Megatron's pipeline schedule, and reports max / mean absolute difference, cosine
similarity and top-1 agreement.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pebr_mega.checkpoint.hf_io import verify_hf_weights
from pebr_mega.checkpoint.manifest import verify_before_reading
from pebr_mega.models.rope_index import get_rope_index
from pebr_mega.parallel.launch import spawn

DEFAULT_PROMPT = "How many red circles are in the picture? Think step by step."


def sample_inputs(hf_dir: str | Path, image: str | Path | None = None, prompt: str = DEFAULT_PROMPT,
                  seed: int = 0, size: tuple[int, int] = (84, 140)) -> dict[str, torch.Tensor]:
    """input_ids [1, s], pixel_values, image_grid_thw for one chat-formatted image+text user turn.

    Without `image`, a random RGB image of `size` (H, W) drawn with `seed` is used.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    proc = AutoImageProcessor.from_pretrained(hf_dir)
    if image is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
    else:
        img = Image.open(image).convert("RGB")
    vis = proc(images=[img], return_tensors="pt")
    merge = getattr(proc, "merge_size", 2)
    n_tokens = int(vis["image_grid_thw"].prod()) // merge**2
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                   tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens, 1)
    ids = tok(text, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "pixel_values": vis["pixel_values"].float(), "image_grid_thw": vis["image_grid_thw"]}


def hf_logits(hf_dir: str | Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' Qwen2_5_VLForConditionalGeneration logits [b, s, V] in float32 on CPU."""
    import inspect

    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = inputs["input_ids"]
    extra = {}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        # transformers 5 builds 3-D positions only when told which tokens are image tokens.
        extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=inputs.get("attention_mask"), pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"], **extra).logits
    return out.float()


def position_ids_for(arch, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """M-RoPE positions [3, b, s] for `inputs` under `arch`."""
    pos, _ = get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"), attention_mask=inputs.get("attention_mask"),
                            image_token_id=arch.image_token_id, video_token_id=arch.video_token_id,
                            spatial_merge_size=arch.vision.spatial_merge_size,
                            tokens_per_second=arch.vision.tokens_per_second)
    return pos


def megatron_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] through Megatron's schedule; returned on last-stage ranks, else None.

    Collective over the model-parallel group (every rank of the layout must call it).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items() if v is not None}
    batch["position_ids"] = position_ids_for(model.arch, inputs).to(device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    b, s = batch["input_ids"].shape

    def step(data_iter, m):
        mb = next(data_iter)
        out = m(input_ids=mb["input_ids"], position_ids=mb["position_ids"], pixel_values=mb.get("pixel_values"),
                image_grid_thw=mb.get("image_grid_thw"), runtime_gather_output=True)
        return out, lambda o, non_loss_data=False: o.detach()

    with torch.no_grad():
        got = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                          num_microbatches=1, seq_length=s, micro_batch_size=b,
                                          forward_only=True, collect_non_loss_data=True)
    return got[0].float().cpu() if mpu.is_pipeline_last_stage() else None


def logit_stats(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """max / mean absolute difference, mean per-token cosine similarity, top-1 agreement."""
    ref, out = ref.double().reshape(-1, ref.shape[-1]), out.double().reshape(-1, out.shape[-1])
    diff = (ref - out).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean()),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
    }


def compare_worker(rank: int, hf_dir: str, mcore_dir: str | None, tp: int, pp: int,
                   inputs: dict, dtype: str = "float32", spec: str = "auto") -> np.ndarray | None:
    """One rank of `compare_logits`: build the stage, load weights, return logits on (last stage, TP rank 0)."""
    import warnings

    # Megatron and torch.distributed.checkpoint warn about optional accelerators and deprecations on every rank.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megatron.core import parallel_state as mpu

    from pebr_mega.checkpoint.dist import load_checkpoint
    from pebr_mega.checkpoint.hf_load import load_hf_weights
    from pebr_mega.models.arch import arch_from_hf_dir
    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.qwen25_vl import build_model
    from pebr_mega.parallel.groups import init_parallel

    init_parallel(tp, pp)
    cfg = ModelConfig(spec=spec, tp=tp, pp=pp, params_dtype=dtype)
    model = build_model(arch_from_hf_dir(hf_dir), cfg, mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage())
    if mcore_dir:
        load_checkpoint(model, mcore_dir)
    else:
        load_hf_weights(model, hf_dir)
    model.eval()
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    logits = megatron_logits(model, tensors)
    return logits if logits is not None and mpu.get_tensor_model_parallel_rank() == 0 else None


def compare_logits(hf_dir: str | Path, mcore_dir: str | Path | None, tp: int = 1, pp: int = 1,
                   inputs: dict | None = None, dtype: str = "float32", spec: str = "auto",
                   verify: bool = True) -> dict[str, float]:
    """Spawn tp*pp ranks, run both models on the same input, and return `logit_stats` plus the shapes. Both
    directories are checked against their manifests first (`verify`; `pebr_mega.checkpoint.manifest`)."""
    verify_hf_weights(hf_dir, "--hf-dir", skip=not verify)
    if mcore_dir:
        verify_before_reading(mcore_dir, "--mcore-dir", skip=not verify)
    inputs = inputs or sample_inputs(hf_dir)
    ref = hf_logits(hf_dir, inputs)
    plain = {k: v.numpy() for k, v in inputs.items()}
    results = spawn(compare_worker, tp * pp, str(hf_dir), str(mcore_dir) if mcore_dir else None, tp, pp, plain,
                    dtype, spec)
    out = torch.from_numpy(next(r for r in results if r is not None))
    stats = logit_stats(ref, out)
    stats.update(tokens=int(ref.shape[1]), vocab=int(ref.shape[2]))
    return stats
