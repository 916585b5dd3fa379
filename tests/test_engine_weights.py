"""New weights into built engines without exporting them again (``slimdiff.engines.weights``,
``Runner.update_weights``, ``EngineDenoiser.load_weights_from``): ONNX Runtime here, on the tiny dense UNet's cached
export; AOTInductor in tests/test_engines.py (on the suite's one compile); TensorRT's refit inputs (the initializer
map, layouts, dtypes) without TensorRT, its refit itself only where TensorRT and a GPU are."""

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from export_support import TWO_LEVEL_UNET, default_ranks, seeded_unet, slim_tiny_unet, tiny_profiles
from onnx import numpy_helper

from slimdiff import engines
from slimdiff.engines import build_engine, engine_meta_path
from slimdiff.engines import trt as trtmod
from slimdiff.engines.build import build_denoiser_engine
from slimdiff.engines.ort import OrtBackend
from slimdiff.engines.weights import SHARED_VALUE, exported_tensors, onnx_initializers, weights_path
from slimdiff.errors import SlimDiffError
from slimdiff.export.modules import denoiser_component
from slimdiff.export.onnx import sidecar_path
from slimdiff.models import module_sites
from slimdiff.runtime import EngineUNet

VALUES = {"batch": 2, "height": 16, "width": 16, "text_len": 77}


def fused_lora(unet, seed: int, rank: int = 4, scale: float = 0.05):
    """A copy of ``unet`` with a seeded rank-``rank`` update ``scale·B·A`` fused into every attention and FFN Linear
    of its transformer blocks: what ``load_lora_weights`` + ``fuse_lora`` leave (norms and convolutions as they were)."""
    new = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in new.named_modules():
            if isinstance(module, torch.nn.Linear) and ".transformer_blocks." in name:
                out, inp = module.weight.shape
                module.weight.add_(scale * torch.randn(out, rank, generator=gen) @ torch.randn(rank, inp, generator=gen))
    return new


def call(model, component, seed: int = 0):
    sample, timestep, text = component.random_inputs(VALUES, torch.float32, seed)
    with torch.no_grad():
        return model(sample, timestep, encoder_hidden_states=text).sample


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def ort_folder(dense, tmp_path_factory):
    """An ONNX Runtime engine of the tiny dense UNet, its source export kept beside it as slimdiff-export keeps it."""
    path, sidecar, unet = dense
    folder = tmp_path_factory.mktemp("ort-weights")
    for f in (path, sidecar_path(path)):
        shutil.copy(f, folder)
    build_engine("ort", denoiser_component(unet), folder, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cpu", onnx_path=folder / "unet.onnx",
                 extra={"unet_config": dict(unet.config)})
    return folder


def exported_state(module, dtype) -> dict:
    """The module's floating-point tensors as the engine holds them (its precision, on the host)."""
    return {name: t.detach().to("cpu", dtype).contiguous().numpy()
            for name, t in module.state_dict().items() if t.is_floating_point()}


def test_the_record_maps_renamed_and_transposed_initializers(dense, ort_folder):
    _, _, unet = dense
    meta = json.loads(engine_meta_path(ort_folder).read_text())
    record = json.loads((ort_folder / meta["weights"]["file"]).read_text())
    state = exported_state(denoiser_component(unet).module, torch.float32)
    assert record["shapes"] == {name: list(a.shape) for name, a in state.items()}
    graph = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ort_folder / "unet.onnx")).graph.initializer}
    transposed = [init for init, (_, t) in record["initializers"].items() if t]
    assert transposed and all(not init.startswith("denoiser.") for init in transposed)  # the optimiser's val_NN
    for init, (name, t) in record["initializers"].items():
        assert np.array_equal(graph[init], state[name].T if t else state[name])
    # Every parameter is either held by an initializer or recorded fixed; builtin:tiny's norm weights are all ones,
    # one value several parameters share.
    held = {name for name, _ in record["initializers"].values()}
    assert held | set(record["fixed"]) == set(state) and not held & set(record["fixed"])
    norm = "denoiser.down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight"
    assert record["fixed"][norm]["reason"] == SHARED_VALUE
    # An fp16 graph (a TensorRT export) maps alike: its initializers are the fp16 parameters, transposed alike.
    half = {k: v.astype(np.float16) for k, v in graph.items() if v.dtype == np.float32}
    assert onnx_initializers_of(half, exported_tensors(denoiser_component(unet).module, torch.float16), ort_folder) == (
        record["initializers"], {k: v["reason"] for k, v in record["fixed"].items()})


def onnx_initializers_of(values: dict, tensors: dict, folder):
    """``onnx_initializers`` on a copy of the folder's graph whose float initializers are ``values``."""
    model = onnx.load(str(folder / "unet.onnx"))
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    path = folder / "half" / "unet.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save_model(model, str(path))
    return onnx_initializers(path, tensors)


