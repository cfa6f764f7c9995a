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
* Image ``i`` of seed ``S`` uses its own RNG seeded from ``(S, i)``; images therefore do not depend
  on how many are generated or in which order, and a dataset can be produced in parallel chunks.

Measured speed on the 2-core CPU box (one core, ``taskset -c 0``, 128 px, Pillow 13, numpy 2.4,
other jobs running on the box): rendering only ~330 images/s (~3 ms/image; 240-335 across runs);
rendering plus PNG writing (``compress_level=1``) ~240 images/s.
"""

from __future__ import annotations

import colorsys
import json
import math
import operator
import pathlib
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["render_face", "generate_faces", "face_batch", "SKIN_TONES", "HAIR_COLORS"]

# ----------------------------------------------------------------------------------------------
# Palettes
# ----------------------------------------------------------------------------------------------

# Skin: a piecewise-linear ramp from very light to very dark.  Sampling a continuous position
# on the ramp (plus a small undertone shift) gives a wide, realistic range instead of a handful
# of flat presets.  Named bins are only used for the metadata.
_SKIN_RAMP = [
    (0.00, (255, 229, 210)),
    (0.15, (246, 206, 180)),
    (0.30, (234, 186, 152)),
    (0.45, (212, 158, 120)),
    (0.60, (180, 124, 88)),
    (0.75, (141, 92, 62)),
    (0.88, (104, 67, 45)),
    (1.00, (68, 44, 32)),
]
SKIN_TONES = ("very_light", "light", "medium", "tan", "brown", "dark")

# Natural colours first, dyed colours last; "dyed_hair" in the metadata is derived from this split.
_NATURAL_HAIR = {
    "black": (24, 20, 19),
    "dark_brown": (55, 37, 27),
    "brown": (98, 64, 40),
    "light_brown": (145, 104, 66),
    "blond": (216, 182, 116),
    "platinum": (236, 224, 196),
    "red": (168, 70, 32),
    "auburn": (116, 44, 28),
    "grey": (142, 140, 138),
    "white": (226, 224, 220),
}
_DYED_HAIR = {
    "blue": (46, 96, 206),
    "pink": (238, 116, 176),
    "green": (52, 164, 96),
    "purple": (124, 64, 176),
}
HAIR_COLORS = tuple(_NATURAL_HAIR) + tuple(_DYED_HAIR)

_EYE_COLORS = {
    "dark_brown": (58, 34, 22),
    "brown": (104, 62, 32),
    "hazel": (128, 102, 52),
    "green": (78, 124, 72),
    "blue": (72, 124, 186),
    "grey": (122, 132, 142),
}

_HAIR_STYLES = ("bald", "buzz", "short", "side_part", "fringe", "bob", "long", "long_fringe",
                "bun", "curly", "afro")

_FACE_SHAPES = {
    # name: (half width W, lower half-height Hb, jaw squareness exponent, chin taper)
    "oval": (0.255, 0.360, 2.0, 0.18),
    "round": (0.285, 0.330, 2.1, 0.06),
    "long": (0.240, 0.385, 2.2, 0.15),
    "square": (0.275, 0.350, 3.0, 0.10),
    "heart": (0.268, 0.360, 1.9, 0.32),
}

_CLOTHES = [
    (30, 30, 34), (235, 235, 235), (40, 60, 110), (120, 30, 40), (60, 90, 60), (150, 150, 155),
    (200, 170, 120), (90, 60, 110), (200, 80, 60), (70, 130, 170), (230, 200, 80), (20, 40, 70),
]

_UNIT_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_T_CACHE: dict[int, np.ndarray] = {}


def _unit(n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables for an n-gon, cached because they are reused for every ellipse."""
    tab = _UNIT_CACHE.get(n)
    if tab is None:
        a = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        tab = (np.cos(a), np.sin(a))
        _UNIT_CACHE[n] = tab
    return tab


def _tgrid(n: int) -> np.ndarray:
    t = _T_CACHE.get(n)
    if t is None:
        t = np.linspace(0.0, 1.0, n)[:, None]
        _T_CACHE[n] = t
    return t


def _bez(p0, p1, p2, n: int = 10) -> np.ndarray:
    """Quadratic Bezier curve as an (n, 2) array; the control point p1 is reached at half weight."""
    t = _tgrid(n)
    p0, p1, p2 = np.asarray(p0, float), np.asarray(p1, float), np.asarray(p2, float)
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2


def _mix(c1, c2, t: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2))


def _shade(c, f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(round(v * f)))) for v in c)


def _rgba(c, a: float) -> tuple[int, int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]), max(0, min(255, int(a))))


def _jitter(r: random.Random, c, amount: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(round(v + r.uniform(-amount, amount))))) for v in c)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(x * 255)) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


# ----------------------------------------------------------------------------------------------
# Drawing helper: one affine transform from face coordinates to canvas pixels
# ----------------------------------------------------------------------------------------------


