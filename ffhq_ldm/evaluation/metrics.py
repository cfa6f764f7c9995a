"""Distribution metrics on feature arrays (no network, no images).

* FID - Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium": Fréchet distance between Gaussians
  fitted to the two feature sets,
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``.
* KID - Bińkowski et al. 2018, "Demystifying MMD GANs": unbiased estimator of
  the squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.
* Precision / recall - Kynkäänniemi et al. 2019, "Improved Precision and
  Recall Metric for Assessing Generative Models": each set's manifold is the
  union of balls around its points with radius = distance to the point's k-th
  nearest neighbour in the same set; precision = fraction of generated points
  inside the real manifold, recall = fraction of real points inside the
  generated manifold.

All pairwise-distance work is done in row blocks so that 10k x 10k (or larger)
sets never materialise a full distance matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.linalg
import torch

from .errors import EvaluationError

__all__ = [
    "frechet_distance",
    "gaussian_stats",
    "fid_from_features",
    "fid_features_vs_stats",
    "kid",
    "precision_recall",
    "knn_radii",
    "pairwise_sq_dists",
]


# ----------------------------------------------------------------------------------- FID
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N-1``) covariance of ``(N, D)`` features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvaluationError(f"need at least 2 feature vectors to fit a Gaussian, got shape "
                              f"{f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``(S1 S2)^{1/2}`` is computed with :func:`scipy.linalg.sqrtm`.  With few
    samples the covariances are singular and ``sqrtm`` can fail or return
    non-finite values; as in the reference FID code we then retry with
    ``eps * I`` added to both covariances.  Round-off can also give the square
    root a small imaginary part (the product of two PSD matrices has real,
    non-negative eigenvalues in exact arithmetic): we drop it when it is
    negligible and raise otherwise.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"inconsistent shapes: mu {mu1.shape}/{mu2.shape}, sigma "
                         f"{s1.shape}/{s2.shape}")

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # Imaginary parts on the diagonal are pure numerical noise when tiny relative to the scale.
        scale = max(1.0, float(np.abs(covmean).max()))
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3 * scale):
            raise EvaluationError(
                f"matrix square root has a large imaginary component "
                f"({np.abs(covmean.imag).max():.3g}); "
                "covariances are probably degenerate (too few samples?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _frechet_lowrank(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Exact Fréchet distance when the first covariance comes from ``n <= D`` vectors.

    With ``A`` the centred features (``n x D``) and ``S1 = A^T A / (n-1)``,
    ``S1 S2 = A^T (A S2) / (n-1)`` has the same non-zero eigenvalues as the
    ``n x n`` symmetric PSD matrix ``A S2 A^T / (n-1)`` (``eig(XY) = eig(YX)``
    up to zeros).  The trace of the principal square root of ``S1 S2`` is the
    sum of the square roots of those eigenvalues, so we need one small
    ``eigvalsh`` instead of a ``D x D`` ``sqrtm`` (~25 s for D = 2048 on a slow
    CPU).  Tiny negative eigenvalues from round-off are clipped to 0.
    """
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    mu1 = f.mean(axis=0)
    a = f - mu1
    m = (a @ np.asarray(sigma2, dtype=np.float64) @ a.T) / (n - 1)
    ev = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(ev, 0.0, None)).sum()
    diff = mu1 - np.asarray(mu2, dtype=np.float64)
    tr_s1 = (a * a).sum() / (n - 1)
    return float(diff @ diff + tr_s1 + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_features_vs_stats(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID of a feature set against reference ``(mu, sigma)``.

    Uses the exact low-rank route (:func:`_frechet_lowrank`) when the set has no
    more vectors than dimensions, the standard ``sqrtm`` route otherwise.
    """
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise EvaluationError(f"need at least 2 feature vectors to fit a Gaussian, got shape "
                              f"{f.shape}")
    if len(f) <= f.shape[1]:
        return _frechet_lowrank(f, mu2, sigma2)
    mu1, s1 = gaussian_stats(f)
    return frechet_distance(mu1, s1, mu2, sigma2)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets (each ``(N, D)``); symmetric, 0 for a set with itself."""
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if len(f2) < len(f1):  # put the smaller set first so the low-rank route applies when possible
        f1, f2 = f2, f1
    mu2, s2 = gaussian_stats(f2)
    return fid_features_vs_stats(f1, mu2, s2)


# ----------------------------------------------------------------------------------- KID
def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a.shape[1]
    return (a @ b.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Bińkowski et al. 2018, eq. for MMD_u^2).

    ``1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j)
    - 2/(mn) sum_{i,j} k(x_i,y_j)``
    """
    m, n = len(x), len(y)
    kxx = _poly_kernel(x, x)
    kyy = _poly_kernel(y, y)
    kxy = _poly_kernel(x, y)
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.sum() / (m * n))


def kid(
    f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets.

    Each subset draws ``subset_size`` vectors without replacement from each set
    (clipped to the smaller set size, minimum 2), following Bińkowski et al.'s
    block estimator; the std across subsets indicates estimator variance.
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise EvaluationError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        vals[i] = mmd2_unbiased(a, b)
    return float(vals.mean()), float(vals.std())


# ---------------------------------------------------------------------- pairwise distances
def _as_tensor(x, device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    # float32 is enough for distances between Inception features; float64 inputs stay float64.
    return t.to(device=device, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor,
                      b_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` via ``|a|^2 + |b|^2 - 2 a.b``, clamped at
    0."""
    if b_sqnorm is None:
        b_sqnorm = (b * b).sum(1)
    d = (a * a).sum(1, keepdim=True) + b_sqnorm[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def iter_sq_dist_blocks(query, ref, device="cpu",
                        block: int = 1024) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, D)`` with ``D`` the squared distances of ``query[start:start+block]`` to all
    ``ref``."""
    q = _as_tensor(query, device)
    r = _as_tensor(ref, device)
    r_sq = (r * r).sum(1)
    for s in range(0, len(q), block):
        yield s, pairwise_sq_dists(q[s : s + block], r, r_sq)


# ---------------------------------------------------------------------- precision / recall
def knn_radii(features, k: int = 3, device="cpu", block: int = 1024) -> torch.Tensor:
    """Distance from every point to its k-th nearest *other* point of the same set."""
    n = len(features)
    if n <= k:
        raise EvaluationError(f"precision/recall with k={k} needs more than {k} points per set, "
                              f"got {n}")
    radii = []
    for s, d in iter_sq_dist_blocks(features, features, device, block):
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + s] = float("inf")  # exclude the point itself (robust to duplicate points)
        radii.append(torch.kthvalue(d, k, dim=1).values.sqrt())
    return torch.cat(radii)


def _fraction_inside(query, ref, ref_radii: torch.Tensor, device, block: int) -> float:
    inside = 0
    r2 = ref_radii.to(device) ** 2
    for _s, d in iter_sq_dist_blocks(query, ref, device, block):
        inside += int((d <= r2[None, :]).any(dim=1).sum())
    return inside / len(query)


def precision_recall(real, fake, k: int = 3, device="cpu",
                     block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii (paper default k=3).

    The paper uses equally sized sets; callers should subsample the larger set
    (radii shrink as a set grows).
    """
    device = torch.device(device)
    real_r = knn_radii(real, k, device, block)
    fake_r = knn_radii(fake, k, device, block)
    precision = _fraction_inside(fake, real, real_r, device, block)
    recall = _fraction_inside(real, fake, fake_r, device, block)
    return precision, recall