def test_ort_engine_takes_a_fused_lora_and_switches_back(dense, ort_folder):
    _, _, unet = dense
    component = denoiser_component(unet)
    engine = EngineUNet.from_folder(ort_folder)
    before = call(engine, component)
    assert rel(before, call(unet, component)) <= 1e-4
    styled = fused_lora(unet, seed=1)
    expected = call(styled, component)
    assert rel(expected, before) > 1e-2  # the LoRA changes the output
    engine.load_weights_from(styled)
    assert rel(call(engine, component), expected) <= 1e-4
    engine.load_weights_from(unet)  # switching back: the exported weights again
    assert rel(call(engine, component), before) <= 1e-6


def test_an_engine_is_written_with_new_weights_without_an_export(dense, ort_folder, tmp_path):
    """What a served repository's next model version holds (``add_weights_version``): the engine written again with
    a fused LoRA's weights from its folder's source export and weights record alone, the folder left as it was."""
    _, _, unet = dense
    component = denoiser_component(unet)
    styled = fused_lora(unet, seed=2)
    meta = json.loads(engine_meta_path(ort_folder).read_text())
    out = tmp_path / "written"
    out.mkdir()
    runtime = engines.get("ort").write_with_weights(meta, ort_folder, EngineUNet.exported_state(meta, ort_folder, styled),
                                                    out)
    assert runtime["files"] == [meta["file"]] and [p.name for p in out.iterdir()] == [meta["file"]]  # nothing staged
    written = EngineUNet(engines.open_engine(meta, out), meta, out)
    assert rel(call(written, component), call(styled, component)) <= 1e-4
    assert rel(call(EngineUNet.from_folder(ort_folder), component), call(unet, component)) <= 1e-4
    # AOTInductor swaps the constants of a loaded package; it writes none
    with pytest.raises(SlimDiffError, match="AOTInductor .*take new weights in a running process only"):
        engines.get("aoti").write_with_weights({"engine": "aoti"}, ort_folder, {}, out)


def test_new_weights_are_refused_in_one_line(dense, ort_folder, tmp_path):
    _, _, unet = dense
    engine = EngineUNet.from_folder(ort_folder)
    session = engine.runner.session
    norms = copy.deepcopy(unet)
    with torch.no_grad():
        norms.down_blocks[0].attentions[0].transformer_blocks[0].norm1.weight.mul_(1.5)
    with pytest.raises(SlimDiffError, match=r"change denoiser\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0"
                                            r"\.norm1\.weight, which this engine cannot take new values of"):
        engine.load_weights_from(norms)
    slim, _ = slim_tiny_unet()  # builtin:tiny's architecture, resized Linears
    with pytest.raises(SlimDiffError, match=r"attn1\.to_q\.weight has shape \(16, 32\), the engine's \(32, 32\)"):
        engine.load_weights_from(slim)
    with pytest.raises(SlimDiffError, match="not of the architecture the engine was exported from: block_out_channels"):
        engine.load_weights_from(seeded_unet(TWO_LEVEL_UNET))
    with pytest.raises(SlimDiffError, match="takes a PyTorch unet"):
        engine.load_weights_from(torch.nn.Linear(2, 2))
    assert engine.runner.session is session  # nothing was touched
    # An engine exported before engines recorded their weights
    old = tmp_path / "old"
    shutil.copytree(ort_folder, old)
    meta = json.loads(engine_meta_path(old).read_text())
    del meta["weights"]
    engine_meta_path(old).write_text(json.dumps(meta))
    weights_path(old, "unet").unlink()
    with pytest.raises(SlimDiffError, match="exported before engines recorded .* re-export it with slimdiff-export"):
        EngineUNet.from_folder(old).load_weights_from(unet)
    # A LoRA loaded into the engine is refused with the way that works
    with pytest.raises(SlimDiffError, match=r"cannot be loaded into it\. .*pipe\.unet\.load_weights_from\(module\)"):
        engine.load_lora_adapter("style.safetensors")
    # TensorRT engines take new weights when built refittable
    assert "--trt-refittable" in engines.get("trt").cannot_update_weights({"runtime": {"refittable": False}})
    assert engines.get("trt").cannot_update_weights({"runtime": {"refittable": True}}) is None


