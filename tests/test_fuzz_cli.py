"""Bad input to every command exits 2 with one line on stderr, no traceback and nothing created (issue 15).

Hypothesis draws bad values for each option of `gmr train`, `evaluate`, `diagnose` and `tables`: negative,
zero, NaN, inf, huge, text where a number is expected, empty strings, missing files, folders where files
are expected and files where folders are. The CLI runs in-process (gmr.cli.main) in a scratch folder that
must be unchanged afterwards; the work itself (training, attacking, probing, writing tables) is replaced
by a guard that fails the test, so a bad value that is accepted shows as a failure rather than as work.
The explicit tests below pin each input the issue names, and the warning of a run trained at chance."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmr.cli import main
from gmr.cost import pick_device
from gmr.data import list_datasets
from gmr.methods import list_methods
from gmr.models import list_models
from gmr.runs import RunDir, run_warnings
from gmr.train import SCHEDULES, TrainConfig, train
from test_tables import make_audit, make_eval, make_run

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CPUS = os.cpu_count() or 1
TINY = dict(dataset="mnist", model="tiny_cnn", method="fgsm", eps=0.3, epochs=1, batch_size=32, n_train=64,
            n_val=16, probe_pgd_steps=1, seed=0, device="cpu")
GUARDS = {"train": [("gmr.train", "train")], "evaluate": [("gmr.evaluate", "evaluate_to_file")],
          "diagnose": [("gmr.masking.audit", "_diagnose"), ("gmr.masking.audit", "reaudit")],
          "tables": [("gmr.report.tables", "write_tables")]}


# --------------------------------------------------------------------------------------------------
# Running the CLI

def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                         p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _work_started(*args, **kwargs):
    raise AssertionError("the command started its work on bad input")


def call(argv: list[str], where: Path) -> tuple[int, str]:
    """(exit code, stderr) of `gmr ARGV` run in `where`, with the command's work replaced by a guard."""
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(where), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        for module, name in GUARDS[argv[0]]:
            mp.setattr(importlib.import_module(module), name, _work_started)
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    return code, err.getvalue()


def assert_refused(argv: list[str], where: Path, text: str | None = None) -> str:
    """`gmr ARGV` exits 2 with one line on stderr, no traceback, and `where` is left as it was."""
    before = _snapshot(where)
    code, err = call(argv, where)
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert lines[0].startswith(f"gmr {argv[0]}: error: "), (argv, err)
    assert text is None or text in lines[0], (argv, lines[0])
    assert _snapshot(where) == before, f"{argv} created or changed files"
    return lines[0]


def with_option(base: list[str], option: str, value: str) -> list[str]:
    """`base` with `option` set to `value` (written --option=value, so a value that starts with '-' is
    not read as an option)."""
    return base + [f"{option}={value}"]


# --------------------------------------------------------------------------------------------------
# Bad values

WORD = string.ascii_letters + string.digits + "._-"


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


words = st.text(WORD, min_size=1, max_size=10)
not_a_number = words.filter(lambda t: not _number(t))
non_finite = st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999"])
negative = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr)
fraction_text = st.floats(0.1, 1e6).filter(lambda v: v != int(v)).map(repr)


def ints(at_most: int | None = None, above: int | None = None) -> st.SearchStrategy[str]:
    """Integer text <= `at_most` or > `above`."""
    parts = [] if at_most is None else [st.integers(max_value=at_most).map(str)]
    parts += [] if above is None else [st.integers(min_value=above + 1, max_value=10**30).map(str)]
    return st.one_of(*parts)


def count(above: int | None = None) -> st.SearchStrategy[str]:
    """Bad values of an option that takes a positive count (optionally at most `above`)."""
    return st.one_of(ints(0, above), not_a_number, fraction_text, st.just(""))


def not_in(valid) -> st.SearchStrategy[str]:
    return st.one_of(words.filter(lambda t: t not in valid), st.just(""))


positive_real = st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr), non_finite,
                          not_a_number, st.just(""))
non_negative_real = st.one_of(negative, non_finite, not_a_number, st.just(""))
budget = st.one_of(negative, st.floats(min_value=1.0001, max_value=1e300).map(repr), non_finite, not_a_number,
                   st.just(""))
