"""Exports in diffusers format: the autoencoder folder and the self-contained pipeline folder.

Both are written to a temporary folder and renamed into place, so a reader never sees half of
one. A pipeline folder carries ``pipeline.py`` (the pipeline's source, which imports only
torch and diffusers), its companion ``face_ldm_explore.py`` and a model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..data.split import SPLIT_FILE
from ..io import replace_dir

# Files of pipelines/ that pipeline_face_ldm.py imports, copied beside pipeline.py on export.
PIPELINE_COMPANIONS = ("face_ldm_explore.py",)


def export_vae(vae, out_dir: Path, scaling_factor: float, split: dict) -> Path:
    """Save ``vae`` with its measured scaling factor, plus the data split it was trained on."""
    out_dir = Path(out_dir)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir


def pipeline_source() -> Path:
    import pipelines.pipeline_face_ldm as module

    return Path(module.__file__)


def export_pipeline(pipeline, out_dir: Path, card: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) + ``pipeline.py`` + ``README.md`` model card."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    shutil.copyfile(pipeline_source(), tmp / "pipeline.py")
    for name in PIPELINE_COMPANIONS:  # pipeline.py imports them relatively
        shutil.copyfile(pipeline_source().with_name(name), tmp / name)
    (tmp / "README.md").write_text(model_card(pipeline, card or {}))
    replace_dir(tmp, out_dir)
    return out_dir


def parameter_count(module) -> str:
    """"189,703,232 (189.7 M)"; small models exactly, without a misleading "0.0 M"."""
    n = sum(p.numel() for p in module.parameters())
    return f"{n:,} ({n / 1e6:.1f} M)" if n >= 1e6 else f"{n:,}"


def model_card(pipeline, card: dict) -> str:
    """A README for the exported folder: what it is, how it was trained, how to sample."""
    vae, unet, sched = pipeline.vae, pipeline.unet, pipeline.scheduler
    n_unet = parameter_count(unet)
    n_vae = parameter_count(vae)
    size = unet.config.sample_size
    metrics = card.get("metrics") or {}
    c = sched.config
    schedule = (f"{c.beta_schedule}, beta {c.beta_start} to {c.beta_end}, "
                f"{c.num_train_timesteps} steps")
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in metrics.items()) or "| (none measured) | |"
    return f"""---
library_name: diffusers
tags: [unconditional-image-generation, latent-diffusion, faces]
---
# FaceLDM pipeline

An unconditional latent diffusion model for faces, trained with the FaceLDM package
(stage 1: {type(vae).__name__}, {n_vae} parameters; stage 2: UNet2DModel, {n_unet}
parameters, on {unet.config.in_channels}x{size}x{size} latents; latent scaling factor
{vae.config.scaling_factor:.5f}, measured as 1/std of training latents).

## Training
| setting | value |
|---|---|
| data | {card.get("data", "unknown")} |
| preset | {card.get("preset", "unknown")} |
| steps | {card.get("step", "unknown")} |
| batch size | {card.get("batch_size", "unknown")} |
| images seen | {card.get("images_seen", "unknown")} |
| noise schedule | {schedule} |
| prediction | {sched.config.prediction_type} |
| weights | {card.get("weights") or f"EMA (decay {card.get('ema_decay', 'unknown')})"} |

## Measured
| metric | value |
|---|---|
{metric_lines}

## Sampling
With FaceLDM installed:

```python
from pipelines import FaceLDMPipeline
pipe = FaceLDMPipeline.from_pretrained("path/to/this/folder")
images = pipe(batch_size=16, num_inference_steps=50).images
```

With only torch and diffusers installed, this folder carries its own pipeline code
(`pipeline.py`); diffusers asks you to allow local code explicitly:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
```

Other samplers: `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`
(or `DDPMScheduler`, `EulerDiscreteScheduler`).

## License
FFHQ is published by NVIDIA under CC BY-NC-SA 4.0: a model trained on it is for
non-commercial use. A model trained on the built-in synthetic faces carries no such limit.
"""
