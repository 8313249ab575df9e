"""Top-θ decode on CUDA in Triton (`decode`), importable without vLLM."""