seed = st.one_of(ints(-1, 2**31 - 1), not_a_number, fraction_text, st.just(""))
threads = st.one_of(ints(0, CPUS), not_a_number, st.just(""))
device = st.one_of(st.sampled_from(["gpu", "GPU", "CPU", "cuda:x", "cuda:-1", "cuda:99", "mps", "meta", "cpu:0",
                                    " cpu", ""]),
                   words.filter(lambda t: t not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d", t)))
folder_path = st.sampled_from(["", "a-file", "a-file/sub"])
run_path = st.one_of(st.sampled_from(["", "a-file", "a-folder", "a-file/sub"]), words.map(lambda w: f"missing-{w}"))


# --------------------------------------------------------------------------------------------------
# The scratch folder and a finished run

@pytest.fixture(scope="module")
def place(tmp_path_factory, mnist_root) -> Path:
    """A scratch folder with a finished tiny run, its evaluation, and bad files of every kind."""
    where = tmp_path_factory.mktemp("fuzz")
    train(TrainConfig(**TINY, data_root=str(mnist_root)), where / "run", progress=False)
    with contextlib.chdir(where), contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--run", "run", "--attacks", "clean", "--n-test", "10", "--device", "cpu",
                     "--quiet", "--out", "eval.json"]) == 0
    (where / "a-file").write_text("not a folder\n")
    (where / "a-folder").mkdir()
    (where / "bad.json").write_text("{not json")
    (where / "list.json").write_text("[1, 2]")
    (where / "bad.yaml").write_text("epochs: [1\n")
    (where / "list.yaml").write_text("- 1\n- 2\n")
    (where / "typo.yaml").write_text("epochz: 3\n")
    record = json.loads((where / "eval.json").read_text())
    (where / "five.json").write_text(json.dumps({**record, "attacks": {
        "clean": {**record["attacks"]["clean"], "accuracy": 5.0}}}))
    (where / "stranger.json").write_text(json.dumps({**record, "run_id": "gmr-mnist-seed9-deadbeef"}))
    (where / "noid.json").write_text(json.dumps({k: v for k, v in record.items() if k != "run_id"}))
    return where


def _train_args(mnist_root) -> list[str]:
    argv = ["train", "--out", "run-out", "--no-progress", "--data-root", str(mnist_root), "--threads", "1"]
    for key, value in TINY.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


TRAIN_BAD = {
    "--epochs": count(), "--batch-size": count(), "--probe-pgd-steps": count(),
    "--lr": positive_real, "--probe-pgd-step-size": positive_real,
    "--momentum": non_negative_real, "--weight-decay": non_negative_real, "--eps": budget,
    "--seed": seed, "--split-seed": seed, "--threads": threads, "--device": device,
    "--n-train": count(above=50_000), "--n-val": count(above=10_000),
    "--val-size": st.one_of(ints(0, 59_999), not_a_number, st.just("")),
    "--dataset": not_in(list_datasets()), "--model": not_in(list_models()), "--method": not_in(list_methods()),
    "--schedule": not_in(SCHEDULES),
    "--opt": st.sampled_from(["novalue", "=3", "bogus=1", "clean_fraction=lots", "clean_fraction=nan",
                              "clean_fraction=-1", "clean_fraction=2", "clean_fraction=", "clean_fraction=[1"]),
    "--config": st.one_of(st.sampled_from(["", "a-folder", "bad.yaml", "list.yaml", "typo.yaml", "a-file/c.yaml"]),
                          words.map(lambda w: f"missing-{w}.yaml")),
    "--data-root": folder_path, "--out": st.sampled_from(["", "a-file", "a-file/sub"]),
}


@pytest.mark.parametrize("option", list(TRAIN_BAD))
@FUZZ
@given(data=st.data())
def test_fuzz_train(place, mnist_root, option, data):
    value = data.draw(TRAIN_BAD[option], label=option)
    assert_refused(with_option(_train_args(mnist_root), option, value), place)


EVAL_BASE = ["evaluate", "--run", "run", "--attacks", "clean,fgsm", "--n-test", "10", "--device", "cpu",
             "--quiet", "--out", "out.json"]
