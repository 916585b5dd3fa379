"""Engine backends: ONNX Runtime (built and run here), AOTInductor (compiled and run here), TensorRT (everything it
consumes is tested here; the build itself needs `tensorrt` and a GPU and skips without them)."""

import json

import onnx
import pytest
import torch
from export_support import TWO_LEVEL_UNET, TWO_LEVEL_XL_UNET, slim_tiny_unet, tiny_profiles

from slimdiff.engines import build_engine, engine_meta_path, load_engine_meta
from slimdiff.engines import trt as trtmod
from slimdiff.engines.aoti import check_aoti_environment, device_info
from slimdiff.errors import SlimDiffError
from slimdiff.export.modules import component_axes, denoiser_component
from slimdiff.export.onnx import FUSED_OPS, sidecar_path
from slimdiff.export.shapes import union
from slimdiff.runtime import EngineUNet


def _profiles_json(profiles):
    return [p.to_json() for p in profiles]


def _reference(unet, batch, h, w, tokens, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen).to(device)
    t = (torch.rand(batch, generator=gen) * 999).to(device)
    e = torch.randn(batch, tokens, 64, generator=gen).to(device)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    return (x, t, e), ref


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------


def test_ort_engine_saves_optimized_model_and_metadata(slim, tmp_path):
    path, sidecar, unet = slim
    component = denoiser_component(unet)
    meta = build_engine("ort", component, tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                        dtype=torch.float32, device="cpu", onnx_path=path,
                        extra={"unet_config": dict(unet.config), "variant": "slim"})
    assert (tmp_path / "unet.ort.onnx").is_file() and meta["file"] == "unet.ort.onnx"
    assert meta["runtime"]["provider"] == "CPUExecutionProvider"
    # Polygraphy's Comparator ran the engine against its source graph after the build.
    assert meta["parity_vs_onnx"]["runner"] == "ort-engine-cpu" and meta["parity_vs_onnx"]["max_rel_error"] <= 1e-4
    assert meta["source_onnx"]["sha256"] == sidecar["sha256"]
    assert meta["size_bytes"] == (tmp_path / "unet.ort.onnx").stat().st_size
    on_disk, folder = load_engine_meta(tmp_path)
    assert on_disk == json.loads(engine_meta_path(tmp_path).read_text()) and folder == tmp_path
    optimized = onnx.load(str(tmp_path / "unet.ort.onnx"))
    assert sum(n.op_type == "Attention" for n in optimized.graph.node) == 14  # ORT kept the fused attention
    engine = EngineUNet.from_folder(tmp_path)
    for shape, seed in (((2, 16, 16, 77), 0), ((1, 8, 24, 154), 1)):
        inputs, ref = _reference(unet, *shape, seed=seed)
        got = engine(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # The runner's bound buffers are contiguous whatever the layout of the first input of a shape (ONNX Runtime
    # reads their bare memory): a channels-last latent, at a shape not bound yet, gives the same answer.
    (x, t, e), ref = _reference(unet, 1, 16, 16, 77, seed=2)
    got = engine.runner.run([x.to(memory_format=torch.channels_last), t, e], tuple(ref.shape))
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_corrupt_and_missing_engine_files(dense, tmp_path):
    path, sidecar, unet = dense
    build_engine("ort", denoiser_component(unet), tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cpu", onnx_path=path,
                 extra={"unet_config": dict(unet.config)})
    engine_file = tmp_path / "unet.ort.onnx"
    engine_file.write_bytes(b"\x08\x01garbage" * 100)
    with pytest.raises(SlimDiffError, match="cannot load"):
        EngineUNet.from_folder(tmp_path)
    engine_file.unlink()
    with pytest.raises(SlimDiffError, match="incomplete: unet.ort.onnx missing"):
        EngineUNet.from_folder(tmp_path)
    engine_meta_path(tmp_path).write_text("{\"format\": \"something-else\"}")
    with pytest.raises(SlimDiffError, match="expected 'slimdiff-engine/1'"):
        EngineUNet.from_folder(tmp_path)
    with pytest.raises(SlimDiffError, match="not an engine folder"):
        EngineUNet.from_folder(tmp_path / "nowhere")


def test_a_folder_that_is_not_the_engine_says_where_the_engines_are(tmp_path):
    """An export's output folder names its engine folders; another component's engine folder names its component."""
    (tmp_path / "export.json").write_text("{}")
    for name in ("dense", "slim", "text_encoder"):
        (tmp_path / name).mkdir()
        engine_meta_path(tmp_path / name, "unet" if name != "text_encoder" else name).write_text("{}")
    with pytest.raises(SlimDiffError, match=r"no unet.engine.json\): it is a slimdiff-export output folder, whose "
                                            r"unet engines are in its dense and slim folders$"):
        EngineUNet.from_folder(tmp_path)
    with pytest.raises(SlimDiffError, match=r"it holds the text_encoder engine, not the unet's$"):
        EngineUNet.from_folder(tmp_path / "text_encoder")


@pytest.mark.slow
def test_external_data_path_exports_builds_and_runs(tmp_path, monkeypatch):
    """The >2 GB path (weights in unet.onnx.data, ORT's optimized weights in unet.ort.onnx.data), forced on the
    two-level tiny model by lowering the threshold; builtin:sd15-shape exercises it for real in the benchmark
    script."""
    from slimdiff.export import onnx as onnxmod

    monkeypatch.setattr(onnxmod, "EXTERNAL_DATA_BYTES", 0)
    unet, _ = slim_tiny_unet(seed=7, config=TWO_LEVEL_UNET)
    static = tiny_profiles(batch="2", height="32", width="32", text_len="77")  # the shape run below: a shorter export
    sidecar = onnxmod.export_onnx(denoiser_component(unet), static, tmp_path / "unet.onnx")
    assert sidecar["external_data"] and sidecar["files"] == ["unet.onnx", "unet.onnx.data"]
    assert "onnxslim skipped" in sidecar["cleanup"] and sidecar["parity"]["max_rel_error"] <= 1e-4
    graph = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    meta = build_engine("ort", denoiser_component(unet), tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                        dtype=torch.float32, device="cpu", onnx_path=tmp_path / "unet.onnx",
                        extra={"unet_config": dict(unet.config)})
    assert meta["files"] == ["unet.ort.onnx", "unet.ort.onnx.data"]
    inputs, ref = _reference(unet, 2, 16, 16, 77, seed=0)
    got = EngineUNet.from_folder(tmp_path)(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_engine_is_not_built_from_a_changed_onnx_file(dense, tmp_path):
    path, _, unet = dense
    copy = tmp_path / "src" / "unet.onnx"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes() + b"\0")
    sidecar_path(copy).write_text(sidecar_path(path).read_text())
    with pytest.raises(SlimDiffError, match="does not match its sidecar"):
        build_engine("ort", denoiser_component(unet), tmp_path, axes={}, profiles=[], dtype=torch.float32,
                     device="cpu", onnx_path=copy)
    assert not (tmp_path / "unet.ort.onnx").exists()


def test_engine_kind_must_be_known(dense, tmp_path):
    path, sidecar, unet = dense
    with pytest.raises(SlimDiffError, match="unknown engine 'tvm'"):
        build_engine("tvm", denoiser_component(unet), tmp_path, axes=sidecar["axes"], profiles=[], dtype=torch.float32,
                     device="cpu", onnx_path=path)


# ---------------------------------------------------------------------------------------------------------
# AOTInductor
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_aoti_engine_compiles_and_matches_eager(tmp_path):
    """The suite's one AOTInductor compile (its slowest build) takes the richest call there is: a slim SDXL-style
    UNet whose engine also takes ``text_embeds`` and ``time_ids`` (tiny-xl's blocks at two levels: the compile
    time follows the graph's size)."""
    unet, plan = slim_tiny_unet(seed=4, config=TWO_LEVEL_XL_UNET)
    component = denoiser_component(unet)
    conditions = [spec.name for spec in component.inputs[3:]]
    assert conditions == ["text_embeds", "time_ids"]
    profiles = tiny_profiles()
    axes = component_axes(component, union(profiles), {"height": 8, "width": 8})
    meta = build_engine("aoti", component, tmp_path, axes=axes, profiles=_profiles_json(profiles),
                        dtype=torch.float32, device="cpu",
                        extra={"unet_config": dict(unet.config), "rank_plan": json.loads(plan.to_json())})
    assert meta["file"] == "unet.pt2" and meta["source_onnx"] is None
    assert meta["runtime"]["torch_version"] == torch.__version__ and meta["runtime"]["device"] == "cpu"
    # Loaded through the runtime: torch._inductor.aoti_load_package, no diffusers module involved.
    engine = EngineUNet.from_folder(tmp_path)
    assert engine.rank_plan.modules == plan.modules

    def call(model, values, seed):
        sample, timestep, text, *extra = component.random_inputs(values, torch.float32, seed)
        with torch.no_grad():
            return model(sample, timestep, encoder_hidden_states=text,
                         added_cond_kwargs=dict(zip(conditions, extra))).sample

    for values, seed in (({"batch": 2, "height": 16, "width": 16, "text_len": 77}, 0),
                         ({"batch": 3, "height": 24, "width": 8, "text_len": 100}, 1)):
        ref = call(unet, values, seed)
        assert (call(engine, values, seed) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # The compiled package runs shapes past its range without complaint; the runtime refuses them.
    with pytest.raises(SlimDiffError, match="outside this engine's shapes"):
        call(engine, {"batch": 8, "height": 16, "width": 16, "text_len": 77}, 2)

    # New weights in place, no compile (tests/test_engine_weights.py has the other backends): a fine-tune of the same
    # plan. Inductor folds some parameters into constants of its own (on CPU, torch 2.13: conv_out's bias); the engine
    # records them fixed and refuses weights that change them.
    values = {"batch": 2, "height": 16, "width": 16, "text_len": 77}
    fixed = json.loads((tmp_path / meta["weights"]["file"]).read_text())["fixed"]
    tuned, _ = slim_tiny_unet(seed=7, config=TWO_LEVEL_XL_UNET)
    for name in fixed:
        with pytest.raises(SlimDiffError, match=f"change {name}, which this engine cannot take new values of"):
            engine.load_weights_from(tuned)
        with torch.no_grad():
            tuned.get_parameter(name.removeprefix("denoiser.")).copy_(unet.get_parameter(name.removeprefix("denoiser.")))
    engine.load_weights_from(tuned)
    ref = call(tuned, values, 0)
    assert (call(engine, values, 0) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert (call(unet, values, 0) - ref).abs().max().item() > 1e-2 * ref.abs().max().item()


def test_aoti_package_for_another_torch_is_refused(tmp_path):
    here = device_info("cpu")
    check_aoti_environment(here, here, tmp_path / "unet.pt2")
    with pytest.raises(SlimDiffError, match="torch_version '1.0.0'"):
        check_aoti_environment({**here, "torch_version": "1.0.0"}, here, tmp_path / "unet.pt2")


# ---------------------------------------------------------------------------------------------------------
# TensorRT: what the builder consumes, tested without TensorRT
# ---------------------------------------------------------------------------------------------------------


def test_one_optimization_profile_per_requested_range(dense):
    _, sidecar, _ = dense
    profiles = tiny_profiles(batch="1:1:2,2:4:4", height="32,16:32:48", width="32,16:32:48")
    body = {**sidecar, "profiles": _profiles_json(profiles)}
    out = trtmod.optimization_profiles(body)
    assert len(out) == 2
    assert out[0]["sample"] == ((1, 4, 16, 16), (1, 4, 16, 16), (2, 4, 16, 16))
    assert out[1]["sample"] == ((2, 4, 8, 8), (4, 4, 16, 16), (4, 4, 24, 24))
    assert out[0]["timestep"] == ((1,), (1,), (2,))
    assert out[1]["encoder_hidden_states"] == ((2, 77, 64), (4, 77, 64), (4, 154, 64))
    names = {"sample", "timestep", "encoder_hidden_states"}
    assert all(set(p) == names for p in out)
    shapes = {"sample": (4, 4, 24, 8), "timestep": (4,), "encoder_hidden_states": (4, 100, 64)}
    assert trtmod.profile_for_shapes(out, shapes) == 1
    assert trtmod.profile_for_shapes(out, {**shapes, "sample": (1, 4, 16, 16), "timestep": (1,),
                                           "encoder_hidden_states": (1, 77, 64)}) == 0
    assert trtmod.profile_for_shapes(out, {**shapes, "encoder_hidden_states": (4, 155, 64)}) == -1


def test_profiles_clip_axes_a_component_caps():
    sidecar = {"axes": {"batch": {"min": 1, "opt": 2, "max": 4}, "text_len": {"min": 1, "opt": 77, "max": 77}},
               "input_axes": {"input_ids": ["batch", "text_len"]},
               "profiles": _profiles_json(tiny_profiles(text_len="1:77:154"))}
    assert trtmod.optimization_profiles(sidecar) == [{"input_ids": ((1, 1), (2, 77), (4, 77))}]


def test_graph_trt_would_parse(dense):
    path, sidecar, _ = dense
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.opset_import[0].version == 23
    assert [i.name for i in graph.graph.input] == list(sidecar["input_axes"])
    for value in graph.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == len(sidecar["input_axes"][value.name])
        assert all((isinstance(a, int) and d.dim_value == a) or (isinstance(a, str) and d.dim_param)
                   for d, a in zip(dims, sidecar["input_axes"][value.name]))
    assert all(sidecar["fused"][op] > 0 for op in FUSED_OPS)
    onnx.checker.check_model(graph)


def test_opset_follows_the_tensorrt_version():
    assert trtmod.opset_for_tensorrt("10.13.3.9") == 18
    assert trtmod.opset_for_tensorrt("10.14.1") == 23
    assert trtmod.opset_for_tensorrt("11.0.0") == 23
    with pytest.raises(SlimDiffError):
        trtmod.parse_version("unknown")


ENV = {"tensorrt_version": "10.14.1.48", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engine_metadata_must_match_the_running_tensorrt_and_gpu(tmp_path):
    trtmod.check_environment(ENV, dict(ENV), tmp_path / "unet.plan")
    with pytest.raises(SlimDiffError, match=r"tensorrt version '10.14.1.48' \(here: '10.15.0'\)"):
        trtmod.check_environment(ENV, {**ENV, "tensorrt_version": "10.15.0"}, tmp_path / "unet.plan")
    with pytest.raises(SlimDiffError, match=r"compute capability '9.0' \(here: '8.9'\).*rebuild"):
        trtmod.check_environment(ENV, {**ENV, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"},
                                 tmp_path / "unet.plan")


def test_trt_engine_metadata_contents_and_mismatch_on_load(slim, tmp_path, monkeypatch):
    """The metadata written around a TensorRT build, with the builder replaced by a stub that writes bytes:
    everything except TensorRT's own build and deserialization runs for real."""
    path, sidecar, unet = slim
    _, plan = slim_tiny_unet()

    def fake_build(onnx_path, sidecar_, engine_path, **options):
        engine_path.write_bytes(b"serialized engine")
        return {**ENV, "builder_optimization_level": options["opt_level"], "strongly_typed": True,
                "tensor_profiles": [{n: [list(s) for s in v] for n, v in p.items()}
                                    for p in trtmod.optimization_profiles(sidecar_)],
                "files": [engine_path.name]}

    monkeypatch.setattr(trtmod, "build_trt_engine", fake_build)
    monkeypatch.setattr(trtmod.TrtBackend, "polygraphy_runner", lambda self, meta, folder: None)  # needs a GPU
    meta = build_engine("trt", denoiser_component(unet), tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                        dtype=torch.float16, device="cuda", onnx_path=path,
                        extra={"unet_config": dict(unet.config), "rank_plan": json.loads(plan.to_json())},
                        options={"opt_level": 4})
    on_disk, _ = load_engine_meta(tmp_path)
    assert on_disk == meta and meta["file"] == "unet.plan" and meta["dtype"] == "float16"
    assert meta["source_onnx"] == {"file": "unet.onnx", "sha256": sidecar["sha256"], "opset": 23}
    assert {k: meta["runtime"][k] for k in ENV} == ENV and meta["runtime"]["builder_optimization_level"] == 4
    assert meta["profiles"] == sidecar["profiles"]
    assert meta["rank_plan"]["modules"] == json.loads(plan.to_json())["modules"]
    assert [i["dtype"] for i in meta["inputs"]] == ["float16", "float32", "float16"]

    # Loading: an engine built elsewhere is refused before TensorRT touches it.
    monkeypatch.setattr(trtmod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trtmod, "current_environment", lambda: {**ENV, "tensorrt_version": "11.0.0"})
    with pytest.raises(SlimDiffError, match="was built for tensorrt version"):
        trtmod.load_trt_engine(tmp_path / "unet.plan", meta["runtime"])


def test_missing_tensorrt_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(trtmod, "tensorrt_available", lambda: False)
    with pytest.raises(SlimDiffError) as info:
        trtmod.require_tensorrt()
    message = str(info.value)
    assert "TensorRT is not installed" in message and "--engine ort" in message and "--engine aoti" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# TensorRT for real (needs tensorrt and a GPU)
# ---------------------------------------------------------------------------------------------------------


def test_trt_fp16_engine_builds_and_matches(tmp_path):
    if not trtmod.tensorrt_available():  # TensorRT itself: its type stubs alone import as an empty package
        pytest.skip("TensorRT is not installed here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from slimdiff.export.align import align_head_widths
    from slimdiff.export.onnx import export_onnx

    unet, _ = slim_tiny_unet(seed=5)
    align_head_widths(unet)
    unet = unet.cuda()
    component = denoiser_component(unet)
    sidecar = export_onnx(component, tiny_profiles(), tmp_path / "unet.onnx", dtype=torch.float16)
    build_engine("trt", component, tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"], dtype=torch.float16,
                 device="cuda", onnx_path=tmp_path / "unet.onnx",
                 extra={"unet_config": dict(unet.config)},
                 options={"opt_level": 0, "timing_cache": tmp_path / "timing.cache"})
    assert (tmp_path / "timing.cache").stat().st_size > 0
    engine = EngineUNet.from_folder(tmp_path, device="cuda")
    # The repeated shape replays the CUDA graph captured on its first call.
    for shape, seed in (((2, 16, 16, 77), 0), ((2, 16, 16, 77), 1), ((1, 24, 8, 100), 2)):
        inputs, ref = _reference(unet, *shape, seed=seed, device="cuda")
        got = engine(*inputs[:2], encoder_hidden_states=inputs[2]).sample.float()
        assert torch.isfinite(got).all()
        assert (got - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# The registry: one interface, export / runtime / bench all go through it
# ---------------------------------------------------------------------------------------------------------


def test_registry_lists_the_backends_and_bench_serves_each_of_them():
    from slimdiff import engines
    from slimdiff.bench import engines as bench_engines

    assert {"ort", "trt", "aoti"} <= set(engines.names())
    assert set(engines.names()) <= set(bench_engines.names())
    assert engines.get("trt").triton_model({}).platform == "tensorrt_plan"
    assert engines.get("ort").triton_model({}).backend == "onnxruntime"
    assert engines.get("aoti").triton_model({}) is None and not engines.get("aoti").from_onnx
    with pytest.raises(SlimDiffError, match="unknown engine 'tvm'; choose one of"):
        engines.get("tvm")


def test_a_new_backend_is_one_class(dense, tmp_path, monkeypatch):
    """A backend registered from outside the package is built, described, loaded and run like the built-in ones."""
    from slimdiff.engines import base
    from slimdiff.engines.ort import OrtBackend, OrtRunner

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    calls = []

    @base.register
    class PlainOnnx(OrtBackend):
        name = "plain-onnx"
        file_pattern = "{name}.plain.onnx"

        def build(self, component, target, *, onnx_path, sidecar, **rest):
            calls.append("build")
            target.write_bytes(onnx_path.read_bytes())
            return {"files": [target.name], "copied_from": onnx_path.name}

        def open(self, meta, folder, device, **options):
            calls.append("open")
            return OrtRunner(meta, folder, device)

    path, sidecar, unet = dense
    meta = build_engine("plain-onnx", denoiser_component(unet), tmp_path, axes=sidecar["axes"],
                        profiles=sidecar["profiles"], dtype=torch.float32, device="cpu", onnx_path=path,
                        extra={"unet_config": dict(unet.config)})
    assert meta["file"] == "unet.plain.onnx" and meta["runtime"] == {"copied_from": "unet.onnx"}
    inputs, ref = _reference(unet, 2, 16, 16, 77, seed=0)
    got = EngineUNet.from_folder(tmp_path)(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() and calls == ["build", "open"]


def test_unknown_engine_kind_in_metadata_names_the_known_ones(dense, tmp_path):
    path, sidecar, unet = dense
    build_engine("ort", denoiser_component(unet), tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cpu", onnx_path=path)
    meta = json.loads(engine_meta_path(tmp_path).read_text())
    engine_meta_path(tmp_path).write_text(json.dumps({**meta, "engine": "tvm"}))
    with pytest.raises(SlimDiffError, match=r"unknown engine 'tvm' \(known: .*ort"):
        load_engine_meta(tmp_path)


def test_tensorrt_build_is_polygraphys_loader_chain(dense, tmp_path):
    """The loaders TensorRT builds through, inspected before they run (they need TensorRT only when called)."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    path, sidecar, _ = dense
    profiles = trtmod.optimization_profiles({**sidecar, "profiles": _profiles_json(
        tiny_profiles(batch="1:1:2,2:4:4", height="32,16:32:48", width="32,16:32:48"))})
    loader = trtmod.engine_loader(path, profiles, tmp_path / "unet.plan", opt_level=4,
                                  timing_cache=tmp_path / "timing.cache", strongly_typed=True)
    assert isinstance(loader, SaveEngine) and loader.path == str(tmp_path / "unet.plan")
    build = loader._engine
    assert isinstance(build, EngineFromNetwork) and build.timing_cache_path == str(tmp_path / "timing.cache")
    assert isinstance(build._network, NetworkFromOnnxPath) and build._network.path == str(path)
    assert build._network.strongly_typed
    config = build._config
    assert isinstance(config, CreateConfig) and config.builder_optimization_level == 4
    assert config.timing_cache_path == str(tmp_path / "timing.cache")  # loaded before the build
    assert [{n: tuple(shapes) for n, shapes in p.items()} for p in config.profiles] == profiles
    assert config.profiles[1]["sample"].max == (4, 4, 24, 24)
