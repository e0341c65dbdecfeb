"""Training precision (gmr/precision.py): what `auto` picks, what is refused before any work, that the
method's attack runs under autocast while validation probes stay fp32, the run record, resume in bf16,
and the fp16 gradient scaler's state in the resume checkpoint."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gmr import precision
from gmr.methods import METHODS, StepOutput
from gmr.registry import Entry
from gmr.schemas import validate
from gmr.train import TrainConfig, TrainState, train

gtrain = importlib.import_module("gmr.train")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(root, **overrides) -> TrainConfig:
    values = dict(dataset="mnist", model="tiny_cnn", method="fgsm", eps=0.3, epochs=2, batch_size=32,
                  n_train=128, n_val=32, probe_pgd_steps=2, data_root=str(root), seed=0, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------------------------------
# The rule

def _bf16_probes(monkeypatch, native: bool, flags: set[str] = frozenset()) -> None:
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: set(flags))


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native):
    _bf16_probes(monkeypatch, native)
    assert precision.resolve("auto", CPU) == ("bf16" if native else "fp32")


def test_native_bf16_falls_back_to_cpuinfo_flags(monkeypatch):
    _bf16_probes(monkeypatch, False, {"avx2", "amx_bf16"})
    assert precision.cpu_has_native_bf16()
    _bf16_probes(monkeypatch, False, {"avx2", "avx512f"})
    assert not precision.cpu_has_native_bf16()


def test_cpuinfo_flags_are_read_from_this_machine():
    flags = precision._cpuinfo_flags()
    assert not flags or "fpu" in flags  # every x86 CPU lists fpu; elsewhere the file may hold no flags line


@pytest.mark.parametrize("value", ["fp32", "bf16"])
def test_explicit_precisions_stay_as_given_on_cpu(value):
    assert precision.resolve(value, CPU) == value


@pytest.mark.parametrize("value, match", [("fp16", "needs a CUDA device"), ("half", "unknown precision 'half'"),
                                          ("BF16", "valid precisions: fp32, bf16, fp16, auto")])
def test_bad_precisions_are_refused(value, match):
    with pytest.raises(ValueError, match=match):
        precision.resolve(value, CPU)


def test_channels_last_rule():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert precision.channels_last("fp32", CPU, conv) and precision.channels_last("bf16", CPU, conv)
    assert not precision.channels_last("bf16", CPU, mlp)
    assert not precision.channels_last("fp32", CUDA, conv)
    assert precision.channels_last("bf16", CUDA, conv) and precision.channels_last("fp16", CUDA, conv)


def test_autocast_and_scaler_per_precision():
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.rand(2, 1, 5, 5)
    with precision.autocast("bf16", CPU):
        assert conv(x).dtype == torch.bfloat16
    with precision.autocast("fp32", CPU):
        assert conv(x).dtype == torch.float32
    assert not precision.grad_scaler("bf16", CPU).is_enabled()
    assert not precision.grad_scaler("fp32", CPU).is_enabled()


# --------------------------------------------------------------------------------------------------
# Training

def _spy_method(monkeypatch, seen: list) -> None:
    """fgsm, recording whether autocast is on and the dtype of the logits inside its attack."""
    spec = METHODS.get("fgsm")

    def spy(model, x, y, eps, o):
        x_req = x.clone().requires_grad_(True)
        logits = model(x_req)
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_req)
        x_adv = (x + eps * grad.sign()).clamp(0, 1)
        out = model(x_adv)
        return StepOutput(F.cross_entropy(out, y), out, y)

    monkeypatch.setitem(METHODS._entries, "fgsm", Entry("fgsm", dataclasses.replace(spec, fn=spy)))


def _spy_probes(monkeypatch, seen: list) -> None:
    real = gtrain.validation_probes

    def spy(model, *args):
        seen.append((torch.is_autocast_enabled("cpu"), next(model.parameters()).dtype))
        return real(model, *args)

    monkeypatch.setattr(gtrain, "validation_probes", spy)


def test_bf16_training_step_covers_the_attack_and_probes_stay_fp32(monkeypatch, tmp_path, mnist_root):
    steps, probes = [], []
    _spy_method(monkeypatch, steps)
    _spy_probes(monkeypatch, probes)
    record = train(tiny(mnist_root, epochs=1, precision="bf16"), tmp_path / "run", progress=False)
    assert steps and all(step == (True, torch.bfloat16) for step in steps)
    assert probes == [(False, torch.float32)]
    validate(record, "run")
    assert record["cost"]["precision"] == "bf16" and record["cost"]["channels_last"] is True
    assert record["config"]["precision"] == "bf16" and record["config_identity"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "run" / "model_last.pt").values()
               if t.is_floating_point()), "weights stay fp32"


def test_fp32_runs_keep_the_identity_of_runs_before_the_option(mnist_root):
    identity = tiny(mnist_root).identity()
    assert "precision" not in identity and "compile" not in identity
    assert tiny(mnist_root, precision="auto").identity()["precision"] == "auto"
    assert tiny(mnist_root, compile=True).identity() == identity, "compile does not change the result"


def test_bf16_resume_equals_unbroken_run(monkeypatch, tmp_path, mnist_root):
    cfg = tiny(mnist_root, precision="bf16", method="gmr")
    train(cfg, tmp_path / "unbroken", progress=False)
    real, calls = METHODS.get("gmr").fn, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 4 + 2:   # inside epoch 2 (4 steps an epoch)
            raise KeyboardInterrupt
        return real(*args)

    spec = METHODS.get("gmr")
    with monkeypatch.context() as mp:
        mp.setitem(METHODS._entries, "gmr", Entry("gmr", dataclasses.replace(spec, fn=interrupted)))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "broken", progress=False)
    train(cfg, tmp_path / "broken", progress=False)
    for name in ("model_last.pt", "model_best.pt"):
        a, b = _weights(tmp_path / "unbroken" / name), _weights(tmp_path / "broken" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_other_precision_on_the_same_folder_is_a_conflict(tmp_path, mnist_root):
    train(tiny(mnist_root, epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(gtrain.RunConflict):
        train(tiny(mnist_root, epochs=1, precision="bf16"), tmp_path / "run", progress=False)


def test_grad_scaler_state_travels_in_the_checkpoint(mnist_root):
    """fp16 runs need CUDA (tests/test_cuda.py trains and resumes one); here the checkpoint round trip of
    an enabled scaler, whose scale after a few overflows must come back as it was."""
    from gmr.data import DataSpec, Split, load_split

    cfg = tiny(mnist_root)
    x, y = load_split(DataSpec("mnist", mnist_root, n_train=32), Split.TRAIN)
    state = TrainState.create(cfg, x, y, CPU)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    for _ in range(3):
        state.scaler.scale(state.model(x).sum()).backward()
        state.scaler.unscale_(state.optimizer)
        state.scaler.update(new_scale=state.scaler.get_scale() / 2)
    ckpt = state.to_checkpoint(cfg.identity(), CPU)
    assert ckpt["scaler"]["scale"] == 2.0 ** 7
    fresh = TrainState.create(cfg, x, y, CPU)
    fresh.scaler = torch.amp.GradScaler("cpu")
    fresh.load_checkpoint(ckpt, CPU)
    assert fresh.scaler.get_scale() == 2.0 ** 7 and fresh.scaler.state_dict() == state.scaler.state_dict()


@pytest.mark.parametrize("value, message", [
    ("fp16", "precision fp16 needs a CUDA device"),
    ("double", "unknown precision 'double'; valid precisions: fp32, bf16, fp16, auto"),
])
def test_cli_refuses_bad_precision_in_one_line(tmp_path, value, message):
    proc = subprocess.run([sys.executable, "-m", "gmr.cli", "train", "--out", str(tmp_path / "run"),
                           "--precision", value, "--device", "cpu", "--data-root", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_run_schema_refuses_an_unknown_precision(make_run):
    record = json.loads((make_run("fgsm") / "run.json").read_text())
    validate(record, "run")
    assert "precision" in record["cost"]
    record["cost"]["precision"] = "fp8"
    with pytest.raises(Exception, match="fp8"):
        validate(record, "run")


@pytest.mark.slow
def test_compiled_model_trains_and_counts_its_passes(tmp_path, mnist_root):
    """--compile is opt-in (slower on CPU, gmr/precision.py) but must train, count passes through the
    compiled model, and save weights under the model's own names."""
    record = train(tiny(mnist_root, epochs=1, n_train=64, method="gmr", compile=True), tmp_path / "run",
                   progress=False)
    assert record["cost"]["passes_per_sample"] == pytest.approx(4.0)
    assert record["config"]["compile"] is True
    names = set(_weights(tmp_path / "run" / "model_last.pt"))
    assert names and not any(n.startswith("_orig_mod") for n in names)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_a_step_in_bf16(method, tmp_path):
    """Each method's ops must accept bf16 inputs under autocast (some torch.linalg ops do not)."""
    from gmr.cost import PassCounter
    from gmr.methods import make_options
    from gmr.runs import RunDir

    cfg = TrainConfig(dataset="cifar10", model="tiny_cnn", method=method, epochs=1, batch_size=8,
                      precision="bf16", device="cpu", seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    state = TrainState.create(cfg, x, y, CPU)
    job = gtrain.TrainJob(cfg, RunDir(tmp_path), CPU, x[:4], y[:4], METHODS.get(method).fn,
                          make_options(method, "cifar10"), PassCounter(state.model), False, precision="bf16")
    row, _ = gtrain.train_epoch(state, job)
    assert torch.isfinite(torch.tensor(row["train_loss"]))
