"""ONNX export: fused opset-23 graphs, the opset-18 fallback, dynamic shapes, parity, sidecars, bad files,
and head-width alignment."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_support import TWO_LEVEL_UNET, seeded_unet, slim_tiny_unet, tiny_profiles

from slimdiff.errors import SlimDiffError
from slimdiff.export.align import align_head_widths, planned_head_widths
from slimdiff.export.modules import (
    count_attention,
    text_encoder_component,
    denoiser_component,
    vae_decoder_component,
)
from slimdiff.export.onnx import check_parity, export_onnx, load_sidecar, sidecar_path
from slimdiff.models import load_pipeline, load_unet
from slimdiff.rebuild import SlimAttnProcessor


def _ops(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n for n in graph.node]


def _run_both(path, unet, batch, h, w, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    e = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e, return_dict=False)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy()})[0]
    return got, ref


@pytest.mark.parametrize("variant", ["dense", "slim"])
def test_opset23_graph_holds_native_fused_ops(variant, request):
    path, sidecar, unet = request.getfixturevalue(variant)
    ops = [n.op_type for n in _ops(path)]
    attentions = count_attention(unet)
    assert attentions == 14  # 7 transformer blocks x (self + cross)
    assert ops.count("Attention") == attentions
    assert ops.count("GroupNormalization") > 0
    assert ops.count("Gelu") == 7  # one GEGLU per transformer block
    assert "Softmax" not in ops  # no decomposed attention left
    assert sidecar["fused"] == {"Attention": attentions, "GroupNormalization": ops.count("GroupNormalization"),
                                "Gelu": 7}
    assert sidecar["opset"] == 23


def test_slim_attention_keeps_the_original_softmax_scale(slim):
    path, _, unet = slim
    from diffusers.models.attention_processor import Attention

    widths = {(m.to_q.out_features // m.heads, m.to_v.out_features // m.heads) for m in unet.modules()
              if isinstance(m, Attention)}
    assert any(qk != v for qk, v in widths)  # the slim structure really has different q·k and v widths
    expected = sorted({round(m.scale, 6) for m in unet.modules() if isinstance(m, Attention)})
    found = sorted({round(a.f, 6) for n in _ops(path) if n.op_type == "Attention" for a in n.attribute
                    if a.name == "scale"})
    assert found == expected  # 1/sqrt(original head width), not 1/sqrt(slim q·k width)
    assert expected == sorted({round(1 / math.sqrt(16), 6), round(1 / math.sqrt(32), 6)})


@pytest.mark.parametrize("variant", ["dense", "slim"])
def test_dynamic_batch_and_resolution_match_pytorch(variant, request):
    path, _, unet = request.getfixturevalue(variant)
    graph = onnx.load(str(path), load_external_data=False).graph
    sample = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(sample[0], str) and isinstance(sample[2], str) and isinstance(sample[3], str)
    for shape, seed in (((2, 16, 16, 77), 3), ((3, 24, 8, 100), 4)):  # two shapes through one graph
        got, ref = _run_both(path, unet, *shape, seed=seed)
        assert got.shape == ref.shape == (shape[0], 4, shape[1], shape[2])
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_sidecar_records_ranges_hash_and_parity(dense):
    path, sidecar, _ = dense
    on_disk = json.loads(sidecar_path(path).read_text())
    assert on_disk == sidecar == load_sidecar(path)
    assert sidecar["axes"]["batch"] == {"min": 1, "opt": 2, "max": 4, "multiple": 1}
    assert sidecar["axes"]["height"] == {"min": 8, "opt": 16, "max": 24, "multiple": 8}
    assert sidecar["axes"]["text_len"] == {"min": 77, "opt": 77, "max": 154, "multiple": 1}
    assert sidecar["input_axes"]["sample"] == ["batch", 4, "height", "width"]
    assert [i["name"] for i in sidecar["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    parity = sidecar["parity"]
    assert len(parity["shapes"]) == 2 and parity["tolerance"] == 1e-4
    assert 0 < parity["max_rel_error"] <= 1e-4
    assert sidecar["external_data"] is False and sidecar["files"] == ["unet.onnx"]


@pytest.mark.slow
def test_opset18_fallback_decomposes_attention_and_matches(tmp_path):
    unet, _ = slim_tiny_unet(seed=1, config=TWO_LEVEL_UNET)
    path = tmp_path / "unet.onnx"
    sidecar = export_onnx(denoiser_component(unet), tiny_profiles(), path, opset=18)
    ops = [n.op_type for n in _ops(path)]
    assert "Attention" not in ops and "GroupNormalization" not in ops
    # MatMul-Softmax-MatMul per attention (4 transformer blocks x self + cross), what TensorRT's MHA fusion finds
    assert ops.count("Softmax") == count_attention(unet) == 8
    assert sidecar["opset"] == 18 and sidecar["parity"]["max_rel_error"] <= 1e-4
    got, ref = _run_both(path, unet, 4, 24, 24, 154, seed=5)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_fp16_export_reports_its_error(tmp_path):
    unet = seeded_unet(TWO_LEVEL_UNET)
    path = tmp_path / "unet.onnx"
    # one shape: what is checked is the precision, not the axes (a static export takes a third of the time)
    sidecar = export_onnx(denoiser_component(unet), tiny_profiles(batch="2", height="32", width="32", text_len="77"),
                          path, dtype=torch.float16)
    assert sidecar["dtype"] == "float16"
    assert [i["dtype"] for i in sidecar["inputs"]] == ["float16", "float32", "float16"]
    parity = sidecar["parity"]
    assert parity["tolerance"] is None  # reported, not enforced
    assert 1e-6 < parity["max_rel_error"] < 5e-2  # fp16 rounding is visible but small
    assert next(unet.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_text_encoder_and_vae_decoder_export(tmp_path):
    pipe = load_pipeline("builtin:tiny")
    for component in (text_encoder_component(pipe.text_encoder), vae_decoder_component(pipe.vae)):
        path = tmp_path / f"{component.name}.onnx"
        sidecar = export_onnx(component, tiny_profiles(text_len="1:77:77"), path)
        ops = [n.op_type for n in _ops(path)]
        assert ops.count("Attention") == component.attention_modules > 0
        assert sidecar["parity"]["max_rel_error"] <= 1e-4
    assert sidecar["component"] == "vae_decoder" and "GroupNormalization" in ops


def test_parity_check_catches_a_wrong_graph(dense, slim):
    path, sidecar, _ = dense
    _, _, slim_unet = slim
    with pytest.raises(SlimDiffError, match="differs from PyTorch"):
        check_parity(path, denoiser_component(slim_unet), sidecar["axes"], torch.float32)


def test_missing_changed_and_corrupt_onnx_files(dense, tmp_path):
    path, _, unet = dense
    with pytest.raises(SlimDiffError, match="missing"):
        load_sidecar(tmp_path / "nothing.onnx")
    copy = tmp_path / "unet.onnx"
    data = path.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    sidecar_path(copy).write_text(sidecar_path(path).read_text())
    with pytest.raises(SlimDiffError, match="does not match its sidecar"):
        load_sidecar(copy)
    with pytest.raises(SlimDiffError, match="cannot load"):
        check_parity(copy, denoiser_component(unet), {"batch": {"min": 1, "opt": 1, "max": 1}}, torch.float32)
    sidecar_path(copy).write_text("{not json")
    with pytest.raises(SlimDiffError, match="corrupt"):
        load_sidecar(copy)


def test_unsupported_opset_is_refused_before_export(tmp_path):
    with pytest.raises(SlimDiffError, match="opset 17"):
        export_onnx(denoiser_component(load_unet("builtin:tiny")), tiny_profiles(), tmp_path / "u.onnx", opset=17)
    assert not list(tmp_path.iterdir())


def test_head_alignment_pads_to_multiples_of_8_without_changing_outputs():
    from slimdiff.models import module_sites

    sites = module_sites(load_unet("builtin:tiny"))
    ranks = {s.name: (12 if s.width == 32 else 6) if s.kind == "qk" else (20 if s.width == 32 else 10)
             for s in sites if s.kind != "ffn"}
    unet, _ = slim_tiny_unet(seed=2, ranks=ranks)
    gen = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 64, generator=gen)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=e).sample
    planned = planned_head_widths(unet)
    changed = align_head_widths(unet)
    assert changed == planned and len(changed) == 14
    assert set(changed.values()) == {((12, 20), (24, 24)), ((6, 10), (16, 16))}
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            assert m.to_q.out_features == m.to_v.out_features and (m.to_q.out_features // m.heads) % 8 == 0
            assert isinstance(m.processor, SlimAttnProcessor)
    with torch.no_grad():
        after = unet(x, t, encoder_hidden_states=e).sample
    assert (after - before).abs().max().item() <= 1e-6 * before.abs().max().item() + 1e-9
    assert align_head_widths(unet) == {}  # idempotent


def test_head_alignment_without_equalising_pads_each_width_separately():
    from slimdiff.models import module_sites

    sites = module_sites(load_unet("builtin:tiny"))
    unet, _ = slim_tiny_unet(seed=3, ranks={s.name: 12 if s.kind == "qk" and s.width == 32 else s.width
                                            for s in sites})
    changed = align_head_widths(unet, equal_qk_v=False)
    assert set(changed.values()) == {((12, 32), (16, 32))}
