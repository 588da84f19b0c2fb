"""Trainers: one GRPO stage, SFT, and the whole recipe."""
