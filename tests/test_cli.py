"""The `gmr` command line: train end to end, YAML config with overrides, --keep-resume-state, bad input
exits 2 with one line before any work, evaluate writes JSON + npz once and loads the model once."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gmr.cli import main
from gmr.data import list_datasets
from gmr.methods import list_methods
from gmr.models import list_models

FILES = ["run.json", "train_log.csv", "model_best.pt", "model_last.pt"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(root, out, *extra) -> list[str]:
    return ["train", "--dataset", "mnist", "--model", "tiny_cnn", "--method", "fgsm", "--eps", "0.3",
            "--epochs", "1", "--batch-size", "32", "--n-train", "128", "--n-val", "32",
            "--probe-pgd-steps", "1", "--seed", "0", "--data-root", str(root), "--device", "cpu",
            "--threads", "1", "--out", str(out), "--no-progress", *extra]


def test_train_end_to_end(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(mnist_root, out)) == 0
    for name in FILES:
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["resume_state_kept"] is False
    assert meta["config"]["model"] == "tiny_cnn" and meta["config"]["n_train"] == 128
    assert meta["data"]["n_train"] == 128 and meta["data"]["n_val"] == 32
    printed = capsys.readouterr().out
    assert str(out) in printed and "best epoch 1" in printed
    # a second call finds the finished run and does not train again
    stamp = (out / "model_last.pt").stat().st_mtime_ns
    assert main(tiny_args(mnist_root, out)) == 0
    assert (out / "model_last.pt").stat().st_mtime_ns == stamp


def test_keep_resume_state(tmp_path, mnist_root):
    out = tmp_path / "run"
    assert main(tiny_args(mnist_root, out, "--keep-resume-state")) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["resume_state_kept"] is True and meta["config"]["keep_resume_state"] is True
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["run_id"] == meta["run_id"] and state["epoch"] == 1


def test_train_console_script(tmp_path, mnist_root):
    exe = Path(sys.executable).parent / "gmr"
    assert exe.exists(), f"console script missing at {exe}; reinstall the project"
    out = tmp_path / "run"
    proc = subprocess.run([str(exe), *tiny_args(mnist_root, out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all((out / name).is_file() for name in FILES)
    assert "best epoch" in proc.stdout


def test_yaml_config_with_cli_override(tmp_path, mnist_root):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": "mnist", "model": "tiny_cnn", "method": "rfgsm", "eps": 0.2, "epochs": 3,
        "batch-size": 16, "n_train": 64, "n_val": 16, "probe_pgd_steps": 1, "seed": 4,
        "data_root": str(mnist_root), "device": "cpu", "method_options": {"alpha": 0.02,
                                                                          "clean_fraction": 0.5}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--epochs", "1", "--opt", "alpha=0.05",
                 "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "run.json").read_text())
    cfg = meta["config"]
    assert cfg["epochs"] == 1                                   # command line wins
    assert cfg["method"] == "rfgsm" and cfg["seed"] == 4 and cfg["eps"] == 0.2
    assert cfg["batch_size"] == 16 and cfg["n_train"] == 64     # dashed YAML keys accepted
    assert meta["method_options"] == {"alpha": 0.05, "clean_weight": 0.5, "clean_fraction": 0.5}
    assert len((out / "train_log.csv").read_text().strip().splitlines()) == 2


def _valid(names):
    return lambda message: all(n in message for n in names)


BAD = {
    "unknown dataset": (["--dataset", "mnits"], _valid(list_datasets())),
    "unknown model": (["--model", "lenet"], _valid(list_models())),
    "unknown method": (["--method", "gmrr"], _valid(list_methods())),
    "eps above 1": (["--eps", "1.5"], lambda m: "eps" in m and "[0, 1]" in m),
    "eps below 0": (["--eps=-0.1"], lambda m: "eps" in m and "[0, 1]" in m),
    "zero epochs": (["--epochs", "0"], lambda m: "epochs" in m),
    "negative epochs": (["--epochs=-2"], lambda m: "epochs" in m),
    "unknown opt key": (["--opt", "lambda=5"], lambda m: "'lambda'" in m and "clean_fraction" in m),
    "opt without value": (["--opt", "clean_fraction"], lambda m: "KEY=VALUE" in m),
    "bad opt value": (["--opt", "clean_fraction=lots"], lambda m: "clean_fraction" in m),
    "bad schedule": (["--schedule", "cosine"], lambda m: "step" in m and "onecycle" in m),
    "zero threads": (["--threads", "0"], lambda m: "threads must be int >= 1" in m),
    "nan lr": (["--lr", "nan"], lambda m: "lr must be float > 0" in m),
    "negative momentum": (["--momentum=-0.9"], lambda m: "momentum must be float >= 0" in m),
    "inf weight decay": (["--weight-decay", "inf"], lambda m: "weight_decay must be float >= 0" in m),
    "n-train above the data": (["--n-train", "60000"], lambda m: "50000 training examples of mnist" in m),
    "n-val above the data": (["--n-val", "10001"], lambda m: "10000 validation examples of mnist" in m),
    "gpu device": (["--device", "gpu"], lambda m: "valid devices: auto, cpu, cuda, cuda:N" in m),
    "negative seed": (["--seed=-1"], lambda m: "seed must be int >= 0" in m),
    "more threads than CPUs": (["--threads", "100000"], lambda m: "threads must be at most the" in m),
    "type error in argparse": (["--epochs", "two"], lambda m: "invalid int value: 'two'" in m),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_before_work(case, tmp_path, mnist_root, capsys, monkeypatch):
    import importlib

    args, check = BAD[case]
    monkeypatch.setattr(importlib.import_module("gmr.train"), "train",
                        lambda *a, **k: pytest.fail("training started on bad input"))
    out = tmp_path / "run"
    try:
        code = main(tiny_args(mnist_root, out, *args))
    except SystemExit as stop:  # argparse's own errors (one line too)
        code = stop.code
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("gmr train: error: ")
    assert check(lines[0]), lines[0]
    assert not out.exists(), "no work (not even the output folder) before the input is checked"


def test_out_that_cannot_be_written_exits_2(tmp_path, mnist_root, capsys, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("gmr.train"), "train",
                        lambda *a, **k: pytest.fail("training started on bad input"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "run", blocker):
        assert main(tiny_args(mnist_root, out)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(blocker) in lines[0], lines
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"), ("epochs: [1\n", "not valid YAML"), ("- 1\n- 2\n", "mapping"),
    ("epochz: 3\n", "epochz"), ("epochs: abc\n", "epochs must be int"),
    ("eps: '0.3'\n", "eps must be float"), ("seed: true\n", "seed must be int"),
    ("method_options: [1, 2]\n", "method_options"),
])
def test_bad_config_file_exits_2(tmp_path, mnist_root, capsys, content, match):
    config = tmp_path / "c.yaml"
    if content is not None:
        config.write_text(content)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_run_conflict_exits_2(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(mnist_root, out)) == 0
    capsys.readouterr()
    assert main(tiny_args(mnist_root, out, "--seed", "3")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "another configuration" in lines[0]


def test_evaluate_writes_json_and_npz(make_run, tmp_path, capsys, monkeypatch):
    from gmr import io, runs

    run = make_run("fgsm")
    out = tmp_path / "eval" / "fgsm.json"
    loads, writes = [], []
    real_load, real_write = runs.RunDir.load_model, io.atomic_path

    def load_model(self, *args, **kwargs):
        loads.append(self.path)
        return real_load(self, *args, **kwargs)

    def atomic_path(path):
        writes.append(Path(path).name)
        return real_write(path)

    monkeypatch.setattr(runs.RunDir, "load_model", load_model)
    monkeypatch.setattr(importlib.import_module("gmr.evaluate"), "atomic_path", atomic_path)
    monkeypatch.setattr(io, "atomic_path", atomic_path)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.append(n))
    assert main(["evaluate", "--run", str(run), "--attacks", "clean,fgsm,pgd", "--n-test", "20",
                 "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    assert loads == [run], "the model is loaded once"
    assert sorted(writes) == ["fgsm.json", "fgsm.npz"], "each file is written once"
    assert threads == [1]
    record = json.loads(out.read_text())
    assert record["run_id"] == json.loads((run / "run.json").read_text())["run_id"]
    assert record["n_examples"] == 20
    assert set(record["attacks"]) == {"clean", "fgsm", "pgd"}
    npz = np.load(out.with_suffix(".npz"))
    assert {"clean", "fgsm", "pgd"} <= set(npz.files)
    for name in ("clean", "fgsm", "pgd"):
        assert npz[name].shape == (20,) and npz[name].dtype == bool
        assert record["attacks"][name]["accuracy"] == pytest.approx(npz[name].mean())
        assert record["attacks"][name]["n_examples"] == 20
    worst = np.logical_and.reduce([npz[n] for n in ("clean", "fgsm", "pgd")]).mean()
    assert record["worst_case"]["accuracy"] == pytest.approx(worst)
    assert str(out) in capsys.readouterr().out


def test_listings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_methods())
    gmr_line = next(line for line in out.splitlines() if line.startswith("gmr "))
    assert "lambda_=5" in gmr_line and " 4 " in gmr_line
    assert main(["methods", "--dataset", "cifar10"]) == 0
    assert "lambda_=25" in capsys.readouterr().out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_datasets())


def test_checkpoint_choices_are_the_run_checkpoints():
    from gmr.cli import CHECKPOINT_CHOICES
    from gmr.runs import CHECKPOINTS

    assert CHECKPOINT_CHOICES == CHECKPOINTS
