"""The attributes of one synthetic face, drawn from its own random stream.

Correlations (age -> grey hair, skin -> eye colour, ...) mimic the rough co-occurrence
statistics of real portraits. The functions run in a fixed order and each draws its random
numbers in a fixed order: the images of a seed depend on it.
"""

from __future__ import annotations

import random
from typing import Any

from .palette import (
    DYED_HAIR,
    EYE_COLORS,
    FACE_SHAPES,
    HAIR_STYLES,
    NATURAL_HAIR,
    SKIN_TONES,
    jitter,
    shade,
    skin_color,
)


def sample_attributes(r: random.Random) -> dict[str, Any]:
    """Draw all attributes of one face; keys starting with ``_`` are for drawing only."""
    a: dict[str, Any] = {}
    a["age_group"] = r.choices(("child", "adult", "old"), (0.15, 0.65, 0.20))[0]
    masc = r.random() < 0.5  # hidden: only used to correlate beards vs. lipstick/earrings
    a["_masc"] = masc
    t = r.random() ** 0.9
    _sample_skin_and_shape(r, a, t)
    _sample_hair(r, a, dark=t > 0.55)
    _sample_features(r, a, t)
    _sample_extras(r, a, t)
    _sample_pose(r, a)
    return a


def _sample_skin_and_shape(r: random.Random, a: dict[str, Any], t: float) -> None:
    child, masc = a["age_group"] == "child", a["_masc"]
    a["skin_tone"] = SKIN_TONES[min(len(SKIN_TONES) - 1, int(t * len(SKIN_TONES)))]
    base = skin_color(t)
    under = r.uniform(-1, 1)  # warm/yellow vs. pink/olive undertone
    skin = jitter(r, (base[0] + 4 * under, base[1] + 2 * abs(under) - 2, base[2] - 5 * under), 5)
    a["skin_rgb"] = list(skin)

    shape = r.choice(tuple(FACE_SHAPES))
    a["face_shape"] = shape
    W, Hb, sq, taper = FACE_SHAPES[shape]
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


def _sample_hair(r: random.Random, a: dict[str, Any], dark: bool) -> None:
    child, old, masc = a["age_group"] == "child", a["age_group"] == "old", a["_masc"]
    if old and r.random() < 0.75:
        hc = r.choice(("grey", "grey", "white", "platinum"))
    elif r.random() < (0.16 if not child else 0.04):
        hc = r.choice(tuple(DYED_HAIR))
    else:
        names = ("black", "dark_brown", "brown", "light_brown", "blond", "platinum", "red",
                 "auburn")
        w = (6, 4, 2, 0.5, 0.3, 0.1, 0.2, 0.3) if dark else (1.5, 3, 3, 2, 2.2, 0.5, 0.9, 1)
        hc = r.choices(names, w)[0]
    a["hair_color"] = hc
    a["dyed_hair"] = hc in DYED_HAIR
    # Vary brightness mostly (keeps greys grey) plus a little per-channel jitter.
    hair = jitter(r, shade(NATURAL_HAIR.get(hc) or DYED_HAIR[hc], r.uniform(0.85, 1.15)), 5)
    a["hair_rgb"] = list(hair)

    if masc:
        sw = (0.9 if old else 0.25, 1.0, 3.0, 1.6, 0.8, 0.1, 0.2, 0.1, 0.2, 0.9, 0.5)
    else:
        sw = (0.05, 0.1, 0.6, 0.8, 0.8, 1.6, 3.0, 1.6, 1.1, 1.0, 0.5)
    a["hair_style"] = r.choices(HAIR_STYLES, sw)[0]


def _sample_features(r: random.Random, a: dict[str, Any], t: float) -> None:
    """Eyes, brows, nose and mouth."""
    child, old, masc = a["age_group"] == "child", a["age_group"] == "old", a["_masc"]
    W = a["_geom"][0]
    if t > 0.55:
        ew_ = (6, 4, 1, 0.2, 0.1, 0.1)
    else:
        ew_ = (1.5, 2.5, 1.5, 1.2, 2.2, 0.8)
    a["eye_color"] = r.choices(tuple(EYE_COLORS), ew_)[0]
    a["eye_size"] = round(r.uniform(0.043, 0.056) * (1.15 if child else 1.0), 4)
    a["eye_spacing"] = round(r.uniform(0.112, 0.135) * (W / 0.265), 4)
    a["brow_thickness"] = round(r.uniform(0.008, 0.018) * (1.15 if masc else 0.85), 4)
    a["brow_angle"] = round(r.uniform(-0.012, 0.014), 4)  # >0: inner end lower (stern)
    a["nose_width"] = round(r.uniform(0.026, 0.046) * (0.8 if child else 1.0) * (1 + 0.25 * t),
                            4)
    a["nose_length"] = round(r.uniform(0.085, 0.12) * (0.8 if child else 1.0), 4)
    a["mouth_width"] = round(r.uniform(0.055, 0.082) * (0.85 if child else 1.0), 4)
    a["lip_fullness"] = round(r.uniform(0.6, 1.25) * (0.8 if old else 1.0) * (1 + 0.3 * t), 4)
    a["expression"] = r.choices(("neutral", "smile", "grin", "open_mouth"), (3, 3, 2, 0.8))[0]


def _sample_extras(r: random.Random, a: dict[str, Any], t: float) -> None:
    """Make-up, glasses, beard, age cues, freckles, earrings and the background kind."""
    child, old, masc = a["age_group"] == "child", a["age_group"] == "old", a["_masc"]
    a["lipstick"] = (not masc) and not child and r.random() < 0.35
    a["glasses"] = r.random() < (0.1 if child else 0.3 if not old else 0.5)
    a["glasses_style"] = r.choice(("round", "rect")) if a["glasses"] else None
    a["glasses_tinted"] = bool(a["glasses"] and r.random() < 0.3)
    if masc and not child and r.random() < 0.45:
        a["beard"] = True
        a["beard_style"] = r.choices(("stubble", "moustache", "goatee", "full"),
                                     (3, 1, 1.3, 2.5))[0]
    else:
        a["beard"] = False
        a["beard_style"] = "none"
    a["wrinkles"] = old or (not child and r.random() < 0.1)
    a["freckles"] = ((t < 0.35 and r.random() < 0.3)
                     or (a["hair_color"] in ("red", "auburn") and r.random() < 0.5))
    a["earrings"] = (not masc) and r.random() < 0.4
    a["background"] = r.choices(("flat", "gradient", "blobs"), (1, 1, 1.2))[0]


def _sample_pose(r: random.Random, a: dict[str, Any]) -> None:
    """Small roll/shift/scale jitter, a fake yaw and the side the light comes from."""
    a["roll_degrees"] = round(r.uniform(-7.0, 7.0), 3)
    a["shift_x"] = round(r.uniform(-0.03, 0.03), 4)
    a["shift_y"] = round(r.uniform(-0.025, 0.025), 4)
    a["scale"] = round(r.uniform(0.97, 1.1), 4)
    a["yaw"] = round(r.uniform(-1.0, 1.0), 3)  # fake yaw: features slide sideways a little
    a["light_side"] = r.choice(("left", "right"))
