"""Checks that run before any long work: can the outputs be written, do budgets and input files make sense.

A run that calibrates for an hour and then finds that ``--out`` lies under a file, or on a read-only file
system, has wasted the hour; every command calls these first. Each failure is one :class:`SlimDiffError` line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import SlimDiffError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _probe_writable(folder: Path, output: Path) -> None:
    """Create and remove a folder in ``folder``: the only test that sees read-only mounts and quotas as root."""
    try:
        probe = tempfile.mkdtemp(prefix=".slimdiff-probe-", dir=folder)
    except OSError as exc:
        raise SlimDiffError(f"cannot write {str(output)!r}: {str(folder)!r} is not writable "
                            f"({exc.strerror or exc})") from None
    shutil.rmtree(probe, ignore_errors=True)


def _check_creatable(path: Path) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a writable folder."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise SlimDiffError(f"cannot create {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    _probe_writable(ancestor, path)


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A new output folder: absent (or a folder and ``overwrite``), creatable, on a writable file system."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise SlimDiffError(f"output {str(out)!r} is a file, not a folder")
        if not overwrite:
            raise SlimDiffError(f"output {str(out)!r} already exists (use --force to replace it)")
    _check_creatable(out)
    return out


def check_resumable_dir(out: str | os.PathLike) -> Path:
    """A folder that may already exist (a resumable statistics folder): a writable folder, or creatable."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise SlimDiffError(f"output {str(out)!r} is a file, not a folder")
        _probe_writable(out, out)
        return out
    _check_creatable(out)
    return out


def check_output_file(path: str | os.PathLike) -> Path:
    """A file to be written (replaced if it exists): not a folder, its folder writable or creatable."""
    path = Path(path)
    if path.is_dir():
        raise SlimDiffError(f"output {str(path)!r} is a folder; give a file name")
    _check_creatable(path)
    return path


def budget_amount(budget: float, total: float) -> float:
    """What a budget removes: below 1 a fraction of ``total`` (the compressible parameters or MACs), from 1 up an
    amount of them."""
    return budget * total if budget < 1 else float(budget)


def check_budget_range(budget: float, modules: list[tuple[int, float]], r_min: int, align: int,
                       unit: str = "parameters", slack: float = 1.0) -> None:
    """Refuse a budget that removes nothing or more than the compressible modules can give up.

    ``modules``: (width, cost per unit of width) of every module in the pool. The smallest removal is one
    alignment step at the top of one module's width (the allocator rounds a smaller budget down to zero);
    the largest leaves every module at ``r_min``. ``slack`` > 1 lets a budget exceed that by the factor (for
    costs estimated before the statistics that decide them).
    """
    total = sum(width * cost for width, cost in modules)
    removable = sum(cost * (width - min(r_min, width)) for width, cost in modules)
    steps = [cost * (width - max(min(r_min, width), align * ((width - 1) // align)))
             for width, cost in modules if width > r_min]
    share = f"{budget / total:.2%} of the {total:,.0f} compressible {unit}" if total else f"{unit}"
    if steps and budget < min(steps):
        raise SlimDiffError(f"budget of {budget:,.0f} {unit} ({share}) is less than one alignment step: the smallest "
                            f"removal is {min(steps):,.0f} {unit} (align {align}); a budget from 1 up is an amount, "
                            f"a fraction is written below 1 (e.g. 0.4)")
    if budget >= removable * slack:
        raise SlimDiffError(f"budget of {budget:,.0f} {unit} ({share}) is not below the {removable:,.0f} the "
                            f"compressible modules can give up with r_min={r_min}")


def verify_weights_file(path: str | os.PathLike, expected: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file whose header is intact, whose data covers the header's offsets (not truncated) and
    whose tensors are exactly ``expected`` (name → shape)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SlimDiffError(f"weights file {str(path)!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except SafetensorError as exc:  # truncation and damaged headers are reported here, before any data is read
        raise SlimDiffError(f"weights file {str(path)!r} is damaged: {exc}") from None
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        raise SlimDiffError(f"weights file {str(path)!r} does not match its plan: {len(missing)} tensors missing "
                            f"({', '.join(missing[:3])}), {len(extra)} unexpected ({', '.join(extra[:3])})")
    wrong = [f"{name} {list(found[name])} (plan: {list(shape)})" for name, shape in sorted(expected.items())
             if found[name] != tuple(shape)]
    if wrong:
        raise SlimDiffError(f"weights file {str(path)!r} does not match its plan: {len(wrong)} tensors have other "
                            f"shapes, e.g. {wrong[0]}")
