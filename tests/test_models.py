"""The paper's models and presets, checked against the numbers in docs/design.md."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from ffhq_ldm.config import PRESETS, ConfigError, get_preset
from ffhq_ldm.models.discriminator import PatchDiscriminator
from ffhq_ldm.models.unet import build_sample_scheduler, build_train_scheduler, build_unet
from ffhq_ldm.models.vae import build_vae


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_unet():
    config = get_preset("ffhq128-f4", "unet")
    return build_unet(config, latent_channels=3, latent_size=32)


def test_paper_unet_size(paper_unet):
    # docs/design.md, UNet: about 190 M parameters (LDM's FFHQ UNet with 224 channels, here 192).
    assert abs(n_params(paper_unet) - 190e6) <= 5e6


def _attention_resolutions(unet, latent_size):
    """Resolutions at which Attention modules run, found by tracing a forward pass."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[-1]))
             for m in unet.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        unet(torch.zeros(1, unet.config.in_channels, latent_size, latent_size), 10)
    for h in hooks:
        h.remove()
    return seen


def test_paper_unet_attention_exactly_at_32_16_8_and_mid(paper_unet):
    seen = _attention_resolutions(paper_unet, 32)
    # Attention modules receive (B, C, H, W): each down level with attention runs 2 blocks, each
    # up level 3 blocks, the mid block 1 (at 4x4, the "global" attention).
    counts = {r: seen.count(r) for r in set(seen)}
    assert counts == {32: 2 + 3, 16: 2 + 3, 8: 2 + 3, 4: 1}
    assert paper_unet.mid_block.attentions[0] is not None
    # head width 32 everywhere (ADM/LDM num_head_channels=32)
    for m in paper_unet.modules():
        if isinstance(m, Attention):
            assert m.inner_dim // m.heads == 32


def test_paper_vae_maps_128_to_32x32_latents():
    config = get_preset("ffhq128-f4", "vae")
    vae = build_vae(config)
    assert 50e6 < n_params(vae) < 60e6  # docs/design.md: about 55 M
    with torch.no_grad():
        dist = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist
        assert tuple(dist.mean.shape) == (1, config.latent_channels, 32, 32)
        assert tuple(vae.decode(dist.mean).sample.shape) == (1, 3, 128, 128)


@pytest.mark.parametrize("name,shape", [("ffhq128-f2", (1, 64, 64)), ("ffhq128-f8", (4, 16, 16)),
                                        ("ffhq128-f16", (4, 8, 8))])
def test_latent_size_variants(name, shape):
    # The paper explored latents from 64x64x1 to 8x8x4: check the shape arithmetic of each.
    config = get_preset(name, "vae")
    assert (config.latent_channels, config.latent_size, config.latent_size) == shape
    unet_config = get_preset(name, "unet")
    from ffhq_ldm.models.unet import attention_levels

    levels = attention_levels(unet_config, shape[1])
    sizes = [shape[1] // 2 ** i for i in range(len(levels))]
    with_attention = [s for s, a in zip(sizes, levels, strict=True) if a]
    assert with_attention == [s for s in sizes if s in (32, 16, 8)]


def test_ldm_linear_schedule_betas():
    config = get_preset("ffhq128-f4", "unet")
    expected = np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000, dtype=np.float64) ** 2
    betas = build_train_scheduler(config).betas.double().numpy()
    # diffusers stores betas in float32: compare at that precision (max error ~1e-10 here).
    np.testing.assert_allclose(betas, expected, rtol=0, atol=1e-9)
    ddim = build_sample_scheduler(config)
    assert ddim.config.clip_sample is False
    assert ddim.config.set_alpha_to_one is False
    assert ddim.config.steps_offset == 1
    assert ddim.config.timestep_spacing == "leading"
    np.testing.assert_allclose(ddim.betas.double().numpy(), expected, rtol=0, atol=1e-9)


def test_patch_discriminator_outputs_patch_logits():
    disc = PatchDiscriminator(3, channels=8, layers=3)
    out = disc(torch.randn(2, 3, 128, 128))
    # pix2pix 70x70 PatchGAN on 128 px gives a 14x14 grid of logits
    assert out.shape == (2, 1, 14, 14)


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        vae_config = get_preset(name, "vae")
        get_preset(name, "unet")
        assert vae_config.resolution % vae_config.downsample_factor == 0


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*ffhq128-f4"):
        get_preset("nope", "vae")
