"""The engine-backed UNet: drop-in use in a diffusers pipeline, buffer reuse, shape checks, threads."""

import json
import threading

import numpy as np
import pytest
import torch
from export_support import cached_export

from slimdiff.engines import build_engine
from slimdiff.errors import SlimDiffError
from slimdiff.export.modules import denoiser_component
from slimdiff.models import load_pipeline
from slimdiff.runtime import EngineUNet, use_engine


@pytest.fixture(scope="module")
def dense_engine(tmp_path_factory):
    """An ONNX Runtime engine of builtin:tiny's dense UNet, and the UNet itself."""
    path, sidecar, unet = cached_export(tmp_path_factory, "dense")
    folder = tmp_path_factory.mktemp("dense_ort")
    build_engine("ort", denoiser_component(unet), folder, axes=sidecar["axes"], profiles=sidecar["profiles"],
                 dtype=torch.float32, device="cpu", onnx_path=path,
                 extra={"unet_config": dict(unet.config), "variant": "dense"})
    return folder, unet


def _inputs(batch, h, w, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=gen), torch.tensor(321),
            torch.randn(batch, tokens, 64, generator=gen))


def test_engine_unet_looks_and_answers_like_the_pytorch_unet(dense_engine):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    folder, unet = dense_engine
    engine = EngineUNet.from_folder(folder)
    assert json.dumps(dict(engine.config)) == json.dumps(dict(unet.config))  # JSON turns tuples into lists
    assert engine.config.in_channels == engine.in_channels == 4 and engine.config.sample_size == 16
    assert engine.dtype == torch.float32 and engine.device == torch.device("cpu")
    assert engine.engine == "ort" and engine.rank_plan is None
    x, t, e = _inputs(2, 16, 16, 77)
    out = engine(x, t, encoder_hidden_states=e)
    assert isinstance(out, UNet2DConditionOutput)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e).sample
    assert (out.sample - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    tup = engine(x, t, encoder_hidden_states=e, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.sample)
    # A float64 caller gets float64 back; the engine computes in its own precision.
    assert engine(x.double(), 321.0, encoder_hidden_states=e.double()).sample.dtype == torch.float64


def test_buffers_are_reused_for_a_shape_and_rebound_for_a_new_one(dense_engine):
    folder, unet = dense_engine
    engine = EngineUNet.from_folder(folder)
    x1, t1, e1 = _inputs(2, 16, 16, 77, seed=1)
    a = engine(x1, t1, encoder_hidden_states=e1).sample
    buffers = [b.data_ptr() for b in engine.runner._inputs] + [engine.runner._output.data_ptr()]
    x, t, e = _inputs(2, 16, 16, 77, seed=2)
    b = engine(x, t, encoder_hidden_states=e).sample
    assert [b_.data_ptr() for b_ in engine.runner._inputs] + [engine.runner._output.data_ptr()] == buffers
    assert not torch.equal(a, b)  # the returned output is a copy, not the shared buffer
    x2, t2, e2 = _inputs(3, 24, 8, 100, seed=3)
    c = engine(x2, t2, encoder_hidden_states=e2).sample
    with torch.no_grad():
        ref = unet(x2, t2, encoder_hidden_states=e2).sample
    assert c.shape == (3, 4, 24, 8) and (c - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("shape, what", [
    ((8, 16, 16, 77), "batch 8"),  # batch above the range
    ((2, 12, 16, 77), "latent 12x16"),  # not a multiple of 8
    ((2, 32, 16, 77), "latent 32x16"),  # above the range
    ((2, 16, 16, 200), "200 tokens"),
])
def test_shapes_outside_the_engine_are_one_clear_error(dense_engine, shape, what):
    engine = EngineUNet.from_folder(dense_engine[0])
    x, t, e = _inputs(*shape)
    with pytest.raises(SlimDiffError, match=f"{what}.*outside this engine's shapes") as info:
        engine(x, t, encoder_hidden_states=e)
    assert "\n" not in str(info.value)


def test_unsupported_unet_features_are_refused(dense_engine):
    engine = EngineUNet.from_folder(dense_engine[0])
    x, t, e = _inputs(1, 16, 16, 77)
    with pytest.raises(SlimDiffError, match="down_block_additional_residuals"):
        engine(x, t, encoder_hidden_states=e, down_block_additional_residuals=(x,))
    with pytest.raises(SlimDiffError, match="cross_attention_kwargs"):
        engine(x, t, encoder_hidden_states=e, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(SlimDiffError, match="2 timesteps for a batch of 1"):
        engine(x, torch.tensor([1.0, 2.0]), encoder_hidden_states=e)
    with pytest.raises(SlimDiffError, match="cannot move to cuda"):
        engine.to("cuda")
    assert engine.to("cpu", torch.float16) is engine


def test_concurrent_calls_give_the_same_results_as_sequential_ones(dense_engine):
    engine = EngineUNet.from_folder(dense_engine[0])
    shapes = [(1, 16, 16, 77), (2, 16, 16, 77), (2, 8, 24, 77), (1, 16, 16, 100)] * 2
    inputs = [_inputs(*s, seed=i) for i, s in enumerate(shapes)]
    expected = [engine(x, t, encoder_hidden_states=e).sample for x, t, e in inputs]
    results = [None] * len(inputs)

    def work(i):
        x, t, e = inputs[i]
        results[i] = engine(x, t, encoder_hidden_states=e).sample

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, x) for r, x in zip(results, expected))


def test_pipeline_image_with_engine_unet_matches_pytorch(dense_engine):
    folder, _ = dense_engine
    pipe = load_pipeline("builtin:tiny")

    def generate():
        return pipe("a red circle above a blue square", num_inference_steps=4, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(11), output_type="np").images[0]

    reference = generate()
    engine = use_engine(pipe, folder)
    assert pipe.unet is engine
    pipe.to("cpu")  # what user code does; a no-op for a CPU engine
    image = generate()
    assert image.shape == reference.shape == (32, 32, 3)
    assert np.abs(image - reference).max() < 1e-3
    assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image: the comparison has content


def test_a_lora_is_refused_by_an_engine_in_one_line(dense_engine, tmp_path):
    from safetensors.torch import save_file

    pipe = load_pipeline("builtin:tiny")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    width = pipe.unet.get_submodule(name).weight.shape[0]
    key = "lora_unet_" + name.replace(".", "_")
    save_file({f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(width, 4)},
              str(tmp_path / "style.safetensors"))
    use_engine(pipe, dense_engine[0])
    with pytest.raises(SlimDiffError, match=r"a LoRA cannot be loaded into it\. Load and fuse the LoRA into a PyTorch "
                                            r"copy of the unet .* `pipe\.unet\.load_weights_from\(module\)`"):
        pipe.load_lora_weights(str(tmp_path / "style.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Engines know what they belong to: input signature and UNet config fingerprint
# ---------------------------------------------------------------------------------------------------------


def test_engine_metadata_records_signature_and_fingerprint(dense_engine):
    from slimdiff.engines import architecture_fingerprint, config_fingerprint, load_engine_meta

    folder, unet = dense_engine
    meta, _ = load_engine_meta(folder)
    assert meta["signature"] == [{"name": "sample", "dtype": "model", "rank": 4},
                                 {"name": "timestep", "dtype": "float32", "rank": 1},
                                 {"name": "encoder_hidden_states", "dtype": "model", "rank": 3}]
    assert meta["config_fingerprint"] == config_fingerprint(unet.config)
    # Bookkeeping keys do not count: a config read back from JSON in another process fingerprints the same.
    assert config_fingerprint({**unet.config, "_name_or_path": "elsewhere", "_use_default_values": ["b", "a"]}) \
        == meta["config_fingerprint"]
    # A slim UNet's config carries its rank plan; its engine still belongs to the dense pipeline.
    assert architecture_fingerprint({**unet.config, "rank_plan": {"modules": {}}}) == meta["config_fingerprint"]
    assert config_fingerprint({**unet.config, "cross_attention_dim": 32}) != meta["config_fingerprint"]


def test_use_engine_refuses_an_engine_built_for_another_unet(dense_engine):
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    folder, unet = dense_engine
    other = UNet2DConditionModel(**{**{k: v for k, v in unet.config.items() if not k.startswith("_")},
                                    "cross_attention_dim": 32})
    pipe = SimpleNamespace(unet=other)
    with pytest.raises(SlimDiffError) as info:
        use_engine(pipe, folder)
    message = str(info.value)
    assert "not built for this pipeline's UNet" in message and "cross_attention_dim 64 vs 32" in message
    assert "check_model=False" in message and "\n" not in message and pipe.unet is other
    # The explicit override: the user knows better.
    assert use_engine(pipe, folder, check_model=False) is pipe.unet and isinstance(pipe.unet, EngineUNet)


def test_use_engine_refuses_an_engine_with_another_input_signature(dense_engine, tmp_path):
    import shutil

    from slimdiff.engines import engine_meta_path

    folder, unet = dense_engine
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    meta = json.loads(engine_meta_path(foreign).read_text())
    # What an SDXL engine declares: two more inputs than an SD-1.x pipeline's UNet takes.
    meta["signature"] += [{"name": "text_embeds", "dtype": "model", "rank": 2},
                          {"name": "time_ids", "dtype": "model", "rank": 2}]
    engine_meta_path(foreign).write_text(json.dumps(meta))
    pipe = load_pipeline("builtin:tiny")
    with pytest.raises(SlimDiffError, match=r"inputs sample .*time_ids \(model, rank 2\) \(the pipeline's UNet "
                                            r"takes sample \(model, rank 4\), timestep"):
        use_engine(pipe, foreign)
    # An engine used as the pipeline's UNet already is compared by its own signature.
    use_engine(pipe, folder)
    use_engine(pipe, folder)
