"""Tests for the procedurally drawn synthetic face dataset (ffhq_ldm.data.synthetic).

Most checks compare against facts that do not come from the renderer's own earlier output:
PNG round-trips are lossless, faces are roughly mirror-symmetric, pupils are darker than skin,
the face differs from the background in the corners, and so on.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from ffhq_ldm.data.synthetic import HAIR_COLORS, face_batch, generate_faces, render_face

DYED = {"blue", "pink", "green", "purple"}


def _arr(seed: int, index: int, size: int = 64) -> np.ndarray:
    return np.asarray(render_face(seed, index, size)[0])


@pytest.fixture(scope="module")
def sample():
    """200 faces at 64 px with their attributes, shared by the variety/face-likeness tests."""
    imgs, metas = [], []
    for i in range(200):
        img, meta = render_face(123, i, 64)
        imgs.append(np.asarray(img))
        metas.append(meta)
    return np.stack(imgs).astype(np.float64), metas


# ---------------------------------------------------------------------------------------------
# determinism and order independence
# ---------------------------------------------------------------------------------------------


def test_same_seed_and_index_is_bitwise_identical():
    for i in (0, 1, 57):
        a, ma = render_face(3, i, 64)
        b, mb = render_face(3, i, 64)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert ma == mb


def test_independent_of_global_random_state():
    # Image content must come only from (seed, index): reseeding the global RNGs changes nothing.
    random.seed(1)
    np.random.seed(1)
    a = _arr(5, 9)
    random.seed(999)
    np.random.seed(999)
    random.random()
    np.random.rand(7)
    assert np.array_equal(a, _arr(5, 9))


def test_different_seeds_and_indices_differ():
    for i in range(5):
        a, b = _arr(0, i), _arr(1, i)
        assert not np.array_equal(a, b)
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 5
    imgs = [_arr(0, i).tobytes() for i in range(20)]
    assert len(set(imgs)) == 20


def test_index_does_not_depend_on_batch_or_order():
    batch = face_batch(10, size=48, seed=7)
    # rendered alone, in reverse order
    for i in reversed(range(10)):
        assert np.array_equal(batch[i], _arr(7, i, 48))
    # via a chunk starting in the middle, as parallel dataset generation would do
    chunk = face_batch(4, size=48, seed=7, start=6)
    assert np.array_equal(chunk, batch[6:])
    for i in (0, 3, 9):
        assert np.array_equal(face_batch(1, size=48, seed=7, start=i)[0], batch[i])


# ---------------------------------------------------------------------------------------------
# shapes, types, validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 33, 64, 128])
def test_render_face_shape_mode_and_range(size):
    img, meta = render_face(0, 2, size)
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB" and img.size == (size, size)
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.shape == (size, size, 3)
    assert int(a.max()) - int(a.min()) > 60  # not a blank or washed-out image
    assert json.loads(json.dumps(meta)) == meta  # JSON round trip keeps every value


def test_face_batch_shape_dtype():
    b = face_batch(3, size=32, seed=1)
    assert b.shape == (3, 32, 32, 3) and b.dtype == np.uint8
    assert face_batch(0, size=32).shape == (0, 32, 32, 3)


def test_metadata_has_documented_keys():
    _, meta = render_face(0, 0)
    for key in ("skin_tone", "face_shape", "hair_color", "hair_style", "dyed_hair", "eye_color",
                "glasses", "beard", "expression", "age_group", "background", "roll_degrees"):
        assert key in meta, key
    assert isinstance(meta["dyed_hair"], bool) and isinstance(meta["glasses"], bool)
    assert meta["hair_color"] in HAIR_COLORS
    assert meta["dyed_hair"] == (meta["hair_color"] in DYED)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        render_face(0, 0, size=15)
    with pytest.raises(ValueError):
        face_batch(-1)


def test_generate_faces_writes_pngs_and_metadata(tmp_path):
    out = tmp_path / "nested" / "faces"
    ret = generate_faces(out, 6, size=32, seed=4, progress=False)
    assert ret == out and out.is_dir()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == pngs + ["metadata.jsonl"]
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 6
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert rec["file"] == f"{i:06d}.png" and rec["index"] == i and rec["seed"] == 4
        assert (out / rec["file"]).is_file()
        # PNG is lossless, so the file on disk must equal an independent in-memory render.
        with Image.open(out / rec["file"]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            assert np.array_equal(np.asarray(im), _arr(4, i, 32))
        assert rec["hair_color"] in HAIR_COLORS


def test_generate_faces_with_progress_bar(tmp_path, capsys):
    generate_faces(tmp_path / "p", 2, size=16, progress=True)
    assert len(list((tmp_path / "p").glob("*.png"))) == 2
    assert "2/2" in capsys.readouterr().err  # tqdm reports on stderr


@pytest.mark.parametrize("num", [0, -3])
def test_generate_faces_rejects_non_positive_num(tmp_path, num):
    with pytest.raises(ValueError, match="num"):
        generate_faces(tmp_path / "x", num, progress=False)


def test_generate_faces_rejects_tiny_size(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate_faces(tmp_path / "x", 2, size=8, progress=False)


# ---------------------------------------------------------------------------------------------
# variety
# ---------------------------------------------------------------------------------------------


def test_attribute_variety(sample):
    _, metas = sample

    def values(key):
        return {m[key] for m in metas}

    hair = values("hair_color")
    assert len(hair) >= 4 and hair & DYED, hair
    assert len(hair - DYED) >= 4  # natural colours too
    assert values("glasses") == {True, False}
    assert values("beard") == {True, False}
    assert len(values("skin_tone")) >= 4
    assert len(values("hair_style")) >= 6
    assert len(values("face_shape")) >= 4
    assert len(values("eye_color")) >= 4
    assert len(values("expression")) >= 3
    assert values("age_group") == {"child", "adult", "old"}
    assert values("background") == {"flat", "gradient", "blobs"}
    rolls = [m["roll_degrees"] for m in metas]
    assert min(rolls) < -3 and max(rolls) > 3
    # skin RGB spans light to dark: luminance range is wide
    lum = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (m["skin_rgb"] for m in metas)]
    assert max(lum) - min(lum) > 100


def test_pixel_statistics_vary_across_images(sample):
    x, _ = sample
    means = x.mean(axis=(1, 2))  # per-image mean colour
    assert (means.std(axis=0) > 10).all(), means.std(axis=0)


# ---------------------------------------------------------------------------------------------
# face-likeness from independent pixel facts
# ---------------------------------------------------------------------------------------------


def test_centre_differs_from_corners(sample):
    x, _ = sample
    n = x.shape[1]
    c = x[:, 3 * n // 8: 5 * n // 8, 3 * n // 8: 5 * n // 8].mean(axis=(1, 2))
    k = n // 8
    corners = np.stack([x[:, :k, :k], x[:, :k, -k:], x[:, -k:, :k], x[:, -k:, -k:]], 1)
    corners = corners.mean(axis=(1, 2, 3))
    d = np.abs(c - corners).sum(axis=1)
    assert d.mean() > 60
    assert (d > 20).mean() > 0.9


def test_cheeks_show_the_skin_colour(sample):
    # Between eyes and mouth, left and right of the nose, the pixels should be the sampled skin.
    x, metas = sample
    n = x.shape[1]
    rows = slice(int(0.5 * n), int(0.6 * n))
    left, right = slice(int(0.28 * n), int(0.38 * n)), slice(int(0.62 * n), int(0.72 * n))
    cheeks = np.concatenate([x[:, rows, left], x[:, rows, right]], 2)
    med = np.median(cheeks.reshape(len(x), -1, 3), axis=1)
    skin = np.array([m["skin_rgb"] for m in metas], dtype=float)
    assert (np.abs(med - skin).max(axis=1) < 40).mean() > 0.9


def test_eye_band_has_dark_pupils(sample):
    x, _ = sample
    n = x.shape[1]
    lum = x @ np.array([0.299, 0.587, 0.114])
    eye_min = lum[:, int(0.36 * n):int(0.5 * n), int(0.28 * n):int(0.72 * n)].min(axis=(1, 2))
    cheek_px = lum[:, int(0.5 * n):int(0.6 * n), int(0.28 * n):int(0.38 * n)]
    cheek = np.median(cheek_px.reshape(len(x), -1), axis=1)
    assert (eye_min < 0.6 * cheek).mean() > 0.95


def test_faces_are_roughly_mirror_symmetric(sample):
    # A face is closer to its own mirror image than to a different face.
    x, _ = sample
    mirror = np.abs(x - x[:, :, ::-1]).mean(axis=(1, 2, 3))
    other = np.abs(x - np.roll(x, 1, axis=0)).mean(axis=(1, 2, 3))
    assert (mirror < other).mean() > 0.9


def test_images_are_antialiased():
    # Hard-edged flat-colour drawing gives a few dozen colours; supersampled edges give hundreds.
    for i in range(8):
        a = _arr(9, i, 128)
        assert len(np.unique(a.reshape(-1, 3), axis=0)) > 200
