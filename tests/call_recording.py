"""What a pipeline passes its denoiser: the tests of the families check the calls their pipeline and their
calibration loop make."""

from __future__ import annotations

import inspect

import torch


def keyword_calls(module: torch.nn.Module, run) -> list[dict]:
    """The arguments of every call of ``module`` that ``run()`` makes, by name (positional ones bound to the names
    of ``module.forward``; tensors cloned)."""
    calls = []
    signature = inspect.signature(module.forward)

    def record(_module, args, kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in bound.items()})

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls
