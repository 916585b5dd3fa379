"""Latency statistics of one callable: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

Each timed call is synchronised on its own (a latency, not a throughput): on a GPU the events bracket the
call on the current stream and the end event is waited for before the next call starts, so the GPU time of
a launch-bound call includes its gaps.
"""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from ..errors import SlimDiffError

MIN_WARMUP, MIN_ITERS = 3, 20  # the floor for UNet-only timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    n: int
    warmup: int
    clock: str  # "cuda-events" | "perf_counter"

    def to_dict(self) -> dict:
        return asdict(self)


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def summarize(samples_ms: list[float], warmup: int, clock: str) -> Timing:
    if not samples_ms:
        raise SlimDiffError("no timed calls to summarize")
    ordered = sorted(samples_ms)
    # Nearest-rank 90th percentile: a value that was actually observed.
    p90 = ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))]
    return Timing(statistics.median(ordered), p90, statistics.fmean(ordered), ordered[0], ordered[-1],
                  len(ordered), warmup, clock)


def time_calls(fn: Callable[[], object], device: str | torch.device, warmup: int = MIN_WARMUP,
               iters: int = MIN_ITERS) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed; return median/p90/mean/min/max in ms."""
    if warmup < 0 or iters < 1:
        raise SlimDiffError(f"warm-up must be ≥ 0 and timed calls ≥ 1 (got {warmup}, {iters})")
    cuda = is_cuda(device)
    # no_grad, not inference_mode: a compiled engine guards on the grad mode it was compiled under, and the
    # pipelines (diffusers) call it under no_grad.
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        samples = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples, warmup, "cuda-events" if cuda else "perf_counter")


def cuda_graphed(fn: Callable[[], object], device: str | torch.device) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph and replayed (its inputs and output stay at fixed addresses).

    Eager PyTorch launches every kernel from Python, so a UNet call on a fast GPU can be bound by the CPU and
    look equally slow at every width; a replayed graph removes that cost, leaving the GPU work alone — what a
    deployed engine (TensorRT, compiled graphs) pays. On the CPU this returns ``fn`` unchanged.
    """
    if not is_cuda(device):
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # lazy initialisations (cuBLAS handles, SDPA kernel choice) must not be captured
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


class CallTimer:
    """Accumulates the time spent inside a wrapped callable without synchronising each call.

    On a GPU it records an event pair around every call and sums their elapsed times at :meth:`total_ms`
    (after one synchronisation), so wrapping the UNet inside a pipeline does not change the pipeline's timing.
    """

    def __init__(self, device: str | torch.device):
        self.cuda = is_cuda(device)
        self.device = device
        self.calls = 0
        self._cpu_ms = 0.0
        self._events: list[tuple] = []

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.calls += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._cpu_ms += (time.perf_counter() - t0) * 1e3
            return out

        return timed

    def total_ms(self) -> float:
        if not self.cuda:
            return self._cpu_ms
        torch.cuda.synchronize(self.device)
        return sum(s.elapsed_time(e) for s, e in self._events)


@contextmanager
def wall_clock(device: str | torch.device) -> Iterator[list[float]]:
    """``with wall_clock(dev) as t: ...`` → ``t[0]`` is the elapsed ms, device work included."""
    out: list[float] = []
    if is_cuda(device):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        if is_cuda(device):
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)


class PeakMemory:
    """Peak memory over a region: the CUDA caching allocator's peak on a GPU (allocations by PyTorch only —
    ONNX Runtime or TensorRT memory is invisible to it, so the device's used-memory growth is recorded too);
    on the CPU the process's peak resident set, which never decreases within a process."""

    def __init__(self, device: str | torch.device):
        self.device = device
        self.cuda = is_cuda(device)
        self._used_before = 0

    def start(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            self._used_before = total - free
        return self

    def read(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            return {"kind": "cuda", "torch_peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "device_used_growth_bytes": int(total - free - self._used_before)}
        # ru_maxrss is in KiB on Linux.
        return {"kind": "cpu-process-peak-rss", "process_peak_rss_bytes":
                int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
