"""Hostile data: every kind of bad or awkward image file, before and during training.

One folder holds good faces and one file of each hostile kind. The scan (``ffhq-ldm
scan-data``, and every trainer when it opens a folder) must name each bad file with its reason,
convert the awkward-but-usable ones, and both trainers must train on the rest and write the
same findings to ``skipped_files.json``. A file that passes the header checks but not decoding
(corrupt pixel data behind valid CRCs) is caught at load time and substituted.
"""

import argparse
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.data import images as images_module
from ffhq_ldm.data.images import DataError, ImageDataset, load_failures, to_rgb
from ffhq_ldm.data.scan import inspect_image, register, scan_folder

COMMON = ["--preset", "tiny", "--no-progress", "--log-with", "none"]
SIZE = 32
GOOD = 20

# file -> the problem the scan must report (skipped files)
BAD = {
    "truncated.png": "truncated or corrupt",
    "truncated.jpg": "truncated or corrupt",
    "text.png": "not an image",
    "html.jpg": "not an image",
    "empty.jpg": "empty file",
    "bomb.png": "decompression bomb",  # over twice PIL's limit: DecompressionBombError
    "bomb_warning.png": "decompression bomb",  # over the limit: only a warning in PIL
}
# usable after conversion: file -> PIL mode on disk
CONVERTED = {"cmyk.jpg": "CMYK", "deep16.png": "I;16", "gray.png": "L", "rgba.png": "RGBA",
             "palette.png": "P"}
SMALL = "small.png"  # 16 px < 32: upscaled (default) or skipped
ROTATED = "exif_rotated.jpg"  # EXIF orientation 6
CORRUPT_PIXELS = "corrupt_pixels.png"  # valid chunks and CRCs, zlib data broken


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header claims a huge 1-bit image (never decoded, so never big)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + \
        _png_chunk(b"IDAT", zlib.compress(row)) + _png_chunk(b"IEND", b"")


def _corrupt_pixels_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data, out, pos = buffer.getvalue(), bytearray(buffer.getvalue()[:8]), 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = bytearray(data[pos + 8:pos + 8 + length])
        if kind == b"IDAT":
            body[2:10] = b"\xff" * 8  # garbage deflate blocks, with a CRC that matches them
        out += _png_chunk(kind, bytes(body))
        pos += 12 + length
    return bytes(out)


def _asymmetric(w: int, h: int) -> Image.Image:
    array = np.zeros((h, w, 3), np.uint8)
    array[: h // 4] = 255  # a white band at the top
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def hostile(faces32, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    faces = sorted(faces32.glob("*.png"))
    for face in faces[:GOOD]:
        shutil.copy(face, root / face.name)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    png, jpg = io.BytesIO(), io.BytesIO()
    rgb.save(png, "PNG")
    rgb.save(jpg, "JPEG", quality=90)
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (root / "text.png").write_text("this is not an image\n")
    (root / "html.jpg").write_text("<html><body>403 Forbidden</body></html>\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "bomb.png").write_bytes(_bomb_png(20_000, 20_000))  # 400 Mpx > 2 x 89.5 Mpx
    (root / "bomb_warning.png").write_bytes(_bomb_png(10_000, 10_000))  # 100 Mpx > 89.5 Mpx
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(root / "deep16.png")
    rgb.convert("L").save(root / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))))
    rgba.save(root / "rgba.png")
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _asymmetric(64, 40).save(root / ROTATED, exif=exif, quality=95)
    rgb.resize((16, 16)).save(root / SMALL)
    (root / CORRUPT_PIXELS).write_bytes(_corrupt_pixels_png(rgb))
    (root / "notes.txt").write_text("not an image extension: ignored, not reported")
    return root


def findings(report) -> dict:
    return {entry["file"]: entry["problem"] for entry in report.skipped}


# ---------------------------------------------------------------------------------------------
# the scan

