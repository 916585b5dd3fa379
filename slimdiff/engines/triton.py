"""A Triton Inference Server model repository from built engines, and a local server to try it on.

Layout written by :func:`write_repository` (``slimdiff-export ... --triton-repo DIR``)::

    DIR/unet/config.pbtxt            platform "tensorrt_plan" | backend "onnxruntime" | backend "python"
    DIR/unet/engine.json             the engine metadata (TensorRT version and GPU, profiles, signature...)
    DIR/unet/1/model.plan | model.onnx (+ external data) | the engine folder + model.py (python backend)
    DIR/text_encoder/...             the same for the text encoder
    DIR/vae_decoder/...              the same for the VAE decoder
    DIR/pipeline/config.pbtxt        python backend: prompt in, image out (tokenizer, scheduler, CFG), calling
    DIR/pipeline/1/model.py          the three models above through Triton's BLS
    DIR/pipeline/1/{tokenizer,scheduler,text_encoder,vae}/ and unet.engine.json: what the loop needs

``config.pbtxt`` files are written from Triton's own protobuf schema (``tritonclient.grpc.model_config_pb2``)
with ``google.protobuf.text_format``. Each model's inputs and outputs are named, typed and shaped from the
engine's metadata: the batch axis becomes ``max_batch_size`` (the engine's largest batch) with dynamic
batching, axes whose range is one value stay fixed, the others are ``-1``; inputs that are only a batch
(``timestep``) are declared ``[1]`` and reshaped to ``[]``.

The ``python`` serving mode runs the engines with slimdiff inside Triton's python backend (any backend of
:mod:`slimdiff.engines` on the device it was built for): it is what a CPU-only ``tritonserver`` — such as the
one bundled in the ``nvidia-pytriton`` wheel, with only the python backend — can serve, and what the tests use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from ..errors import SlimDiffError
from ..export.meta import status
from .base import get, load_engine_meta

MODES = ("native", "python")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PIPELINE = "pipeline"
#: Pipelines whose text-to-image loop the ``pipeline`` model runs.
PIPELINE_CLASSES = ("StableDiffusionPipeline",)
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                  "uint8": "TYPE_UINT8"}
_MODEL_PY = {
    "engine": "from slimdiff.runtime.triton_models import EngineModel as TritonPythonModel  # noqa: F401\n",
    PIPELINE: "from slimdiff.runtime.triton_models import PipelineModel as TritonPythonModel  # noqa: F401\n",
}


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise SlimDiffError(f"writing a Triton repository needs tritonclient (pip install 'slimdiff[serve]'): {exc}") \
            from None
    return model_config_pb2, text_format


def check_mode(kind: str, mode: str) -> None:
    """Refuse a serving mode a backend cannot do, before any work."""
    if mode not in MODES:
        raise SlimDiffError(f"Triton serving mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not get(kind).from_onnx:
        raise SlimDiffError(f"Triton repositories are written for engines built from ONNX, not {kind} engines")
    if mode == "native" and get(kind).triton_model({}) is None:
        raise SlimDiffError(f"Triton has no native backend for {kind} engines; serve them with --triton-mode python")


def batch_dims(meta: dict) -> tuple[int, dict[str, list[int]]]:
    """``(max_batch_size, {tensor name: dims without the batch axis})`` for an engine: -1 for dynamic axes.
    ``max_batch_size`` is 0 (no batching) unless every input starts with the batch axis."""
    axes = meta["axes"]

    def dim(d):
        if isinstance(d, int):
            return d
        r = axes.get(d)
        return r["min"] if r and r["min"] == r["max"] else -1

    batched = "batch" in axes and all(i["dims"][:1] == ["batch"] for i in meta["inputs"])
    shapes = {i["name"]: [dim(d) for d in (i["dims"][1:] if batched else i["dims"])] for i in meta["inputs"]}
    out = meta.get("output_dims")
    if out is None:
        raise SlimDiffError(f"{meta['engine']} engine metadata records no output shape; rebuild it with this slimdiff")
    shapes[meta["output"]] = [-1 if isinstance(d, str) else d for d in (out[1:] if batched else out)]
    return (axes["batch"]["max"] if batched else 0), shapes


def model_config(name: str, meta: dict, mode: str, *, dynamic_batching: bool = True, instances: int = 1):
    """The ``ModelConfig`` protobuf for engine ``meta`` served as ``mode``."""
    pb, _ = _pb()
    config = pb.ModelConfig(name=name)
    if mode == "python":
        config.backend = "python"
    else:
        native = get(meta["engine"]).triton_model(meta)
        config.platform, config.backend = native.platform, native.backend
        config.default_model_filename = native.model_file
    max_batch, shapes = batch_dims(meta)
    config.max_batch_size = max_batch
    dtypes = {i["name"]: i["dtype"] for i in meta["inputs"]}
    dtypes[meta["output"]] = meta["dtype"]
    for tensors, names in ((config.input, [i["name"] for i in meta["inputs"]]), (config.output, [meta["output"]])):
        for tensor_name in names:
            t = tensors.add(name=tensor_name, data_type=getattr(pb, _TRITON_DTYPES[dtypes[tensor_name]]))
            dims = shapes[tensor_name]
            t.dims.extend(dims or [1])
            if not dims:  # a per-item scalar (the timestep): Triton wants a dimension, the engine has none
                t.reshape.SetInParent()
    group = config.instance_group.add(count=instances)
    group.kind = pb.ModelInstanceGroup.KIND_GPU if str(meta["device"]).startswith("cuda") else \
        pb.ModelInstanceGroup.KIND_CPU
    if max_batch and dynamic_batching:
        config.dynamic_batching.SetInParent()
    return config


def pipeline_config(*, instances: int):
    pb, _ = _pb()
    config = pb.ModelConfig(name=PIPELINE, backend="python", max_batch_size=0)
    config.input.add(name="prompt", data_type=pb.TYPE_STRING, dims=[1])
    for name, dtype in (("negative_prompt", pb.TYPE_STRING), ("seed", pb.TYPE_INT64), ("steps", pb.TYPE_INT32),
                        ("guidance_scale", pb.TYPE_FP32), ("height", pb.TYPE_INT32), ("width", pb.TYPE_INT32)):
        config.input.add(name=name, data_type=dtype, dims=[1], optional=True)
    config.output.add(name="image", data_type=pb.TYPE_UINT8, dims=[-1, -1, 3])
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    return config


def request_image(client, prompt: str, seed: int, steps: int):
    """Ask the repository's ``pipeline`` model for one image (``uint8`` H×W×3) through a ``tritonclient.http``
    ``InferenceServerClient``; the optional inputs it leaves out take the model's defaults."""
    import numpy as np
    import tritonclient.http as httpclient

    inputs = []
    for name, value, dtype in (("prompt", np.array([prompt], dtype=object), "BYTES"),
                               ("seed", np.array([seed], dtype=np.int64), "INT64"),
                               ("steps", np.array([steps], dtype=np.int32), "INT32")):
        tensor = httpclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return client.infer(PIPELINE, inputs).as_numpy("image")


