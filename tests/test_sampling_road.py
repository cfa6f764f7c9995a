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


# ---------------------------------------------------------------------------------------------
# The background PNG writer and the compiled decoder

def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(24 + i % 3, 32, 3), dtype=np.uint8) for i in range(n)]


def test_png_writer_writes_the_files_of_a_serial_loop(tmp_path):
    from PIL import Image

    from ffhq_ldm.sampling import PngWriter

    images = _images(40)
    (tmp_path / "serial").mkdir()
    (tmp_path / "threads").mkdir()
    for i, image in enumerate(images):  # the loop `ffhq-ldm sample` ran before
        Image.fromarray(image).save(tmp_path / "serial" / f"seed0_{i:06d}.png")
    with PngWriter(workers=3, max_pending=4) as writer:
        for i, image in enumerate(images):
            writer.write(tmp_path / "threads" / f"seed0_{i:06d}.png", image)
    # on disk once the block is left: the same names, the same bytes
    serial = sorted((tmp_path / "serial").iterdir())
    threaded = sorted((tmp_path / "threads").iterdir())
    assert [p.name for p in threaded] == [p.name for p in serial]
    for a, b in zip(serial, threaded, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert writer.written == [tmp_path / "threads" / p.name for p in serial]


def test_png_writer_keeps_at_most_max_pending_images(tmp_path, monkeypatch):
    import threading
    import time

    from PIL import Image

    from ffhq_ldm.sampling import PngWriter

    done = []
    lock = threading.Lock()
    plain_save = Image.Image.save

    def slow_save(self, *args, **kwargs):
        time.sleep(0.005)
        plain_save(self, *args, **kwargs)
        with lock:
            done.append(1)

    monkeypatch.setattr(Image.Image, "save", slow_save)
    most = 0
    with PngWriter(workers=2, max_pending=3) as writer:
        for i, image in enumerate(_images(30)):
            writer.write(tmp_path / f"{i}.png", image)
            with lock:
                most = max(most, i + 1 - len(done))
    assert 1 <= most <= 3
    assert len(done) == 30


def test_png_writer_failing_write_is_a_clean_error(tmp_path):
    """A write into a missing folder: a UsageError naming the file, from the producer's
    thread, with no hang (the producer blocked on a full queue is released)."""
    import threading

    from ffhq_ldm.cli_common import UsageError
    from ffhq_ldm.sampling import PngWriter

    outcome = {}

    def produce():
        try:
            with PngWriter(workers=2, max_pending=2) as writer:
                for i, image in enumerate(_images(50)):
                    writer.write(tmp_path / "missing" / f"{i}.png", image)
        except UsageError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    thread.join(timeout=120)  # a deadlock guard, not a timing: the writes take milliseconds
    assert not thread.is_alive(), "the writer hung after a failed write"
    assert "cannot write" in outcome["error"] and "missing" in outcome["error"]
    assert not (tmp_path / "missing").exists()


def test_sample_reports_a_failed_write_as_one_error_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    _save_tiny_pipeline(tmp_path / "pipe")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image.Image, "save", refuse)
    code = cli_main(["sample", "--model", str(tmp_path / "pipe"), "--num", "3", "--steps", "2",
                     "--batch-size", "2", "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: cannot write ") and "Permission denied" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_compiled_decoder_keeps_types_keys_and_images():
    """compile_for_sampling on the CPU (aot_eager): the decoder is compiled in place, the
    modules keep their types and state_dict keys, and decoding gives the eager images."""
    from conftest import build_tiny_pipeline

    from ffhq_ldm.sampling import compile_for_sampling

    pipe = build_tiny_pipeline()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = pipe.decode_latents(latents)
    keys = list(pipe.vae.state_dict())
    types = (type(pipe.unet), type(pipe.vae), type(pipe.vae.decoder))
    compile_for_sampling(pipe, False, backend="aot_eager")
    assert pipe.vae.decoder._compiled_call_impl is None  # off: untouched
    compile_for_sampling(pipe, True, backend="aot_eager")
    assert pipe.vae.decoder._compiled_call_impl is not None
    assert pipe.unet._compiled_call_impl is not None
    assert (type(pipe.unet), type(pipe.vae), type(pipe.vae.decoder)) == types
    assert list(pipe.vae.state_dict()) == keys
    with torch.no_grad():
        compiled = pipe.decode_latents(latents)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
