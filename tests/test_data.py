"""Image loading: folders of mixed sizes and formats, preprocessing, splits, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from ffhq_ldm.data.images import (
    DataError,
    ImageDataset,
    list_images,
    load_image,
    open_dataset,
    split_holdout,
    to_tensor,
)


@pytest.fixture
def mixed_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgb(200, 300).save(root / "wide.png")
    rgb(300, 180).save(root / "sub" / "tall.jpg", quality=95)
    rgb(64, 64).save(root / "sub" / "deeper" / "small.webp")
    rgb(128, 128).convert("RGBA").save(root / "alpha.PNG")
    Image.fromarray(rng.integers(0, 256, (90, 90), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 65536, (70, 70), dtype=np.uint16)).save(root / "deep16.png")
    rgb(100, 100).convert("P").save(root / "palette.png")
    rgb(80, 120).convert("CMYK").save(root / "cmyk.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_of_mixed_images_gives_right_shape_and_range(mixed_folder):
    files = list_images(mixed_folder)
    assert len(files) == 8  # recursive, case-insensitive extensions, .txt ignored
    dataset = ImageDataset(files, 32, flip="none")
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0


def test_center_crop_and_resize_match_an_independent_computation(tmp_path):
    # a 60x100 image whose centre 60x60 square is white and the rest black
    array = np.zeros((60, 100, 3), np.uint8)
    array[:, 20:80] = 255
    Image.fromarray(array).save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png", 30))
    assert out.shape == (30, 30, 3)
    assert out.min() == 255  # only the white centre square survives the crop


def test_tensor_scaling_is_exact():
    image = Image.fromarray(np.array([[[0, 127, 255]]], np.uint8))
    x = to_tensor(image)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))


def test_flip_modes(tmp_path):
    array = np.zeros((8, 8, 3), np.uint8)
    array[:, :4] = 255
    Image.fromarray(array).save(tmp_path / "half.png")
    files = list_images(tmp_path)
    plain = ImageDataset(files, 8, flip="none")[0]
    flipped = ImageDataset(files, 8, flip="always")[0]
    torch.testing.assert_close(flipped, plain.flip(-1))
    assert plain[0, 0, 0] == 1.0 and flipped[0, 0, 0] == -1.0


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    out = np.asarray(load_image(tmp_path / "clear.png", 4))
    assert (out == 255).all()


def test_16_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "mid.png")
    out = np.asarray(load_image(tmp_path / "mid.png", 4))
    assert 126 <= out.min() and out.max() <= 129  # half of full scale, not saturated at 255


def test_holdout_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, held = split_holdout(items, 10, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(items)
    assert split_holdout(items, 10, seed=3) == (train, held)
    assert split_holdout(items, 10, seed=4)[1] != held
    # never holds out everything
    assert len(split_holdout([1, 2], 10)[0]) == 1


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")


def test_hf_imagefolder_dataset(mixed_folder, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "hf_imgs"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 50), (i * 40, 0, 0)).save(folder / f"{i}.png")
    train, held, key = open_dataset(f"hf:imagefolder:{folder}", 16, holdout=1)
    assert len(train) == 4 and len(held) == 1
    x = ImageDataset(train, 16, flip="none", image_key=key)[0]
    assert x.shape == (3, 16, 16)
