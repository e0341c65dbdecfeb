"""The trainer: run files and fields (against the run schema), run ids, the resume state removed or
kept, lr schedule, resume = unbroken run, conflicts, divergence, atomic outputs, safe checkpoints, the
cost ledger, model selection and the dataset's probe defaults."""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gmr.cost import PassCount
from gmr.methods import METHODS, MethodSpec, NoOptions, StepOutput, make_options, method_cost
from gmr.models import create_model
from gmr.registry import Entry
from gmr.runs import load_weights
from gmr.schemas import validate
from gmr.train import RunConflict, TrainConfig, TrainingDiverged, lr_factor, train

# `gmr.train` the attribute is the train function (gmr/__init__.py exports it): take the module itself
gtrain = importlib.import_module("gmr.train")

FILES = ["run.json", "train_log.csv", "model_best.pt", "model_last.pt"]
PROBES = ["val_clean", "val_fgsm", "val_ifgsm3", "val_pgd", "val_logit_dist", "val_grad_align"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(root, **overrides) -> TrainConfig:
    """A few-second run: tiny_cnn on 256 real MNIST images, 8 steps per epoch."""
    values = dict(dataset="mnist", model="tiny_cnn", method="fgsm", eps=0.3, epochs=2, batch_size=32,
                  n_train=256, n_val=64, probe_pgd_steps=2, data_root=str(root), seed=0, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _log(run: Path) -> list[dict]:
    with open(run / "train_log.csv") as fh:
        return list(csv.DictReader(fh))


def _tmp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".tmp"]


def _replace_method(monkeypatch, name: str, fn) -> None:
    spec = METHODS.get(name)
    monkeypatch.setitem(METHODS._entries, name, Entry(name, dataclasses.replace(spec, fn=fn)))


# --------------------------------------------------------------------------------------------------
# Files and fields

def test_run_writes_documented_files_and_fields(make_run):
    run = make_run("fgsm")
    for name in FILES:
        assert (run / name).is_file(), name
    assert not (run / "checkpoint.pt").exists(), "a finished run keeps no resume state by default"
    assert not _tmp_files(run)

    meta = json.loads((run / "run.json").read_text())
    validate(meta, "run")  # raises on any mismatch with gmr/schemas/run.schema.json
    assert meta["schema"] == "gmr.run/1" and meta["status"] == "complete"
    assert meta["run_id"].startswith("fgsm-mnist-seed0-") and meta["resume_state_kept"] is False
    assert set(meta["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert meta["config"]["method"] == "fgsm" and meta["config"]["model"] == "lenet_plus"
    with open(run / "train_log.csv") as fh:   # the input of Wong et al.'s rule, logged every epoch
        assert all(0.0 <= float(r["train_batch_pgd5"]) <= 1.0 for r in csv.DictReader(fh))
    assert meta["config_identity"] == TrainConfig(**meta["config"]).identity()
    assert meta["eps"] == 0.3
    assert meta["method_options"] == {"clean_fraction": 0.0}
    assert meta["data"] == {"n_train": 1000, "n_val": 100, "split_seed": 0, "val_size": 10000}
    assert meta["selection"] == {"criterion": "val_ifgsm3", "best_epoch": 1, "last_epoch": 1}
    for which in ("best", "last"):
        row = meta["metrics"][which]
        for key in PROBES + ["train_loss", "train_acc", "lr", "epoch_seconds", "probe_seconds"]:
            assert isinstance(row[key], (int, float)), (which, key)
        for key in ("val_clean", "val_fgsm", "val_ifgsm3", "val_pgd", "train_acc"):
            assert 0.0 <= row[key] <= 1.0
        assert -1.0 <= row["val_grad_align"] <= 1.0 and row["val_logit_dist"] >= 0
    cost = meta["cost"]
    for key in ("forward_passes", "backward_passes", "passes", "passes_per_sample",
                "declared_passes_per_sample", "train_seconds", "probe_seconds", "seconds_per_epoch",
                "images_per_second", "peak_memory_mb", "threads"):
        assert isinstance(cost[key], (int, float)) and cost[key] > 0, key
    for key in ("device", "device_name", "torch_version", "python_version"):
        assert isinstance(cost[key], str) and cost[key], key
    assert cost["torch_version"] == torch.__version__

    rows = _log(run)
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert set(PROBES + ["train_loss", "train_acc", "lr", "epoch_seconds", "probe_seconds"]) <= set(rows[0])
    assert float(rows[0]["val_clean"]) == pytest.approx(meta["metrics"]["last"]["val_clean"])


def test_checkpoints_load_with_weights_only(make_run):
    run = make_run("fgsm", keep_resume_state=True)
    for name in ("model_best.pt", "model_last.pt"):
        obj = torch.load(run / name, map_location="cpu", weights_only=True)
        assert obj["epoch"] == 1 and obj["model"] == "lenet_plus" and obj["dataset"] == "mnist"
        model = create_model("lenet_plus", "mnist")
        model.load_state_dict(obj["state_dict"])
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"run_id", "epoch", "config_identity", "model", "optimizer", "scheduler", "rng_cpu", "rng_data",
            "best_metric", "best_epoch", "log", "ledger"} <= set(ckpt)
    assert ckpt["epoch"] == 1
    assert _same_weights(ckpt["model"], _state(run / "model_last.pt"))
    meta = json.loads((run / "run.json").read_text())
    assert ckpt["run_id"] == meta["run_id"] and meta["resume_state_kept"] is True
    validate(meta, "run")
    assert load_weights(run / "model_best.pt")["epoch"] == 1
    with pytest.raises(ValueError, match="cannot load"):
        load_weights(run / "run.json")


def test_resume_state_is_removed_at_the_end_unless_kept(tmp_path, mnist_root):
    removed = train(tiny(mnist_root, epochs=1), tmp_path / "removed", progress=False)
    kept = train(tiny(mnist_root, epochs=1, keep_resume_state=True), tmp_path / "kept", progress=False)
    assert not (tmp_path / "removed" / "checkpoint.pt").exists()
    assert (tmp_path / "kept" / "checkpoint.pt").is_file()
    assert (removed["resume_state_kept"], kept["resume_state_kept"]) == (False, True)
    assert _same_weights(_state(tmp_path / "removed" / "model_last.pt"), _state(tmp_path / "kept" / "model_last.pt"))
    assert removed["run_id"] != kept["run_id"], "two runs of the same settings are two runs"


@pytest.mark.parametrize("method", ["fgsm", "gmr"])
def test_cost_ledger_counts_equal_declared(make_run, method):
    meta = json.loads((make_run(method) / "run.json").read_text())
    cost = meta["cost"]
    options = make_options(method, "mnist", meta["config"]["method_options"])
    declared = method_cost(method, options, 32)
    assert cost["passes_per_sample"] == pytest.approx(declared.passes)
    assert cost["declared_passes_per_sample"] == pytest.approx(declared.passes)
    assert cost["forward_passes"] == pytest.approx(declared.forward * 1000)
    assert cost["backward_passes"] == pytest.approx(declared.backward * 1000)
    assert cost["passes_per_sample"] == {"fgsm": 2, "gmr": 4}[method]


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule

def test_lr_factor_step_schedule_follows_the_paper_code_by_epoch():
    """SAT-Rx divides the lr after epoch index E/4, E/2, 3E/4 (Python 2 integer division): for E = 20,
    epochs 0-5 at lr, 6-10 at lr/5, 11-15 at lr/25, 16-19 at lr/125."""
    per_epoch = 7
    factors = [lr_factor("step", e * per_epoch + i, 20 * per_epoch, per_epoch) for e in range(20) for i in range(per_epoch)]
    by_epoch = [factors[e * per_epoch] for e in range(20)]
    assert by_epoch == pytest.approx([1.0] * 6 + [1 / 5] * 5 + [1 / 25] * 5 + [1 / 125] * 4)
    assert all(len(set(factors[e * per_epoch:(e + 1) * per_epoch])) == 1 for e in range(20)), "constant within an epoch"
    # E = 10: thresholds 2, 5, 7 (integer division)
    assert [lr_factor("step", e, 10) for e in range(10)] == pytest.approx(
        [1.0] * 3 + [1 / 5] * 3 + [1 / 25] * 2 + [1 / 125] * 2)


def test_lr_factor_cyclic_is_wongs_triangle():
    """locuslab/fast_adversarial: CyclicLR from 0 up to lr at half of training and back to 0."""
    total = 100
    assert lr_factor("cyclic", 0, total) == 0.0
    assert lr_factor("cyclic", 25, total) == pytest.approx(0.5)
    assert lr_factor("cyclic", 50, total) == pytest.approx(1.0)
    assert lr_factor("cyclic", 75, total) == pytest.approx(0.5)
    assert lr_factor("cyclic", 100, total) == pytest.approx(0.0)


def test_lr_factor_onecycle():
    total = 100
    assert lr_factor("onecycle", 0, total) == 0.0
    assert lr_factor("onecycle", 20, total) == pytest.approx(0.5)
    assert lr_factor("onecycle", 40, total) == pytest.approx(1.0)
    assert lr_factor("onecycle", 70, total) == pytest.approx(0.5)
    assert lr_factor("onecycle", 100, total) == pytest.approx(0.0)
    values = [lr_factor("onecycle", s, total) for s in range(total + 1)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))


def _scripted_probes(ifgsm3: list[float]):
    def probes(model, x, y, cfg, epoch, device):
        v = ifgsm3[epoch]
        return {"val_clean": 0.9, "val_fgsm": v + 0.1, "val_ifgsm3": v, "val_pgd": v - 0.05,
                "val_logit_dist": 1.0, "val_grad_align": 0.5}
    return probes


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory, mnist_root):
    """4 epochs x 8 steps with scripted validation probes (best I-FGSM-3 at epoch 2); records the lr
    the optimiser used at every step."""
    out = tmp_path_factory.mktemp("scripted")
    lrs: list[float] = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", step)
        mp.setattr(gtrain, "validation_probes", _scripted_probes([0.1, 0.5, 0.3, 0.5]))
        result = train(tiny(mnist_root, epochs=4, keep_epoch_checkpoints=True), out, progress=False)
    torch.set_num_threads(threads)
    return out, result, lrs


