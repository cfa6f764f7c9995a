"""Procedurally drawn synthetic faces: the offline default dataset for the CPU demo and tests.

These images exist so that the project can be exercised end to end (data -> VAE -> LDM ->
sampling) on a machine with no network and no FFHQ download.  They are *not* a substitute for
FFHQ and nothing measured on them says anything about real-face quality.

Design goals and the reasons behind them:

* Framing follows FFHQ aligned crops: the head fills most of the frame, the eyes sit at about
  43 % of the height, the mouth at about 70 %, shoulders show at the bottom.  A model trained on
  these therefore learns the same spatial layout it would see on FFHQ.
* Variation is spread over the axes along which FFHQ varies (skin tone, face shape, hair colour
  including dyed colours, hair style, eyes, brows, nose, mouth/expression, glasses, beards, age
  cues, ears/earrings, clothing, backgrounds, small roll/shift/scale jitter, lighting side), so
  that a small diffusion model has a non-trivial but learnable distribution to fit.
* Every shape is a polygon in a face-centred coordinate system (unit = frame size, origin = frame
  centre) and goes through one affine transform (roll, scale, shift) before drawing.  That gives
  pose jitter for free, with no resampling of a rendered image.
* Drawing happens at 2x (4x for tiny sizes) with PIL ``ImageDraw`` (``RGBA`` blending mode for
  soft shading/shadows) and is downsampled with a box/Lanczos filter, so edges are antialiased.
* Image ``i`` of seed ``S`` uses its own RNG seeded from ``(S, i)``; images therefore do not
  depend on how many are generated or in which order, and a dataset can be produced in parallel
  chunks.

Modules: ``palette`` (colours), ``attributes`` (what a face looks like, drawn from its random
stream), ``painter`` (drawing in face coordinates, the background), ``face`` (one painter per
feature).

Measured speed on the 2-core CPU box (one core, ``taskset -c 0``, 128 px, Pillow 13, numpy 2.4,
other jobs running on the box): rendering only ~330 images/s (~3 ms/image; 240-335 across runs);
rendering plus PNG writing (``compress_level=1``) ~240 images/s.
"""

from __future__ import annotations

import json
import operator
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .attributes import sample_attributes
from .face import draw_face
from .painter import background
from .palette import HAIR_COLORS, SKIN_TONES

__all__ = ["render_face", "generate_faces", "face_batch", "SKIN_TONES", "HAIR_COLORS"]


def _as_index(v, name: str) -> int:
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None


def render_face(seed: int, index: int, size: int = 128) -> tuple[Image.Image, dict]:
    """Render face ``index`` of dataset ``seed``.

    Returns an RGB image of ``size`` x ``size`` and a JSON-serialisable dict of its attributes
    (skin_tone, face_shape, hair_color, hair_style, dyed_hair, eye_color, glasses, beard,
    expression, age_group, background, roll_degrees, ...).  The result depends only on
    ``(seed, index, size)``.
    """
    seed, index, size = _as_index(seed, "seed"), _as_index(index, "index"), _as_index(size, "size")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    # A string seed is hashed (SHA-512) by random.Random: stable across runs/platforms, and each
    # (seed, index) pair gets an independent stream, so images can be rendered in any order.
    r = random.Random(f"ffhq_ldm.synthetic/{seed}/{index}")
    attrs = sample_attributes(r)
    ss = 2 if size >= 64 else 4  # supersampling factor; tiny images need more for smooth edges
    shadow = None
    if r.random() < 0.6:  # soft head shadow cast onto the wall, away from the light
        L = -1.0 if attrs["light_side"] == "left" else 1.0
        sc = attrs["scale"]
        shadow = (0.5 + attrs["shift_x"] - L * 0.07 * sc, 0.5 + attrs["shift_y"] + 0.04, 0.36 * sc,
                  0.5 * sc)
    canvas = background(r, attrs["background"], size * ss, shadow)
    draw_face(canvas, r, attrs)
    img = canvas.reduce(ss) if ss == 2 else canvas.resize((size, size), Image.LANCZOS)
    meta = {k: v for k, v in attrs.items() if not k.startswith("_")}
    return img, meta


def face_batch(num: int, size: int = 128, seed: int = 0, start: int = 0) -> np.ndarray:
    """uint8 array (num, size, size, 3) of faces ``start .. start+num-1``; no disk I/O."""
    num = _as_index(num, "num")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    out = np.empty((num, size, size, 3), dtype=np.uint8)
    for i in range(num):
        out[i] = np.asarray(render_face(seed, start + i, size)[0])
    return out


def generate_faces(out_dir, num: int, size: int = 128, seed: int = 0,
                   progress: bool = True) -> Path:
    """Write ``out_dir/{index:06d}.png`` for ``index in range(num)`` plus
    ``out_dir/metadata.jsonl``.

    Each metadata line is ``{"file": "000000.png", "index": 0, "seed": S, **attributes}``.
    Creates ``out_dir`` (with parents).  Returns ``out_dir`` as a Path.
    """
    num, size, seed = _as_index(num, "num"), _as_index(size, "size"), _as_index(seed, "seed")
    if num <= 0:
        raise ValueError(f"num must be a positive number of images, got {num}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    it = range(num)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="synthetic faces", unit="img")
    lines = []
    for i in it:
        img, meta = render_face(seed, i, size)
        name = f"{i:06d}.png"
        # compress_level=1: ~3x faster than the default and only slightly larger files.
        img.save(out / name, compress_level=1)
        lines.append(json.dumps({"file": name, "index": i, "seed": seed, **meta}))
    # Metadata is written last (and atomically via rename) so its presence means the set is
    # complete.
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "metadata.jsonl")
    return out
