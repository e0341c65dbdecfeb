"""Reliability under faults: one writer per output (locks, stale locks taken over), resumable states that
belong to other weights started afresh, damaged files refused where they are read, stale temporary
files removed, outputs written with the user's umask, and a full disk reported in one line.

Each of the medium defects of issue 15 is reproduced here: two `gmr train` on one folder (1), an
AutoAttack state resumed for other weights (2), a damaged checkpoint.pt on resume (4)."""
from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gmr.autoattack_adapter import AutoAttackConfig, run_autoattack, state_files
from gmr.cli import main
from gmr.data import DataSpec, Split, load_split
from gmr.evaluate import EvalConfig, evaluate_to_file
from gmr.io import write_json
from gmr.locks import LOCK_NAME, LockHeld, lock_file, lock_folder
from gmr.masking.audit import DiagnoseConfig, ProbeSettings, write_audit
from gmr.methods import METHODS
from gmr.registry import Entry
from gmr.runs import RunDir, RunError, load_weights
from gmr.train import TrainConfig, train

gtrain = importlib.import_module("gmr.train")
REPO = Path(__file__).resolve().parents[1]
PROBES = ["val_clean", "val_fgsm", "val_ifgsm3", "val_pgd", "val_logit_dist", "val_grad_align"]

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(dataset="mnist", model="tiny_cnn", method="fgsm", eps=0.3, epochs=1, batch_size=32, n_train=256,
            n_val=64, probe_pgd_steps=2, seed=0, device="cpu")


def tiny(root, **overrides) -> TrainConfig:
    """A run of about a second: tiny_cnn on 256 real MNIST images, 8 steps per epoch."""
    return TrainConfig(**{**TINY, "data_root": str(root), **overrides})


def train_argv(root, out, **overrides) -> list[str]:
    values = {**TINY, "data_root": str(root), "threads": 1, **overrides}
    argv = ["train", "--out", str(out), "--no-progress"]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".tmp-*")]


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _interrupt_after(monkeypatch, cfg: TrainConfig, out: Path, steps: int) -> None:
    """Train `cfg` into `out` and interrupt it (KeyboardInterrupt) after `steps` training steps."""
    spec, calls = METHODS.get(cfg.method), {"n": 0}

    def fn(*args):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return spec.fn(*args)

    with monkeypatch.context() as mp:
        mp.setitem(METHODS._entries, cfg.method, Entry(cfg.method, dataclasses.replace(spec, fn=fn)))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out, progress=False)


def _scripted_probes(ifgsm3: list[float]):
    """validation_probes returning `ifgsm3[epoch]` as the selection metric (controls the best epoch)."""
    def probes(model, x, y, cfg, epoch, device):
        return {k: (ifgsm3[epoch] if k == "val_ifgsm3" else 0.5) for k in PROBES}
    return probes


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, mnist_root) -> Path:
    """A clean-trained tiny_cnn that classifies ~80% of the first test points (AutoAttack has work)."""
    out = tmp_path_factory.mktemp("good-run")
    train(tiny(mnist_root, method="standard", epochs=3, lr=0.1, schedule="constant", n_train=2000), out,
          progress=False)
    return out


@pytest.fixture
def run_copy(good_run, tmp_path) -> Path:
    """A copy of `good_run` that a test may damage."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


# --------------------------------------------------------------------------------------------------
# 1. Locks

_WAITING_TRAINER = """
import importlib, pathlib, sys, time
t = importlib.import_module("gmr.train")  # the module (gmr.train the attribute is the function)
real, go = t.train_epoch, pathlib.Path(sys.argv[1])
def waiting(state, job):  # holds the run folder (and its lock) until the test says go
    while not go.exists():
        time.sleep(0.05)
    return real(state, job)
t.train_epoch = waiting
from gmr.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


