"""Checks that need a CUDA GPU (marked `cuda`; benchmarks/gpu_check.sh runs them with the train-step
benchmark): one training step of every method in every precision, exact resume in fp16 (scaler state)
and bf16, AutoAttack on a few points of a bf16-trained model (in fp32), and what `auto` picks. Without
CUDA each test is skipped with the reason."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

from gmr import precision  # noqa: E402
from gmr.cost import PassCounter  # noqa: E402
from gmr.methods import METHODS, make_options  # noqa: E402
from gmr.registry import Entry  # noqa: E402
from gmr.runs import RunDir  # noqa: E402
from gmr.train import TrainConfig, TrainJob, TrainState, train, train_epoch  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")]
PRECISIONS = ["fp32", "bf16", "fp16"]
CUDA = torch.device("cuda")


def _skip_unsupported(value: str) -> None:
    if value == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")


@pytest.fixture
def deterministic():
    """Bitwise-repeatable kernels: without them a resumed run may differ by atomics' ordering alone."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("value", PRECISIONS)
@pytest.mark.parametrize("method", METHODS.names())
def test_one_training_step_per_method_and_precision(method, value, tmp_path):
    _skip_unsupported(value)
    cfg = TrainConfig(dataset="cifar10", model="tiny_cnn", method=method, epochs=1, batch_size=16,
                      precision=value, device="cuda", seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 32, 32, generator=gen).to(CUDA), torch.randint(0, 10, (32,), generator=gen).to(CUDA)
    state = TrainState.create(cfg, x, y, CUDA)
    before = [p.detach().clone() for p in state.model.parameters()]
    job = TrainJob(cfg, RunDir(tmp_path), CUDA, x[:8], y[:8], METHODS.get(method).fn,
                   make_options(method, "cifar10"), PassCounter(state.model), False,
                   precision=value, channels_last=precision.channels_last(value, CUDA, state.model))
    row, seconds = train_epoch(state, job)
    assert torch.isfinite(torch.tensor(row["train_loss"])) and seconds > 0
    assert all(p.dtype == torch.float32 for p in state.model.parameters()), "weights stay fp32"
    assert any(not torch.equal(a, p) for a, p in zip(before, state.model.parameters())), "the step updated"
    assert state.scaler.is_enabled() == (value == "fp16")


def _synthetic_root(tmp_path):
    from test_speedrun import synthetic_cifar10  # tests/ is on the path (pytest's rootdir import mode)

    return synthetic_cifar10(tmp_path / "data")


def _tiny(root, value: str, **overrides) -> TrainConfig:
    values = dict(dataset="cifar10", model="tiny_cnn", method="gmr", epochs=2, batch_size=8, n_train=32,
                  val_size=16, n_val=16, probe_pgd_steps=1, precision=value, device="cuda",
                  data_root=str(root), seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("value", ["fp16", "bf16"])
def test_resume_on_cuda_equals_unbroken_run(value, tmp_path, monkeypatch, deterministic):
    _skip_unsupported(value)
    root = _synthetic_root(tmp_path)
    cfg = _tiny(root, value)
    unbroken = train(cfg, tmp_path / "unbroken", progress=False)
    assert unbroken["cost"]["precision"] == value and unbroken["cost"]["device"].startswith("cuda")
    real, calls = METHODS.get("gmr").fn, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 4 + 2:   # inside epoch 2 (4 steps an epoch)
            raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as mp:
        mp.setitem(METHODS._entries, "gmr", Entry("gmr", dataclasses.replace(METHODS.get("gmr"), fn=interrupted)))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "broken", progress=False)
    ckpt = torch.load(tmp_path / "broken" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert bool(ckpt["scaler"]) == (value == "fp16"), "the fp16 loss scale is part of the resume state"
    train(cfg, tmp_path / "broken", progress=False)
    for name in ("model_last.pt", "model_best.pt"):
        a, b = _weights(tmp_path / "unbroken" / name), _weights(tmp_path / "broken" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_autoattack_on_a_few_points_of_a_bf16_model_runs_in_fp32(tmp_path):
    from gmr.autoattack_adapter import AutoAttackConfig, run_autoattack
    from gmr.data import DataSpec, Split, load_split
    from gmr.models import create_model

    _skip_unsupported("bf16")
    root = _synthetic_root(tmp_path)
    train(_tiny(root, "bf16", epochs=1), tmp_path / "run", progress=False)
    model = create_model("tiny_cnn", "cifar10")
    model.load_state_dict(_weights(tmp_path / "run" / "model_last.pt"))
    x, y = load_split(DataSpec("cifar10", root, n_test=8), Split.TEST)
    result = run_autoattack(model, x, y, AutoAttackConfig(eps=8 / 255, batch_size=8, seed=0, device="cuda"))
    with torch.no_grad():
        clean = (model.to(CUDA).eval()(x.to(CUDA)).argmax(1).cpu() == y).float().mean().item()
    assert result.clean_accuracy == pytest.approx(clean)
    assert 0.0 <= result.accuracy <= result.clean_accuracy
    assert next(model.parameters()).dtype == torch.float32


def test_auto_picks_bf16_where_the_gpu_has_it():
    assert precision.resolve("auto", CUDA) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert precision.resolve("fp16", CUDA) == "fp16"
