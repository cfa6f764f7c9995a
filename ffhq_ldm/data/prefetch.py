"""Images decoded ahead of their use, by a pool of threads, in batches of uint8 pixels.

Shared by the latent cache builder and the decoded-image cache. Threads, not processes: PIL
releases the GIL while it decodes and resizes, the pixels need no pickling back, and an image
that fails to decode is recorded in this process (``images.load_failures``), where the trainers
look for it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def default_threads() -> int:
    """Decoding threads when none are asked for: one per CPU core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def decoded_batches(dataset, start: int, stop: int, batch_size: int, threads: int | None = None,
                    depth: int = 2, pad: bool = False, pin: bool = False
                    ) -> Iterator[tuple[torch.Tensor, int]]:
    """``(pixels, count)`` for images ``start .. stop - 1`` of ``dataset`` (an ``ImageDataset``)
    in order, ``batch_size`` at a time: ``pixels`` (B, 3, H, W) uint8, a view of NHWC memory,
    ``count`` the real images in it. ``pad``: the last batch is filled up to ``batch_size`` with
    copies of its last image (a compiled model sees one shape). ``depth`` batches are decoded
    ahead; ``threads=0`` decodes in the calling thread. ``pin``: page-locked host memory, for
    asynchronous copies to a GPU."""
    threads = default_threads() if threads is None else threads
    starts = range(start, stop, batch_size)

    def stack(arrays: list) -> tuple[torch.Tensor, int]:
        count = len(arrays)
        if pad and count < batch_size:
            arrays = arrays + [arrays[-1]] * (batch_size - count)
        pixels = torch.from_numpy(np.stack(arrays))
        if pin:
            pixels = pixels.pin_memory()
        return pixels.permute(0, 3, 1, 2), count

    def indices(first: int) -> range:
        return range(first, min(first + batch_size, stop))

    if threads == 0:
        for first in starts:
            yield stack([dataset.get_array(i)[0] for i in indices(first)])
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for first in starts:
            pending.append([pool.submit(lambda i: dataset.get_array(i)[0], i)
                            for i in indices(first)])
            if len(pending) > depth:
                yield stack([f.result() for f in pending.popleft()])
        while pending:
            yield stack([f.result() for f in pending.popleft()])
