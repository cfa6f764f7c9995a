"""What an exported pipeline folder must hold before it is loaded and sampled from.

diffusers loads whatever the JSON says: an unknown class is a deep ``AttributeError``, a
``num_train_timesteps`` of 0 a ``ZeroDivisionError``, a huge ``sample_size`` a memory error,
and a ``scaling_factor`` of 0 or betas outside (0, 1) give NaN latents that are written as
black PNGs with exit code 0. ``check_pipeline_folder`` reads only the JSON files and refuses
each of these in one line (``UsageError``, exit code 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..cli_common import UsageError

COMPONENTS = {"unet": ("UNet2DModel",), "vae": ("AutoencoderKL", "VQModel"),
              "scheduler": ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                            "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                            "PNDMScheduler")}
MAX_IMAGE_SIZE = 4096  # pixels a side; FaceLDM trains at 128
MAX_LATENT_SIZE = 1024


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: not a complete exported pipeline") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object")
    return data


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer_in(config: dict, key: str, low: int, high: int, where: Path) -> None:
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UsageError(f"{where}: {key} must be an integer in [{low}, {high}], not {value!r}")


def check_scheduler(config: dict, where: Path) -> None:
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UsageError(f"{where}: num_train_timesteps must be an integer >= 1, not {steps!r}")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != steps:
            raise UsageError(f"{where}: trained_betas must list {steps} values (one per "
                             "training timestep)")
        if not all(_number(b) and 0 < b < 1 for b in betas):
            raise UsageError(f"{where}: every trained_betas value must lie in (0, 1)")
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if value is not None and not (_number(value) and 0 < value < 1):
            raise UsageError(f"{where}: {key} must lie in (0, 1), not {value!r}")


def check_vae_config(config: dict, where: Path) -> None:
    scale = config.get("scaling_factor")
    if scale is not None and not (_number(scale) and scale > 0):
        raise UsageError(f"{where}: scaling_factor must be a finite number > 0, not {scale!r}")
    _integer_in(config, "sample_size", 1, MAX_IMAGE_SIZE, where)


def check_pipeline_folder(path: Path) -> None:
    """Refuse, in one line, an exported pipeline whose JSON cannot describe a working model."""
    path = Path(path)
    index = _json(path / "model_index.json")
    for name, allowed in COMPONENTS.items():
        entry = index.get(name)
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
        if cls not in allowed:
            raise UsageError(f"{path / 'model_index.json'}: {name} is {cls!r}, not one of "
                             f"{', '.join(allowed)}")
    scheduler = path / "scheduler" / "scheduler_config.json"
    check_scheduler(_json(scheduler), scheduler)
    vae_file, unet_file = path / "vae" / "config.json", path / "unet" / "config.json"
    vae, unet = _json(vae_file), _json(unet_file)
    check_vae_config(vae, vae_file)
    _integer_in(unet, "sample_size", 1, MAX_LATENT_SIZE, unet_file)
    if vae.get("latent_channels") != unet.get("in_channels"):
        raise UsageError(f"{path}: the UNet takes {unet.get('in_channels')} channels, the "
                         f"autoencoder's latents have {vae.get('latent_channels')}")
