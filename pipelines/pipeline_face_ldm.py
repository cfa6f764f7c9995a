"""FaceLDMPipeline: unconditional latent diffusion for faces.

This file imports only torch and diffusers (and its companion ``face_ldm_explore.py``), so an
exported pipeline folder can carry it as ``pipeline.py``, with the companion beside it, and
load on a machine without the ffhq_ldm package:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)

Differences from diffusers' deprecated ``LDMPipeline``: latents are created in the UNet's
dtype, the generator reaches ``scheduler.step`` (so eta > 0 is reproducible), ``latents=`` and
``output_type="pt"/"latent"`` are accepted, the VAE decodes in chunks and upcasts where its
config asks, and a VQ autoencoder whose scaling factor was never set is refused instead of
being decoded with Stable Diffusion's 0.18215.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .face_ldm_explore import FaceLDMExploreMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class PipelineArgumentError(ValueError):
    """An argument of ``FaceLDMPipeline.__call__`` that cannot work (the caller's mistake)."""


class FaceLDMPipeline(FaceLDMExploreMixin, DiffusionPipeline):
    """Sample faces: noise -> (UNet + scheduler) in latent space -> VAE decoder -> images.

    Also (face_ldm_explore.py): ``interpolate`` between two noises, ``invert`` images to
    noise with DDIM, ``inpaint`` a masked region.

    Args:
        vae: ``AutoencoderKL`` or ``VQModel`` whose config holds the measured ``scaling_factor``.
        unet: ``UNet2DModel`` that predicts noise (or v) for latents of the VAE's shape.
        scheduler: any diffusers scheduler (DDIM by default in exports; DDPM, DPM-Solver++,
            Euler work by swapping it, e.g. ``DPMSolverMultistepScheduler.from_config(...)``).
    """

    model_cpu_offload_seq = "unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    # -- helpers ----------------------------------------------------------------------------
    def _check_scaling_factor(self) -> float:
        config = self.vae.config
        value = config.get("scaling_factor")
        # diffusers lists every __init__ argument that was not passed in `_use_default_values`,
        # but register_to_config() never takes a key off that list. So a listed key only means
        # "defaulted" while it still holds the class default; a value measured and registered
        # after loading (what the error below asks for) must be accepted.
        param = inspect.signature(type(self.vae).__init__).parameters.get("scaling_factor")
        class_default = None if param is None else param.default
        listed = "scaling_factor" in (config.get("_use_default_values") or [])
        if value is None or (listed and value == class_default):
            raise ValueError(
                f"the {type(self.vae).__name__}'s config has no scaling_factor, so diffusers "
                "filled in Stable Diffusion's 0.18215, which is wrong for this autoencoder. "
                "Measure 1/std of its latents on training images and set it: "
                "vae.register_to_config(scaling_factor=...)")
        return float(config.scaling_factor)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained``, refusing a VAE whose scale was never set.

        diffusers does not save ``_use_default_values``: a defaulted 0.18215 would be written to
        vae/config.json as if it had been measured, and accepted when loaded again.
        """
        self._check_scaling_factor()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _extra_step_kwargs(self, generator, eta: float) -> dict:
        # Schedulers differ in what step() accepts: pass eta and generator only where they exist.
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def decode_latents(self, latents: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
        """Unscale and decode latents in chunks; images in [-1, 1], float32."""
        latents = latents / self._check_scaling_factor()
        vae_dtype = self.vae.dtype
        upcast = vae_dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:  # fp16 VAE decoders overflow to NaN; decode in fp32 as the config asks
            self.vae.to(torch.float32)
        dtype = self.vae.dtype
        images = []
        for chunk in latents.split(max(1, chunk_size)):
            images.append(self.vae.decode(chunk.to(dtype)).sample.float())
        if upcast:
            self.vae.to(vae_dtype)
        return torch.cat(images)

    def _check_call_arguments(self, batch_size, num_inference_steps, eta, latents,
                              decode_chunk_size) -> None:
        """Refuse, with a ValueError that names the argument, what would otherwise fail deep
        inside torch or the scheduler, or silently produce NaN images."""
        for name, value in (("batch_size", batch_size),
                            ("num_inference_steps", num_inference_steps),
                            ("decode_chunk_size", decode_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise PipelineArgumentError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta):
            raise PipelineArgumentError(f"eta must be a finite number, got {eta!r}")
        # DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 16) scales its noise
        # by eta; the step's direction term is sqrt(1 - alpha_{t-1} - sigma_t^2) (eq. 12), real at
        # every step for 0 <= eta <= 1 (eta = 1 is DDPM's posterior noise). Beyond 1 the root
        # turns negative on the last steps and the images come out NaN (black).
        if "eta" in inspect.signature(self.scheduler.step).parameters and not 0 <= eta <= 1:
            raise PipelineArgumentError(
                f"eta must be in [0, 1] for {type(self.scheduler).__name__} (0: deterministic "
                f"DDIM, 1: DDPM-like noise), got {eta!r}")
        if latents is not None and not (torch.is_tensor(latents)
                                        and torch.is_floating_point(latents)):
            raise PipelineArgumentError(
                "latents must be a floating-point torch.Tensor of shape (B, C, H, W), got "
                + type(latents).__name__
                + (f" of {latents.dtype}" if torch.is_tensor(latents) else ""))

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        decode_chunk_size: int = 16,
    ):
        """Generate ``batch_size`` images.

        Args:
            batch_size: number of images (ignored when ``latents`` is given).
            num_inference_steps: denoising steps (50 DDIM steps by default).
            generator: a ``torch.Generator``, or one per image for per-image reproducibility.
            eta: DDIM noise (0 = deterministic DDIM, 1 = DDPM-like); ignored by other samplers.
            latents: starting noise of shape (B, C, H, W); drawn from ``generator`` if None.
            output_type: "pil", "np" (float NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or
                "latent" (the final scaled latents, not decoded).
            callback_on_step_end: ``fn(pipe, step_index, timestep, callback_kwargs) -> dict``,
                called after every step with the tensors named in
                ``callback_on_step_end_tensor_inputs``; the returned "latents" replace them.
            decode_chunk_size: images decoded at once, so large batches fit in memory.
        """
        self._check_call_arguments(batch_size, num_inference_steps, eta, latents,
                                   decode_chunk_size)
        if output_type not in OUTPUT_TYPES:
            raise PipelineArgumentError(
                f"output_type must be one of {OUTPUT_TYPES}, not {output_type!r}")
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise PipelineArgumentError(
                f"callback tensors must be among {self._callback_tensor_inputs}")
        if output_type != "latent":
            self._check_scaling_factor()

        device = self._execution_device
        unet_dtype = self.unet.dtype
        latents = self._initial_latents(batch_size, generator, latents, device, unet_dtype)

        # The schedule stays on the host: the schedulers index their tables with the timestep
        # and branch on it, which on a GPU would wait for the device twice a step. The UNet gets
        # the same timesteps from one copy made here, so the host only queues kernels.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        unet_timesteps = timesteps.to(device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._extra_step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, unet_timesteps[i]).sample
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
            latents = latents.to(unet_dtype)  # some schedulers compute in fp32
            if callback_on_step_end is not None:
                local = {"latents": latents}
                result = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs})
                latents = (result or {}).get("latents", latents)

        images = self._output(latents, output_type, decode_chunk_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _initial_latents(self, batch_size, generator, latents, device, dtype) -> torch.Tensor:
        """The starting noise: ``latents`` checked and moved, or drawn from ``generator``."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = self.unet.config.in_channels
        if latents is not None:
            if latents.ndim != 4 or tuple(latents.shape[1:]) != (channels, height, width):
                raise PipelineArgumentError(
                    f"latents must have shape (B, {channels}, {height}, {width}), "
                    f"got {tuple(latents.shape)}")
            batch_size = latents.shape[0]  # given latents fix the batch
        if batch_size < 1:
            raise PipelineArgumentError(f"batch_size must be >= 1, got {batch_size}")
        # Checked against the effective batch, also when latents are given: scheduler.step
        # draws eta > 0 noise from these generators, one per image.
        if isinstance(generator, list) and len(generator) != batch_size:
            raise PipelineArgumentError(
                f"got {len(generator)} generators for a batch of {batch_size}")
        if latents is None:
            shape = (batch_size, channels, height, width)
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype)

    def _output(self, latents: torch.Tensor, output_type: str, decode_chunk_size: int):
        """Final latents as the requested ``output_type``."""
        if output_type == "latent":
            return latents
        images = (self.decode_latents(latents, decode_chunk_size) / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            return images.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            return self.numpy_to_pil(images.cpu().permute(0, 2, 3, 1).numpy())
        return images


__all__ = ["FaceLDMPipeline", "PipelineArgumentError"]