EVAL_BAD = {
    "--run": run_path, "--transfer-from": run_path,
    "--attacks": st.one_of(not_in(["clean", "fgsm", "pgd"]).map(lambda w: f"clean,{w}" if w else w),
                           st.just(",,")),
    "--n-test": st.one_of(count(above=10_000).filter(lambda t: t.strip().lower() != "all")),
    "--checkpoint": not_in(["best", "last"]), "--transfer-checkpoint": not_in(["best", "last"]),
    "--eps": budget, "--eps-list": st.one_of(budget.filter(bool), budget.filter(bool).map(lambda v: f"0.1,{v}")),
    "--attack-param": st.sampled_from(["pgd", "pgd.steps", "pgd.steps=0", "pgd.steps=-1", "pgd.steps=nan",
                                       "pgd.stepz=3", "nope.steps=3", "autoattack.x=1", "pgd.steps=[1", ".steps=3",
                                       "pgd.=3", "rfgsm.alpha=-0.1", "pgd.step_size=inf", "pgd_cw.loss=mse"]),
    "--restarts": count(), "--batch-size": count(), "--seed": seed, "--threads": threads, "--device": device,
    "--transfer-attacks": not_in(["fgsm", "rfgsm", "ifgsm", "pgd", "pgd_cw", "pgd_50_10"]).filter(bool),
    "--aa-version": not_in(["standard", "plus", "custom"]), "--aa-norm": not_in(["Linf", "L2"]),
    "--aa-attacks": words, "--data-root": folder_path,
    "--card": st.sampled_from(["", "a-folder", "a-file/c.json", "out.json", "out.npz", "card.json"]),
    "--reuse-from": st.sampled_from(["", "a-folder", "."]),
    "--out": st.one_of(st.sampled_from(["", "a-folder", "a-folder/", "a-file/x.json", "x.npz", "out.txt", "out"]),
                       words.filter(lambda w: not w.lower().endswith(".json")).map(lambda w: f"r-{w}")),
}


@pytest.mark.parametrize("option", list(EVAL_BAD))
@FUZZ
@given(data=st.data())
def test_fuzz_evaluate(place, option, data):
    value = data.draw(EVAL_BAD[option], label=option)
    assert_refused(with_option(EVAL_BASE, option, value), place)


DIAGNOSE_BASE = ["diagnose", "--run", "run", "--out", "diag", "--device", "cpu", "--quick"]
DIAGNOSE_BAD = {
    "--run": run_path, "--transfer-from": run_path, "--out": st.sampled_from(["", "a-file", "a-file/sub"]),
    "--checkpoint": not_in(["best", "last"]), "--n-test": count(above=10_000), "--n-curve": count(),
    "--batch-size": count(), "--seed": seed, "--threads": threads, "--device": device, "--data-root": folder_path,
    "--eval": st.one_of(st.sampled_from(["", "a-folder", "a-file", "bad.json", "list.json", "stranger.json",
                                         "noid.json", "a-file/e.json"]),
                        words.map(lambda w: f"missing-{w}.json")),
}


@pytest.mark.parametrize("option", list(DIAGNOSE_BAD))
@FUZZ
@given(data=st.data())
def test_fuzz_diagnose(place, option, data):
    value = data.draw(DIAGNOSE_BAD[option], label=option)
    assert_refused(with_option(DIAGNOSE_BASE, option, value), place)


RECORDS = ["", "a-folder", "a-file", "bad.json", "list.json", "five.json", "stranger.json", "noid.json",
           "a-file/x.json"]
TABLES_BAD = {
    "--runs": run_path, "--evals": st.one_of(st.sampled_from(RECORDS), words.map(lambda w: f"missing-{w}.json")),
    "--audits": st.one_of(st.sampled_from(RECORDS), words.map(lambda w: f"missing-{w}")),
    "--out": st.sampled_from(["", "a-file", "a-file/sub"]),
    "--comparisons": st.one_of(words.filter(lambda w: ":" not in w),
                               st.sampled_from(["", ":", "gmr:", ":fgsm", "gmr:,"])),
}


