"""The face painters: one function per feature, drawn back to front.

``draw_face`` lays the face out (``Face``: positions and colours shared by several painters)
and calls the painters in a fixed order. Painters that take ``r`` draw random numbers; the order
of the painters and of the draws inside each is what makes an image depend only on its seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .painter import Painter, bez, face_contour, unit
from .palette import CLOTHES, EYE_COLORS, jitter, mix, rgba, shade


@dataclass
class Face:
    """Layout of one face in face coordinates (unit = frame size, origin = frame centre)."""

    P: Painter
    a: dict[str, Any]
    W: float  # half width of the face
    Hb: float  # lower half-height (centre to chin)
    Ht: float  # upper half-height (centre to crown)
    yc: float  # vertical centre of the head
    chin: float
    child: bool
    old: bool
    masc: bool
    L: float  # +1: the +x side is lit, -1: the -x side
    skin: tuple
    skin_sh: tuple
    skin_hi: tuple
    hair: tuple
    hair_dk: tuple
    hair_hi: tuple
    style: str
    ey: float  # eye line
    ew: float  # eye half width
    eh: float  # eye half height
    esp: float  # eye offset from the centre line
    ny: float  # nose tip
    my: float  # mouth line
    mw: float  # mouth half width
    nw: float  # nose half width
    fx: float  # sideways shift of the features (fake yaw)
    hair_th: float  # hair thickness over the skull
    long_hair: bool
    contour: np.ndarray
    centre: np.ndarray
    beard_col: tuple
    squint: float
    length: float = 0.0  # long hair: how far down it falls (set by paint_hair_back)
    spread: float = 0.0  # long hair: how far it flares out (set by paint_hair_back)
    brow_y: float = 0.0  # set by paint_brows; the fringe starts there


def layout(P: Painter, r: random.Random, a: dict[str, Any]) -> Face:
    W, Hb, sq, taper = a["_geom"]
    child, old = a["age_group"] == "child", a["age_group"] == "old"
    skin, hair, style = tuple(a["skin_rgb"]), tuple(a["hair_rgb"]), a["hair_style"]
    yc = -0.02
    Ht = 0.37 if child else 0.355
    chin = yc + Hb
    ey = -0.07 + r.uniform(-0.008, 0.008) + (0.012 if child else 0.0)
    ew = a["eye_size"]
    eh = ew * (r.uniform(0.6, 0.72) if child else r.uniform(0.42, 0.6))
    ny = ey + a["nose_length"] + 0.075
    my = min(ny + r.uniform(0.085, 0.11), chin - 0.1)
    # Every entry is drawn, whatever the style: the random stream must not depend on it.
    hair_th = {"bald": 0.0, "buzz": 0.008, "short": r.uniform(0.025, 0.05),
               "side_part": r.uniform(0.03, 0.055), "fringe": r.uniform(0.03, 0.05),
               "bob": r.uniform(0.04, 0.06), "long": r.uniform(0.035, 0.06),
               "long_fringe": r.uniform(0.035, 0.06), "bun": 0.015,
               "curly": r.uniform(0.06, 0.085), "afro": r.uniform(0.11, 0.15)}[style]
    beard_base = tuple(a["hair_rgb"]) if not a["dyed_hair"] else (60, 42, 30)
    return Face(
        P=P, a=a, W=W, Hb=Hb, Ht=Ht, yc=yc, chin=chin, child=child, old=old, masc=a["_masc"],
        L=-1.0 if a["light_side"] == "left" else 1.0,
        skin=skin,
        skin_sh=mix(shade(skin, 0.78), (90, 40, 40), 0.06),  # darker and slightly redder
        skin_hi=mix(skin, (255, 245, 235), 0.22),
        hair=hair, hair_dk=shade(hair, 0.62), hair_hi=mix(hair, (255, 250, 240), 0.3),
        style=style, ey=ey, ew=ew, eh=eh, esp=a["eye_spacing"], ny=ny, my=my,
        mw=a["mouth_width"], nw=a["nose_width"],
        fx=a["yaw"] * 0.02,  # features shift with fake yaw; the nose shifts most
        hair_th=hair_th, long_hair=style in ("long", "long_fringe", "bob"),
        contour=face_contour(W, yc, Ht, Hb, sq, taper), centre=np.array([0.0, yc]),
        beard_col=shade(beard_base, 0.85),
        squint=0.75 if a["expression"] in ("smile", "grin") else 1.0,
    )


def draw_face(img: Image.Image, r: random.Random, a: dict[str, Any]) -> None:
    """Paint the face of attributes ``a`` onto ``img`` (its background already drawn)."""
    f = layout(Painter(img, a["scale"], a["roll_degrees"], a["shift_x"], a["shift_y"]), r, a)
    paint_hair_back(f, r)
    paint_neck_and_clothes(f, r)
    paint_locks(f)
    paint_ears(f, r)
    paint_face_shape(f)
    paint_beard(f, r)
    paint_wrinkles(f, r)
    paint_eyes(f, r)
    paint_brows(f, r)
    paint_nose(f)
    paint_cheeks(f, r)
    paint_mouth(f, r)
    paint_moustache(f)
    paint_hair(f, r)
    paint_glasses(f, r)


def paint_hair_back(f: Face, r: random.Random) -> None:
    """Hair behind the head: long styles, afro, bun."""
    P, W, yc, Ht, th, style = f.P, f.W, f.yc, f.Ht, f.hair_th, f.style
    if f.long_hair:
        f.length = {"bob": r.uniform(0.16, 0.26)}.get(style, r.uniform(0.35, 0.62))
        f.spread = spread = r.uniform(0.03, 0.08)
        length = f.length
        top = bez((-W - th, yc), (0, yc - 2 * (Ht + th) - 0.02), (W + th, yc), 16)
        right = bez((W + th, yc), (W + th + spread, (yc + length) / 2),
                    (W + th + spread * 0.6, length), 8)
        bottom = np.stack([np.linspace(W + th + spread * 0.6, -W - th - spread * 0.6, 9),
                           length + 0.02 * np.sin(np.arange(9) * 2.1)], axis=1)
        left = right[::-1] * [-1, 1]
        P.poly(np.concatenate([top, right, bottom, left]), f.hair_dk)
    if style == "afro":
        R = W + th
        P.ellipse(0, yc - 0.05, R, Ht + th + 0.02, f.hair_dk)
        for k in range(18):
            ang = math.pi * (0.85 + 1.3 * k / 17)
            P.ellipse(R * math.cos(ang), yc - 0.05 + (Ht + th) * math.sin(ang), 0.05, 0.05,
                      f.hair_dk)
    if style == "bun":
        by_ = yc - Ht - 0.06
        P.ellipse(0, by_, 0.085, 0.075, f.hair_dk)
        P.ellipse(-f.L * 0.01, by_ - 0.005, 0.07, 0.06, f.hair)


def paint_neck_and_clothes(f: Face, r: random.Random) -> None:
    P, W, yc, chin, L, skin = f.P, f.W, f.yc, f.chin, f.L, f.skin
    neck_w = W * (0.45 if f.child else 0.52 if not f.masc else 0.6)
    # Neck: darkest right under the jaw, lightening downwards in a few steps (a cheap ramp that
    # the downsampling softens), narrower on the shadow side's edge.
    for y0, fac in ((yc + 0.12, 0.66), (chin + 0.02, 0.74), (chin + 0.045, 0.82),
                    (chin + 0.07, 0.88)):
        P.poly(np.array([[-neck_w, y0], [neck_w, y0], [neck_w * 1.05, 0.7],
                         [-neck_w * 1.05, 0.7]]), shade(skin, fac))
    P.poly(np.array([[-L * neck_w, yc + 0.12], [-L * neck_w * 0.7, yc + 0.12],
                     [-L * neck_w * 0.75, 0.7], [-L * neck_w * 1.05, 0.7]]),
           rgba(f.skin_sh, 90))
    cloth = jitter(r, r.choice(CLOTHES), 20)
    sh_top = chin + r.uniform(0.05, 0.08)
    shoulders = P.ellipse_pts(0, sh_top + 0.26, r.uniform(0.6, 0.75), 0.28)
    P.poly(shoulders, cloth)
    P.ellipse(-L * 0.35, sh_top + 0.3, 0.35, 0.3, rgba(shade(cloth, 0.6), 110))
    neckline = r.choice(("round", "v", "collar"))
    if neckline == "round":
        P.ellipse(0, sh_top, neck_w * 1.2, 0.045, shade(skin, 0.85))
    elif neckline == "v":
        P.poly(np.array([[-neck_w * 1.25, sh_top - 0.02], [neck_w * 1.25, sh_top - 0.02],
                         [0, sh_top + 0.1]]), shade(skin, 0.85))
    else:
        P.poly(np.array([[-neck_w * 1.05, sh_top - 0.02], [neck_w * 1.05, sh_top - 0.02],
                         [0, sh_top + 0.05]]), shade(skin, 0.85))
        collar = jitter(r, (238, 238, 236), 10)
        for sgn in (-1, 1):
            P.poly(np.array([[sgn * neck_w * 1.1, sh_top - 0.035], [sgn * 0.01, sh_top + 0.055],
                             [sgn * neck_w * 2.0, sh_top + 0.05]]), collar)


def paint_locks(f: Face) -> None:
    """Long-hair locks falling over the shoulders (in front of clothes, behind the face)."""
    if not f.long_hair:
        return
    W, th, ey, yc = f.W, f.hair_th, f.ey, f.yc
    for sgn in (-1, 1):
        lock = np.concatenate([
            bez((sgn * W * 0.8, ey), (sgn * (W + th + 0.05), yc + 0.15),
                (sgn * (W + th + f.spread * 0.5), f.length), 8),
            bez((sgn * (W * 0.55), f.length - 0.02), (sgn * W * 0.85, yc + 0.2),
                (sgn * W * 0.7, ey), 8),
        ])
        f.P.poly(lock, f.hair if sgn == f.L else shade(f.hair, 0.85))


def paint_ears(f: Face, r: random.Random) -> None:
    """Ears, hidden under long hair and afro, with earrings."""
    if f.long_hair or f.style == "afro":
        return
    P, skin = f.P, f.skin
    ear_y = f.ey + 0.035
    ec = r.choice(((212, 175, 70), (205, 205, 215)))
    for sgn in (-1, 1):
        ex_ = sgn * (f.W * 0.99)
        P.ellipse(ex_, ear_y, 0.034, 0.064, skin if sgn == f.L else f.skin_sh, rot=-sgn * 0.15)
        P.ellipse(ex_ + sgn * 0.008, ear_y, 0.018, 0.04, rgba(shade(skin, 0.7), 110),
                  rot=-sgn * 0.15)
        if f.a["earrings"]:
            P.ellipse(ex_ + sgn * 0.006, ear_y + 0.07, 0.011, 0.011, ec)


def paint_face_shape(f: Face) -> None:
    """Face with simple shading: shadow-coloured outline, then lit layers inset towards light."""
    P, cont, centre, L, W, yc = f.P, f.contour, f.centre, f.L, f.W, f.yc
    P.poly(cont, f.skin_sh)
    for fac, shift, col in ((0.975, 0.012, mix(f.skin_sh, f.skin, 0.5)), (0.95, 0.02, f.skin)):
        P.poly((cont - centre) * fac + centre + [L * shift, -0.004], col)
    # broad highlight on the lit cheek and forehead
    P.ellipse(L * W * 0.35, yc - 0.05, W * 0.45, 0.2, rgba(f.skin_hi, 45))
    P.ellipse(L * 0.02, yc - 0.2, W * 0.6, 0.08, rgba(f.skin_hi, 40))


def paint_beard(f: Face, r: random.Random) -> None:
    """Beard or stubble below the features."""
    bstyle = f.a["beard_style"]
    if bstyle not in ("stubble", "full"):
        return
    P, W, ey, my, mw, col = f.P, f.W, f.ey, f.my, f.mw, f.beard_col
    c, s = unit(64)
    sel = s > 0.05
    if bstyle == "stubble":
        outer = f.contour[sel]
    else:
        outer = (f.contour[sel] - f.centre) * [1.03, 1.08] + f.centre
    inner = np.array([[-W * 0.9, ey + 0.11], [-(mw + 0.03), my - 0.035], [0, my - 0.04],
                      [mw + 0.03, my - 0.035], [W * 0.9, ey + 0.11]])
    if bstyle == "stubble":
        # two translucent layers, the second lower, so the upper edge fades instead of
        # looking like a mask
        P.poly(np.concatenate([outer, inner]), rgba(col, 22))
        P.poly(np.concatenate([outer, inner + [0, 0.03]]), rgba(col, 22))
    else:
        P.poly(np.concatenate([outer, inner]), rgba(col, 235))
        for _ in range(10):
            x0 = r.uniform(-W * 0.8, W * 0.8)
            P.stroke(bez((x0, my + 0.02), (x0 * 1.05, my + 0.08), (x0 * 0.9, f.chin)), 0.006,
                     0.002, rgba(shade(col, 0.7), 90))


def paint_wrinkles(f: Face, r: random.Random) -> None:
    """Age cues: forehead lines, crow's feet and lines under the eyes."""
    if not f.a["wrinkles"]:
        return
    P, W, ey, eh, ew, esp = f.P, f.W, f.ey, f.eh, f.ew, f.esp
    wc = rgba(shade(f.skin, 0.65), 70 if f.old else 45)
    by0 = ey - eh - 0.06
    for i in range(r.randint(2, 3)):
        yy = by0 - 0.022 * i
        P.stroke(bez((-W * 0.45, yy + 0.004), (0, yy - 0.01), (W * 0.45, yy + 0.004), 10),
                 0.004, 0.004, wc)
    for sgn in (-1, 1):
        ox = sgn * (esp + ew * 1.2)
        for j in (-1, 0, 1):
            P.stroke(np.array([[ox, ey + j * 0.012], [ox + sgn * 0.025, ey + j * 0.02]]), 0.003,
                     0.001, wc)
        P.stroke(bez((sgn * esp - ew * 0.7, ey + eh + 0.02), (sgn * esp, ey + eh + 0.04),
                     (sgn * esp + ew * 0.7, ey + eh + 0.02), 8), 0.003, 0.003, wc)