def test_lr_step_schedule_in_training(scripted_run):
    _, _, lrs = scripted_run
    # E = 4: lr / 5 after epoch index 1 (E/4), / 25 after index 2 (E/2), / 125 after index 3 (3E/4)
    expected = [0.01] * 16 + [0.002] * 8 + [0.0004] * 8
    assert lrs == pytest.approx(expected)


def test_lr_onecycle_in_training(monkeypatch, tmp_path, mnist_root):
    lrs = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(gtrain, "validation_probes", _scripted_probes([0.1, 0.2]))
    train(tiny(mnist_root, schedule="onecycle", lr=0.1), tmp_path, progress=False)
    assert lrs == pytest.approx([0.1 * lr_factor("onecycle", s, 16) for s in range(16)])
    assert 0.09 < max(lrs) <= 0.1 and lrs[0] == 0.0 and lrs[-1] < 0.02


def test_model_selection_picks_best_val_ifgsm3(scripted_run):
    out, result, _ = scripted_run
    assert result["selection"]["best_epoch"] == 2
    assert result["metrics"]["best"]["epoch"] == 2 and result["metrics"]["best"]["val_ifgsm3"] == 0.5
    assert result["metrics"]["last"]["epoch"] == 4
    assert [float(r["val_ifgsm3"]) for r in _log(out)] == [0.1, 0.5, 0.3, 0.5]
    best = torch.load(out / "model_best.pt", weights_only=True)
    assert best["epoch"] == 2
    assert _same_weights(best["state_dict"], _state(out / "epochs" / "model_epoch002.pt"))
    assert not _same_weights(best["state_dict"], _state(out / "model_last.pt"))
    assert _same_weights(_state(out / "model_last.pt"), _state(out / "epochs" / "model_epoch004.pt"))


