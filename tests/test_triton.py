"""The Triton model repository: configurations read back through Triton's own protobuf schema, and a repository
written by ``slimdiff-export --triton-repo`` served by a real ``tritonserver`` (the one bundled in the
nvidia-pytriton wheel: python backend only, on the CPU, loopback, free ports, stopped by the test)."""

import json

import numpy as np
import pytest
from export_support import cached_cli_export, write_slim_pipeline

from slimdiff.engines import engine_meta_path
from slimdiff.errors import SlimDiffError

pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The test run's ``slimdiff-export --triton-repo`` (python mode) of builtin:tiny: ORT engines of the dense and
    the slim UNet in ``root/engines``, the repository in ``root/repo``."""
    root, _ = cached_cli_export(tmp_path_factory)
    return root


@pytest.fixture(scope="module")
def ort_engine(exported):
    """The dense UNet's ONNX Runtime engine folder, as slimdiff-export built it."""
    return exported / "engines" / "dense"


def _inputs(config):
    return {t.name: t for t in config.input}


def test_onnxruntime_config_reads_back_with_batching_shapes_and_files(ort_engine, tmp_path):
    from slimdiff.engines import triton

    meta = triton.add_engine_model(tmp_path, "unet", ort_engine, "unet", "native")
    config = triton.read_config(tmp_path / "unet" / "config.pbtxt")
    pb, _ = triton._pb()
    assert config.name == "unet" and config.backend == "onnxruntime" and config.platform == ""
    assert config.default_model_filename == "model.onnx" and (tmp_path / "unet" / "1" / "model.onnx").is_file()
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    inputs = _inputs(config)
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert list(inputs["sample"].dims) == [4, -1, -1] and inputs["sample"].data_type == pb.TYPE_FP32
    # The timestep is one number per batch item: declared [1] to Triton, reshaped to [] for the engine.
    assert list(inputs["timestep"].dims) == [1] and inputs["timestep"].HasField("reshape")
    assert list(inputs["timestep"].reshape.shape) == []
    assert list(inputs["encoder_hidden_states"].dims) == [-1, 64]
    assert [(o.name, list(o.dims)) for o in config.output] == [("out_sample", [4, -1, -1])]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert json.loads((tmp_path / "unet" / "engine.json").read_text()) == meta


def test_tensorrt_config_names_the_plan_fp16_and_the_gpu(ort_engine, tmp_path):
    """A TensorRT engine's configuration, from metadata as a TensorRT build writes it (no TensorRT here)."""
    from slimdiff.engines import triton

    meta = json.loads(engine_meta_path(ort_engine).read_text())
    meta.update(engine="trt", device="cuda", dtype="float16", file="unet.plan", files=["unet.plan"],
                inputs=[{**i, "dtype": "float16" if i["dtype"] == "float32" and i["name"] != "timestep" else i["dtype"]}
                        for i in meta["inputs"]])
    folder = tmp_path / "trt"
    folder.mkdir()
    (folder / "unet.plan").write_bytes(b"serialized engine")
    engine_meta_path(folder).write_text(json.dumps(meta))
    triton.add_engine_model(tmp_path / "repo", "unet", folder, "unet", "native", dynamic_batching=False)
    config = triton.read_config(tmp_path / "repo" / "unet" / "config.pbtxt")
    pb, _ = triton._pb()
    assert config.platform == "tensorrt_plan" and config.backend == "" and config.default_model_filename == "model.plan"
    assert (tmp_path / "repo" / "unet" / "1" / "model.plan").read_bytes() == b"serialized engine"
    assert [t.data_type for t in config.input] == [pb.TYPE_FP16, pb.TYPE_FP32, pb.TYPE_FP16]
    assert config.output[0].data_type == pb.TYPE_FP16 and not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU


