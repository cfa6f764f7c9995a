"""Reference statistics of the real data (Inception mean/covariance + features + fingerprint).

A reference ``.npz`` holds

* ``mu`` (float64, 2048) and ``sigma`` (float64, 2048x2048) for FID, computed
  from float32 features before any rounding;
* ``features`` (float16, N x 2048) for KID and precision/recall and for the
  Inception-space nearest-neighbour search (float16 keeps ~3 significant
  digits, ample for distances; it halves the file);
* ``names``: image paths relative to the data folder, in feature order;
* ``fingerprint`` (JSON) and ``fingerprint_sha256``: extractor identity +
  weights hash + preprocessing + image size.  FID values are only comparable
  when these agree, so :func:`load_reference` refuses a mismatch.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import EvaluationError
from .features import (
    InceptionFeatureExtractor,
    default_batch_size,
    fingerprint_sha256,
    get_extractor,
)
from .images import list_images, relative_names
from .metrics import gaussian_stats


def select_subset(n: int, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a seeded random subset of size ``max_images`` (sorted), or all indices."""
    if max_images is None or max_images >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max_images, replace=False))


def compute_reference(
    data_dir: str,
    out_npz: str,
    extractor: InceptionFeatureExtractor | None = None,
    resolution: int = 128,
    batch_size: int | None = None,
    device: str = "auto",
    max_images: int | None = None,
    seed: int = 0,
) -> dict:
    """Extract Inception features of ``data_dir`` and save reference statistics to ``out_npz``."""
    paths = list_images(data_dir, "data folder")
    keep = select_subset(len(paths), max_images, seed)
    paths = [paths[i] for i in keep]
    if len(paths) < 2:
        raise EvaluationError(f"data folder {data_dir!r} needs at least 2 images for reference "
                              "statistics")
    if extractor is None:
        extractor = get_extractor(None, device)
    bs = batch_size or default_batch_size(extractor.device)
    feats = extractor.extract_paths(paths, resolution, bs, desc="reference features")
    mu, sigma = gaussian_stats(feats)
    fp = extractor.fingerprint(resolution)
    meta = {"data_dir": os.path.abspath(data_dir), "num_images": len(paths),
            "max_images": max_images, "seed": seed,
            "weights_source": extractor.source.origin}
    os.makedirs(os.path.dirname(os.path.abspath(out_npz)) or ".", exist_ok=True)
    np.savez(
        out_npz,
        mu=mu,
        sigma=sigma,
        features=feats.astype(np.float16),
        names=np.array(relative_names(paths, data_dir)),
        fingerprint=np.array(json.dumps(fp, sort_keys=True)),
        fingerprint_sha256=np.array(fingerprint_sha256(fp)),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    return {"mu": mu, "sigma": sigma, "features": feats, "names": relative_names(paths, data_dir),
            "fingerprint": fp, "meta": meta}


def load_reference(path: str, expected_fingerprint: dict | None = None) -> dict:
    """Load a reference ``.npz``; raise :class:`EvaluationError` when its fingerprint differs from
    ``expected``."""
    if not os.path.isfile(path):
        raise EvaluationError(f"reference statistics file not found: {path!r} (create it with "
                              f"'evaluate ref')")
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = {
                "mu": z["mu"],
                "sigma": z["sigma"],
                "features": z["features"].astype(np.float32),
                "names": [str(n) for n in z["names"]],
                "fingerprint": json.loads(str(z["fingerprint"])),
                "meta": json.loads(str(z["meta"])),
            }
    except (OSError, KeyError, ValueError) as exc:
        raise EvaluationError(f"{path!r} is not a valid reference statistics file: {exc}") from exc
    if expected_fingerprint is not None and ref["fingerprint"] != expected_fingerprint:
        keys = sorted(set(ref["fingerprint"]) | set(expected_fingerprint))
        diff = [k for k in keys if ref["fingerprint"].get(k) != expected_fingerprint.get(k)]
        details = "; ".join(f"{k}: reference={ref['fingerprint'].get(k)!r} "
                            f"now={expected_fingerprint.get(k)!r}" for k in diff)
        raise EvaluationError(
            f"reference {path!r} was computed with different feature preprocessing, FID would not "
            f"be comparable ({details}); recompute it with 'evaluate ref' using the same "
            "--inception and resolution"
        )
    return ref
