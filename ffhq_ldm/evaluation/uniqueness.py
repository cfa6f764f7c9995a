"""Uniqueness / memorisation analysis: how close is each sample to the training set?

For every generated image we find its nearest training images in two spaces:

* **Inception space** - cosine distance ``1 - cos(f_s, f_t)`` between pool3
  features.  Cosine (rather than L2) ignores the overall activation magnitude,
  which varies with contrast/brightness, and is bounded in ``[0, 2]``.
* **Pixel space** - images downsampled to 64x64 (bilinear with antialiasing),
  values in ``[0, 1]``; the distance is the root-mean-square pixel difference
  (L2 divided by ``sqrt(3*64*64)``), so 0.01 means "about 2.5 grey levels".

The question "is this closer than a genuinely new image would be?" is answered
with a held-out baseline, following the idea of Meehan, Chaudhuri & Dasgupta,
"A Non-Parametric Test to Detect Data-Copying in Generative Models" (AISTATS
2020): the nearest-train distances of real images the model never needed to
reproduce (a held-out folder, or a leave-one-out subset of the training folder)
show how close natural new images come to the training set.

**Memorisation rule** (per space): with ``D_h`` the held-out nearest-train
distances,

    tau = scale * quantile(D_h, q)          (defaults q = 0.01, scale = 0.5)

and a sample is flagged when its nearest-train distance ``d_1 <= tau``.  So a
sample must be at least twice as close to some training image as the closest
1 % of genuinely new images are.  For a model that never copies, samples are
distributed like held-out images and fewer than ``q`` of them (far fewer,
because of the factor 0.5) are flagged; exact or near-exact copies have
``d_1 ~ 0`` and are always flagged.  A sample counts as memorised when it is
flagged in *either* space (pixel space catches exact copies, Inception space
catches copies that were slightly shifted / recoloured).  The rate for each
space is reported too.  This is in the spirit of the copy-detection thresholds
of Carlini et al. 2023 ("Extracting Training Data from Diffusion Models") and
Somepalli et al. 2023, but calibrated on data instead of hand-set.

Optionally a third space, LPIPS (Zhang et al. 2018), re-ranks the candidates
found in the other two (:func:`lpips_space`); it needs ImageNet trunk weights
that cannot be downloaded offline, so it is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EvaluationError
from .metrics import iter_sq_dist_blocks

PIXEL_SIZE = 64


def pixel_vectors(images: np.ndarray, size: int = PIXEL_SIZE, device="cpu",
                  batch: int = 512) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3*size*size)`` scaled so L2 distance = RMSE in
    [0,1] units."""
    out = []
    dim = 3 * size * size
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        out.append((x.reshape(len(x), -1) / np.sqrt(dim)).cpu().numpy())
    return np.concatenate(out, axis=0)


def cosine_vectors(features: np.ndarray) -> np.ndarray:
    """Unit-normalised features: for unit vectors ``|a-b|^2 / 2 = 1 - cos(a, b)``."""
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(
    query: np.ndarray,
    ref: np.ndarray,
    k: int = 3,
    metric: str = "l2",
    exclude: np.ndarray | None = None,
    device="cpu",
    block: int = 1024,
):
    """k nearest ``ref`` rows for every ``query`` row; returns ``(dist (N,k), idx (N,k))`` sorted
    ascending.

    ``metric``: ``"l2"`` (Euclidean) or ``"cosine"`` (``1 - cos``; pass unit vectors or raw ones).
    ``exclude[i]``: a ref index that query ``i`` may not match (leave-one-out), or -1.
    """
    if metric == "cosine":
        query, ref = cosine_vectors(query), cosine_vectors(ref)
    elif metric != "l2":
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    k_eff = min(k, len(ref) - (0 if exclude is None else 1))
    if k_eff < 1:
        raise EvaluationError("nearest-neighbour search needs at least 2 training images")
    dists, idxs = [], []
    for s, d in iter_sq_dist_blocks(query, ref, device, block):
        if exclude is not None:
            ex = torch.as_tensor(np.asarray(exclude[s : s + len(d)]), device=d.device)
            rows = torch.nonzero(ex >= 0).flatten()
            d[rows, ex[rows]] = float("inf")
        val, idx = torch.topk(d, k_eff, dim=1, largest=False)
        val = val / 2.0 if metric == "cosine" else val.sqrt()
        dists.append(val.cpu().numpy())
        idxs.append(idx.cpu().numpy())
    return np.concatenate(dists).astype(np.float64), np.concatenate(idxs)


