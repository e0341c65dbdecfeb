# Shared helpers: the config checks, the run grid of the config, file paths, and the command-line
# options of each job.
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
import re
import shlex
import sys
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import yaml
from jsonschema.exceptions import ValidationError
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

EPS_LABEL = r"[0-9][0-9.]*(-[0-9]+)?"   # an eps as it appears in paths: "0.3", "8-255"


# --------------------------------------------------------------------------------------------------
# Config checks. Every key is checked here, while Snakemake parses the workflow: a bad value stops it
# before any job starts and before anything is written, with one line naming the key. The jobs' own
# checks (the gmr CLI) would catch most of it too, but only after hours of other jobs.

class ConfigError(ValueError):
    """A bad config value: one line, "config key train.epochs: ..."."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key {key}: {problem}" if key else f"config: {problem}")


def _key_path(parts) -> str:
    """["experiments", "m", "eps", 0] -> "experiments.m.eps[0]"."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problem(err: ValidationError) -> str:
    """jsonschema's message without its dump of the schema: an unknown key lists the valid ones, any
    other error says what the key holds (the first sentence of its description in the schema)."""
    if err.validator == "additionalProperties" and err.validator_value is False:
        valid = list(err.schema.get("properties", {}))
        unknown = [k for k in err.instance if k not in valid]
        return f"unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
    about = " ".join(str(err.schema.get("description", "")).split()).split(". ")[0].rstrip(".")
    return err.message + (f" ({about})" if about else "")


def validate_config(config: dict) -> None:
    """The schema: types, ranges, unknown keys; fills in the defaults."""
    schema = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
    try:
        validate(config, schema)
    except WorkflowError as err:  # Snakemake's message is the error plus a dump of the schema
        cause = err.__context__
        if not isinstance(cause, ValidationError):
            raise
        raise ConfigError(_key_path(cause.absolute_path), _schema_problem(cause)) from None


def _option_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_job_sees(key: str, values: dict) -> dict:
    """Option values as a job gets them: written on its command line (_option_text) and read back by the
    gmr CLI with YAML, so the check sees what the job would ("2/255" stays text, "yes" becomes true)."""
    out = {}
    for name, value in values.items():
        try:
            out[name] = yaml.safe_load(_option_text(value))
        except yaml.YAMLError:
            raise ConfigError(f"{key}.{name}", f"{value!r} cannot be read as a value") from None
    return out


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


def parse_eps(eps, key: str) -> tuple[str, float]:
    """(path label, value) of one eps; the schema has checked its form, but a fraction can still
    divide by zero or exceed 1, and a tiny number has no label that the {eps} wildcard matches."""
    try:
        value = eps_value(eps)
    except ZeroDivisionError:
        raise ConfigError(key, f"{eps!r} divides by zero") from None
    except (TypeError, ValueError):
        raise ConfigError(key, f'{eps!r} is not a number or a fraction like "8/255"') from None
    if not 0 <= value <= 1:
        raise ConfigError(key, f"{eps!r} = {value:g} is outside [0, 1] (Linf budget in pixel units)")
    label = eps_label(eps)
    if not re.fullmatch(EPS_LABEL, label):
        raise ConfigError(key, f"{eps!r} gives no folder name (eps{label}); write it as a fraction")
    return label, value


def _eps_labels(name: str, eps_list: list) -> dict[str, float]:
    """label -> value of an experiment's eps. The same budget written twice (0.3 and "3/10") would
    train the same runs into two folders, so it is refused."""
    labels, written = {}, {}
    for i, eps in enumerate(eps_list):
        label, value = parse_eps(eps, f"experiments.{name}.eps[{i}]")
        if value in written:
            raise ConfigError(f"experiments.{name}.eps", f"{written[value]!r} and {eps!r} are the same "
                                                         "budget; list it once")
        if label in labels:
            raise ConfigError(f"experiments.{name}.eps", f"{eps!r} and another value both make the folder "
                                                         f"eps{label}; write them as fractions")
        labels[label], written[value] = value, eps
    return labels


