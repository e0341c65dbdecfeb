# Shared helpers: the run grid of the config, file paths, and the command-line options of each job.
#
# Paths (R = config["results"]):
#   R/data/{dataset}.txt                                    data root is ready (`gmr prepare-data` output)
#   R/runs/{exp}/{method}/eps{eps}/seed{seed}/run.json      training run (folder: checkpoints, train_log.csv)
#   R/eval/{exp}/{method}/eps{eps}/seed{seed}/{ckpt}.json   white-box evaluation (+ .npz per example)
#   R/eval/.../{ckpt}-autoattack.json                       AutoAttack on its own (smaller) subset
#   R/diagnostics/{exp}/{method}/eps{eps}/seed{seed}/audit.json   masking audit (+ CSV, figures)
#   R/tables/*.{csv,md,tex,html}, R/figures/, R/logs/, R/benchmarks/

import copy
import os
import shlex
import sys
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from snakemake.logging import logger

R = config["results"].rstrip("/")

wildcard_constraints:
    exp=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    method=r"[a-z0-9_]+",
    eps=r"[0-9][0-9.]*(-[0-9]+)?",
    seed=r"[0-9]+",
    ckpt=r"best|last",
    dataset=r"[a-z0-9_]+",


def _gmr_command() -> str:
    """The `gmr` CLI of the Python environment that runs Snakemake (works without an activated venv,
    and on Slurm nodes, which re-run this interpreter)."""
    script = Path(sys.executable).parent / "gmr"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m gmr.cli"


GMR = _gmr_command()


def eps_value(eps) -> float:
    """0.3 -> 0.3; "8/255" -> 0.0313725..."""
    if isinstance(eps, str):
        return float(Fraction(eps))
    return float(eps)


def eps_label(eps) -> str:
    """The eps as it appears in paths: 0.3 -> "0.3", "8/255" -> "8-255"."""
    if isinstance(eps, str):
        return eps.replace("/", "-")
    return format(float(eps), "g")