class _Painter:
    """Draws polygons given in face coordinates (unit = frame size, origin = frame centre)."""

    def __init__(self, img: Image.Image, scale: float, roll_deg: float, dx: float, dy: float):
        self.draw = ImageDraw.Draw(img, "RGBA")  # "RGBA" mode: alpha fills blend onto the RGB image
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
        c, s = _unit(n)
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
        w = (w0 + (w1 - w0) * _tgrid(len(pts))) * 0.5
        self.poly(np.concatenate([pts + nrm * w, (pts - nrm * w)[::-1]]), fill)

    def closed_line(self, pts: np.ndarray, fill, width: float) -> None:
        xy = self._xy(np.concatenate([pts, pts[:1]]))
        self.draw.line(xy, fill=fill, width=max(1, int(round(width * self.k))), joint="curve")


# ----------------------------------------------------------------------------------------------
# Attribute sampling
# ----------------------------------------------------------------------------------------------


def _skin_color(t: float) -> tuple[int, int, int]:
    for (t0, c0), (t1, c1) in zip(_SKIN_RAMP, _SKIN_RAMP[1:]):
        if t <= t1:
            return _mix(c0, c1, (t - t0) / (t1 - t0))
    return _SKIN_RAMP[-1][1]


def _sample(r: random.Random) -> dict[str, Any]:
    """Draw all attributes of one face.  Correlations (age -> grey hair, skin -> eye colour, ...)
    mimic the rough co-occurrence statistics of real portraits."""
    a: dict[str, Any] = {}
    a["age_group"] = r.choices(("child", "adult", "old"), (0.15, 0.65, 0.20))[0]
    masc = r.random() < 0.5  # hidden: only used to correlate beards vs. lipstick/earrings
    child, old = a["age_group"] == "child", a["age_group"] == "old"

    t = r.random() ** 0.9
    a["skin_tone"] = SKIN_TONES[min(len(SKIN_TONES) - 1, int(t * len(SKIN_TONES)))]
    base = _skin_color(t)
    under = r.uniform(-1, 1)  # warm/yellow vs. pink/olive undertone
    skin = _jitter(r, (base[0] + 4 * under, base[1] + 2 * abs(under) - 2, base[2] - 5 * under), 5)
    a["skin_rgb"] = list(skin)

    shape = r.choice(tuple(_FACE_SHAPES))
    a["face_shape"] = shape
    W, Hb, sq, taper = _FACE_SHAPES[shape]
    W += r.uniform(-0.015, 0.015)
    Hb += r.uniform(-0.015, 0.015)
    if child:  # rounder, shorter lower face
        W, Hb, sq, taper = W * 1.04, Hb * 0.88, min(sq, 2.1), taper * 0.6
    if masc and not child:
        W += 0.008
        sq += 0.3
    a["face_width"] = round(2 * W, 4)
    a["face_height"] = round(0.36 + Hb, 4)
    a["_geom"] = (W, Hb, sq, taper)

    # Hair colour
    dark = t > 0.55
    if old and r.random() < 0.75:
        hc = r.choice(("grey", "grey", "white", "platinum"))
    elif r.random() < (0.16 if not child else 0.04):
        hc = r.choice(tuple(_DYED_HAIR))
    else:
        names = ("black", "dark_brown", "brown", "light_brown", "blond", "platinum", "red", "auburn")
        w = (6, 4, 2, 0.5, 0.3, 0.1, 0.2, 0.3) if dark else (1.5, 3, 3, 2, 2.2, 0.5, 0.9, 1)
        hc = r.choices(names, w)[0]
    a["hair_color"] = hc
    a["dyed_hair"] = hc in _DYED_HAIR
    # Vary brightness mostly (keeps greys grey) plus a little per-channel jitter.
    hair = _jitter(r, _shade(_NATURAL_HAIR.get(hc) or _DYED_HAIR[hc], r.uniform(0.85, 1.15)), 5)
    a["hair_rgb"] = list(hair)

    if masc:
        sw = (0.9 if old else 0.25, 1.0, 3.0, 1.6, 0.8, 0.1, 0.2, 0.1, 0.2, 0.9, 0.5)
    else:
        sw = (0.05, 0.1, 0.6, 0.8, 0.8, 1.6, 3.0, 1.6, 1.1, 1.0, 0.5)
    a["hair_style"] = r.choices(_HAIR_STYLES, sw)[0]

    # Eyes
    if dark:
        ew_ = (6, 4, 1, 0.2, 0.1, 0.1)
    else:
        ew_ = (1.5, 2.5, 1.5, 1.2, 2.2, 0.8)
    a["eye_color"] = r.choices(tuple(_EYE_COLORS), ew_)[0]
    a["eye_size"] = round(r.uniform(0.043, 0.056) * (1.15 if child else 1.0), 4)
    a["eye_spacing"] = round(r.uniform(0.112, 0.135) * (W / 0.265), 4)
    a["brow_thickness"] = round(r.uniform(0.008, 0.018) * (1.15 if masc else 0.85), 4)
    a["brow_angle"] = round(r.uniform(-0.012, 0.014), 4)  # >0: inner end lower (stern)
    a["nose_width"] = round(r.uniform(0.026, 0.046) * (0.8 if child else 1.0) * (1 + 0.25 * t), 4)
    a["nose_length"] = round(r.uniform(0.085, 0.12) * (0.8 if child else 1.0), 4)
    a["mouth_width"] = round(r.uniform(0.055, 0.082) * (0.85 if child else 1.0), 4)
    a["lip_fullness"] = round(r.uniform(0.6, 1.25) * (0.8 if old else 1.0) * (1 + 0.3 * t), 4)
    a["expression"] = r.choices(("neutral", "smile", "grin", "open_mouth"), (3, 3, 2, 0.8))[0]
    a["lipstick"] = (not masc) and not child and r.random() < 0.35
    a["glasses"] = r.random() < (0.1 if child else 0.3 if not old else 0.5)
    a["glasses_style"] = r.choice(("round", "rect")) if a["glasses"] else None
    a["glasses_tinted"] = bool(a["glasses"] and r.random() < 0.3)
    if masc and not child and r.random() < 0.45:
        a["beard"] = True
        a["beard_style"] = r.choices(("stubble", "moustache", "goatee", "full"), (3, 1, 1.3, 2.5))[0]
    else:
        a["beard"] = False
        a["beard_style"] = "none"
    a["wrinkles"] = old or (not child and r.random() < 0.1)
    a["freckles"] = (t < 0.35 and r.random() < 0.3) or (hc in ("red", "auburn") and r.random() < 0.5)
    a["earrings"] = (not masc) and r.random() < 0.4
    a["background"] = r.choices(("flat", "gradient", "blobs"), (1, 1, 1.2))[0]
    a["roll_degrees"] = round(r.uniform(-7.0, 7.0), 3)
    a["shift_x"] = round(r.uniform(-0.03, 0.03), 4)
    a["shift_y"] = round(r.uniform(-0.025, 0.025), 4)
    a["scale"] = round(r.uniform(0.97, 1.1), 4)
    a["yaw"] = round(r.uniform(-1.0, 1.0), 3)  # fake yaw: features slide sideways a little
    a["light_side"] = r.choice(("left", "right"))
    a["_masc"] = masc
    return a


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _background(r: random.Random, kind: str, s_px: int, shadow: tuple | None) -> Image.Image:
    """Backgrounds are built on a 32x32 canvas, blurred there and upscaled: cheap, and the blur
    gives both out-of-focus blobs and a soft cast shadow of the head (``shadow`` = centre and
    radii in frame units) without any full-resolution filtering."""
    def rand_col():
        if r.random() < 0.3:  # neutral greys/beiges, common in portraits
            v = r.uniform(0.25, 0.95)
            return _hsv(r.random(), r.uniform(0, 0.12), v)
        return _hsv(r.random(), r.uniform(0.15, 0.7), r.uniform(0.3, 0.95))

    n = 32
    small = Image.new("RGB", (n, n), rand_col())
    d = ImageDraw.Draw(small, "RGBA")
    if kind == "gradient":
        c0, c1 = rand_col(), rand_col()
        for i in range(n):
            d.line((0, i, n, i), fill=_mix(c0, c1, i / (n - 1)))
    elif kind == "blobs":
        for _ in range(r.randint(3, 6)):
            x, y, rad = r.uniform(0, n), r.uniform(0, n), r.uniform(4, 12)
            d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=rand_col())
    if shadow is not None:
        cx, cy, rx, ry = (v * n for v in shadow)
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(0, 0, 0, r.randint(40, 90)))
    small = small.filter(ImageFilter.GaussianBlur(3.0 if kind == "blobs" else 2.0))
    return small.resize((s_px, s_px), Image.BILINEAR)  # bilinear: ~30% cheaper than bicubic here


