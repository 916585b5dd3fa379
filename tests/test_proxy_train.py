"""The proxy model's training recipe on a tiny configuration: losses fall, the saved folder loads and runs."""

import json

import numpy as np
import torch

from slimdiff.proxy import tokenizer as ptok
from slimdiff.proxy import train as ptrain
from slimdiff.proxy.shapes import VOCABULARY, ShapesDataset


def test_tokenizer_files_one_token_per_word(tmp_path):
    from transformers import CLIPTokenizer

    tok = ptok.build_tokenizer(tmp_path)  # runs check_tokenizer
    reloaded = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    _, captions, _ = ShapesDataset(50, 1).batch(0, 50)
    for cap in captions:
        ids = reloaded(cap).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(cap.split()) + 2
    assert len(VOCABULARY) == 15


def test_tiny_training_loss_decreases_and_folder_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = ptrain.ProxyConfig(**{**ptrain.TINY, "vae_steps": 20, "unet_steps": 40, "n_latents": 64})
        log = ptrain._Log(quiet=True)
        tok = ptok.build_tokenizer(tmp_path / "tok")
        text, vae, unet = ptrain.build_models(cfg, tok)
        vae_losses = ptrain.train_vae(vae, cfg, "cpu", log)
        assert np.mean(vae_losses[-5:]) < 0.8 * np.mean(vae_losses[:5])
        vae.requires_grad_(False)
        lat, ids = ptrain.encode_dataset(vae, tok, cfg, "cpu", log)
        assert lat.shape == (64, 4, 16, 16) and ids.shape == (64, 77)
        scaling = 1.0 / float(lat.std())
        vae.register_to_config(scaling_factor=scaling)
        unet_losses = ptrain.train_unet(unet, text, lat, ids, scaling, tok, cfg, "cpu", log)
        assert np.mean(unet_losses[-10:]) < 0.8 * np.mean(unet_losses[:10])

        pipe = ptrain.assemble_pipeline(text, vae, unet, tok)
        out = tmp_path / "proxy"
        size = ptrain.save_pipeline_atomic(pipe, out, {"note": "tiny"})
        assert 0 < size < 40e6
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".proxy")]  # no temp leftovers
        assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
        assert json.loads((out / "proxy_training.json").read_text())["note"] == "tiny"
        loaded = StableDiffusionPipeline.from_pretrained(str(out))
        assert loaded.vae.config.scaling_factor == scaling
        assert loaded.text_encoder.config.eos_token_id == tok.eos_token_id == loaded.tokenizer.pad_token_id
        assert type(loaded.scheduler).__name__ == "PNDMScheduler"
        types = loaded.unet.config.down_block_types
        assert "CrossAttnDownBlock2D" in types and "CrossAttnUpBlock2D" in loaded.unet.config.up_block_types
        loaded.set_progress_bar_config(disable=True)
        img = loaded("a small red circle", height=64, width=64, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        assert img.shape == (64, 64, 3) and np.isfinite(img).all()
        # resaving over an existing folder swaps it atomically
        ptrain.save_pipeline_atomic(loaded, out)
        assert (out / "model_index.json").exists()
    finally:
        torch.set_num_threads(prev)


def test_shipped_proxy_folder_loads_and_has_sd_structure():
    import pytest
    from diffusers import StableDiffusionPipeline
    from diffusers.models.activations import GEGLU

    from slimdiff.proxy import PROXY_DIR

    if not (PROXY_DIR / "model_index.json").exists():
        pytest.skip("no trained proxy weights in slimdiff/assets/proxy")
    total = sum(f.stat().st_size for f in PROXY_DIR.rglob("*") if f.is_file())
    assert total <= 40e6
    assert not list(PROXY_DIR.rglob("*.bin")) and list(PROXY_DIR.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(PROXY_DIR))
    ptok.check_tokenizer(pipe.tokenizer)
    unet = pipe.unet
    assert "CrossAttnDownBlock2D" in unet.config.down_block_types
    assert "CrossAttnUpBlock2D" in unet.config.up_block_types
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            assert m.heads >= 2 and m.inner_dim // m.heads >= 16, name
    assert any(isinstance(m, GEGLU) for m in unet.modules())
    assert pipe.vae_scale_factor * unet.config.sample_size == 64
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a large red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images[0]
    assert img.shape == (64, 64, 3)
