"""The autoencoder's held-out set on small folders (ffhq_ldm/data/holdout.py).

Before: the paper presets' 256 held-out images on a folder of 200 left one image to train on,
and the run stopped with "only 1 training images for a global batch of 16; lower
--batch-size", never naming --holdout. Now the held-out set shrinks to 10% of the images when
the requested one would leave less than a global batch, and says so.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import load_script
from PIL import Image
from test_first_run_messages import read_images

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.data.holdout import SmallDataError, fitted_holdout, open_training_split
from ffhq_ldm.data.images import list_images


@pytest.mark.parametrize("n,holdout,batch,expected", [
    (70000, 256, 16, 256),  # FFHQ: as asked
    (272, 256, 16, 256),    # exactly one global batch left: as asked
    (271, 256, 16, 27),     # one short: 10% of 271
    (200, 256, 16, 20),     # the first-run case: 10% of 200
    (200, 256, 64, 20),
    (20, 256, 16, 2),       # 10% of 20, leaving 18 >= 16
    (17, 256, 16, 1),       # 10% would be 1, and 16 must stay
    (16, 256, 16, 0),       # nothing can be spared
    (10, 256, 16, 0),       # too small even so: open_training_split refuses it
    (200, 0, 16, 0),
    (48, 8, 4, 8),          # the tiny preset on the test faces: unchanged
])
def test_fitted_holdout_known_values(n, holdout, batch, expected):
    assert fitted_holdout(n, holdout, batch) == expected


def reference_split(items, holdout, seed):
    """The split as its docstring defines it, written again here: a seeded shuffle of the
    indices, the last ``holdout`` held out, both parts in their original order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[len(order) - holdout:]) if holdout else set()
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def test_a_fitting_holdout_splits_as_before(faces32):
    notes = []
    train, held, _, _, used = open_training_split(str(faces32), 32, 8, 3, "upscale", 4,
                                                  note=notes.append)
    files = list_images(faces32)
    assert used == 8 and not notes
    assert (train, held) == reference_split(files, 8, 3)


def test_a_small_folder_keeps_a_global_batch_and_says_so(faces32):
    notes = []
    train, held, _, _, used = open_training_split(str(faces32), 32, 256, 0, "upscale", 16,
                                                  note=notes.append)
    assert used == 4 and len(held) == 4 and len(train) == 44  # 10% of 48
    assert (train, held) == reference_split(list_images(faces32), 4, 0)
    assert len(notes) == 1 and "holding out 4" in notes[0] and "--holdout" in notes[0]


def test_too_few_images_even_with_nothing_held_out(faces32):
    train, held, _, _, used = open_training_split(str(faces32), 32, 256, 0, "upscale", 48)
    assert used == 0 and len(train) == 48 and not held
    with pytest.raises(SmallDataError, match="48 usable images.*lower --batch-size"):
        open_training_split(str(faces32), 32, 256, 0, "upscale", 49)


def test_vae_trainer_fits_and_records_the_holdout_and_logs_grids(faces32, tmp_path, capsys):
    # The paper preset's default (256) on 48 images with a global batch of 16: the trainer
    # used to stop; now it trains with 4 held out, and records 4 where the later stages and
    # a resumed run read it.
    code = run_main(load_script("train_vae").main, [
        "--preset", "tiny", "--no-progress", "--log-with", "tensorboard", "--data", str(faces32),
        "--output-dir", str(tmp_path), "--holdout", "256", "--batch-size", "16",
        "--max-steps", "1", "--eval-every", "1", "--checkpoint-every", "1", "--no-rfid"])
    out = capsys.readouterr().out
    assert code == 0
    assert "holding out 4" in out
    assert json.loads((tmp_path / "config.json").read_text())["vae"]["holdout"] == 4
    assert json.loads((tmp_path / "vae" / "training_data.json").read_text())["holdout"] == 4
    # The reconstruction grids reach TensorBoard too, the same pictures as the PNG files.
    logged = dict(read_images(tmp_path)["reconstructions"])
    assert sorted(logged) == [0, 1]
    png = np.asarray(Image.open(tmp_path / "reconstructions" / "step-00000001.png"))
    assert np.array_equal(logged[1], png)
