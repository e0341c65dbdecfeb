"""`gmr evaluate` and `gmr card`: the full record against its JSON Schema (with the run ids), per-example
files and the exact worst case, eps sweeps, transfer attacks, parameter overrides, model cards, reference
numbers, attack outputs inside the eps-ball, --reuse-from, and bad input (exit 2, one line, no files)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import scipy.stats
import torch

from gmr import attacks
from gmr.report.cards import load_reference, load_schema, make_card, reference_rows, validate
from gmr.cli import main
from gmr.data import DataSpec, Split, load_split
from gmr.evaluate import attack_param_names, interval_fields, list_attacks, resolve_params, whitebox_attacks
from gmr.runs import RunDir

TARGET = dict(method="standard", lr=0.05, schedule="onecycle", n_train=2000)  # learns in one epoch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(make_run):
    return make_run(**TARGET)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_schemas_are_valid_json_schemas():
    for name in ("eval", "card"):
        jsonschema.Draft202012Validator.check_schema(load_schema(name))


@pytest.mark.parametrize("name", whitebox_attacks())
def test_attack_outputs_stay_in_the_eps_ball_and_in_0_1(target, name):
    model, meta, _ = RunDir(target).load_model("best", torch.device("cpu"))
    x, y = load_split(DataSpec("mnist", Path(meta["config"]["data_root"]), n_test=16), Split.TEST)
    defaults = attacks.attack_defaults(name, "mnist")
    short = {k: v for k, v in (("steps", 3), ("restarts", 2)) if k in defaults}
    params = resolve_params(name, "mnist", {name: short})
    gen = torch.Generator().manual_seed(0)
    for eps in (0.0, 0.1, 0.3):
        p = resolve_params(name, "mnist", {name: params}, eps=eps)
        x_adv = attacks.run_attack(name, model, x, y, eps, generator=gen, **p)
        assert x_adv.shape == x.shape
        assert float((x_adv - x).abs().max()) <= eps + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_full_evaluation_record(make_run, target, tmp_path, capsys):
    source = make_run("fgsm")
    out = tmp_path / "eval" / "standard.json"
    card = tmp_path / "cards" / "standard.json"
    argv = ["evaluate", "--run", str(target), "--n-test", "16", "--device", "cpu", "--batch-size", "16",
            "--attacks", "clean,fgsm,rfgsm,ifgsm,pgd,pgd_cw,pgd_50_10,autoattack",
            "--attack-param", "ifgsm.steps=3", "--attack-param", "pgd.steps=3", "--param", "pgd_cw.steps=3",
            "--attack-param", "pgd_50_10.steps=2", "--attack-param", "pgd.step_size=0.05", "--restarts", "2",
            "--aa-version", "custom", "--aa-attacks", "apgd-ce", "--eps-list", "0,0.3",
            "--transfer-from", str(source), "--seed", "3", "--card", str(card), "--out", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    validate(record, "eval")  # raises on any mismatch with gmr/schemas/eval.schema.json
    assert sorted(_files(out.parent)) == ["standard.json", "standard.npz"]  # no AutoAttack state left

    # the stable keys and the provenance of every number
    for key in ("method", "dataset", "model", "checkpoint", "train_seed", "n_examples", "eps", "run"):
        assert key in record
    assert (record["method"], record["dataset"], record["checkpoint"], record["n_examples"]) == ("standard", "mnist", "best", 16)
    assert record["run_id"] == RunDir(target).record()["run_id"] and "reused_from" not in record
    assert record["eps"] == 0.3 and record["seed"] == 3
    assert set(record["versions"]) >= {"torch", "pyautoattack", "gmr"} and record["versions"]["pyautoattack"] == "0.2.0"
    attacks_ = record["attacks"]
    assert list(attacks_) == ["clean", "fgsm", "rfgsm", "ifgsm", "pgd", "pgd_cw", "pgd_50_10", "autoattack"]
    for name, entry in attacks_.items():
        assert entry["n_examples"] == 16 and entry["seed"] == 3 and entry["seconds"] >= 0
        assert 0 <= entry["accuracy"] <= 1
    _check_intervals(record)
    assert attacks_["pgd"]["params"] == {"steps": 3, "step_size": 0.05, "restarts": 2, "loss": "ce"}
    assert attacks_["pgd_cw"]["params"]["restarts"] == 2 and attacks_["pgd_cw"]["params"]["loss"] == "cw"
    assert attacks_["pgd_50_10"]["params"]["restarts"] == 10  # --restarts leaves the legacy attack alone
    assert attacks_["ifgsm"]["params"]["steps"] == 3
    aa = attacks_["autoattack"]
    assert aa["version"] == "custom" and aa["attacks_run"] == ["apgd-ce"] and set(aa["per_attack"]) == {"apgd-ce"}
    assert aa["accuracy"] <= attacks_["clean"]["accuracy"] and isinstance(aa["flags"], list)

    # per-example file: the worst case is exact
    npz = np.load(out.with_suffix(".npz"))
    for name, entry in attacks_.items():
        assert npz[entry["per_example"]].shape == (16,)
        assert entry["accuracy"] == pytest.approx(npz[entry["per_example"]].mean())
    over = record["worst_case"]["over"]
    assert over == ["clean", "fgsm", "rfgsm", "ifgsm", "pgd", "pgd_cw", "pgd_50_10", "autoattack",
                    "transfer_fgsm", "transfer_rfgsm", "transfer_pgd"]
    worst = np.logical_and.reduce([npz[k] for k in over])
    assert record["worst_case"]["accuracy"] == pytest.approx(worst.mean())
    assert record["worst_case"]["n_correct"] == int(worst.sum())
    assert record["worst_case"]["accuracy"] <= min(e["accuracy"] for e in attacks_.values())
    wb = np.logical_and.reduce([npz[k] for k in record["worst_case"]["whitebox_over"]])
    assert "autoattack" not in record["worst_case"]["whitebox_over"]
    assert record["worst_case"]["whitebox_accuracy"] == pytest.approx(wb.mean())

    # eps sweep: every attack at every eps; eps 0 changes nothing; the main eps is reused
    sweep = record["eps_sweep"]
    assert [(s["eps"], s["attack"]) for s in sweep] == [
        (e, a) for e in (0.0, 0.3) for a in ("fgsm", "rfgsm", "ifgsm", "pgd", "pgd_cw", "pgd_50_10", "autoattack")]
    for s in sweep:
        assert s["n_examples"] == 16 and s["accuracy"] == pytest.approx(npz[s["per_example"]].mean())
        if s["eps"] == 0.0:
            assert np.array_equal(npz[s["per_example"]], npz["clean"]), s["attack"]
        else:
            assert s["accuracy"] == attacks_[s["attack"]]["accuracy"]
    rfgsm0 = next(s for s in sweep if s["eps"] == 0.0 and s["attack"] == "rfgsm")
    assert rfgsm0["params"]["alpha"] == 0.0  # alpha never exceeds eps

    # transfer: crafted on the source model
    assert set(record["transfer"]) == {"fgsm", "rfgsm", "pgd"}
    for name, entry in record["transfer"].items():
        assert entry["source_run"] == str(source) and entry["source_method"] == "fgsm"
        assert entry["source_run_id"] == RunDir(source).record()["run_id"]
        assert entry["accuracy"] == pytest.approx(npz[f"transfer_{name}"].mean())

    # model card
    card_json = json.loads(card.read_text())
    validate(card_json, "card")
    assert record["card_file"] == str(card)
    assert card_json["clean_acc"] == f"{100 * attacks_['clean']['accuracy']:.2f}"
    assert card_json["autoattack_acc"] == f"{100 * aa['accuracy']:.2f}"
    assert card_json["eps"] == "0.3" and card_json["threat_model"] == "Linf" and card_json["dataset"] == "mnist"
    assert card_json["training_cost"]["passes_per_sample"] > 0 and card_json["training_cost"]["epochs"] == 1
    assert "standard training" in card_json["footnote"] and "first 16 test points" in card_json["footnote"]

    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in printed and "worst case" in printed


def _check_intervals(record: dict) -> None:
    """Every accuracy of the record carries its 95% Wilson interval (recomputed here with scipy from the
    entry's count); the record says so; the schema requires the bounds."""
    assert record["confidence"] == 0.95 and record["interval_method"] == "wilson"
    entries = [*record["attacks"].values(), *record["transfer"].values(), *record["eps_sweep"],
               record["worst_case"]]
    for e in entries:
        ci = scipy.stats.binomtest(e["n_correct"], e["n_examples"]).proportion_ci(method="wilson")
        assert (e["ci_low"], e["ci_high"]) == pytest.approx((ci.low, ci.high)), e.get("attack")
        assert e["ci_low"] <= e["accuracy"] <= e["ci_high"]
    wc = record["worst_case"]
    assert wc["whitebox_ci_low"] <= wc["whitebox_accuracy"] <= wc["whitebox_ci_high"]
    for where in (record["attacks"]["pgd"], record["attacks"]["autoattack"], record["worst_case"]):
        stripped = json.loads(json.dumps(record))
        target = (stripped["worst_case"] if where is record["worst_case"]
                  else stripped["attacks"][where["attack"]])
        del target["ci_high"]
        with pytest.raises(jsonschema.ValidationError, match="ci_high"):
            validate(stripped, "eval")


def test_interval_fields_known_answer():
    """38 of 100: Wilson [0.2910, 0.4779] (DESIGN.md section 9: 38% on 100 points is about [29%, 48%])."""
    assert interval_fields(38, 100) == pytest.approx({"ci_low": 0.290976, "ci_high": 0.477902}, abs=1e-6)
    assert interval_fields(2, 10, "whitebox_") == pytest.approx({"whitebox_ci_low": 0.056682,
                                                                 "whitebox_ci_high": 0.509838}, abs=1e-6)


def test_transfer_from_the_same_run_equals_white_box(target, tmp_path):
    out = tmp_path / "self.json"
    assert main(["evaluate", "--run", str(target), "--n-test", "32", "--device", "cpu", "--attacks", "clean,fgsm",
                 "--transfer-from", str(target), "--transfer-attacks", "fgsm", "--quiet", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    validate(record, "eval")
    npz = np.load(out.with_suffix(".npz"))
    assert np.array_equal(npz["transfer_fgsm"], npz["fgsm"])  # FGSM is deterministic
    assert record["transfer"]["fgsm"]["source_accuracy"] == record["attacks"]["fgsm"]["accuracy"]
    assert record["eps_sweep"] == [] and record["worst_case"]["over"] == ["clean", "fgsm", "transfer_fgsm"]


def test_card_subcommand(target, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["evaluate", "--run", str(target), "--n-test", "8", "--device", "cpu", "--quiet",
                 "--attacks", "clean,fgsm,autoattack", "--aa-version", "custom", "--aa-attacks", "apgd-ce",
                 "--out", str(out)]) == 0
    assert main(["card", "--eval", str(out), "--name", "my model", "--out", str(tmp_path / "card.json")]) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    validate(card, "card")
    assert card["name"] == "my model" and card["reported"] is not None
    assert card == {**make_card(json.loads(out.read_text()), json.loads((target / "run.json").read_text()),
                                "my model")}
    # an evaluation without AutoAttack cannot make a card
    no_aa = tmp_path / "no_aa.json"
    record = json.loads(out.read_text())
    del record["attacks"]["autoattack"]
    no_aa.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["card", "--eval", str(no_aa), "--out", str(tmp_path / "c2.json")]) == 2
    assert "needs an AutoAttack result" in capsys.readouterr().err
    assert not (tmp_path / "c2.json").exists()


def test_reference_numbers():
    rows = reference_rows(dataset="cifar10")
    gmr = next(r for r in rows if r["method"] == "gmr")
    assert (gmr["clean"], gmr["pgd20"], gmr["autoattack"]) == (82.29, 46.23, 43.72)
    assert abs(gmr["eps"] - 8 / 255) < 1e-12 and gmr["model"] == "ResNet-18"
    wong = next(r for r in rows if r["source"] == "robustbench:Wong2020Fast")
    assert (wong["clean"], wong["autoattack"]) == (83.34, 43.21)
    mnist = {r["method"]: r for r in reference_rows(dataset="mnist")}
    # AutoAttack README: clean, the authors' own number (not PGD of ours) and AutoAttack
    assert (mnist["fgsm_rs"]["clean"], mnist["fgsm_rs"]["reported"], mnist["fgsm_rs"]["autoattack"]) == (98.50, 88.77, 82.93)
    assert mnist["fgsm_rs"]["pgd"] is None
    assert (mnist["pgd"]["clean"], mnist["pgd"]["reported"], mnist["pgd"]["autoattack"]) == (98.53, 89.62, 88.50)
    assert mnist["pgd"]["our_title"] == "PGD-40 AT" and mnist["pgd"]["model"] == "not stated"
    pgd10 = next(r for r in rows if r.get("our_title") == "PGD-10 AT")
    assert pgd10["source"] == "sriramanan2021" and "AA (v1)" in pgd10["note"]
    fast = [r for r in rows if r["source"] == "fastat-benchmark"]
    assert len(fast) == 14 and all(r["recipe"] == "fastat-benchmark" for r in fast)
    n_fgsm = next(r for r in fast if r["method"] == "n_fgsm")
    assert (n_fgsm["clean"], n_fgsm["pgd50"], n_fgsm["autoattack"]) == (78.59, 53.07, 47.77)
    ref = load_reference()
    assert "label smoothing 0.4" in ref["recipes"]["fastat-benchmark"]
    assert ref["unit"] == "percent" and all(r["source"] in ref["sources"] for r in ref["entries"])
    keys = {"source", "dataset", "eps", "model", "method", "method_name", "clean", "fgsm", "pgd7", "pgd20",
            "pgd500", "autoattack"}
    assert all(keys <= set(r) for r in ref["entries"])


def _corrupt_run(run: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "corrupt-run"
    shutil.copytree(run, bad)
    (bad / "model_best.pt").write_bytes(os.urandom(4096))
    return bad


@pytest.mark.parametrize("case, extra, text", [
    ("unknown attack", ["--attacks", "clean,pgd,deepfool"], "unknown attack 'deepfool'; valid attacks: "
     + ", ".join(list_attacks())),
    ("eps too large", ["--eps", "1.5"], "eps must be in [0, 1]"),
    ("eps negative", ["--eps", "-0.1"], "eps must be in [0, 1]"),
    ("eps list out of range", ["--eps-list", "0.1,2"], "every --eps-list value must be in [0, 1]"),
    ("eps list not numbers", ["--eps-list", "0.1,big"], "--eps-list must be comma-separated numbers"),
    ("missing run", ["--run", "{tmp}/nowhere"], "no such run directory"),
    ("corrupt checkpoint", ["--run", "{corrupt}"], "cannot load checkpoint"),
    ("unknown parameter", ["--attack-param", "pgd.stepz=3"], "unknown parameter 'stepz' of attack pgd; valid: "),
    ("bad parameter value", ["--attack-param", "pgd.steps=0"], "parameter pgd.steps must be int >= 1, got 0"),
    ("bool for a count", ["--attack-param", "pgd.restarts=true"], "parameter pgd.restarts must be int >= 1, got True"),
    ("bad loss", ["--attack-param", "pgd_cw.loss=mse"], "parameter pgd_cw.loss must be one of ce, cw"),
    ("negative alpha", ["--attack-param", "rfgsm.alpha=-0.1"], "parameter rfgsm.alpha must be float >= 0"),
    ("zero step", ["--attack-param", "pgd.step_size=0"], "parameter pgd.step_size must be float > 0"),
    ("zero threads", ["--threads", "0"], "threads must be int >= 1"),
    ("bad parameter syntax", ["--attack-param", "pgd=3"], "--attack-param needs ATTACK.KEY=VALUE"),
    ("unknown transfer source", ["--transfer-from", "{tmp}/nowhere"], "--transfer-from"),
    ("aa version", ["--attacks", "autoattack", "--aa-version", "rand"], "unknown AutoAttack version"),
    ("aa custom without attacks", ["--attacks", "autoattack", "--aa-version", "custom"], "needs attacks"),
    ("L2 with white-box", ["--attacks", "clean,pgd,autoattack", "--aa-norm", "L2", "--eps", "1.5"],
     "L2 AutoAttack cannot share"),
    ("card without autoattack", ["--card", "{tmp}/out/card.json"], "--card needs autoattack"),
    ("n-test", ["--n-test", "many"], "--n-test must be a positive integer or all"),
])
def test_bad_input_exits_2_with_one_line_and_no_files(target, tmp_path, capsys, case, extra, text):
    fill = {"tmp": str(tmp_path), "corrupt": str(_corrupt_run(target, tmp_path)) if case == "corrupt checkpoint" else ""}
    extra = [e.format(**fill) for e in extra]
    argv = ["evaluate", "--run", str(target), "--attacks", "clean,fgsm", "--n-test", "8", "--device", "cpu",
            "--out", str(tmp_path / "out" / "result.json")]
    for i in range(0, len(extra), 2):  # later options replace the defaults above
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    capsys.readouterr()
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmr evaluate: error: "), err
    assert text in lines[0], lines[0]
    assert _files(tmp_path / "out") == []


def test_attack_parameters_come_from_the_attack_signatures():
    assert attack_param_names("pgd") == ["steps", "step_size", "restarts", "loss", "random_start", "kappa"]
    assert attack_param_names("rfgsm") == ["alpha"] and attack_param_names("fgsm") == []
    assert attack_param_names("ifgsm") == ["steps", "step_size"]


# --------------------------------------------------------------------------------------------------
# --reuse-from: the last model's evaluation copies the best model's when they are the same weights

ARGS = ["--n-test", "12", "--device", "cpu", "--attacks", "clean,fgsm,pgd", "--attack-param", "pgd.steps=2",
        "--quiet"]


@pytest.fixture(scope="module")
def best_eval(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "best.json"
    assert main(["evaluate", "--run", str(target), "--checkpoint", "best", *ARGS, "--out", str(out)]) == 0
    return out


def _no_model_loading(monkeypatch):
    monkeypatch.setattr(RunDir, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_reuse_when_best_is_last(target, best_eval, tmp_path, monkeypatch, capsys):
    assert RunDir(target).same_weights()  # one epoch: best epoch == last epoch
    out = tmp_path / "last.json"
    _no_model_loading(monkeypatch)
    assert main(["evaluate", "--run", str(target), "--checkpoint", "last", *ARGS,
                 "--reuse-from", str(best_eval), "--out", str(out)]) == 0
    record, best = json.loads(out.read_text()), json.loads(best_eval.read_text())
    validate(record, "eval")
    assert record["checkpoint"] == "last" and record["reused_from"] == "best.json"
    assert record["per_example_file"] == "last.npz" and record["run_id"] == best["run_id"]
    assert {k: v for k, v in record.items() if k not in ("checkpoint", "reused_from", "per_example_file")} == \
           {k: v for k, v in best.items() if k not in ("checkpoint", "per_example_file")}
    a, b = np.load(best_eval.with_suffix(".npz")), np.load(out.with_suffix(".npz"))
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert "reused best.json" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["other settings", "best is not last", "no file yet", "same checkpoint"])
def test_reuse_falls_back_to_evaluating(target, best_eval, tmp_path, monkeypatch, case):
    args, checkpoint, source = list(ARGS), "last", best_eval
    if case == "other settings":
        args[args.index("pgd.steps=2")] = "pgd.steps=3"
    elif case == "best is not last":
        monkeypatch.setattr(RunDir, "same_weights", lambda self, record=None: False)
    elif case == "no file yet":
        source = tmp_path / "not-there.json"
    else:
        checkpoint = "best"
    out = tmp_path / "out.json"
    assert main(["evaluate", "--run", str(target), "--checkpoint", checkpoint, *args,
                 "--reuse-from", str(source), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    validate(record, "eval")
    assert "reused_from" not in record and record["checkpoint"] == checkpoint
    if case == "other settings":
        assert record["attacks"]["pgd"]["params"]["steps"] == 3
    else:  # the same weights, seeds and points: evaluating gives the numbers the copy would have
        best = json.loads(best_eval.read_text())
        assert {k: v["accuracy"] for k, v in record["attacks"].items()} == \
               {k: v["accuracy"] for k, v in best["attacks"].items()}