def _face_contour(W, yc, Ht, Hb, sq, taper, n=64) -> np.ndarray:
    """Head outline: round skull on top, superellipse jaw below (sq>2 -> squarer jaw,
    taper -> narrower, more pointed chin)."""
    c, s = _unit(n)
    x = W * c * (1 - 0.06 * s * s)
    y = yc + Ht * s
    low = s > 0
    e = 2.0 / sq
    cl, sl = c[low], s[low]
    x[low] = W * np.sign(cl) * np.abs(cl) ** e * (1 - taper * sl * sl)
    y[low] = yc + Hb * sl ** e
    return np.stack([x, y], axis=1)


def _draw_face(img: Image.Image, r: random.Random, a: dict[str, Any]) -> None:
    P = _Painter(img, a["scale"], a["roll_degrees"], a["shift_x"], a["shift_y"])
    W, Hb, sq, taper = a["_geom"]
    child, old, masc = a["age_group"] == "child", a["age_group"] == "old", a["_masc"]
    L = -1.0 if a["light_side"] == "left" else 1.0  # +x side is lit when L = +1
    skin = tuple(a["skin_rgb"])
    skin_sh = _mix(_shade(skin, 0.78), (90, 40, 40), 0.06)  # shadows are darker and slightly redder
    skin_hi = _mix(skin, (255, 245, 235), 0.22)
    hair = tuple(a["hair_rgb"])
    hair_dk = _shade(hair, 0.62)
    hair_hi = _mix(hair, (255, 250, 240), 0.3)
    style = a["hair_style"]
    yaw = a["yaw"]

    yc = -0.02
    Ht = 0.37 if child else 0.355
    chin = yc + Hb
    ey = -0.07 + r.uniform(-0.008, 0.008) + (0.012 if child else 0.0)
    ew = a["eye_size"]
    eh = ew * (r.uniform(0.6, 0.72) if child else r.uniform(0.42, 0.6))
    esp = a["eye_spacing"]
    ny = ey + a["nose_length"] + 0.075
    my = min(ny + r.uniform(0.085, 0.11), chin - 0.1)
    mw = a["mouth_width"]
    fx = yaw * 0.02  # features shift with fake yaw; the nose shifts most
    long_hair = style in ("long", "long_fringe", "bob")
    curly = style in ("curly", "afro")

    # ---- hair behind the head (long styles, afro, bun)
    hair_th = {"bald": 0.0, "buzz": 0.008, "short": r.uniform(0.025, 0.05),
               "side_part": r.uniform(0.03, 0.055), "fringe": r.uniform(0.03, 0.05),
               "bob": r.uniform(0.04, 0.06), "long": r.uniform(0.035, 0.06),
               "long_fringe": r.uniform(0.035, 0.06), "bun": 0.015,
               "curly": r.uniform(0.06, 0.085), "afro": r.uniform(0.11, 0.15)}[style]
    if long_hair:
        length = {"bob": r.uniform(0.16, 0.26)}.get(style, r.uniform(0.35, 0.62))
        spread = r.uniform(0.03, 0.08)
        top = _bez((-W - hair_th, yc), (0, yc - 2 * (Ht + hair_th) - 0.02), (W + hair_th, yc), 16)
        right = _bez((W + hair_th, yc), (W + hair_th + spread, (yc + length) / 2),
                     (W + hair_th + spread * 0.6, length), 8)
        bottom = np.stack([np.linspace(W + hair_th + spread * 0.6, -W - hair_th - spread * 0.6, 9),
                           length + 0.02 * np.sin(np.arange(9) * 2.1)], axis=1)
        left = right[::-1] * [-1, 1]
        P.poly(np.concatenate([top, right, bottom, left]), hair_dk)
    if style == "afro":
        R = W + hair_th
        P.ellipse(0, yc - 0.05, R, Ht + hair_th + 0.02, hair_dk)
        for k in range(18):
            ang = math.pi * (0.85 + 1.3 * k / 17)
            P.ellipse(R * math.cos(ang), yc - 0.05 + (Ht + hair_th) * math.sin(ang), 0.05, 0.05, hair_dk)
    if style == "bun":
        by_ = yc - Ht - 0.06
        P.ellipse(0, by_, 0.085, 0.075, hair_dk)
        P.ellipse(-L * 0.01, by_ - 0.005, 0.07, 0.06, hair)

    # ---- neck and clothing
    neck_w = W * (0.45 if child else 0.52 if not masc else 0.6)
    # Neck: darkest right under the jaw, lightening downwards in a few steps (a cheap ramp that
    # the downsampling softens), narrower on the shadow side's edge.
    for y0, f in ((yc + 0.12, 0.66), (chin + 0.02, 0.74), (chin + 0.045, 0.82), (chin + 0.07, 0.88)):
        P.poly(np.array([[-neck_w, y0], [neck_w, y0], [neck_w * 1.05, 0.7], [-neck_w * 1.05, 0.7]]),
               _shade(skin, f))
    P.poly(np.array([[-L * neck_w, yc + 0.12], [-L * neck_w * 0.7, yc + 0.12], [-L * neck_w * 0.75, 0.7],
                     [-L * neck_w * 1.05, 0.7]]), _rgba(skin_sh, 90))
    cloth = _jitter(r, r.choice(_CLOTHES), 20)
    sh_top = chin + r.uniform(0.05, 0.08)
    shoulders = P.ellipse_pts(0, sh_top + 0.26, r.uniform(0.6, 0.75), 0.28)
    P.poly(shoulders, cloth)
    P.ellipse(-L * 0.35, sh_top + 0.3, 0.35, 0.3, _rgba(_shade(cloth, 0.6), 110))
    neckline = r.choice(("round", "v", "collar"))
    if neckline == "round":
        P.ellipse(0, sh_top, neck_w * 1.2, 0.045, _shade(skin, 0.85))
    elif neckline == "v":
        P.poly(np.array([[-neck_w * 1.25, sh_top - 0.02], [neck_w * 1.25, sh_top - 0.02],
                         [0, sh_top + 0.1]]), _shade(skin, 0.85))
    else:
        P.poly(np.array([[-neck_w * 1.05, sh_top - 0.02], [neck_w * 1.05, sh_top - 0.02],
                         [0, sh_top + 0.05]]), _shade(skin, 0.85))
        collar = _jitter(r, (238, 238, 236), 10)
        for sgn in (-1, 1):
            P.poly(np.array([[sgn * neck_w * 1.1, sh_top - 0.035], [sgn * 0.01, sh_top + 0.055],
                             [sgn * neck_w * 2.0, sh_top + 0.05]]), collar)

    # ---- long-hair locks falling over the shoulders (in front of clothes, behind the face)
    if long_hair:
        for sgn in (-1, 1):
            lock = np.concatenate([
                _bez((sgn * W * 0.8, ey), (sgn * (W + hair_th + 0.05), yc + 0.15),
                     (sgn * (W + hair_th + spread * 0.5), length), 8),
                _bez((sgn * (W * 0.55), length - 0.02), (sgn * W * 0.85, yc + 0.2), (sgn * W * 0.7, ey), 8),
            ])
            P.poly(lock, hair if sgn == L else _shade(hair, 0.85))

    # ---- ears (hidden under long hair and afro)
    ear_y = ey + 0.035
    if not long_hair and style != "afro":
        ec = r.choice(((212, 175, 70), (205, 205, 215)))
        for sgn in (-1, 1):
            ex_ = sgn * (W * 0.99)
            P.ellipse(ex_, ear_y, 0.034, 0.064, skin if sgn == L else skin_sh, rot=-sgn * 0.15)
            P.ellipse(ex_ + sgn * 0.008, ear_y, 0.018, 0.04, _rgba(_shade(skin, 0.7), 110), rot=-sgn * 0.15)
            if a["earrings"]:
                P.ellipse(ex_ + sgn * 0.006, ear_y + 0.07, 0.011, 0.011, ec)

    # ---- face with simple shading: shadow-coloured outline, then lit layers inset towards light
    cont = _face_contour(W, yc, Ht, Hb, sq, taper)
    P.poly(cont, skin_sh)
    centre = np.array([0.0, yc])
    for f, shift, col in ((0.975, 0.012, _mix(skin_sh, skin, 0.5)), (0.95, 0.02, skin)):
        P.poly((cont - centre) * f + centre + [L * shift, -0.004], col)
    # broad highlight on the lit cheek and forehead
    P.ellipse(L * W * 0.35, yc - 0.05, W * 0.45, 0.2, _rgba(skin_hi, 45))
    P.ellipse(L * 0.02, yc - 0.2, W * 0.6, 0.08, _rgba(skin_hi, 40))

    # ---- beard / stubble below the features
    beard_col = _shade(tuple(a["hair_rgb"]) if not a["dyed_hair"] else (60, 42, 30), 0.85)
    bstyle = a["beard_style"]
    if bstyle in ("stubble", "full"):
        c, s = _unit(64)
        sel = s > 0.05
        outer = cont[sel] if bstyle == "stubble" else (cont[sel] - centre) * [1.03, 1.08] + centre
        inner = np.array([[-W * 0.9, ey + 0.11], [-(mw + 0.03), my - 0.035], [0, my - 0.04],
                          [mw + 0.03, my - 0.035], [W * 0.9, ey + 0.11]])
        if bstyle == "stubble":
            # two translucent layers, the second lower, so the upper edge fades instead of
            # looking like a mask
            P.poly(np.concatenate([outer, inner]), _rgba(beard_col, 22))
            P.poly(np.concatenate([outer, inner + [0, 0.03]]), _rgba(beard_col, 22))
        else:
            P.poly(np.concatenate([outer, inner]), _rgba(beard_col, 235))
            for _ in range(10):
                x0 = r.uniform(-W * 0.8, W * 0.8)
                P.stroke(_bez((x0, my + 0.02), (x0 * 1.05, my + 0.08), (x0 * 0.9, chin)), 0.006, 0.002,
                         _rgba(_shade(beard_col, 0.7), 90))

    # ---- age cues
    if a["wrinkles"]:
        wc = _rgba(_shade(skin, 0.65), 70 if old else 45)
        by0 = ey - eh - 0.06
        for i in range(r.randint(2, 3)):
            yy = by0 - 0.022 * i
            P.stroke(_bez((-W * 0.45, yy + 0.004), (0, yy - 0.01), (W * 0.45, yy + 0.004), 10), 0.004, 0.004, wc)
        for sgn in (-1, 1):
            ox = sgn * (esp + ew * 1.2)
            for j in (-1, 0, 1):
                P.stroke(np.array([[ox, ey + j * 0.012], [ox + sgn * 0.025, ey + j * 0.02]]), 0.003, 0.001, wc)
            P.stroke(_bez((sgn * esp - ew * 0.7, ey + eh + 0.02), (sgn * esp, ey + eh + 0.04),
                          (sgn * esp + ew * 0.7, ey + eh + 0.02), 8), 0.003, 0.003, wc)

    # ---- eyes
    eye_col = _jitter(r, _EYE_COLORS[a["eye_color"]], 10)
    squint = 0.75 if a["expression"] in ("smile", "grin") else 1.0
    tilt = r.uniform(-0.006, 0.012)
    gaze = yaw * 0.006 + r.uniform(-0.004, 0.004)
    lash = (28, 20, 18) if not (a["lipstick"] and r.random() < 0.7) else (10, 6, 6)
    for sgn in (-1, 1):
        ex = sgn * esp + fx
        inner_c = (ex - sgn * ew, ey + 0.003)
        outer_c = (ex + sgn * ew, ey - tilt)
        up = _bez(inner_c, (ex, ey - 2 * eh * squint), outer_c, 10)
        lo = _bez(outer_c, (ex + sgn * ew * 0.1, ey + 1.4 * eh * squint), inner_c, 10)
        P.ellipse(ex, ey - eh * 0.2, ew * 1.35, eh * 1.9, _rgba(skin_sh, 45))  # socket shadow
        P.poly(np.concatenate([up, lo]), _jitter(r, (238, 234, 228), 6))
        ir = min(ew * 0.45, eh * squint * 1.05)
        ix, iy = ex + gaze, ey - eh * 0.1
        P.ellipse(ix, iy, ir, ir, _shade(eye_col, 0.6))
        P.ellipse(ix, iy, ir * 0.8, ir * 0.8, eye_col)
        P.ellipse(ix, iy, ir * 0.42, ir * 0.42, (14, 10, 10))
        P.ellipse(ix - 0.3 * ir, iy - 0.35 * ir, ir * 0.22, ir * 0.22, _rgba((255, 255, 255), 220))
        P.stroke(up, 0.004, 0.009, lash)  # upper lid / lash line, heavier at the outer corner
        P.stroke(lo[2:-1], 0.002, 0.003, _rgba(_shade(skin, 0.6), 110))
        crease = up * [1, 1] + [0, -eh * 0.75]
        P.stroke(crease[1:-1], 0.003, 0.003, _rgba(_shade(skin, 0.62), 70))

    # ---- brows
    if a["hair_color"] in ("grey", "white", "platinum") or a["dyed_hair"]:
        brow_c = (95, 85, 78) if old else (70, 50, 36)
    elif a["hair_color"] == "blond":
        brow_c = (140, 108, 70)
    else:
        brow_c = _shade(hair, 0.9)
    bt = a["brow_thickness"]
    by = ey - eh * squint - r.uniform(0.028, 0.045)
    arch = r.uniform(0.006, 0.02)
    for sgn in (-1, 1):
        ex = sgn * esp + fx
        pts = _bez((ex - sgn * ew * 1.0, by + a["brow_angle"]), (ex + sgn * ew * 0.15, by - 2 * arch),
                   (ex + sgn * ew * 1.25, by + 0.01), 10)
        P.stroke(pts, bt, bt * 0.4, _rgba(brow_c, 235))

    # ---- nose
    nx = fx * 1.8
    nw = a["nose_width"]
    P.stroke(_bez((nx - L * 0.024, ey + 0.01), (nx - L * 0.03, (ey + ny) / 2), (nx - L * nw * 0.8, ny - 0.01), 8),
             0.01, 0.016, _rgba(skin_sh, 60))
    P.ellipse(nx, ny + 0.008, nw * 0.9, 0.013, _rgba(skin_sh, 80))
    for sgn in (-1, 1):
        P.stroke(_bez((nx + sgn * nw * 0.95, ny - 0.012), (nx + sgn * nw * 1.2, ny + 0.01),
                      (nx + sgn * nw * 0.45, ny + 0.014), 8), 0.004, 0.003, _rgba(_shade(skin, 0.6), 130))
        P.ellipse(nx + sgn * nw * 0.42, ny + 0.01, nw * 0.24, 0.007, _rgba(_shade(skin, 0.4), 150))
    P.ellipse(nx + L * 0.006, ny - 0.01, 0.011, 0.008, _rgba((255, 250, 245), 70))

    # ---- cheeks: blush (children, make-up) and freckles
    if child or a["lipstick"] or r.random() < 0.2:
        for sgn in (-1, 1):
            P.ellipse(sgn * W * 0.58 + fx, ny + 0.005, 0.055, 0.035, _rgba((230, 90, 100), r.randint(25, 55)))
    if a["freckles"]:
        fc = _rgba(_mix(skin, (120, 60, 30), 0.5), 110)
        for _ in range(r.randint(14, 30)):
            sgn = r.choice((-1, 1))
            P.ellipse(sgn * r.uniform(0.02, W * 0.7) + fx, r.uniform(ey + 0.04, ny + 0.03), 0.004, 0.004, fc)

    # ---- mouth
    expr = a["expression"]
    if a["lipstick"]:
        lip = _jitter(r, r.choice(((190, 30, 45), (215, 80, 110), (140, 30, 60), (200, 90, 80))), 12)
    else:
        lip = _mix(_shade(skin, 0.82), (170, 70, 80), 0.35)
    lip_dk = _shade(lip, 0.7)
    ful = a["lip_fullness"]
    mx = fx * 1.4
    if expr in ("smile", "grin") or a["wrinkles"]:
        a_fold = 70 if expr != "neutral" else 40
        for sgn in (-1, 1):
            P.stroke(_bez((mx + sgn * nw * 1.3, ny - 0.005), (mx + sgn * (mw + 0.01), my - 0.03),
                          (mx + sgn * (mw + 0.012), my + 0.01), 8), 0.005, 0.002, _rgba(skin_sh, a_fold))
    if expr == "neutral":
        ul, ll = 0.014 * ful, 0.02 * ful
        up_line = _bez((mx - mw, my), (mx, my + 0.004), (mx + mw, my), 9)
        upper = np.concatenate([up_line, np.array([[mx + mw * 0.35, my - ul], [mx, my - ul * 0.7],
                                                   [mx - mw * 0.35, my - ul]])])
        lower = np.concatenate([up_line, _bez((mx + mw, my), (mx, my + 2 * ll), (mx - mw, my), 9)])
        P.poly(lower, lip)
        P.poly(upper, lip_dk)
        P.stroke(up_line, 0.003, 0.003, _rgba(_shade(lip, 0.45), 200))
        P.ellipse(mx, my + ll * 0.6, mw * 0.35, ll * 0.25, _rgba((255, 240, 240), 50))  # lip sheen
    elif expr == "smile":
        cu = r.uniform(0.014, 0.026)
        line = _bez((mx - mw * 1.05, my - cu), (mx, my + cu * 1.2), (mx + mw * 1.05, my - cu), 11)
        ul, ll = 0.008 * ful, 0.016 * ful
        prof = np.sin(np.linspace(0, math.pi, 11))[:, None] * [0.0, 1.0]  # zero at the corners
        P.poly(np.concatenate([line, (line + prof * ll)[::-1]]), lip)
        P.poly(np.concatenate([line, (line - prof * ul)[::-1]]), lip_dk)
        P.stroke(line, 0.004, 0.004, _rgba(_shade(lip, 0.4), 210))
    else:
        cu = r.uniform(0.012, 0.022) if expr == "grin" else 0.0
        op = r.uniform(0.02, 0.03) if expr == "grin" else r.uniform(0.03, 0.045)
        w_ = mw * (1.05 if expr == "grin" else 0.75)
        upper_e = _bez((mx - w_, my - cu), (mx, my - (0.004 if expr == "grin" else op)), (mx + w_, my - cu), 12)
        lower_e = _bez((mx + w_, my - cu), (mx, my + 2 * op), (mx - w_, my - cu), 12)
        hole = np.concatenate([upper_e, lower_e])
        P.poly((hole - [mx, my]) * [1.06, 1.18] + [mx, my], lip)
        P.poly(hole, (62, 22, 26))
        tooth_h = (np.sin(np.linspace(0, math.pi, 12)) * (0.016 if expr == "grin" else 0.012))[:, None]
        teeth = np.concatenate([upper_e, (upper_e + np.hstack([np.zeros_like(tooth_h), tooth_h]))[::-1]])
        P.poly(teeth, _jitter(r, (242, 238, 228), 6))
        P.stroke(upper_e, 0.006 * ful, 0.006 * ful, lip_dk)

    # ---- moustache / goatee over the mouth area
    if bstyle in ("moustache", "goatee", "full"):
        mc = _rgba(beard_col, 240)
        P.poly(np.concatenate([
            _bez((mx - mw * 1.15, my + 0.01), (mx, my - 0.055), (mx + mw * 1.15, my + 0.01), 10),
            _bez((mx + mw * 1.0, my - 0.002), (mx, my - 0.02), (mx - mw * 1.0, my - 0.002), 10)]), mc)
    if bstyle == "goatee":
        P.poly(np.concatenate([
            _bez((mx - mw * 0.6, my + 0.025), (mx, my + 0.012), (mx + mw * 0.6, my + 0.025), 6),
            _bez((mx + mw * 0.7, my + 0.03), (mx, chin + 0.03), (mx - mw * 0.7, my + 0.03), 8)]),
            _rgba(beard_col, 230))

    # ---- hair on top of the head (cap), with hairline / fringe shapes
    if style != "bald":
        R_x, R_y = W + hair_th * 0.9 + 0.008, Ht + hair_th
        side_bot = {"buzz": ey - 0.02, "bun": ey - 0.02}.get(style, ey + 0.03)
        if style in ("long", "long_fringe", "bob"):
            side_bot = ey + 0.1
        # outer arc from right side over the top to the left side
        ang = np.linspace(0.08, -math.pi - 0.08, 24)
        outer = np.stack([R_x * np.cos(ang), yc - 0.01 + R_y * np.sin(ang)], axis=1)
        outer[0, 1] = outer[-1, 1] = side_bot
        hl = yc - Ht * (0.62 if not (old and masc) else 0.78) + r.uniform(-0.015, 0.015)
        fringe_p = {"fringe": 1.0, "long_fringe": 1.0, "bob": 0.5, "curly": 0.3}.get(style, 0.0)
        if r.random() < fringe_p:
            fy = by - r.uniform(0.0, 0.02)
            xs = np.linspace(-W * 0.95, W * 0.95, 15)
            ys = fy + 0.012 * (np.arange(15) % 2) + 0.05 * (xs / W) ** 4
            fringe = np.stack([xs, ys], axis=1)
        elif style == "side_part":
            part = r.choice((-1, 1)) * W * 0.35
            fringe = np.concatenate([
                _bez((-W * 0.95, hl + 0.08), (-W * 0.4, hl + 0.07 if part > 0 else hl + 0.13), (part, hl - 0.01), 8),
                _bez((part, hl - 0.01), (W * 0.5, hl + (0.13 if part < 0 else 0.07)), (W * 0.95, hl + 0.08), 8)[1:]])
        else:
            xs = np.linspace(-W * 0.92, W * 0.92, 13)
            fringe = np.stack([xs, hl + 0.07 * (xs / W) ** 2], axis=1)
        # The outer arc ends on the left, so the hairline runs left -> right; running it the other
        # way would add an edge straight across the face, which PIL rasterises as a visible line.
        inner = np.concatenate([[[-W * 0.97, side_bot]], fringe, [[W * 0.97, side_bot]]])
        cap = np.concatenate([outer, inner])
        if style == "buzz":
            P.poly(cap, _rgba(hair_dk, 170))
        else:
            P.poly(cap, hair_dk)
            P.poly((cap - centre) * [0.96, 0.98] + centre + [L * 0.012, 0.004], hair)
            # hair sheen on the lit side and a few strands for texture
            P.ellipse(L * W * 0.4, yc - Ht * 0.8, W * 0.3, 0.03, _rgba(hair_hi, 40), rot=L * 0.5)
            for _ in range(7):
                x0 = r.uniform(-W * 0.85, W * 0.85)
                P.stroke(_bez((x0, hl - 0.015), (x0 * 0.8, yc - Ht * 0.85), (x0 * 0.3, yc - Ht - hair_th * 0.6), 8),
                         0.005, 0.002, _rgba(hair_dk if r.random() < 0.6 else hair_hi, 70))
        if curly:
            n_c = 16 if style == "curly" else 20
            rad = hair_th * 0.6
            for k in range(n_c):
                t_ = -math.pi * (k / (n_c - 1)) - 0.05
                cxk, cyk = R_x * 0.97 * math.cos(t_), yc - 0.01 + R_y * 0.97 * math.sin(t_)
                P.ellipse(cxk, cyk, rad, rad, hair if (cxk * L) > 0 else _shade(hair, 0.8))
    elif not child:  # bald: scalp sheen, and often some hair left around the sides
        P.ellipse(L * W * 0.3, yc - Ht * 0.78, W * 0.3, 0.05, _rgba((255, 255, 255), 45), rot=L * 0.4)
        if r.random() < 0.6:
            for sgn in (-1, 1):  # fringe of hair left above the ears
                P.stroke(_bez((sgn * W * 0.93, ey - 0.11), (sgn * W * 1.06, ey - 0.05), (sgn * W * 0.99, ey + 0.03), 8),
                         0.035, 0.015, _rgba(hair, 220))

    # ---- glasses last: they sit in front of everything
    if a["glasses"]:
        frame = r.choice(((20, 20, 22), (90, 50, 30), (190, 160, 90), (180, 180, 190), (130, 30, 40)))
        fw = r.uniform(0.006, 0.011)
        tint = _rgba(r.choice(((20, 20, 25), (60, 40, 20), (30, 50, 90))), r.randint(150, 215))
        ends = []
        for sgn in (-1, 1):
            ex = sgn * esp + fx
            if a["glasses_style"] == "round":
                lens = P.ellipse_pts(ex, ey + 0.004, ew * 1.5, ew * 1.3)
            else:  # rounded rectangle as a superellipse
                c, s = _unit(40)
                rx_, ry_ = ew * 1.6, ew * 1.1
                lens = np.stack([ex + rx_ * np.sign(c) * np.abs(c) ** 0.4,
                                 ey + 0.006 + ry_ * np.sign(s) * np.abs(s) ** 0.4], axis=1)
            if a["glasses_tinted"]:
                P.poly(lens, tint)
            P.stroke(_bez((ex - ew * 0.8, ey - ew * 0.3), (ex - ew * 0.5, ey - ew * 0.1), (ex - ew * 0.2, ey + ew * 0.8), 6),
                     0.004, 0.002, _rgba((255, 255, 255), 60))  # reflection
            P.closed_line(lens, frame, fw)
            ends.append(lens)
        # bridge between the lenses and temple arms towards the ears
        li, ri = ends[0][np.argmax(ends[0][:, 0])], ends[1][np.argmin(ends[1][:, 0])]
        P.stroke(_bez(li - [0, 0.01], ((li[0] + ri[0]) / 2, ey - 0.02), ri - [0, 0.01], 6), fw, fw, frame)
        for lens, sgn in ((ends[0], -1), (ends[1], 1)):
            o = lens[np.argmax(sgn * lens[:, 0])]
            P.stroke(np.array([o - [0, 0.01], [sgn * W * 0.98, ey - 0.005]]), fw, fw, frame)


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
    attrs = _sample(r)
    ss = 2 if size >= 64 else 4  # supersampling factor; tiny images need more for smooth edges
    shadow = None
    if r.random() < 0.6:  # soft head shadow cast onto the wall, away from the light
        L = -1.0 if attrs["light_side"] == "left" else 1.0
        sc = attrs["scale"]
        shadow = (0.5 + attrs["shift_x"] - L * 0.07 * sc, 0.5 + attrs["shift_y"] + 0.04, 0.36 * sc, 0.5 * sc)
    canvas = _background(r, attrs["background"], size * ss, shadow)
    _draw_face(canvas, r, attrs)
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


def generate_faces(out_dir, num: int, size: int = 128, seed: int = 0, progress: bool = True) -> pathlib.Path:
    """Write ``out_dir/{index:06d}.png`` for ``index in range(num)`` plus ``out_dir/metadata.jsonl``.

    Each metadata line is ``{"file": "000000.png", "index": 0, "seed": S, **attributes}``.
    Creates ``out_dir`` (with parents).  Returns ``out_dir`` as a Path.
    """
    num, size, seed = _as_index(num, "num"), _as_index(size, "size"), _as_index(seed, "seed")
    if num <= 0:
        raise ValueError(f"num must be a positive number of images, got {num}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = pathlib.Path(out_dir)
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
    # Metadata is written last (and atomically via rename) so its presence means the set is complete.
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "metadata.jsonl")
    return out
