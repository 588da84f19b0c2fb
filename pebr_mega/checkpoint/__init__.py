"""HF <-> Megatron name/shard mapping; distributed checkpoint save/load."""
