"""RobustBench inside the suite (gmr/zoo.py), offline: robustbench 1.1.1 imports over pyautoattack without
shadowing a real `autoattack`; `gmr zoo list`, `gmr evaluate --zoo` and `gmr diagnose --zoo` on zoo
architectures with fixed random weights saved where `robustbench.utils.load_model` looks for them, on
foolbox's 20 real CIFAR-10 test images; robustbench.benchmark against our AutoAttack on the same model and
points; and the workflow's `zoo_models:` rows beside a run of ours.

No zoo weights and no CIFAR-10 download are reachable here, so the numbers are those of random networks:
the tests check the plumbing, the protocol and the records, not published accuracies.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gmr.data as gdata
from gmr import zoo
from gmr.cli import main
from gmr.schemas import validate

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CIFAR_EPS = 8 / 255
WONG = "Wong2020Fast"
GRADALIGN = "Andriushchenko2020Understanding"


# --------------------------------------------------------------------------------------------------
# Data and checkpoints

def foolbox_cifar10() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 20 CIFAR-10 test images shipped with foolbox 3.3.4 (label in the file name), as uint8."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox is not installed")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("cifar10_*.png"))
    assert len(files) == 20
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    return x.contiguous(), torch.tensor([int(f.stem.split("_")[-1]) for f in files])


def write_cifar10_root(root: Path, n_train: int = 120) -> Path:
    """A data root holding CIFAR-10 in torchvision's on-disk layout (cifar-10-batches-py, pickled batches):
    foolbox's 20 real test images as the test set and `n_train` random training images. torchvision
    checks the real files' MD5 sums, so the decoded tensors also go into gmr.data's loader cache, keyed by
    these files, which is what every process (the workflow's jobs too) then reads."""
    x_test, y_test = foolbox_cifar10()
    gen = torch.Generator().manual_seed(0)
    x_train = torch.randint(0, 256, (n_train, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y_train = torch.arange(n_train) % 10
    raw = root / "cifar-10-batches-py"
    raw.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in {"test_batch": (x_test, y_test), "data_batch_1": (x_train, y_train)}.items():
        with open(raw / name, "wb") as fh:
            pickle.dump({b"data": x.reshape(len(x), -1).numpy(), b"labels": y.tolist()}, fh)
    gdata._write_cache("CIFAR10", root, False, x_test, y_test)
    gdata._write_cache("CIFAR10", root, True, x_train, y_train)
    return root


def save_zoo_checkpoint(model_dir: Path, name: str, seed: int = 0) -> Path:
    """Fixed random weights of the zoo architecture `name` (CIFAR-10, Linf), saved where load_model looks:
    <model_dir>/cifar10/Linf/<name>.pt, in the layouts of the real files (GradAlign's holds its `last`
    and `best` state dicts; others a `state_dict` with DataParallel's `module.` prefix)."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(seed)
    model = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][name]["model"]()
    state = model.state_dict()
    if name == GRADALIGN:
        checkpoint = {"last": state, "best": state}
    else:
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = model_dir / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10_root(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo-models")
    save_zoo_checkpoint(d, WONG)
    return d


def run_gmr(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# Importing robustbench 1.1.1 over pyautoattack

def _python(code: str, env_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = f"{env_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_robustbench_imports_over_pyautoattack_with_autoattacks_api():
    proc = _python("""
        import sys, torch
        import gmr.zoo as zoo
        import robustbench, robustbench.eval, autoattack, pkg_resources
        from autoattack.state import EvaluationState
        import pyautoattack, pyautoattack.state
        assert robustbench.eval.AutoAttack is autoattack.AutoAttack
        assert issubclass(autoattack.AutoAttack, pyautoattack.AutoAttack)
        assert EvaluationState is pyautoattack.state.EvaluationState
        assert {"autoattack", "autoattack.state"} <= set(zoo.SHIMS), zoo.SHIMS
        assert not any(p.endswith("autoattack") for p in sys.path)  # nothing of ours on the path
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
        x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        # the GitHub API: positional norm/eps, attacks_to_run, log_path, bs, return_labels
        adv = autoattack.AutoAttack(model, "Linf", 0.1, seed=0, attacks_to_run=["apgd-ce"], version="custom",
                                    device="cpu", log_path="ignored.log")
        x_adv = adv.run_standard_evaluation(x, y, bs=2)
        assert isinstance(x_adv, torch.Tensor) and x_adv.shape == x.shape
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        pair = adv.run_standard_evaluation(x, y, bs=2, return_labels=True)
        assert isinstance(pair, tuple) and len(pair) == 2 and pair[1].shape == y.shape
        path = pkg_resources.resource_filename("robustbench.loaders", "helper_files/imagenet_test_image_ids.txt")
        assert open(path).readline().strip()
        print("ok", ",".join(zoo.SHIMS))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
    assert not (ROOT / "ignored.log").exists()


def test_a_real_autoattack_and_pkg_resources_are_never_shadowed(tmp_path):
    """A user's own `autoattack` (here a stand-in package on the path, and one already imported) and
    `pkg_resources` are used as they are: gmr.zoo registers nothing under their names."""
    pkg = tmp_path / "autoattack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pyautoattack import AutoAttack as _A\n"
                                     "class AutoAttack(_A):\n    REAL = True\n")
    (pkg / "state.py").write_text("from pyautoattack.state import EvaluationState\n")
    (tmp_path / "pkg_resources.py").write_text("REAL = True\ndef resource_filename(p, r):\n    return r\n")
    on_path = _python("""
        import gmr.zoo as zoo, autoattack, pkg_resources, robustbench.eval
        assert zoo.SHIMS == [], zoo.SHIMS
        assert autoattack.AutoAttack.REAL and pkg_resources.REAL
        assert robustbench.eval.AutoAttack is autoattack.AutoAttack
        print("ok")
    """, tmp_path)
    assert on_path.returncode == 0 and on_path.stdout.strip() == "ok", on_path.stderr[-3000:]
    imported = _python("""
        import sys, types
        real = types.ModuleType("autoattack"); real.AutoAttack = object
        sys.modules["autoattack"] = real
        import gmr.zoo as zoo
        assert "autoattack" not in zoo.SHIMS and sys.modules["autoattack"] is real
        print("ok")
    """)
    assert imported.returncode == 0 and imported.stdout.strip() == "ok", imported.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# gmr zoo list, gmr evaluate --zoo

def test_zoo_list_names_architectures_published_numbers_and_local_checkpoints(capsys, model_dir):
    code, out, err = run_gmr(capsys, "zoo", "list", "--dataset", "cifar10", "--threat-model", "Linf",
                             "--model-dir", str(model_dir))
    assert code == 0, err
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines[WONG][1:] == ["PreActResNet-18", "83.34", "43.21", "yes"]
    assert lines[GRADALIGN][1:] == ["PreActResNet-18", "79.84", "43.93", "no"]
    infos = {i.name: i for i in zoo.list_models("cifar10", "Linf")}
    assert len(infos) == len(lines) > 50
    assert infos[WONG].eps == pytest.approx(CIFAR_EPS) and infos[WONG].venue == "ICLR 2020"
    assert {i.architecture for i in infos.values()} >= {"PreActResNet-18", "WideResNet-28-10"}
    assert "unknown" not in {i.architecture for i in infos.values() if i.clean_accuracy is not None}


def test_evaluate_zoo_model_writes_the_same_record_as_for_a_run(capsys, tmp_path, cifar_root, model_dir):
    out = tmp_path / "wong.json"
    code, stdout, err = run_gmr(
        capsys, "evaluate", "--zoo", WONG, "--dataset", "cifar10", "--model-dir", str(model_dir),
        "--data-root", str(cifar_root), "--n-test", "10", "--attacks", "clean,fgsm,pgd,autoattack",
        "--param", "pgd.steps=3", "--batch-size", "10", "--threads", "1", "--quiet", "--out", str(out))
    assert code == 0, err
    assert stdout.startswith(f"RobustBench {WONG} (cifar10 Linf) (published, n=10")
    record = json.loads(out.read_text())
    validate(record, "eval")
    assert record["run_id"] == f"zoo:cifar10:Linf:{WONG}" and record["run"] == record["run_id"]
    assert (record["method"], record["model"], record["checkpoint"]) == (WONG, "PreActResNet-18", "published")
    assert record["train_seed"] is None and record["eps"] == pytest.approx(CIFAR_EPS)
    assert record["zoo"]["published_robust_accuracy"] == pytest.approx(0.4321)
    assert record["zoo"]["checkpoint_files"] == [str(model_dir / "cifar10" / "Linf" / f"{WONG}.pt")]
    assert set(record["attacks"]) == {"clean", "fgsm", "pgd", "autoattack"}
    assert record["attacks"]["autoattack"]["params"]["version"] == "standard"
    # the weights evaluated are the ones saved: clean correctness point by point
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    same = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][WONG]["model"]().eval()
    x, y = foolbox_cifar10()
    with torch.no_grad():
        expected = (same(x[:10].float() / 255).argmax(1) == y[:10]).numpy()
    with np.load(out.with_suffix(".npz")) as arrays:
        assert np.array_equal(arrays["clean"], expected)
        assert not (arrays["autoattack"] & ~arrays["clean"]).any()



def _offline(monkeypatch):
    """No internet, whatever the machine has: robustbench's checkpoint download fails as it does offline."""
    import robustbench.utils

    def no_network(gdrive_id, fname_save):
        raise ConnectionError("Max retries exceeded (NameResolutionError: drive.google.com)")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", no_network)


@pytest.mark.parametrize("command", ["evaluate", "diagnose"])
@pytest.mark.parametrize("case, args, message", [
    ("unknown name", ["--zoo", "Wong2020Fats", "--dataset", "cifar10"], "did you mean Wong2020Fast"),
    ("missing checkpoint offline", ["--zoo", GRADALIGN, "--dataset", "cifar10", "--model-dir", "{empty}"],
     "the download failed (ConnectionError"),
    ("zoo and a run", ["--zoo", WONG, "--dataset", "cifar10", "--run", "{run}"], "not both"),
    ("no dataset", ["--zoo", WONG], "--zoo needs --dataset"),
    ("dataset without zoo", ["--run", "{run}", "--dataset", "cifar10"], "go with --zoo"),
    ("dataset outside the zoo", ["--zoo", WONG, "--dataset", "mnist"], "datasets: cifar10, cifar100"),
    ("threat model", ["--zoo", WONG, "--dataset", "cifar10", "--threat-model", "L2"], "valid: Linf"),
    ("damaged checkpoint", ["--zoo", "Standard", "--dataset", "cifar10", "--model-dir", "{damaged}"],
     "does not load as RobustBench model Standard"),
])
def test_bad_zoo_input_is_one_line_and_exit_2_before_any_work(capsys, monkeypatch, tmp_path, cifar_root,
                                                              model_dir, command, case, args, message):
    _offline(monkeypatch)
    damaged = tmp_path / "damaged"
    (damaged / "cifar10" / "Linf").mkdir(parents=True)
    (damaged / "cifar10" / "Linf" / "Standard.pt").write_bytes(b"not a checkpoint" * 64)
    run = tmp_path / "run"
    run.mkdir()
    places = {"{empty}": str(tmp_path / "empty"), "{run}": str(run), "{damaged}": str(damaged)}
    args = [places.get(a, a) for a in args]
    if "--model-dir" not in args and "--zoo" in args:
        args += ["--model-dir", str(model_dir)]
    out = tmp_path / ("out.json" if command == "evaluate" else "diag")
    code, stdout, err = run_gmr(capsys, command, *args, "--data-root", str(cifar_root), "--n-test", "4",
                                "--threads", "1", "--out", str(out))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"gmr {command}: error: ") and message in err, err
    # nothing written (a checkpoint that does not load is found when the model is loaded, after the
    # audit's folder was made, as for a run's damaged model file)
    assert not out.is_file() and not (out / "audit.json").exists() and stdout == ""
    assert not list((tmp_path / "empty").rglob("*.pt"))  # a failed download leaves no file behind


