"""Numeric precision and memory layout of the training step: what `--precision` means on each device.

The training step (the method's attack that makes the training batch, the loss, the backward) runs under
autocast in bf16 or fp16; the weights, the optimizer state and everything outside the step stay fp32.
Validation probes, evaluation attacks, AutoAttack and the masking audit never enter `autocast()`: they
run in fp32 (bf16 input gradients are coarse and can fake robustness; DESIGN.md section 4).

`auto` picks by device facts, each measured or documented:
- CPU with native bf16 (avx512_bf16 or AMX): bf16. Measured 2026-11-29 on an AMD EPYC with avx512_bf16,
  one GMR step of LeNet+ at batch 32, 1 thread: 1.5x faster under bf16 autocast than fp32, 2.0x with
  channels_last too; PreActResNet-18 at batch 32: 1.4x and 1.9x (to measure again: benchmarks/train_step.py
  --precision fp32,bf16 --layout contiguous, then channels_last); a whole GMR epoch of `gmr train` in bf16
  is 2.0x faster than a plain fp32 loop (README "Speed"). CPUs without these instructions do bf16
  arithmetic by converting to fp32 (no gain, only conversions; not measured here, no such CPU was at
  hand), so fp32 there.
- CUDA with bf16 support (compute capability 8.0 and later, `torch.cuda.is_bf16_supported()`): bf16,
  whose fp32 exponent range needs no loss scaling; older GPUs: fp32 (fp16 stays an explicit choice).
fp16 needs a gradient scaler (`grad_scaler`) and is accepted on CUDA only: these CPUs have no native
fp16 arithmetic.

channels_last (`channels_last`): on CPU it made every measured step faster, in fp32 too (LeNet+ 1.12x to
1.19x, PreActResNet-18 1.05x to 1.17x; with bf16 it adds 1.06x to 1.34x on top of autocast); on CUDA it is the
layout tensor cores want for bf16/fp16 convolutions (PyTorch's memory-format tutorial), while its fp32
effect there is not measured, so fp32 on CUDA keeps the default layout. torch.compile is not used by
default: it made these steps about 2x slower on this CPU (`TrainConfig.compile` opts in).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), as torch's own dispatch sees it, else
    from /proc/cpuinfo (torch's probes are private and may move)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return bool(_cpuinfo_flags() & set(_BF16_FLAGS))


def resolve(precision: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for `precision` on `device`; a ValueError of one line for a value or a device
    that cannot run it (checked before any work)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions: {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA device (this CPU has no native fp16 arithmetic); "
                         "use bf16 or auto on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                         "use fp16 or fp32")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of one training step: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; for fp32 and bf16 the scaler is disabled (its
    scale(), step() and update() are then the plain backward and step)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def channels_last(precision: str, device: torch.device, model: torch.nn.Module) -> bool:
    """Whether the training step keeps the model's convolution weights in channels_last layout (the rule
    in the module docstring); models without 2-D convolutions keep theirs."""
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    return device.type == "cpu" or precision in DTYPES