# --------------------------------------------------------------------------------------------------
# Resume, determinism, conflicts

def test_resume_after_interrupt_equals_unbroken_run(monkeypatch, tmp_path, mnist_root):
    cfg = tiny(mnist_root)
    unbroken = train(cfg, tmp_path / "unbroken", progress=False)

    calls = {"n": 0}
    real = METHODS.get("fgsm").fn

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 8 + 3:   # inside epoch 2
            raise KeyboardInterrupt
        return real(*args)

    broken = tmp_path / "broken"
    with monkeypatch.context() as mp:
        _replace_method(mp, "fgsm", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, broken, progress=False)
    assert calls["n"] == 11
    assert not (broken / "run.json").exists()
    interrupted_state = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert interrupted_state["epoch"] == 1
    assert len(_log(broken)) == 1
    assert not _tmp_files(broken), "an interrupt must not leave temporary files"

    resumed = train(cfg, broken, progress=False)
    assert resumed["run_id"] == interrupted_state["run_id"], "a resumed run keeps its id"
    assert json.loads((broken / "run.json").read_text())["run_id"] == resumed["run_id"]
    assert not (broken / "checkpoint.pt").exists()
    for name in ("model_last.pt", "model_best.pt"):
        assert _same_weights(_state(tmp_path / "unbroken" / name), _state(broken / name)), name
    a, b = _log(tmp_path / "unbroken"), _log(broken)
    skip = {"epoch_seconds", "probe_seconds"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in a] == \
           [{k: v for k, v in r.items() if k not in skip} for r in b]
    for key in ("forward_passes", "backward_passes", "passes_per_sample"):
        assert resumed["cost"][key] == unbroken["cost"][key]
    assert resumed["selection"] == unbroken["selection"]


