"""Triton kernels, installed as `pebr_mega.kernels`."""