def paint_eyes(f: Face, r: random.Random) -> None:
    P, ey, ew, eh, squint, a = f.P, f.ey, f.ew, f.eh, f.squint, f.a
    eye_col = jitter(r, EYE_COLORS[a["eye_color"]], 10)
    tilt = r.uniform(-0.006, 0.012)
    gaze = a["yaw"] * 0.006 + r.uniform(-0.004, 0.004)
    lash = (28, 20, 18) if not (a["lipstick"] and r.random() < 0.7) else (10, 6, 6)
    for sgn in (-1, 1):
        ex = sgn * f.esp + f.fx
        inner_c = (ex - sgn * ew, ey + 0.003)
        outer_c = (ex + sgn * ew, ey - tilt)
        up = bez(inner_c, (ex, ey - 2 * eh * squint), outer_c, 10)
        lo = bez(outer_c, (ex + sgn * ew * 0.1, ey + 1.4 * eh * squint), inner_c, 10)
        P.ellipse(ex, ey - eh * 0.2, ew * 1.35, eh * 1.9, rgba(f.skin_sh, 45))  # socket shadow
        P.poly(np.concatenate([up, lo]), jitter(r, (238, 234, 228), 6))
        ir = min(ew * 0.45, eh * squint * 1.05)
        ix, iy = ex + gaze, ey - eh * 0.1
        P.ellipse(ix, iy, ir, ir, shade(eye_col, 0.6))
        P.ellipse(ix, iy, ir * 0.8, ir * 0.8, eye_col)
        P.ellipse(ix, iy, ir * 0.42, ir * 0.42, (14, 10, 10))
        P.ellipse(ix - 0.3 * ir, iy - 0.35 * ir, ir * 0.22, ir * 0.22, rgba((255, 255, 255), 220))
        P.stroke(up, 0.004, 0.009, lash)  # upper lid / lash line, heavier at the outer corner
        P.stroke(lo[2:-1], 0.002, 0.003, rgba(shade(f.skin, 0.6), 110))
        crease = up * [1, 1] + [0, -eh * 0.75]
        P.stroke(crease[1:-1], 0.003, 0.003, rgba(shade(f.skin, 0.62), 70))


