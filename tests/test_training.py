"""Short real training runs on the synthetic faces: each stage must actually learn."""

import json

import pytest
from conftest import load_script

COMMON = ["--preset", "tiny", "--no-progress", "--log-with", "none"]


@pytest.fixture(scope="module")
def vae_run(faces32, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_run")
    code = load_script("train_vae").main(COMMON + [
        "--data", str(faces32), "--output-dir", str(out), "--max-steps", "40",
        "--eval-every", "40", "--checkpoint-every", "40", "--no-rfid"])
    assert code == 0
    return out


def test_autoencoder_improves_held_out_psnr_by_3db(vae_run):
    history = json.loads((vae_run / "metrics.json").read_text())
    first, last = history[0], history[-1]
    assert first["step"] == 0 and last["step"] == 40
    print(f"held-out PSNR {first['psnr']:.2f} dB at step 0 -> {last['psnr']:.2f} dB at step 40")
    assert last["psnr"] - first["psnr"] >= 3.0
    assert (vae_run / "reconstructions" / "step-00000040.png").is_file()


def test_unet_training_loss_falls(vae_run, faces32, tmp_path):
    code = load_script("train_unet").main(COMMON + [
        "--data", str(faces32), "--vae", str(vae_run / "vae"), "--output-dir", str(tmp_path),
        "--max-steps", "80", "--log-every", "1", "--checkpoint-every", "80",
        "--preview-every", "80"])
    assert code == 0
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log]
    assert len(losses) == 80
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f"UNet eps-MSE: first 10% of steps {first:.4f}, last 10% {last:.4f}")
    assert last < 0.8 * first


def test_paper_unet_trains_one_full_size_step_on_cpu(tmp_path):
    """The ffhq128-f4 preset at full size: one step of train_unet.py at batch 1 (about 30 s)."""
    from ffhq_ldm.config import get_preset
    from ffhq_ldm.data.synthetic import generate_faces
    from ffhq_ldm.models.vae import build_vae
    from ffhq_ldm.train.export import export_vae

    faces = generate_faces(tmp_path / "faces", 4, size=128, progress=False)
    export_vae(build_vae(get_preset("ffhq128-f4", "vae")), tmp_path / "vae", 1.0,
               {"holdout": 0, "split_seed": 0, "resolution": 128})
    code = load_script("train_unet").main([
        "--preset", "ffhq128-f4", "--no-progress", "--log-with", "none", "--data", str(faces),
        "--vae", str(tmp_path / "vae"), "--output-dir", str(tmp_path / "unet"),
        "--batch-size", "1", "--max-steps", "1", "--preview-images", "1", "--preview-steps", "1",
        "--cache-batch-size", "4"])
    assert code == 0
    config = json.loads((tmp_path / "unet" / "pipeline" / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [192, 384, 576, 768] and config["sample_size"] == 32


def test_vq_autoencoder_trains_and_exports_a_measured_scale(faces32, tmp_path):
    import torch

    from ffhq_ldm.data.images import ImageDataset, list_images
    from ffhq_ldm.models.vae import load_vae

    code = load_script("train_vae").main(COMMON + [
        "--data", str(faces32), "--output-dir", str(tmp_path), "--autoencoder", "vq",
        "--max-steps", "4", "--eval-every", "4", "--checkpoint-every", "4", "--no-rfid"])
    assert code == 0
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["scaling_factor"] != 0.18215
    vae = load_vae(tmp_path / "vae")
    # independent: 1/std of the encoder's (pre-quantisation) output over the training split
    split = json.loads((tmp_path / "vae" / "training_data.json").read_text())
    files = list_images(faces32)
    from ffhq_ldm.data.images import split_holdout

    train, _ = split_holdout(files, split["holdout"], split["split_seed"])
    x = torch.stack([ImageDataset(train, 32, flip="none")[i] for i in range(len(train))])
    with torch.no_grad():
        h = vae.encode(x).latents.double()
    assert config["scaling_factor"] == pytest.approx(1 / h.std().item(), rel=1e-3)


def test_fp16_is_refused_for_the_autoencoder(faces32, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="fp16")
    result = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train_vae.py"), "--preset", "tiny", "--data",
         str(faces32), "--output-dir", str(tmp_path), "--log-with", "none"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "fp16 is refused" in result.stderr and "Traceback" not in result.stderr
