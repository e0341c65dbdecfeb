"""Trainer features for fast-AT recipes: batch indices and per-example state (FGSM-PGI), minibatch
replays (Free-AT), label smoothing, the weight average (EMA) and its checkpoints, each recorded in
run.json and exact across resume; and the stateful methods against hand computations (the FGSM-PGI
step, the Free-AT perturbation update, ELLE-A's adaptive lambda)."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmr import methods as gm
from gmr.data import BatchIterator
from gmr.evaluate import EvalConfig, evaluate
from gmr.methods import METHODS, StepContext, StepOutput, loss_context, make_options
from gmr.registry import Entry
from gmr.runs import RunDir, RunError
from gmr.schemas import validate
from gmr.train import TrainConfig, train

gtrain = importlib.import_module("gmr.train")

pytestmark = pytest.mark.usefixtures("one_thread")
SKIP = {"epoch_seconds", "probe_seconds"}


def tiny(root, **overrides) -> TrainConfig:
    values = dict(dataset="mnist", model="tiny_cnn", method="fgsm", eps=0.3, epochs=2, batch_size=32,
                  n_train=256, n_val=64, probe_pgd_steps=2, data_root=str(root), seed=0, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def _log(run) -> list[dict]:
    import csv
    with open(run / "train_log.csv") as f:
        return [{k: v for k, v in row.items() if k not in SKIP} for row in csv.DictReader(f)]


def _weights(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# Batches with indices

def test_batch_indices_keep_the_order_and_point_at_the_rows():
    x, y = torch.rand(70, 1, 4, 4), torch.randint(0, 10, (70,))
    plain = list(BatchIterator(x, y, 16, generator=torch.Generator().manual_seed(3)))
    indexed = list(BatchIterator(x, y, 16, generator=torch.Generator().manual_seed(3), with_indices=True))
    assert len(plain) == len(indexed) == 5
    for (xb, yb), (xi, yi, idx) in zip(plain, indexed):
        assert torch.equal(xb, xi) and torch.equal(yb, yi)
        assert torch.equal(x[idx], xi) and torch.equal(y[idx], yi)
    assert sorted(torch.cat([b[2] for b in indexed]).tolist()) == list(range(70))


# --------------------------------------------------------------------------------------------------
# Resume = unbroken, with each stateful feature

@pytest.mark.parametrize("method, overrides, stored", [
    ("fgsm_pgi", {"ema_decay": 0.9}, {"pgi_delta", "pgi_momentum"}),
    ("free_at", {"epochs": 4, "method_options": {"replays": 2}}, {"free_at_delta"}),
    ("elle_a", {"label_smoothing": 0.3}, {"elle_a"}),
])
def test_resume_with_method_state_equals_unbroken_run(monkeypatch, tmp_path, mnist_root, method, overrides,
                                                      stored):
    cfg = tiny(mnist_root, method=method, **overrides)
    unbroken = train(cfg, tmp_path / "unbroken", progress=False)
    steps_per_epoch = 8 * cfg.replays()
    real, calls = METHODS.get(method).fn, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:   # inside the second epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    broken = tmp_path / "broken"
    with monkeypatch.context() as mp:
        mp.setitem(METHODS._entries, method, Entry(method, dataclasses.replace(METHODS.get(method), fn=interrupted)))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, broken, progress=False)
    saved = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and set(saved["method_state"]) == stored
    resumed = train(cfg, broken, progress=False)
    names = ["model_last.pt", "model_best.pt"] + (["model_ema.pt", "model_ema_last.pt"] if cfg.ema_decay else [])
    for name in names:
        assert _same(_weights(tmp_path / "unbroken" / name), _weights(broken / name)), name
    assert _log(tmp_path / "unbroken") == _log(broken)
    assert resumed["selection"] == unbroken["selection"]
    assert resumed["training"] == unbroken["training"] and set(resumed["training"]["method_state"]) == stored


def test_per_example_memory_is_read_back_in_the_next_epoch(monkeypatch, tmp_path, mnist_root):
    """FGSM-PGI's second epoch starts each example from what its first-epoch visit stored."""
    seen = []
    real = METHODS.get("fgsm_pgi").fn

    def spy(model, x, y, eps, o, ctx):
        if ctx.epoch == 1 and not seen:
            seen.append((ctx.indices.clone(), ctx.store["pgi_delta"][ctx.indices].clone()))
        return real(model, x, y, eps, o, ctx=ctx)

    monkeypatch.setitem(METHODS._entries, "fgsm_pgi",
                        Entry("fgsm_pgi", dataclasses.replace(METHODS.get("fgsm_pgi"), fn=spy)))
    train(tiny(mnist_root, method="fgsm_pgi"), tmp_path / "run", progress=False)
    idx, prior = seen[0]
    assert prior.abs().amax() > 0, "the first epoch wrote every example's prior"
    assert prior.abs().amax() <= 0.3 + 1e-6