def paint_brows(f: Face, r: random.Random) -> None:
    a, ew = f.a, f.ew
    if a["hair_color"] in ("grey", "white", "platinum") or a["dyed_hair"]:
        brow_c = (95, 85, 78) if f.old else (70, 50, 36)
    elif a["hair_color"] == "blond":
        brow_c = (140, 108, 70)
    else:
        brow_c = shade(f.hair, 0.9)
    bt = a["brow_thickness"]
    f.brow_y = by = f.ey - f.eh * f.squint - r.uniform(0.028, 0.045)
    arch = r.uniform(0.006, 0.02)
    for sgn in (-1, 1):
        ex = sgn * f.esp + f.fx
        pts = bez((ex - sgn * ew * 1.0, by + a["brow_angle"]),
                  (ex + sgn * ew * 0.15, by - 2 * arch),
                  (ex + sgn * ew * 1.25, by + 0.01), 10)
        f.P.stroke(pts, bt, bt * 0.4, rgba(brow_c, 235))


def paint_nose(f: Face) -> None:
    P, L, ey, ny, nw, skin = f.P, f.L, f.ey, f.ny, f.nw, f.skin
    nx = f.fx * 1.8
    P.stroke(bez((nx - L * 0.024, ey + 0.01), (nx - L * 0.03, (ey + ny) / 2),
                 (nx - L * nw * 0.8, ny - 0.01), 8), 0.01, 0.016, rgba(f.skin_sh, 60))
    P.ellipse(nx, ny + 0.008, nw * 0.9, 0.013, rgba(f.skin_sh, 80))
    for sgn in (-1, 1):
        P.stroke(bez((nx + sgn * nw * 0.95, ny - 0.012), (nx + sgn * nw * 1.2, ny + 0.01),
                     (nx + sgn * nw * 0.45, ny + 0.014), 8), 0.004, 0.003,
                 rgba(shade(skin, 0.6), 130))
        P.ellipse(nx + sgn * nw * 0.42, ny + 0.01, nw * 0.24, 0.007, rgba(shade(skin, 0.4), 150))
    P.ellipse(nx + L * 0.006, ny - 0.01, 0.011, 0.008, rgba((255, 250, 245), 70))