def test_a_slim_folder_exports_the_repository_of_its_pipeline(exported, tmp_path):
    """`slimdiff-export --model SLIM --triton-repo`: the slim folder's pipeline (the model it was slimmed from around
    its slim UNet) is served — slim once, then export from the folder. Its engine is the slim UNet's, and the
    repository draws the image of the one the dense model's export wrote around the same slim weights."""
    from slimdiff.cli.export import main
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline
    from slimdiff.serialization import load_slim

    slim = exported / "engines" / "slim-unet"
    assert main(["--model", str(slim), "--engine", "ort", "--out", str(tmp_path / "engines"), "--triton-repo",
                 str(tmp_path / "repo"), "--triton-mode", "python", "--batch", "2", "--height", "32", "--width",
                 "32", "--text-len", "77"]) == 0  # the one size drawn here: a shorter export
    rows = json.loads((tmp_path / "engines" / "export.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["slim"]
    assert rows[0]["parameters"] == sum(p.numel() for p in load_slim(slim).parameters())
    images = [generate(repository_pipeline(repo / "pipeline" / "1", local_runners(repo)), "a red circle", seed=3,
                       steps=2) for repo in (tmp_path / "repo", exported / "repo")]
    assert images[0].std() > 1 and np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


def test_a_slim_pipeline_folder_exports_its_slim_unet_and_serves_one_prompt_at_a_static_batch(tmp_path):
    """`slimdiff-export --model DIR` of a slim pipeline folder (`slimdiff slim --save-pipeline`): slim already, so
    its UNet is exported as it is — no dense engine, no calibration (it used to be taken for a dense model and
    slimmed again). `--batch 2` is the UNet's batch under guidance: the text encoder and VAE engines still take one
    prompt's single image, so the repository answers a one-image request (it used to refuse it)."""
    import contextlib
    import io

    from slimdiff.cli.export import main
    from slimdiff.engines import load_engine_meta
    from slimdiff.models import load_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    folder = write_slim_pipeline(tmp_path / "slim-pipeline")
    out, repo = tmp_path / "engines", tmp_path / "repo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = main(["--model", str(folder), "--engine", "ort", "--out", str(out), "--triton-repo", str(repo),
                   "--triton-mode", "python", "--batch", "2", "--height", "32", "--width", "32", "--text-len", "77"])
    assert rc == 0, printed.getvalue()
    assert "calibration" not in printed.getvalue() and "slimming" not in printed.getvalue()
    export = json.loads((out / "export.json").read_text())
    pipe = load_pipeline(str(folder))
    assert [r["variant"] for r in export["rows"]] == ["slim"] and export["dense_model"] is None
    assert export["rows"][0]["parameters"] == sum(p.numel() for p in pipe.unet.parameters())
    assert export["slim_model"] == str((folder / "unet").resolve())
    for name, batch in (("unet", [2, 2]), ("text_encoder", [1, 2]), ("vae_decoder", [1, 2])):
        meta, _ = load_engine_meta(out / ("slim" if name == "unet" else name), name)
        assert [meta["axes"]["batch"][k] for k in ("min", "max")] == batch, name
    served = generate(repository_pipeline(repo / "pipeline" / "1", local_runners(repo)), "a red circle", seed=3,
                      steps=2, height=32, width=32)
    use_engine(pipe, out / "slim")
    pipe.set_progress_bar_config(disable=True)
    drawn = generate(pipe, "a red circle", seed=3, steps=2, height=32, width=32)
    assert served.std() > 1 and np.abs(served.astype(int) - drawn.astype(int)).max() <= 1


