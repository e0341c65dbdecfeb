"""The Snakemake workflow: config checks, every shipped config builds its DAG, the reduced study end to
end with its report, interruption and resume, and the same study on a one-node Slurm cluster.

Every Snakemake call runs in its own working directory (--directory) under `timeout -s INT` (Snakemake
ignores SIGTERM while jobs run). The Slurm test needs the cluster of .ci/slurm-up.sh; on CI (CI=true)
it fails when the cluster is not up instead of skipping.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
TEST_CONFIG = ROOT / ".test" / "config.yaml"
CONFIGS = sorted((ROOT / "config").glob("*.yaml")) + sorted((ROOT / ".test").glob("*.yaml"))


def snakemake_cmd(workdir: Path, *args: str, timeout: int = 300) -> list[str]:
    return ["timeout", "-s", "INT", str(timeout), sys.executable, "-m", "snakemake",
            "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]


def snakemake(workdir: Path, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(workdir, *args, timeout=timeout), capture_output=True, text=True)
    if check and proc.returncode != 0:
        log = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        logs = "".join(f"\n--- {p}:\n{p.read_text()[-1500:]}" for p in sorted(workdir.rglob("logs/**/*.log")))
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{log}{logs}")
    return proc


def write_config(path: Path, base: Path = TEST_CONFIG, **changes) -> Path:
    cfg = yaml.safe_load(base.read_text())
    for key, value in changes.items():
        cfg[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Configs

@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_builds_its_dag(config, tmp_path):
    proc = snakemake(tmp_path, "--configfile", str(config), "--dry-run", "--quiet", "rules", timeout=300)
    assert "train" in proc.stdout + proc.stderr


def _exp(**changes) -> dict:
    """The experiments of .test/config.yaml with keys of its one experiment changed."""
    exp = yaml.safe_load(TEST_CONFIG.read_text())["experiments"]["mnist"]
    return {"mnist": {**exp, **changes}}


def _fails_before_any_job(workdir: Path, *args: str) -> str:
    """A dry run that must stop while Snakemake parses the workflow (a dry run runs no job, so a non-zero
    exit is the config check); returns its output."""
    proc = snakemake(workdir, *args, "--dry-run", timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert not (workdir / ".test" / "results").exists() and not (workdir / "results").exists()
    return out


@pytest.mark.parametrize("change, message", [
    ({"trian": {"epochs": 1}}, "config: unknown key 'trian'"),             # unknown key
    ({"train": {"epochs": 0}}, "config key train.epochs: 0 is less than the minimum of 1"),  # out of range
    ({"experiments": _exp(eps=[1.5])}, "experiments.mnist.eps[0]: 1.5"),   # eps above 1
    ({"experiments": _exp(methods=["gmrr"])}, "unknown method 'gmrr'"),    # unknown method
    ({"evaluate": {"attacks": ["clean", "pgdd"]}}, "unknown attack 'pgdd'"),  # unknown attack
    ({"diagnose": {"checkpoint": "final"}}, "diagnose.checkpoint: 'final'"),  # not best or last
    # method options, through gmr.methods.make_options as `gmr train --opt` builds them
    ({"method_options": {"gmr": {"lamda_": 5.0}}}, "method_options.gmr: unknown option 'lamda_' of method gmr"),
    ({"experiments": _exp(method_options={"gmr": {"alpha": "big"}})},
     "experiments.mnist.method_options.gmr: option gmr.alpha must be float >= 0, got 'big'"),
    ({"experiments": _exp(method_options={"gmr": {"projected": 1}})}, "option gmr.projected must be bool"),
    ({"method_options": {"gmr": {"alpha": -1}}}, "option gmr.alpha must be float >= 0, got -1"),
    ({"report": {"comparisons": {"gmr": ["pgd"]}}}, "report.comparisons: method pgd is not trained"),
    ({"report": {"comparisons": {"gmr": []}}}, "report.comparisons"),
    ({"experiments": _exp(method_options={"gmr": {"lambda_": -5}})}, "option gmr.lambda_ must be float >= 0"),
    ({"method_options": {"pgd": {"steps": 3}}}, "method_options: method pgd is not trained by any experiment"),
    # attack parameters, as `gmr evaluate --param` checks them
    ({"evaluate": {"attack_params": {"pgd": {"steps": 0}}}}, "parameter pgd.steps must be int >= 1, got 0"),
    ({"evaluate": {"attack_params": {"pgd": {"stepz": 5}}}}, "unknown parameter 'stepz' of attack pgd"),
    ({"evaluate": {"attack_params": {"autoattack": {"version": "plus"}}}},
     "unknown attack with parameters 'autoattack'"),
    ({"evaluate": {"n_test": 20000}}, "evaluate.n_test: 20000 is more than the 10000 test points of mnist"),
    # eps
    ({"experiments": _exp(eps=["8/0"])}, "experiments.mnist.eps[0]: '8/0' divides by zero"),
    ({"experiments": _exp(eps=["abc"])}, "experiments.mnist.eps[0]: 'abc'"),
    ({"experiments": _exp(eps=[-0.1])}, "experiments.mnist.eps[0]: -0.1 is less than the minimum of 0"),
    ({"experiments": _exp(eps=["9/8"])}, "experiments.mnist.eps[0]: '9/8' = 1.125 is outside [0, 1]"),
    ({"experiments": _exp(eps=[0.3, "3/10"])}, "experiments.mnist.eps: 0.3 and '3/10' are the same budget"),
    # seeds and methods that no experiment trains (they used to be dropped silently)
    ({"diagnose": {"seeds": [1]}}, "diagnose.seeds: seed 1 is not trained by any experiment"),
    ({"diagnose": {"methods": ["pgd"]}}, "diagnose.methods: method pgd is not trained by any experiment"),
    ({"evaluate": {"autoattack": {"n_test": 10, "seeds": [2]}}}, "evaluate.autoattack.seeds: seed 2 is not trained"),
    ({"evaluate": {"autoattack": {"n_test": 10, "methods": ["standard"]}}},
     "evaluate.autoattack.methods: method standard is not trained"),
    ({"experiments": _exp(diagnose={"methods": ["pgd"]})},
     "experiments.mnist.diagnose.methods: method pgd is not trained by experiment mnist"),
])
def test_bad_config_fails_before_any_job(tmp_path, change, message):
    config = write_config(tmp_path / "bad.yaml", **change)
    out = _fails_before_any_job(tmp_path, "--configfile", str(config))
    assert any(message in line for line in out.splitlines()), out[-2000:]   # on one line


def test_study_without_experiments_is_refused(tmp_path):
    """A study given with --configfile is the whole study (it is not merged into the default one)."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    del cfg["experiments"]
    config = tmp_path / "no-experiments.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = _fails_before_any_job(tmp_path, "--configfile", str(config))
    assert "a study needs `experiments:`" in out


