"""The latent cache and the latent scale, checked against direct encodes."""

import json
from dataclasses import replace

import pytest
import torch

from ffhq_ldm.config import get_preset
from ffhq_ldm.data.images import ImageDataset, list_images
from ffhq_ldm.data.latents import CacheMismatchError, build_latent_cache, load_latent_cache
from ffhq_ldm.models.vae import LatentCodec, build_vae, encode_posterior, measure_scaling_factor


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = build_vae(get_preset("tiny", "vae")).eval()
    model.register_to_config(scaling_factor=0.5)
    return model


def direct(vae, files):
    x = torch.stack([ImageDataset(files, 32, flip="none")[i] for i in range(len(files))])
    with torch.no_grad():
        return encode_posterior(vae, torch.cat([x, x.flip(-1)]))


def test_cache_equals_a_direct_encode(vae, faces32, tmp_path):
    files = list_images(faces32)[:10]
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=10, progress=False)
    cache = load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)
    mean, std = direct(vae, files)
    assert len(cache) == 20  # originals then mirrors
    torch.testing.assert_close(cache.mean.float(), mean, atol=2e-3, rtol=1e-3)  # stored fp16
    torch.testing.assert_close(cache.std.float(), std, atol=2e-3, rtol=1e-3)
    # z = (mean + std * eps) * scaling_factor
    eps = torch.randn(cache.mean[:3].shape)
    z = cache.sample(torch.arange(3), noise=eps)
    torch.testing.assert_close(z, (cache.mean[:3].float() + cache.std[:3].float() * eps) * 0.5)


def test_mismatched_vae_or_images_are_refused(vae, faces32, tmp_path):
    files = list_images(faces32)[:6]
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=6, progress=False)
    torch.manual_seed(1)
    other = build_vae(get_preset("tiny", "vae"))
    other.register_to_config(scaling_factor=0.5)
    with pytest.raises(CacheMismatchError, match="different autoencoder"):
        load_latent_cache(tmp_path / "c", LatentCodec(other), files, 32)
    with pytest.raises(CacheMismatchError, match="different autoencoder"):
        build_latent_cache(LatentCodec(other), files, tmp_path / "c", 32, batch_size=6,
                           progress=False)
    with pytest.raises(CacheMismatchError):
        load_latent_cache(tmp_path / "c", LatentCodec(vae), list_images(faces32)[:7], 32)


def test_interrupted_cache_is_resumed_not_trusted(vae, faces32, tmp_path, monkeypatch):
    files = list_images(faces32)[:12]
    import ffhq_ldm.data.latents as latents

    real_save, calls = latents.save_file, {"n": 0}

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        real_save(tensors, path)

    monkeypatch.setattr(latents, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=4,
                           progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == 1
    with pytest.raises(CacheMismatchError, match="incomplete"):
        load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)

    monkeypatch.setattr(latents, "save_file", real_save)
    first_shard = (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=4, progress=False)
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns == first_shard
    cache = load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)
    mean, _ = direct(vae, files[4:8])
    torch.testing.assert_close(cache.mean[8:16].float(), mean, atol=2e-3, rtol=1e-3)


def test_scaling_factor_is_one_over_latent_std(faces32):
    torch.manual_seed(0)
    vae = build_vae(get_preset("tiny", "vae")).eval()
    files = list_images(faces32)
    x = torch.stack([ImageDataset(files, 32, flip="none")[i] for i in range(len(files))])
    measured = measure_scaling_factor(vae, x.split(16), torch.Generator().manual_seed(0))
    # independent: one big encode, other noise, torch.std (float64)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = (dist.mean + dist.std * torch.randn(dist.mean.shape)).double()
    assert measured == pytest.approx(1.0 / z.std().item(), rel=0.02)


def test_scaled_cache_latents_have_unit_std(faces32, tmp_path):
    """After export, scaled latents from the cache have std close to 1 on the training data."""
    torch.manual_seed(0)
    vae = build_vae(replace(get_preset("tiny", "vae"))).eval()
    files = list_images(faces32)
    x = torch.stack([ImageDataset(files, 32, flip="none")[i] for i in range(len(files))])
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae, x.split(16)))
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=16, progress=False)
    cache = load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)
    z = cache.sample(torch.arange(len(cache)), generator=torch.Generator().manual_seed(1))
    assert z.std().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_codec_describes_what_the_autoencoder_encodes(kind, faces32):
    """The codec's shape, scale and posterior agree with the autoencoder's own encode."""
    torch.manual_seed(0)
    vae = build_vae(replace(get_preset("tiny", "vae"), autoencoder=kind)).eval()
    vae.register_to_config(scaling_factor=0.25)
    codec = LatentCodec(vae)
    x = torch.stack([ImageDataset(list_images(faces32)[:2], 32, flip="none")[i] for i in (0, 1)])
    with torch.no_grad():
        mean, std = codec.encode(x)
        out = vae.encode(x)
    reference = out.latents if kind == "vq" else out.latent_dist.mean
    torch.testing.assert_close(mean, reference)
    if kind == "vq":
        assert torch.count_nonzero(std) == 0  # LDM's VQ first stage: no posterior noise
    assert tuple(mean.shape[1:]) == codec.latent_shape
    assert codec.scaling_factor == 0.25 and codec.sample_size == 32
    assert codec.fingerprint == LatentCodec(vae).fingerprint != LatentCodec(build_vae(
        replace(get_preset("tiny", "vae"), autoencoder=kind))).fingerprint
