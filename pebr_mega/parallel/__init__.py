"""Process groups, launch environment and the CPU compatibility layer for Megatron-Core."""
