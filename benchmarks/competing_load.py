"""A competing load for benchmarks: single-threaded busy processes, started and stopped around a timing.

An idle machine is the exception in serving (API server, engine core,
tokenisation and other tenants share the cores), so the CPU benchmarks time
each case with `--load N` such processes as well as on an idle machine.
"""

from __future__ import annotations

import contextlib
import multiprocessing


def _busy_loop() -> None:
    while True:
        pass


@contextlib.contextmanager
def competing_load(processes: int):
    """`processes` single-threaded busy loops for the duration (0: an idle machine)."""
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_busy_loop, daemon=True) for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.terminate()
            w.join()
