"""vllm-topt: Top-θ sparse decode attention for vLLM."""

__version__ = "0.1.0"