def test_scan_names_every_bad_file_with_its_reason(hostile):
    report = scan_folder(hostile, SIZE)
    assert findings(report) == BAD
    assert all(entry["reason"] for entry in report.skipped)
    reasons = {entry["file"]: entry["reason"] for entry in report.skipped}
    assert "end-of-image marker" in reasons["truncated.jpg"]
    assert "decompression-bomb" in reasons["bomb.png"] or "decompression" in reasons["bomb.png"]
    assert report.files == GOOD + len(BAD) + len(CONVERTED) + 3
    usable = {p.name for p in report.usable}
    assert set(CONVERTED) | {SMALL, ROTATED, CORRUPT_PIXELS} <= usable
    assert [entry["file"] for entry in report.upscaled] == [SMALL]
    for name, mode in CONVERTED.items():
        assert report.modes[mode] >= 1, (name, mode, report.modes)
    summary = report.summary()
    assert "7 skipped" in summary and "1 smaller than 32 px, upscaled" in summary


def test_small_images_can_be_skipped_instead(hostile):
    report = scan_folder(hostile, SIZE, small_images="skip")
    assert findings(report)[SMALL] == "too small"
    assert not report.upscaled


def test_full_scan_also_finds_corrupt_pixel_data(hostile):
    report = scan_folder(hostile, SIZE, full=True)
    assert findings(report)[CORRUPT_PIXELS] == "truncated or corrupt"
    assert "fails to decode" in {e["file"]: e["reason"] for e in report.skipped}[CORRUPT_PIXELS]


def test_an_unreadable_file_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    _asymmetric(40, 40).save(path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: make the read fail the way a permission error does
        real_open = open

        def refuse(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refuse)
    problem, reason, _ = inspect_image(path, SIZE)
    assert problem == "unreadable" and "Permission denied" in reason


def test_bombs_are_never_decoded(hostile, monkeypatch):
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or
                        real_load(self))
    good = hostile / "gray.png"
    dataset = ImageDataset([hostile / "bomb.png", hostile / "bomb_warning.png", good], SIZE,
                           flip="none")
    x, used = dataset.get(0)
    assert used == 2 and x.shape == (3, SIZE, SIZE)
    assert all(w * h < Image.MAX_IMAGE_PIXELS for w, h in decoded)
    assert "decompression" in load_failures()[str(hostile / "bomb.png")]


def test_exif_orientation_is_applied(hostile):
    with Image.open(hostile / ROTATED) as image:
        assert image.size == (64, 40)
        upright = to_rgb(image)
    assert upright.size == (40, 64)  # orientation 6: displayed rotated by 90 degrees
    array = np.asarray(upright)
    assert array[:, -5:].mean() > 200 and array[:, :20].mean() < 30  # the band is now right


def test_a_file_that_fails_at_load_time_is_replaced_by_the_next_one(hostile):
    files = [hostile / "gray.png", hostile / CORRUPT_PIXELS, hostile / "cmyk.jpg"]
    dataset = ImageDataset(files, SIZE, flip="none")
    x, used = dataset.get(1)
    assert used == 2 and torch.equal(x, dataset[2])
    assert torch.equal(dataset[1], x)  # deterministic, and the bad file is not retried
    assert str(hostile / CORRUPT_PIXELS) in load_failures()
    with pytest.raises(DataError, match="none of the 1 images"):
        ImageDataset([hostile / CORRUPT_PIXELS], SIZE)[0]


# ---------------------------------------------------------------------------------------------
# ffhq-ldm scan-data

def scan_data(argv) -> int:
    parser = argparse.ArgumentParser(prog="ffhq-ldm")
    register(parser.add_subparsers(dest="command", required=True))
    return run_main(lambda a: (lambda args: args.func(args))(parser.parse_args(a)),
                    ["scan-data", "--no-progress", *argv])


def test_scan_data_exit_codes_and_json(hostile, faces32, tmp_path, capsys):
    assert scan_data(["--data", str(faces32), "--size", "32"]) == 0
    report_file = tmp_path / "report.json"
    assert scan_data(["--data", str(hostile), "--size", "32", "--json", str(report_file)]) == 1
    out = capsys.readouterr().out
    for name in BAD:
        assert f"skip     {name}: " in out
    payload = json.loads(report_file.read_text())
    assert {e["file"]: e["problem"] for e in payload["skipped"]} == BAD
    assert payload["usable"] == len(scan_folder(hostile, SIZE).usable)

    all_bad = tmp_path / "all_bad"
    all_bad.mkdir()
    for name in BAD:
        shutil.copy(hostile / name, all_bad / name)
    assert scan_data(["--data", str(all_bad), "--size", "32"]) == 2
    (tmp_path / "empty").mkdir()
    assert scan_data(["--data", str(tmp_path / "empty")]) == 2
    assert scan_data(["--data", str(tmp_path / "missing")]) == 2
    assert "error: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# training on it

