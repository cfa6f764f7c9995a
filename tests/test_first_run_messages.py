"""What a first run prints and writes: help lines, FID caveats, paths, model card, TensorBoard."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from ffhq_ldm.cli import build_parser
from ffhq_ldm.cli import main as cli_main
from ffhq_ldm.evaluation.caveats import small_sample_caveat

# -- help: no "(default: None)" after an option that states its own default ----------------------

def _helps(parser: argparse.ArgumentParser, name: str):
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _helps(sub, f"{name} {sub_name}")


def _script_help(name: str, capsys) -> str:
    with pytest.raises(SystemExit):
        load_script(name).parse_args(["--help"])
    return capsys.readouterr().out


def test_no_help_line_adds_default_none_to_a_stated_default(capsys):
    from test_cli_help import option_blocks

    texts = dict(_helps(build_parser(), "ffhq-ldm"))
    texts["train_vae"] = _script_help("train_vae", capsys)
    texts["train_unet"] = _script_help("train_unet", capsys)
    assert len(texts) > 10
    checked = 0
    for name, text in texts.items():
        for option, block in option_blocks(text).items():
            flat = " ".join(block.split())  # argparse wraps lines anywhere
            if "(default: None)" in flat:
                # the only "default" of this entry: nothing stated before it
                assert flat.lower().count("default") == 1, (name, option, flat)
            checked += 1
    assert checked > 100
    calc = " ".join(texts["ffhq-ldm evaluate calc"].split())
    assert "(default 64 on CUDA, 16 on CPU) (default: None)" not in calc
    assert "(default 64 on CUDA, 16 on CPU)" in calc
    assert "(default: 50)" in " ".join(texts["ffhq-ldm sample"].split())


# -- FID/KID caveat and the printed paths -------------------------------------------------------

def test_small_sample_caveat():
    line = small_sample_caveat(64, 200)
    assert line.startswith("note: FID/KID over 64 samples against 200 reference images")
    assert "compare FIDs only at equal N" in line
    assert small_sample_caveat(49_999) is not None
    assert small_sample_caveat(50_000) is None


def _fake_metrics(n: int) -> dict:
    return {"fid": 303.0, "kid": 0.3, "kid_std": 0.01, "precision": 0.0, "recall": 0.0,
            "memorization_rate": 0.0, "num_samples": n, "memorized": [],
            "settings": {"reference_num_images": 200, "num_samples": n, "num_train": 10}}


@pytest.mark.parametrize("n,caveat", [(64, True), (50_000, False)])
def test_evaluate_calc_prints_the_caveat_and_clean_paths(monkeypatch, tmp_path, capsys, n,
                                                         caveat):
    # run_calc (Inception, minutes) is replaced: what is tested is what the command prints.
    import ffhq_ldm.evaluation.calc as calc

    monkeypatch.setattr(calc, "run_calc", lambda **kwargs: _fake_metrics(n))
    out = str(tmp_path / "eval") + "/"  # as a shell completes a folder name
    code = cli_main(["evaluate", "calc", "--samples", str(tmp_path), "--ref", "r.npz",
                     "--data", str(tmp_path), "--out", out])
    printed = capsys.readouterr().out
    assert code == 0
    assert json.loads(printed.splitlines()[0])["fid"] == 303.0
    assert (f"note: FID/KID over {n} samples" in printed) == caveat
    assert "//" not in printed
    eval_dir = tmp_path / "eval"
    assert (f"wrote {eval_dir / 'metrics.json'}, {eval_dir / 'report.md'} and "
            f"{eval_dir / 'report.html'}") in printed


def test_report_states_the_caveat(tmp_path):
    from ffhq_ldm.evaluation.report import write_report

    metrics = {**_fake_metrics(64), "memorized": []}
    metrics["settings"].update(num_samples=64, pr_k=3, pr_num=64, memo_scale=0.5,
                               memo_quantile=0.01, holdout="a folder")
    text = open(write_report(str(tmp_path), metrics, [], "g.png", "h.png")).read()
    assert "Caveat: FID/KID over 64 samples against 200 reference images" in text


# -- model card ---------------------------------------------------------------------------------

def test_model_card_counts_small_models_exactly():
    from test_pipeline_arguments import tiny_pipeline

    from ffhq_ldm.train.export import model_card

    pipe = tiny_pipeline()
    card = model_card(pipe, {})
    n_unet = sum(int(np.prod(p.shape)) for p in pipe.unet.parameters())
    n_vae = sum(int(np.prod(p.shape)) for p in pipe.vae.parameters())
    assert n_unet < 1e6 and n_vae < 1e6
    assert f"{n_vae:,} parameters" in card
    assert f"UNet2DModel, {n_unet:,}\nparameters" in card
    assert "0.0 M" not in card


# -- TensorBoard --------------------------------------------------------------------------------

def read_images(logdir) -> dict:
    """{tag: [(step, HxWx3 uint8)]} from TensorBoard event files, via tensorboard's reader."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path.parent), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            found[tag] = [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string))))
                          for e in acc.Images(tag)]
    return found


def test_log_grid_writes_the_grid_to_tensorboard(tmp_path):
    from accelerate import Accelerator

    from ffhq_ldm.visual import grid_array, log_grid

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    assert log_grid(accelerator, "reconstructions", images, 7, nrow=2)
    accelerator.end_training()
    (step, picture), = read_images(tmp_path)["reconstructions"]
    assert step == 7
    # independent of grid_array: 2x2 tiles of 8 px with 2 px white padding
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert picture.shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    assert np.array_equal(picture[12:20, 2:10], expected[2].numpy())
    assert np.array_equal(picture, grid_array(images, 2))


def test_log_grid_without_tensorboard_is_a_no_op(tmp_path):
    from accelerate import Accelerator

    from ffhq_ldm.visual import log_grid

    assert not log_grid(Accelerator(), "x", torch.zeros(1, 3, 4, 4), 0)
