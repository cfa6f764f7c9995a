"""The latent cache's writes, off the encoding loop: a background thread saves each shard to a
temporary name and renames it into place, in order, and lists it in the manifest.

The manifest is rewritten every ``manifest_every`` shards and when the writer closes (also
after an error or an interruption), always by rename (``io.write_json_atomic``), and it lists a
shard only after the shard's rename: a killed build leaves a manifest whose shards are all
whole (a prefix of the cache), so a resumed build starts at the first unlisted shard and
overwrites any later file it finds.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io import write_json_atomic


class ShardWriter:
    """``put(name, tensors, ready)``: queue a shard (``ready``: a CUDA event to wait for before
    reading the tensors, or None); ``close()``: write what is queued and the manifest, and
    raise the writer's error if it had one; ``close(abort=True)``: drop what is still queued."""

    def __init__(self, cache_dir: Path, manifest: dict, manifest_every: int = 8,
                 depth: int = 4, save=None):
        self.cache_dir, self.manifest, self.every = Path(cache_dir), manifest, manifest_every
        self.save = save or save_file
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.aborted = False
        self.lock = threading.Lock()  # guards manifest["shards"] between the two threads
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        since = 0
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.aborted or self.error is not None:
                continue  # drain until the end marker
            name, tensors, ready = item
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copy of this shard, nothing later
                tmp = self.cache_dir / (name + ".tmp")
                self.save({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
                os.replace(tmp, self.cache_dir / name)
                with self.lock:
                    self.manifest["shards"].append(name)
                since += 1
                if since >= self.every:
                    self.write_manifest()
                    since = 0
            except BaseException as exc:  # noqa: BLE001 - raised again in the encoding thread
                self.error = exc

    def write_manifest(self) -> None:
        with self.lock:
            write_json_atomic(self.cache_dir / "manifest.json", self.manifest)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, name: str, tensors: dict[str, torch.Tensor], ready=None) -> None:
        while True:
            self.check()
            try:
                self.queue.put((name, tensors, ready), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, abort: bool = False) -> None:
        self.aborted = abort
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.write_manifest()
        if not abort:
            self.check()
