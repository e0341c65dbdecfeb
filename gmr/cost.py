"""The cost ledger: forward/backward passes counted by hooks, synchronised timers, memory, device facts."""
from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PassCount:
    """Sample-passes: one forward (or backward) of one example through the model counts 1."""
    forward: float = 0.0
    backward: float = 0.0

    @property
    def passes(self) -> float:
        """Forward+backward pairs: what the literature calls the cost of a method in 'passes'."""
        return (self.forward + self.backward) / 2


class PassCounter:
    """Counts examples through the model's forward and through the backward into its output.

    A forward hook on the root module counts the batch; when the output takes part in autograd, a hook
    on it counts the batch again each time a gradient reaches it (double backprop counts twice).
    """

    def __init__(self, model: nn.Module):
        self.count = PassCount()
        self.enabled = True
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output):
        if not self.enabled or not isinstance(output, torch.Tensor):
            return
        n = output.shape[0]
        self.count.forward += n
        if output.requires_grad:
            output.register_hook(self._on_backward(n))

    def _on_backward(self, n):
        def hook(grad):
            if self.enabled:
                self.count.backward += n
        return hook

    def remove(self) -> None:
        self._handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulating wall-clock timer that waits for queued GPU work at start and stop."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._start: float | None = None

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        self._start = None


DEVICES = "auto, cpu, cuda, cuda:N (N: the index of a GPU)"


def pick_device(name: str = "auto") -> torch.device:
    """The torch device of a --device value, or a ValueError of one line before any work.

    Only cpu and CUDA devices are accepted: the timers, the peak-memory figures and the device facts
    of every record know those two; torch's other device names (mps, meta, ...) are refused here rather
    than failing inside a training step."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"unknown device {name!r}; valid devices: {DEVICES}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use --device cpu or auto")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {name!r} asked for, but this machine has {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return device


def check_threads(threads: int | None) -> None:
    """Refuse more torch CPU threads than the machine has CPUs (a ValueError of one line): torch starts
    every one of them, and beyond the CPUs they only slow it down (or exhaust the process limit)."""
    cpus = os.cpu_count() or 1
    if threads is not None and threads > cpus:
        raise ValueError(f"threads must be at most the {cpus} CPUs of this machine, got {threads}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_facts(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(device),
        "device_name": name,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cuda_version": torch.version.cuda if device.type == "cuda" else None,
    }
