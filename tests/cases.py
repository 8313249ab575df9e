"""Rule cases shared by the fast-path tests (CPU and Triton) against the reference."""

from vllm_topt.method.rules import ToptRule

# Both placements, every SDC mode, with and without VMC (over the sequence and
# per V block), and a dense layer.
RULES = [
    ToptRule("post-softmax", "none", True, k=8),
    ToptRule("post-softmax", "none", False, k=8),
    ToptRule("pre-softmax", "exact", True, k=8),
    ToptRule("pre-softmax", "exact", False, k=8),
    ToptRule("pre-softmax", "exp-threshold", True, k=8),
    ToptRule("pre-softmax", "none", False, k=8),
    ToptRule("pre-softmax", "none", True, k=8),
    ToptRule("post-softmax", "none", True, k=8, dense=True),
    ToptRule("post-softmax", "none", True, k=8, vmc_scope="block"),
    ToptRule("pre-softmax", "exact", True, k=8, vmc_scope="block"),
    ToptRule("pre-softmax", "exp-threshold", True, k=8, vmc_scope="block"),
]


def rule_id(rule: ToptRule) -> str:
    vmc = f"vmc-{rule.vmc_scope}" if rule.vmc else "novmc"
    return f"{rule.placement}-{rule.sdc}-{vmc}-dense{int(rule.dense)}"
