"""Rule cases shared by the fast-path tests (CPU and Triton) against the reference."""

from vllm_topt.method.rules import ToptRule

# Both placements, every SDC mode, with and without VMC, and a dense layer.
RULES = [
    ToptRule("post-softmax", "none", True, k=8),
    ToptRule("post-softmax", "none", False, k=8),
    ToptRule("pre-softmax", "exact", True, k=8),
    ToptRule("pre-softmax", "exact", False, k=8),
    ToptRule("pre-softmax", "exp-threshold", True, k=8),
    ToptRule("pre-softmax", "none", False, k=8),
    ToptRule("pre-softmax", "none", True, k=8),
    ToptRule("post-softmax", "none", True, k=8, dense=True),
]