@pytest.mark.parametrize("option", list(TABLES_BAD))
@FUZZ
@given(data=st.data())
def test_fuzz_tables(place, option, data):
    value = data.draw(TABLES_BAD[option], label=option)
    given_ = {"--runs": ["run"], "--evals": ["eval.json"], "--audits": [], "--out": ["tables"]}
    given_[option] = given_.get(option, []) + [value] if option in ("--runs", "--evals", "--audits") else [value]
    argv = ["tables"] + [t for key, values in given_.items() if values for t in (key, *values)]
    assert_refused(argv, place)


# --------------------------------------------------------------------------------------------------
# The inputs the issue names, one by one

@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-0.1"), ("--lr", "0"), ("--momentum", "-0.5"),
    ("--momentum", "nan"), ("--momentum", "inf"), ("--weight-decay", "-1e-4"), ("--weight-decay", "nan"),
    ("--weight-decay", "inf"),
])
def test_train_refuses_non_finite_or_negative_optimizer_values(place, mnist_root, option, value):
    line = assert_refused(with_option(_train_args(mnist_root), option, value), place)
    assert option[2:].replace("-", "_") in line


@pytest.mark.parametrize("extra, text", [
    (["--n-train", "50001"], "n_train 50001 is larger than the 50000 training examples of mnist"),
    (["--n-val", "10001"], "n_val 10001 is larger than the 10000 validation examples of mnist"),
    (["--val-size", "20000", "--n-train", "40001"], "larger than the 40000 training examples"),
    (["--val-size", "100", "--n-val", "101"], "n_val 101 is larger than the 100 validation examples"),
])
def test_train_refuses_sizes_larger_than_the_data_before_making_the_folder(place, mnist_root, extra, text):
    assert_refused(_train_args(mnist_root) + extra, place, text)


def test_device_gpu_names_the_valid_devices(place, mnist_root):
    line = assert_refused(with_option(_train_args(mnist_root), "--device", "gpu"), place)
    assert "unknown device 'gpu'; valid devices: auto, cpu, cuda, cuda:N" in line
    for name in ("gpu", "cuda:x", "mps", "cpu:0", ""):
        with pytest.raises(ValueError, match="valid devices: auto, cpu, cuda, cuda:N"):
            pick_device(name)
    assert pick_device("cpu").type == "cpu"


def test_train_empty_out_writes_nothing_in_the_working_directory(place, mnist_root):
    assert_refused(with_option(_train_args(mnist_root), "--out", ""), place, "--out is empty")


def test_evaluate_n_test_zero_is_refused_and_all_is_the_whole_test_set(place, tmp_path):
    for value in ("0", "-1", ""):
        assert_refused(with_option(EVAL_BASE, "--n-test", value), place,
                       f"--n-test must be a positive integer or all, got {value!r}")
    out = tmp_path / "all.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--run", str(place / "run"), "--attacks", "clean", "--n-test", "all",
                     "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_examples"] == 10_000


def test_evaluate_refuses_an_out_that_would_be_its_own_npz(place):
    assert_refused(with_option(EVAL_BASE, "--out", "x.npz"), place, "--out must be a .json file")
    assert_refused(with_option(EVAL_BASE, "--n-test", "10001"), place,
                   "n_test 10001 is larger than the 10000 test points of mnist")


@pytest.mark.parametrize("extra, text", [
    (["--n-test", "0"], "n_test must be positive"), (["--n-test=-3"], "n_test must be positive"),
    (["--n-test", "10001"], "n_test 10001 is larger than the 10000 test points of mnist"),
    (["--out", "a-file"], "exists and is not a folder"), (["--out", ""], "--out is empty"),
    (["--checkpoint", "middle"], "checkpoint must be best or last"),
    (["--run", "a-folder"], "not a finished run directory"), (["--run", ""], "--run is empty"),
    (["--eval", "a-folder"], "is not a file"), (["--eval", "stranger.json"], "not --run"),
    (["--seed=-1"], "seed must be int >= 0"), (["--device", "gpu"], "valid devices"),
    (["--audit-only", "--out", "nowhere"], "--out nowhere is not a folder"),
])
def test_diagnose_bad_input_creates_nothing(place, extra, text):
    argv = DIAGNOSE_BASE + extra
    assert_refused(argv, place, text)


