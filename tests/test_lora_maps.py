"""slimdiff.lora_maps on hand-made maps: each kind of entry maps a LoRA as its formula says, layers that fit or that
slimming left alone pass, and what cannot be mapped is refused in one line."""

import pytest
import torch

from slimdiff.errors import SlimDiffError
from slimdiff.lora_maps import MAPS_FILE, LinearMaps, column_map, read_maps, row_map, write_maps

GEN = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=GEN)


def block_diag_rows(maps: torch.Tensor) -> torch.Tensor:
    """The (G·r, G·d) matrix of per-group row maps (G, r, d)."""
    return torch.block_diag(*maps)


def test_every_entry_maps_a_lora_by_its_formula():
    heads, width, rank, inner, keep = 2, 4, 3, 6, torch.tensor([0, 2, 5])
    t_q, r_o, n_down, b_v = rand(heads, rank, width), rand(heads, width, rank), rand(inner, 3), rand(heads * width)
    maps = LinearMaps({
        **row_map("attn.to_q", matrix=t_q),
        **row_map("ff.proj", index=torch.cat([keep, keep + inner])),
        # a shared Linear: columns [0, 8) are the attention's heads, [8, 14) the FFN's inner neurons
        **column_map("proj_out", 0, heads * width, r_o, value_bias=b_v),
        **column_map("proj_out", heads * width, heads * width + inner, n_down[None]),
    })
    assert maps.paths == {"attn.to_q", "ff.proj", "proj_out"}
    a_q, b_q = rand(2, 5), rand(heads * width, 2)
    a_p, b_p = rand(2, 5), rand(2 * inner, 2)
    a_o, b_o = rand(2, heads * width + inner), rand(7, 2)
    a_x, b_x = rand(2, 5), rand(5, 2)  # a Linear slimming left alone
    state = {"attn.to_q.lora_A.weight": a_q, "attn.to_q.lora_B.weight": b_q,
             "ff.proj.lora_A.weight": a_p, "ff.proj.lora_B.weight": b_p,
             "proj_out.lora_A.weight": a_o, "proj_out.lora_B.weight": b_o,
             "other.lora_A.weight": a_x, "other.lora_B.weight": b_x}
    out = maps.map_lora(state)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(out["attn.to_q.lora_B.weight"], block_diag_rows(t_q) @ b_q)
    assert torch.equal(out["attn.to_q.lora_A.weight"], a_q)
    assert torch.equal(out["ff.proj.lora_B.weight"], b_p[torch.cat([keep, keep + inner])])
    column_matrix = torch.block_diag(*r_o, n_down)  # (14, 2·3 + 3)
    close(out["proj_out.lora_A.weight"], a_o @ column_matrix)
    assert torch.equal(out["proj_out.lora_B.weight"], b_o)
    # the folded value bias: B·A·b_V through the attention's columns, as a LoRA bias; zeros for the other layers
    close(out["proj_out.lora_B.bias"], b_o @ (a_o[:, :heads * width] @ b_v))
    assert not out["attn.to_q.lora_B.bias"].any() and out["attn.to_q.lora_B.bias"].shape == (heads * rank,)
    assert torch.equal(out["other.lora_A.weight"], a_x) and torch.equal(out["other.lora_B.weight"], b_x)
    # the same maps on a weight: what the slim model holds
    weight = rand(7, heads * width + inner)
    close(maps.weight("proj_out", weight), weight @ column_matrix)
    # a LoRA that already fits the slim Linears passes unchanged (a LoRA mapped before)
    again = maps.map_lora({k: v for k, v in out.items() if not k.endswith("bias")},
                          {"attn.to_q": (heads * rank, 5), "ff.proj": (6, 5), "proj_out": (7, 9)})
    assert torch.equal(again["attn.to_q.lora_B.weight"], out["attn.to_q.lora_B.weight"])


def test_what_cannot_be_mapped_is_refused_in_one_line(tmp_path):
    maps = LinearMaps(row_map("attn.to_k", matrix=rand(1, 2, 4)))
    layer = {"attn.to_k.lora_A.weight": rand(2, 3), "attn.to_k.lora_B.weight": rand(4, 2)}
    with pytest.raises(SlimDiffError, match="only plain LoRA layers"):
        maps.map_lora({**layer, "attn.to_k.lora_magnitude_vector": rand(4)})  # DoRA
    with pytest.raises(SlimDiffError, match="a LoRA bias on a resized Linear has no slim counterpart"):
        maps.map_lora({**layer, "attn.to_k.lora_B.bias": rand(4)})
    with pytest.raises(SlimDiffError, match="lacks its lora_A or lora_B"):
        maps.map_lora({"attn.to_k.lora_A.weight": rand(2, 3)})
    with pytest.raises(SlimDiffError, match="has 4 output rows in the dense model, not 6"):
        maps.map_lora({"attn.to_k.lora_A.weight": rand(2, 3), "attn.to_k.lora_B.weight": rand(6, 2)})
    with pytest.raises(SlimDiffError, match="an entry slimdiff does not know"):
        LinearMaps({"attn.to_k.something": rand(2)})

    write_maps(maps, tmp_path, torch.float16)
    assert read_maps(tmp_path).tensors["attn.to_k.lora_rows"].dtype == torch.float16
    assert read_maps(tmp_path / "absent") is None
    (tmp_path / MAPS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(SlimDiffError, match=f"corrupt {MAPS_FILE}"):
        read_maps(tmp_path)
