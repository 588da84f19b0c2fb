"""Building a rollout engine and its sampling parameters.

`make_rollout_engine` picks the engine `rollout.engine` names; `stop_token_ids`, `vision_token_ids` and
`sampling_params` give every caller (trainers, evaluation, `pebr eval` / `pebr infer`) the same stop and
banned tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pebr_mega.errors import BackendUnavailableError
from pebr_mega.rollout.engine import RolloutConfig, RolloutEngine
from pebr_mega.rollout.hf_engine import HFRolloutEngine
from pebr_mega.rollout.sglang_engine import SGLangRolloutEngine
from pebr_mega.rollout.types import SamplingParams


def make_rollout_engine(rollout_cfg: RolloutConfig, hf_dir: str | Path, device: torch.device,
                        seed: int = 0) -> RolloutEngine:
    """The rollout engine named by `rollout.engine` (auto = SGLang with CUDA when installed, else HF).

    Only `pebr_mega.trainer.lifecycle.EngineLifecycle` (and the one-shot CLI commands) should hold the result:
    it alone moves the engine's memory (see `RolloutEngine`).
    """
    name = rollout_cfg.engine
    if name == "auto":
        name = "sglang" if device.type == "cuda" and _sglang_importable() else "hf"
    if name == "sglang":
        return SGLangRolloutEngine.from_config(str(hf_dir), rollout_cfg, seed=seed)
    if name == "hf":
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
                    seed: int | None, top_k: int = -1) -> SamplingParams:
    """SamplingParams that stop at Qwen's end tokens and never emit vision tokens: the one builder (`top_k`
    -1 = off)."""
    return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                          stop_token_ids=stop_token_ids(tokenizer), seed=seed,
                          banned_token_ids=vision_token_ids(tokenizer))


def rollout_sampling(rollout_cfg: RolloutConfig, tokenizer, seed: int | None,
                     validation: bool = False) -> SamplingParams:
    """The training (or, with `validation`, the evaluation: `val_n` samples at `val_temperature`) sampling of
    `rollout_cfg`; top-p, top-k and the length are the training rollouts' in both."""
    n, temperature = ((rollout_cfg.val_n, rollout_cfg.val_temperature) if validation
                      else (rollout_cfg.n, rollout_cfg.temperature))
    return sampling_params(tokenizer, n, temperature, rollout_cfg.top_p, rollout_cfg.max_new_tokens, seed,
                           top_k=rollout_cfg.top_k)
