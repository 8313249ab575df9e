"""GPU kernels for Top-θ decode (Triton), importable without vLLM.

`triton_decode` holds the decode kernel, the device threshold lookup and the
V-block-sum update; `paged` builds vLLM's CUDA paged KV-cache views and writes
K/V into them for tests and benchmarks. Nothing here imports vLLM.
"""
