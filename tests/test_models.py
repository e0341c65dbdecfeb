"""Every registered model gets a CPU smoke test; parameter counts; `gmr models` lists them all."""
from __future__ import annotations

import pytest
import torch

from gmr.cli import main
from gmr.data import dataset_info
from gmr.models import MODELS, count_parameters, create_model, list_models

BIG = {"resnet18", "preact_resnet18", "wrn_28_10"}


def _datasets(name: str) -> list[str]:
    sizes = MODELS.entry(name).meta.get("input_sizes")
    if sizes == [(28, 28)]:
        return ["mnist"]
    if name in BIG:
        return ["cifar10"]
    return ["mnist", "cifar10"]


CASES = [(m, d) for m in list_models() for d in _datasets(m)]


@pytest.mark.parametrize("name, dataset", CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_forward_backward_smoke(name, dataset):
    torch.manual_seed(0)
    info = dataset_info(dataset)
    model = create_model(name, dataset)
    batch = 2 if name in BIG else 4
    x = torch.rand(batch, *info.input_shape)
    model.train()
    out = model(x)
    assert out.shape == (batch, info.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, info.num_classes)


def test_lenet_plus_parameter_count():
    assert count_parameters(create_model("lenet_plus", "mnist")) == 3_274_634


def test_resnet18_parameter_count():
    # the usual CIFAR ResNet-18 (3x3 stem, BatchNorm shortcuts) for 10 classes
    assert count_parameters(create_model("resnet18", "cifar10")) == 11_173_962


def test_models_take_inputs_in_pixel_space():
    # CIFAR models normalise inside the model; the buffers hold the dataset statistics
    model = create_model("preact_resnet18", "cifar10")
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(dataset_info("cifar10").mean))
    assert "normalize.mean" in model.state_dict()


def test_wrong_input_size_is_rejected():
    with pytest.raises(ValueError, match="lenet_plus"):
        create_model("lenet_plus", "cifar10")


def test_gmr_models_lists_all(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == set(list_models())
    lenet = next(line for line in lines if line.startswith("lenet_plus"))
    assert "3,274,634" in lenet and "1x28x28" in lenet


def test_normalisation_is_a_property_of_the_model_entry():
    """The paper's WideResNet-28-10 and LeNet+ take raw [0, 1] inputs (SAT-Rx tools/utils.py:37-47);
    the ResNets of Wong et al. normalise with the dataset's statistics."""
    from gmr.models import normalizes_inputs

    assert not normalizes_inputs("wrn_28_10") and not normalizes_inputs("lenet_plus")
    assert normalizes_inputs("preact_resnet18") and normalizes_inputs("resnet18")
    wrn = create_model("wrn_28_10", "cifar10")
    assert not any("normalize" in k for k in wrn.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(wrn.normalize(x), x)
    resnet = create_model("resnet18", "cifar10")
    assert not torch.equal(resnet.normalize(x), x)


def test_gmr_models_says_which_normalise(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "[0, 1] raw" in next(l for l in lines if l.startswith("wrn_28_10"))
    assert "normalised" in next(l for l in lines if l.startswith("preact_resnet18"))