def test_seed_makes_runs_reproducible(tmp_path, mnist_root):
    train(tiny(mnist_root, epochs=1), tmp_path / "a", progress=False)
    train(tiny(mnist_root, epochs=1), tmp_path / "b", progress=False)
    train(tiny(mnist_root, epochs=1, seed=1), tmp_path / "c", progress=False)
    a, b, c = (_state(tmp_path / d / "model_last.pt") for d in "abc")
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_finished_run_is_not_retrained(monkeypatch, tmp_path, mnist_root):
    cfg = tiny(mnist_root, epochs=1)
    first = train(cfg, tmp_path, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def forbidden(*args):
        raise AssertionError("a finished run must not train again")

    _replace_method(monkeypatch, "fgsm", forbidden)
    monkeypatch.setattr(gtrain, "load_split", lambda *a, **k: pytest.fail("data loaded again"))
    again = train(cfg, tmp_path, progress=False)
    assert json.loads(json.dumps(first)) == again
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_other_config_in_same_dir_raises_run_conflict(tmp_path, mnist_root):
    train(tiny(mnist_root, epochs=1), tmp_path, progress=False)
    before = (tmp_path / "run.json").read_text()
    with pytest.raises(RunConflict, match=str(tmp_path)):
        train(tiny(mnist_root, epochs=1, seed=5), tmp_path, progress=False)
    with pytest.raises(RunConflict):
        train(tiny(mnist_root, epochs=1, method="rfgsm"), tmp_path, progress=False)
    assert (tmp_path / "run.json").read_text() == before
    # fields that do not change the result may differ (e.g. threads, probe batch size)
    assert train(tiny(mnist_root, epochs=1, threads=1, probe_batch_size=7), tmp_path,
                 progress=False)["status"] == "complete"


def test_other_config_on_interrupted_run_raises_run_conflict(monkeypatch, tmp_path, mnist_root):
    cfg = tiny(mnist_root)
    calls = {"n": 0}
    real = METHODS.get("fgsm").fn

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as mp:
        _replace_method(mp, "fgsm", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "run.json").exists()
    with pytest.raises(RunConflict):
        train(tiny(mnist_root, lr=0.05), tmp_path, progress=False)


# --------------------------------------------------------------------------------------------------
# Divergence and atomic outputs

@pytest.fixture
def bad_method(monkeypatch):
    """Register a method whose loss turns into `value` on its third call (removed afterwards)."""
    def register(value: float) -> str:
        calls = {"n": 0}

        def fn(model, x, y, eps, o):
            calls["n"] += 1
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if calls["n"] >= 3:
                loss = loss * value
            return StepOutput(loss, logits, y)

        name = f"diverge_{value}"
        monkeypatch.setitem(METHODS._entries, name,
                            Entry(name, MethodSpec(fn, NoOptions, lambda o, b: PassCount(1, 1), {}, "test",
                                                   "Diverge", "#000000")))
        return name
    return register


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_loss_raises_training_diverged(bad_method, tmp_path, mnist_root, value):
    name = bad_method(value)
    with pytest.raises(TrainingDiverged) as info:
        train(tiny(mnist_root, method=name), tmp_path, progress=False)
    message = str(info.value)
    assert ("nan" in message or "inf" in message) and "epoch 1" in message and "step 3" in message
    assert "lr" in message
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "checkpoint.pt").exists()
    assert not _tmp_files(tmp_path)