def memorization_threshold(holdout_nn: np.ndarray, quantile: float = 0.01,
                           scale: float = 0.5) -> float:
    """``tau = scale * quantile(holdout nearest-train distances, q)`` (see module docstring)."""
    holdout_nn = np.asarray(holdout_nn, dtype=np.float64)
    if holdout_nn.size == 0:
        raise EvaluationError("the held-out baseline is empty")
    return float(scale * np.quantile(holdout_nn, quantile))


@dataclass
class SpaceResult:
    """Nearest-train analysis in one space."""

    name: str
    sample_dist: np.ndarray  # (N, k) ascending
    sample_idx: np.ndarray  # (N, k) indices into the training list
    holdout_dist: np.ndarray  # (H,) nearest-train distance of each held-out image
    threshold: float
    holdout_idx: np.ndarray | None = None  # (H, k) nearest training indices of held-out images
    flagged: np.ndarray = field(init=False)

    def __post_init__(self):
        self.flagged = self.sample_dist[:, 0] <= self.threshold

    @property
    def rate(self) -> float:
        return float(self.flagged.mean())

    def summary(self) -> dict:
        q = [0.0, 0.01, 0.05, 0.5, 0.95]
        return {
            "threshold": self.threshold,
            "memorization_rate": self.rate,
            "num_flagged": int(self.flagged.sum()),
            "sample_nn_quantiles": {str(p): float(np.quantile(self.sample_dist[:, 0],
                                                              p)) for p in q},
            "holdout_nn_quantiles": {str(p): float(np.quantile(self.holdout_dist, p)) for p in q},
        }


def analyse_space(
    name: str,
    sample_vecs: np.ndarray,
    train_vecs: np.ndarray,
    holdout_vecs: np.ndarray,
    metric: str,
    holdout_exclude: np.ndarray | None = None,
    k: int = 3,
    quantile: float = 0.01,
    scale: float = 0.5,
    device="cpu",
) -> SpaceResult:
    """Nearest training neighbours of samples and of held-out images in one space, plus the flag
    threshold."""
    s_d, s_i = nearest_neighbours(sample_vecs, train_vecs, k, metric, device=device)
    h_d, h_i = nearest_neighbours(holdout_vecs, train_vecs, k, metric, exclude=holdout_exclude,
                                  device=device)
    tau = memorization_threshold(h_d[:, 0], quantile, scale)
    return SpaceResult(name, s_d, s_i, h_d[:, 0], tau, holdout_idx=h_i)


def combine_flags(results: list[SpaceResult]) -> np.ndarray:
    """A sample is memorised when any space flags it."""
    flags = np.zeros(len(results[0].flagged), dtype=bool)
    for r in results:
        flags |= r.flagged
    return flags


def lpips_distances(net, image: np.ndarray, others: np.ndarray, device="cpu") -> np.ndarray:
    """LPIPS distance between one uint8 image ``(H, W, 3)`` and each of ``others (n, H, W, 3)``."""

    def to_t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device).permute(0, 3, 1,
                                                                            2).float() / 127.5 - 1.0

    with torch.no_grad():
        t = to_t(others)
        q = to_t(image[None]).expand(len(t), -1, -1, -1)
        return net(q, t).reshape(len(t)).double().cpu().numpy()


def lpips_space(
    net,
    sample_images: np.ndarray,
    holdout_images: np.ndarray,
    train_loader,
    sample_cands: np.ndarray,
    holdout_cands: np.ndarray,
    k: int = 3,
    quantile: float = 0.01,
    scale: float = 0.5,
    device="cpu",
    name: str = "lpips (re-ranked)",
) -> SpaceResult:
    """Optional LPIPS space (Zhang et al. 2018): re-rank candidate neighbours by LPIPS.

    LPIPS needs a network pass per pair, so instead of a full search we score
    only the candidates found in the other spaces (``*_cands``: training indices
    per row, duplicates allowed) for samples and held-out images alike, then
    apply the same held-out threshold rule.  ``net(x, y)`` takes two
    ``[-1, 1]`` batches; ``train_loader(indices)`` returns uint8 training images.
    """

    def rerank(images, cands):
        dist = np.zeros((len(images), k))
        idx = np.zeros((len(images), k), dtype=np.int64)
        for i in range(len(images)):
            c = np.unique(cands[i])
            d = lpips_distances(net, images[i], train_loader(list(c)), device)
            order = np.argsort(d, kind="stable")[:k]
            dist[i, : len(order)], idx[i, : len(order)] = d[order], c[order]
            dist[i, len(order):], idx[i, len(order):] = np.inf, -1
        return dist, idx

    s_d, s_i = rerank(sample_images, sample_cands)
    h_d, _ = rerank(holdout_images, holdout_cands)
    tau = memorization_threshold(h_d[:, 0], quantile, scale)
    return SpaceResult(name, s_d, s_i, h_d[:, 0], tau)
