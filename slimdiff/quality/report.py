"""Report files: JSON, Markdown tables and labelled PNG grids of samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

GRID_THUMB = 128  # grid cells are resized to at most this many pixels (SD's 512² images stay readable)


def _jsonable(value):
    """NaN/inf are not JSON; they become null (metrics document what an absent value means)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def write_json(path: Path, body: dict) -> None:
    Path(path).write_text(json.dumps(_jsonable(body), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def save_images(folder: Path, images: np.ndarray) -> None:
    """One PNG per image, ``00000.png`` … in prompt order (the layout FID tools read)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(to_uint8(im)).save(folder / f"{i:05d}.png")


def save_grid(path: Path, rows: Sequence[tuple[str, np.ndarray]], columns: int) -> None:
    """A PNG with one labelled row per model: the first ``columns`` images of each, same seeds per column."""
    columns = min(columns, min(len(images) for _, images in rows))
    h, w = rows[0][1].shape[1:3]
    scale = min(1.0, GRID_THUMB / max(h, w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    pad = 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + int(max(measure.textlength(label) for label, _ in rows))
    grid = Image.new("RGB", (label_w + columns * (tw + pad) + pad, len(rows) * (th + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (th + pad)
        draw.text((4, y + th // 2 - 5), label, fill=(0, 0, 0))
        for c in range(columns):
            cell = Image.fromarray(to_uint8(images[c]))
            if (th, tw) != (h, w):
                cell = cell.resize((tw, th), Image.LANCZOS)
            grid.paste(cell, (label_w + pad + c * (tw + pad), y))
    grid.save(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cost_row(name: str, side: dict) -> list:
    macs = side.get("macs")
    return [name, side["source"], f"{side['params'] / 1e6:.3f} M",
            f"{macs / 1e6:.2f} M" if macs is not None else f"n/a ({side.get('macs_skipped')})"]


def eval_markdown(report: dict) -> str:
    """The human-readable side of a ``slimdiff eval`` report."""
    m, s = report["metrics"], report["settings"]
    lines = ["# Quality: slim vs dense", "", f"**Model:** {report['label']}", ""]
    lines += [markdown_table(["", "source", "UNet params", "MACs / UNet call (batch 1)"],
                             [_cost_row("dense", report["dense"]), _cost_row("slim", report["slim"])]), ""]
    lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in s.items()), ""]
    fid_ = m["fidelity"]
    rows = [
        ["noise-prediction error ‖ε_slim−ε_dense‖/‖ε_dense‖ (dense trajectory, mean over steps)",
         m["noise_prediction_error"]["mean"]],
        ["PSNR vs dense (dB, mean; identical pairs counted at "
         f"{fid_['psnr_db']['cap_db']:.0f} dB: {fid_['psnr_db']['identical_pairs']})", fid_["psnr_db"]["mean"]],
        ["SSIM vs dense (mean)", fid_["ssim"]["mean"]],
    ]
    for key, title in (("lpips", "LPIPS vs dense"), ("adherence", "prompt adherence"), ("clip_score", "CLIP score"),
                       ("fid", "FID vs real images")):
        v = m[key]
        if "skipped" in v:
            rows.append([title, f"skipped: {v['skipped']}"])
        elif key == "adherence":
            se = v["delta"]["stderr_points"]
            rows.append([title, f"dense {v['dense']['score']:.4f}, slim {v['slim']['score']:.4f} "
                                f"(Δ {v['delta_points']:+.2f} points" + (f" ± {se:.2f} s.e., paired)" if se is not None else ")")])
        elif key == "lpips":
            rows.append([f"{title} ({v['backbone']})", v["slim"]["mean"]])
        elif key == "clip_score":
            rows.append([f"{title} ({v['backbone']}, {v['scale']})", f"dense {v['dense']:.4f}, slim {v['slim']:.4f}"])
        else:
            rows.append([f"{title} ({v['library']})", f"dense {v['dense']:.3f}, slim {v['slim']:.3f}"])
    lines += [markdown_table(["metric", "value"], rows), ""]
    npe = m["noise_prediction_error"]
    lines += ["## Noise-prediction error per UNet call", "",
              markdown_table(["call", "timestep", "mean", "std"],
                             [[i, t, e, sd] for i, (t, e, sd) in
                              enumerate(zip(npe["timesteps"], npe["per_step"], npe["per_step_std"]))]), ""]
    lines += ["`grid.png`: dense row above slim row; each column is one prompt and seed.", ""]
    return "\n".join(lines)
