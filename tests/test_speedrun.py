"""config/cifar10-speedrun.yaml end to end on tiny synthetic CIFAR-10-shaped data: every rule of the study
(PreActResNet-18, five methods in bf16, the cyclic lr, AutoAttack, audits, tables) runs on CPU with its
sizes cut down; the numbers mean nothing, the plumbing is what is checked.

Real CIFAR-10 cannot be downloaded here, and torchvision refuses files whose MD5 differs from the real
ones, so the data root holds tiny batches in the real on-disk format (cifar-10-batches-py pickles) plus
gmr's decoded-tensor cache of them (gmr/data.py), which is what every job then reads.
"""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gmr.data import _write_cache

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "cifar10-speedrun.yaml"
METHODS = ["fgsm_rs", "n_fgsm", "gmr", "gradalign", "fgsm"]


def synthetic_cifar10(root: Path, n_train: int = 48, n_test: int = 32) -> Path:
    """A data root with n_train + n_test random 3x32x32 images (labels by a fixed rule of the mean colour
    so a model can fit something)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = gen.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = (data.reshape(n, 3, -1).mean(2).argmax(1) * 3 + np.arange(n) % 3) % 10
        splits[name] = (data, labels)
    batches = {f"data_batch_{i}": i for i in range(1, 6)}
    for file, i in batches.items():  # the training images spread over the five batches
        data, labels = splits["train"][0][i - 1::5], splits["train"][1][i - 1::5]
        _pickle(folder / file, data, labels)
    _pickle(folder / "test_batch", *splits["test"])
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    order = np.concatenate([np.arange(n_train)[i::5] for i in range(5)])  # torchvision reads batch by batch
    for train, (data, labels) in ((True, (splits["train"][0][order], splits["train"][1][order])),
                                  (False, splits["test"])):
        _write_cache("CIFAR10", root, train, torch.from_numpy(data), torch.from_numpy(labels).long())
    return root


def _pickle(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "wb") as fh:
        pickle.dump({"data": data.reshape(len(data), -1), "labels": labels.tolist()}, fh)


def small_speedrun(path: Path, data_root: Path) -> Path:
    """The speedrun study with every size cut down and on the CPU (no GPU slots)."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.pop("gpus")
    # the RobustBench rows need the zoo's checkpoints (downloaded on first use); tests/test_zoo.py runs
    # the workflow's zoo rows offline on stand-in checkpoints, so this reduced run leaves them out
    assert cfg["experiments"]["speedrun"].pop("zoo_models") == ["Wong2020Fast", "Andriushchenko2020Understanding"]
    cfg.update(results="results", data_root=str(data_root), device="cpu")
    cfg["train"].update(epochs=1, batch_size=16, n_train=32, val_size=16, n_val=16, probe_pgd_steps=1)
    cfg["evaluate"].update(n_test=16, attack_params={"pgd": {"steps": 2}, "pgd_cw": {"steps": 2}})
    cfg["evaluate"]["autoattack"]["n_test"] = 4
    cfg["diagnose"].update(n_test=8, n_curve=4, quick=True)
    cfg["resources"] = {rule: {"threads": 1, "mem_mb": 3000, "runtime": 30}
                        for rule in ("train", "evaluate", "autoattack", "diagnose", "summary")}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_speedrun_study_runs_end_to_end_on_synthetic_cifar10(tmp_path):
    data_root = synthetic_cifar10(tmp_path / "data")
    config = small_speedrun(tmp_path / "config.yaml", data_root)
    proc = subprocess.run(["timeout", "-s", "INT", "1500", sys.executable, "-m", "snakemake", "--snakefile",
                           str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(config),
                           "--cores", "2"], capture_output=True, text=True)
    logs = "".join(f"\n--- {p}:\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.rglob("logs/**/*.log")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + logs
    results = tmp_path / "results"
    for method in METHODS:
        record = json.loads((results / f"runs/speedrun/{method}/eps8-255/seed0/run.json").read_text())
        assert record["config"]["model"] == "preact_resnet18" and record["config"]["schedule"] == "cyclic"
        assert record["config"]["precision"] == "bf16" and record["cost"]["precision"] == "bf16"
        assert record["eps"] == pytest.approx(8 / 255)
        assert (results / f"eval/speedrun/{method}/eps8-255/seed0/best-autoattack.json").exists()
    for method in ("fgsm", "gmr"):
        assert (results / f"diagnostics/speedrun/{method}/eps8-255/seed0/audit.json").exists()
    with open(results / "tables" / "cost.csv") as fh:
        assert {row["method"] for row in csv.DictReader(fh)} == set(METHODS)
    assert (results / "tables" / "comparisons.csv").stat().st_size > 0
