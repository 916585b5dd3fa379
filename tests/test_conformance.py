"""One conformance suite for every model family (diffusers' ``ModelTesterMixin`` pattern).

:class:`FamilyConformance` holds the checks; each family's test class only says how to build a tiny seeded
pipeline of that family. A new family adds one such class (and its adapter), nothing else:

* full rank reproduces the model; the closed-form error of each site kind equals the error measured directly
  on the calibration moments with the rebuilt weights; the plan's parameter count is exact;
* save → load is bit-identical (slimdiff's loader and diffusers' ``from_pretrained``); a slim pipeline folder
  loads with ``DiffusionPipeline.from_pretrained`` and makes the same image as the in-memory slim pipeline;
* statistics collected in site shards equal one calibration's, bit for bit;
* a LoRA of the dense model fuses into the family's blocks, and with ``--lora-maps`` loads into the slim model
  (mapped), switches and unloads; at full rank the slim model with the LoRA computes what the dense one with it does;
* the slim denoiser exports to ONNX within the fp32 parity tolerance (checked by ONNX Runtime); a family whose
  whole slim graph another test exports checks a smaller denoiser of its layout here (``export_config``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from export_support import TWO_LEVEL_UNET, TWO_LEVEL_XL_REFINER_UNET, TWO_LEVEL_XL_UNET, seeded_unet

from slimdiff.calibrate import CalibrationConfig, calibrate
from slimdiff.configs import TINY_TEXT, TINY_UNET, TINY_VAE
from slimdiff.decompose import (
    ffn_measured_error,
    qk_measured_error,
    regularise,
    vo_measured_error,
    with_bias_coordinate,
)
from slimdiff.families import CROSS, FFN, QK, SELF, VO, family_for, family_named, module_sites, site_linears
from slimdiff.models import _seeded
from slimdiff.quality.sampling import with_denoiser
from slimdiff.rebuild import load_slim_weights, resize_site
from slimdiff.serialization import load_slim, save_slim, save_slim_pipeline
from slimdiff.slim import SlimConfig, analyze_sites, decompose_site, slim_unet
from slimdiff.slim_models import slim_class_for
from slimdiff.tokenization import builtin_tokenizer

PROMPTS = ["a red cube on a table", "two blue spheres", "a green pyramid at night"]


def _pipeline(unet_config: dict, scheduler_cls: str = "PNDMScheduler", **scheduler_kwargs):
    """A StableDiffusionPipeline around a seeded UNet of ``unet_config`` with builtin:tiny's text tower and VAE."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _seeded(0, lambda: UNet2DConditionModel(**unet_config))
    text_encoder = _seeded(1, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))
    vae = _seeded(2, lambda: AutoencoderKL(**TINY_VAE))
    scheduler = getattr(diffusers, scheduler_cls)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, set_alpha_to_one=False, **scheduler_kwargs)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=builtin_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    return pipe