# --------------------------------------------------------------------------------------------------
# Replays

def test_free_at_replays_count_epochs_as_passes_over_the_data(tmp_path, mnist_root):
    record = train(tiny(mnist_root, method="free_at", epochs=4, method_options={"replays": 2}),
                   tmp_path / "run", progress=False)
    validate(record, "run")
    assert record["training"]["replays"] == 2 and record["training"]["trained_epochs"] == 2
    assert record["selection"]["last_epoch"] == 2 and len(_log(tmp_path / "run")) == 2
    cost = record["cost"]
    assert cost["forward_passes"] == 4 * 256 and cost["backward_passes"] == 4 * 256  # 2 epochs x 2 replays
    assert cost["passes_per_sample"] == cost["declared_passes_per_sample"] == 1


def test_replays_round_up_and_keep_the_schedule_length(tmp_path, mnist_root):
    cfg = tiny(mnist_root, method="free_at", epochs=3, schedule="onecycle", method_options={"replays": 2})
    assert cfg.trained_epochs() == 2
    total = 2 * 8 * 2    # trained epochs x batches x replays: the lr moves every replay
    state = gtrain.TrainState.create(cfg, torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,)),
                                     torch.device("cpu"))
    assert state.scheduler.lr_lambdas[0](total) == 0.0 and state.scheduler.lr_lambdas[0](total - 1) > 0


# --------------------------------------------------------------------------------------------------
# Label smoothing

def test_label_smoothing_reaches_the_training_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert torch.allclose(gm.train_ce(logits, y), F.cross_entropy(logits, y))
    with loss_context(0.4) as ctx:
        smoothed = gm.train_ce(logits, y)
    assert ctx.applied and torch.allclose(smoothed, F.cross_entropy(logits, y, label_smoothing=0.4))
    assert not torch.allclose(smoothed, F.cross_entropy(logits, y))


def test_label_smoothing_changes_the_run_and_is_recorded(tmp_path, mnist_root):
    plain = train(tiny(mnist_root, epochs=1), tmp_path / "plain", progress=False)
    smooth = train(tiny(mnist_root, epochs=1, label_smoothing=0.4), tmp_path / "smooth", progress=False)
    assert "label_smoothing" not in plain["config_identity"], "runs made before the option keep their identity"
    assert smooth["config_identity"]["label_smoothing"] == 0.4 and smooth["training"]["label_smoothing"] == 0.4
    assert smooth["metrics"]["last"]["train_loss"] != plain["metrics"]["last"]["train_loss"]


@pytest.mark.parametrize("method", ["gmr", "fgsm_pgi"])
def test_label_smoothing_is_refused_where_the_method_ignores_it(tmp_path, mnist_root, method):
    with pytest.raises(ValueError, match="ignore label_smoothing"):
        tiny(mnist_root, method=method, label_smoothing=0.4).validate()
    tiny(mnist_root, method="fgsm_pgi", label_smoothing=0.4, method_options={"own_smoothing": False}).validate()


