"""Timing. GPU: triton.testing.do_bench (CUDA events, warm-up, median) per provider, and the peak
memory one step adds on top of its inputs (CUDA caching allocator). CPU: providers interleaved
round by round (so drift hits all alike), median wall-clock per provider, at torch's thread count;
peak memory is measured apart (peftkern/bench/memory.py), in a fresh process per provider, because
the allocator setting it needs would slow the timed runs."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _cuda_peak_mb(step: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_group(steps: dict[str, Callable[[], None]], device: torch.device, *, quick: bool) -> dict[str, dict]:
    """{provider: {"median_ms", "peak_mem_mb"}} for step functions that each run one fwd+bwd."""
    for step in steps.values():
        step()  # warm-up: Triton compilation / autotuning, allocator growth, thread pools
    if device.type == "cuda":
        import triton.testing

        out = {}
        for name, step in steps.items():
            peak = _cuda_peak_mb(step, device)
            ms = triton.testing.do_bench(step, warmup=25 if quick else 100, rep=100 if quick else 400,
                                         return_mode="median")
            out[name] = {"median_ms": float(ms), "peak_mem_mb": peak}
        return out
    rounds = 5 if quick else 15
    if not quick:  # short steps (a decode step is ~1 ms): more rounds, up to ~4 s per case, for a steadier median
        t0 = time.perf_counter()
        for step in steps.values():
            step()
        round_s = time.perf_counter() - t0
        rounds = max(rounds, min(400, int(4.0 / max(round_s, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(ts), "peak_mem_mb": None} for name, ts in times.items()}
