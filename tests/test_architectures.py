"""SD 2.x (per-level head counts, linear projections) and SDXL-style blocks (several transformer layers) go
through the same code path as SD 1.x: a bare UNet, calibrated by a user-owned loop, slimmed and round-tripped."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from slimdiff.calibrate import CalibrationConfig, calibrate
from slimdiff.errors import SlimDiffError
from slimdiff.models import module_sites
from slimdiff.serialization import load_slim, save_slim
from slimdiff.slim import SlimConfig, slim_unet

COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=48, norm_num_groups=8)
LAYOUTS = {
    "sd2": dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(attention_head_dim=2, transformer_layers_per_block=(2, 2), use_linear_projection=True),
}


def _loop(unet):
    def run(prompts, seeds):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 48, generator=g)
            for t in (900, 500, 100):
                unet(x, t, ctx)
    return run


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_slims_and_round_trips(layout, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**COMMON, **LAYOUTS[layout]).eval().requires_grad_(False)
    sites = module_sites(unet)
    blocks = {s.block for s in sites}
    assert len(blocks) == (4 if layout == "sd2" else 8)  # SDXL layout: two transformer layers per attention
    config = CalibrationConfig(pass1_prompts=1)
    stats = calibrate(unet, ["a", "b"], None, config, loop=_loop(unet), progress=False)
    assert stats.timesteps == [900, 500, 100]
    before = sum(p.numel() for p in unet.parameters())
    report = slim_unet(unet, stats, SlimConfig(budget=0.3, r_min=8), progress=False)
    assert before - sum(p.numel() for p in unet.parameters()) == report.plan.params_removed > 0
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 48)
    ref = unet(x, 300, ctx).sample
    save_slim(unet, report.plan, tmp_path / "slim")
    assert torch.equal(load_slim(tmp_path / "slim")(x, 300, ctx).sample, ref)


def test_unsupported_modules_are_named():
    unet = UNet2DConditionModel(**COMMON, attention_head_dim=2)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0] = torch.nn.SiLU()
    with pytest.raises(SlimDiffError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.ff"):
        module_sites(unet)
    with pytest.raises(SlimDiffError, match="needs a sampling loop"):
        calibrate(unet, ["a"], None, CalibrationConfig(), progress=False)
    with pytest.raises(SlimDiffError, match="UNet2DConditionModel"):
        module_sites(torch.nn.Linear(2, 2))