def test_interrupted_write_leaves_no_partial_file(monkeypatch, tmp_path, mnist_root):
    real_save = torch.save

    def save_then_interrupt(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")   # half-written bytes in the temporary file
        raise KeyboardInterrupt

    monkeypatch.setattr(gtrain, "validation_probes", _scripted_probes([0.1, 0.2]))
    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(mnist_root, epochs=1), tmp_path, progress=False)
    assert not _tmp_files(tmp_path)
    assert not (tmp_path / "model_best.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)
    # the run then trains from scratch and finishes
    assert train(tiny(mnist_root, epochs=1), tmp_path, progress=False)["status"] == "complete"


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    from gmr.io import atomic_path, write_json

    target = tmp_path / "result.json"
    write_json(target, {"a": 1, "nan": math.nan})
    assert json.loads(target.read_text()) == {"a": 1, "nan": None}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text())["a"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


# --------------------------------------------------------------------------------------------------
# Config validation

@pytest.mark.parametrize("overrides, match", [
    (dict(dataset="mnits"), "valid datasets"), (dict(model="lenet"), "valid models"),
    (dict(method="gmrr"), "valid methods"), (dict(eps=1.5), "eps"), (dict(eps=-0.1), "eps"),
    (dict(epochs=0), "epochs"), (dict(batch_size=-1), "batch_size"), (dict(lr=0), "lr"),
    (dict(schedule="cosine"), "schedule"), (dict(method_options={"foo": 1}), "foo"),
    (dict(n_train=0), "n_train"),
])
def test_bad_config_raises_before_work(tmp_path, overrides, match):
    cfg = tiny(tmp_path / "no-data", **overrides)
    with pytest.raises(ValueError, match=match):
        train(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset, steps, step_size", [
    ("mnist", 40, 0.01), ("fashion_mnist", 40, 0.01), ("cifar10", 10, 2 / 255), ("svhn", 10, 2 / 255)])
def test_probe_pgd_defaults_come_from_the_dataset(dataset, steps, step_size):
    assert TrainConfig(dataset=dataset).probe_pgd() == (steps, pytest.approx(step_size))
    assert TrainConfig(dataset=dataset, probe_pgd_steps=3, probe_pgd_step_size=0.5).probe_pgd() == (3, 0.5)


@pytest.mark.parametrize("overrides, match", [
    (dict(epochs=True), "option epochs must be int >= 1, got True"),
    (dict(lr="0.1"), "option lr must be float > 0, got '0.1'"),
    (dict(keep_resume_state=1), "option keep_resume_state must be bool, got 1"),
    (dict(threads=0), "option threads must be int >= 1 or None, got 0"),
])
def test_config_fields_are_checked_by_their_annotations(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        train(tiny(tmp_path, **overrides), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
