"""The ONNX export cache (``SLIMDIFF_EXPORT_CACHE``): an identical export is copied, anything that decides the graph
makes another."""

import copy

import onnxruntime as ort
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor
from export_support import tiny_profiles

from slimdiff.export.cache import CACHE_VARIABLE, export_key
from slimdiff.export.modules import component_axes, denoiser_component, text_encoder_component
from slimdiff.export.onnx import export_onnx, load_sidecar
from slimdiff.export.shapes import union
from slimdiff.families.base import CONTROLNET_RESIDUALS
from slimdiff.models import build_builtin


@pytest.fixture(scope="module")
def tiny():
    return build_builtin("builtin:tiny")


def _exported(component, path, profiles=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(component, profiles or tiny_profiles(), path, **kwargs)


def test_an_identical_export_is_copied_and_a_changed_one_is_exported(tiny, tmp_path, monkeypatch, capfd):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_VARIABLE, str(cache))
    first = _exported(text_encoder_component(tiny.text_encoder), tmp_path / "a" / "text_encoder.onnx")
    assert "reused_export" not in first and len(list(cache.iterdir())) == 1
    capfd.readouterr()

    # another split of the same shapes into TensorRT profiles: the same graph, this run's profiles in its sidecar
    split = [*tiny_profiles(), *tiny_profiles(batch="1:1:2")]
    again = _exported(text_encoder_component(tiny.text_encoder), tmp_path / "b" / "te.onnx", split,
                      extra={"variant": "x"})
    assert "exporting" not in capfd.readouterr().err
    assert again["reused_export"] and again["file"] == "te.onnx" and again["variant"] == "x"
    assert again["profiles"] == [p.to_json() for p in split] != first["profiles"]
    assert again["sha256"] == first["sha256"] and again["parity"] == first["parity"]
    assert load_sidecar(tmp_path / "b" / "te.onnx") == again
    assert (tmp_path / "b" / "te.onnx").read_bytes() == (tmp_path / "a" / "text_encoder.onnx").read_bytes()
    session = ort.InferenceSession(str(tmp_path / "b" / "te.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]

    changed = copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        next(changed.parameters())[0, 0] += 1.0
    other = _exported(text_encoder_component(changed), tmp_path / "c" / "text_encoder.onnx")
    assert "reused_export" not in other and other["sha256"] != first["sha256"]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2

    # a damaged entry is exported again and stored anew
    (entry,) = [p for p in cache.iterdir() if p.name == again["reused_export"]]
    (entry / "graph.onnx").write_bytes(b"not a graph")
    repaired = _exported(text_encoder_component(tiny.text_encoder), tmp_path / "e" / "text_encoder.onnx")
    assert "reused_export" not in repaired and repaired["sha256"] == first["sha256"]
    assert (entry / "graph.onnx").read_bytes() == (tmp_path / "a" / "text_encoder.onnx").read_bytes()

    monkeypatch.delenv(CACHE_VARIABLE)
    plain = _exported(text_encoder_component(tiny.text_encoder), tmp_path / "d" / "text_encoder.onnx")
    assert "reused_export" not in plain and len(list(cache.iterdir())) == 2


def test_the_key_follows_what_decides_the_graph(tiny):
    def key(component, opset=23, dtype=torch.float32, **profile):
        axes = component_axes(component, union(tiny_profiles(**profile)), {"height": 8, "width": 8})
        return export_key(component, axes, opset, dtype, "cpu")

    unet = tiny.unet
    base = key(denoiser_component(unet))
    assert key(denoiser_component(copy.deepcopy(unet))) == base  # same weights and call, another object
    assert key(denoiser_component(unet), opset=18) != base
    assert key(denoiser_component(unet), dtype=torch.float16) != base
    assert key(denoiser_component(unet), height="16:32:64") != base
    assert key(denoiser_component(unet, export_options=[CONTROLNET_RESIDUALS])) != base
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        changed.conv_out.bias[0] += 1e-3
    assert key(denoiser_component(changed)) != base
    text = copy.deepcopy(tiny.text_encoder)
    text.name_or_path = "/elsewhere/text_encoder"  # where it was read from is no part of the graph
    assert key(text_encoder_component(text)) == key(text_encoder_component(tiny.text_encoder)) is not None
    hooked = copy.deepcopy(unet)  # what the key cannot describe by value: no key, the export runs uncached
    hooked.conv_in.register_forward_hook(lambda module, args, out: out * 2)
    assert key(denoiser_component(hooked)) is None
    patched = copy.deepcopy(unet)
    patched.conv_out.forward = lambda x: x
    assert key(denoiser_component(patched)) is None
    # diffusers' hook registry: an empty one (a pipeline's cache context leaves one on FLUX and SD3 models) changes
    # nothing; a hook in it does
    registered = copy.deepcopy(unet)
    HookRegistry.check_if_exists_or_initialize(registered)
    assert key(denoiser_component(registered)) == base
    HookRegistry.check_if_exists_or_initialize(registered).register_hook(ModelHook(), "hook")
    assert key(denoiser_component(registered)) is None
    processor = copy.deepcopy(unet)  # what a module calls, beyond its weights: another attention processor
    processor.set_attn_processor(AttnProcessor())
    assert key(denoiser_component(processor)) != base


def test_a_text_tower_calling_a_compiled_function_has_a_key():
    """SDXL's second CLIP calls ``F.gelu``, a compiled function: named by what it is, it keys the tower's exports,
    and another activation gives another key."""
    second = build_builtin("builtin:tiny-xl").text_encoder_2
    activation = second.text_model.encoder.layers[0].mlp.activation_fn
    assert activation.act is torch.nn.functional.gelu  # the case: a builtin function as a module attribute
    axes = component_axes(text_encoder_component(second), union(tiny_profiles()), {})
    key = export_key(text_encoder_component(second), axes, 23, torch.float32, "cpu")
    assert key is not None
    activation.act = torch.relu  # another compiled function
    assert export_key(text_encoder_component(second), axes, 23, torch.float32, "cpu") not in (key, None)

