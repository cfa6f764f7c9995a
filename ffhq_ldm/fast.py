"""Speed helpers for one-GPU training and sampling: TF32, channels_last, fused AdamW, compile.

Each helper is a drop-in for a line the trainers or the pipeline already have, and falls back
to the plain path where the fast one does not exist (a CPU), so the same code runs in the tests.
The measured effect of each one on an H200 is in DESIGN.md section 5; ``ffhq-ldm bench``
measures it on the machine at hand.

``FastTrainStep`` is one UNet optimizer step from the latent cache that never waits for the
GPU: inputs are drawn on the device, the loss stays there, gradient clipping uses the norm as
a tensor, the optimizer is fused and the EMA is one ``torch._foreach_lerp_``. The host only
queues kernels, so it runs ahead of the GPU; read the loss (one sync) only when logging.

With channels_last weights, call ``match_state_layout`` after loading an optimizer's state.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import NamedTuple

import torch

# "0" turns compilation off wherever ``maybe_compile`` decides by itself (enabled=None),
# "1" turns it on even off CUDA: an opt-out for the trainers without a new command-line flag.
COMPILE_ENV = "FFHQ_LDM_COMPILE"
# The same for channels_last weights in the trainers (``channels_last_wanted``).
CHANNELS_LAST_ENV = "FFHQ_LDM_CHANNELS_LAST"


def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip()
    return value == "1" if value in ("0", "1") else None


def enable_tf32() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and newer).

    Under bf16 autocast most FLOPs are bf16 anyway; this covers what autocast keeps in fp32
    (the loss, GroupNorm's statistics, anything run outside autocast). PyTorch already allows
    TF32 for cuDNN convolutions by default but not for matmuls. No effect on a CPU.
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def enable_cudnn_autotune() -> None:
    """Let cuDNN time its convolution algorithms once per shape and keep the fastest.

    Worth it when shapes never change (one batch size for a whole run, as here); the first step
    of each new shape pays for the search. No effect on a CPU.
    """
    torch.backends.cudnn.benchmark = True


def channels_last_wanted(device) -> bool:
    """Whether the trainers store their models channels_last: $FFHQ_LDM_CHANNELS_LAST, else CUDA.

    On CUDA it is what tensor-core convolutions run in (DESIGN.md section 5). On a CPU its effect
    depends on oneDNN's kernels for each shape, so it stays off there unless asked for (the tests
    ask, to run the same layout code the GPU runs).
    """
    env = _env_switch(CHANNELS_LAST_ENV)
    return env if env is not None else torch.device(device).type == "cuda"


def to_channels_last(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Store the module's 4-D weights NHWC, the layout tensor-core convolutions run in.

    Without it cuDNN transposes activations around every convolution. Only the layout of 4-D
    tensors changes: state_dict keys and values stay the same, but those tensors are no longer
    contiguous, so safetensors' ``save_file`` needs ``.contiguous()`` on them (``save_model``,
    diffusers' ``save_pretrained``, ``EMA.save`` and ``checkpoints`` take care of it), and a loaded
    optimizer state needs ``match_state_layout``. Returns ``module`` (unchanged if not
    ``enabled``).
    """
    return module.to(memory_format=torch.channels_last) if enabled else module