def test_defect1_second_trainer_on_the_same_folder_exits_2_naming_the_holder(tmp_path, mnist_root):
    out, go = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _WAITING_TRAINER, str(go), *train_argv(mnist_root, out)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / LOCK_NAME, first)
        second = subprocess.run([sys.executable, "-m", "gmr.cli", *train_argv(mnist_root, out, method="gmr")],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        line = _one_line(second.stderr)
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "--method fgsm" in line
        assert "since" in line and str(out) in line
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["method"] == "fgsm" and meta["run_id"].startswith("fgsm-")
    reference = tmp_path / "reference"
    train(tiny(mnist_root, threads=1), reference, progress=False)
    for name in ("model_best.pt", "model_last.pt"):  # the weights are those of the FGSM-AT run
        assert _same(_weights(out / name), _weights(reference / name)), name
    assert not (out / LOCK_NAME).exists() and not _temps(out)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _write_lock(path: Path, **fields) -> None:
    record = {"pid": 1, "host": socket.gethostname(), "command": "gmr train --out x", "since": "2026-01-01T00:00:00",
              **fields}
    path.write_text(json.dumps(record))


def test_stale_lock_of_a_killed_trainer_is_taken_over_and_its_temporary_files_removed(tmp_path, mnist_root,
                                                                                       caplog):
    out = tmp_path / "run"
    (out / "epochs").mkdir(parents=True)
    dead = _dead_pid()
    _write_lock(out / LOCK_NAME, pid=dead)
    stale = [out / ".tmp-model_best.pt-k9x1", out / ".tmp-checkpoint.pt-a2b3", out / "epochs" / ".tmp-model_epoch001.pt-q"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)  # what kill -9 leaves mid-write
    other = out / ".tmp-notes.txt-zz"  # not a file of the run: left alone
    other.write_text("x")
    with caplog.at_level(logging.WARNING, logger="gmr"):
        record = train(tiny(mnist_root), out, progress=False)
    assert record["status"] == "complete"
    assert any("taking over the stale lock" in r.getMessage() and f"pid {dead}" in r.getMessage()
               and "its process is gone" in r.getMessage() for r in caplog.records), caplog.text
    assert not any(p.exists() for p in stale) and other.exists()
    assert not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_respected_until_it_is_old(tmp_path, mnist_root):
    out = tmp_path / "run"
    out.mkdir()
    _write_lock(out / LOCK_NAME, pid=4242, host="node-17.cluster")
    with pytest.raises(LockHeld, match=r"pid 4242 on node-17\.cluster \(gmr train --out x\) since 2026-01-01.*"
                                       r"if that process no longer runs, delete .*\.gmr\.lock"):
        train(tiny(mnist_root), out, progress=False)
    old = time.time() - 3 * 3600  # not refreshed for 3 h: its holder is gone
    os.utime(out / LOCK_NAME, (old, old))
    assert train(tiny(mnist_root), out, progress=False)["status"] == "complete"


def test_evaluate_and_diagnose_outputs_are_locked(good_run, tmp_path, capsys):
    out = tmp_path / "eval" / "best.json"
    out.parent.mkdir()
    with lock_file(out):
        code = main(["evaluate", "--run", str(good_run), "--attacks", "clean", "--n-test", "10", "--device", "cpu",
                     "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"pid {os.getpid()} on {socket.gethostname()}" in line and str(out) in line
    assert not out.exists()
    diag = tmp_path / "diag"
    diag.mkdir()
    with lock_folder(diag):
        code = main(["diagnose", "--run", str(good_run), "--out", str(diag), "--n-test", "10", "--quick",
                     "--device", "cpu"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"pid {os.getpid()}" in line and "wait for it to finish" in line
    assert not (diag / "audit.json").exists() and not (diag / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------------
# 2. AutoAttack state of other weights

def _scale_last_layer(path: Path, factor: float) -> None:
    """Other weights with the same predictions: logits scaled by `factor` (saturated softmax: APGD-CE's
    gradients vanish, so the robust points a fresh AutoAttack finds differ)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for name in ("net.9.weight", "net.9.bias"):
        obj["state_dict"][name] = obj["state_dict"][name] * factor
    torch.save(obj, path)


def test_defect2_autoattack_state_of_other_weights_starts_afresh(run_copy, tmp_path, monkeypatch, caplog):
    out = tmp_path / "eval" / "best.json"
    cfg = EvalConfig(run=str(run_copy), attacks=["clean", "autoattack"], n_test=20, eps=0.1, aa_version="custom",
                     aa_attacks=["apgd-ce", "square"], batch_size=20, device="cpu",
                     state_prefix=str(out.with_name(out.stem)))
    with monkeypatch.context() as mp:  # killed after AutoAttack, before the record was written
        mp.setattr(importlib.import_module("gmr.evaluate"), "_write_outputs",
                   lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            evaluate_to_file(cfg, out)
    main_state, _, progress_file = state_files(cfg.state_path(0.1))
    stale = json.loads(progress_file.read_text())
    assert main_state.exists() and stale["after"] == {"apgd-ce": 0}  # nothing robust left: square skipped

    _scale_last_layer(run_copy / "model_best.pt", 1000.0)  # the folder now holds other weights
    with caplog.at_level(logging.WARNING, logger="gmr"):
        record = evaluate_to_file(cfg, out)
    entry = record["attacks"]["autoattack"]
    assert entry["resumed"] is False
    assert any("not resuming AutoAttack" in r.getMessage() and "other model weights" in r.getMessage()
               for r in caplog.records), caplog.text
    model, _, _ = RunDir(run_copy).load_model("best", torch.device("cpu"))
    x, y = load_split(DataSpec("mnist", Path(json.loads((run_copy / "run.json").read_text())["config"]["data_root"]),
                               n_test=20), Split.TEST)
    fresh = run_autoattack(model, x, y, AutoAttackConfig(eps=0.1, version="custom", attacks=("apgd-ce", "square"),
                                                         batch_size=20))
    assert entry["per_attack"] == fresh.per_attack and entry["flags"] == fresh.flags
    assert entry["per_attack"]["square"] > 0 and any(f.startswith("Square Attack") for f in entry["flags"])
    assert not any(p.exists() for p in state_files(cfg.state_path(0.1)))


def test_malformed_autoattack_progress_file_starts_afresh_in_one_line(good_run, tmp_path, caplog):
    model, meta, _ = RunDir(good_run).load_model("best", torch.device("cpu"))
    x, y = load_split(DataSpec("mnist", Path(meta["config"]["data_root"]), n_test=20), Split.TEST)
    cfg = AutoAttackConfig(eps=0.1, version="custom", attacks=("apgd-ce",), batch_size=20)
    state = tmp_path / "e.aa-eps0.1.state.json"
    main_state, _, progress_file = state_files(state)
    main_state.write_text(json.dumps({"_robust_flags": [True] * 20, "_run_attacks": []}))
    for text in ("{not json", json.dumps({"identity": {}, "after": {"apgd-ce": "many"}, "flags": [], "clean": 1})):
        progress_file.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gmr"):
            result = run_autoattack(model, x, y, cfg, state_path=state)
        assert not result.resumed
        lines = [r.getMessage() for r in caplog.records if "not resuming" in r.getMessage()]
        assert len(lines) == 1 and str(progress_file) in lines[0] and "starting afresh" in lines[0]
        assert result.log[0] == lines[0]
    assert run_autoattack(model, x, y, cfg, state_path=state).resumed  # its own state is resumed


# --------------------------------------------------------------------------------------------------
# 3. Damaged files refused where they are read

def _zero_region(path: Path) -> None:
    """Zero-fill the start of the largest stored member's data: the zip stays readable and torch.load
    does not notice (it checks no CRC)."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
        int.from_bytes(data[header + 28:header + 30], "little")
    data[start:start + min(256, info.file_size)] = bytes(min(256, info.file_size))
    path.write_bytes(bytes(data))
    torch.load(path, map_location="cpu", weights_only=True)  # loads silently: the defect


def _edit_checkpoint(path: Path, change) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def _nan_weights(ckpt: dict) -> None:
    from gmr.runs import weights_digest

    next(iter(ckpt["model"].values()))[0] = float("nan")
    ckpt["weights_sha256"] = weights_digest(ckpt["model"])  # only the finite check can refuse it


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "BadZipFile"),
    "empty": (lambda p: p.write_bytes(b""), "BadZipFile"),
    "garbage": (lambda p: p.write_bytes(os.urandom(4096)), "BadZipFile"),
    "zero-filled region": (_zero_region, "CRC mismatch"),
    "weights edited": (lambda p: _edit_checkpoint(p, lambda c: next(iter(c["model"].values())).add_(1e-3)),
                       "do not match their SHA-256"),
    "non-finite weights": (lambda p: _edit_checkpoint(p, _nan_weights), "non-finite weights"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_defect4_damaged_resume_state_is_refused_in_one_line(kind, tmp_path, mnist_root, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = tiny(mnist_root, epochs=2)
    _interrupt_after(monkeypatch, cfg, out, steps=8 + 3)  # inside epoch 2: checkpoint.pt holds epoch 1
    damage, reason = DAMAGE[kind]
    damage(out / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code = main(train_argv(mnist_root, out, epochs=2))
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert f"damaged resume state {out / 'checkpoint.pt'}" in line and reason in line
    assert "delete it to start the run over" in line
    assert not (out / "run.json").exists()  # not resumed with other weights
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "checkpoint.pt").unlink()  # the fix the line names
    assert main(train_argv(mnist_root, out, epochs=2)) == 0


def test_resume_rewrites_damaged_model_files_the_resume_state_holds(tmp_path, mnist_root, monkeypatch):
    monkeypatch.setattr(gtrain, "validation_probes", _scripted_probes([0.1, 0.2]))
    unbroken = tmp_path / "unbroken"
    train(tiny(mnist_root, epochs=2), unbroken, progress=False)
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, tiny(mnist_root, epochs=2), out, steps=8 + 3)
    (out / "model_best.pt").write_bytes(b"garbage")       # best epoch 1 = the resume state's epoch
    (out / "model_last.pt").write_bytes((out / "model_last.pt").read_bytes()[:100])
    train(tiny(mnist_root, epochs=2), out, progress=False)
    for name in ("model_best.pt", "model_last.pt"):
        assert _same(_weights(out / name), _weights(unbroken / name)), name


def test_resume_refuses_a_damaged_model_best_it_cannot_recover(tmp_path, mnist_root, monkeypatch):
    monkeypatch.setattr(gtrain, "validation_probes", _scripted_probes([0.5, 0.1, 0.1]))
    for keep in (False, True):
        out = tmp_path / f"keep{keep}"
        cfg = tiny(mnist_root, epochs=3, keep_epoch_checkpoints=keep)
        _interrupt_after(monkeypatch, cfg, out, steps=16 + 3)  # resume state: epoch 2, best epoch 1
        (out / "model_best.pt").write_bytes(b"")
        if keep:  # epochs/model_epoch001.pt holds the best weights: model_best.pt is restored from it
            train(cfg, out, progress=False)
            assert _same(_weights(out / "model_best.pt"), _weights(out / "epochs" / "model_epoch001.pt"))
        else:
            with pytest.raises(RunError, match=r"model_best\.pt is damaged .* best weights \(epoch 1\) are kept "
                                               r"nowhere else; restore it, or delete .* to train the run again"):
                train(cfg, out, progress=False)


def test_non_finite_model_weights_are_refused_where_loaded(run_copy, tmp_path, capsys):
    obj = torch.load(run_copy / "model_best.pt", map_location="cpu", weights_only=True)
    next(iter(obj["state_dict"].values()))[0] = float("nan")
    torch.save(obj, run_copy / "model_best.pt")
    with pytest.raises(RunError, match="non-finite weights"):
        RunDir(run_copy).load_model("best", torch.device("cpu"))
    code = main(["evaluate", "--run", str(run_copy), "--attacks", "clean", "--n-test", "10", "--device", "cpu",
                 "--out", str(tmp_path / "e.json")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "model_best.pt holds non-finite weights" in line
    assert not (tmp_path / "e.json").exists()
    _zero_region(run_copy / "model_last.pt")
    with pytest.raises(RunError, match="CRC mismatch"):
        load_weights(run_copy / "model_last.pt")


def _drop_rows(path: Path, keep: int) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1 + keep]) + "\n")


def _drop_column(path: Path, column: str) -> None:
    lines = [line.split(",") for line in path.read_text().splitlines()]
    i = lines[0].index(column)
    path.write_text("\n".join(",".join(v for j, v in enumerate(row) if j != i) for row in lines) + "\n")


@pytest.mark.parametrize("damage, text", [
    (lambda p: p.write_text(""), "has no rows"),
    (lambda p: _drop_rows(p, 0), "has no rows"),
    (lambda p: _drop_rows(p, 2), "holds epochs 1 to 2 (2 rows), not 1 to 3"),
    (lambda p: _drop_column(p, "val_pgd"), "lacks the columns val_pgd"),
    (lambda p: p.unlink(), "is missing"),
])
def test_damaged_training_log_is_not_read_as_no_catastrophic_overfitting(run_copy, tmp_path, damage, text, capsys):
    assert RunDir(run_copy).co_epoch() is None  # the intact log: 3 epochs, no catastrophic overfitting
    damage(run_copy / "train_log.csv")
    with pytest.raises(RunError, match="train_log.csv " + text.replace("(", r"\(").replace(")", r"\)")):
        RunDir(run_copy).co_epoch()
    code = main(["diagnose", "--run", str(run_copy), "--out", str(tmp_path / "diag"), "--n-test", "10", "--quick",
                 "--device", "cpu"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "train_log.csv" in line and "train the run again" in line
    assert not (tmp_path / "diag" / "audit.json").exists()


# --------------------------------------------------------------------------------------------------
# Clean-up, modes, full disk

def test_outputs_follow_the_umask(tmp_path, mnist_root):
    old = os.umask(0o022)
    try:
        train(tiny(mnist_root), tmp_path / "run", progress=False)
        for name in ("run.json", "train_log.csv", "model_best.pt", "model_last.pt"):
            assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name
        os.umask(0o027)
        write_json(tmp_path / "x.json", {"a": 1})
        assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_evaluate_and_diagnose_remove_their_stale_temporary_files(good_run, tmp_path):
    out = tmp_path / "eval" / "best.json"
    out.parent.mkdir()
    mine = [out.parent / ".tmp-best.json-x1", out.parent / ".tmp-best.npz-x2",
            out.parent / ".tmp-best.aa-eps0.3.state.json.progress.json-x3"]
    theirs = out.parent / ".tmp-last.json-x4"  # another evaluation's output (its own lock)
    for p in mine + [theirs]:
        p.write_bytes(b"\0" * 100)
    evaluate_to_file(EvalConfig(run=str(good_run), attacks=["clean", "fgsm"], n_test=20, device="cpu",
                                state_prefix=str(out.with_name(out.stem))), out)
    assert not any(p.exists() for p in mine) and theirs.exists() and out.is_file()
    assert not (out.parent / ".best.json.lock").exists()

    diag = tmp_path / "diag"
    diag.mkdir()
    (diag / ".tmp-audit.json-y1").write_bytes(b"{")
    write_audit(DiagnoseConfig(run=str(good_run), n_test=10, device="cpu", settings=ProbeSettings.quick()), diag)
    assert not _temps(diag) and not (diag / LOCK_NAME).exists() and (diag / "audit.json").is_file()


def test_full_disk_during_training_gives_one_line_and_no_partial_file(tmp_path, mnist_root, monkeypatch, capsys):
    def full_save(obj, f, *args, **kwargs):  # what torch.save does on a full disk
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(torch, "save", full_save)
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    out = tmp_path / "run"
    code = main(train_argv(mnist_root, out))
    line = _one_line(capsys.readouterr().err)
    assert code == 1 and "no space left on the device" in line and "model_best.pt" in line
    assert not _temps(out) and not list(out.glob("*.pt")) and not (out / LOCK_NAME).exists()


def test_full_disk_during_evaluation_gives_one_line_and_no_partial_file(good_run, tmp_path, monkeypatch, capsys):
    def full_savez(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_savez)
    out = tmp_path / "e.json"
    code = main(["evaluate", "--run", str(good_run), "--attacks", "clean", "--n-test", "10", "--device", "cpu",
                 "--quiet", "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("gmr evaluate: error: cannot write") and "e.npz" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
