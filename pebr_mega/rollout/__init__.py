"""Rollout engines (SGLang on GPU, HF generate on CPU) and weight sync."""
