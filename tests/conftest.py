"""Shared fixtures: offline settings, small synthetic face folders, the training scripts."""

import importlib.util
import os
from pathlib import Path

import pytest

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


# Tiny models gain nothing from a second thread, and on a loaded 2-core machine OpenMP threads
# spin against each other (measured: 7-15x slower). One thread for the whole suite.
import torch  # noqa: E402

torch.set_num_threads(1)
