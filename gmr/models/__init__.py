"""Model registry: `create_model(name, dataset)` builds a network for a dataset's input shape and classes.

Models take inputs in [0, 1]; those that want normalised inputs carry a `Normalize` layer.
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


def create_model(name: str, dataset: str) -> nn.Module:
    entry = MODELS.entry(name)
    info = dataset_info(dataset)
    c, h, w = info.input_shape
    supported = entry.meta.get("input_sizes")
    if supported is not None and (h, w) not in supported:
        raise ValueError(f"model {name!r} expects inputs of size {supported}, dataset {dataset!r} has {(h, w)}")
    return entry.obj(in_channels=c, num_classes=info.num_classes, mean=info.mean, std=info.std,
                     image_size=h)


def model_title(name: str) -> str:
    """The architecture's display name (a model not registered in this process shows as its key)."""
    return MODELS.entry(name).meta.get("title", name) if name in MODELS else name


def list_models() -> list[str]:
    return MODELS.names()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from . import lenet, resnet, tiny, wrn  # noqa: E402,F401  (registers the models)
