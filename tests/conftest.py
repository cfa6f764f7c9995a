"""Shared fixtures: offline settings, small synthetic face folders, the training scripts."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def load_script(name: str):
    """Import training/<name>.py as a module (its main(argv) runs in-process)."""
    path = ROOT / "training" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"training_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def faces32(tmp_path_factory):
    """48 synthetic faces at 32 px in a folder."""
    from ffhq_ldm.data.synthetic import generate_faces

    out = tmp_path_factory.mktemp("faces32")
    generate_faces(out, 48, size=32, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """An untrained tiny autoencoder, exported (scaling factor 1.0, 8 images held out)."""
    from ffhq_ldm.config import get_preset
    from ffhq_ldm.models.vae import build_vae
    from ffhq_ldm.train.export import export_vae

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_vae") / "vae"
    export_vae(build_vae(get_preset("tiny", "vae")), out, 1.0,
               {"holdout": 8, "split_seed": 0, "resolution": 32})
    return out


def build_tiny_pipeline(autoencoder: str = "kl", scaling_factor: float = 0.7):
    """A tiny random-weight FaceLDMPipeline (32 px images), seeded: the same one every call."""
    import dataclasses

    from ffhq_ldm.config import get_preset
    from ffhq_ldm.models.unet import build_sample_scheduler, build_unet
    from ffhq_ldm.models.vae import build_vae
    from pipelines import FaceLDMPipeline

    torch.manual_seed(0)
    vae_cfg = dataclasses.replace(get_preset("tiny", "vae"), autoencoder=autoencoder)
    vae = build_vae(vae_cfg)
    vae.register_to_config(scaling_factor=scaling_factor)
    unet_cfg = get_preset("tiny", "unet")
    unet = build_unet(unet_cfg, vae_cfg.latent_channels, vae_cfg.latent_size)
    pipe = FaceLDMPipeline(vae=vae.eval(), unet=unet.eval(),
                           scheduler=build_sample_scheduler(unet_cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Tiny models gain nothing from a second thread, and on a loaded 2-core machine OpenMP threads
# spin against each other (measured: 7-15x slower). One thread for the whole suite.
torch.set_num_threads(1)
