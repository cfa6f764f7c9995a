"""The latent cache builder's fast path (decoding threads, uint8 to the device, background
shard writer, padded batches for a compiled encoder, bf16 autocast) against a plain reference
loop written here: PIL decode, the autoencoder's own ``encode``, float16."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ffhq_ldm.config import get_preset
from ffhq_ldm.data.images import list_images
from ffhq_ldm.data.latents import build_latent_cache, load_latent_cache
from ffhq_ldm.models.vae import LatentCodec, build_vae

SCALE = 0.37


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = build_vae(get_preset("tiny", "vae")).eval()
    model.register_to_config(scaling_factor=SCALE)
    return model


def pil_pixels(path) -> torch.Tensor:
    """(3, 32, 32) in [-1, 1], straight from PIL (the fixture's faces are 32 px RGB PNGs)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert array.shape == (32, 32, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def reference(vae, files, shard: int, autocast: bool = False):
    """Posterior mean and std per shard of ``shard`` images (originals, then their mirrors),
    float16, concatenated: what the cache must hold."""
    means, stds = [], []
    for first in range(0, len(files), shard):
        x = torch.stack([pil_pixels(f) for f in files[first:first + shard]])
        x = torch.cat([x, torch.flip(x, dims=[3])])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.to(torch.float16))
        stds.append(dist.std.to(torch.float16))
    return torch.cat(means), torch.cat(stds)


def test_fp32_build_is_bit_identical_to_a_plain_loop(vae, faces32, tmp_path):
    files = list_images(faces32)[:10]  # shards of 4, 4 and 2
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=4,
                       num_workers=2, dtype=torch.float32, progress=False)
    cache = load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)
    mean, std = reference(vae, files, 4)
    assert torch.equal(cache.mean, mean) and torch.equal(cache.std, std)
    # the training latents: (mean + std * eps) * scaling_factor
    eps = torch.randn(mean.shape)
    z = cache.sample(torch.arange(len(cache)), noise=eps)
    assert torch.equal(z, (mean.float() + std.float() * eps) * SCALE)


def test_padded_batches_of_a_compiled_encoder_store_only_the_real_images(vae, faces32, tmp_path,
                                                                          monkeypatch):
    """A compiled encoder sees one batch shape: the last batch is padded, the padding dropped."""
    calls = []

    def fake_compile(fn, **_):
        def run(x):
            calls.append(x.shape[0])
            return fn(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    files = list_images(faces32)[:7]
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=3,
                       num_workers=0, dtype=torch.float32, compile=True, progress=False)
    assert calls == [6, 6, 6]  # 3 + 3 mirrors each, the last batch padded from 1 image
    cache = load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)
    mean, std = reference(vae, files, 3)
    torch.testing.assert_close(cache.mean, mean, atol=0, rtol=0)
    torch.testing.assert_close(cache.std, std, atol=0, rtol=0)


def test_bf16_autocast_build_is_within_bf16_tolerance(vae, faces32, tmp_path):
    files = list_images(faces32)[:8]
    build_latent_cache(LatentCodec(vae), files, tmp_path / "c", 32, batch_size=8,
                       num_workers=2, dtype=torch.bfloat16, progress=False)
    cache = load_latent_cache(tmp_path / "c", LatentCodec(vae), files, 32)
    mean, std = reference(vae, files, 8)
    bf16_mean, _ = reference(vae, files, 8, autocast=True)
    # bf16 keeps 8 significant bits: a relative error of a few 2^-8 through the encoder
    scale = mean.float().abs().max().item()
    torch.testing.assert_close(cache.mean.float(), mean.float(), atol=0.05 * scale, rtol=0.05)
    torch.testing.assert_close(cache.std.float(), std.float(), atol=0.05 * std.float().max(),
                               rtol=0.05)
    assert torch.equal(cache.mean, bf16_mean)  # the same autocast, the same bits
    assert not torch.equal(cache.mean, mean)  # and it did run in bf16


def test_shards_beyond_the_manifest_are_never_used(vae, faces32, tmp_path):
    """A build killed after writing a shard but before listing it: the file is rewritten."""
    files = list_images(faces32)[:8]
    cache_dir = tmp_path / "c"
    build_latent_cache(LatentCodec(vae), files, cache_dir, 32, batch_size=4,
                       dtype=torch.float32, progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest.update(shards=manifest["shards"][:1], complete=False)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    (cache_dir / "shard-00001.safetensors").write_bytes(b"half a shard")
    build_latent_cache(LatentCodec(vae), files, cache_dir, 32, batch_size=4,
                       dtype=torch.float32, progress=False)
    cache = load_latent_cache(cache_dir, LatentCodec(vae), files, 32)
    mean, std = reference(vae, files, 4)
    assert torch.equal(cache.mean, mean) and torch.equal(cache.std, std)


def test_a_partial_cache_of_another_precision_is_restarted_not_mixed(vae, faces32, tmp_path):
    files = list_images(faces32)[:8]
    cache_dir = tmp_path / "c"
    build_latent_cache(LatentCodec(vae), files, cache_dir, 32, batch_size=4,
                       dtype=torch.bfloat16, progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest.update(shards=manifest["shards"][:1], complete=False)  # killed after one shard
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    build_latent_cache(LatentCodec(vae), files, cache_dir, 32, batch_size=4,
                       dtype=torch.float32, progress=False)
    cache = load_latent_cache(cache_dir, LatentCodec(vae), files, 32)
    mean, std = reference(vae, files, 4)
    assert torch.equal(cache.mean, mean) and torch.equal(cache.std, std)
