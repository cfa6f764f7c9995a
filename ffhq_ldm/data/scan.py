"""Find the files of an image folder that training cannot use, before training starts.

    ffhq-ldm scan-data --data DIR [--size 128 --small-images upscale|skip --full --json FILE]

Exit code 0: every file is usable as it is; 1: problems found (skipped files, or small images
that will be upscaled), usable images remain; 2: no usable image (or no folder).

Design. Every trainer scans its folder when it opens it (``images.open_dataset_checked``) and
leaves the unusable files out *before* the train/held-out split, so both stages and every
later command split the same files. The scan reads headers only: ``Image.open`` (format,
size, mode, the decompression-bomb limit) + ``verify()`` (PNG chunk CRCs up to IEND, which
catches a truncated PNG; WebP/GIF structure) + an end-of-image marker check for JPEG, whose
``verify()`` checks nothing. Measured on a 2-core CPU (files in the page cache): 0.07 ms a
file for 128 px PNGs, so FFHQ's 70,000 thumbnails take 5 s and nothing needs caching; 0.34 ms
for a 1024 px PNG, because verifying the CRCs reads the whole file (FFHQ's 90 GB
images1024x1024 folder: 25 s when cached, disk-bound minutes when not). Decoding everything
would cost 0.57 ms and 48 ms a file (40 s and 56 min for 70,000). So the scan stays at the
header, and what a header cannot show (corrupt pixel data behind valid headers and CRCs, a
file changed after the scan) is caught at load time: ``ImageDataset`` substitutes the next
image that decodes and records it. ``--full`` decodes every image here too, for a complete
list before a long run.

Handled, not problems: CMYK, 16-bit, grayscale, palette, RGBA/LA (composited on white) and
EXIF orientation are converted by ``decode.to_rgb``; the counts per mode are reported.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

# Only the standard library at import time: ``ffhq-ldm --help`` registers this command without
# loading PIL, numpy or torch (``decode`` imports PIL and numpy); the functions import what
# they use. scan.py never imports images.py (images.py imports it).
from ..config import SMALL_IMAGE_POLICIES

# JPEG files end with the EOI marker; some writers append a few bytes after it (padding,
# vendor trailers), so it is looked for near the end rather than only at the last 2 bytes.
JPEG_EOI_WINDOW = 4096


class ScanReport:
    """What a scan found: usable files, skipped ones with reasons, upscaled ones, modes."""

    def __init__(self, root, size: int, small_images: str):
        self.root, self.size, self.small_images = Path(root), size, small_images
        self.files = 0
        self.usable: list[Path] = []
        self.skipped: list[dict] = []  # {"file", "problem", "reason"}
        self.upscaled: list[dict] = []  # {"file", "width", "height"}
        self.load_failures: list[dict] = []  # {"file", "reason"}, found while training
        self.modes: Counter = Counter()
        self.seconds = 0.0
        self.scanned = False  # False: a HuggingFace dataset, only load-time failures recorded

    def relative(self, path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def add_load_failures(self, failures: dict) -> bool:
        """Record load-time failures ({file: reason}) of this report's usable files (the
        process-wide record may hold others); True if any was new."""
        known = {entry["file"] for entry in self.load_failures}
        mine = {self.relative(p) for p in self.usable} if self.scanned else None
        new = [(self.relative(f), r) for f, r in failures.items()
               if self.relative(f) not in known and (mine is None or self.relative(f) in mine)]
        self.load_failures += [{"file": f, "reason": r} for f, r in new]
        return bool(new)

    def problem_counts(self) -> str:
        counts = Counter(entry["problem"] for entry in self.skipped)
        if self.load_failures:
            counts["failed to decode while loading"] += len(self.load_failures)
        return ", ".join(f"{n} {problem}" for problem, n in counts.most_common()) or "no problems"

    def exit_code(self) -> int:
        if not self.usable:
            return 2
        return 1 if self.skipped or self.upscaled or self.load_failures else 0

    def to_dict(self) -> dict:
        return {"data": str(self.root), "size": self.size, "small_images": self.small_images,
                "files": self.files, "usable": len(self.usable) - len(self.load_failures),
                "skipped": self.skipped, "failed_while_loading": self.load_failures,
                "upscaled": self.upscaled, "modes": dict(sorted(self.modes.items())),
                "seconds": round(self.seconds, 3)}

    def write(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def summary(self) -> str:
        """One line for the console."""
        usable = len(self.usable) - len(self.load_failures)
        parts = [f"{self.files} files scanned in {self.seconds:.1f} s: {usable} usable"]
        skipped = len(self.skipped) + len(self.load_failures)
        if skipped:
            parts.append(f"{skipped} skipped ({self.problem_counts()})")
        if self.upscaled:
            parts.append(f"{len(self.upscaled)} smaller than {self.size} px, upscaled")
        converted = {m: n for m, n in self.modes.items() if m != "RGB"}
        if converted:
            parts.append("converted to RGB: " + ", ".join(f"{n} {m}" for m, n in
                                                          sorted(converted.items())))
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# One file

_MODE_OK: dict[str, bool] = {}


def _mode_supported(mode: str) -> bool:
    """Whether ``to_rgb`` converts this PIL mode (tried once on a 1x1 image of it)."""
    from PIL import Image

    from .decode import to_rgb

    if mode not in _MODE_OK:
        try:
            to_rgb(Image.new(mode, (1, 1)))
            _MODE_OK[mode] = True
        except Exception:
            _MODE_OK[mode] = False
    return _MODE_OK[mode]


def _jpeg_complete(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - JPEG_EOI_WINDOW))
        return b"\xff\xd9" in fh.read()


def inspect_image(path, size: int, full: bool = False) -> tuple[str | None, str, dict]:
    """(problem or None, reason, info) for one file; info has width, height, mode."""
    from PIL import Image, UnidentifiedImageError

    from .decode import describe_error, load_image, open_image

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file", "the file is empty (0 bytes)", {}
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return "unreadable", f"cannot read the file: {exc.strerror or exc}", {}
    try:
        with open_image(path) as image:
            info = {"width": image.width, "height": image.height, "mode": image.mode,
                    "format": image.format}
            image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return "decompression bomb", f"not decoded: {exc}", {}
    except UnidentifiedImageError:
        return "not an image", "not an image file PIL can read (wrong extension or garbage)", {}
    except Exception as exc:  # verify() raises OSError, SyntaxError, struct.error, ...
        return "truncated or corrupt", describe_error(exc), {}
    if info["format"] == "JPEG" and not _jpeg_complete(path):
        return "truncated or corrupt", "truncated JPEG (no end-of-image marker)", info
    if not _mode_supported(info["mode"]):
        return "unsupported pixel mode", f"pixel mode {info['mode']!r} cannot be converted " \
                                         "to RGB", info
    if full:
        try:
            load_image(path, size)
        except Exception as exc:
            return "truncated or corrupt", f"fails to decode: {describe_error(exc)}", info
    return None, "", info


def scan_files(files, root, size: int, small_images: str = "upscale", full: bool = False,
               progress: bool = False) -> ScanReport:
    from tqdm.auto import tqdm

    from .decode import DataError

    if small_images not in SMALL_IMAGE_POLICIES:
        raise DataError(f"small_images must be one of {SMALL_IMAGE_POLICIES}, not {small_images!r}")

    report = ScanReport(root, size, small_images)
    report.scanned = True
    t0 = time.perf_counter()
    for path in tqdm(files, desc="checking images", unit="file", disable=not progress,
                     dynamic_ncols=True):
        report.files += 1
        problem, reason, info = inspect_image(path, size, full)
        if problem is None and min(info["width"], info["height"]) < size:
            if small_images == "skip":
                problem = "too small"
                reason = f"{info['width']}x{info['height']} is smaller than {size} px " \
                         "(--small-images skip)"
            else:
                report.upscaled.append({"file": report.relative(path), "width": info["width"],
                                        "height": info["height"]})
        if problem is not None:
            report.skipped.append({"file": report.relative(path), "problem": problem,
                                   "reason": reason})
            continue
        report.modes[info["mode"]] += 1
        report.usable.append(path)
    report.seconds = time.perf_counter() - t0
    return report


def scan_folder(root, size: int, small_images: str = "upscale", full: bool = False,
                progress: bool = False) -> ScanReport:
    """Scan every image file under ``root`` (the files ``list_images`` finds)."""
    from .decode import list_images

    return scan_files(list_images(root), root, size, small_images, full, progress)


# ---------------------------------------------------------------------------------------------
# ffhq-ldm scan-data

def _scan_data(args) -> int:
    from .decode import DataError

    if str(args.data).startswith("hf:"):
        raise DataError("scan-data reads image folders; a HuggingFace dataset's bad rows are "
                        "skipped while training")
    report = scan_folder(args.data, args.size, args.small_images, args.full,
                         progress=not args.no_progress)
    for entry in report.skipped:
        print(f"skip     {entry['file']}: {entry['reason']}")
    for entry in report.upscaled:
        print(f"upscale  {entry['file']}: {entry['width']}x{entry['height']} < {args.size} px")
    print(report.summary())
    if args.json:
        print(f"report: {report.write(args.json)}")
    if not report.usable:
        print(f"error: no usable images under {args.data}", file=sys.stderr)
    return report.exit_code()


def register(subparsers) -> None:
    """Add ``scan-data`` to the ``ffhq-ldm`` command line."""
    from ..cli_common import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "scan-data", help="list the images of a folder that training would skip, and why",
        formatter_class=DefaultsHelpFormatter,
        description="Check every image file under a folder as the trainers do before they "
                    "start (header, truncation, decompression bombs, pixel mode, size). Exit "
                    "code 0: all usable; 1: problems found, usable images remain; 2: none "
                    "usable.")
    p.add_argument("--data", required=True, help="image folder (recursive)")
    p.add_argument("--size", type=int, default=128, help="training resolution in pixels")
    p.add_argument("--small-images", choices=SMALL_IMAGE_POLICIES, default="upscale",
                   help="what training does with images smaller than --size")
    p.add_argument("--full", action="store_true",
                   help="also decode every image (slower; finds corrupt pixel data)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_scan_data)
