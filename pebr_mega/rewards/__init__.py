"""Rewards: format, accuracy, keyword, CLIP alignment, length, and the stage presets."""
