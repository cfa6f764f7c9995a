"""The optimizer steps the trainers run, and ``ffhq-ldm bench`` times: one object per stage.

``UNetTrainStep`` is one UNet optimizer step from the latent cache that never waits for the
GPU: inputs are drawn on the device, the loss stays there, gradient clipping uses the norm as
a tensor, the optimizer is fused and the EMA is one ``torch._foreach_lerp_``. The host only
queues kernels, so it runs ahead of the GPU; read the loss (one sync) only when logging.

``AutoencoderTrainStep`` is one step of stage 1: the autoencoder's update (L1 + LPIPS + KL/VQ,
plus the adaptive-weight GAN term from ``disc_start``) and then the discriminator's.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

from ..speed import autocast, fused_supported


class StepResult(NamedTuple):
    """What one ``UNetTrainStep`` call leaves on the device (nothing here has been read back)."""

    loss: torch.Tensor  # mean over the micro-batches, detached
    logs: dict  # the loss's logs for the last micro-batch
    grad_norm: torch.Tensor | None  # before clipping; None when grad_clip is 0
    skipped: torch.Tensor | None  # the guard's device flag (True: no update); None: no guard


class _Step:
    """What both steps share: autocast, backward and clipping through accelerate when there is
    one (mixed precision, DDP), plain PyTorch otherwise."""

    accelerator = None
    autocast_dtype: torch.dtype | None = None
    grad_clip = 0.0
    params: list = []

    def _autocast(self, device):
        if self.accelerator is not None:
            return self.accelerator.autocast()
        return autocast(device, self.autocast_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _clip(self) -> torch.Tensor | None:
        """The gradient norm before clipping (None when clipping is off). The norm stays a
        tensor and the scaling min(1, clip / norm) happens on the device: no .item(), so no
        sync (error_if_nonfinite=True would add one)."""
        if self.grad_clip <= 0:
            return None
        acc = self.accelerator
        clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
        return clip(self.params, self.grad_clip).detach()


class UNetTrainStep(_Step):
    """One optimizer step of the UNet on latent-cache entries, with no host-device sync.

    Args:
        model: the UNet (or its DDP wrapper); its parameters are clipped and stepped.
        loss_fn: ``ffhq_ldm.losses.diffusion.DiffusionLoss`` (or any ``(model, z, noise, t)``
            callable returning ``(loss, logs)``).
        optimizer: e.g. ``unet_optimizer(config, model, device)``.
        ema: ``ffhq_ldm.train.ema.EMA`` of ``ema_model`` (default: ``model``), or None.
        forward: what to call for the forward pass, e.g. ``maybe_compile(model)``; default model.
        lr_scheduler: stepped once per call (host-side arithmetic only), or None.
        grad_clip: max gradient norm; 0 disables.
        autocast_dtype: ``torch.bfloat16`` (default) or None for fp32. Ignored when an
            ``accelerator`` is given: then its mixed-precision setting decides, as everywhere.
        accelerator: an ``accelerate.Accelerator`` for autocast, backward, clipping and
            ``no_sync`` (DDP), or None for plain PyTorch.
        guard: a ``resilience.NonFiniteGuard``: a non-finite loss or gradient norm then skips
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
                self._backward(scaled)
            total = scaled.detach() if total is None else total + scaled.detach()
        grad_norm = self._clip()
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