def test_a_head_padded_engine_takes_new_weights_padded_alike(tmp_path, monkeypatch):
    """Engines for GPUs (TensorRT always, ONNX Runtime on CUDA) are built from a copy of a slim model with zero-padded
    heads; new weights are padded alike. Padding is forced here on a CPU ONNX Runtime engine: the same path."""
    monkeypatch.setattr(OrtBackend, "needs_aligned_heads", lambda self, device: True)
    unet, plan = slim_tiny_unet(seed=3, config=TWO_LEVEL_UNET)
    meta, _ = build_denoiser_engine(unet, "ort", tmp_path, profiles=tiny_profiles(batch="2", height="32", width="32",
                                                                                 text_len="77"),
                                    dtype=torch.float32, device="cpu", multiple=8, plan=plan)
    assert meta["head_alignment"]  # the mid block's heads: q·k 16, v 24 wide, both padded to 24
    engine = EngineUNet.from_folder(tmp_path)
    tuned, _ = slim_tiny_unet(seed=5, config=TWO_LEVEL_UNET)  # the same plan, other weights
    component = denoiser_component(tuned)
    expected = call(tuned, component)
    assert rel(call(unet, component), expected) > 1e-2
    engine.load_weights_from(tuned)
    assert rel(call(engine, component), expected) <= 1e-4
    # another plan whose heads pad to the same widths (20 and 20, padded to 24): refused by its widths, not padded to fit
    ranks = default_ranks(module_sites(seeded_unet(TWO_LEVEL_UNET)))
    other, _ = slim_tiny_unet(config=TWO_LEVEL_UNET, ranks={
        n: 20 if n.startswith("mid_block") and n.endswith((".qk", ".vo")) else r for n, r in ranks.items()})
    with pytest.raises(SlimDiffError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1 has \(q·k, v\) "
                                            r"head widths \[20, 20\], the engine's \[16, 24\]"):
        engine.load_weights_from(other)


def test_tensorrt_refit_arrays(dense, ort_folder):
    """What a TensorRT refit of an engine built from this graph sets: every refittable weight, under its initializer
    name, in the graph's layout and dtype (new values where a parameter holds it, the graph's own otherwise)."""
    _, _, unet = dense
    record = json.loads(weights_path(ort_folder, "unet").read_text())
    graph = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ort_folder / "unet.onnx")).graph.initializer}
    styled = fused_lora(unet, seed=2)
    state = denoiser_component(styled).module.state_dict()
    arrays = trtmod.refit_arrays(record, state, torch.float32, list(graph), graph)
    assert set(arrays) == set(graph)
    new = exported_state(denoiser_component(styled).module, torch.float32)
    changed = 0
    for init, array in arrays.items():
        assert array.shape == graph[init].shape and array.dtype == graph[init].dtype and array.flags.c_contiguous
        if init in record["initializers"]:
            name, transposed = record["initializers"][init]
            assert np.array_equal(array, new[name].T if transposed else new[name])
            changed += not np.array_equal(array, graph[init])
        else:
            assert np.array_equal(array, graph[init])
    assert changed > 0
    # A weight TensorRT folded away (not among the refittable ones): refused when it changes, kept when it does not
    moved = next(init for init in record["initializers"] if not np.array_equal(arrays[init], graph[init]))
    with pytest.raises(SlimDiffError, match="which TensorRT folded into other weights"):
        trtmod.refit_arrays(record, state, torch.float32, [n for n in graph if n != moved], graph)
    kept = next(init for init in record["initializers"] if np.array_equal(arrays[init], graph[init]))
    assert kept not in trtmod.refit_arrays(record, state, torch.float32, [n for n in graph if n != kept], graph)
    # a weight the parser made of no initializer is not set (TensorRT keeps it unless it reports it missing)
    assert "made-by-the-parser" not in trtmod.refit_arrays(record, state, torch.float32, [*graph, "made-by-the-parser"],
                                                           graph)


def test_refittable_tensorrt_builds_set_the_refit_flag(dense, tmp_path):
    pytest.importorskip("polygraphy")
    path, sidecar, _ = dense
    loader = trtmod.engine_loader(path, trtmod.optimization_profiles(sidecar), tmp_path / "unet.plan", opt_level=3,
                                  timing_cache=tmp_path / "timing.cache", strongly_typed=True, refittable=True)
    assert loader._engine._config.refittable


def test_tensorrt_engine_refits(dense, tmp_path):
    """The refit itself (TensorRT and a GPU only): a refittable engine takes a fused LoRA."""
    if not trtmod.tensorrt_available():  # TensorRT itself: its type stubs alone import as an empty package
        pytest.skip("TensorRT is not installed here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    path, sidecar, unet = dense
    for f in (path, sidecar_path(path)):
        shutil.copy(f, tmp_path)
    build_engine("trt", denoiser_component(unet), tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cuda", onnx_path=tmp_path / "unet.onnx",
                 extra={"unet_config": dict(unet.config)}, options={"refittable": True})
    engine = EngineUNet.from_folder(tmp_path)
    component = denoiser_component(unet)
    before = call(engine, component)
    styled = fused_lora(unet, seed=1)
    engine.load_weights_from(styled)
    assert rel(call(engine, component), call(styled, component)) <= 1e-2  # TF32 tactics
    assert rel(call(engine, component), before) > 1e-2
    # written refitted into a folder of its own (a served repository's next version)
    written = tmp_path / "written"
    written.mkdir()
    runtime = engines.get("trt").write_with_weights(engine.meta, tmp_path,
                                                    EngineUNet.exported_state(engine.meta, tmp_path, styled), written)
    assert runtime["files"] == [engine.meta["file"]]
    refitted = EngineUNet(engines.open_engine(engine.meta, written), engine.meta, written)
    assert rel(call(refitted, component), call(styled, component)) <= 1e-2
