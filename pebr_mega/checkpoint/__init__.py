"""HF <-> Megatron name/shard mapping; distributed checkpoint save/load; conversion and logit parity.

hf_mapping (the one name/layout mapping), hf_io (safetensors read/write, atomic dirs), hf_load (HF weights
into a Megatron stage), dist (distributed checkpoints), convert (HF <-> Megatron tools), compare (logit parity).
"""
