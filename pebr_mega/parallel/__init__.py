"""Process groups, launch environment and the CPU compatibility layer for Megatron-Core.

groups (init_parallel / destroy_parallel / current_state), launch (spawn N local ranks, free_port),
cpu_compat (`megatron_on_cpu`: the CPU compatibility layer, entered around Megatron calls when CUDA is absent).
"""
