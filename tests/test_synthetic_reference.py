"""The synthetic renderer draws the same pixels as the one-function renderer it was split from.

The checksums below are SHA-256 digests of the raw RGB bytes (``Image.tobytes()``) of faces
rendered by the renderer before it was split into per-feature painters (Pillow 13, numpy 2.4).
The faces are chosen so that every hair style, expression, beard style, glasses style,
background kind and age group occurs at least once. A changed digest means the dataset of a
seed changed: any change to the painters' drawing or to the order of their random draws shows
up here. (A Pillow release that rasterises polygons differently would show up too.)
"""

from __future__ import annotations

import hashlib

import pytest

from ffhq_ldm.data.synthetic import render_face

REFERENCE = [
    # (seed, index, size, sha256 of the RGB bytes), what the face shows
    # side part
    (2026, 0, 64, "14334b8e8141b686a2a1cfc67d546a8f6314cc630043af100236be3663e4e106"),
    # bun, smile
    (2026, 1, 64, "08b2fbd29eff2dcb51af46d66371e87ab9b0ecc48b0c51faf8aac777838e625d"),
    # curly
    (2026, 2, 64, "6ee9637125a6b678b08c5e33835b0a6dc26ae199e80832ed3833796a8f6c2708"),
    # long fringe
    (2026, 3, 64, "cd0c120b1135c3178c26ac82557556dc474a0ad7021c2f3cdc4d8c7082bb074a"),
    # long, grin
    (2026, 4, 64, "7e3c5c9ab754b07a4418d6f9a6e5372395486b89dae1ed8c2d8a37f5b04b6c2e"),
    # goatee, glasses
    (2026, 6, 64, "8403aeb5df85eda2eaa81aa47814fd6e02c1def88bd386b7c31edf27485393c6"),
    # bob, rect glasses
    (2026, 8, 64, "c37c9fac6cefb9b2da3a35cdf1a1c783a8d706b5640573d7476df38b85225a03"),
    # buzz, stubble
    (2026, 11, 64, "4041924ff18b3d50615035dc2a20c57f0adeadd31190b1d11680899aca6d9655"),
    # fringe, grin
    (2026, 12, 64, "45fccc12b4105fae3309532b7efadac23c1ec2ddce73b7e12189e9adadb8a03d"),
    # full beard
    (2026, 15, 64, "2371262107abea81cad741c64812f4c665868a695ca0cd0e2c6c0050a8e8401c"),
    # bald, open
    (2026, 24, 64, "cf2e7d4d16d5147f7418c255b13368f6a18595c8169d48f3731f8447290510c7"),
    # moustache
    (2026, 26, 64, "b5d51df1bae23b3798d9b53eb256fb196ce4785c335948f76ba3c820924a87bb"),
    # afro
    (2026, 253, 64, "887c9a7a7f8faefd9476357fe297b6f4715cbaa3fb64e20325d3d9556668afc7"),
    # 2x supersampling
    (0, 0, 128, "344fafe6feeb60215432bee5b0434877725ef362fe4a40c275dd461048a5c771"),
    # 4x, Lanczos
    (1, 7, 32, "f34a343d24bba077c4e5b6b535250bc890b5da9aae876844c16737b1ae5dded5"),
]


@pytest.mark.parametrize("seed,index,size,digest", REFERENCE)
def test_faces_match_the_reference_renderer(seed, index, size, digest):
    img, _ = render_face(seed, index, size)
    assert img.size == (size, size) and img.mode == "RGB"
    assert hashlib.sha256(img.tobytes()).hexdigest() == digest
