"""Models: the tiny HF Qwen2.5-VL maker and Qwen2.5-VL on Megatron-Core."""