def _merge(base: dict, override: dict) -> dict:
    """Key-by-key override, one level deep for mappings (e.g. evaluate.autoattack)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _experiments(config: dict, raw: dict) -> dict:
    """Each experiment with the global train/method_options/evaluate/diagnose sections merged under
    its own overrides (taken from the config as written, before the schema filled in defaults)."""
    out = {}
    for name, exp in config["experiments"].items():
        own = raw["experiments"][name]
        methods = list(exp["methods"])
        options = {m: {**config["method_options"].get(m, {}), **own.get("method_options", {}).get(m, {})}
                   for m in methods}
        out[name] = dict(
            dataset=exp["dataset"], model=exp["model"], methods=methods, seeds=list(exp["seeds"]),
            eps=_eps_labels(name, exp["eps"]),
            train={**config["train"], **own.get("train", {})},
            method_options=options,
            evaluate=_merge(config["evaluate"], own.get("evaluate", {})),
            diagnose=_merge(config["diagnose"], own.get("diagnose", {})),
            zoo_models=list(exp.get("zoo_models", [])),
        )
    return out


def _own(raw: dict, name: str, *keys):
    """The value experiment `name` sets itself at keys; None where it inherits the global one."""
    node = raw["experiments"][name]
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _where(raw: dict, name: str, *keys) -> str:
    """The config key a merged value of an experiment comes from: its own, else the global one."""
    path = ".".join(keys)
    return f"experiments.{name}.{path}" if _own(raw, name, *keys) is not None else path


def _known(key: str, kind: str, names, valid) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(key, f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


def _untrained(key: str, kind: str, names, trained, scope: str) -> None:
    """Names a section picks that no run has: they would be dropped silently (a typo would skip an
    audit or an option), so they are refused."""
    missing = [n for n in names if n not in trained]
    if missing:
        kinds, verb = (kind, "is") if len(missing) == 1 else (kind + "s", "are")
        raise ConfigError(key, f"{kinds} {', '.join(map(str, missing))} {verb} not trained by {scope} "
                               f"({kind}s trained: {', '.join(map(str, trained))})")


def _check_selections(experiments: dict, raw: dict) -> None:
    """diagnose and evaluate.autoattack pick among the trained methods and seeds, and method_options
    names trained methods. A global section is checked against all experiments, an experiment's own
    section against its runs."""
    every = {"methods": sorted({m for e in experiments.values() for m in e["methods"]}),
             "seeds": sorted({s for e in experiments.values() for s in e["seeds"]})}
    _untrained("method_options", "method", config["method_options"], every["methods"], "any experiment")
    for name, exp in experiments.items():
        _untrained(f"experiments.{name}.method_options", "method", _own(raw, name, "method_options") or {},
                   exp["methods"], f"experiment {name}")
    for method, baselines in (config.get("report") or {}).get("comparisons", {}).items():
        _untrained("report.comparisons", "method", [method, *baselines], every["methods"], "any experiment")
    for path, section in (("diagnose", config["diagnose"]), ("evaluate.autoattack", config["evaluate"]["autoattack"])):
        _check_picks(path, section, every, "any experiment")
        for name, exp in experiments.items():
            own = _own(raw, name, *path.split(".")) or {}
            _check_picks(f"experiments.{name}.{path}", own, exp, f"experiment {name}")


def _check_picks(key: str, section: dict, trained: dict, scope: str) -> None:
    for field, kind in (("methods", "method"), ("seeds", "seed")):
        if section.get(field) is not None:
            _untrained(f"{key}.{field}", kind, section[field], trained[field], scope)


def _gmr_importable() -> bool:
    try:
        import gmr.data, gmr.evaluate, gmr.methods, gmr.models, gmr.options  # noqa: F401
    except ImportError as err:  # gmr lives in another environment: the jobs' CLI checks the rest
        logger.warning(f"gmr is not importable here ({err}); names and options are checked when the jobs start")
        return False
    return True


def _check_names(experiments: dict, raw: dict) -> None:
    """Datasets, models, methods and attacks against gmr's registries."""
    from gmr.data import list_datasets
    from gmr.evaluate import list_attacks
    from gmr.methods import METHODS
    from gmr.models import MODELS

    for name, exp in experiments.items():
        _known(f"experiments.{name}.dataset", "dataset", [exp["dataset"]], list_datasets())
        _known(f"experiments.{name}.model", "model", [exp["model"]], MODELS.names())
        _known(f"experiments.{name}.methods", "method", exp["methods"], METHODS.names())
        _known(_where(raw, name, "evaluate", "attacks"), "attack", exp["evaluate"]["attacks"], list_attacks())


