"""Train the proxy pipeline on one GPU within a wall-clock deadline, evaluate it, and pack it for the trip back.

One command, deadline-driven end to end (``--deadline`` seconds from the start of this script, default 525):

1. :func:`slimdiff.proxy.train.train_budgeted` with the ``GPU`` preset: scenes rendered by a process pool, the
   VAE (time-budgeted), latents of every scene and its allowed mirror, UNet + text encoder until
   ``deadline − reserve`` (step count fitted to the measured step time), the EMA pipeline saved (safetensors);
2. the pipeline folder packed as an uncompressed tar stream split into parts of at most ``--part-mb`` MB
   (``proxy.tar.part-aa``, ``-ab``, ...), then reassembled and extracted here as a check;
3. dense adherence of the *reassembled* pipeline, exactly as ``python -m slimdiff.proxy.evaluate --seeds 0 1``
   (64 held-out prompts of prompt seed 12345 × seeds 0, 1; 25 PNDM steps, guidance 5), by attribute; then,
   if time is left, the same on 64 train-split prompts.

Written to ``$OUT`` (when set) or ``--out``, flat, at most 6 files: ``proxy.tar.part-a?`` (≤ 4),
``proxy_gpu_report.json`` (rewritten after every stage, so a killed run still leaves one) and
``heldout_grid.png``; the caller tees the log to ``proxy.log``. Reassemble the pipeline folder with::

    cat OUTDIR/proxy.tar.part-* | tar -x -C DEST      # → DEST/proxy/ (model_index.json, unet/, ...)

The report lists every part with its sha256 and the sha256 of the whole tar stream.

CPU check (seconds): ``python bench/proxy_gpu.py --smoke --device cpu --out /tmp/proxy-smoke``.
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPORT = "proxy_gpu_report.json"
PART_PREFIX = "proxy.tar.part-"
MAX_PARTS = 4


def _log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def pack_folder(folder: Path, out: Path, part_bytes: int, arcname: str = "proxy") -> dict:
    """Uncompressed tar of ``folder`` (as ``arcname/``) split into ``out/proxy.tar.part-aa, -ab, ...``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(folder), arcname=arcname, recursive=True)
    data = buf.getvalue()
    n = -(-len(data) // part_bytes)
    if n > MAX_PARTS:
        raise RuntimeError(f"the pipeline tar is {len(data) / 1e6:.1f} MB: more than {MAX_PARTS} parts")
    for old in out.glob(PART_PREFIX + "*"):
        old.unlink()
    parts = []
    for k in range(n):
        name = PART_PREFIX + "a" + "abcdefghijklmnopqrstuvwxyz"[k]
        chunk = data[k * part_bytes:(k + 1) * part_bytes]
        (out / name).write_bytes(chunk)
        parts.append({"file": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return {"tar_bytes": len(data), "tar_sha256": hashlib.sha256(data).hexdigest(), "parts": parts,
            "reassemble": f"cat {PART_PREFIX}* | tar -x -C DEST   # gives DEST/{arcname}/"}


def unpack_parts(out: Path, dest: Path) -> Path:
    """Reassemble ``out/proxy.tar.part-*`` (sorted) and extract into ``dest``; returns ``dest/proxy``."""
    data = b"".join(p.read_bytes() for p in sorted(out.glob(PART_PREFIX + "*")))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(dest)
    return dest / "proxy"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/proxy-gpu", help="output folder when $OUT is not set")
    ap.add_argument("--deadline", type=float, default=525.0, help="seconds from the start for everything")
    ap.add_argument("--reserve", type=float, default=None,
                    help="seconds kept after training for saving, packing and evaluation (default 55; smoke 20)")
    ap.add_argument("--vae-seconds", type=float, default=50.0, help="VAE phase budget (at most 20%% of the time)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--processes", type=int, default=None, help="render processes (default: cores − 1)")
    ap.add_argument("--n-latents", type=int, default=None, help="distinct training scenes (default: preset)")
    ap.add_argument("--unet-batch", type=int, default=None)
    ap.add_argument("--eval-n", type=int, default=64, help="held-out prompts")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-eval-n", type=int, default=64, help="train-split prompts (0: skip)")
    ap.add_argument("--part-mb", type=float, default=15.0)
    ap.add_argument("--smoke", action="store_true", help="tiny models and data, for a CPU check in seconds")
    args = ap.parse_args(argv)

    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = T0 + args.deadline
    reserve = args.reserve if args.reserve is not None else (20.0 if args.smoke else 55.0)
    report: dict = {"argv": sys.argv[1:], "deadline_s": args.deadline, "reserve_s": reserve, "status": "started",
                    "stage_seconds": {}}

    def write_report():
        report["wall_seconds"] = round(time.time() - T0, 2)
        tmp = out / (REPORT + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        os.replace(tmp, out / REPORT)

    write_report()
    work = Path(tempfile.mkdtemp(prefix="proxy-gpu-"))
    try:
        import torch

        from slimdiff.proxy import train as ptrain

        report["stage_seconds"]["imports"] = round(time.time() - T0, 2)
        dev = torch.device(args.device)
        info = {"torch": torch.__version__, "python": platform.python_version(), "host_cpus": os.cpu_count(),
                "device": args.device}
        if dev.type == "cuda":  # no CUDA call before train_budgeted has forked its render pool
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
            info.update(cuda=torch.version.cuda)
        else:
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        try:
            import diffusers
            import transformers

            info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
        except Exception as e:  # pragma: no cover
            info["import_error"] = repr(e)
        report["environment"] = info
        _log(f"environment: {info}")

        if args.smoke:
            over = dict(ptrain.TINY, hflip=True, ema_fraction=0.1, text_lr_mult=1.5, n_latents=1024, vae_batch=16,
                        unet_batch=16, vae_steps=100_000, unet_steps=100_000, warmup=5, eval_prompts=0)
        else:
            over = dict(ptrain.GPU)
        if args.n_latents:
            over["n_latents"] = args.n_latents
        if args.unet_batch:
            over["unet_batch"] = args.unet_batch
        cfg = ptrain.ProxyConfig(**over)
        folder = work / "proxy"

        def progress(summary):
            report["training"] = summary
            report["stage_seconds"].update(summary.get("stage_seconds", {}))
            write_report()

        report["status"] = "training"
        summary = ptrain.train_budgeted(cfg, folder, device=args.device, deadline=deadline, reserve=reserve,
                                        vae_seconds=args.vae_seconds, processes=args.processes,
                                        log=_log, progress=progress)
        if dev.type == "cuda":
            info.update(gpu=torch.cuda.get_device_name(dev), cudnn=torch.backends.cudnn.version(),
                        max_memory_gb=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2))
        progress(summary)
        report["status"] = "trained"

        t = time.time()
        report["pack"] = pack_folder(folder, out, int(args.part_mb * 1e6))
        report["pipeline_bytes"] = summary["bytes"]
        back = unpack_parts(out, work / "unpacked")
        report["stage_seconds"]["pack"] = round(time.time() - t, 2)
        report["status"] = "packed"
        write_report()
        _log(f"packed into {len(report['pack']['parts'])} parts ({report['pack']['tar_bytes'] / 1e6:.1f} MB)")

        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        from slimdiff.proxy.evaluate import adherence, save_grid
        from slimdiff.proxy.shapes import ShapesDataset, heldout_prompts

        t = time.time()
        pipe = StableDiffusionPipeline.from_pretrained(str(back), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(args.device)
        saved = UNet2DConditionModel.from_pretrained(str(folder / "unet")).state_dict()
        same = all(torch.equal(v.cpu(), saved[k]) for k, v in pipe.unet.state_dict().items())
        report["reassembled_unet_identical"] = same
        evals = {}
        for split, n in (("heldout", args.eval_n), ("train", args.train_eval_n)):
            if n <= 0:
                continue
            if split == "train" and time.time() > deadline - 5:
                _log("no time left for the train-split evaluation")
                break
            te = time.time()
            if split == "heldout":
                prompts = heldout_prompts(n, seed=12345)
            else:
                prompts = [ShapesDataset(n, seed=12345).scene(i).caption for i in range(n)]
            rep = adherence(pipe, prompts, args.eval_seeds, steps=25, guidance=5.0, batch_size=64,
                            keep_images=split == "heldout")
            evals[split] = {"prompts": n, "prompt_seed": 12345, "seeds": args.eval_seeds, "steps": 25,
                            "guidance": 5.0, "adherence": rep.score, "per_kind": rep.per_kind,
                            "seconds": round(time.time() - te, 2),
                            "records": rep.records if split == "heldout" else None}
            _log(f"{split} adherence {rep.score:.3f} {json.dumps({k: round(v, 3) for k, v in rep.per_kind.items()})}")
            if split == "heldout":
                save_grid(out / "heldout_grid.png", rep.images, cols=16)
            report["adherence"] = {k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in evals.items()}
            report["heldout_records"] = evals.get("heldout", {}).get("records")
            write_report()
        report["stage_seconds"]["evaluate"] = round(time.time() - t, 2)
        report["status"] = "done"
        return_code = 0
    except BaseException as e:
        report["status"] = "failed"
        report["error"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
        _log("FAILED:\n" + report["error"])
        return_code = 1
    finally:
        report["files"] = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
        write_report()
        shutil.rmtree(work, ignore_errors=True)
    _log(f"status {report['status']}; wall {time.time() - T0:.1f}s; report {out / REPORT}")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