def paint_cheeks(f: Face, r: random.Random) -> None:
    """Blush (children, make-up) and freckles."""
    P, W, fx, ny = f.P, f.W, f.fx, f.ny
    if f.child or f.a["lipstick"] or r.random() < 0.2:
        for sgn in (-1, 1):
            P.ellipse(sgn * W * 0.58 + fx, ny + 0.005, 0.055, 0.035,
                      rgba((230, 90, 100), r.randint(25, 55)))
    if f.a["freckles"]:
        fc = rgba(mix(f.skin, (120, 60, 30), 0.5), 110)
        for _ in range(r.randint(14, 30)):
            sgn = r.choice((-1, 1))
            P.ellipse(sgn * r.uniform(0.02, W * 0.7) + fx, r.uniform(f.ey + 0.04, ny + 0.03),
                      0.004, 0.004, fc)


def paint_mouth(f: Face, r: random.Random) -> None:
    """Lips for the expression, and smile folds."""
    expr, a = f.a["expression"], f.a
    if a["lipstick"]:
        lip = jitter(r, r.choice(((190, 30, 45), (215, 80, 110), (140, 30, 60), (200, 90, 80))),
                     12)
    else:
        lip = mix(shade(f.skin, 0.82), (170, 70, 80), 0.35)
    mx, my, mw = f.fx * 1.4, f.my, f.mw
    if expr in ("smile", "grin") or a["wrinkles"]:
        a_fold = 70 if expr != "neutral" else 40
        for sgn in (-1, 1):
            f.P.stroke(bez((mx + sgn * f.nw * 1.3, f.ny - 0.005),
                           (mx + sgn * (mw + 0.01), my - 0.03),
                           (mx + sgn * (mw + 0.012), my + 0.01), 8), 0.005, 0.002,
                       rgba(f.skin_sh, a_fold))
    if expr == "neutral":
        _lips_closed(f, lip, mx)
    elif expr == "smile":
        _lips_smiling(f, r, lip, mx)
    else:
        _lips_open(f, r, lip, mx)


