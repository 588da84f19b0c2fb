"""Rewards: format, accuracy, keyword, CLIP alignment, length, and the stage presets.

Public API (the CLIP scorer and the tiny-CLIP builder import torch/transformers, so they are imported from
their modules: `pebr_mega.rewards.clip.ClipAlignmentScorer`, `pebr_mega.rewards.tiny_clip.build_tiny_clip`).
"""
from pebr_mega.rewards.model import (COMPONENTS, STAGE_WEIGHTS, RewardConfig, RewardModel, RewardResult,
                                     RewardSample, build_reward, preset_weights, summarize)
from pebr_mega.rewards.text import (accuracy_reward, extract_description, extract_final_answer, format_reward,
                                    keyword_reward, length_reward)

__all__ = [
    "COMPONENTS", "STAGE_WEIGHTS", "RewardConfig", "RewardModel", "RewardResult", "RewardSample", "build_reward",
    "preset_weights", "summarize", "accuracy_reward", "extract_description", "extract_final_answer",
    "format_reward", "keyword_reward", "length_reward",
]
