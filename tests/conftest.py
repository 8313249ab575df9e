"""Test-session setup."""

import os

# Triton decides when a @triton.jit function is defined (its own standard
# library included) whether it runs in the interpreter. vLLM imports Triton,
# so once an engine test module is collected the interpreter can no longer be
# switched on. The Triton tests therefore live in tests/interpreted/ and run in
# a process of their own with TRITON_INTERPRET=1 from the start
# (tests/test_interpreted.py).
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]
