"""pebr-mega: a Megatron-scale trainer for the PeBR-R1 recipe (Perception Before Reasoning) on Qwen2.5-VL."""

__version__ = "0.1.0"
