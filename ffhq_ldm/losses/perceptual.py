"""LPIPS (Zhang et al. 2018) built without any download.

The ``lpips`` wheel ships its learned linear heads, but its VGG/AlexNet trunk comes from
torchvision's download, which fails offline. We build LPIPS with an uninitialised trunk and
load the ImageNet trunk weights ourselves, from torchvision's cache or a file the user gives.
``lpips-vgg-random-trunk`` keeps the trunk random: it still gives a smooth, gradient-carrying
image distance, but it is NOT the LPIPS metric; the demo and tests use it and say so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

# torchvision's file names for the ImageNet weights LPIPS was calibrated on.
TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class PerceptualWeightsError(RuntimeError):
    """The real LPIPS trunk is needed but not on disk."""


def trunk_search_paths(net: str) -> list[Path]:
    # torch.hub.get_dir() is where torchvision's download puts the file: it honours TORCH_HOME,
    # XDG_CACHE_HOME and torch.hub.set_dir(), read at call time.
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub / TRUNK_FILES[net]]


def _missing_trunk_message(net: str, candidates: list[Path]) -> str:
    file = TRUNK_FILES[net]
    places = ", ".join(str(p) for p in candidates)  # the given --lpips-trunk, or the defaults
    builder = "vgg16" if net == "vgg" else "alexnet"
    return (
        f"LPIPS needs the ImageNet {net.upper()} trunk ({file}), which is not on this machine "
        f"(looked in: {places}). Either download it once on a machine with internet, e.g. "
        f"`python -c \"import torchvision; torchvision.models.{builder}(weights='DEFAULT')\"`, "
        f"and copy the file to one of those places, or pass "
        f"--lpips-trunk /path/to/{file}. For a quick offline experiment (not the real metric) use "
        f"--perceptual lpips-vgg-random-trunk.")


def _load_trunk(model: nn.Module, net: str, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips keeps torchvision's layer indices as module names inside its slices.
    mapped = {}
    for slice_name, block in model.net.named_children():
        for index, _ in block.named_children():
            for kind in ("weight", "bias"):
                key = f"features.{index}.{kind}"
                if key in state:
                    mapped[f"{slice_name}.{index}.{kind}"] = state[key]
    wanted = {k for k in model.net.state_dict()}
    if set(mapped) != wanted:
        raise PerceptualWeightsError(f"{path} does not look like torchvision's {net} weights")
    try:
        model.net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:  # right names, wrong shapes (e.g. the other network's file)
        raise PerceptualWeightsError(
            f"{path} does not look like torchvision's {net} weights: {exc}") from None


def build_perceptual(kind: str, trunk_path: str | os.PathLike | None = None) -> nn.Module | None:
    """A frozen LPIPS module (inputs in [-1, 1], output (N, 1, 1, 1)), or None for ``"none"``."""
    if kind == "none":
        return None
    import lpips

    net = "alex" if kind == "lpips-alex" else "vgg"
    found = None
    if kind != "lpips-vgg-random-trunk":
        # Look for the trunk before building anything: a missing file fails in milliseconds,
        # not after constructing a 138 M-parameter VGG.
        candidates = [Path(trunk_path)] if trunk_path else trunk_search_paths(net)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise PerceptualWeightsError(_missing_trunk_message(net, candidates))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if found is not None:
        _load_trunk(model, net, found)
    model.eval().requires_grad_(False)
    return model