def _lips_closed(f: Face, lip: tuple, mx: float) -> None:
    P, my, mw, ful = f.P, f.my, f.mw, f.a["lip_fullness"]
    ul, ll = 0.014 * ful, 0.02 * ful
    up_line = bez((mx - mw, my), (mx, my + 0.004), (mx + mw, my), 9)
    upper = np.concatenate([up_line, np.array([[mx + mw * 0.35, my - ul], [mx, my - ul * 0.7],
                                               [mx - mw * 0.35, my - ul]])])
    lower = np.concatenate([up_line, bez((mx + mw, my), (mx, my + 2 * ll), (mx - mw, my), 9)])
    P.poly(lower, lip)
    P.poly(upper, shade(lip, 0.7))
    P.stroke(up_line, 0.003, 0.003, rgba(shade(lip, 0.45), 200))
    P.ellipse(mx, my + ll * 0.6, mw * 0.35, ll * 0.25, rgba((255, 240, 240), 50))  # lip sheen


def _lips_smiling(f: Face, r: random.Random, lip: tuple, mx: float) -> None:
    P, my, mw, ful = f.P, f.my, f.mw, f.a["lip_fullness"]
    cu = r.uniform(0.014, 0.026)
    line = bez((mx - mw * 1.05, my - cu), (mx, my + cu * 1.2), (mx + mw * 1.05, my - cu), 11)
    ul, ll = 0.008 * ful, 0.016 * ful
    prof = np.sin(np.linspace(0, math.pi, 11))[:, None] * [0.0, 1.0]  # zero at the corners
    P.poly(np.concatenate([line, (line + prof * ll)[::-1]]), lip)
    P.poly(np.concatenate([line, (line - prof * ul)[::-1]]), shade(lip, 0.7))
    P.stroke(line, 0.004, 0.004, rgba(shade(lip, 0.4), 210))


