"""How well an autoencoder reconstructs held-out images: PSNR, SSIM, LPIPS, rFID (and a grid)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.images import to_uint8
from .reconstruction import psnr, ssim


class ReconstructionFID:
    """rFID: the FID between Inception features of originals and of their reconstructions.

    Feed it ``add(x, x_hat)`` batch by batch (both in [-1, 1]), then call :meth:`result`.
    Both sides are quantised to uint8 by one function (:func:`~ffhq_ldm.data.images.to_uint8`:
    clamp, ``round((x + 1) * 127.5)``), the way the images would be saved, so an identity
    autoencoder scores 0 up to round-off: any asymmetry in the conversion would show up as a
    spurious distance.

    ``extract`` maps uint8 ``(N, H, W, 3)`` to ``(N, D)`` features (an
    :class:`~ffhq_ldm.evaluation.features.InceptionFeatureExtractor`); it is called on at most
    ``chunk`` images at a time to bound memory at 299x299. ``original_features`` are the
    originals' features from an earlier pass over the same images in the same order: the
    held-out originals never change during training, so repeated evaluations extract only the
    reconstructions. With ``fail_soft`` an exception while extracting (an out-of-memory
    Inception, say) is recorded instead of raised, so an evaluation metric never ends a
    training run: :meth:`result` then gives ``(None, reason)``.

    FID is biased upward for small sets (Chong & Forsyth 2020), so compare rFIDs only over
    the same number of images.
    """

    def __init__(self, extract: Callable[[np.ndarray], np.ndarray], chunk: int = 16,
                 original_features: np.ndarray | None = None, fail_soft: bool = False):
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.extract, self.chunk, self.fail_soft = extract, chunk, fail_soft
        self.original_features = original_features
        self._originals: list[np.ndarray] = []
        self._reconstructions: list[np.ndarray] = []
        self.failure: str | None = None

    def _features(self, images: np.ndarray) -> np.ndarray:
        parts = [np.asarray(self.extract(images[s:s + self.chunk]))
                 for s in range(0, len(images), self.chunk)]
        return np.concatenate(parts)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if self.failure is not None:
            return
        try:
            if self.original_features is None:
                self._originals.append(self._features(to_uint8(x)))
            self._reconstructions.append(self._features(to_uint8(x_hat)))
        except Exception as exc:  # noqa: BLE001 - see fail_soft in the class docstring
            if not self.fail_soft:
                raise
            self.failure = f"Inception feature extraction failed: {type(exc).__name__}: {exc}"

    def result(self) -> tuple[float | None, str | None]:
        """``(rfid, None)``, or ``(None, reason)`` after a soft failure.

        Also leaves the originals' features in ``original_features`` for the next pass.
        """
        from .metrics import fid_from_features

        if self.failure is not None:
            return None, self.failure
        if not self._reconstructions:
            raise ValueError("no images were added")
        recon = np.concatenate(self._reconstructions)
        if self.original_features is None:
            self.original_features = np.concatenate(self._originals)
        if len(self.original_features) != len(recon):
            raise ValueError(f"features of {len(self.original_features)} originals but "
                             f"{len(recon)} reconstructions: not the same images")
        if len(recon) < 2:
            return None, "rFID needs at least 2 images"
        try:
            return fid_from_features(self.original_features, recon), None
        except Exception as exc:  # noqa: BLE001 - see fail_soft in the class docstring
            if not self.fail_soft:
                raise
            return None, f"rFID computation failed: {type(exc).__name__}: {exc}"


@torch.no_grad()
def reconstruction_metrics(reconstruct, batches, perceptual=None, perceptual_name: str = "",
                           keep: int = 8, rfid: ReconstructionFID | None = None):
    """Mean PSNR/SSIM(/LPIPS) over all images, and the first ``keep`` originals + reconstructions.

    ``reconstruct(x) -> x̂`` maps images in [-1, 1] to reconstructions (the posterior mode, so the
    figures are deterministic). A random-trunk LPIPS is reported as ``lpips_random_trunk``: it
    is a distance, not the LPIPS metric. With ``rfid`` the same clamped reconstructions also go
    to the rFID accumulator, and the metrics gain ``rfid`` and ``rfid_num_images`` (or
    ``rfid: None`` and the reason as ``rfid_unavailable`` when it could not be computed).
    """
    totals, count, originals, recons = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}, 0, [], []
    for x in batches:
        x_hat = reconstruct(x).float().clamp(-1, 1)
        x = x.float()
        totals["psnr"] += psnr(x_hat, x).sum().item()
        totals["ssim"] += ssim(x_hat, x).sum().item()
        if perceptual is not None:
            totals["lpips"] += perceptual(x, x_hat).sum().item()
        if rfid is not None:
            rfid.add(x, x_hat)
        count += x.shape[0]
        if sum(o.shape[0] for o in originals) < keep:
            originals.append(x.cpu())
            recons.append(x_hat.cpu())
    if count == 0:
        raise ValueError("no images to evaluate the autoencoder on")
    metrics = {k: v / count for k, v in totals.items()}
    lpips_value = metrics.pop("lpips")
    if perceptual is not None:
        metrics["lpips_random_trunk" if "random" in perceptual_name else "lpips"] = lpips_value
    metrics["num_images"] = count
    if rfid is not None:
        value, reason = rfid.result()
        metrics["rfid"] = value
        if reason is None:
            metrics["rfid_num_images"] = count
        else:
            metrics["rfid_unavailable"] = reason
    pair = (torch.cat(originals)[:keep], torch.cat(recons)[:keep])
    return metrics, pair


def describe_metrics(metrics: dict) -> str:
    """The figures of ``reconstruction_metrics`` in one line; rFID with its image count, since
    FID grows as the count shrinks."""
    skip = ("step", "num_images", "rfid", "rfid_num_images")
    parts = [f"{k} {v:.4f}" for k, v in metrics.items()
             if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if metrics.get("rfid") is not None:
        parts.append(f"rfid {metrics['rfid']:.4f} (over {metrics['rfid_num_images']} images)")
    return ", ".join(parts)


def batched(dataset, batch_size: int, device, limit: int | None = None):
    """Stack a map-style dataset into batches on ``device``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, n))]).to(device)