class FamilyConformance:
    """The checks every family passes. Subclasses set ``family`` and implement :meth:`make_pipeline`."""

    family: str
    budget = 0.3
    image_px: int  # image size for sampling and export (latent = image / 2 with the tiny VAE)
    image_steps = 2  # steps of the pipeline-image check (an image-to-image family runs a fraction of them)
    # Prompts of the pipeline-image check. A family whose pipeline calls its denoiser with one sample (no guidance
    # batch) draws two: at batch 1 the conditioning MLPs are matrix-vector products, whose CPU kernel rounds
    # differently with the weights' memory alignment (a loaded folder's weights are memory-mapped, unaligned), and
    # bit-equality is what this check compares.
    image_prompts = 1
    # The export check's UNet when another test exports the family's whole slim graph: a smaller UNet of the same
    # layout, calibrated and slimmed like the class's own (the exporter's time grows with the graph). None: the
    # class's own slim denoiser.
    export_config: dict | None = None
    # The attention kinds of the family's blocks: the closed-form check takes a Q·K site of the last kind and a V·O
    # site of the first.
    attentions: tuple[str, ...] = (SELF, CROSS)
    # The site kinds of the family's blocks (FLUX's attentions normalise and rotate q and k: no Q·K site).
    kinds: tuple[str, ...] = (FFN, QK, VO)
    # The family of the denoiser alone, where it cannot say which pipeline it serves (FLUX Kontext's transformer has
    # FLUX.1-dev's configuration); its calls are then the pipeline family's. None: the family's.
    denoiser_family: str | None = None

    @classmethod
    def make_pipeline(cls):
        raise NotImplementedError

    @classmethod
    def calibration_options(cls) -> dict:
        """What the family's calibration takes beyond prompts, steps and size (an inpainting model's images)."""
        return {}

    @staticmethod
    def denoiser(pipe):
        return family_for(pipe).denoiser(pipe)

    def call_inputs(self, unet, batch: int = 2) -> dict:
        """Seeded random keyword inputs of one denoiser call (the family's own input layout; masks kept)."""
        family = family_for(unet) if self.denoiser_family is None else family_named(self.family)
        call = family.dummy_call(unet.config, batch, (self.image_px // 2,) * 2)
        gen = torch.Generator().manual_seed(7)
        drawn = lambda t: torch.randn(t.shape, generator=gen) if t is not None and t.is_floating_point() else t  # noqa: E731
        call = {k: ({n: drawn(v) for n, v in a.items()} if isinstance(a, dict) else a if "mask" in k else drawn(a))
                for k, a in call.items()}
        return {**call, "timestep": torch.full_like(call["timestep"], 421)}  # a timestep inside the schedule

    # --- shared, expensive state (once per family) -----------------------------------------------------

    @classmethod
    def calibration(cls, pipe, out=None, site_shards: int = 1):
        """``pipe``'s statistics over PROMPTS (a few steps at the family's image size)."""
        config = CalibrationConfig(steps=3, pass1_prompts=1, batch_size=1, height=cls.image_px, width=cls.image_px,
                                   **cls.calibration_options())
        return calibrate(pipe, PROMPTS, out, config, progress=False, site_shards=site_shards)

    @pytest.fixture(scope="class")
    @classmethod
    def calibrated(cls):
        pipe = cls.make_pipeline()
        return pipe, cls.calibration(pipe)

    @pytest.fixture(scope="class")
    @classmethod
    def slimmed(cls, calibrated):
        pipe, stats = calibrated
        unet = copy.deepcopy(cls.denoiser(pipe))
        report = slim_unet(unet, stats, SlimConfig(budget=cls.budget), progress=False)
        return unet, report

    # --- checks -------------------------------------------------------------------------------------------

    def test_family_and_sites(self, calibrated):
        pipe, _ = calibrated
        assert family_for(pipe).name == self.family
        assert family_for(self.denoiser(pipe)).name == (self.denoiser_family or self.family)
        sites = module_sites(self.denoiser(pipe))
        assert {s.kind for s in sites} == set(self.kinds)
        assert {s.attention for s in sites if s.kind != FFN} == set(self.attentions)

    def test_site_shards_equal_one_calibration(self, calibrated, tmp_path):
        """Statistics collected in site shards (each a calibration of some sub-layers, read back from disk) are the
        same numbers as one calibration's: every site's sums are the same operations in the same order."""
        pipe, stats = calibrated
        sharded = self.calibration(pipe, tmp_path / "stats", site_shards=2)
        assert len(list(tmp_path.glob("stats/shard-*-of-2/manifest.json"))) == 2
        assert set(sharded.tensors) == set(stats.tensors)
        assert [k for k in stats.tensors if not torch.equal(sharded.tensors[k], stats.tensors[k])] == []
        assert sharded.timestep_weights.keys() == stats.timestep_weights.keys()
        assert all(torch.equal(sharded.timestep_weights[k], w) for k, w in stats.timestep_weights.items())
        sharded.check_model(self.denoiser(pipe))

    def test_lora_fuses_into_every_linear_of_a_block(self, tmp_path):
        """``--lora`` on the family: a LoRA in diffusers' / PEFT's layout on every Linear of the first block with
        sites (attention and FFN projections, the DiTs' modulation Linears) fuses as ``W + scale·B·A``, other
        weights untouched; a pipeline diffusers loads no LoRA into is refused in one line."""
        from safetensors.torch import save_file

        from slimdiff.errors import SlimDiffError
        from slimdiff.lora import LoraSpec, fuse_loras

        pipe = self.make_pipeline()
        denoiser, component = self.denoiser(pipe), family_for(pipe).component
        block = module_sites(denoiser)[0].block
        targets = {n: m.weight.detach().clone() for n, m in denoiser.named_modules()
                   if n.startswith(f"{block}.") and isinstance(m, torch.nn.Linear)}
        gen = torch.Generator().manual_seed(5)
        layers = {n: (torch.randn(4, w.shape[1], generator=gen) * 0.1, torch.randn(w.shape[0], 4, generator=gen) * 0.1)
                  for n, w in targets.items()}
        save_file({f"{component}.{n}.lora_{side}.weight": t for n, (a, b) in layers.items()
                   for side, t in (("A", a), ("B", b))}, str(tmp_path / "lora.safetensors"))
        spec = LoraSpec(str(tmp_path / "lora.safetensors"), 0.5)
        if not hasattr(pipe, "load_lora_weights"):
            with pytest.raises(SlimDiffError, match=f"diffusers loads no LoRA into a {type(pipe).__name__}$"):
                fuse_loras(pipe, [spec])
            return
        others = {n: p.clone() for n, p in denoiser.named_parameters() if n.removesuffix(".weight") not in targets}
        fuse_loras(pipe, [spec])
        assert len(targets) >= 4
        for name, weight in targets.items():
            a, b = layers[name]
            torch.testing.assert_close(denoiser.get_submodule(name).weight, weight + 0.5 * b @ a, rtol=0, atol=1e-6)
        assert all(torch.equal(p, others[n]) for n, p in denoiser.named_parameters() if n in others)

    # --- LoRAs of the dense model on the slim one (slimdiff.lora_maps) ------------------------------------------

    @staticmethod
    def dense_lora(denoiser, component: str, path: Path, seed: int = 5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A rank-4 LoRA in peft's layout on every Linear of every block with sites, saved at ``path``; returns
        (A, B) by Linear path."""
        from safetensors.torch import save_file

        blocks = {s.block for s in module_sites(denoiser)}
        gen = torch.Generator().manual_seed(seed)
        layers = {n: (torch.randn(4, m.in_features, generator=gen) * 0.1,
                      torch.randn(m.out_features, 4, generator=gen) * 0.1)
                  for n, m in denoiser.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(n.startswith(f"{b}.") for b in blocks)}
        save_file({f"{component}.{n}.lora_{side}.weight": t for n, (a, b) in layers.items()
                   for side, t in (("A", a), ("B", b))}, str(path))
        return layers

    def test_lora_maps_at_full_rank_carry_a_lora_exactly(self, calibrated, tmp_path):
        """At full rank every site's factors are invertible, so a slim model "slimmed" to full rank with its LoRA
        maps, with a dense LoRA loaded through ``pipe.load_lora_weights``, computes what the dense model with the
        LoRA fused does — which needs every map right, the value bias folded into an output projection included
        (its LoRA then adds ``B·A·b_V`` to the bias)."""
        from slimdiff.lora import LoraSpec, fuse_loras
        from slimdiff.lora_maps import LinearMaps
        from slimdiff.plan import RankPlan

        pipe, stats = calibrated
        if not hasattr(pipe, "load_lora_weights"):
            return  # refused in test_lora_fuses_into_every_linear_of_a_block
        component = family_for(pipe).component
        dense = self.denoiser(pipe)
        layers = self.dense_lora(dense, component, tmp_path / "lora.safetensors")
        sites = module_sites(dense)
        analyses = analyze_sites(dense, stats, sites)
        full = copy.deepcopy(dense)
        tensors, maps = {}, {}
        for s in sites:
            result = decompose_site(dense, analyses[s.name], s.width, SlimConfig(lora_maps=True))
            tensors.update(result.tensors)
            maps.update(result.lora_maps)
        load_slim_weights(full, {k: v.float() for k, v in tensors.items()})
        full.slim_lora_maps = LinearMaps(maps)
        slim = slim_class_for(full).from_slim(full, RankPlan.from_ranks(sites, {s.name: s.width for s in sites}))
        slim_pipe = with_denoiser(pipe, slim)
        # at full rank the mapped LoRA has the dense shapes, which the slim model takes as mapped already
        mapped = slim.slim_lora_maps.map_lora({f"{p}.lora_{side}.weight": t for p, (a, b) in layers.items()
                                               for side, t in (("A", a), ("B", b))})
        slim_pipe.load_lora_weights({f"{component}.{k}": v for k, v in mapped.items()}, adapter_name="style")
        slim_pipe.set_adapters(["style"], [0.5])

        fused_pipe = with_denoiser(pipe, copy.deepcopy(dense))
        fuse_loras(fused_pipe, [LoraSpec(str(tmp_path / "lora.safetensors"), 0.5)])
        call = self.call_inputs(dense)
        ref, base = self.denoiser(fused_pipe)(**call).sample, dense(**call).sample
        out = slim(**call).sample
        assert (ref - base).abs().max() > 1e-2  # the LoRA changes the output
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))

    def test_lora_maps_switch_loras_on_a_slim_model(self, calibrated, tmp_path):
        """``slimdiff slim --lora-maps``: the maps reproduce the slim weights from the dense ones; a dense LoRA
        loaded into the slim model (``slimdiff.load_lora``) is the mapped ``B·A`` (fused: each resized Linear's
        weight moves by the map of ``scale·B·A``, every other Linear by ``scale·B·A``); two LoRAs switch by name,
        and unloading restores the slim weights; the maps travel with the folder (``load_slim`` and
        ``from_pretrained``). A slim model without maps refuses a LoRA in one line."""
        from slimdiff.errors import SlimDiffError
        from slimdiff.lora import load_lora

        pipe, stats = calibrated
        component = family_for(pipe).component
        dense = self.denoiser(pipe)
        unet = copy.deepcopy(dense)
        report = slim_unet(unet, stats, SlimConfig(budget=self.budget, lora_maps=True), progress=False)
        maps = unet.slim_lora_maps
        resized = {n for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.weight.shape != dense.get_submodule(n).weight.shape}
        assert resized and maps.paths == resized
        for path in resized:
            expected = maps.weight(path, dense.get_submodule(path).weight.detach())
            torch.testing.assert_close(unet.get_submodule(path).weight, expected, rtol=0,
                                       atol=1e-4 * float(expected.abs().max()))
        if not hasattr(pipe, "load_lora_weights"):
            return
        save_slim(unet, report.plan, tmp_path / "slim")
        loaded = load_slim(tmp_path / "slim")
        assert set(loaded.slim_lora_maps.tensors) == set(maps.tensors)
        assert slim_class_for(unet).from_pretrained(tmp_path / "slim").slim_lora_maps.paths == resized

        layers = self.dense_lora(dense, component, tmp_path / "one.safetensors")
        self.dense_lora(dense, component, tmp_path / "two.safetensors", seed=6)
        base = {n: p.detach().clone() for n, p in loaded.named_parameters()}
        slim_pipe = with_denoiser(pipe, loaded)
        load_lora(slim_pipe, tmp_path / "one.safetensors", adapter_name="one")
        load_lora(slim_pipe, tmp_path / "two.safetensors", adapter_name="two")
        call = self.call_inputs(loaded)
        outputs = {}
        for name in ("one", "two"):
            slim_pipe.set_adapters([name], [0.5])
            outputs[name] = loaded(**call).sample
        assert (outputs["one"] - outputs["two"]).abs().max() > 1e-3
        slim_pipe.set_adapters(["one"], [0.5])
        slim_pipe.fuse_lora(lora_scale=1.0, adapter_names=["one"])
        torch.testing.assert_close(loaded(**call).sample, outputs["one"], rtol=0, atol=1e-4)
        weights = dict(loaded.named_parameters())
        for path, (a, b) in layers.items():
            key = next(k for k in weights if k.startswith(f"{path}.") and k.endswith("weight") and "lora" not in k)
            delta = weights[key].detach() - base[key.replace(".base_layer", "")]
            expected = maps.weight(path, 0.5 * b @ a) if path in resized else 0.5 * b @ a
            # float32 rounding of a fused weight grows with its magnitude: a delta of 13 carries ~1e-5 of it
            torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
        slim_pipe.unfuse_lora()
        slim_pipe.unload_lora_weights()
        assert all(torch.allclose(p, base[n], rtol=1e-6, atol=1e-6) for n, p in loaded.named_parameters())

        plain = slim_class_for(unet).from_slim(unet, report.plan)
        plain.slim_lora_maps = None  # slimmed without --lora-maps
        plain_pipe = with_denoiser(pipe, plain)
        with pytest.raises(SlimDiffError, match="slimmed without --lora-maps"):
            load_lora(plain_pipe, tmp_path / "one.safetensors")
        assert not any("lora" in n for n, _ in plain.named_parameters())

    def test_full_rank_reproduces_the_model(self, calibrated):
        pipe, stats = calibrated
        unet = copy.deepcopy(self.denoiser(pipe))
        call = self.call_inputs(unet)
        ref = unet(**call).sample
        sites = module_sites(unet)
        analyses = analyze_sites(unet, stats, sites)
        tensors = {}
        for s in sites:
            result = decompose_site(unet, analyses[s.name], s.width, SlimConfig())
            assert result.relative_error < 1e-9, s.name
            tensors.update(result.tensors)
        load_slim_weights(unet, {k: v.float() for k, v in tensors.items()})
        assert torch.allclose(unet(**call).sample, ref, atol=5e-5, rtol=0)

    def test_closed_form_error_equals_measured(self, calibrated):
        pipe, stats = calibrated
        unet = self.denoiser(pipe)
        config = SlimConfig(vo_statistic="value", ridge_qk=1e-9, ridge_vo=1e-9)
        sites = module_sites(unet)
        picked = [next(s for s in sites if s.kind == FFN),
                  *(next(s for s in sites if s.kind == QK and s.attention == self.attentions[-1])
                    for _ in range(QK in self.kinds)),
                  next(s for s in sites if s.kind == VO and s.attention == self.attentions[0])]
        analyses = analyze_sites(unet, stats, picked)
        as64 = lambda t: t.detach().double()  # noqa: E731
        for site in picked:
            rank = max(1, site.width // 2)
            result = decompose_site(unet, analyses[site.name], rank, config)
            lin = site_linears(unet, site)
            # the rebuilt weights as the closed forms see them (a joint attention's streams stacked): the site's
            # Linears in a float64 copy resized to the rank and loaded with the new weights
            rebuilt = copy.deepcopy(unet).double()
            resize_site(rebuilt, site, rank)
            load_slim_weights(rebuilt, result.tensors)
            new_lin = site_linears(rebuilt, site)
            roles = {FFN: ("proj", "down"), QK: ("q", "k"), VO: ("v", "out")}[site.kind]
            new = {role: as64(getattr(new_lin, role).weight) for role in roles}
            inputs = analyses[site.name].read_inputs()
            if site.kind == FFN:
                moment = regularise(inputs["moment"], config.ridge_ffn)
                content = new["proj"][:rank] if lin.gated else new["proj"]
                dense = as64(lin.proj.weight)[:site.width]
                keep = torch.tensor([int((dense == row).all(1).nonzero()[0]) for row in content])
                down = as64(lin.down.weight)
                measured = ffn_measured_error(down, moment, keep, new["down"])
                total = float(torch.einsum("ci,ij,cj->", down, moment, down))
                assert abs(measured / total - result.relative_error) < 1e-6 * max(1.0, result.relative_error)
                continue
            if site.kind == QK:
                q, k, new_q, sigma_x = as64(lin.q.weight), as64(lin.k.weight), new["q"], inputs["sigma_x"]
                if lin.q.bias is not None:  # the query bias rides on a constant-1 input coordinate
                    q, sigma_x = with_bias_coordinate(q, as64(lin.q.bias), sigma_x, inputs["mean_x"])
                    new_q = torch.cat([new_q, as64(new_lin.q.bias)[:, None]], 1)
                args = (sigma_x, inputs["sigma_y"], site.heads)
                measured = qk_measured_error(q, k, new_q, new["k"], *args)
                total = qk_measured_error(q, k, q[:site.heads] * 0, k[:site.heads] * 0, *args)
            else:
                v, o = as64(lin.v.weight), as64(lin.out.weight)
                measured = vo_measured_error(v, o, new["v"], new["out"], inputs["sigma_v"], site.heads)
                total = vo_measured_error(v, o, v[:site.heads] * 0, o[:, :site.heads] * 0, inputs["sigma_v"],
                                          site.heads)
            assert 0 < result.relative_error < 1, site.name
            assert abs(measured / total - result.relative_error) < 1e-5, site.name

    def test_plan_parameter_count_is_exact(self, calibrated, slimmed):
        pipe, _ = calibrated
        unet, report = slimmed
        plan = report.plan
        dense = sum(p.numel() for p in self.denoiser(pipe).parameters())
        slim = sum(p.numel() for p in unet.parameters())
        assert dense - slim == plan.params_removed > 0
        assert plan.params_removed == sum((e.width - e.rank) * e.unit_params for e in plan.modules.values())
        with torch.device("meta"):
            from_config = slim_class_for(unet).from_config({**self.denoiser(pipe).config, "rank_plan": plan.to_dict()})
        assert sum(p.numel() for p in from_config.parameters()) == slim

    def test_save_load_is_bit_identical(self, slimmed, tmp_path):
        unet, report = slimmed
        slim_class = slim_class_for(unet)
        call = self.call_inputs(unet)
        ref = unet(**call).sample
        save_slim(unet, report.plan, tmp_path / "slim")
        loaded = load_slim(tmp_path / "slim")
        assert isinstance(loaded, slim_class) and loaded.slim_plan.modules == report.plan.modules
        assert torch.equal(loaded(**call).sample, ref)
        native = slim_class.from_pretrained(tmp_path / "slim")
        assert torch.equal(native(**call).sample, ref)
        native.save_pretrained(tmp_path / "again")
        assert torch.equal(slim_class.from_pretrained(tmp_path / "again")(**call).sample, ref)
        # The dense class refuses a slim folder by naming slimdiff, before it reads any weight.
        with pytest.raises(ValueError, match=rf"slimmed by slimdiff; load it with slimdiff\.{slim_class.__name__}"):
            slim_class.dense_class.from_pretrained(tmp_path / "slim")

    @pytest.mark.slow
    def test_export_parity(self, calibrated, slimmed, tmp_path):
        from slimdiff.export.modules import denoiser_component
        from slimdiff.export.onnx import FP32_TOLERANCE, export_onnx
        from slimdiff.export.shapes import parse_profiles

        unet, _ = slimmed
        if self.export_config is not None:
            pipe, _ = calibrated
            pipe = with_denoiser(pipe, seeded_unet(self.export_config))
            unet = pipe.unet
            slim_unet(unet, self.calibration(pipe), SlimConfig(budget=self.budget), progress=False)
            assert unet.slim_plan.params_removed > 0
        # the family's slim graph at one shape, the guided batch: a dynamic axis makes the export two to four times
        # as long, and dynamic axes are the exporter's, tested on SD and SDXL UNets (test_engines.py, test_sdxl.py)
        # and in the DiTs' own tests
        profiles = parse_profiles(batch="2", height=str(self.image_px), width=str(self.image_px),
                                  text_len=str(family_for(unet).text_tokens), vae_scale=2, multiple=8)
        sidecar = export_onnx(denoiser_component(unet), profiles, tmp_path / "unet.onnx")
        assert sidecar["parity"]["max_rel_error"] <= FP32_TOLERANCE

    def test_pipeline_image_with_the_slim_denoiser(self, calibrated, slimmed, tmp_path):
        from diffusers import DiffusionPipeline

        pipe, _ = calibrated
        unet, report = slimmed
        component = family_for(pipe).component
        slim_pipe = with_denoiser(pipe, unet)
        slim_pipe.set_progress_bar_config(disable=True)
        save_slim_pipeline(slim_pipe, report.plan, tmp_path / "pipe")
        loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
        assert isinstance(getattr(loaded, component), slim_class_for(unet))
        loaded.set_progress_bar_config(disable=True)
        prompts = PROMPTS[:self.image_prompts]
        # the family's measuring call: the size, or the image an image-to-image family starts from
        call = family_for(pipe).measuring_call(self.image_px, self.image_px)
        # prompts by name: FluxKontextPipeline takes its image first
        run = lambda p: p(prompt=prompts, num_inference_steps=self.image_steps,  # noqa: E731
                          generator=torch.Generator().manual_seed(0), output_type="np", **call).images
        image = run(loaded)
        assert image.shape == (len(prompts), self.image_px, self.image_px, 3) and image.std() > 0
        assert (image == run(slim_pipe)).all()
        assert not (image == run(pipe)).all()  # the dense pipeline draws another image


class TestSD1(FamilyConformance):
    """SD-1.x: builtin:tiny's layout (GEGLU, conv projections, ε-prediction). Its export check exports tiny's blocks
    at two levels: the shared slimdiff-export run of the tests (tests/export_support.py) exports the whole
    calibrated slim builtin:tiny."""

    family = "sd"
    image_px = 32
    export_config = TWO_LEVEL_UNET

    @classmethod
    def make_pipeline(cls):
        return _pipeline(TINY_UNET, skip_prk_steps=True)


# SD-2's layout at two levels: linear projections, per-level head counts.
TWO_LEVEL_SD2_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                          norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True)


class TestSD2(FamilyConformance):
    """SD-2.x: v-prediction, linear projections, upcast attention, per-level head counts."""

    family = "sd"
    image_px = 16

    @classmethod
    def make_pipeline(cls):
        return _pipeline(dict(TWO_LEVEL_SD2_UNET, upcast_attention=True), "DDIMScheduler", prediction_type="v_prediction")


class TestLCM(FamilyConformance):
    """A guidance-distilled (LCM) UNet: SD-2's small layout embedding the guidance scale (``time_cond_proj_dim``,
    the ``timestep_cond`` input every call and export takes), sampled by the LCM scheduler without a guidance batch."""

    family = "sd"
    image_px = 16
    image_prompts = 2  # one UNet row per image: see image_prompts

    @classmethod
    def make_pipeline(cls):
        return _pipeline(dict(TWO_LEVEL_SD2_UNET, time_cond_proj_dim=8), "LCMScheduler")


class TestSDInpaint(FamilyConformance):
    """SD inpainting: SD-2's small layout with the 9-channel input (latent, mask, masked image's latent), sampled by
    StableDiffusionInpaintPipeline; calibrated on seeded holes in a few noise images."""

    family = "sd-inpaint"
    image_px = 16

    @classmethod
    def make_pipeline(cls):
        from diffusers import StableDiffusionInpaintPipeline

        config = dict(TWO_LEVEL_SD2_UNET, in_channels=9)
        pipe = StableDiffusionInpaintPipeline(**_pipeline(config, "DDIMScheduler").components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def calibration_options(cls) -> dict:
        return {"images": str(_noise_images())}


_IMAGES: list = []


def _noise_images():
    """A folder of three seeded noise images, written once per process (the inpainting calibration's input)."""
    import tempfile

    import numpy as np
    from PIL import Image

    if not _IMAGES:
        folder = Path(tempfile.mkdtemp(prefix="slimdiff-inpaint-images-"))
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        _IMAGES.append(folder)
    return _IMAGES[0]


class TestSDXLStack(FamilyConformance):
    """An SDXL-style stack: two transformer layers per attention at the deep level, 64-wide heads (no added
    conditioning: the SDXL pipeline family brings that)."""

    family = "sd"
    image_px = 16

    @classmethod
    def make_pipeline(cls):
        config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                      norm_num_groups=32, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
                      use_linear_projection=True)
        pipe = _pipeline(config, skip_prk_steps=True)
        heads = {s.width for s in module_sites(pipe.unet) if s.kind != FFN}
        assert heads == {64}, heads
        return pipe


class TestSDXLPipeline(FamilyConformance):
    """SDXL: builtin:tiny-xl — StableDiffusionXLPipeline with two text encoders, pooled text embeddings and
    micro-conditioning time ids (``added_cond_kwargs``), a (1, 1, 2) transformer stack, 16-wide heads. Its export
    check exports tiny-xl's blocks at two levels: tests/test_sdxl_cli.py exports the whole slim builtin:tiny-xl and
    drives it as an engine in the SDXL pipeline."""

    family = "sdxl"
    image_px = 32
    export_config = TWO_LEVEL_XL_UNET

    @classmethod
    def make_pipeline(cls):
        from slimdiff.models import build_builtin

        return build_builtin("builtin:tiny-xl")


class TestSDXLRefiner(FamilyConformance):
    """The SDXL refiner: builtin:tiny-xl-refiner — StableDiffusionXLImg2ImgPipeline with the second text tower only,
    five time ids (an aesthetic score among them), attention at two middle levels; calibrated by refining a few noise
    images (0.7 of 3 steps: two run). Its export check exports the refiner's blocks at two levels:
    tests/test_sdxl_refiner.py exports the whole slim builtin:tiny-xl-refiner."""

    family = "sdxl-refiner"
    # a 3×3 mid block (three down-samplings of a 24² latent): at 2×2 its 8-row CPU GEMMs round differently with a
    # loaded folder's memory-mapped (unaligned) weights, and the save/load check compares bits
    image_px = 48
    image_steps = 7  # the pipeline's strength, 0.3, runs two
    export_config = TWO_LEVEL_XL_REFINER_UNET

    @classmethod
    def make_pipeline(cls):
        from slimdiff.models import build_builtin

        return build_builtin("builtin:tiny-xl-refiner")

    @classmethod
    def calibration_options(cls) -> dict:
        return {"images": str(_noise_images()), "strength": 0.7}


class TestPixArt(FamilyConformance):
    """PixArt-Σ: builtin:tiny-pixart — the first DiT: adaLN-single blocks (gated updates, cross-attention on the
    residual stream), q/k/v biases, a T5 context projected inside the transformer and masked to the prompt's
    tokens, learned sigma. Its VAE downsamples by 2, outside PixArt's aspect-ratio bins."""

    family = "pixart"
    image_px = 32

    @classmethod
    def make_pipeline(cls):
        from slimdiff.models import build_builtin

        return build_builtin("builtin:tiny-pixart")


class TestSD3(FamilyConformance):
    """Stable Diffusion 3: builtin:tiny-sd3 — MMDiT blocks (diffusers' JointTransformerBlock; the last one
    context_pre_only): one joint attention over the image and text tokens, whose Q·K and V·O sites span both streams
    (to the closed forms a self-attention on the direct sum of the streams' inputs, biases on constant-1
    coordinates), image and text feed-forwards, adaLN-Zero gated updates; three text towers, pooled projections, a
    float flow-matching timestep. No block has a cross-attention: the text reaches the image through the joint
    attention, so every attention site is a self-attention."""

    family = "sd3"
    image_px = 32
    attentions = (SELF,)

    @classmethod
    def make_pipeline(cls):
        from slimdiff.models import build_builtin

        return build_builtin("builtin:tiny-sd3")


class TestFlux(FamilyConformance):
    """FLUX: builtin:tiny-flux — double-stream MMDiT blocks (a joint attention over text and image tokens, whose V·O
    site spans both streams) and single-stream blocks whose V·O and FFN sites own column blocks of one shared
    ``proj_out``; q and k pass RMS norms and rotary embeddings (no Q·K site); packed latents with position ids, a
    guidance embedding, CLIP pooled and T5 text towers, a float flow-matching sigma. Its closed-form check takes the
    first FFN and V·O sites (a double-stream block's); tests/test_flux.py checks the single-stream blocks' shared
    projection. Its export check builds the slim transformer's ONNX Runtime engine and samples through it."""

    family = "flux"
    builtin = "builtin:tiny-flux"
    image_px = 32
    attentions = (SELF,)
    kinds = (FFN, VO)
    image_prompts = 2  # one transformer call per step: no guidance batch

    @classmethod
    def make_pipeline(cls):
        from slimdiff.models import build_builtin

        return build_builtin(cls.builtin)

    def call_inputs(self, unet, batch: int = 2) -> dict:
        # the shared draw, with a sigma in [0, 1] (the transformer multiplies it by 1000) and a guidance scale
        call = super().call_inputs(unet, batch)
        return {**call, "timestep": torch.full_like(call["timestep"], 0.421),
                "guidance": torch.full_like(call["timestep"], 3.5)}

    @pytest.mark.slow
    def test_export_parity(self, calibrated, slimmed, tmp_path):
        # The shared check, run through the engine build (the same export and parity check; one export of the slim
        # transformer serves both, for CI's time), over a range of image sizes: the graph packs the latent and builds
        # the positions for the size it is given (parity at 16 and 32 px). Then the ONNX Runtime engine drives
        # FluxPipeline as its transformer, at the batch of its two prompts (one axis fewer: a shorter export).
        import numpy as np

        from slimdiff.engines.build import build_denoiser_engine
        from slimdiff.export.onnx import FP32_TOLERANCE
        from slimdiff.export.shapes import parse_profiles
        from slimdiff.runtime import EngineFluxTransformer, use_engine

        pipe, _ = calibrated
        transformer, report = slimmed
        sizes = f"{self.image_px // 2}:{self.image_px}:{self.image_px}"
        profiles = parse_profiles(batch=str(self.image_prompts), height=sizes, width=sizes,
                                  text_len=str(family_for(transformer).text_tokens), vae_scale=2, multiple=8)
        # the pipeline's call: FLUX Kontext's is its pipeline's (its transformer is FLUX.1-dev's), a FLUX ControlNet
        # pipeline's carries its ControlNet's samples
        family = family_for(pipe).calling(pipe)
        meta, sidecar = build_denoiser_engine(transformer, "ort", tmp_path, profiles=profiles, dtype=torch.float32,
                                              device="cpu", multiple=8, plan=report.plan, family=family,
                                              export_options=tuple(family.exporting))
        assert sidecar["parity"]["max_rel_error"] <= FP32_TOLERANCE and len(sidecar["parity"]["shapes"]) == 2
        assert meta["family"] == self.family and sidecar["fused"]["Attention"] == sidecar["attention_modules"] == 4

        slim_pipe = with_denoiser(pipe, transformer)
        slim_pipe.set_progress_bar_config(disable=True)
        call = family.measuring_call(self.image_px, self.image_px)  # FLUX Fill's: an image with a hole
        run = lambda: slim_pipe(prompt=PROMPTS[:self.image_prompts], num_inference_steps=2,  # noqa: E731
                                generator=torch.Generator().manual_seed(0), output_type="np", **call).images
        reference = run()
        engine = use_engine(slim_pipe, tmp_path)
        assert slim_pipe.transformer is engine and isinstance(engine, EngineFluxTransformer)
        image = run()
        assert image.shape == reference.shape and np.abs(image - reference).max() < 1e-3
        assert np.abs(reference - reference.mean()).max() > 1e-3  # not a flat image: the comparison has content
        self.check_positions(engine, transformer, pipe)

    def check_positions(self, engine, transformer, pipe):
        """The engine in the pipeline refuses positions its graph does not build."""
        from slimdiff.errors import SlimDiffError
        from slimdiff.export.modules import denoiser_component
        from slimdiff.families.flux import latent_ids, pack_latents

        # a shifted grid, as FLUX Kontext's reference image has
        component = denoiser_component(transformer)
        latents, sigma, text, pooled, guidance = component.random_inputs(
            {"batch": self.image_prompts, "height": 16, "width": 16, "text_len": 512}, torch.float32, seed=3)
        shifted = latent_ids(8, 8) + torch.tensor([1.0, 0, 0])
        with pytest.raises(SlimDiffError, match="take the text-to-image pipeline's positions"):
            engine(hidden_states=pack_latents(latents), timestep=sigma, encoder_hidden_states=text,
                   pooled_projections=pooled, img_ids=shifted, txt_ids=torch.zeros(512, 3), guidance=guidance)


class _FluxWithImages(TestFlux):
    """A FLUX family whose pipeline takes images: calibrated on a few noise images (Fill: with seeded holes; Control:
    as control maps); its export check drives that pipeline with the slim transformer's engine on its measuring task
    (Fill: a hole in a grey canvas; Control: a colour-ramp control)."""

    @classmethod
    def calibration_options(cls) -> dict:
        return {"images": str(_noise_images())}


class TestFluxFill(_FluxWithImages):
    """FLUX Fill: builtin:tiny-flux-fill — FluxFillPipeline around FLUX's blocks, whose tokens carry the latent, the
    masked image's latent and the mask (144 features in, 64 out)."""

    family = "flux-fill"
    builtin = "builtin:tiny-flux-fill"


class TestFluxControl(_FluxWithImages):
    """FLUX Control: builtin:tiny-flux-control — FluxControlPipeline around FLUX's blocks, whose tokens carry the
    latent and the control image's latent (128 features in, 64 out)."""

    family = "flux-control"
    builtin = "builtin:tiny-flux-control"


class TestFluxControlNet(_FluxWithImages):
    """FLUX ControlNet: builtin:tiny-flux-controlnet — FluxControlNetPipeline around builtin:tiny-flux's transformer
    (whose family alone is FLUX's), its seeded ControlNet's samples added after the blocks; calibrated on noise images
    as control images; the shared image checks condition on a colour ramp. tests/test_flux_controlnet.py checks the
    engines taking the samples."""

    family = "flux-controlnet"
    denoiser_family = "flux"
    builtin = "builtin:tiny-flux-controlnet"


class TestFluxKontext(_FluxWithImages):
    """FLUX Kontext: builtin:tiny-flux-kontext — FluxKontextPipeline around a transformer of FLUX.1-dev's layout,
    called with the reference image's tokens after the latent's (the blocks see twice the latent's tokens; the
    shared calls here are the Kontext pipeline's, :meth:`~slimdiff.families.flux_kontext.FluxKontextFamily.
    dummy_call`). Calibrated on noise images as the images to edit; its engine takes the reference's latent on axes
    of its own and drives FluxKontextPipeline."""

    family = "flux-kontext"
    denoiser_family = "flux"
    builtin = "builtin:tiny-flux-kontext"

    def check_positions(self, engine, transformer, pipe):
        """The engine serves a reference of another size than the latent's (the Kontext call's prediction, the
        latent's tokens, within the parity tolerance) and refuses a call without reference tokens; a Triton model
        config gives the reference's axes as dynamic; a text-to-image pipeline refuses the engine."""
        from diffusers import FluxPipeline

        from slimdiff.engines.triton import batch_dims
        from slimdiff.runtime import use_engine
        from slimdiff.errors import SlimDiffError
        from slimdiff.export.onnx import FP32_TOLERANCE
        from slimdiff.families.flux import latent_ids, pack_latents

        gen, rows = torch.Generator().manual_seed(3), self.image_prompts  # the engine's batch
        latents, reference = torch.randn(rows, 16, 16, 16, generator=gen), torch.randn(rows, 16, 8, 16, generator=gen)
        call = dict(timestep=torch.full((rows,), 0.6), encoder_hidden_states=torch.randn(rows, 512, 96, generator=gen),
                    pooled_projections=torch.randn(rows, 64, generator=gen), txt_ids=torch.zeros(512, 3),
                    guidance=torch.full((rows,), 3.5), return_dict=False)
        tokens = torch.cat([pack_latents(latents), pack_latents(reference)], 1)
        img_ids = torch.cat([latent_ids(8, 8), latent_ids(4, 8, first=1)])
        with torch.no_grad():
            expected = transformer(hidden_states=tokens, img_ids=img_ids, **call)[0][:, :64]
        got = engine(hidden_states=tokens, img_ids=img_ids, **call)[0]
        assert got.shape == expected.shape == (rows, 64, 64)
        assert (got - expected).abs().max() <= FP32_TOLERANCE * expected.abs().max()
        with pytest.raises(SlimDiffError, match="take the FLUX Kontext pipeline's positions"):
            engine(hidden_states=pack_latents(latents), img_ids=latent_ids(8, 8), **call)
        assert batch_dims(engine.meta)[1]["reference_latents"] == [16, -1, -1]
        components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
        with pytest.raises(SlimDiffError, match="was not built for this pipeline's transformer: inputs hidden_states"):
            use_engine(FluxPipeline(**{**components, "transformer": transformer}), engine.folder)
