"""Latency statistics: CUDA events on a GPU, ``time.perf_counter`` on the CPU, and speed-ups that can't lie.

Each timed call is synchronised on its own (a latency, not a throughput): on a GPU the events bracket the
call on the current stream and the end event is waited for before the next call starts, so the GPU time of
a launch-bound call includes its gaps.

A speed-up is measured by :func:`time_interleaved` — dense and slim called in alternation in one process, on
the same inputs and threads, so that a load change on a shared machine (or a GPU clock change) hits both — and
reported by :func:`speedup_interval` as the median of the per-pair ratios dense/slim with a seeded bootstrap
confidence interval.
:func:`judge_speedup` calls a cell *noisy* when that interval is wide or the speed-up beats the ideal (the MAC
ratio) by more than a few percent: such a number is contention, not the model, and must not be printed as a
result.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import SlimDiffError

MIN_WARMUP, MIN_ITERS = 3, 20  # the floor for UNet-only timing
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000
SPEEDUP_METHOD = "median of per-pair ratios dense/slim; bootstrap over pairs, percentile interval"
#: A speed-up whose interval is wider than this fraction of itself is too uncertain to report as a result.
NOISY_MAX_RELATIVE_WIDTH = 0.10
#: MACs bound a compute-bound speed-up: one this far above the ideal (MAC ratio) is contention, not the model.
NOISY_OVER_IDEAL = 0.05


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


def clock_name(device: str | torch.device) -> str:
    return "cuda-events" if is_cuda(device) else "perf_counter"


def _timed_call(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one synchronised call."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


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
        samples = [_timed_call(fn, cuda) for _ in range(iters)]
    return summarize(samples, warmup, clock_name(device))


def time_interleaved(fn_a: Callable[[], object], fn_b: Callable[[], object], device: str | torch.device,
                     warmup: int = MIN_WARMUP, pairs: int = MIN_ITERS) -> tuple[list[float], list[float]]:
    """``pairs`` timed calls of each of ``fn_a`` and ``fn_b``, alternating in one loop; samples in ms, paired.

    The order within a pair alternates (AB, BA, AB, …) so that neither callable always runs second — after the
    other has warmed or evicted the caches — and a load change during the loop falls on both equally.
    """
    if warmup < 0 or pairs < 2:
        raise SlimDiffError(f"warm-up must be ≥ 0 and timed pairs ≥ 2 (got {warmup}, {pairs})")
    cuda = is_cuda(device)
    a_ms, b_ms = [], []
    with torch.no_grad():
        for _ in range(warmup):
            fn_a()
            fn_b()
        if cuda:
            torch.cuda.synchronize(device)
        for i in range(pairs):
            if i % 2 == 0:
                a_ms.append(_timed_call(fn_a, cuda))
                b_ms.append(_timed_call(fn_b, cuda))
            else:
                b_ms.append(_timed_call(fn_b, cuda))
                a_ms.append(_timed_call(fn_a, cuda))
    return a_ms, b_ms


def speedup_interval(dense_ms: list[float], slim_ms: list[float], confidence: float = CONFIDENCE,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Speed-up = the median over pairs of dense/slim (one dense and one slim call timed back to back), with a
    bootstrap percentile interval over the pairs.

    Each pair's ratio cancels the load both of its calls met; a ratio of two medians does not — the dense and
    the slim median can come from moments of different load. Measured on the shared 2-vCPU VM (proxy, eager,
    1 thread, 5 fresh processes × 240 pairs, quiet and beside a one-core load; bench/interval_coverage.py,
    bench/results/2026-12-01-cpu/interval-coverage): the median pair ratio was 1.037 quiet and 1.039 loaded,
    each process within ±0.7 % of it, where the ratio of medians moved from 1.039 to 1.026 with the load and
    its processes spread over −2.4 … +1.1 %; over 20-pair windows the interval below covered the pooled value
    in 92–93 % of windows (nominal 95 %) at a median width of 6–7 % (ratio of medians: 10–14 %).
    Seeded: the same samples always give the same interval.
    """
    dense, slim = np.asarray(dense_ms, dtype=np.float64), np.asarray(slim_ms, dtype=np.float64)
    if dense.shape != slim.shape or dense.ndim != 1 or len(dense) < 2:
        raise SlimDiffError(f"need two equally long lists of ≥ 2 paired samples, got {len(dense)} and {len(slim)}")
    if not 0 < confidence < 1 or resamples < 1:
        raise SlimDiffError(f"confidence must be in (0, 1) and resamples ≥ 1 (got {confidence}, {resamples})")
    if (dense <= 0).any() or (slim <= 0).any():
        raise SlimDiffError("latency samples must be positive")
    ratios = dense / slim
    index = np.random.default_rng(seed).integers(0, len(ratios), size=(resamples, len(ratios)))
    resampled = np.median(ratios[index], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return {"speedup": float(np.median(ratios)), "low": float(low), "high": float(high),
            "confidence": confidence, "pairs": len(dense), "resamples": resamples, "seed": seed,
            "method": SPEEDUP_METHOD}


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads, this process's included); None where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def judge_speedup(interval: dict, ideal: float | None, max_relative_width: float = NOISY_MAX_RELATIVE_WIDTH,
                  over_ideal: float = NOISY_OVER_IDEAL, load: float | None = None,
                  cpus: int | None = None) -> list[str]:
    """Why a measured speed-up is noise rather than a result (empty when it can be reported).

    ``load``: the highest 1-minute load average seen around the measurement, on a machine of ``cpus`` CPUs. More
    runnable threads than CPUs means other work took turns on the cores the benchmark ran on; the pair ratios
    cancel a load both calls of a pair meet, not one that slows the larger model more (on the shared VM the one
    main-job run begun at load 2.4 on 2 CPUs gave the proxy cell 0.973 [0.961, 0.979], three runs at load 1.1
    gave 1.002–1.035)."""
    reasons = []
    if load is not None and cpus and load > cpus:
        reasons.append(f"the machine was busy: load average {load:.1f} on {cpus} CPUs around the measurement "
                       f"(other work shared the cores)")
    width = (interval["high"] - interval["low"]) / interval["speedup"]
    if width > max_relative_width:
        reasons.append(f"interval {interval['low']:.3f}–{interval['high']:.3f} is {100 * width:.0f} % of the "
                       f"speed-up (limit {100 * max_relative_width:.0f} %)")
    if ideal is not None and interval["speedup"] > ideal * (1 + over_ideal):
        reasons.append(f"{interval['speedup']:.3f}× exceeds the ideal {ideal:.3f}× (MAC ratio) by more than "
                       f"{100 * over_ideal:.0f} %")
    return reasons


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
