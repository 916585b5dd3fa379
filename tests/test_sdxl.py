"""SDXL end to end on builtin:tiny-xl: loading, calibration through StableDiffusionXLPipeline, SlimSet's two
text towers, ONNX export with text_embeds/time_ids, the engine UNet inside the SDXL pipeline; and the public
SDXL-base shapes (builtin:sdxl-shape, meta device: nothing is allocated)."""

import json
import shutil

import numpy as np
import pytest
import torch
from export_support import TWO_LEVEL_XL_UNET, seeded_unet

from slimdiff.bench.macs import count_macs, meta_unet
from slimdiff.bench.plans import transformer_mac_plan
from slimdiff.calibrate import CalibrationConfig, calibrate
from slimdiff.errors import SlimDiffError
from slimdiff.engines import build_engine
from slimdiff.export.modules import denoiser_component
from slimdiff.export.onnx import export_onnx
from slimdiff.export.shapes import parse_profiles
from slimdiff.engines.trt import optimization_profiles
from slimdiff.families import family_for, transformer_blocks
from slimdiff.models import build_builtin, load_pipeline, module_sites
from slimdiff.runtime import EngineUNet, use_engine
from slimdiff.slim import SlimConfig, slim_unet
from slimdiff.slimset import text_embedder

PROMPTS = ["a red circle above a blue square", "two green triangles", "a small yellow star"]


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    """builtin:tiny-xl saved by diffusers, as a user would bring it."""
    folder = tmp_path_factory.mktemp("xl") / "pipe"
    build_builtin("builtin:tiny-xl").save_pretrained(folder, safe_serialization=True)
    return folder


def _generate(pipe):
    return pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                output_type="np").images[0]


