"""Speed helpers for one-GPU training and sampling: TF32, channels_last, fused AdamW, compile.

Each helper is a drop-in for a line the trainers or the pipeline already have, and falls back
to the plain path where the fast one does not exist (a CPU), so the same code runs in the tests.
The measured effect of each one on an H200 is in docs/design.md (Reference speed);
``ffhq-ldm bench`` measures it on the machine at hand.

With channels_last weights, call ``match_state_layout`` after loading an optimizer's state.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

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

    On CUDA it is what tensor-core convolutions run in (docs/design.md, Reference speed). On a
    CPU its effect depends on oneDNN's kernels for each shape, so it stays off there unless
    asked for (the tests ask, to run the same layout code the GPU runs).
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


def compile_wanted(module: torch.nn.Module, enabled: bool | None) -> bool:
    """Whether ``maybe_compile`` compiles: ``enabled`` if given, else $FFHQ_LDM_COMPILE, else CUDA.

    Compiling pays off on CUDA (docs/design.md: 1103 -> 2017 img/s); on a CPU it costs minutes of
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


def fused_supported(device) -> bool:
    """Whether torch's fused Adam/AdamW runs on this device type (it can skip on a device flag)."""
    return torch.device(device).type in ("cuda", "cpu", "mps", "xpu")
