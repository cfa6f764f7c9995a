"""``ffhq-ldm interpolate | invert | inpaint`` on a tiny exported pipeline (32 px, CPU).

What the files hold is compared with the pipeline called directly and with PSNR computed here
from the written PNGs; bad input must end in one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_pipeline import build_pipeline, gen

from ffhq_ldm.cli import main
from ffhq_ldm.train.export import export_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explore") / "pipeline"
    export_pipeline(build_pipeline(), folder, card={"preset": "tiny"})
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 48x40 RGB photo (not square, not the model's size: it is cropped and resized)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("photo") / "face.png"
    Image.fromarray(coarse).resize((48, 40), Image.BILINEAR).save(path)
    return path


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def test_interpolate_writes_frames_strip_and_gif(model, tmp_path, capsys):
    out = tmp_path / "interp"
    assert main(["interpolate", "--model", str(model), "--seeds", "3,17", "--frames", "4",
                 "--steps", "2", "--batch-size", "3", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    frames = sorted(out.glob("frame_*.png"))
    assert [f.name for f in frames] == [f"frame_{k:03d}.png" for k in range(4)]
    # The ends are the seeds' own images, as `pipe(generator=seed)` draws them.
    pipe = build_pipeline()
    for path, seed in ((frames[0], 3), (frames[-1], 17)):
        alone = pipe(generator=gen(seed), num_inference_steps=2, output_type="np").images[0]
        assert np.abs(read(path) - alone).max() <= 0.5 / 255 + 1e-4
    assert np.abs(read(frames[1]) - read(frames[0])).max() > 0.01
    strip = Image.open(out / "strip.png")
    assert strip.size == (4 * 34 + 2, 36)
    gif = Image.open(out / "interpolation.gif")
    assert gif.n_frames == 6  # there and back: 0 1 2 3 2 1
    assert "4 frames between seeds 3 and 17" in capsys.readouterr().out


def test_interpolate_between_images(model, photo, tmp_path):
    out = tmp_path / "interp_img"
    assert main(["interpolate", "--model", str(model), "--images", f"{photo},{photo}",
                 "--frames", "2", "--steps", "2", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    a, b = read(out / "frame_000.png"), read(out / "frame_001.png")
    assert np.array_equal(a, b)  # the same image twice: the same inverted noise


def test_invert_reports_psnr_of_what_it_wrote(model, photo, tmp_path, capsys):
    out = tmp_path / "inv"
    assert main(["invert", "--model", str(model), "--image", str(photo), "--steps", "3",
                 "--variations", "2", "--eta", "1", "--perceptual", "lpips-vgg-random-trunk",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["face_original.png", "face_reconstruction.png", "face_variation_0.png",
                            "face_variation_1.png", "face_strip.png", "face_noise.safetensors",
                            "metrics.json"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perceptual"] == "lpips-vgg-random-trunk"
    row = metrics["images"][0]
    original, rec = read(out / "face_original.png"), read(out / "face_reconstruction.png")
    assert original.shape == (32, 32, 3)
    # PSNR written out from its definition, on the saved 8-bit files: equal up to rounding.
    expected = 10 * math.log10(1 / np.mean((original - rec) ** 2))
    assert abs(row["psnr"] - expected) < 0.2
    assert row["lpips"] >= 0 and np.isfinite(row["lpips_autoencoder"])
    v0, v1 = read(out / "face_variation_0.png"), read(out / "face_variation_1.png")
    assert np.abs(v0 - v1).max() > 0.01  # different noise, different variations
    from safetensors.torch import load_file

    noise = load_file(out / "face_noise.safetensors")["noise"]
    again = build_pipeline()(latents=noise, num_inference_steps=3, output_type="np").images[0]
    assert np.abs(again - rec).max() <= 0.5 / 255 + 1e-4  # the saved noise regenerates it
    assert "lpips-vgg-random-trunk" in capsys.readouterr().out


def test_inpaint_writes_input_mask_and_results(model, photo, tmp_path):
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 12:36] = 255
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)
    out = tmp_path / "inp"
    assert main(["inpaint", "--model", str(model), "--image", str(photo), "--mask", str(mask_path),
                 "--steps", "3", "--num", "2", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    for name in ("input.png", "mask.png", "result_0.png", "result_1.png", "strip.png"):
        assert (out / name).is_file(), name
    hole = read(out / "mask.png")[..., 0] > 0.5
    assert hole.shape == (32, 32) and 0 < hole.mean() < 1
    assert np.all(read(out / "input.png")[hole] == 128 / 255)
    assert np.abs(read(out / "result_0.png") - read(out / "result_1.png")).max() > 0.01


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, photo):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("not an image")
    Image.new("L", (16, 16), 255).save(d / "small_mask.png")
    Image.new("L", (48, 40), 0).save(d / "black_mask.png")
    return d


@pytest.mark.parametrize("argv, message", [
    (["interpolate", "--seeds", "3"], "--seeds takes two values"),
    (["interpolate", "--seeds", "3,x"], "--seeds takes two integers"),
    (["interpolate", "--seeds", "3,4", "--frames", "1"], "--frames must be at least 2"),
    (["interpolate", "--images", "{bad}/missing.png,{photo}"], "missing.png: no such file"),
    (["invert", "--image", "{bad}/missing.png"], "no such file"),
    (["invert", "--image", "{bad}/notes.png"], "notes.png is not a readable image"),
    (["invert", "--image", "{photo}", "--variations", "-1"], "--variations must be >= 0"),
    (["inpaint", "--image", "{photo}", "--mask", "{bad}/small_mask.png"],
     "the mask is 16x16 pixels but the image is 48x40"),
    (["inpaint", "--image", "{photo}", "--mask", "{bad}/notes.png"],
     "mask {bad}/notes.png is not a readable image"),
    (["inpaint", "--image", "{photo}", "--mask", "{bad}/black_mask.png"], "no white pixels"),
    (["inpaint", "--image", "{photo}", "--mask", "{bad}/missing.png"], "no such file"),
], ids=["one_seed", "bad_seed", "one_frame", "missing_image_interp", "missing_image",
        "not_an_image", "negative_variations", "mask_size", "mask_not_image", "empty_mask",
        "missing_mask"])
def test_bad_input_is_one_line_exit_2(model, photo, bad_files, argv, message, tmp_path, capsys):
    argv = [a.format(bad=bad_files, photo=photo) for a in argv]
    code = main([*argv, "--model", str(model), "--out", str(tmp_path / "o"), "--steps", "2",
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message.format(bad=bad_files) in err[0]


def test_not_a_model_folder_exits_2_in_a_real_process(tmp_path, photo):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ffhq_ldm.cli", "invert", "--model",
                           str(tmp_path), "--image", str(photo), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an exported pipeline folder" in lines[0]


def test_pipeline_images_match_cli_seed_convention():
    # `--seeds S` means the noise of torch.Generator().manual_seed(S), as pipe(generator=...)
    pipe = build_pipeline()
    noise = torch.randn(1, 4, 16, 16, generator=gen(17))
    assert torch.equal(pipe.seed_noise([17]), noise)


@pytest.mark.parametrize("command, options", [
    ("interpolate", ("--seeds", "--images", "--frames", "--out")),
    ("invert", ("--image", "--variations", "--eta", "--perceptual")),
    ("inpaint", ("--image", "--mask", "--resample", "--num")),
])
def test_help_names_the_options(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ffhq-ldm {command}")
    for option in options:
        assert option in text, option