def match_state_layout(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory layout.

    Call it after loading an optimizer's state. Checkpoints store tensors contiguous, but a
    channels_last weight's moments are created channels_last; fused AdamW walks parameter,
    gradient and moments as flat memory, so after such a load it would pair each weight with
    another element's moments, silently (seen on CPU: weights off by 1.5x the learning rate
    after one more step; assume the same of the CUDA kernel). Foreach and for-loop AdamW index
    logically and are unaffected. Returns the optimizer.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (torch.is_tensor(value) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    return optimizer


def _device_of(params: list, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return params[0].device if params else torch.device("cpu")


def make_adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, device=None,
               eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the fastest implementation the device has: fused on CUDA, foreach otherwise.

    The fused kernel updates every parameter in a handful of launches and keeps its step
    counters on the GPU (no host sync). Same maths as ``torch.optim.AdamW``; with
    ``weight_decay=0`` it is Adam, so the autoencoder's optimisers can use it too.
    ``params`` may be parameters or parameter groups, as for ``torch.optim.AdamW``.
    """
    params = list(params)
    groups = [g["params"] if isinstance(g, dict) else [g] for g in params]
    flat = [p for group in groups for p in group]
    kwargs = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if _device_of(flat, device).type == "cuda" and torch.cuda.is_available():
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def compile_wanted(module: torch.nn.Module, enabled: bool | None) -> bool:
    """Whether ``maybe_compile`` compiles: ``enabled`` if given, else $FFHQ_LDM_COMPILE, else CUDA.

    Compiling pays off on CUDA (DESIGN.md: 1103 -> 2017 img/s); on a CPU it costs minutes of
    compile time for tiny models, so it stays off there unless asked for.
    """
    if enabled is not None:
        return bool(enabled)
    env = _env_switch(COMPILE_ENV)
    if env is not None:
        return env
    param = next(module.parameters(), None)
    return param is not None and param.device.type == "cuda"


def maybe_compile(module: torch.nn.Module, enabled: bool | None = None, mode: str | None = None,
                  *, backend: str = "inductor", fullgraph: bool = False, in_place: bool = False):
    """``torch.compile`` the module when wanted (see ``compile_wanted``); else return it as is.

    Shapes are static (``dynamic=False``): training and sampling run at one batch size, and a
    static graph lets inductor pick the best kernels; a new batch size recompiles. Call it
    after the module is on its device (after ``accelerator.prepare``): the default decision
    looks at where its parameters are.

    By default the module is left untouched and the compiled wrapper is returned: call the
    wrapper, but save, EMA and unwrap the original (the wrapper's state_dict keys carry an
    ``_orig_mod.`` prefix). ``in_place=True`` compiles the module's own ``__call__``
    (``nn.Module.compile``) and returns the module: for a model held by something else, such
    as ``pipe.unet``, whose type and state_dict keys must stay the same.
    """
    if not compile_wanted(module, enabled):
        return module
    options = dict(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False)
    if in_place:
        module.compile(**options)
        return module
    return torch.compile(module, **options)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """bf16 (or other) autocast on ``device``; a no-op context for ``dtype=None`` (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class StepResult(NamedTuple):
    """What one ``FastTrainStep`` call leaves on the device (nothing here has been read back)."""

    loss: torch.Tensor  # mean over the micro-batches, detached
    logs: dict  # the loss's logs for the last micro-batch
    grad_norm: torch.Tensor | None  # before clipping; None when grad_clip is 0
    skipped: torch.Tensor | None  # the guard's device flag (True: no update); None: no guard


class FastTrainStep:
    """One optimizer step of the UNet on latent-cache entries, with no host-device sync.

    Args:
        model: the UNet (or its DDP wrapper); its parameters are clipped and stepped.
        loss_fn: ``ffhq_ldm.losses.diffusion.DiffusionLoss`` (or any ``(model, z, noise, t)``
            callable returning ``(loss, logs)``).
        optimizer: e.g. ``make_adamw(model.parameters(), ...)``.
        ema: ``ffhq_ldm.train_utils.EMA`` of ``ema_model`` (default: ``model``), or None.
        forward: what to call for the forward pass, e.g. ``maybe_compile(model)``; default model.
        lr_scheduler: stepped once per call (host-side arithmetic only), or None.
        grad_clip: max gradient norm; 0 disables.
        autocast_dtype: ``torch.bfloat16`` (default) or None for fp32. Ignored when an
            ``accelerator`` is given: then its mixed-precision setting decides, as everywhere.
        accelerator: an ``accelerate.Accelerator`` for autocast, backward, clipping and
            ``no_sync`` (DDP), or None for plain PyTorch.
        guard: a ``train_utils.NonFiniteGuard``: a non-finite loss or gradient norm then skips
            the optimizer and EMA updates (on the device, in its deferred mode). The caller
            still records the outcome (``guard.record(result.skipped, step)``).

    Call with the latent cache (on the device) and one batch from
    ``ffhq_ldm.losses.diffusion.draw_global_batch`` / ``slice_for`` (on the device), or a list
    of such micro-batches to accumulate into one optimizer step. Returns a ``StepResult``.
    """

    def __init__(self, model, loss_fn, optimizer, *, ema=None, ema_model=None, forward=None,
                 lr_scheduler=None, grad_clip: float = 1.0,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, accelerator=None,
                 guard=None):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.ema, self.ema_model = ema, ema_model if ema_model is not None else model
        self.forward = forward if forward is not None else model
        self.lr_scheduler, self.grad_clip = lr_scheduler, grad_clip
        self.autocast_dtype, self.accelerator, self.guard = autocast_dtype, accelerator, guard
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _autocast(self, device):
        if self.accelerator is not None:
            return self.accelerator.autocast()
        return autocast(device, self.autocast_dtype)

    def __call__(self, cache, batches) -> StepResult:
        batches = [batches] if isinstance(batches, dict) else list(batches)
        acc = self.accelerator
        total = None
        for i, part in enumerate(batches):
            last = i == len(batches) - 1
            # DDP all-reduces gradients on the last micro-batch only
            no_sync = acc.no_sync(self.model) if acc is not None and not last else nullcontext()
            with no_sync:
                z = cache.sample(part["indices"], noise=part["latent_noise"])
                # The loss computes its target and MSE in fp32 itself; the UNet runs in bf16.
                with self._autocast(z.device):
                    loss, logs = self.loss_fn(self.forward, z, part["noise"], part["timesteps"])
                scaled = loss / len(batches)
                if acc is not None:
                    acc.backward(scaled)
                else:
                    scaled.backward()
            total = scaled.detach() if total is None else total + scaled.detach()
        grad_norm = None
        if self.grad_clip > 0:
            # The norm stays a tensor and the scaling min(1, clip / norm) happens on the
            # device: no .item(), so no sync (error_if_nonfinite=True would add one).
            clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
            grad_norm = clip(self.params, self.grad_clip).detach()
        skipped = None
        if self.guard is not None:
            skipped = self.guard.flag(total, grad_norm)
            ok = self.guard.step(self.optimizer, skipped)  # zeroes the gradients either way
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()  # follows the step count, skipped steps included
        if self.ema is not None:
            if self.guard is not None:
                self.ema.update(self.ema_model, enabled=ok)
            else:
                self.ema.update(self.ema_model)
        return StepResult(total, logs, grad_norm, skipped)