def test_zoo_options_that_do_not_fit_an_evaluation_are_refused(capsys, tmp_path, cifar_root, model_dir):
    base = ["evaluate", "--zoo", WONG, "--dataset", "cifar10", "--model-dir", str(model_dir), "--data-root",
            str(cifar_root), "--n-test", "4", "--out", str(tmp_path / "e.json")]
    code, _, err = run_gmr(capsys, *base, "--attacks", "clean,autoattack", "--card", str(tmp_path / "card.json"))
    assert code == 2 and "a RobustBench model has its card in the zoo" in err
    code, _, err = run_gmr(capsys, *base, "--reuse-from", str(tmp_path / "best.json"))
    assert code == 2 and "--reuse-from" in err and "has one" in err
    assert not list(tmp_path.glob("*.json"))


# --------------------------------------------------------------------------------------------------
# Cross-check: robustbench.benchmark and our AutoAttack on the same model and points

def _linear_cifar_model(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """A linear classifier fitted to the points (fixed seed): AutoAttack standard runs its whole cascade
    on it in seconds, and its robustness radii spread, so a budget between them leaves some points robust
    and breaks others."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _median_radius(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Median over points of margin / ||w_y - w_k||_1 (the Linf radius of a linear model, box ignored)."""
    w = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    margin = z.gather(1, y[:, None]) - z
    dist = (w[y][:, None, :] - w[None]).abs().sum(-1)
    radius = torch.where(torch.arange(10)[None] == y[:, None], torch.inf, margin / dist.clamp_min(1e-12))
    return float(radius.min(1).values.median())


def test_robustbench_benchmark_and_our_autoattack_agree_on_the_same_model_and_points():
    from gmr.autoattack_adapter import AutoAttackConfig, run_autoattack

    x8, y = foolbox_cifar10()
    x = x8.float() / 255
    model = _linear_cifar_model(x, y)
    eps = _median_radius(model, x, y)
    ours = run_autoattack(model, x, y, AutoAttackConfig(eps=eps, version="standard", seed=0, batch_size=20))
    clean, robust = zoo.robustbench_benchmark(model, x, y, eps, dataset="cifar10", threat_model="Linf",
                                              batch_size=20, seed=0)
    assert clean == ours.clean_accuracy == 1.0
    assert 0 < ours.accuracy < 1  # the budget breaks some points and not others: the check can fail
    assert robust == pytest.approx(ours.accuracy, abs=1e-9)
    assert list(ours.per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]  # the standard cascade ran


# --------------------------------------------------------------------------------------------------
# The workflow: zoo_models rows beside our runs

def _zoo_study(workdir: Path) -> Path:
    """A CIFAR-10 study of two tiny runs (GMR and FGSM-AT) with Wong2020Fast beside them."""
    write_cifar10_root(workdir / "data")
    save_zoo_checkpoint(workdir / "models", WONG)
    cfg = {
        "results": "results", "data_root": "data", "device": "cpu", "zoo": {"model_dir": "models"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "schedule": "onecycle", "n_train": 64,
                  "val_size": 40, "n_val": 20, "probe_pgd_steps": 2},
        "evaluate": {"checkpoints": ["best"], "attacks": ["clean", "fgsm", "pgd"],
                     "attack_params": {"pgd": {"steps": 2}}, "n_test": 20, "batch_size": 20,
                     "autoattack": {"n_test": 0}},
        "diagnose": {"n_test": 6, "n_curve": 6, "quick": True, "methods": ["gmr"]},
        "experiments": {"cifar": {"dataset": "cifar10", "model": "tiny_cnn", "eps": ["8/255"],
                                  "methods": ["fgsm", "gmr"], "seeds": [0], "zoo_models": [WONG]}},
        "resources": {rule: {"threads": 1, "mem_mb": 2000, "runtime": 10}
                      for rule in ("train", "evaluate", "autoattack", "diagnose", "summary")},
    }
    path = workdir / "zoo.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_workflow_adds_zoo_rows_to_robustness_comparisons_and_masking_tables(tmp_path):
    config = _zoo_study(tmp_path)
    cmd = ["timeout", "-s", "INT", "900", sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(config), "--cores", "2", "results/tables/robustness_cifar10.csv"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    logs = "".join(f"\n--- {p}:\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.rglob("logs/**/*.log")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + logs
    results = tmp_path / "results"
    record = json.loads((results / "eval/cifar/zoo" / WONG / "eps8-255/published.json").read_text())
    audit = json.loads((results / "diagnostics/cifar/zoo" / WONG / "eps8-255/audit.json").read_text())
    validate(record, "eval")
    validate(audit, "audit")
    ours = json.loads((results / "eval/cifar/gmr/eps8-255/seed0/best.json").read_text())
    assert record["test_points"] == ours["test_points"] and record["eps"] == ours["eps"]
    assert audit["run_id"] == record["run_id"] == f"zoo:cifar10:Linf:{WONG}" and audit["zoo"]["name"] == WONG

    robustness = {(r["method"], r["checkpoint"]): r for r in _csv(results / "tables/robustness_cifar10.csv")}
    assert set(robustness) == {("fgsm", "best"), ("gmr", "best"), (WONG, "published")}
    zoo_row = robustness[WONG, "published"]
    assert zoo_row["model"] == "PreActResNet-18" and zoo_row["method_title"] == f"{WONG} (RobustBench)"
    assert float(zoo_row["clean_mean"]) == pytest.approx(record["attacks"]["clean"]["accuracy"])
    assert "RobustBench rows" in (results / "tables/robustness_cifar10.md").read_text()
    comparisons = _csv(results / "tables/comparisons.csv")
    zoo_pairs = [r for r in comparisons if r["method_b"] == WONG]
    assert [(r["method_a"], r["attack"], r["n"]) for r in zoo_pairs] == [("gmr", "pgd", "20")]
    assert float(zoo_pairs[0]["accuracy_b"]) == pytest.approx(record["attacks"]["pgd"]["accuracy"])
    masking = {r["method"]: r for r in _csv(results / "tables/masking.csv")}
    assert set(masking) == {"gmr", WONG} and masking[WONG]["checkpoint"] == "published"
