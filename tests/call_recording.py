"""What a pipeline passes its denoiser: the tests of the families that call it by keyword (SD3, FLUX) check the
calls their pipeline and their calibration loop make."""

from __future__ import annotations

import torch


def keyword_calls(module: torch.nn.Module, run) -> list[dict]:
    """The keyword arguments of every call of ``module`` that ``run()`` makes (tensors cloned)."""
    calls = []

    def record(_module, args, kwargs):
        assert not args  # the pipelines pass everything by keyword
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls
