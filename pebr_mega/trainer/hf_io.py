"""The trainers' HF-side plumbing: exporting the actor as an HF directory and building the rollout engine.

Every stage of the recipe starts from and ends with a complete HF directory (weights, config, tokenizer,
image processor, chat template, generation config), which is what the next stage, `pebr eval`, `pebr infer`
and VLMEvalKit read.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pebr_mega.checkpoint.hf_io import atomic_dir, copy_aux_files, write_safetensors
from pebr_mega.checkpoint.hf_mapping import HFMapping
from pebr_mega.data.template import write_prompt_template
from pebr_mega.errors import BackendUnavailableError
from pebr_mega.rollout.weight_sync import iter_hf_tensors


def export_actor_to_hf(model, template_dir: str | Path, out_dir: str | Path, prompt_template=None) -> Path:
    """Write the actor's current weights with `template_dir`'s non-weight files as an HF directory, and the
    format-prompt template (`prompt_template`, default: the packaged one) as `format_prompt.jinja`.

    Collective (every rank iterates the weights); rank 0 writes, atomically.
    """
    mapping = HFMapping(model.arch)
    tensors = iter_hf_tensors(model, mapping)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        for _ in tensors:
            pass
        dist.barrier()
        return Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp, ((n, t.detach().cpu()) for n, t in tensors))
        copy_aux_files(template_dir, tmp)
        write_prompt_template(tmp, prompt_template)
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)


def make_rollout_engine(rollout_cfg, hf_dir: str | Path, device: torch.device, seed: int = 0):
    """The rollout engine named by `rollout.engine` (auto = SGLang with CUDA when installed, else HF)."""
    name = rollout_cfg.engine
    if name == "auto":
        name = "sglang" if device.type == "cuda" and _sglang_importable() else "hf"
    if name == "sglang":
        from pebr_mega.rollout.sglang_engine import SGLangRolloutEngine

        return SGLangRolloutEngine.from_config(str(hf_dir), rollout_cfg, seed=seed)
    if name == "hf":
        from pebr_mega.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine.from_pretrained(hf_dir, device=str(device), batch_size=rollout_cfg.batch_size)
    raise BackendUnavailableError(f"unknown rollout engine {name!r}")


def _sglang_importable() -> bool:
    try:
        import sglang  # noqa: F401
    except ImportError:
        return False
    return True


def stop_token_ids(tokenizer) -> list[int]:
    """Qwen's end-of-turn and end-of-text ids."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return [i for i in ids if i is not None and i >= 0]


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens, which a response may never contain."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    unk = getattr(tokenizer, "unk_token_id", None)
    return [i for i in ids if i is not None and i >= 0 and i != unk]


def sampling_params(tokenizer, n: int, temperature: float, top_p: float, max_new_tokens: int,
                    seed: int | None):
    """SamplingParams that stop at Qwen's end tokens and never emit vision tokens."""
    from pebr_mega.rollout.types import SamplingParams

    return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          stop_token_ids=stop_token_ids(tokenizer), seed=seed,
                          banned_token_ids=vision_token_ids(tokenizer))
