"""AutoAttack through gmr.autoattack_adapter: the standard protocol on pyautoattack's own CIFAR-10 model
and real CIFAR-10 images, masking flags on a model with zero gradients, resume after an interruption,
our PGD against APGD-CE, and the adapter's hygiene (modes, gradients, RNG, fp32)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

from gmr.autoattack_adapter import (AutoAttackConfig, remove_state, run_autoattack, state_files)
from gmr.report.cards import load_schema
from gmr.data import DataSpec, Split, load_split
from gmr.evaluate import attack_correct, resolve_params
from gmr.runs import RunDir


pytestmark = pytest.mark.usefixtures("one_thread")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(spec.submodule_search_locations[0])


def foolbox_cifar10() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 20 CIFAR-10 test images shipped with foolbox 3.3.4 (label in the file name)."""
    from PIL import Image

    files = sorted((_package_dir("foolbox") / "data").glob("cifar10_*.png"))
    assert len(files) == 20
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)
                     .permute(2, 0, 1) for f in files])
    y = torch.tensor([int(f.stem.split("_")[-1]) for f in files])
    return x, y


def _autoattack_entry_schema() -> dict:
    schema = load_schema("eval")
    return {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/autoattack"}


def test_standard_autoattack_breaks_pyautoattacks_cifar10_resnet18():
    from pyautoattack.examples.resnet import ResNet18

    model = ResNet18()
    weights = _package_dir("pyautoattack") / "examples" / "model_test.pt"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    x, y = foolbox_cifar10()
    result = run_autoattack(model, x, y, AutoAttackConfig(eps=8 / 255, batch_size=20, seed=0))
    assert result.clean.all() and result.clean_accuracy == 1.0  # 20/20 clean
    assert result.accuracy == 0.0 and not result.robust.any()   # 0 % under AutoAttack
    assert result.per_attack == {"apgd-ce": 0.0, "apgd-t": 0.0, "fab-t": 0.0, "square": 0.0}
    assert result.skipped == ["apgd-t", "fab-t", "square"]       # nothing robust left after APGD-CE
    entry = result.to_record()
    jsonschema.validate(entry, _autoattack_entry_schema())
    assert entry["version"] == "standard" and entry["norm"] == "Linf" and entry["n_examples"] == 20


class QuantisedNet(nn.Module):
    """round(4x)/4 before a linear classifier: the gradient w.r.t. the input is zero everywhere."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x):
        return self.net(torch.round(4 * x) / 4)


@pytest.fixture(scope="module")
def quantised(mnist_root):
    torch.manual_seed(0)
    model = QuantisedNet()
    x, y = load_split(DataSpec("mnist", mnist_root, n_train=2000), Split.TRAIN)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    xt, yt = load_split(DataSpec("mnist", mnist_root, n_test=20), Split.TEST)
    return model.eval(), xt, yt


def test_quantised_input_raises_zero_gradient_and_square_flags(quantised):
    model, x, y = quantised
    model.train()  # the adapter must evaluate in eval mode and give the flag back
    params_before = [p.requires_grad for p in model.parameters()]
    rng_before = torch.get_rng_state()
    result = run_autoattack(model, x, y, AutoAttackConfig(eps=0.2, batch_size=20, seed=0))
    entry = result.to_record()
    jsonschema.validate(entry, _autoattack_entry_schema())
    flags = entry["flags"]
    # the texts of pyautoattack.checks.check_zero_gradients and check_square_sr
    assert any("points with zero gradient!" in f for f in flags), flags
    assert any(f.startswith("Square Attack has decreased the robust accuracy of") for f in flags), flags
    assert entry["per_attack"]["square"] < entry["per_attack"]["fab-t"] - 0.002
    assert entry["accuracy"] == pytest.approx(result.robust.mean())
    assert model.training and [p.requires_grad for p in model.parameters()] == params_before
    assert torch.equal(torch.get_rng_state(), rng_before)  # Square/FAB reseed: the caller's stream is kept


def test_interrupted_autoattack_resumes_from_its_state_file(quantised, tmp_path):
    model, x, y = quantised
    cfg = AutoAttackConfig(eps=0.2, version="custom", attacks=("apgd-ce", "square"), batch_size=20, seed=0)
    full = run_autoattack(model, x, y, cfg)

    class Interrupted(Exception):
        pass

    class Watch(logging.Handler):
        square_started = False

        def emit(self, record):
            if record.getMessage() == "running square":
                Watch.square_started = True

    class Breaks(nn.Module):
        """The same model, but the process 'dies' at the first forward of the Square attack."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if Watch.square_started:
                raise Interrupted
            return self.inner(x)

    state = tmp_path / "eval.aa-eps0.2.state.json"
    watch = Watch()
    logging.getLogger("auto-attack").addHandler(watch)
    try:
        with pytest.raises(Interrupted):
            run_autoattack(Breaks(model), x, y, cfg, state_path=state)
    finally:
        logging.getLogger("auto-attack").removeHandler(watch)
    main, _, progress = state_files(state)
    assert main.exists() and progress.exists()

    resumed = run_autoattack(model, x, y, cfg, state_path=state)
    assert resumed.resumed and not full.resumed
    assert "running apgd-ce" not in resumed.log and "running square" in resumed.log  # APGD-CE not redone
    assert np.array_equal(resumed.robust, full.robust)
    assert resumed.per_attack == full.per_attack
    assert resumed.flags == full.flags  # Square's check redone on the merged numbers
    remove_state(state)
    assert not any(p.exists() for p in state_files(state))


def test_state_of_another_configuration_is_not_resumed(quantised, tmp_path):
    model, x, y = quantised
    state = tmp_path / "s.json"
    cfg = AutoAttackConfig(eps=0.2, version="custom", attacks=("apgd-ce",), batch_size=20)
    run_autoattack(model, x, y, cfg, state_path=state)
    other = run_autoattack(model, x, y, AutoAttackConfig(eps=0.1, version="custom", attacks=("apgd-ce",),
                                                         batch_size=20), state_path=state)
    assert not other.resumed  # eps differs: started afresh
    again = run_autoattack(model, x, y, AutoAttackConfig(eps=0.1, version="custom", attacks=("apgd-ce",),
                                                         batch_size=20), state_path=state)
    assert again.resumed and again.accuracy == other.accuracy


def test_our_pgd_is_as_strong_as_apgd_ce_first_restart(make_run):
    run = make_run("standard", lr=0.05, schedule="onecycle", n_train=2000)
    model, meta, _ = RunDir(run).load_model("best", torch.device("cpu"))
    x, y = load_split(DataSpec("mnist", Path(meta["config"]["data_root"]), n_test=48), Split.TEST)
    eps = 0.1  # a budget where this model keeps part of its accuracy, so the comparison means something
    params = resolve_params("pgd", "mnist", {})  # the paper code's MNIST PGD: 100 steps of 0.01
    ours, _ = attack_correct(model, x, y, "pgd", eps, params, seed=0, batch_size=48, device=torch.device("cpu"))
    apgd = run_autoattack(model, x, y, AutoAttackConfig(eps=eps, version="custom", attacks=("apgd-ce",),
                                                        apgd_restarts=1, batch_size=48, seed=0))
    assert 0.1 < apgd.accuracy < apgd.clean_accuracy  # the attack bites, and not everything falls
    assert ours.mean() <= apgd.accuracy + 0.05, (ours.mean(), apgd.accuracy)


def test_adapter_runs_fp32_even_for_a_bf16_model(quantised):
    model, x, y = quantised
    low = QuantisedNet()
    low.load_state_dict(model.state_dict())
    low = low.to(torch.bfloat16).eval()
    cfg = AutoAttackConfig(eps=0.2, version="custom", attacks=("apgd-ce",), batch_size=20)
    result = run_autoattack(low, x, y, cfg)
    reference = run_autoattack(model, x, y, cfg)
    assert next(low.parameters()).dtype == torch.bfloat16  # the caller's model is not converted in place
    assert np.array_equal(result.clean, reference.clean) and result.accuracy == reference.accuracy


@pytest.mark.parametrize("kwargs, text", [
    (dict(eps=1.5), "eps must be [0, 1]"),
    (dict(eps=-0.1, norm="L2"), "eps must be >= 0"),
    (dict(eps=0.3, version="rand"), "unknown AutoAttack version"),
    (dict(eps=0.3, norm="L1"), "unknown AutoAttack norm"),
    (dict(eps=0.3, version="custom"), "needs attacks"),
    (dict(eps=0.3, version="custom", attacks=("apgd-ce", "pgd")), "unknown AutoAttack attack 'pgd'"),
    (dict(eps=0.3, attacks=("apgd-ce",)), "custom only"),
    (dict(eps=0.3, batch_size=0), "batch size"),
])
def test_config_errors(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("]", r"\]")):
        AutoAttackConfig(**kwargs).validate()