@pytest.mark.parametrize("overrides, match", [({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": 0.0}, "ema_decay"),
                                              ({"label_smoothing": 1.5}, "label_smoothing")])
def test_bad_feature_values_are_refused(mnist_root, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(mnist_root, **overrides).validate()


# --------------------------------------------------------------------------------------------------
# Weight average

def test_ema_is_probed_saved_selected_and_evaluated(tmp_path, mnist_root):
    record = train(tiny(mnist_root, ema_decay=0.9), tmp_path / "run", progress=False)
    validate(record, "run")
    log = _log(tmp_path / "run")
    assert {"ema_val_clean", "ema_val_ifgsm3", "ema_val_pgd"} <= set(log[0])
    best = max(range(2), key=lambda i: (float(log[i]["ema_val_ifgsm3"]), -i))
    assert record["selection"]["ema_best_epoch"] == best + 1
    run = RunDir(tmp_path / "run")
    ema_last, last = _weights(run.model_file("ema_last")), _weights(run.model_file("last"))
    assert not _same(ema_last, last), "the average is not the last weights"
    assert run.checkpoint_epoch("ema") == best + 1 and run.checkpoint_epoch("ema_last") == 2
    result = evaluate(EvalConfig(run=str(tmp_path / "run"), checkpoint="ema", attacks=["clean"], n_test=20,
                                 device="cpu"))
    record_eval = result[0] if isinstance(result, tuple) else result
    assert record_eval["checkpoint"] == "ema" and record_eval["checkpoint_epoch"] == best + 1


def test_ema_weights_follow_the_recurrence(tmp_path, mnist_root):
    """One epoch: the average equals d-weighted running means of the weights after every step."""
    cfg = tiny(mnist_root, epochs=1, ema_decay=0.8)
    trail = []
    real_step = gtrain._train_step

    def step(state, job, xb, yb, ctx):
        out = real_step(state, job, xb, yb, ctx)
        trail.append({k: v.detach().clone() for k, v in state.model.state_dict().items()
                      if v.dtype.is_floating_point})
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gtrain, "_train_step", step)
        train(cfg, tmp_path / "run", progress=False)
    expected = dict(trail[0])
    for w in trail[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * w[k] for k in expected}
    got = _weights(tmp_path / "run" / "model_ema_last.pt")
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


def test_ema_checkpoint_of_a_run_without_it_is_a_clear_error(tmp_path, mnist_root):
    train(tiny(mnist_root, epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="without a weight average"):
        RunDir(tmp_path / "run").require("ema")


# --------------------------------------------------------------------------------------------------
# The stateful methods by hand (a linear model in float64)

class Linear(nn.Module):
    def __init__(self, d: int, classes: int = 3, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, classes).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, d, generator=gen, dtype=torch.float64))
            self.fc.bias.copy_(torch.randn(classes, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _input_grad_mean_ce(model, x, y, smoothing: float) -> torch.Tensor:
    """d/dx mean_i CE_s(W x_i + b): (softmax - smoothed one-hot) W / B, by hand."""
    z = model(x)
    p = torch.softmax(z, 1)
    q = torch.full_like(p, smoothing / p.shape[1])
    q[torch.arange(len(y)), y] += 1 - smoothing
    return ((p - q) @ model.fc.weight / len(y)).view_as(x)


def test_fgsm_pgi_step_matches_hand_computation():
    torch.manual_seed(0)
    b, eps = 4, 0.2
    model = Linear(6)
    x = torch.rand(b, 1, 2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    o = make_options("fgsm_pgi", "mnist")
    ctx = StepContext(torch.tensor([3, 0, 5, 1]), 6, epoch=1)
    prior = (torch.rand(6, 1, 2, 3, dtype=torch.float64) * 2 - 1) * eps
    ctx.store = {"pgi_delta": prior.float().clone(), "pgi_momentum": torch.full((6, 1, 2, 3), 0.01)}
    delta, m0 = ctx.store["pgi_delta"][ctx.indices].double(), ctx.store["pgi_momentum"][ctx.indices].double()
    s = 0.4 * 3 / 2                        # factor 0.6 with 3 classes
    g = _input_grad_mean_ce(model, x + delta, y, s)
    momentum = g / g.abs().sum() + 0.3 * m0

    def step(direction):
        return torch.max(torch.min((delta + eps * direction.sign()).clamp(-eps, eps), 1 - x), -x)
    z_start, z_adv = model(x + delta), model(x + step(g))
    expected = F.cross_entropy(z_adv, y, label_smoothing=s) + 10 * F.mse_loss(z_adv, z_start)
    out = METHODS.get("fgsm_pgi").fn(model, x, y, eps, o, ctx=ctx)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(ctx.store["pgi_delta"][ctx.indices].double(), step(momentum), atol=1e-6)
    assert torch.allclose(ctx.store["pgi_momentum"][ctx.indices].double(), momentum, atol=1e-6)
    untouched = [2, 4]
    assert torch.equal(ctx.store["pgi_delta"][untouched], prior.float()[untouched])


def test_free_at_carries_the_perturbation_between_steps():
    torch.manual_seed(0)
    eps = 0.1
    model = Linear(6)
    x = torch.rand(4, 1, 2, 3, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 1])
    ctx, o = StepContext.fresh(x), make_options("free_at", "mnist")
    for _ in range(3):
        before = ctx.store.get("free_at_delta", torch.zeros_like(x)).double().clone()
        out = METHODS.get("free_at").fn(model, x, y, eps, o, ctx=ctx)
        g = _input_grad_mean_ce(model, (x + before).clamp(0, 1), y, 0.0)
        assert torch.allclose(out.loss, F.cross_entropy(model((x + before).clamp(0, 1)), y))
        out.loss.backward()
        out.after_backward()
        expected = (before + eps * g.sign()).clamp(-eps, eps)
        assert torch.allclose(ctx.store["free_at_delta"].double(), expected, atol=1e-7)
        model.zero_grad()
    assert ctx.store["free_at_delta"].abs().amax() == pytest.approx(eps)


def test_elle_a_lambda_follows_the_official_rule(monkeypatch):
    """lambda 0 until an error beyond mean + 2 std of all earlier ones (after more than 2), then
    lambda_max, times 0.99 at each later step without a spike (core/utils/train.py:216-227)."""
    errors = [1.0, 1.2, 0.8, 1.1, 9.0, 1.0, 1.0, 30.0]
    used = []

    def fake_elle(model, x, y, eps, o):
        used.append(o.lambda_)
        err = torch.tensor(errors[len(used) - 1])
        return StepOutput(torch.zeros(()), torch.zeros(len(y), 10), y, {"ce": torch.zeros(()), "reg": err})

    monkeypatch.setattr(gm, "elle", fake_elle)
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    ctx, o = StepContext.fresh(x), make_options("elle_a", "mnist")
    for _ in errors:
        METHODS.get("elle_a").fn(None, x, y, 0.3, o, ctx=ctx)
    lam, history, expected = 0.0, [], []
    for e in errors:
        expected.append(lam)
        lam = o.lambda_max if len(history) > 2 and e > np.mean(history) + 2 * np.std(history) else lam * 0.99
        history.append(e)
    assert used == pytest.approx(expected)
    assert expected[5] == o.lambda_max and expected[6] == pytest.approx(0.99 * o.lambda_max)
    assert float(ctx.store["elle_a"][0]) == pytest.approx(lam)


def test_stateful_methods_run_without_a_context():
    """The registry tests call a method with (model, x, y, eps, options): a stateful one then starts
    from a fresh context of its own."""
    assert {n for n in METHODS.names() if METHODS.get(n).per_example_state} == {"free_at", "fgsm_pgi", "elle_a"}
    assert METHODS.get("free_at").replays(make_options("free_at", "mnist")) == 8
    torch.manual_seed(0)
    model = Linear(16)
    x, y = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    for name in ("free_at", "fgsm_pgi", "elle_a"):
        out = METHODS.get(name).fn(model, x, y, 0.1, make_options(name, "mnist"))
        assert torch.isfinite(out.loss)
