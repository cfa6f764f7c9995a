"""Drawing in face coordinates: curves, the painter, the head outline and the background."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .palette import hsv, mix

_UNIT_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_T_CACHE: dict[int, np.ndarray] = {}


def unit(n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables for an n-gon, cached because they are reused for every ellipse."""
    tab = _UNIT_CACHE.get(n)
    if tab is None:
        a = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        tab = (np.cos(a), np.sin(a))
        _UNIT_CACHE[n] = tab
    return tab


def tgrid(n: int) -> np.ndarray:
    t = _T_CACHE.get(n)
    if t is None:
        t = np.linspace(0.0, 1.0, n)[:, None]
        _T_CACHE[n] = t
    return t


def bez(p0, p1, p2, n: int = 10) -> np.ndarray:
    """Quadratic Bezier curve as an (n, 2) array; the control point p1 is reached at half weight."""
    t = tgrid(n)
    p0, p1, p2 = np.asarray(p0, float), np.asarray(p1, float), np.asarray(p2, float)
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2


class Painter:
    """Draws polygons given in face coordinates (unit = frame size, origin = frame centre)."""

    def __init__(self, img: Image.Image, scale: float, roll_deg: float, dx: float, dy: float):
        # "RGBA" mode: alpha fills blend onto the RGB image
        self.draw = ImageDraw.Draw(img, "RGBA")
        s_px = img.size[0]
        self.k = s_px * scale  # pixels per face unit
        a = math.radians(roll_deg)
        ca, sa = math.cos(a), math.sin(a)
        self.mat_t = np.array([[ca, sa], [-sa, ca]]) * self.k  # transposed rotation*scale
        self.off = np.array([s_px * (0.5 + dx), s_px * (0.5 + dy)])

    def _xy(self, pts: np.ndarray) -> list[float]:
        return (pts @ self.mat_t + self.off).ravel().tolist()

    def poly(self, pts: np.ndarray, fill) -> None:
        self.draw.polygon(self._xy(pts), fill=fill)

    def ellipse_pts(self, cx, cy, rx, ry, rot: float = 0.0) -> np.ndarray:
        # Vertex count follows the on-canvas size so small dots stay cheap and big shapes smooth.
        n = int(min(72, max(12, (rx + ry) * self.k * 0.5))) // 4 * 4
        c, s = unit(n)
        x, y = rx * c, ry * s
        if rot:
            cr, sr = math.cos(rot), math.sin(rot)
            x, y = x * cr - y * sr, x * sr + y * cr
        return np.stack([cx + x, cy + y], axis=1)

    def ellipse(self, cx, cy, rx, ry, fill, rot: float = 0.0) -> None:
        self.poly(self.ellipse_pts(cx, cy, rx, ry, rot), fill)

    def stroke(self, pts: np.ndarray, w0: float, w1: float | None, fill) -> None:
        """Tapered stroke along a polyline, drawn as one polygon.

        A single polygon (rather than ImageDraw.line segments) means translucent strokes do not
        get darker blobs where segments overlap, and the width can taper like a brush stroke.
        """
        w1 = w0 if w1 is None else w1
        # Central differences by hand: np.gradient's generality costs more than the drawing.
        d = np.empty_like(pts)
        d[1:-1] = pts[2:] - pts[:-2]
        d[0] = pts[1] - pts[0]
        d[-1] = pts[-1] - pts[-2]
        nrm = d[:, ::-1] * [-1.0, 1.0]
        nrm /= np.maximum(np.sqrt((nrm * nrm).sum(axis=1, keepdims=True)), 1e-9)
        w = (w0 + (w1 - w0) * tgrid(len(pts))) * 0.5
        self.poly(np.concatenate([pts + nrm * w, (pts - nrm * w)[::-1]]), fill)

    def closed_line(self, pts: np.ndarray, fill, width: float) -> None:
        xy = self._xy(np.concatenate([pts, pts[:1]]))
        self.draw.line(xy, fill=fill, width=max(1, int(round(width * self.k))), joint="curve")


def face_contour(W, yc, Ht, Hb, sq, taper, n=64) -> np.ndarray:
    """Head outline: round skull on top, superellipse jaw below (sq>2 -> squarer jaw,
    taper -> narrower, more pointed chin)."""
    c, s = unit(n)
    x = W * c * (1 - 0.06 * s * s)
    y = yc + Ht * s
    low = s > 0
    e = 2.0 / sq
    cl, sl = c[low], s[low]
    x[low] = W * np.sign(cl) * np.abs(cl) ** e * (1 - taper * sl * sl)
    y[low] = yc + Hb * sl ** e
    return np.stack([x, y], axis=1)


def background(r: random.Random, kind: str, s_px: int, shadow: tuple | None) -> Image.Image:
    """Backgrounds are built on a 32x32 canvas, blurred there and upscaled: cheap, and the blur
    gives both out-of-focus blobs and a soft cast shadow of the head (``shadow`` = centre and
    radii in frame units) without any full-resolution filtering."""
    def rand_col():
        if r.random() < 0.3:  # neutral greys/beiges, common in portraits
            v = r.uniform(0.25, 0.95)
            return hsv(r.random(), r.uniform(0, 0.12), v)
        return hsv(r.random(), r.uniform(0.15, 0.7), r.uniform(0.3, 0.95))

    n = 32
    small = Image.new("RGB", (n, n), rand_col())
    d = ImageDraw.Draw(small, "RGBA")
    if kind == "gradient":
        c0, c1 = rand_col(), rand_col()
        for i in range(n):
            d.line((0, i, n, i), fill=mix(c0, c1, i / (n - 1)))
    elif kind == "blobs":
        for _ in range(r.randint(3, 6)):
            x, y, rad = r.uniform(0, n), r.uniform(0, n), r.uniform(4, 12)
            d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=rand_col())
    if shadow is not None:
        cx, cy, rx, ry = (v * n for v in shadow)
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(0, 0, 0, r.randint(40, 90)))
    small = small.filter(ImageFilter.GaussianBlur(3.0 if kind == "blobs" else 2.0))
    return small.resize((s_px, s_px), Image.BILINEAR)  # bilinear: ~30% cheaper than bicubic here