def _check_method_options(experiments: dict) -> None:
    """Each trained method's options through gmr.methods.make_options, as `gmr train --opt` builds them:
    the global ones alone first (so an error there names the global key), then each experiment's
    merged ones, for the dataset of each experiment (its defaults differ by dataset)."""
    from gmr.methods import make_options

    for name, exp in experiments.items():
        for method in exp["methods"]:
            for key, values in ((f"method_options.{method}", config["method_options"].get(method, {})),
                                (f"experiments.{name}.method_options.{method}", exp["method_options"][method])):
                try:
                    make_options(method, exp["dataset"], _as_job_sees(key, values))
                except ValueError as err:
                    raise ConfigError(key, str(err)) from None


def _check_label_smoothing(experiments: dict, raw: dict) -> None:
    """train.label_smoothing only with methods whose training loss reads it (gmr.train
    check_label_smoothing: one step of a tiny model), so a job does not fail after the others ran."""
    from gmr.train import TrainConfig, check_label_smoothing

    for name, exp in experiments.items():
        smoothing = exp["train"].get("label_smoothing", 0)
        if not smoothing:
            continue
        for method in exp["methods"]:
            cfg = TrainConfig(dataset=exp["dataset"], method=method, label_smoothing=smoothing,
                              eps=float(next(iter(exp["eps"].values()))),
                              method_options=_as_job_sees(f"method_options.{method}", exp["method_options"][method]))
            try:
                check_label_smoothing(cfg)
            except ValueError as err:
                raise ConfigError(_where(raw, name, "train", "label_smoothing"), str(err)) from None


def _check_attack_params(experiments: dict, raw: dict) -> None:
    """Each attack's parameters as `gmr evaluate --param` checks them: EvalConfig._check_attacks calls
    this same convert_values (EvalConfig.validate itself needs a trained run). Parameters of an attack
    that takes none would be dropped silently, so they are refused."""
    from gmr.evaluate import attack_params_type, whitebox_attacks
    from gmr.options import convert_values

    sections = [("evaluate.attack_params", config["evaluate"]["attack_params"])]
    sections += [(f"experiments.{name}.evaluate.attack_params", _own(raw, name, "evaluate", "attack_params") or {})
                 for name in experiments]
    for section, params in sections:
        _known(section, "attack with parameters", list(params), whitebox_attacks())
        for attack, values in params.items():
            key = f"{section}.{attack}"
            try:
                convert_values(attack_params_type(attack), _as_job_sees(key, values), kind="parameter",
                               owner="attack", scope=attack)
            except ValueError as err:
                raise ConfigError(key, str(err)) from None


def _check_sizes(experiments: dict, raw: dict) -> None:
    """Sizes a job would refuse for its dataset: more test points than the test set (gmr evaluate), a
    validation split that leaves no training data (gmr train)."""
    from gmr.data import DataSpec, dataset_info

    for name, exp in experiments.items():
        info, ev = dataset_info(exp["dataset"]), exp["evaluate"]
        for keys, n in ((("evaluate", "n_test"), ev["n_test"]),
                        (("evaluate", "autoattack", "n_test"), ev["autoattack"]["n_test"])):
            if n > info.test_size:
                raise ConfigError(_where(raw, name, *keys), f"{n} is more than the {info.test_size} test "
                                                            f"points of {exp['dataset']} (experiment {name})")
        try:
            DataSpec(exp["dataset"], val_size=exp["train"].get("val_size")).validate()
        except ValueError as err:
            raise ConfigError(_where(raw, name, "train", "val_size"), str(err)) from None


