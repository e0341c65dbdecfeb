"""Model registry: `create_model(name, dataset)` builds a network for a dataset's input shape and classes.

Models take inputs in [0, 1]. Whether a model normalises them (per channel, with the dataset's mean and
std, inside the model so attacks still work in pixel space) is a property of its registry entry
(`MODELS.register(..., normalize=False)`), as its official code does: the paper's LeNet+ and
WideResNet-28-10 take raw [0, 1] inputs (SAT-Rx tools/networks/*.py have no normalisation), the
ResNets of Wong et al. normalise.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import dataset_info
from ..registry import Registry

MODELS: Registry = Registry("model")


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so attacks work in [0, 1] pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def input_layer(mean, std) -> nn.Module:
    """`Normalize` for a model built with the dataset's statistics, identity for one built without."""
    return nn.Identity() if mean is None else Normalize(mean, std)


def normalizes_inputs(name: str) -> bool:
    """Whether the registered model normalises its inputs (default: yes)."""
    return bool(MODELS.entry(name).meta.get("normalize", True))


def create_model(name: str, dataset: str) -> nn.Module:
    entry = MODELS.entry(name)
    info = dataset_info(dataset)
    c, h, w = info.input_shape
    supported = entry.meta.get("input_sizes")
    if supported is not None and (h, w) not in supported:
        raise ValueError(f"model {name!r} expects inputs of size {supported}, dataset {dataset!r} has {(h, w)}")
    mean, std = (info.mean, info.std) if normalizes_inputs(name) else (None, None)
    return entry.obj(in_channels=c, num_classes=info.num_classes, mean=mean, std=std, image_size=h)


def model_title(name: str) -> str:
    """The architecture's display name (a model not registered in this process shows as its key)."""
    return MODELS.entry(name).meta.get("title", name) if name in MODELS else name


def list_models() -> list[str]:
    return MODELS.names()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from . import lenet, resnet, tiny, wrn  # noqa: E402,F401  (registers the models)
