"""How an autoencoder's training split its data, recorded in its export so that stage 2 and the
evaluation split the same images the same way (and never train on stage 1's held-out set)."""

from __future__ import annotations

import json
from pathlib import Path

SPLIT_FILE = "training_data.json"  # inside an exported vae/ folder


def read_split(vae_dir, resolution: int) -> dict:
    """The split recorded in ``vae_dir``; an autoencoder exported elsewhere (no split file)
    holds nothing out and is taken at its own ``resolution``."""
    path = Path(vae_dir) / SPLIT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"holdout": 0, "split_seed": 0, "resolution": resolution}