def _merge(base: dict, override: dict) -> dict:
    """Key-by-key override, one level deep for mappings (e.g. evaluate.autoattack)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


class Run(NamedTuple):
    exp: str
    method: str
    eps: str      # label
    seed: int

    @property
    def wildcards(self) -> dict:
        return dict(exp=self.exp, method=self.method, eps=self.eps, seed=self.seed)


def _experiments(config: dict, raw: dict) -> dict:
    """Each experiment with the global train/method_options/evaluate/diagnose sections merged under
    its own overrides (taken from the config as written, before the schema filled in defaults)."""
    out = {}
    for name, exp in config["experiments"].items():
        own = raw["experiments"][name]
        methods = list(exp["methods"])
        options = {m: {**config["method_options"].get(m, {}), **own.get("method_options", {}).get(m, {})}
                   for m in methods}
        labels = {}
        for e in exp["eps"]:
            label = eps_label(e)
            if label in labels:
                raise ValueError(f"experiment {name}: eps {e} is listed twice")
            labels[label] = eps_value(e)
        out[name] = dict(
            dataset=exp["dataset"], model=exp["model"], methods=methods, seeds=list(exp["seeds"]),
            eps=labels,
            train={**config["train"], **own.get("train", {})},
            method_options=options,
            evaluate=_merge(config["evaluate"], own.get("evaluate", {})),
            diagnose=_merge(config["diagnose"], own.get("diagnose", {})),
        )
    return out


def _check_names(experiments: dict) -> None:
    """Unknown datasets, models, methods and attacks fail here, before any job starts."""
    try:
        from gmr.data import list_datasets
        from gmr.evaluate import list_attacks
        from gmr.methods import METHODS
        from gmr.models import MODELS
    except ImportError as err:  # gmr lives in another environment: the jobs' CLI checks the names
        logger.warning(f"gmr is not importable here ({err}); names are checked when the jobs start")
        return
    valid_attacks = list_attacks() + ["autoattack"]
    for name, exp in experiments.items():
        problems = []
        if exp["dataset"] not in list_datasets():
            problems.append(f"dataset {exp['dataset']!r} (valid: {', '.join(list_datasets())})")
        if exp["model"] not in MODELS.names():
            problems.append(f"model {exp['model']!r} (valid: {', '.join(MODELS.names())})")
        for m in exp["methods"]:
            if m not in METHODS.names():
                problems.append(f"method {m!r} (valid: {', '.join(METHODS.names())})")
        for a in exp["evaluate"]["attacks"]:
            if a not in valid_attacks:
                problems.append(f"attack {a!r} (valid: {', '.join(valid_attacks)})")
        if problems:
            raise ValueError(f"config, experiment {name}: unknown " + "; unknown ".join(problems))


EXPERIMENTS = _experiments(config, RAW_CONFIG)
_check_names(EXPERIMENTS)
DATASETS = sorted({exp["dataset"] for exp in EXPERIMENTS.values()})

RUN_DIR = R + "/runs/{exp}/{method}/eps{eps}/seed{seed}"
EVAL_DIR = R + "/eval/{exp}/{method}/eps{eps}/seed{seed}"
DIAG_DIR = R + "/diagnostics/{exp}/{method}/eps{eps}/seed{seed}"
LOG = R + "/logs/{rule}/{exp}/{method}/eps{eps}/seed{seed}"
BENCH = R + "/benchmarks/{rule}/{exp}/{method}/eps{eps}/seed{seed}"


def all_runs() -> list[Run]:
    return [Run(name, method, label, seed)
            for name, exp in EXPERIMENTS.items()
            for method in exp["methods"] for label in exp["eps"] for seed in exp["seeds"]]


def _pick(values, chosen) -> bool:
    return chosen is None or values in chosen


def evaluations(run: Run) -> list[str]:
    """The evaluation files of one run: white-box for each checkpoint, AutoAttack where configured."""
    ev = EXPERIMENTS[run.exp]["evaluate"]
    files = [(EVAL_DIR + "/{ckpt}.json").format(**run.wildcards, ckpt=c) for c in ev["checkpoints"]]
    aa = ev["autoattack"]
    if aa["n_test"] != 0 and _pick(run.seed, aa["seeds"]) and _pick(run.method, aa["methods"]):
        files += [(EVAL_DIR + "/{ckpt}-autoattack.json").format(**run.wildcards, ckpt=c)
                  for c in aa["checkpoints"]]
    return files


def audited(run: Run) -> bool:
    d = EXPERIMENTS[run.exp]["diagnose"]
    return d["enabled"] and _pick(run.seed, d["seeds"]) and _pick(run.method, d["methods"])


def run_json(run: Run) -> str:
    return (RUN_DIR + "/run.json").format(**run.wildcards)


def audit_json(run: Run) -> str:
    return (DIAG_DIR + "/audit.json").format(**run.wildcards)


def all_run_jsons() -> list[str]:
    return [run_json(r) for r in all_runs()]


def all_evaluations() -> list[str]:
    return [f for r in all_runs() for f in evaluations(r)]


def all_audits() -> list[str]:
    return [audit_json(r) for r in all_runs() if audited(r)]


def experiment(wildcards) -> dict:
    return EXPERIMENTS[wildcards.exp]


def resources(rule_name: str) -> dict:
    return config["resources"][rule_name]


def job_resources(rule_name: str) -> dict:
    """Snakemake resources of a rule from config["resources"][rule_name]: mem_mb, runtime (minutes) and
    gpu (Slurm: --mem, -t, --gpus); gpu_model and slurm_extra only when set."""
    res = resources(rule_name)
    out = dict(mem_mb=res["mem_mb"], runtime=res["runtime"], gpu=res["gpu"])
    for key in ("gpu_model", "slurm_extra"):
        if res[key]:
            out[key] = res[key]
    return out


def n_test_arg(n: int) -> str:
    """The config's 0 (white-box) or -1 (AutoAttack) mean the whole test set."""
    return "--n-test all" if n in (0, -1) else f"--n-test {n}"


def _option_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def train_args(wildcards) -> str:
    """The `gmr train` options of one run (its data, model, method, eps, seed and the merged train
    section of its experiment); a change here makes Snakemake train the run again."""
    exp = experiment(wildcards)
    if wildcards.method not in exp["methods"] or wildcards.eps not in exp["eps"]:
        raise ValueError(f"no run {wildcards.method} eps{wildcards.eps} in experiment {wildcards.exp}")
    args = ["--dataset", exp["dataset"], "--model", exp["model"], "--method", wildcards.method,
            "--eps", repr(exp["eps"][wildcards.eps]), "--seed", str(wildcards.seed),
            "--data-root", config["data_root"], "--device", config["device"]]
    for key, value in sorted(exp["train"].items()):
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        else:
            args += [flag, _option_text(value)]
    for key, value in sorted(exp["method_options"][wildcards.method].items()):
        args += ["--opt", f"{key}={_option_text(value)}"]
    return " ".join(shlex.quote(a) for a in args)


def attack_params_args(ev: dict, attacks: list[str]) -> str:
    """Per-attack parameter overrides as `gmr evaluate --param ATTACK.KEY=VALUE` options."""
    args = []
    for attack, params in sorted(ev["attack_params"].items()):
        if attack not in attacks:
            continue
        for key, value in sorted(params.items()):
            args += ["--param", f"{attack}.{key}={_option_text(value)}"]
    return " ".join(shlex.quote(a) for a in args)