class _Adversarial(torch.nn.Module):
    """The generator's adversarial term −mean D(x̂) as its own module: compiled, it is a graph
    of its own, apart from the discriminator's step (whose inputs need no gradient)."""

    def __init__(self, discriminator: torch.nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        return -self.discriminator(x_hat).float().mean()


class AutoencoderTrainStep(_Step):
    """One stage-1 step: the autoencoder's update, then (from ``disc_start``) the discriminator's.

    The loss is LDM's (``losses.autoencoder``), with the adaptive GAN weight
    λ = disc_weight · clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4) (Esser et al. 2021, eq. 7)
    for the decoder's last layer L. LDM differentiates nll and g with respect to L through
    LPIPS and the discriminator, then backpropagates the whole loss through them again. Here
    the image-space terms run on a detached copy of x̂, so LPIPS and the discriminator go
    backward once each, giving ∂nll/∂x̂ and ∂g/∂x̂; the gradients on L are those two chained
    through L alone (L = ``decoder.conv_out`` runs outside the compiled model for this); and
    ∂nll/∂x̂ + λ ∂g/∂x̂ then goes back through the autoencoder once. Loss, λ and every
    gradient are LDM's (tests/test_autoencoder_step.py checks them against the formula).

    Args:
        recon_model: ``models.vae.Reconstructor`` (or its DDP wrapper): ``x -> (x̂, mean, logvar,
            vq_loss)`` in one forward, or the last layer's input instead of x̂.
        loss_fn: ``losses.autoencoder.AutoencoderLoss`` (its ``discriminator`` is the one
            ``opt_d`` steps).
        opt_g, opt_d: the autoencoder's and the discriminator's optimisers.
        last_layer: the decoder's last convolution (``decoder.conv_out`` of the plain VAE);
            the adaptive weight differentiates against its weight.
        grad_clip: max gradient norm of the autoencoder's update; 0 disables.
        accelerator / autocast_dtype / guard: as for ``UNetTrainStep``. With a guard, a
            non-finite loss (or gradient norm) skips that optimiser's update.
        compile: torch.compile (static shapes) the autoencoder up to its last layer, LPIPS,
            and the discriminator (None: on CUDA only, see ``speed.compile_wanted``).
        compile_mode / compile_backend: ``torch.compile``'s mode and backend.
        ldm_reference: compute the adaptive weight as LDM's code does (``generator_loss``:
            two ``autograd.grad`` calls, then the full backward), eager: the baseline that
            ``ffhq-ldm bench`` times against.

    Call with a batch of images in [-1, 1] on the device and the step number (it decides
    whether the GAN terms are on). Returns a ``StepResult``; ``skipped`` is True when either
    update was skipped.
    """

    def __init__(self, recon_model, loss_fn, opt_g, opt_d, *, last_layer: torch.nn.Module,
                 grad_clip: float = 0.0, autocast_dtype: torch.dtype | None = None,
                 accelerator=None, guard=None, compile: bool | None = False,
                 compile_mode: str | None = None, compile_backend: str = "inductor",
                 ldm_reference: bool = False):
        from ..speed import maybe_compile

        self.model, self.loss_fn, self.opt_g, self.opt_d = recon_model, loss_fn, opt_g, opt_d
        self.last_layer, self.grad_clip = last_layer, grad_clip
        self.autocast_dtype, self.accelerator, self.guard = autocast_dtype, accelerator, guard
        self.params = [p for p in recon_model.parameters() if p.requires_grad]
        self.ldm_reference = ldm_reference
        disc = loss_fn.discriminator
        plain_disc = accelerator.unwrap_model(disc) if accelerator is not None else disc
        # The generator's D call needs no gradient sync: the plain module, not DDP's wrapper.
        self.forward, self.perceptual = recon_model, loss_fn.perceptual
        self.adversarial, self.discriminator = _Adversarial(plain_disc), disc
        if ldm_reference:
            compile = False
        options = dict(mode=compile_mode, backend=compile_backend)
        self.forward = maybe_compile(recon_model, compile, **options)
        self.compiled = self.forward is not recon_model
        if self.compiled:
            if self.perceptual is not None:
                self.perceptual = maybe_compile(self.perceptual, True, **options)
            self.adversarial = maybe_compile(self.adversarial, True, **options)
            self.discriminator = maybe_compile(disc, True, **options)

    def _update(self, optimizer, *values) -> torch.Tensor | None:
        """Optimiser step unless a value is not finite (with a guard); gradients zeroed."""
        if self.guard is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return None
        bad = self.guard.flag(*values)
        self.guard.step(optimizer, bad)
        return bad

    def _ldm_generator(self, x: torch.Tensor, step: int):
        """LDM's way: the loss with its adaptive weight by ``autograd.grad``, then backward."""
        with self._autocast(x.device):
            x_hat, mean, logvar, vq_loss = self.model(x)
            loss, logs = self.loss_fn.generator_loss(
                x, x_hat, step, self.last_layer.weight,
                posterior=None if mean is None else (mean, logvar), vq_loss=vq_loss)
        self._backward(loss)
        return loss.detach(), logs, x_hat

    def _generator(self, x: torch.Tensor, step: int):
        """The same loss and gradients with one backward pass through each network."""
        fn = self.loss_fn
        with self._autocast(x.device):
            h, mean, logvar, vq_loss = self.forward(x, last_layer=False)
            x_hat = self.last_layer(h).float()
            posterior = None if mean is None else (mean, logvar)
            reg, logs = fn.regularizer(posterior, vq_loss)
        # the image-space terms on a detached copy of x̂: LPIPS and D go backward once each
        # (a view, not the leaf itself: torch's module tracker, e.g. under FlopCounterMode,
        # refuses autograd.grad with respect to a leaf that a module took as input)
        xh = x_hat.detach().requires_grad_().view_as(x_hat)
        with self._autocast(x.device):
            nll, nll_logs = fn.nll(x, xh, kl=posterior is not None, perceptual=self.perceptual)
            g_loss = self.adversarial(xh) if fn.disc_active(step) else None
        logs.update(nll_logs)
        grad = torch.autograd.grad(nll, xh)[0]  # ∂nll/∂x̂
        loss = nll.detach() + reg.detach()
        if g_loss is not None:
            g_grad = torch.autograd.grad(g_loss, xh)[0]  # ∂g/∂x̂
            # ∇_L by the chain rule through the last layer alone (its weight gradient only)
            last = self.last_layer.weight
            nll_l, g_l = (torch.autograd.grad(x_hat, last, g, retain_graph=True)[0]
                          for g in (grad, g_grad))
            weight = nll_l.float().norm() / (g_l.float().norm() + 1e-4)
            weight = fn.config.disc_weight * weight.clamp(0.0, 1e4)
            loss = loss + weight * g_loss.detach()
            grad = grad + weight * g_grad
            logs.update({"loss/g_adv": g_loss.detach(), "disc/adaptive_weight": weight})
        logs["loss/total"] = loss
        # Σ x̂ · ∂loss/∂x̂ + regulariser has the loss's gradients with respect to every weight
        self._backward((x_hat * grad).sum() + reg)
        return loss, logs, xh.detach()

    def __call__(self, x: torch.Tensor, step: int) -> StepResult:
        # the autoencoder's update (its loss includes the adaptive-weight GAN term once active)
        generator = self._ldm_generator if self.ldm_reference else self._generator
        loss, logs, x_hat = generator(x, step)
        grad_norm = self._clip()
        bad = self._update(self.opt_g, loss, grad_norm)

        # the discriminator's update, from disc_start on
        if self.loss_fn.disc_active(step):
            with self._autocast(x.device):
                d_loss, d_logs = self.loss_fn.discriminator_loss(
                    x, x_hat, step, discriminator=self.discriminator)
            self._backward(d_loss)
            bad_d = self._update(self.opt_d, d_loss)
            logs.update(d_logs)
            bad = bad if bad_d is None else bad | bad_d
        return StepResult(loss, logs, grad_norm, bad)


# ---------------------------------------------------------------------------------------------
# The trainers and the bench build their steps here, so both run the same optimiser rules.

def autoencoder_optimizers(config, vae, discriminator, device):
    """The autoencoder's and the discriminator's Adam, with the config's betas (LDM: 0.5, 0.9),
    fused wherever torch has a fused kernel: fewer launches, and the non-finite guard can skip
    a fused step on a device-side flag."""
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  fused=fused_supported(device))
    return (torch.optim.Adam(vae.parameters(), **kwargs),
            torch.optim.Adam(discriminator.parameters(), **kwargs))


def unet_optimizer(config, unet, device):
    """The UNet's AdamW (fused as above)."""
    return torch.optim.AdamW(unet.parameters(), lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.weight_decay, fused=fused_supported(device))


def warmup_lambda(warmup: int):
    """Linear warm-up to the base LR, then constant (LDM keeps the LR constant)."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup))
    return factor


def make_guard(max_in_row: int, device, optimizer, accelerator=None, write=None):
    """The non-finite guard in its sync-free (deferred) mode where the optimiser is fused and no
    GradScaler runs; summed over processes when there are several."""
    from .resilience import NonFiniteGuard

    fused = bool(optimizer.defaults.get("fused"))
    scaler = accelerator.scaler if accelerator is not None else None
    reduce = None
    if accelerator is not None and accelerator.num_processes > 1:
        reduce = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
    return NonFiniteGuard(max_in_row, device, deferred=fused and scaler is None, reduce=reduce,
                          write=write)