def _check_speed(experiments: dict, raw: dict) -> None:
    """What the schema cannot say about train.precision and gpus: fp16 needs a CUDA device
    (gmr/precision.py), and a gpus section that no job uses would be ignored silently."""
    for name, exp in experiments.items():
        if exp["train"].get("precision") == "fp16" and config["device"] == "cpu":
            raise ConfigError(_where(raw, name, "train", "precision"),
                              "fp16 needs a CUDA device, and device is cpu; use bf16 or auto")
    if raw.get("gpus") and (config["device"] == "cpu" or not any(r["gpu"] for r in config["resources"].values())):
        raise ConfigError("gpus", "set, but no job runs on a GPU (device is cpu, or every resources.<rule>.gpu is 0)")


# --------------------------------------------------------------------------------------------------
# RobustBench models: `zoo_models:` of an experiment (names of the RobustBench model zoo, evaluated and
# audited on the experiment's dataset, budgets and test points beside its runs) and `zoo:` (where their
# checkpoints are). The schema checks their form; the names are checked against robustbench's registry
# (gmr.zoo) here, before any job starts.

def _check_zoo(experiments: dict) -> None:
    """Each experiment's zoo models exist in robustbench's zoo for its dataset (threat model Linf)."""
    for name, exp in experiments.items():
        models = exp["zoo_models"]
        if not models:
            continue
        from gmr.zoo import check_names

        try:
            check_names(models, exp["dataset"])
        except ValueError as err:
            raise ConfigError(f"experiments.{name}.zoo_models", str(err)) from None


def check_config(config: dict, raw: dict) -> dict:
    """Every key of the config; returns the experiments with their merged sections."""
    validate_config(config)
    experiments = _experiments(config, raw)
    gmr_checks = _gmr_importable()
    if gmr_checks:
        _check_zoo(experiments)
        _check_names(experiments, raw)
    _check_selections(experiments, raw)
    _check_speed(experiments, raw)
    if gmr_checks:
        _check_method_options(experiments)
        _check_label_smoothing(experiments, raw)
        _check_attack_params(experiments, raw)
        _check_sizes(experiments, raw)
    return experiments


EXPERIMENTS = check_config(config, RAW_CONFIG)
DATASETS = sorted({exp["dataset"] for exp in EXPERIMENTS.values()})
R = config["results"].rstrip("/")

wildcard_constraints:
    exp=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    method=r"[a-z0-9_]+",
    eps=EPS_LABEL,
    seed=r"[0-9]+",
    ckpt=r"best|last|ema|ema_last",
    dataset=r"[a-z0-9_]+",
    zoo=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",   # a RobustBench model name (zoo_models:)


def _gmr_command() -> str:
    """The `gmr` CLI of the Python environment that runs Snakemake (works without an activated venv,
    and on Slurm nodes, which re-run this interpreter)."""
    script = Path(sys.executable).parent / "gmr"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m gmr.cli"


GMR = _gmr_command()


class Run(NamedTuple):
    exp: str
    method: str
    eps: str      # label
    seed: int

    @property
    def wildcards(self) -> dict:
        return dict(exp=self.exp, method=self.method, eps=self.eps, seed=self.seed)


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


def gpu_slot_prefix(rule_name: str) -> str:
    """The command prefix that gives each job of a GPU rule (resources.<rule>.gpu > 0, device not cpu) its
    own device, or a place on one shared by gpus.jobs_per_gpu jobs (gmr/gpu_slots.py); "" for CPU jobs.
    Run locally with `--resources gpu=<GPUs x jobs_per_gpu>`. On Slurm every job is its own allocation
    and keeps the device Slurm gave it."""
    if config["device"] == "cpu" or not resources(rule_name)["gpu"]:
        return ""
    gpus = config["gpus"]
    args = [sys.executable, "-m", "gmr.gpu_slots", "--jobs-per-gpu", str(gpus["jobs_per_gpu"])]
    if gpus["devices"]:
        args += ["--devices", ",".join(str(d) for d in gpus["devices"])]
    return " ".join(shlex.quote(a) for a in args) + " -- "


def n_test_arg(n: int) -> str:
    """The config's 0 (white-box) or -1 (AutoAttack) mean the whole test set."""
    return "--n-test all" if n in (0, -1) else f"--n-test {n}"


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