def test_sdxl_folder_loads_as_the_xl_pipeline_and_bad_folders_fail_in_one_line(xl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(str(xl_folder))
    assert type(pipe) is StableDiffusionXLPipeline and pipe.text_encoder_2 is not None
    assert family_for(pipe).name == family_for(pipe.unet).name == "sdxl"
    reference = build_builtin("builtin:tiny-xl")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values()))

    refiner = tmp_path / "refiner"
    shutil.copytree(xl_folder, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(refiner / "text_encoder")
    # a refiner's model_index.json around the base's UNet (six time ids): its first UNet call would fail
    with pytest.raises(SlimDiffError, match="is an SDXL refiner folder .* holding a base UNet .*: the folder mixes"):
        load_pipeline(str(refiner))

    partial = tmp_path / "partial"
    shutil.copytree(xl_folder, partial)
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(SlimDiffError, match="without text_encoder_2"):
        load_pipeline(str(partial))


def test_calibration_runs_the_xl_loop_and_slims_with_slimset_on_both_towers():
    pipe = build_builtin("builtin:tiny-xl")
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("added_cond_kwargs")),
                                                 with_kwargs=True)
    stats = calibrate(pipe, PROMPTS[:2], None, CalibrationConfig(steps=2, pass1_prompts=1, batch_size=2),
                      progress=False)
    handle.remove()
    # the pipeline's own loop: CFG doubles the batch; pooled text (32 wide) and six micro-conditioning ids
    assert calls and all(c["text_embeds"].shape == (4, 32) and c["time_ids"].shape == (4, 6) for c in calls)
    assert calls[0]["time_ids"][0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert len(stats.timesteps) == 2 and stats.visits == [1, 1]
    deep = [p for p, _, _ in transformer_blocks(pipe.unet) if p.endswith("transformer_blocks.1")]
    assert deep and all(stats.attention(f"{p}.attn2").context_seq == 77 for p in deep)  # the (1, 1, 2) stack is calibrated

    # SlimSet: both text towers, each normalised, so neither dominates the cosine distance
    embed = text_embedder(pipe)(PROMPTS)
    assert embed.shape == (3, 32 + 32)
    assert torch.allclose(embed.norm(dim=1), torch.ones(3))
    assert torch.allclose(embed[:, :32].norm(dim=1), torch.full((3,), 0.5 ** 0.5), atol=1e-6)

    dense_params = sum(p.numel() for p in pipe.unet.parameters())
    report = slim_unet(pipe.unet, stats, SlimConfig(budget=0.4), progress=False)
    assert sum(p.numel() for p in pipe.unet.parameters()) == dense_params - report.plan.params_removed
    image = _generate(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_onnx_export_takes_text_embeds_and_time_ids_and_the_engine_drives_the_xl_pipeline(tmp_path):
    # tiny-xl's UNet at two levels (the export's time follows the graph): the whole tiny-xl UNet is exported in
    # test_conformance.py (TestSDXLPipeline) and drives this pipeline as an engine in test_sdxl_cli.py.
    pipe = build_builtin("builtin:tiny-xl")
    pipe = type(pipe)(**{**pipe.components, "unet": seeded_unet(TWO_LEVEL_XL_UNET)})
    pipe.set_progress_bar_config(disable=True)
    profiles = parse_profiles("1:2:4", "16:32:48", "16:32:48", "77", vae_scale=2, multiple=8)
    component = denoiser_component(pipe.unet)
    sidecar = export_onnx(component, profiles, tmp_path / "unet.onnx")
    inputs = {i["name"]: i["dims"] for i in sidecar["inputs"]}
    assert inputs["text_embeds"] == ["batch", 32] and inputs["time_ids"] == ["batch", 6]
    assert sidecar["parity"]["max_rel_error"] <= 1e-4 and len(sidecar["parity"]["shapes"]) == 2
    # TensorRT's optimization profile covers the new inputs over the batch range
    trt = optimization_profiles(sidecar)[0]
    assert trt["text_embeds"] == ((1, 32), (2, 32), (4, 32)) and trt["time_ids"] == ((1, 6), (2, 6), (4, 6))

    build_engine("ort", component, tmp_path, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cpu", onnx_path=tmp_path / "unet.onnx",
                 extra={"unet_config": dict(pipe.unet.config)})
    reference = _generate(pipe)
    engine = use_engine(pipe, tmp_path)
    image = _generate(pipe)
    assert np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image

    x = torch.randn(2, 4, 16, 16)
    with pytest.raises(SlimDiffError, match=r"needs added_cond_kwargs\['text_embeds'\]"):
        engine(x, 1, encoder_hidden_states=torch.randn(2, 77, 64))
    with pytest.raises(SlimDiffError, match="has shape"):
        engine(x, 1, encoder_hidden_states=torch.randn(2, 77, 64),
               added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 5)})
    with pytest.raises(SlimDiffError, match="added_cond_kwargs"):
        engine(x, 1, encoder_hidden_states=torch.randn(2, 77, 64), added_cond_kwargs={
            "text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6), "image_embeds": torch.randn(2, 8)})
    assert isinstance(engine, EngineUNet)


def test_unsupported_conditions_are_refused_in_one_line():
    from diffusers import UNet2DConditionModel

    from slimdiff.configs import TINY_UNET

    with pytest.raises(SlimDiffError, match="class_embed_type"):
        denoiser_component(UNet2DConditionModel(**TINY_UNET, class_embed_type="timestep"))
    with pytest.raises(SlimDiffError, match="addition_embed_type='text'"):
        family_for(UNet2DConditionModel(**TINY_UNET, addition_embed_type="text", encoder_hid_dim=64))


def test_sdxl_shape_is_the_public_sdxl_base_on_the_meta_device():
    pipe = build_builtin("builtin:sdxl-shape", device="meta")
    unet = pipe.unet
    assert next(unet.parameters()).device.type == "meta"
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    blocks = transformer_blocks(unet)
    assert len(blocks) == 70 and {b.attn1.heads * 64 for _, b, _ in blocks} == {640, 1280}  # 64-wide heads
    assert sum(p.numel() for _, b, _ in blocks for p in b.parameters()) == 2_185_401_600
    assert sum(p.numel() for p in pipe.text_encoder_2.parameters()) == 694_659_840  # OpenCLIP bigG + projection
    dense = count_macs(unet, 1, (128, 128))  # 1024² images
    assert round(dense.total / 1e9, 1) == 3380.6 and 0.745 < dense.transformer / dense.total < 0.755
    plan = transformer_mac_plan(unet, 0.4, (128, 128))
    slim = count_macs(meta_unet(unet.config, plan), 1, (128, 128))
    removed = (dense.transformer - slim.transformer) / dense.transformer
    assert abs(removed - 0.4) < 0.01 and slim.other == dense.other
    assert len(module_sites(unet)) == 350
