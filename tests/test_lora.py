"""LoRAs: fused before slimming (exactly B·A·scale·alpha/rank on the weights it names), recorded so a slim folder
reopens the same fused pipeline, base-model statistics accepted for the fused model, and every misuse one line."""

import json
from argparse import Namespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimdiff.calibrate import Statistics
from slimdiff.families import site_weights_fingerprint
from slimdiff.cli import main
from slimdiff.errors import SlimDiffError
from slimdiff.lora import LoraSpec, fuse_loras
from slimdiff.models import build_builtin, load_pipeline
from slimdiff.quality.cli import _dense_loras

FAST = ["--num-prompts", "4", "--steps", "3", "--pass1-prompts", "2"]
RANK, ALPHA = 4, 2.0
# kohya / A1111 names (what users download): the module path with "_" for "." under a lora_unet_ / lora_te_ prefix
UNET_LAYERS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
# a text-encoder layer kohya names text_model.encoder.layers.0.self_attn.*: transformers 5 dropped ``text_model``
TEXT_LAYER = "encoder.layers.0.self_attn.q_proj"
TEXT_LAYERS = tuple(f"encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out"))


def _kohya_lora(pipe, path, seed=0):
    """A kohya-layout LoRA on the given layers of every transformer block and on one text-encoder layer's attention
    (all four projections, as kohya trains them: diffusers infers the layout from the output projection's keys);
    returns the weight deltas it makes at scale 1, by (component, module path)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    targets = [("unet", n) for n, _ in pipe.unet.named_modules() if n.endswith(UNET_LAYERS)]
    targets += [("text_encoder", name) for name in TEXT_LAYERS]
    for component, name in targets:
        weight = getattr(pipe, component).get_submodule(name).weight
        down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.05
        up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.05
        key = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
        deltas[component, name] = up @ down * (ALPHA / RANK)
    save_file(tensors, str(path))
    return deltas


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    return path, _kohya_lora(build_builtin("builtin:tiny"), path)


@pytest.fixture(scope="module")
def base_stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-stats") / "stats"
    assert main(["calibrate", "--model", "builtin:tiny", *FAST, "--out", str(out)]) == 0
    return out


def test_fused_weights_are_the_base_plus_the_scaled_product(lora):
    path, deltas = lora
    base, pipe = build_builtin("builtin:tiny"), build_builtin("builtin:tiny")
    fuse_loras(pipe, [LoraSpec(str(path), 0.5)])
    for (component, name), delta in deltas.items():
        before = getattr(base, component).get_submodule(name).weight
        after = getattr(pipe, component).get_submodule(name)
        assert type(after) is torch.nn.Linear  # no LoRA layer left behind
        torch.testing.assert_close(after.weight, before + 0.5 * delta, rtol=0, atol=1e-6)
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(pipe.unet.get_submodule(untouched).weight, base.unet.get_submodule(untouched).weight)


def test_lora_specs_parse_scale_and_paths_with_colons():
    assert LoraSpec.parse("a.safetensors:0.8") == LoraSpec("a.safetensors", 0.8)
    assert LoraSpec.parse("a.safetensors") == LoraSpec("a.safetensors", 1.0)
    assert LoraSpec.parse("dir:x/a.safetensors") == LoraSpec("dir:x/a.safetensors", 1.0)


def test_loras_that_do_not_fit_are_refused_and_leave_the_weights_alone(tmp_path, lora):
    pipe = build_builtin("builtin:tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    missing = tmp_path / "absent.safetensors"
    pickled = tmp_path / "style.ckpt"
    pickled.write_bytes(b"not read")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 16)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    width = pipe.unet.get_submodule(name).weight.shape[1]

    def layer(module_path, inputs=width):
        key = "lora_unet_" + module_path.replace(".", "_")
        return {f"{key}.lora_down.weight": torch.zeros(RANK, inputs), f"{key}.lora_up.weight": torch.zeros(width, RANK)}

    elsewhere = tmp_path / "elsewhere.safetensors"  # a layer of a block the model lacks
    save_file(layer("mid_block.attentions.0.transformer_blocks.7.attn1.to_q"), str(elsewhere))
    partly = tmp_path / "partly.safetensors"  # a layer the model has and one it lacks
    save_file({**layer(name), **layer("mid_block.attentions.0.transformer_blocks.7.attn1.to_q")}, str(partly))
    wide = tmp_path / "wide.safetensors"  # the right name, the wrong width (a LoRA for a bigger model)
    save_file(layer(name, width + 8), str(wide))
    cases = [(missing, "does not exist"), (pickled, "not a .safetensors file"), (corrupt, "not a readable"),
             (elsewhere, "made for another model"), (partly, "layers this StableDiffusionPipeline lacks"),
             (wide, "does not fit")]
    for path, message in cases:
        with pytest.raises(SlimDiffError, match=message):
            fuse_loras(pipe, [LoraSpec(str(path))])
        assert not pipe.get_list_adapters() or not any(pipe.get_list_adapters().values())
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pipelines_diffusers_loads_no_lora_into_are_refused(lora):
    with pytest.raises(SlimDiffError, match="diffusers loads no LoRA into a PixArtSigmaPipeline"):
        fuse_loras(build_builtin("builtin:tiny-pixart"), [LoraSpec(str(lora[0]))])


def test_slim_on_base_statistics_records_the_lora_and_reopens_the_fused_pipeline(base_stats, lora, tmp_path, capsys):
    path, deltas = lora
    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny", "--stats", str(base_stats), "--lora", f"{path}:0.5",
                 "--budget", "0.3", "--out", str(out)]) == 0
    assert "statistics of the model without the LoRA" in capsys.readouterr().out
    info = json.loads((out / "slimdiff_plan.json").read_text())["info"]
    assert info["statistics_without_loras"] is True
    assert [(r["path"], r["scale"]) for r in info["source_loras"]] == [(str(path.resolve()), 0.5)]
    assert main(["inspect", str(out)]) == 0
    assert (f"LoRA fused before slimming: {path.resolve()} at scale 0.5 (statistics: the model's without it)"
            in capsys.readouterr().out)

    # the slim folder reopens its pipeline with the LoRA fused into what slimming left dense (the text encoder)
    pipe, base = load_pipeline(str(out)), build_builtin("builtin:tiny")
    reopened = pipe.text_encoder.get_submodule(TEXT_LAYER).weight
    expected = base.text_encoder.get_submodule(TEXT_LAYER).weight + 0.5 * deltas["text_encoder", TEXT_LAYER]
    torch.testing.assert_close(reopened, expected, rtol=0, atol=1e-6)

    # a LoRA for the dense model is refused in one line by a slim one made without --lora-maps; nothing is injected
    with pytest.raises(SlimDiffError, match="slimmed without --lora-maps"):
        pipe.load_lora_weights(str(path))
    assert all(type(m) is torch.nn.Linear for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))

    # `slimdiff eval` compares with the dense model with the folder's LoRAs fused, unless --lora says otherwise
    assert _dense_loras(Namespace(lora=[], slim=str(out))) == [LoraSpec(str(path.resolve()), 0.5)]
    assert _dense_loras(Namespace(lora=["x.safetensors:2"], slim=str(out))) == [LoraSpec("x.safetensors", 2.0)]

    # the file changed since: the folder says so instead of reopening another model
    _kohya_lora(base, path, seed=1)
    with pytest.raises(SlimDiffError, match="has changed since"):
        load_pipeline(str(out))


def test_a_slim_folder_with_lora_maps_takes_a_kohya_lora_of_the_dense_model(base_stats, tmp_path, capsys):
    """``slimdiff slim --lora-maps``: the folder keeps the maps, and the reopened pipeline loads a LoRA of the dense
    model in kohya's layout (network alphas included) with diffusers' own ``load_lora_weights``: fused at a scale,
    each resized Linear moves by the map of ``scale·alpha/rank·B·A``, every other layer by that product."""
    path = tmp_path / "style.safetensors"
    deltas = _kohya_lora(build_builtin("builtin:tiny"), path)
    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny", "--stats", str(base_stats), "--budget", "0.3", "--lora-maps",
                 "--out", str(out)]) == 0
    assert "LoRA maps:" in capsys.readouterr().out and (out / "lora_maps.safetensors").is_file()
    pipe = load_pipeline(str(out))
    maps = pipe.unet.slim_lora_maps
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["style"])
    unet_layers = [name for component, name in deltas if component == "unet"]
    assert any(name in maps.paths for name in unet_layers) and not all(name in maps.paths for name in unet_layers)
    for name in unet_layers:
        delta = 0.5 * deltas["unet", name]
        moved = pipe.unet.get_submodule(name).weight.detach() - base[f"{name}.weight"]
        torch.testing.assert_close(moved, maps.weight(name, delta) if name in maps.paths else delta,
                                   rtol=0, atol=1e-6)


def test_statistics_of_the_fused_model_are_its_own_and_others_are_refused(lora, tmp_path, capsys):
    path, _ = lora
    stats_dir = tmp_path / "stats"
    assert main(["calibrate", "--model", "builtin:tiny", *FAST, "--lora", str(path), "--out", str(stats_dir)]) == 0
    fused = build_builtin("builtin:tiny")
    fuse_loras(fused, [LoraSpec(str(path))])
    assert Statistics.load(stats_dir).fingerprint == site_weights_fingerprint(fused.unet)
    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny", "--stats", str(stats_dir), "--lora", str(path),
                 "--budget", "0.3", "--out", str(out)]) == 0
    assert json.loads((out / "slimdiff_plan.json").read_text())["info"]["statistics_without_loras"] is False

    # statistics of the LoRA'd model for the model without it, or with another LoRA: neither model's
    other = tmp_path / "other.safetensors"
    _kohya_lora(fused, other, seed=2)
    capsys.readouterr()
    for extra in ([], ["--lora", str(other)]):
        code = main(["slim", "--model", "builtin:tiny", "--stats", str(stats_dir), *extra, "--budget", "0.3",
                     "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "fingerprint mismatch" in err[0], err
    assert not (tmp_path / "never").exists()


def test_export_refuses_a_lora_for_a_slim_folder_without_maps_before_any_work(base_stats, tmp_path, lora, capsys):
    from slimdiff.cli.export import main as export_main

    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny", "--stats", str(base_stats), "--budget", "0.3",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    code = export_main(["--model", str(out), "--engine", "ort", "--lora", str(lora[0]), "--out",
                        str(tmp_path / "engines")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "made without --lora-maps" in err[-1] and "leave out --lora" in err[-1], err
    assert not (tmp_path / "engines").exists()


def test_export_of_a_slim_folder_with_lora_maps_fuses_a_mapped_lora_into_the_engine(base_stats, tmp_path, capsys):
    """One slim model, an engine per LoRA: ``slimdiff-export --model SLIM --lora FILE`` maps the LoRA onto the slim
    UNet and fuses it before the engine is built (the export's parity check compares the engine with that model); a
    LoRA that also changes the text encoder, which a slim folder's engines do not hold, is refused in one line."""
    from slimdiff.cli.export import main as export_main
    from slimdiff.runtime import EngineUNet

    out = tmp_path / "slim"
    assert main(["slim", "--model", "builtin:tiny", "--stats", str(base_stats), "--budget", "0.3", "--lora-maps",
                 "--out", str(out)]) == 0
    base = build_builtin("builtin:tiny")
    unet_only, with_text = tmp_path / "unet.safetensors", tmp_path / "both.safetensors"
    _kohya_lora(base, with_text)
    with safe_open(str(with_text), framework="pt") as handle:
        save_file({k: handle.get_tensor(k) for k in handle.keys() if k.startswith("lora_unet_")}, str(unet_only))
    capsys.readouterr()
    code = export_main(["--model", str(out), "--engine", "ort", "--lora", str(with_text), "--out",
                        str(tmp_path / "never")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "the LoRA also changes the text_encoder" in err[-1], err
    assert not (tmp_path / "never").exists()

    assert export_main(["--model", str(out), "--engine", "ort", "--lora", f"{unet_only}:0.5", "--batch", "2",
                        "--height", "64", "--width", "64", "--out", str(tmp_path / "engines")]) == 0
    assert "mapped onto the slim unet and fused" in capsys.readouterr().out
    styled = load_pipeline(str(out), loras=[LoraSpec(str(unet_only), 0.5)]).unet
    plain = load_pipeline(str(out)).unet
    engine = EngineUNet.from_folder(tmp_path / "engines" / "slim")
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, plain.config.cross_attention_dim,
                                                                          generator=gen)
    result = engine(sample, 500, encoder_hidden_states=text).sample
    expected = styled(sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    assert (expected - plain(sample, 500, encoder_hidden_states=text).sample).abs().max() > 1e-3

    # Switching LoRAs on that engine without exporting it again: the LoRA loaded into the PyTorch slim model (mapped
    # by --lora-maps) at another scale and fused there, the fused weights handed to the engine; then none
    pipe = load_pipeline(str(out))
    pipe.load_lora_weights(str(unet_only), adapter_name="style")
    with pytest.raises(SlimDiffError, match="holds LoRA adapter 'style' unfused"):
        engine.load_weights_from(pipe.unet)
    pipe.fuse_lora(lora_scale=1.5)
    engine.load_weights_from(pipe.unet)
    expected = load_pipeline(str(out), loras=[LoraSpec(str(unet_only), 1.5)]).unet(
        sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(engine(sample, 500, encoder_hidden_states=text).sample, expected, rtol=0,
                               atol=1e-4 * float(expected.abs().max()))
    engine.load_weights_from(plain)
    expected = plain(sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(engine(sample, 500, encoder_hidden_states=text).sample, expected, rtol=0,
                               atol=1e-4 * float(expected.abs().max()))


def _sgm_name(name: str, layers_per_block: int) -> str:
    """The original (SGM) name of a diffusers UNet attention module — what kohya's SDXL LoRAs are keyed by."""
    import re

    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"output_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    return "middle_block.1." + name.removeprefix("mid_block.attentions.0.")


def test_an_sdxl_kohya_lora_in_original_block_names_fuses_exactly(tmp_path):
    """kohya's SDXL LoRAs name the original checkpoint's blocks (input_blocks / middle_block / output_blocks):
    diffusers maps them onto the UNet's, and every layer lands where it belongs."""
    pipe = build_builtin("builtin:tiny-xl")
    unet, generator = pipe.unet, torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(UNET_LAYERS):
            down = torch.randn(RANK, module.in_features, generator=generator) * 0.05
            up = torch.randn(module.out_features, RANK, generator=generator) * 0.05
            key = "lora_unet_" + _sgm_name(name, unet.config.layers_per_block).replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(ALPHA)})
            expected[name] = module.weight.detach() + up @ down * (ALPHA / RANK)
    assert any(k.startswith("lora_unet_output_blocks") for k in tensors) and len(expected) > 20
    save_file(tensors, str(tmp_path / "sdxl.safetensors"))
    fuse_loras(pipe, [LoraSpec(str(tmp_path / "sdxl.safetensors"))])
    for name, weight in expected.items():
        torch.testing.assert_close(unet.get_submodule(name).weight, weight, rtol=0, atol=1e-6)


def test_without_peft_a_lora_is_refused_before_the_model_loads(monkeypatch, lora):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(SlimDiffError, match=r"pip install 'slimdiff\[lora\]'"):
        load_pipeline("builtin:no-such-model", loras=[LoraSpec(str(lora[0]))])  # before the unknown model's error