def _lips_open(f: Face, r: random.Random, lip: tuple, mx: float) -> None:
    """A grin or an open mouth: lips around a dark opening with the upper teeth showing."""
    P, my, mw, ful = f.P, f.my, f.mw, f.a["lip_fullness"]
    grin = f.a["expression"] == "grin"
    cu = r.uniform(0.012, 0.022) if grin else 0.0
    op = r.uniform(0.02, 0.03) if grin else r.uniform(0.03, 0.045)
    w_ = mw * (1.05 if grin else 0.75)
    upper_e = bez((mx - w_, my - cu), (mx, my - (0.004 if grin else op)), (mx + w_, my - cu), 12)
    lower_e = bez((mx + w_, my - cu), (mx, my + 2 * op), (mx - w_, my - cu), 12)
    hole = np.concatenate([upper_e, lower_e])
    P.poly((hole - [mx, my]) * [1.06, 1.18] + [mx, my], lip)
    P.poly(hole, (62, 22, 26))
    tooth_h = (np.sin(np.linspace(0, math.pi, 12)) * (0.016 if grin else 0.012))[:, None]
    teeth = np.concatenate([upper_e,
                            (upper_e + np.hstack([np.zeros_like(tooth_h), tooth_h]))[::-1]])
    P.poly(teeth, jitter(r, (242, 238, 228), 6))
    P.stroke(upper_e, 0.006 * ful, 0.006 * ful, shade(lip, 0.7))


