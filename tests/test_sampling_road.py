"""One sampling road: `ffhq-ldm sample` and `ffhq-ldm evaluate calc --model` draw the same images.

Both go through ffhq_ldm.sampling.sample_images, where image i of a seed starts from its own
noise; so the same seed gives byte-identical PNG files from both commands, whatever batch
size each one uses.
"""

from __future__ import annotations

import numpy as np
import torch
from test_evaluation import _save_tiny_pipeline, face_batch, needs_inception

from ffhq_ldm.cli import main as cli_main
from ffhq_ldm.config import mix_seed
from ffhq_ldm.evaluation.images import save_images


@needs_inception
def test_sample_and_evaluate_calc_write_identical_pngs(tmp_path):
    _save_tiny_pipeline(tmp_path / "pipe")
    save_images(face_batch(10, 32, seed=0), str(tmp_path / "train"))
    ref = str(tmp_path / "ref.npz")
    assert cli_main(["evaluate", "ref", "--data", str(tmp_path / "train"), "--out", ref,
                     "--resolution", "32", "--device", "cpu", "--batch-size", "10"]) == 0
    assert cli_main(["evaluate", "calc", "--model", str(tmp_path / "pipe"), "--num", "4",
                     "--steps", "2", "--seed", "3", "--batch-size", "3", "--ref", ref,
                     "--data", str(tmp_path / "train"), "--holdout-fraction", "0.3",
                     "--resolution", "32", "--out", str(tmp_path / "eval"),
                     "--kid-subsets", "2", "--device", "cpu"]) == 0
    assert cli_main(["sample", "--model", str(tmp_path / "pipe"), "--num", "4", "--steps", "2",
                     "--seed", "3", "--batch-size", "2", "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "sampled")]) == 0

    evaluated = sorted((tmp_path / "eval" / "samples").glob("*.png"))
    sampled = sorted((tmp_path / "sampled").glob("*.png"))
    assert [p.name for p in sampled] == [f"seed3_{i:06d}.png" for i in range(4)]
    assert len(evaluated) == 4
    for a, b in zip(evaluated, sampled, strict=True):
        assert a.read_bytes() == b.read_bytes(), (a.name, b.name)
    # and the images differ from one another: four seeds, not one image four times
    assert len({p.read_bytes() for p in sampled}) == 4


def test_image_i_starts_from_the_noise_of_its_own_seed():
    """The starting latents, against torch.randn with the documented seed rule."""
    from ffhq_ldm.sampling import initial_noise

    latents, _ = initial_noise(7, range(2, 5), (4, 8, 8))
    for row, index in zip(latents, range(2, 5), strict=True):
        g = torch.Generator().manual_seed(7 * 1_000_003 + index)
        assert torch.equal(row, torch.randn((4, 8, 8), generator=g))
    assert mix_seed(7, 2) == 7 * 1_000_003 + 2
    assert not np.array_equal(latents[0].numpy(), latents[1].numpy())
