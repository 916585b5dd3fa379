"""LoRAs made for the dense model, mapped onto a slim one: switching LoRAs without slimming again.

Slimming gives every resized Linear a weight that is a linear function of the dense one: per head, new rows are
combinations of the head's rows (query, key, value: ``Ŵ = T·W``), new input columns combinations of its columns
(attention output: ``Ŵ = W·R``), or rows are selected and columns re-fitted (FFN: ``Ŵ_up = W_up[J]``,
``Ŵ_down = W_down·N``). A LoRA adds ``B·A`` to the dense weight; the slim model made from the weights with the LoRA
fused, *with the same factors*, is the slim model plus ``(T·B)·A`` or ``B·(A·R)``: a LoRA of the same rank on the
slim Linear. Mapping it costs a few small products instead of a calibration or a decomposition, and the result is
an ordinary LoRA that diffusers and peft load, switch, weight and fuse as usual.

What it is not: the factors were fitted to the model without the LoRA. A LoRA's update outside the kept subspace
is lost, as it is when slimming the fused model with the base model's statistics (``bench/lora_hotswap.py``
measures both against the dense model with the LoRA).

The maps are kept beside a slim model's weights (``lora_maps.safetensors``), written by ``slimdiff slim
--lora-maps``. Entries, keyed by the Linear's path in the denoiser:

``<path>.lora_rows``            (G, r, d): rows of group g (a head) of the new weight = M[g] @ the group's d rows;
``<path>.lora_row_index``       (n,): the new weight's rows are these rows of the dense weight;
``<path>.lora_columns.<a>-<b>`` (G, d, r): input columns [a, b) of the dense weight, in G groups of d, become
                                r columns each: W[:, group] @ M[g] (the columns outside every range stay);
``<path>.lora_value_bias.<a>-<b>`` (b - a,): a value bias folded into this output projection's bias through
                                columns [a, b) (attention weights sum to one): a LoRA adds ``B·A·b_V`` to the bias.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import SlimDiffError

MAPS_FILE = "lora_maps.safetensors"
_ROWS, _ROW_INDEX, _COLUMNS, _VALUE_BIAS = ".lora_rows", ".lora_row_index", ".lora_columns.", ".lora_value_bias."
_RANGE = re.compile(r"^(?P<path>.+)\.lora_(?P<what>columns|value_bias)\.(?P<start>\d+)-(?P<stop>\d+)$")


def row_map(path: str, matrix: Tensor | None = None, index: Tensor | None = None) -> dict[str, Tensor]:
    """The entry of a Linear whose rows were combined per group (``matrix`` (G, r, d)) or selected (``index``)."""
    if (matrix is None) == (index is None):
        raise ValueError("a row map is a matrix or an index, not both")
    return {path + _ROWS: matrix} if matrix is not None else {path + _ROW_INDEX: index.to(torch.int64)}


def column_map(path: str, start: int, stop: int, matrix: Tensor, value_bias: Tensor | None = None) -> dict[str, Tensor]:
    """The entry of a Linear whose input columns [start, stop) were combined per group (``matrix`` (G, d, r)),
    with the value bias folded into its bias through those columns, if any."""
    if matrix.shape[0] * matrix.shape[1] != stop - start:
        raise ValueError(f"a column map of shape {tuple(matrix.shape)} does not cover columns {start}-{stop}")
    out = {f"{path}{_COLUMNS}{start}-{stop}": matrix}
    if value_bias is not None:
        out[f"{path}{_VALUE_BIAS}{start}-{stop}"] = value_bias
    return out


class LinearMaps:
    """The maps of a slim denoiser, by Linear path (see the module's docstring for the entries)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = dict(tensors)
        self._columns: dict[str, list[tuple[int, int, Tensor, Tensor | None]]] = {}
        self._rows: dict[str, Tensor] = {}
        for key, value in self.tensors.items():
            if key.endswith(_ROWS) or key.endswith(_ROW_INDEX):
                self._rows[key.rsplit(".lora_", 1)[0]] = value
                continue
            match = _RANGE.match(key)
            if match is None:
                raise SlimDiffError(f"{MAPS_FILE} holds an entry slimdiff does not know: {key!r}")
            if match["what"] == "columns":
                start, stop = int(match["start"]), int(match["stop"])
                bias = self.tensors.get(f"{match['path']}{_VALUE_BIAS}{start}-{stop}")
                self._columns.setdefault(match["path"], []).append((start, stop, value, bias))
        for ranges in self._columns.values():
            ranges.sort(key=lambda r: r[0])

    @property
    def paths(self) -> set[str]:
        """The Linears slimming resized."""
        return set(self._rows) | set(self._columns)

    # -- the dense → slim maps, on any matrix with the Linear's rows or columns ---------------------------------
    def rows(self, path: str, rows: Tensor) -> Tensor:
        """``rows`` (the dense Linear's output rows first, e.g. a LoRA's B) as the slim Linear's rows."""
        entry = self._rows.get(path)
        if entry is None:
            return rows
        if entry.dtype == torch.int64:
            return rows[entry.to(rows.device)]
        groups, _, width = entry.shape
        if rows.shape[0] != groups * width:
            raise SlimDiffError(f"{path} has {groups * width} output rows in the dense model, not {rows.shape[0]}")
        grouped = rows.reshape(groups, width, *rows.shape[1:]).to(torch.float32)
        return torch.einsum("grd,gd...->gr...", entry.to(grouped), grouped).reshape(-1, *rows.shape[1:]).to(rows)

    def columns(self, path: str, columns: Tensor) -> Tensor:
        """``columns`` (a matrix on the dense Linear's input, e.g. a weight or a LoRA's A) on the slim Linear's."""
        ranges = self._columns.get(path)
        if not ranges:
            return columns
        parts, at = [], 0
        for start, stop, matrix, _ in ranges:
            if stop > columns.shape[1]:
                raise SlimDiffError(f"{path} has at least {stop} input columns in the dense model, not "
                                    f"{columns.shape[1]}")
            parts.append(columns[:, at:start])
            groups, width, _ = matrix.shape
            block = columns[:, start:stop].to(torch.float32).reshape(-1, groups, width)
            parts.append(torch.einsum("ngd,gdr->ngr", block, matrix.to(block)).reshape(len(columns), -1).to(columns))
            at = stop
        parts.append(columns[:, at:])
        return torch.cat(parts, 1)

    def folded_bias(self, path: str, columns: Tensor) -> Tensor | None:
        """What ``columns`` (on the dense input) add to the slim bias through a folded value bias: Σ columns·b_V."""
        terms = [columns[:, start:stop].to(torch.float32) @ bias.to(torch.float32)
                 for start, stop, _, bias in self._columns.get(path, ()) if bias is not None]
        return None if not terms else sum(terms).to(columns)

    def weight(self, path: str, weight: Tensor) -> Tensor:
        """A dense weight of the Linear at ``path`` as the slim model holds it."""
        return self.columns(path, self.rows(path, weight))

    # -- LoRAs --------------------------------------------------------------------------------------------------
    def map_lora(self, state: Mapping[str, Tensor],
                 slim_shapes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Tensor]:
        """A LoRA in peft's layout (``<path>.lora_A.weight`` (rank, in), ``<path>.lora_B.weight`` (out, rank),
        paths relative to the denoiser) for the dense model, as a LoRA of the same rank for the slim one.

        Layers on Linears slimming left alone pass unchanged, and so do, given the (out, in) ``slim_shapes`` of the
        resized Linears, layers that already fit them (a LoRA mapped before). Refused in one line: a DoRA or other adapter than LoRA, and a LoRA bias on a resized Linear
        (a key bias cancels in the softmax and a value bias moves to the output projection: no LoRA of the slim
        Linear carries them)."""
        out: dict[str, Tensor] = {}
        folded: dict[str, Tensor] = {}
        for key, value in state.items():
            path, sep, leaf = key.partition(".lora_")
            if not sep or leaf not in ("A.weight", "B.weight", "B.bias"):
                if any(key.startswith(p + ".") for p in self.paths):
                    raise SlimDiffError(f"cannot map {key!r} onto the slim model: only plain LoRA layers "
                                        "(lora_A / lora_B) are mapped, not DoRA or other adapters")
                out[key] = value
                continue
            down, up = state.get(f"{path}.lora_A.weight"), state.get(f"{path}.lora_B.weight")
            if down is None or up is None:
                raise SlimDiffError(f"LoRA layer {path!r} lacks its lora_A or lora_B weight")
            if path not in self.paths or (slim_shapes is not None
                                          and (up.shape[0], down.shape[1]) == tuple(slim_shapes[path])):
                out[key] = value
            elif leaf == "B.bias":
                raise SlimDiffError(f"cannot map {key!r} onto the slim model: a LoRA bias on a resized Linear "
                                    "has no slim counterpart")
            elif leaf == "B.weight":
                out[key] = self.rows(path, value)
            else:
                out[key] = self.columns(path, value)
                extra = self.folded_bias(path, value)
                if extra is not None:
                    folded[path] = (up.to(torch.float32) @ extra.to(torch.float32)).to(up)
        if folded:
            # peft gives every layer of an adapter a bias once one has it (zeros where the LoRA had none).
            for key in [k for k in out if k.endswith(".lora_B.weight")]:
                path = key.removesuffix(".lora_B.weight")
                out.setdefault(f"{path}.lora_B.bias", folded.get(path, out[key].new_zeros(out[key].shape[0])))
        return out


def write_maps(maps: LinearMaps, folder: Path, dtype: torch.dtype) -> None:
    """Save ``maps`` beside a slim model's weights, in the dtype of its weights (the maps' precision needs no more
    than the weights they produced)."""
    from safetensors.torch import save_file

    save_file({k: v if v.dtype == torch.int64 else v.to(dtype).contiguous() for k, v in maps.tensors.items()},
              str(folder / MAPS_FILE))


def read_maps(folder: Path) -> LinearMaps | None:
    """The maps saved beside a slim model's weights, or None when it was slimmed without them."""
    from safetensors.torch import load_file

    path = folder / MAPS_FILE
    if not path.is_file():
        return None
    try:
        return LinearMaps(load_file(str(path)))
    except SlimDiffError:
        raise
    except Exception as exc:  # safetensors raises assorted types on a damaged file
        raise SlimDiffError(f"corrupt {MAPS_FILE} in {str(folder)!r}: {exc}") from exc
