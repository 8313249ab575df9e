"""The plugin's logger: its own handler, since vLLM configures only the `vllm` logger tree."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(levelname)s %(asctime)s [vllm_topt] %(message)s"


def get_logger() -> logging.Logger:
    logger = logging.getLogger("vllm_topt")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
