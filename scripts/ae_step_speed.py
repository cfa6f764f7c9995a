"""Time the autoencoder step two ways, side by side in one run, on the CPU (or a GPU):
LDM's adaptive weight (two autograd.grad calls through LPIPS and the discriminator, then the
full backward; ``ldm_reference=True``) and the project's step (one pass through each network).

    python scripts/ae_step_speed.py --preset demo --steps 8

The discriminator is switched on from step 0 and the perceptual term is the random-trunk
LPIPS-VGG (the real trunk needs a download; the cost is the same), so both steps do the full
loss. Prints images/s of each, median over ``--steps`` timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args()

    import torch

    from ffhq_ldm.config import get_preset
    from ffhq_ldm.train import stage1

    config = dataclasses.replace(get_preset(args.preset, "vae"), disc_start=0,
                                 perceptual="lpips-vgg-random-trunk")
    batch = args.batch_size or config.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.rand(batch, 3, config.resolution, config.resolution, device=device) * 2 - 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.preset}, batch {batch}, {device}, torch threads {torch.get_num_threads()}, "
          f"load average {load:.2f}")
    for name, ldm in (("LDM formula (eager, 2x autograd.grad + backward)", True),
                      ("this project's step (one pass)", False)):
        parts = stage1.build(None, config, device=device, compile=False, ldm_reference=ldm)
        times = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            parts.step(x, i)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"  {name}: {batch / statistics.median(times[1:]):.2f} img/s")


if __name__ == "__main__":
    main()