def test_diagnose_damaged_training_log_stops_before_the_output_folder_is_made(place, tmp_path):
    run = Path(shutil.copytree(place / "run", tmp_path / "run"))
    log = run / "train_log.csv"
    log.write_text(log.read_text().splitlines()[0] + "\n")  # the header only
    assert_refused(["diagnose", "--run", "run", "--out", "diag", "--device", "cpu", "--quick"], tmp_path,
                   "train_log.csv has no rows")


def test_tables_refuse_an_accuracy_outside_0_1(place):
    line = assert_refused(["tables", "--runs", "run", "--evals", "five.json", "--out", "t"], place)
    assert "five.json does not follow gmr/schemas/eval.schema.json at attacks/clean/accuracy" in line
    assert "5.0 is greater than the maximum of 1" in line


def test_tables_refuse_evaluations_of_runs_not_given(place):
    assert_refused(["tables", "--runs", "run", "--evals", "eval.json", "stranger.json", "--out", "t"], place,
                   "measured run gmr-mnist-seed9-deadbeef, which is none of the runs given")


def test_tables_count_a_run_or_audit_given_twice_once(tmp_path):
    from gmr.report import tables

    run = make_run(tmp_path, "gmr", 0)
    ev = make_eval(run, "best", {"clean": 0.9, "pgd": 0.4})
    audit = make_audit(run, "no")
    results = tables.load_results([run, run / "run.json", run], [ev, ev], [audit, audit.parent])
    assert len(results.runs) == 1 and len(results.audits) == 1
    assert tables.robustness(results, "mnist").loc[0, "n_seeds"] == 1
    assert tables.masking(results.audits, results.runs).loc[0, "n_audits"] == 1
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["tables", "--runs", str(run), str(run), "--evals", str(ev), "--audits", str(audit),
                     str(audit), "--out", str(tmp_path / "t")]) == 0
    other = make_audit(run, "yes", out=tmp_path / "other-audit")
    with pytest.raises(tables.TableInputError, match="both audit run .* give one audit per run and checkpoint"):
        tables.load_audits([audit, other])


# --------------------------------------------------------------------------------------------------
# A run trained at chance

def test_run_warnings_at_chance_only():
    def record(acc, dataset="mnist"):
        return {"config": {"dataset": dataset}, "metrics": {"last": {"epoch": 3, "train_acc": acc, "train_loss": 2.3}}}

    assert run_warnings(record(0.16)) == [] and run_warnings(record(0.9)) == []
    assert run_warnings(record(0.15))[0].startswith("training accuracy at chance: 0.150 in the last epoch (3")
    assert run_warnings(record(0.02, "cifar100")) == [] and len(run_warnings(record(0.01, "cifar100"))) == 1
    assert run_warnings({"config": {"dataset": "mnist"}, "metrics": {"last": {"epoch": 1}}}) == []


def test_run_at_chance_is_warned_in_run_json_on_stderr_and_in_the_tables(tmp_path, mnist_root, monkeypatch, capsys):
    gtrain = importlib.import_module("gmr.train")
    real = gtrain.train_epoch

    def at_chance(state, job):  # a run whose loss blew up to large finite values (issue 15: 48,882)
        row, seconds = real(state, job)
        return {**row, "train_acc": 0.1, "train_loss": 48882.0}, seconds

    monkeypatch.setattr(gtrain, "train_epoch", at_chance)
    run = tmp_path / "run"
    argv = _train_args(mnist_root)
    argv[argv.index("--out") + 1] = str(run)
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gmr train: warning: {run}: training accuracy at chance: 0.100")
    assert "48,882" in err[0] or "4.888e+04" in err[0]
    record = RunDir(run).record()
    assert record["warnings"] == run_warnings(record) and len(record["warnings"]) == 1
    assert main(["evaluate", "--run", str(run), "--attacks", "clean", "--n-test", "10", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "eval.json")]) == 0
    assert main(["tables", "--runs", str(run), "--evals", str(tmp_path / "eval.json"),
                 "--out", str(tmp_path / "tables")]) == 0
    notes = (tmp_path / "tables" / "robustness_mnist.md").read_text()
    assert f"({record['run_id']}): training accuracy at chance" in notes
