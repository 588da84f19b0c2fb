"""Models: the tiny HF Qwen2.5-VL maker and Qwen2.5-VL on Megatron-Core.

arch (QwenVLArch from an HF config), config (ModelConfig), qwen25_vl (Qwen25VLModel,
build_model), vision (the replicated ViT), specs (te | torch | local layer specs, SDPA core attention),
rope_index (M-RoPE positions), packing (THD sequence packing), flops (model FLOPs). See docs/MODEL.md.
"""
