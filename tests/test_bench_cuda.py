"""The bench's CUDA-only readings, on the device: the allocator cap, the memory outside the
allocator, and the capped UNet row on the tiny preset. Skipped without CUDA (scripts/gpu_check.sh
runs this file on a GPU machine)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GIB = 2 ** 30


def test_the_memory_cap_refuses_an_allocation_beyond_it_and_is_lifted_after():
    from ffhq_ldm.bench_probes import memory_cap

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    with memory_cap(device, 1.0):
        small = torch.empty(GIB // 4, dtype=torch.uint8, device=device)  # 0.25 GiB: fits
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * GIB, dtype=torch.uint8, device=device)
        del small
    torch.cuda.empty_cache()
    after = torch.empty(2 * GIB, dtype=torch.uint8, device=device)  # the cap is gone
    del after
    torch.cuda.empty_cache()


def test_the_peak_window_counts_the_context_and_the_tensors_made_in_it():
    from ffhq_ldm.bench_probes import read_peak_window, start_peak_window

    device = torch.device("cuda")
    outside = start_peak_window(device)
    assert outside > 0  # the CUDA context and loaded kernels live outside the allocator
    x = torch.empty(GIB // 2, dtype=torch.uint8, device=device)
    peak = read_peak_window(device, outside)
    assert peak["peak_memory_gib"] >= 0.5
    assert peak["peak_total_gib"] == pytest.approx(peak["peak_reserved_gib"] + outside / GIB)
    # what the driver reports in use covers the allocator's reservation and the outside part
    assert peak["device_used_after_gib"] >= peak["peak_reserved_gib"] + outside / GIB - 0.01
    del x


def test_the_capped_unet_row_holds_the_trainers_residents(tmp_path):
    import json

    from ffhq_ldm.bench import main

    out = tmp_path / "bench.json"
    code = main(["--preset", "tiny", "--device", "cuda", "--only", "train-unet",
                 "--batch-size", "8", "--steps", "2", "--warmup", "1", "--no-compile",
                 "--cache-images", "5000", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    capped = [r for r in report["results"] if "residents" in r]
    assert len(capped) == 1
    r = capped[0]
    entries, (c, h, w) = 2 * 5000, report["latent_shape"]
    assert r["residents"]["latent_cache_entries"] == entries
    # float16 mean and std: 2 tensors x 2 bytes per element
    assert r["residents"]["latent_cache_gib"] == pytest.approx(entries * c * h * w * 4 / GIB)
    assert r["peak_memory_gib"] * GIB >= entries * c * h * w * 4  # the cache is in the peak
    assert r["peak_total_gib"] > r["peak_reserved_gib"] >= r["peak_memory_gib"]
