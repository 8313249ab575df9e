"""Decode kernels per device: `cpu` (torch and C++) and `triton` (CUDA). Nothing here imports vLLM."""
