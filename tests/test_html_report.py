"""``report.html`` of ``evaluate calc``: one self-contained page that shows its pictures.

The pictures are checked three ways: their embedded bytes decode to the very files, the page
refers to nothing outside itself, and headless Chromium, rendering it offline, draws each
picture's colours on screen (skipped, saying why, where Chromium is not installed).
"""

from __future__ import annotations

import base64
import html.parser
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from ffhq_ldm.evaluation.calc import run_calc
from ffhq_ldm.evaluation.errors import EvaluationError
from ffhq_ldm.evaluation.html_report import write_html_report

# Two colours per picture, in a checkerboard: a rendered picture shows both, in a region
# that is not uniform. No other part of the page uses these colours.
COLOURS = {
    "grid": ((230, 20, 200), (20, 200, 40)),
    "strip": ((250, 140, 0), (0, 90, 250)),
    "neighbours": ((120, 0, 180), (250, 250, 0)),
    "histogram": ((0, 200, 200), (140, 70, 0)),
}
SIZES = {"grid": (260, 130), "strip": (340, 40), "neighbours": (300, 200), "histogram": (320, 110)}

METRICS = {
    "fid": 12.3456, "kid": 0.01234, "kid_std": 0.00321, "precision": 0.6543, "recall": 0.4321,
    "memorization_rate": 0.125, "memorized": ["sample_000003.png"],
    "settings": {"num_samples": 8, "model": None, "samples": "/data/<samples>",
                 "reference": "/data/ref.npz"},
}


def checker(name: str, path) -> None:
    (w, h), (a, b) = SIZES[name], COLOURS[name]
    yy, xx = np.mgrid[:h, :w]
    pattern = ((yy // 10 + xx // 10) % 2).astype(bool)
    array = np.where(pattern[..., None], np.array(a, np.uint8), np.array(b, np.uint8))
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture
def report(tmp_path):
    paths = {name: tmp_path / f"{name}.png" for name in COLOURS}
    for name, path in paths.items():
        checker(name, path)
    page = write_html_report(tmp_path, METRICS, paths["grid"], paths["neighbours"],
                             paths["histogram"], [paths["strip"]])
    return page, paths


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def test_page_is_self_contained_and_holds_the_files(report):
    page, paths = report
    text = page.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    assert "script" not in parser.tags and not parser.links
    assert len(parser.srcs) == 4
    assert all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in parser.srcs]
    # The order of the page: samples, interpolations, neighbours, histogram.
    for data, name in zip(embedded, ("grid", "strip", "neighbours", "histogram"), strict=True):
        assert data == paths[name].read_bytes(), name
    for shown in ("12.346", "0.01234 ± 0.00321", "0.6543", "0.4321", "0.1250 (1 of 8)",
                  "Heusel et al. 2017", "Bińkowski et al. 2018", "Kynkäänniemi et al. 2019",
                  "sample_000003.png"):
        assert shown in text, shown
    assert "/data/<samples>" not in text and "/data/&lt;samples&gt;" in text  # escaped


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(chromium() is None,
                    reason="headless Chromium is not installed (Debian: apt-get install -y "
                           "chromium); the page's rendering is not checked")
def test_chromium_draws_every_picture(report, tmp_path):
    page, _ = report
    shot = tmp_path / "shot.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2600", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    for name, pair in COLOURS.items():
        w, h = SIZES[name]
        hits = [np.all(np.abs(pixels - np.array(c)) <= 3, axis=-1) for c in pair]
        # each colour covers half the picture; allow for a few blended edge pixels
        for hit in hits:
            assert hit.sum() >= 0.4 * w * h, (name, int(hit.sum()))
        # ... together, in one place: the picture's box holds both, so it is not uniform
        ys, xs = np.nonzero(hits[0] | hits[1])
        box = pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.shape[0] <= h + 2 and box.shape[1] <= w + 2, name
        assert box.reshape(-1, 3).std(0).max() > 30, name


class _FakeExtractor:
    """Stands in for Inception: features = per-channel mean and std of the pixels."""

    device = torch.device("cpu")

    def __init__(self):
        from ffhq_ldm.evaluation.features import InceptionSource

        self.source = InceptionSource("torchscript", "fake", "fake extractor", sha256="f" * 64)

    def fingerprint(self, image_size):
        return {"feature_extractor": "fake", "weights_sha256": self.source.sha256,
                "image_size": image_size}

    def extract_arrays(self, images, batch_size=16, desc=""):
        x = np.asarray(images, dtype=np.float32)
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)

    def extract_paths(self, paths, resolution, batch_size=16, desc=""):
        from ffhq_ldm.evaluation.images import load_images

        return self.extract_arrays(load_images(paths, resolution))


def test_calc_writes_report_html_with_strips(tmp_path, faces32):
    from test_pipeline import build_pipeline

    from ffhq_ldm.evaluation.reference import compute_reference
    from ffhq_ldm.train.export import export_pipeline

    model = export_pipeline(build_pipeline(), tmp_path / "pipeline")
    ex = _FakeExtractor()
    ref = tmp_path / "ref.npz"
    compute_reference(str(faces32), str(ref), ex, resolution=32)
    out = tmp_path / "eval"
    kw = dict(ref_path=str(ref), data_dir=str(faces32), out_dir=str(out), model=str(model),
              num=6, steps=2, resolution=32, kid_subsets=2, extractor=ex)
    with pytest.raises(EvaluationError, match="strip image not found"):
        run_calc(**kw, strips=[str(tmp_path / "missing.png")])
    run_calc(**kw, interpolations=1)
    strips = sorted((out / "interpolations").glob("*.png"))
    assert [p.name for p in strips] == ["strip_seeds_0_1.png"]
    parser = _Collect()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in parser.srcs]
    assert embedded == [(out / "samples_grid.png").read_bytes(), strips[0].read_bytes(),
                        (out / "neighbours.png").read_bytes(), (out / "nn_hist.png").read_bytes()]
    grid = np.asarray(Image.open(out / "samples_grid.png"))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 6 samples of 32 px: 2 rows of 3