def write_config(path: Path, config) -> None:
    _, text_format = _pb()
    Path(path).write_text(text_format.MessageToString(config), encoding="utf-8")


def read_config(path: Path):
    """A ``config.pbtxt`` parsed back into Triton's ``ModelConfig`` (raises on anything Triton would not parse)."""
    pb, text_format = _pb()
    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise SlimDiffError(f"{str(path)!r} is not a valid Triton model configuration: {exc}") from None


def add_engine_model(repo: Path, name: str, engine_folder: Path, component: str, mode: str, *,
                     dynamic_batching: bool = True, instances: int = 1) -> dict:
    """Add model ``name`` serving the ``component`` engine in ``engine_folder``; returns its metadata."""
    meta, folder = load_engine_meta(engine_folder, component)
    model = Path(repo) / name
    version = model / "1"
    version.mkdir(parents=True)
    if mode == "python":
        for f in meta["files"]:
            shutil.copy2(folder / f, version / f)
        shutil.copy2(folder / f"{component}.engine.json", version / f"{component}.engine.json")
        (version / "model.py").write_text(_MODEL_PY["engine"], encoding="utf-8")
    else:
        native = get(meta["engine"]).triton_model(meta)
        shutil.copy2(folder / meta["file"], version / native.model_file)
        for f in meta["files"][1:]:  # external data keeps the name the graph refers to
            shutil.copy2(folder / f, version / f)
    (model / "engine.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    write_config(model / "config.pbtxt", model_config(name, meta, mode, dynamic_batching=dynamic_batching,
                                                      instances=instances))
    return meta


