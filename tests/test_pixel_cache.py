"""Stage 1's decoded-image cache: its batches against PIL decodes, its binding to the images,
an interrupted build, and the batch stream against the DataLoader path."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from ffhq_ldm.data import pixel_cache
from ffhq_ldm.data.images import list_images
from ffhq_ldm.data.pixel_cache import PixelCache, build_pixel_cache
from ffhq_ldm.train import stage1
from ffhq_ldm.train.run import EpochSampler


def pil_pixels(path) -> torch.Tensor:
    """(3, 32, 32) in [-1, 1], straight from PIL (the fixture's faces are 32 px RGB PNGs)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert array.shape == (32, 32, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def expected(files, indices) -> torch.Tensor:
    """Image ``i % n``, mirrored with torch.flip where ``i >= n``."""
    n, out = len(files), []
    for i in indices:
        x = pil_pixels(files[i % n])
        out.append(torch.flip(x, dims=[2]) if i >= n else x)
    return torch.stack(out)


def test_batches_equal_pil_decodes_with_the_chosen_rows_flipped(faces32, tmp_path):
    files = list_images(faces32)[:12]
    build_pixel_cache(files, tmp_path / "c", 32, threads=2, progress=False)
    cache = PixelCache(tmp_path / "c", files, 32)
    indices = [0, 13, 5, 20, 11, 23, 7]  # 13 = image 1 mirrored, 20 = 8, 23 = 11
    batch = cache.batch(torch.tensor(indices), "cpu")
    assert batch.dtype == torch.float32 and batch.is_contiguous()
    assert torch.equal(batch, expected(files, indices))


def repaint(path, colour) -> None:
    Image.new("RGB", (32, 32), colour).save(path)


def test_a_changed_or_added_file_rebuilds_the_cache(faces32, tmp_path):
    import shutil

    folder = tmp_path / "faces"
    shutil.copytree(faces32, folder)
    files = list_images(folder)[:8]
    build_pixel_cache(files, tmp_path / "c", 32, progress=False)
    repaint(files[3], (200, 10, 30))  # same name, other pixels
    with pytest.raises(ValueError, match="no complete image cache"):
        PixelCache(tmp_path / "c", files, 32)
    build_pixel_cache(files, tmp_path / "c", 32, progress=False)
    cache = PixelCache(tmp_path / "c", files, 32)
    assert torch.equal(cache.batch(torch.arange(8), "cpu"), expected(files, range(8)))

    added = folder / "zzz.png"
    repaint(added, (0, 90, 250))
    more = [*files, added]
    with pytest.raises(ValueError, match="no complete image cache"):
        PixelCache(tmp_path / "c", more, 32)
    build_pixel_cache(more, tmp_path / "c", 32, progress=False)
    cache = PixelCache(tmp_path / "c", more, 32)
    assert torch.equal(cache.batch(torch.tensor([8, 17]), "cpu"), expected(more, [8, 17]))


def test_an_interrupted_build_is_never_read_and_resumes(faces32, tmp_path, monkeypatch):
    files = list_images(faces32)[:20]
    monkeypatch.setattr(pixel_cache, "BATCH", 4)
    monkeypatch.setattr(pixel_cache, "FLUSH_ROWS", 8)
    real, starts = pixel_cache.decoded_batches, []

    def dying(dataset, start, *rest, **kw):
        starts.append(start)
        for k, batch in enumerate(real(dataset, start, *rest, **kw)):
            if k == 3 and len(starts) == 1:
                raise KeyboardInterrupt  # killed while decoding rows 12..15
            yield batch

    monkeypatch.setattr(pixel_cache, "decoded_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        build_pixel_cache(files, tmp_path / "c", 32, threads=0, progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["filled"] == 8 and manifest["complete"] is False  # flushed every 8 rows
    with pytest.raises(ValueError, match="no complete image cache"):
        PixelCache(tmp_path / "c", files, 32)
    build_pixel_cache(files, tmp_path / "c", 32, threads=0, progress=False)
    assert starts == [0, 8]
    cache = PixelCache(tmp_path / "c", files, 32)
    assert torch.equal(cache.batch(torch.arange(40), "cpu"), expected(files, range(40)))


def fake_run(step: int, batch_size: int):
    return SimpleNamespace(step=step, procs=1, device=torch.device("cpu"),
                           config=SimpleNamespace(batch_size=batch_size, resolution=32),
                           accelerator=SimpleNamespace(process_index=0))


def test_the_cached_stream_replays_the_data_loader_stream_and_resumes_mid_epoch(faces32,
                                                                               tmp_path):
    files = list_images(faces32)[:12]  # 3 batches of 4 per epoch
    train_set = stage1.FlipEncoded(files, 32, None)
    build_pixel_cache(files, tmp_path / "c", 32, progress=False)
    cache = PixelCache(tmp_path / "c", files, 32)

    def take(stream, run, count):
        out = []
        for _ in range(count):
            out.append(next(stream))
            run.step += 1
        return out

    loader_run, cached_run = fake_run(0, 4), fake_run(0, 4)
    sampler = EpochSampler(12, seed=3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, sampler=sampler, drop_last=True)
    old = take(stage1.batch_stream(loader_run, loader, sampler, 3), loader_run, 7)
    new = take(stage1.cached_stream(cached_run, cache, EpochSampler(12, seed=3), 3),
               cached_run, 7)
    for (x_old, req_old, _), (x_new, req_new, used_new) in zip(old, new, strict=True):
        assert torch.equal(x_old, x_new) and torch.equal(req_old, req_new)
        assert torch.equal(req_new, used_new)
    # a run resumed at step 4 (epoch 1, batch 1) continues where the uninterrupted one is
    resumed = fake_run(4, 4)
    again = take(stage1.cached_stream(resumed, cache, EpochSampler(12, seed=3), 3), resumed, 3)
    for (x_a, _, _), (x_b, _, _) in zip(again, new[4:], strict=True):
        assert torch.equal(x_a, x_b)


def test_auto_caches_what_fits_in_half_the_available_memory(monkeypatch):
    monkeypatch.setattr(pixel_cache, "available_memory", lambda: 2 * 1000 * 128 * 128 * 3)
    assert pixel_cache.wanted("auto", 1000, 128)
    assert not pixel_cache.wanted("auto", 1001, 128)
    assert pixel_cache.wanted("on", 10**9, 128) and not pixel_cache.wanted("off", 1, 128)


@pytest.mark.slow
def test_training_from_the_cache_equals_training_from_the_data_loader(faces32, tmp_path):
    """Three autoencoder steps (the discriminator on from step 1): bit-identical weights."""
    from safetensors.torch import load_file

    train = load_script("train_vae").main

    def run(mode):
        out = tmp_path / mode
        assert train(["--preset", "tiny", "--no-progress", "--log-with", "none", "--data",
                      str(faces32), "--output-dir", str(out), "--holdout", "28", "--max-steps",
                      "3", "--checkpoint-every", "3", "--eval-every", "3", "--disc-start", "1",
                      "--no-rfid", "--scale-images", "8", "--image-cache", mode]) == 0
        return load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))

    on, off = run("on"), run("off")
    assert (tmp_path / "on" / "image_cache" / "pixels.u8").is_file()
    assert not (tmp_path / "off" / "image_cache").exists()
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
