"""The benches' one way to time a call: the median over a fixed number of runs after warm-up runs, in ms.

On a CUDA device (the default where there is one) each run is bracketed by CUDA events (device time of the
queued work); on the CPU by the host clock.
A fixed count (not a time budget) keeps ranks that time collectives in step with each other.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 1, device: torch.device | str | None = None) -> float:
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)
