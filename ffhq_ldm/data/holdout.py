"""The autoencoder's held-out split, fitted to small folders.

The paper presets hold out 256 images for reconstruction metrics: nothing on FFHQ's 70,000,
but on a folder of 200 it would leave one image to train on. When the requested held-out set
leaves fewer images than one global batch, it shrinks to 10% of the images (rounded down), or
to fewer where even that would leave less than a global batch; the run says so in one line.
A folder too small for one global batch even with nothing held out gets an error that says so.

The split itself is ``images.split_holdout``'s, so a held-out count that fits gives exactly
the split it always gave; the count used is what the trainer records (config and export), and
the later stages read it from there.
"""

from __future__ import annotations

from .images import DataError, open_dataset_checked, split_holdout

SMALL_FOLDER_FRACTION = 0.1


def fitted_holdout(num_images: int, holdout: int, global_batch: int) -> int:
    """Held-out images to use: ``holdout`` if at least ``global_batch`` images remain for
    training, else min(10% of the images, what leaves one global batch), at least 0."""
    if num_images - holdout >= global_batch:
        return holdout
    return max(0, min(holdout, int(num_images * SMALL_FOLDER_FRACTION),
                      num_images - global_batch))


class SmallDataError(DataError):
    """Fewer usable images than one global batch: a user error (one line, exit code 2)."""


def open_training_split(data: str, size: int, holdout: int, seed: int, small_images: str,
                        global_batch: int, progress: bool = False, note=print):
    """``open_dataset_checked`` with the held-out count fitted to the data.

    Returns (train items, held-out items, image_key, scan report or None, held-out count used).
    ``note`` gets the one-line message when the count was lowered.
    """
    items, _, image_key, report = open_dataset_checked(data, size, 0, seed, small_images,
                                                       progress=progress)
    n = len(items)
    used = fitted_holdout(n, holdout, global_batch)
    if n - used < global_batch:
        raise SmallDataError(
            f"{n} usable images, fewer than one global batch of {global_batch} (batch size x "
            "processes): lower --batch-size")
    if used != holdout:
        note(f"note: {n} images: holding out {used} for reconstruction metrics, not --holdout "
             f"{holdout}, so that training keeps at least one global batch of {global_batch}; "
             "pass --holdout N to choose")
    if hasattr(items, "select"):  # a HuggingFace dataset: split its row indices
        train_idx, held_idx = split_holdout(list(range(n)), used, seed)
        return items.select(train_idx), items.select(held_idx), image_key, report, used
    train, held = split_holdout(items, used, seed)
    return train, held, image_key, report, used
