"""Timing helpers shared by the benchmarks.

Every benchmark prints one JSON object per measurement (`emit`) so results can be grepped, diffed and pasted
into RESULTS.md. GPU work is asynchronous, so device code is timed with CUDA events around each repetition
after warm-up, and the median is reported (robust to the odd slow launch); on the CPU a wall clock does.
MFU is measured against the bf16 matmul peak of the machine we run on (`bf16_peak_tflops`), not a datasheet.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def header(device: torch.device, **extra) -> dict:
    """The fields every record carries: when, where, which torch."""
    return {"date": datetime.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
            **extra}


def emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bf16_peak_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matmul rate on n³ random operands (docs/DESIGN.md §8: ~717 TFLOP/s on our H100)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, iters=10 if device.type == "cuda" else 3)
    return 2 * n ** 3 / ms / 1e9


def kernel_table(prof, runs: int = 1, top: int = 20) -> dict:
    """GPU kernels of a finished `torch.profiler.profile` over `runs` repetitions: kernels per run, their summed
    time per run (ms) and the `top` kernels by time as [name, calls per run, us per run]. When the sum is close
    to the measured wall time, the work is bound by its kernels, and the table says which."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:100], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time
    table = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels_per_step": round(len(kernels) / runs),
            "kernel_ms_per_step": round(sum(e.device_time for e in kernels) / runs / 1e3, 3),
            "top_kernels_us_per_step": [[name, round(n / runs, 1), round(us / runs, 1)] for name, (n, us) in table]}