def test_new_weights_become_the_next_version_of_a_served_engine(exported, tmp_path):
    """``add_weights_version``: the slim UNet's engine with a fused LoRA's weights (the slim folder's UNet, its
    attention and FFN Linears changed) becomes version 2 of the repository's ``unet``, the version Triton serves;
    the repository's pipeline then draws what diffusers' pipeline draws around the changed PyTorch UNet. Mistakes
    are refused in one line, nothing written."""
    import shutil

    import torch

    from slimdiff.engines.triton import model_versions
    from slimdiff.models import load_pipeline
    from slimdiff.runtime import add_weights_version
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline
    from slimdiff.serialization import load_slim

    engines, repo = exported / "engines", tmp_path / "repo"
    shutil.copytree(exported / "repo", repo)
    styled = load_slim(engines / "slim-unet")
    with torch.no_grad():
        for name, param in styled.named_parameters():
            if ".transformer_blocks." in name and name.endswith(("to_q.weight", "ff.net.2.weight")):
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    version = add_weights_version(repo, "unet", engines / "slim", styled)
    assert version == repo / "unet" / "2" and model_versions(repo / "unet") == [1, 2]
    assert sorted(p.name for p in version.iterdir()) == ["model.py", "unet.engine.json", "unet.ort.onnx"]
    assert not [p for p in (repo / "unet").iterdir() if p.name.startswith(".")]  # nothing staged is left

    def image(repository):
        return generate(repository_pipeline(repository / "pipeline" / "1", local_runners(repository)), "a red circle",
                        seed=3, steps=2)

    pipe = load_pipeline("builtin:tiny")
    pipe.unet = styled
    pipe.set_progress_bar_config(disable=True)
    served, expected = image(repo), generate(pipe, "a red circle", seed=3, steps=2)
    assert served.std() > 1 and np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(served, image(exported / "repo"))  # version 1: the slim UNet's own weights
    for folder, model, module, message in [
            (engines / "dense", "unet", styled, "holds another engine than model 'unet'"),
            (version, "unet", styled, "a repository's version folder holds the engine alone"),
            (engines / "slim", "unet", load_pipeline("builtin:tiny").unet, "has shape"),  # the dense UNet's weights
            (engines / "slim", "pipeline", styled, "no engine model of a slimdiff Triton repository")]:
        with pytest.raises(SlimDiffError, match=message):
            add_weights_version(repo, model, folder, module)
    assert model_versions(repo / "unet") == [1, 2] and not [p for p in (repo / "unet").iterdir() if p.name[0] == "."]
    # a native-mode model (Triton's onnxruntime backend: model.onnx) takes its next version in its own layout, the
    # very graph the python-mode version holds
    from slimdiff.engines.triton import add_engine_model

    add_engine_model(tmp_path / "native", "unet", engines / "slim", "unet", "native")
    native = add_weights_version(tmp_path / "native", "unet", engines / "slim", styled)
    assert sorted(p.name for p in native.iterdir()) == ["model.onnx"]
    import onnx
    from onnx import numpy_helper

    weights = [{i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
               for path in (native / "model.onnx", version / "unet.ort.onnx")]
    assert weights[0].keys() == weights[1].keys() and all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bad_repository_requests_fail_early(tmp_path):
    from slimdiff.engines import triton

    with pytest.raises(SlimDiffError, match="no native backend for aoti|built from ONNX"):
        triton.check_mode("aoti", "native")
    with pytest.raises(SlimDiffError, match="mode must be one of native, python"):
        triton.check_mode("ort", "grpc")
    with pytest.raises(SlimDiffError, match="needs the whole pipeline"):
        triton.check_pipeline(None)
    (tmp_path / "config.pbtxt").write_text("name: \"unet\"\nmax_batch_size: four\n")
    with pytest.raises(SlimDiffError, match="not a valid Triton model configuration"):
        triton.read_config(tmp_path / "config.pbtxt")


def test_a_repository_whose_unet_cannot_take_a_request_is_said_before_any_work(tmp_path, capsys, monkeypatch):
    """A request draws one image, a UNet batch of 2 under classifier-free guidance or 1 at guidance_scale <= 1.
    `--batch 1 --triton-repo`: only unguided requests could be served (a guidance-free model's, SDXL-Turbo's: a note,
    not a refusal); `--batch 4`: none (refused); both said before calibration starts. A batch reaching 2: no note."""
    from slimdiff.cli import export as cli

    def stop(*_, **__):
        raise SlimDiffError("stopped before calibration")

    monkeypatch.setattr(cli, "_calibration_loop", stop)
    note = ("note: --batch 1 leaves out the 2 unet rows the served StableDiffusionPipeline runs per image under "
            "classifier-free guidance: the repository answers only requests with guidance_scale <= 1 (a request's "
            "default is 7.5); give --batch 2 to serve guided requests")
    refusal = ("--batch 4: the served StableDiffusionPipeline draws one image a request, a unet batch of 2 (guided) "
               "or 1: give a --batch that takes 2")
    for batch, noted, last_line in (("1", True, "stopped before calibration"), ("1:1:2", False,
                                    "stopped before calibration"), ("4", False, refusal)):
        rc = cli.main(["--model", "builtin:tiny", "--engine", "ort", "--out", str(tmp_path / "engines"),
                       "--triton-repo", str(tmp_path / "repo"), "--triton-mode", "python", "--batch", batch])
        err = capsys.readouterr().err
        assert rc != 0 and err.strip().splitlines()[-1].endswith(last_line), err
        assert (note.replace("--batch 1", f"--batch {batch}") in err) is noted, err
        assert not (tmp_path / "engines").exists() and not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------------------------------------
# A real tritonserver
# ---------------------------------------------------------------------------------------------------------

def test_engine_models_start_without_diffusers(exported):
    """Every model of a python-backend repository runs in a stub process of its own: the engine models' model.py,
    as written, opens its engine importing no diffusers or transformers (seconds and hundreds of MB per stub)."""
    import subprocess
    import sys

    version = exported / "repo" / "unet" / "1"
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('model', {str(version / 'model.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "model = module.TritonPythonModel()\n"
        f"model.initialize({{'model_repository': {str(version.parent)!r}, 'model_version': '1'}})\n"
        "assert model.outputs, 'no engine opened'\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


PROMPTS = [("a red circle above a blue square", 3), ("two green triangles", 11)]


@pytest.fixture(scope="module")
def served_repository(exported, tmp_path_factory):
    """The exported repository served by the bundled tritonserver."""
    pytest.importorskip("pytriton")
    from slimdiff.engines.triton import local_server

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with local_server(exported / "repo", timeout_s=180, log=log) as urls:
        yield exported, urls


def _served_image(url, prompt, seed, steps=4):
    import tritonclient.http as httpclient

    from slimdiff.engines.triton import request_image

    return request_image(httpclient.InferenceServerClient(url, network_timeout=120), prompt, seed, steps)


def test_served_pipeline_gives_the_in_process_image(served_repository):
    from slimdiff.models import load_pipeline
    from slimdiff.runtime import use_engine
    from slimdiff.runtime.triton_models import generate, local_runners, repository_pipeline

    root, urls = served_repository
    repo = root / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "text_encoder", "unet", "vae_decoder"]
    in_process = repository_pipeline(repo / "pipeline" / "1", local_runners(repo))
    diffusers_pipe = load_pipeline("builtin:tiny")  # PyTorch text encoder and VAE, the slim UNet engine
    use_engine(diffusers_pipe, root / "engines" / "slim")
    diffusers_pipe.set_progress_bar_config(disable=True)
    for prompt, seed in PROMPTS:
        served = _served_image(urls["http"], prompt, seed)
        assert served.shape == (32, 32, 3) and served.dtype == np.uint8
        # Same engines, same diffusers loop, run in this process: the very same image.
        assert np.array_equal(served, generate(in_process, prompt, seed=seed, steps=4))
        # diffusers' own pipeline with its PyTorch text encoder and VAE: equal up to float rounding.
        reference = generate(diffusers_pipe, prompt, seed=seed, steps=4)
        assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1
        assert served.std() > 1  # an image with content, not a flat fill
    assert not np.array_equal(_served_image(urls["http"], *PROMPTS[0]), _served_image(urls["http"], PROMPTS[0][0], 4))


def test_served_engine_model_batches_and_reports_errors(served_repository):
    import tritonclient.http as httpclient

    _, urls = served_repository
    client = httpclient.InferenceServerClient(urls["http"], network_timeout=60)
    gen = np.random.default_rng(0)
    ids = gen.integers(0, 100, size=(3, 77)).astype(np.int64)
    tensor = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    out = client.infer("text_encoder", [tensor]).as_numpy("last_hidden_state")
    assert out.shape == (3, 77, 64) and np.isfinite(out).all()
    # A request the engine cannot take is answered with an error, and the server keeps serving.
    bad = httpclient.InferInput("input_ids", [1, 77], "INT64")
    bad.set_data_from_numpy(np.full((1, 77), 10**9, dtype=np.int64))
    with pytest.raises(Exception, match="text_encoder|index|out of|Gather"):
        client.infer("text_encoder", [bad])
    assert client.is_server_ready()
