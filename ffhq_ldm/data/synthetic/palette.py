"""Colours of the synthetic faces: palettes and small colour helpers."""

from __future__ import annotations

import colorsys
import random

# Skin: a piecewise-linear ramp from very light to very dark.  Sampling a continuous position
# on the ramp (plus a small undertone shift) gives a wide, realistic range instead of a handful
# of flat presets.  Named bins are only used for the metadata.
SKIN_RAMP = [
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
NATURAL_HAIR = {
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
DYED_HAIR = {
    "blue": (46, 96, 206),
    "pink": (238, 116, 176),
    "green": (52, 164, 96),
    "purple": (124, 64, 176),
}
HAIR_COLORS = tuple(NATURAL_HAIR) + tuple(DYED_HAIR)

EYE_COLORS = {
    "dark_brown": (58, 34, 22),
    "brown": (104, 62, 32),
    "hazel": (128, 102, 52),
    "green": (78, 124, 72),
    "blue": (72, 124, 186),
    "grey": (122, 132, 142),
}

HAIR_STYLES = ("bald", "buzz", "short", "side_part", "fringe", "bob", "long", "long_fringe",
               "bun", "curly", "afro")

FACE_SHAPES = {
    # name: (half width W, lower half-height Hb, jaw squareness exponent, chin taper)
    "oval": (0.255, 0.360, 2.0, 0.18),
    "round": (0.285, 0.330, 2.1, 0.06),
    "long": (0.240, 0.385, 2.2, 0.15),
    "square": (0.275, 0.350, 3.0, 0.10),
    "heart": (0.268, 0.360, 1.9, 0.32),
}

CLOTHES = [
    (30, 30, 34), (235, 235, 235), (40, 60, 110), (120, 30, 40), (60, 90, 60), (150, 150, 155),
    (200, 170, 120), (90, 60, 110), (200, 80, 60), (70, 130, 170), (230, 200, 80), (20, 40, 70),
]


def mix(c1, c2, t: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2, strict=False))


def shade(c, f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(round(v * f)))) for v in c)


def rgba(c, a: float) -> tuple[int, int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]), max(0, min(255, int(a))))


def jitter(r: random.Random, c, amount: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(round(v + r.uniform(-amount, amount))))) for v in c)


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(x * 255)) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


def skin_color(t: float) -> tuple[int, int, int]:
    """The skin ramp's colour at position ``t`` in [0, 1]."""
    for (t0, c0), (t1, c1) in zip(SKIN_RAMP, SKIN_RAMP[1:], strict=False):
        if t <= t1:
            return mix(c0, c1, (t - t0) / (t1 - t0))
    return SKIN_RAMP[-1][1]
