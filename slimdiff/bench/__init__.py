"""Latency benchmarks: dense vs slim UNets on the same engine, with MACs, errors, reports and plots.

* :mod:`.harness` — the benchmark run (``run_bench``), UNet-only and end-to-end.
* :mod:`.engines` — eager, torch.compile, ONNX Runtime, AOTInductor, TensorRT behind one interface.
* :mod:`.macs` — parameters and MACs per UNet call with ``torch.utils.flop_counter``.
* :mod:`.plans` — slim models from a budget: calibrated, or synthetic (uniform scores, seeded weights).
* :mod:`.latency_table` — per-module latency at each width and resolution level, and the latency-budget
  allocator built on it.
* :mod:`.report` — ``report.json`` / ``report.md`` / PNG plots.
* :mod:`.cli` — ``slimdiff bench``.
"""