def add_pipeline_model(repo: Path, pipe, metas: dict[str, dict], *, instances: int) -> None:
    """The python-backend ``pipeline`` model and what its loop needs: tokenizer, scheduler, the text encoder's
    and VAE's configs, and the metadata of the three engine models (names, dtypes, shapes, the UNet config)."""
    check_pipeline(pipe)
    version = Path(repo) / PIPELINE / "1"
    version.mkdir(parents=True)
    pipe.tokenizer.save_pretrained(version / "tokenizer")
    pipe.scheduler.save_pretrained(version / "scheduler")
    pipe.text_encoder.config.save_pretrained(version / "text_encoder")
    pipe.vae.save_config(version / "vae")
    for name, meta in metas.items():
        (version / f"{name}.engine.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (version / "model.py").write_text(_MODEL_PY[PIPELINE], encoding="utf-8")
    write_config(Path(repo) / PIPELINE / "config.pbtxt", pipeline_config(instances=instances))


def check_pipeline(pipe) -> None:
    if pipe is None:
        raise SlimDiffError("--triton-repo needs the whole pipeline (a dense model: built-in, diffusers folder or "
                            ".safetensors), not a slim UNet folder")
    if type(pipe).__name__ not in PIPELINE_CLASSES:
        raise SlimDiffError(f"--triton-repo serves {', '.join(PIPELINE_CLASSES)} so far, not {type(pipe).__name__}")


def write_repository(repo: Path, pipe, unet_folder: Path, component_folders: dict[str, Path], mode: str, *,
                     dynamic_batching: bool = True, pipeline_instances: int = 2) -> None:
    """Fill the (new, empty) folder ``repo`` with the three engine models and the pipeline model.
    ``component_folders`` maps ``text_encoder`` and ``vae_decoder`` to their engine folders."""
    check_pipeline(pipe)
    metas = {"unet": add_engine_model(repo, "unet", unet_folder, "unet", mode, dynamic_batching=dynamic_batching)}
    for component, folder in component_folders.items():
        metas[component] = add_engine_model(repo, component, folder, component, mode,
                                            dynamic_batching=dynamic_batching)
    add_pipeline_model(repo, pipe, metas, instances=pipeline_instances)
    status(f"Triton repository: {', '.join(sorted(p.name for p in Path(repo).iterdir()))} ({mode} engines)")


# ----------------------------------------------------------------------------------------------------------
# A local tritonserver (the one bundled in nvidia-pytriton: python backend only, runs on a CPU)
# ----------------------------------------------------------------------------------------------------------


def _bundled_server() -> tuple[Path, Path, Path]:
    """``(tritonserver binary, its python backend folder, its shared libraries)`` from nvidia-pytriton."""
    try:
        import pytriton
    except ImportError:
        raise SlimDiffError("a local tritonserver needs the nvidia-pytriton wheel (pip install nvidia-pytriton)") \
            from None
    root = Path(pytriton.__file__).parent
    server = root / "tritonserver" / "bin" / "tritonserver"
    stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    libs = root.parent / "nvidia_pytriton.libs"
    if not server.is_file() or not stub.is_file():
        raise SlimDiffError(f"nvidia-pytriton in {root} has no tritonserver / python backend stub for this Python")
    return server, stub, libs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(repo: Path, *, timeout_s: float = 120.0, log: Path | None = None):
    """Serve ``repo`` with the bundled ``tritonserver`` on 127.0.0.1 (free ports); yields ``{"http": url,
    "grpc": url}`` once every model is ready, and always stops the server (and its stubs) on exit.

    The python backend's stub links the system libpython, so ``LD_LIBRARY_PATH`` holds this Python's
    ``LIBDIR``; this interpreter's ``bin`` goes first on ``PATH`` so the stub imports this environment's
    packages (slimdiff, torch, diffusers)."""
    import urllib.error
    import urllib.request

    server, stub, libs = _bundled_server()
    work = Path(tempfile.mkdtemp(prefix="slimdiff-triton-"))
    backends = work / "backends"
    shutil.copytree(server.parent.parent / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    http, grpc = _free_port(), _free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), sysconfig.get_config_var("LIBDIR"),
                                                          env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    command = [str(server), "--model-repository", str(Path(repo).resolve()), "--backend-directory", str(backends),
               "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(grpc), "--allow-metrics", "false", "--exit-on-error", "true",
               "--strict-readiness", "true", "--exit-timeout-secs", "5"]
    log = Path(log) if log else work / "tritonserver.log"
    log_file = open(log, "w")
    proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise SlimDiffError(f"tritonserver exited with code {proc.returncode}: {tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SlimDiffError(f"tritonserver was not ready after {timeout_s:.0f} s: {tail()}")
            time.sleep(0.5)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "log": str(log)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its backend stubs
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)