def paint_moustache(f: Face) -> None:
    """Moustache and goatee over the mouth area."""
    bstyle, P, my, mw = f.a["beard_style"], f.P, f.my, f.mw
    mx = f.fx * 1.4
    if bstyle in ("moustache", "goatee", "full"):
        P.poly(np.concatenate([
            bez((mx - mw * 1.15, my + 0.01), (mx, my - 0.055), (mx + mw * 1.15, my + 0.01), 10),
            bez((mx + mw * 1.0, my - 0.002), (mx, my - 0.02), (mx - mw * 1.0, my - 0.002), 10)]),
            rgba(f.beard_col, 240))
    if bstyle == "goatee":
        P.poly(np.concatenate([
            bez((mx - mw * 0.6, my + 0.025), (mx, my + 0.012), (mx + mw * 0.6, my + 0.025), 6),
            bez((mx + mw * 0.7, my + 0.03), (mx, f.chin + 0.03), (mx - mw * 0.7, my + 0.03), 8)]),
            rgba(f.beard_col, 230))


def paint_hair(f: Face, r: random.Random) -> None:
    """Hair on top of the head (a cap with a hairline or fringe), or a bald scalp."""
    if f.style == "bald":
        if not f.child:
            _paint_bald(f, r)
        return
    W, yc, Ht, th, L, P = f.W, f.yc, f.Ht, f.hair_th, f.L, f.P
    R_x, R_y = W + th * 0.9 + 0.008, Ht + th
    side_bot = {"buzz": f.ey - 0.02, "bun": f.ey - 0.02}.get(f.style, f.ey + 0.03)
    if f.style in ("long", "long_fringe", "bob"):
        side_bot = f.ey + 0.1
    # outer arc from right side over the top to the left side
    ang = np.linspace(0.08, -math.pi - 0.08, 24)
    outer = np.stack([R_x * np.cos(ang), yc - 0.01 + R_y * np.sin(ang)], axis=1)
    outer[0, 1] = outer[-1, 1] = side_bot
    hl = yc - Ht * (0.62 if not (f.old and f.masc) else 0.78) + r.uniform(-0.015, 0.015)
    fringe = _hairline(f, r, hl)
    # The outer arc ends on the left, so the hairline runs left -> right; running it the other
    # way would add an edge straight across the face, which PIL rasterises as a visible line.
    inner = np.concatenate([[[-W * 0.97, side_bot]], fringe, [[W * 0.97, side_bot]]])
    cap = np.concatenate([outer, inner])
    if f.style == "buzz":
        P.poly(cap, rgba(f.hair_dk, 170))
    else:
        P.poly(cap, f.hair_dk)
        P.poly((cap - f.centre) * [0.96, 0.98] + f.centre + [L * 0.012, 0.004], f.hair)
        # hair sheen on the lit side and a few strands for texture
        P.ellipse(L * W * 0.4, yc - Ht * 0.8, W * 0.3, 0.03, rgba(f.hair_hi, 40), rot=L * 0.5)
        for _ in range(7):
            x0 = r.uniform(-W * 0.85, W * 0.85)
            P.stroke(bez((x0, hl - 0.015), (x0 * 0.8, yc - Ht * 0.85),
                         (x0 * 0.3, yc - Ht - th * 0.6), 8),
                     0.005, 0.002, rgba(f.hair_dk if r.random() < 0.6 else f.hair_hi, 70))
    if f.style in ("curly", "afro"):
        n_c = 16 if f.style == "curly" else 20
        rad = th * 0.6
        for k in range(n_c):
            t_ = -math.pi * (k / (n_c - 1)) - 0.05
            cxk, cyk = R_x * 0.97 * math.cos(t_), yc - 0.01 + R_y * 0.97 * math.sin(t_)
            P.ellipse(cxk, cyk, rad, rad, f.hair if (cxk * L) > 0 else shade(f.hair, 0.8))