def test_without_configfile_the_default_study_runs(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    proc = snakemake(tmp_path, "--dry-run", timeout=300)
    assert "results/runs/mnist/pgd/eps0.3/seed1/run.json" in proc.stdout + proc.stderr


# Mutations of .test/config.yaml for the fuzz test: (key path, wrong values) by the kind of the key.
_WRONG = {"int": ["text", [1], {"a": 1}, True, 1.5], "num": ["text", [1], {"a": 1}, True],
          "bool": ["text", [1], {"a": 1}, 1], "list": ["text", {"a": 1}, 3], "enum": [[1], {"a": 1}, 3]}
_TYPED = {("train", "epochs"): "int", ("train", "lr"): "num", ("train", "keep_resume_state"): "bool",
          ("evaluate", "n_test"): "int", ("evaluate", "attacks"): "list", ("evaluate", "autoattack", "n_test"): "int",
          ("diagnose", "quick"): "bool", ("diagnose", "seeds"): "list", ("experiments", "mnist", "seeds"): "list",
          ("experiments", "mnist", "methods"): "list", ("resources", "train", "threads"): "int", ("device",): "enum",
          ("method_options", "gmr", "alpha"): "num", ("evaluate", "attack_params", "pgd", "steps"): "int"}
_MAPPINGS = [(), ("train",), ("evaluate",), ("evaluate", "autoattack"), ("diagnose",), ("experiments", "mnist"),
             ("resources", "train"), ("method_options", "gmr"), ("evaluate", "attack_params", "pgd")]
_REQUIRED = [("experiments",)] + [("experiments", "mnist", k) for k in ("dataset", "model", "eps", "methods", "seeds")]
_BAD_EPS = ["8/0", "abc", "", "-1/2", "9/8", "0.3", [0.3, "3/10"], [0.5, "1/2"], ["8/255", "16/510"]]


def _mutations(kind: str):
    """Strategy for one config mutation of a kind: (key path, value); value None deletes the key."""
    from hypothesis import strategies as st

    def ranged(path, values):
        return st.tuples(st.just(path), values)

    if kind == "delete":
        return st.tuples(st.sampled_from(_REQUIRED), st.none())
    if kind == "type":
        return st.sampled_from(sorted(_TYPED)).flatmap(
            lambda p: st.tuples(st.just(p), st.sampled_from(_WRONG[_TYPED[p]])))
    if kind == "unknown":
        key = st.from_regex(r"zz[a-z_]{1,6}", fullmatch=True)
        return st.tuples(st.tuples(st.sampled_from(_MAPPINGS), key).map(lambda t: t[0] + (t[1],)), st.just(1))
    if kind == "range":
        return st.one_of(
            ranged(("train", "epochs"), st.integers(-10**6, 0)), ranged(("train", "lr"), st.floats(-10, 0)),
            ranged(("train", "momentum"), st.floats(1.001, 100)), ranged(("diagnose", "n_test"), st.integers(-100, 0)),
            ranged(("evaluate", "n_test"), st.one_of(st.integers(-100, -1), st.integers(10_001, 10**7))),
            ranged(("evaluate", "autoattack", "n_test"), st.integers(-100, -2)),
            ranged(("resources", "train", "mem_mb"), st.integers(0, 99)),
            ranged(("evaluate", "attack_params", "pgd", "steps"), st.integers(-100, 0)),
            ranged(("evaluate", "attack_params", "pgd", "step_size"), st.floats(-10, 0)))
    eps = st.one_of(st.sampled_from(_BAD_EPS), st.floats(1.001, 1e6), st.floats(-1e6, -1e-6), st.just(float("nan")))
    return st.tuples(st.just(("experiments", "mnist", "eps")), eps.map(lambda e: e if isinstance(e, list) else [e]))


def _mutate(cfg: dict, path: tuple, value) -> dict:
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("kind", ["delete", "type", "unknown", "range", "eps"])
def test_config_mutations_fail_before_any_job(kind):
    """Fuzz: a deleted required key, a wrong type, an unknown key, a number out of range or a bad eps
    anywhere in the config stops the dry run with one error line naming the key, and creates nothing.
    4 examples of each kind, ~2 s each (no shrinking: a failure prints its example)."""
    import tempfile

    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=4, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(_mutations(kind))
    def check(mutation):
        path, value = mutation
        base = yaml.safe_load(TEST_CONFIG.read_text())
        base["method_options"] = {"gmr": {"lambda_": 5.0}}
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            config = workdir / "c.yaml"
            config.write_text(yaml.safe_dump(_mutate(base, path, value)))
            out = _fails_before_any_job(workdir, "--configfile", str(config))
        lines = [line for line in out.splitlines() if line.startswith("config")]
        assert len(lines) == 1 and (str(path[-1]) in lines[0] or repr(value) in lines[0]), (mutation, out[-2000:])

    check()


def test_default_config_is_the_documented_study():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (name, exp), = cfg["experiments"].items()
    assert exp["dataset"] == "mnist" and exp["model"] == "lenet_plus" and exp["eps"] == [0.3]
    assert {"standard", "fgsm", "rfgsm", "gmr", "pgd"} <= set(exp["methods"])
    assert len(exp["seeds"]) >= 2
    assert cfg["evaluate"]["autoattack"]["n_test"] > 0


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_diagnose_audits_the_configured_checkpoint(tmp_path, checkpoint):
    config = write_config(tmp_path / "c.yaml", diagnose={"checkpoint": checkpoint})
    proc = snakemake(tmp_path, "--configfile", str(config), "--dry-run", "--printshellcmds", timeout=300)
    commands = [line for line in proc.stdout.splitlines() if " diagnose --run " in line]
    assert commands
    for command in commands:
        assert f"--checkpoint {checkpoint} " in command
        assert f"/{checkpoint}-autoattack.json" in command or f"/{checkpoint}.json" in command


def _shell_commands(tmp_path: Path, *args: str, **changes) -> list[str]:
    config = write_config(tmp_path / "c.yaml", **changes)
    proc = snakemake(tmp_path, "--configfile", str(config), "--dry-run", "--printshellcmds", "--forceall",
                     *args, timeout=300)
    return [line.strip() for line in proc.stdout.splitlines() if " --out " in line]


def test_every_torch_job_runs_the_threads_snakemake_gave_it(tmp_path):
    """Rules ask for 4 threads; on --cores 2 Snakemake scales them to 2 and every job passes that."""
    four = {"threads": 4, "mem_mb": 1500, "runtime": 10}
    commands = _shell_commands(tmp_path, "--cores", "2", resources={
        rule: four for rule in ("train", "evaluate", "autoattack", "diagnose", "summary")})
    torch_jobs = [c for c in commands if any(f" {sub} " in c for sub in ("train", "evaluate", "diagnose"))]
    assert {c.split(" --run ")[0].split()[-1] if " --run " in c else "train" for c in torch_jobs} == \
        {"train", "evaluate", "diagnose"}
    for command in torch_jobs:
        assert "--threads 2 " in command, command


def test_audit_and_comparisons_follow_the_config(tmp_path):
    commands = _shell_commands(tmp_path, "--cores", "1", diagnose={"seed": 7, "seeds": [0], "n_test": 40,
                                                                     "n_curve": 20, "quick": True},
                               report={"comparisons": {"gmr": ["fgsm"]}})
    assert all("--seed 7 " in c for c in commands if " diagnose --run " in c)
    tables = [c for c in commands if " tables --runs " in c]
    assert tables and "--comparisons gmr:fgsm" in tables[0]


def test_last_model_evaluation_reuses_the_selected_models_result(tmp_path):
    commands = [c for c in _shell_commands(tmp_path, "--cores", "1") if " evaluate --run " in c]
    last = [c for c in commands if "--checkpoint last" in c]
    best = [c for c in commands if "--checkpoint best" in c]
    assert last and best
    for command in last:
        assert "--reuse-from " in command and "/best.json" in command, command
    assert not any("--reuse-from" in c for c in best)


# --------------------------------------------------------------------------------------------------
# End to end

def _check_outputs(results: Path, methods: list[str]) -> None:
    tables = results / "tables"
    for name in ("robustness_mnist", "reference", "cost", "masking"):
        for ext in ("csv", "md", "tex", "html"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    with open(tables / "robustness_mnist.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["method"], r["checkpoint"]) for r in rows} == {(m, c) for m in methods for c in ("best", "last")}
    for r in rows:
        for attack in ("clean", "fgsm", "pgd"):
            assert 0.0 <= float(r[f"{attack}_mean"]) <= 1.0
    with open(tables / "cost.csv") as fh:
        cost = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(cost) == set(methods)
    assert float(cost["gmr"]["passes_per_sample"]) == pytest.approx(4.0, rel=0.05)
    figures = sorted(p.name for p in (results / "figures").glob("*.png"))
    assert figures, "no figures"
    for run in (results / "runs").glob("*/*/*/*"):
        bench = (results / "benchmarks" / "train" / run.relative_to(results / "runs")).with_suffix(".tsv")
        assert bench.exists(), bench


@pytest.mark.slow
def test_workflow_end_to_end_with_report(tmp_path, mnist_root):
    config = write_config(tmp_path / "config.yaml", data_root=str(mnist_root), results="results")
    snakemake(tmp_path, "--configfile", str(config), "--cores", "2", timeout=1500)
    results = tmp_path / "results"
    _check_outputs(results, ["fgsm", "gmr"])
    last = json.loads((results / "eval/mnist/gmr/eps0.3/seed0/last.json").read_text())
    assert last["checkpoint"] == "last"

    # a second invocation finds nothing to do
    proc = snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "--dry-run", timeout=300)
    assert "Nothing to be done" in proc.stdout + proc.stderr

    report = results / "report.html"
    snakemake(tmp_path, "--configfile", str(config), "--report", str(report), timeout=600)
    text = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    for item in ("robustness_mnist.html", "cost.html", "masking.html", "reference.html",
                 "Gradient masking", "training_curves"):
        assert item in text, item


# --------------------------------------------------------------------------------------------------
# Interrupt and resume

def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_sigint_during_training_then_rerun_resumes(tmp_path, mnist_root):
    """Ctrl-C while a run trains: finished jobs stay finished, the interrupted run resumes from its
    checkpoint (its finished epochs are not trained again), and no --rerun-incomplete is needed."""
    base = yaml.safe_load(TEST_CONFIG.read_text())
    base["data_root"] = str(mnist_root)
    base["results"] = "results"
    base["diagnose"]["enabled"] = False
    base["experiments"] = {
        "quick": {"dataset": "mnist", "model": "lenet_plus", "eps": [0.3], "methods": ["fgsm"], "seeds": [0]},
        "slow": {"dataset": "mnist", "model": "lenet_plus", "eps": [0.3], "methods": ["gmr"], "seeds": [0],
                 "train": {"epochs": 6, "n_train": 1500}},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base))
    results = tmp_path / "results"
    quick = results / "runs/quick/fgsm/eps0.3/seed0/run.json"
    slow_dir = results / "runs/slow/gmr/eps0.3/seed0"
    targets = [str(quick.relative_to(tmp_path)), str((slow_dir / "run.json").relative_to(tmp_path))]

    cmd = snakemake_cmd(tmp_path, "--configfile", str(config), "--cores", "2", *targets, timeout=1200)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    try:
        while not (quick.exists() and (slow_dir / "checkpoint.pt").exists()):
            assert proc.poll() is None, f"snakemake ended early:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "training did not reach epoch 1"
            time.sleep(0.2)
        assert not (slow_dir / "run.json").exists(), "the slow run finished before the interrupt"
        os.killpg(proc.pid, signal.SIGINT)     # Ctrl-C: the whole foreground process group
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not (slow_dir / "run.json").exists()
    import torch

    done = torch.load(slow_dir / "checkpoint.pt", weights_only=True)["epoch"]  # epochs kept by the checkpoint
    assert 1 <= done < 6
    done_rows = _rows(slow_dir / "train_log.csv")[:done]
    quick_mtime = quick.stat().st_mtime_ns
    data_mtime = (results / "data" / "mnist.txt").stat().st_mtime_ns

    rerun = snakemake(tmp_path, "--configfile", str(config), "--cores", "2", *targets, timeout=1200)
    log = rerun.stdout + rerun.stderr
    assert log.count("rule train:") == 1, log[-3000:]
    assert "rule prepare_data" not in log
    assert quick.stat().st_mtime_ns == quick_mtime
    assert (results / "data" / "mnist.txt").stat().st_mtime_ns == data_mtime
    rows = _rows(slow_dir / "train_log.csv")
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 7)]
    # the epochs finished before the interrupt were kept, not trained again (same timings to the digit)
    assert rows[:len(done_rows)] == done_rows
    meta = json.loads((slow_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["selection"]["last_epoch"] == 6


# --------------------------------------------------------------------------------------------------
# Slurm

def _slurm_up() -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture
def slurm_cluster():
    if not _slurm_up():
        message = "no Slurm cluster (start one with `eval $(.ci/slurm-up.sh --install)`)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)


@pytest.mark.slurm
@pytest.mark.slow
def test_workflow_on_slurm(tmp_path, mnist_root, slurm_cluster):
    """The reduced study through `--profile workflow/profiles/slurm` (executor slurm, squeue status)."""
    base = yaml.safe_load((ROOT / ".test" / "config-slurm.yaml").read_text())
    config = write_config(tmp_path / "config.yaml", base=ROOT / ".test" / "config-slurm.yaml",
                          data_root=str(mnist_root), results="results")
    proc = snakemake(tmp_path, "--configfile", str(config), "--profile", str(ROOT / "workflow/profiles/slurm"),
                     "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "10",
                     "--jobs", "4", timeout=1500)
    log = proc.stdout + proc.stderr
    results = tmp_path / "results"
    _check_outputs(results, base["experiments"]["mnist"]["methods"])
    # training, evaluation and the audit ran as Slurm jobs: one submission line each
    submitted = [line for line in log.splitlines() if "SLURM jobid" in line]
    assert len(submitted) >= 3, log[-3000:]