@pytest.fixture(scope="module")
def hostile_vae(hostile, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_vae")
    code = load_script("train_vae").main(COMMON + [
        "--data", str(hostile), "--output-dir", str(out), "--max-steps", "3",
        "--eval-every", "3", "--checkpoint-every", "3", "--no-rfid"])
    assert code == 0
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "skipped_files.json").read_text())


def test_the_vae_trains_on_hostile_data_and_reports_each_bad_file(hostile_vae):
    report = _report(hostile_vae)
    assert {e["file"]: e["problem"] for e in report["skipped"]} == BAD
    assert all(e["reason"] for e in report["skipped"])
    # corrupt pixel data passes the header scan; decoding it (training, evaluation or the
    # scale measurement, which all see every image) fails, and it is replaced and reported
    assert [e["file"] for e in report["failed_while_loading"]] == [CORRUPT_PIXELS]
    assert [e["file"] for e in report["upscaled"]] == [SMALL]
    assert (hostile_vae / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    split = json.loads((hostile_vae / "vae" / "training_data.json").read_text())
    assert split["small_images"] == "upscale"


def test_the_unet_trains_on_hostile_data_too(hostile_vae, hostile, tmp_path, capsys):
    images_module._LOAD_FAILURES.clear()  # as in a fresh process
    code = load_script("train_unet").main(COMMON + [
        "--data", str(hostile), "--vae", str(hostile_vae / "vae"), "--output-dir",
        str(tmp_path), "--max-steps", "2", "--checkpoint-every", "2", "--preview-every", "2",
        "--preview-steps", "1", "--preview-images", "1"])
    assert code == 0
    report = _report(tmp_path)
    assert {e["file"]: e["problem"] for e in report["skipped"]} == BAD
    # the latent cache encodes the training split only: the corrupt file is found (and
    # replaced by the next image) if the split put it there
    from ffhq_ldm.data.images import split_holdout

    train, _ = split_holdout(scan_folder(hostile, SIZE).usable, 8, 0)
    expected = [CORRUPT_PIXELS] if hostile / CORRUPT_PIXELS in train else []
    assert [e["file"] for e in report["failed_while_loading"]] == expected
    assert "data: " in capsys.readouterr().out


def test_an_all_bad_or_empty_folder_is_a_clear_error(hostile, tmp_path, capsys):
    all_bad = tmp_path / "all_bad"
    all_bad.mkdir()
    for name in BAD:
        shutil.copy(hostile / name, all_bad / name)
    (tmp_path / "empty").mkdir()
    for data in (all_bad, tmp_path / "empty"):
        code = run_main(load_script("train_vae").main,
                        COMMON + ["--data", str(data), "--output-dir", str(tmp_path / "out")])
        assert code == 2
    err = capsys.readouterr().err
    assert "no usable images" in err and "scan-data" in err  # the all-bad folder
    assert "no images" in err and "Traceback" not in err  # the empty one


def test_a_dark_16_bit_image_stays_dark(tmp_path):
    # values up to 200 of 65535: 16-bit data, not 8-bit data in a 16-bit container
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark16.png")
    with Image.open(tmp_path / "dark16.png") as image:
        assert image.mode.startswith("I;16")
        assert np.asarray(to_rgb(image)).max() <= 1


def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    """81 Mpx is under PIL's own limit (89.5 Mpx) but costs gigabytes to decode: a 157 KB PNG
    can declare it. The scan lists it and the loader refuses it, having read only its header."""
    from ffhq_ldm.data.decode import MAX_PIXELS, load_image

    path = tmp_path / "huge.png"
    path.write_bytes(_bomb_png(9000, 9000))
    assert path.stat().st_size < 200_000 and 9000 * 9000 > MAX_PIXELS
    problem, reason, _ = inspect_image(path, SIZE)
    assert problem == "decompression bomb"
    assert "9000x9000" in reason and str(MAX_PIXELS) in reason
    with pytest.raises(Image.DecompressionBombError):
        load_image(path, SIZE)
    # a face photo of 24 Mpx (6000x4000) is under the limit
    assert 6000 * 4000 < MAX_PIXELS