def _hairline(f: Face, r: random.Random, hl: float) -> np.ndarray:
    """The lower edge of the hair cap, left to right: a fringe, a side part or a hairline."""
    W = f.W
    fringe_p = {"fringe": 1.0, "long_fringe": 1.0, "bob": 0.5, "curly": 0.3}.get(f.style, 0.0)
    if r.random() < fringe_p:
        fy = f.brow_y - r.uniform(0.0, 0.02)
        xs = np.linspace(-W * 0.95, W * 0.95, 15)
        ys = fy + 0.012 * (np.arange(15) % 2) + 0.05 * (xs / W) ** 4
        return np.stack([xs, ys], axis=1)
    if f.style == "side_part":
        part = r.choice((-1, 1)) * W * 0.35
        return np.concatenate([
            bez((-W * 0.95, hl + 0.08), (-W * 0.4, hl + 0.07 if part > 0 else hl + 0.13),
                (part, hl - 0.01), 8),
            bez((part, hl - 0.01), (W * 0.5, hl + (0.13 if part < 0 else 0.07)),
                (W * 0.95, hl + 0.08), 8)[1:]])
    xs = np.linspace(-W * 0.92, W * 0.92, 13)
    return np.stack([xs, hl + 0.07 * (xs / W) ** 2], axis=1)


def _paint_bald(f: Face, r: random.Random) -> None:
    """Scalp sheen, and often some hair left around the sides."""
    W, L, ey = f.W, f.L, f.ey
    f.P.ellipse(L * W * 0.3, f.yc - f.Ht * 0.78, W * 0.3, 0.05, rgba((255, 255, 255), 45),
                rot=L * 0.4)
    if r.random() < 0.6:
        for sgn in (-1, 1):  # fringe of hair left above the ears
            f.P.stroke(bez((sgn * W * 0.93, ey - 0.11), (sgn * W * 1.06, ey - 0.05),
                           (sgn * W * 0.99, ey + 0.03), 8), 0.035, 0.015, rgba(f.hair, 220))


def paint_glasses(f: Face, r: random.Random) -> None:
    """Glasses last: they sit in front of everything."""
    if not f.a["glasses"]:
        return
    P, ey, ew = f.P, f.ey, f.ew
    frame = r.choice(((20, 20, 22), (90, 50, 30), (190, 160, 90), (180, 180, 190),
                      (130, 30, 40)))
    fw = r.uniform(0.006, 0.011)
    tint = rgba(r.choice(((20, 20, 25), (60, 40, 20), (30, 50, 90))), r.randint(150, 215))
    ends = []
    for sgn in (-1, 1):
        ex = sgn * f.esp + f.fx
        if f.a["glasses_style"] == "round":
            lens = P.ellipse_pts(ex, ey + 0.004, ew * 1.5, ew * 1.3)
        else:  # rounded rectangle as a superellipse
            c, s = unit(40)
            rx_, ry_ = ew * 1.6, ew * 1.1
            lens = np.stack([ex + rx_ * np.sign(c) * np.abs(c) ** 0.4,
                             ey + 0.006 + ry_ * np.sign(s) * np.abs(s) ** 0.4], axis=1)
        if f.a["glasses_tinted"]:
            P.poly(lens, tint)
        P.stroke(bez((ex - ew * 0.8, ey - ew * 0.3), (ex - ew * 0.5, ey - ew * 0.1),
                     (ex - ew * 0.2, ey + ew * 0.8), 6),
                 0.004, 0.002, rgba((255, 255, 255), 60))  # reflection
        P.closed_line(lens, frame, fw)
        ends.append(lens)
    # bridge between the lenses and temple arms towards the ears
    li, ri = ends[0][np.argmax(ends[0][:, 0])], ends[1][np.argmin(ends[1][:, 0])]
    P.stroke(bez(li - [0, 0.01], ((li[0] + ri[0]) / 2, ey - 0.02), ri - [0, 0.01], 6), fw, fw,
             frame)
    for lens, sgn in ((ends[0], -1), (ends[1], 1)):
        o = lens[np.argmax(sgn * lens[:, 0])]
        P.stroke(np.array([o - [0, 0.01], [sgn * f.W * 0.98, ey - 0.005]]), fw, fw, frame)
