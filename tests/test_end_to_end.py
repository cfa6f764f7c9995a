"""The whole road on tiny models: train both stages -> export -> from_pretrained -> sample."""

import json

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from ffhq_ldm.cli import main as cli_main
from pipelines import FaceLDMPipeline


@pytest.fixture(scope="module")
def trained(faces32, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    common = ["--preset", "tiny", "--data", str(faces32), "--no-progress", "--log-with", "none"]
    # rFID off: tests/test_rfid.py runs the trainer's default, this keeps the suite's time
    assert load_script("train_vae").main(common + ["--output-dir", str(out / "vae_run"),
                                                   "--no-rfid"]) == 0
    assert load_script("train_unet").main(common + ["--vae", str(out / "vae_run" / "vae"),
                                                    "--output-dir", str(out / "unet_run")]) == 0
    return out


def test_tiny_end_to_end_trains_and_exports(trained):
    out = trained
    vae_config = json.loads((out / "vae_run" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215 and vae_config["scaling_factor"] > 0
    for name in ("config.json", "metrics.json"):
        assert (out / "vae_run" / name).is_file()
    pipeline_dir = out / "unet_run" / "pipeline"
    for name in ("model_index.json", "pipeline.py", "README.md", "unet", "vae", "scheduler"):
        assert (pipeline_dir / name).exists()
    assert not list(pipeline_dir.rglob("*.bin"))
    assert list((out / "unet_run" / "previews").glob("*.png"))


def test_exported_pipeline_samples_images(trained):
    out = trained
    pipe = FaceLDMPipeline.from_pretrained(out / "unet_run" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5,
                  generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_sample_cli_writes_pngs_and_grid(trained, tmp_path):
    out = trained
    samples = tmp_path / "samples"
    code = cli_main(["sample", "--model", str(out / "unet_run" / "pipeline"), "--num", "3",
                     "--steps", "3", "--batch-size", "2", "--out", str(samples), "--no-progress"])
    assert code == 0
    files = sorted(samples.glob("seed0_*.png"))
    assert [f.name for f in files] == ["seed0_000000.png", "seed0_000001.png", "seed0_000002.png"]
    assert (tmp_path / "samples_grid.png").is_file()
    assert len(list(samples.iterdir())) == 3  # only the samples: evaluate calc reads them all
    # image i depends on (seed, i), not on the batch size
    again = tmp_path / "again"
    cli_main(["sample", "--model", str(out / "unet_run" / "pipeline"), "--num", "3", "--steps",
              "3", "--batch-size", "3", "--out", str(again), "--no-progress"])
    a = np.asarray(Image.open(samples / "seed0_000002.png"), dtype=int)
    b = np.asarray(Image.open(again / "seed0_000002.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_bad_input_exits_2_with_a_message(faces32, tmp_path, capsys):
    vae = load_script("train_vae")
    unet = load_script("train_unet")
    from ffhq_ldm.cli_common import run_main

    cases = [
        (vae.main, ["--preset", "nope", "--data", str(faces32), "--output-dir", str(tmp_path)],
         "unknown preset"),
        (vae.main, ["--preset", "tiny", "--data", str(tmp_path / "missing"), "--output-dir",
                    str(tmp_path / "o")], "does not exist"),
        (unet.main, ["--preset", "tiny", "--data", str(faces32), "--vae", str(faces32),
                     "--output-dir", str(tmp_path / "u")], "not an exported autoencoder"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((vae.main, ["--preset", "tiny", "--data", str(tmp_path / "empty"),
                             "--output-dir", str(tmp_path / "o2")], "no images"))
    for main, argv, message in cases:
        assert run_main(main, argv + ["--log-with", "none", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert cli_main(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "not an exported pipeline" in capsys.readouterr().err


def test_compiled_sampling_keeps_one_batch_shape_and_the_same_images(trained, tmp_path,
                                                                     monkeypatch):
    """The CUDA default forced on (dynamo with its eager backend, so it runs in a second here):
    a short last batch is padded to --batch-size, so the static graph never recompiles, and
    the padding's images are dropped; the images are the uncompiled ones."""
    import torch._dynamo

    from ffhq_ldm import speed as fast

    calls = []
    real = fast.maybe_compile

    def eager_backend(module, enabled=None, mode=None, **kwargs):
        calls.append(enabled)
        return real(module, enabled=enabled, mode=mode, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(fast, "maybe_compile", eager_backend)
    monkeypatch.setenv("FFHQ_LDM_COMPILE", "1")
    pipeline = str(trained / "unet_run" / "pipeline")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert cli_main(["sample", "--model", pipeline, "--num", "5", "--steps", "3",
                         "--batch-size", "2", "--out", str(tmp_path / "c"),
                         "--no-progress"]) == 0
    assert calls == [True, True]  # the UNet and the VAE decoder, each once through the helper
    monkeypatch.setenv("FFHQ_LDM_COMPILE", "0")
    assert cli_main(["sample", "--model", pipeline, "--num", "5", "--steps", "3",
                     "--batch-size", "5", "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    compiled = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert compiled == sorted(p.name for p in (tmp_path / "e").iterdir()) and len(compiled) == 5
    for name in compiled:
        a = np.asarray(Image.open(tmp_path / "c" / name), dtype=int)
        b = np.asarray(Image.open(tmp_path / "e" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name
