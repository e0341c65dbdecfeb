"""The gradient-masking audit of one run: its configuration, probes -> summary -> checks -> verdict, and
the files of a `gmr diagnose` folder.

`write_audit(DiagnoseConfig, out)` is what `gmr diagnose` calls: it checks every input before any work,
loads the run's model once, runs every registered probe on the first `n_test` test points (the sanity
curves on the first `n_curve`), and writes the probe CSVs, the figures and then `audit.json` (schema
`gmr/schemas/audit.schema.json`) exactly once, with its `files` list. `diagnose` returns the same audit
in memory; `reaudit` rebuilds it from a folder's CSV files without the model (for an evaluation that
became available later, or after a change of the rules). The rules and the verdict are in
`gmr/masking/rules.py`, the probes in `gmr/masking/probes.py`.

Every audit names the `run_id` of the run it measured (and `transfer_run_id` of the source run of the
transfer check); an evaluation record is used only when its `run_id` is that of the audited run. Its
per-example arrays (the .npz beside it) give the checks on the evaluation their paired intervals; the
checks' confidence level is `settings.confidence` of the audit, kept by `reaudit`.

A RobustBench model (`zoo`, with `dataset`, `threat_model`, `model_dir`) is audited in place of a run:
`gmr.zoo.ZooModel` answers what a run directory answers (no training log, so no catastrophic-overfitting
check), and the audit carries its `zoo` object.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cost import check_threads, device_facts, pick_device
from ..io import check_folder_path, ensure_writable_dir, read_csv, read_json, write_csv, write_json
from ..options import Seed, check
from ..runs import CHECKPOINTS, RunDir, catastrophic_overfitting_epoch
from .probes import PROBES, ProbeSettings, Table, run_probes, summarise
from .rules import aa_accuracy, autoattack_summary, build_checks, verdict

__all__ = ["AUDIT_SCHEMA", "DiagnoseConfig", "Diagnosis", "ProbeSettings", "diagnose", "reaudit",
           "write_audit", "write_diagnosis", "read_tables", "read_eval_record", "read_eval_correct",
           "validate_audit"]

AUDIT_SCHEMA = "gmr.audit/1"
DERIVED_TABLES = ("training_curves", "autoattack", "checks")  # from the run's log, --eval and the rules


@dataclass
class DiagnoseConfig:
    run: str | None = None             # a run directory, or None with `zoo`
    checkpoint: str = "best"
    n_test: int = 500
    eval_json: str | None = None       # an evaluation result of this run (AutoAttack flags, PGD)
    transfer_from: str | None = None   # a source run for the transfer check
    seed: Seed = 0
    device: str = "auto"
    data_root: str | None = None       # None: the run's own data root
    threads: int | None = None         # CPU threads for torch; None: torch's default
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    zoo: str | None = None             # a RobustBench model instead of a run (gmr.zoo)
    dataset: str | None = None         # with zoo: its dataset
    threat_model: str = "Linf"         # with zoo: the zoo's threat model
    model_dir: str | None = None       # with zoo: robustbench's checkpoint folder (None: ./models)
    eps: float | None = None           # with zoo: the budget audited (None: the zoo's); a run: its own

    def validate(self) -> "Inputs":
        """Check every input before any work (no model is loaded); ValueError with one line."""
        self._check_subject()
        if self.n_test <= 0:
            raise ValueError(f"n_test must be positive, got {self.n_test}")
        self.settings.validate()
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive, got {self.threads}")
        check(self)  # types, and the seed's bounds
        self._check_paths()
        run, record = self._subject()
        self._check_points(record)
        run.train_log(record)  # a damaged training log stops here, before --out is made (RunError)
        transfer, transfer_record = (_finished_run(self.transfer_from, "best", "--transfer-from")
                                     if self.transfer_from is not None else (None, None))
        eval_record = (read_eval_record(self.eval_json, record, self.checkpoint, run)
                       if self.eval_json is not None else None)
        eval_correct = read_eval_correct(self.eval_json, eval_record) if eval_record is not None else {}
        return Inputs(run, record, transfer, transfer_record, eval_record, pick_device(self.device), eval_correct)

    def _check_subject(self) -> None:
        """A run directory or a zoo model, not both; the zoo's options only with a zoo model."""
        if (self.run is None) == (self.zoo is None):
            raise ValueError("give either --run (a run directory) or --zoo (a RobustBench model), not "
                             + ("both" if self.run is not None else "neither"))
        if self.zoo is not None:
            from ..zoo import check_subject

            check_subject(self.zoo, self.dataset, self.threat_model, self.checkpoint)
            if self.eps is not None and not 0 < self.eps <= 1:
                raise ValueError(f"--eps must be in (0, 1] (Linf, pixel units), got {self.eps}")
        elif self.dataset is not None or self.model_dir is not None or self.eps is not None:
            raise ValueError("--dataset, --model-dir and --eps go with --zoo; a run is audited on its dataset "
                             "at its training eps")
        elif self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be best or last, got {self.checkpoint!r}")

    def _subject(self):
        """(run directory or zoo model, its record), checked; the model itself is loaded by the audit."""
        if self.zoo is None:
            return _finished_run(self.run, self.checkpoint, "--run")
        from ..zoo import DEFAULT_MODEL_DIR, ZooModel

        zoo = ZooModel(self.zoo, self.dataset, self.threat_model, self.model_dir or DEFAULT_MODEL_DIR)
        record = zoo.require(self.checkpoint)
        return zoo, record if self.eps is None else {**record, "eps": float(self.eps)}

    def _check_paths(self) -> None:
        """Empty paths (Path("") is the working directory, which nobody means), a folder given as --eval,
        a data root that is a file, and more threads than CPUs."""
        for what, path in (("--run", self.run), ("--transfer-from", self.transfer_from)):
            if path is not None and not path.strip():
                raise ValueError(f"{what} is empty; give a run directory")
        if self.eval_json is not None and (not self.eval_json.strip() or Path(self.eval_json).is_dir()):
            raise ValueError(f"--eval {self.eval_json!r} is not a file; give the `gmr evaluate` JSON file")
        if self.data_root is not None:
            check_folder_path(self.data_root, "--data-root")
        check_threads(self.threads)

    def _check_points(self, record: dict) -> None:
        """n_test within the run's test set (a dataset fact; no data is loaded)."""
        from ..data import dataset_info

        dataset = record["config"]["dataset"]
        total = dataset_info(dataset).test_size
        if self.n_test > total:
            raise ValueError(f"n_test {self.n_test} is larger than the {total} test points of {dataset}")


@dataclass
class Inputs:
    """The checked inputs of an audit: run directories with their records, the evaluation record."""
    run: RunDir
    record: dict
    transfer: RunDir | None
    transfer_record: dict | None
    eval_record: dict | None
    device: torch.device
    eval_correct: dict[str, np.ndarray] = field(default_factory=dict)  # the evaluation's per-example arrays


@dataclass
class Diagnosis:
    audit: dict
    tables: dict[str, Table]


def _finished_run(path: str, checkpoint: str, what: str) -> tuple[RunDir, dict]:
    run = RunDir(path)
    return run, run.require(checkpoint, what)  # the model itself is loaded once, by the audit


def read_eval_record(path: str | Path, run_record: dict, checkpoint: str, run: RunDir) -> dict:
    """A `gmr evaluate` record of the run with `run_record` (same run_id) and of `checkpoint` (or of the
    other one when both hold the same weights); ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"evaluation file {path} does not exist; write it with `gmr evaluate`")
    try:
        record = read_json(path)
    except ValueError as err:
        raise ValueError(f"evaluation file {path} is not valid JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("attacks"), dict):
        raise ValueError(f"{path} is not a `gmr evaluate` result (no 'attacks' mapping)")
    if "run_id" not in record:
        raise ValueError(f"{path} names no run_id; evaluate --run {run.path} again with `gmr evaluate`")
    if record["run_id"] != run_record["run_id"]:
        raise ValueError(f"{path} evaluates run {record['run_id']}, not --run {run.path} ({run_record['run_id']})")
    if record.get("checkpoint", checkpoint) != checkpoint and not run.same_weights(run_record):
        raise ValueError(f"{path} evaluates the {record['checkpoint']} checkpoint, not --checkpoint {checkpoint}")
    return record


def read_eval_correct(path: str | Path, record: dict) -> dict[str, np.ndarray]:
    """The per-example correctness arrays of an evaluation record (its .npz, named by `per_example_file`,
    beside the record), keyed as the record's `per_example` entries; {} when there is no such file (the
    checks on the evaluation then compare their values without intervals, and say so)."""
    path = Path(path)
    npz = path.parent / record.get("per_example_file", path.with_suffix(".npz").name)
    if not npz.is_file():
        return {}
    try:
        with np.load(npz) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{npz} (per-example file of {path}) is not readable: {err}") from None


# --------------------------------------------------------------------------------------------------
# The audit

def diagnose(cfg: DiagnoseConfig) -> Diagnosis:
    """Audit the model of a run directory (see the module docstring); nothing is written."""
    return _diagnose(cfg, cfg.validate())


def _diagnose(cfg: DiagnoseConfig, inputs: Inputs) -> Diagnosis:
    from ..data import DataSpec, Split, load_split

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = inputs.device
    model, record, _ = inputs.run.load_model(cfg.checkpoint, device, inputs.record)
    source = (inputs.transfer.load_model("best", device, inputs.transfer_record)[0]
              if inputs.transfer is not None else None)
    run_cfg = record["config"]
    spec = DataSpec(run_cfg["dataset"], Path(cfg.data_root or run_cfg["data_root"]), n_test=cfg.n_test)
    x, y = (t.to(device) for t in load_split(spec, Split.TEST))
    start = time.perf_counter()
    probes = run_probes(model, x, y, float(record["eps"]), dataset=run_cfg["dataset"], settings=cfg.settings,
                        seed=cfg.seed, source_model=source)
    audit = _audit_header(cfg, inputs, len(y), time.perf_counter() - start)
    return judge(audit, probes.tables, inputs.eval_record, inputs.run.train_log(), inputs.eval_correct)


def _audit_header(cfg: DiagnoseConfig, inputs: Inputs, n: int, seconds: float) -> dict:
    record, run_cfg = inputs.record, inputs.record["config"]
    transfer_id = {"transfer_run_id": inputs.transfer_record["run_id"]} if inputs.transfer_record else {}
    zoo = {"zoo": record["zoo"]} if "zoo" in record else {}
    return {
        "schema": AUDIT_SCHEMA, "run_id": record["run_id"], **transfer_id, **zoo,
        "run": str(cfg.run if cfg.zoo is None else record["run_id"]), "checkpoint": cfg.checkpoint,
        "checkpoint_epoch": inputs.run.checkpoint_epoch(cfg.checkpoint, record),
        "method": run_cfg["method"], "dataset": run_cfg["dataset"], "model": run_cfg["model"],
        "train_seed": run_cfg.get("seed"), "eps": float(record["eps"]), "n_examples": n,
        "n_curve": min(cfg.settings.n_curve, n), "seed": cfg.seed,
        "inputs": {"eval_json": cfg.eval_json, "transfer_from": cfg.transfer_from},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.settings).items()},
        "seconds": seconds,
        **device_facts(inputs.device),
    }


def judge(audit: dict, tables: dict[str, Table], eval_record: dict | None,
          train_rows: Sequence[dict] = (), eval_correct: dict[str, np.ndarray] | None = None) -> Diagnosis:
    """Fill the summary, checks and verdict of `audit` from the probe tables, the run's training log
    and an evaluation record with its per-example arrays; add the derived tables (training curves,
    AutoAttack, checks). The checks' intervals are at the confidence of the audit's settings."""
    summary = summarise(tables)
    confidence = (audit.get("settings") or {}).get("confidence", ProbeSettings.confidence)
    checks = build_checks(summary, train_rows, eval_record, audit.get("checkpoint_epoch"), tables=tables,
                          eval_correct=eval_correct, confidence=confidence)
    tables = {k: v for k, v in tables.items() if k not in DERIVED_TABLES}
    if train_rows:
        tables["training_curves"] = training_table(train_rows)
    aa = autoattack_summary(eval_record)
    if aa is not None:
        n_aa = eval_record.get("n_examples")
        tables["autoattack"] = ([{"attack": "autoattack", "accuracy": aa["accuracy"], "n": n_aa}] +
                                [{"attack": k, "accuracy": aa_accuracy(v), "n": n_aa}
                                 for k, v in aa["per_attack"].items()])
    tables["checks"] = [check_row(c) for c in checks]
    co = catastrophic_overfitting_epoch(train_rows) if train_rows else None
    audit = dict(audit)
    audit["summary"] = {**summary, "catastrophic_overfitting_epoch": co,
                        "autoattack_accuracy": aa["accuracy"] if aa else None,
                        "autoattack_flags": aa["flags"] if aa else None}
    audit["checks"] = checks
    audit["verdict"] = verdict(checks)
    return Diagnosis(audit=audit, tables=tables)


def check_row(check: dict) -> dict:
    """A check as a row of checks.csv: the interval in two columns."""
    low, high = check["interval"] or (None, None)
    return {**{k: check[k] for k in ("name", "value", "threshold", "fails_when", "passed", "decision")},
            "interval_low": low, "interval_high": high,
            **{k: check[k] for k in ("n", "n_of", "n_needed", "role", "source")}}


def training_table(rows: Sequence[dict]) -> Table:
    """The training log's validation curves per epoch, with the FGSM-PGD gap and the CO flag."""
    co = catastrophic_overfitting_epoch(rows)
    keep = ("epoch", "val_clean", "val_fgsm", "val_ifgsm3", "val_pgd", "val_logit_dist", "val_grad_align")
    out = []
    for row in rows:
        r = {k: row.get(k, float("nan")) for k in keep}
        r["epoch"] = int(r["epoch"])
        r["val_fgsm_pgd_gap"] = r["val_fgsm"] - r["val_pgd"]
        r["catastrophic_overfitting"] = int(co is not None and r["epoch"] >= co)
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------------
# Re-auditing a folder

def read_tables(diag_dir: str | Path) -> dict[str, Table]:
    """The probe tables of a diagnose folder, read back from its CSV files (numbers as floats)."""
    d = Path(diag_dir)
    return {name: read_csv(d / f"{name}.csv") for name in PROBES.names_in_order() if (d / f"{name}.csv").is_file()}


def reaudit(diag_dir: str | Path, eval_json: str | None = None, run: str | None = None,
            checkpoint: str | None = None, subject=None) -> Diagnosis:
    """Rebuild the audit of a `gmr diagnose` folder from its CSV files, without the model. `run` (default:
    the audit's) must be the audited run (same run_id), `checkpoint` (when given) the audited one. The
    probes, settings and device facts stay those of the original audit. `subject` (a gmr.zoo.ZooModel)
    stands for `run` when a RobustBench model was audited (default: the one the audit names)."""
    diag_dir = Path(diag_dir)
    old = _read_audit(diag_dir)
    missing = [n for n in PROBES.names_in_order()
               if not PROBES.entry(n).meta["optional"] and not (diag_dir / f"{n}.csv").is_file()]
    if missing:
        raise ValueError(f"{diag_dir} lacks {', '.join(n + '.csv' for n in missing)}; run `gmr diagnose` again")
    run_dir = subject if subject is not None else _audited(old, run)
    record = run_dir.record()
    if old["run_id"] != record["run_id"]:
        raise ValueError(f"{diag_dir}/audit.json audits run {old['run_id']}, not --run {run_dir.path} "
                         f"({record['run_id']})")
    if checkpoint is not None and old["checkpoint"] != checkpoint:
        raise ValueError(f"{diag_dir}/audit.json audits the {old['checkpoint']} checkpoint, "
                         f"not --checkpoint {checkpoint}")
    eval_json = eval_json or (old.get("inputs") or {}).get("eval_json")
    eval_record = read_eval_record(eval_json, record, old["checkpoint"], run_dir) if eval_json else None
    eval_correct = read_eval_correct(eval_json, eval_record) if eval_record is not None else {}
    audit = {k: v for k, v in old.items() if k not in ("summary", "checks", "verdict", "files")}
    audit["inputs"] = {**(old.get("inputs") or {}), "eval_json": eval_json}
    return judge(audit, read_tables(diag_dir), eval_record, run_dir.train_log(), eval_correct)


def _audited(audit: dict, run: str | None):
    """The run directory (or zoo model) an audit names, unless `run` names another run directory."""
    if run is None and isinstance(audit.get("zoo"), dict):
        from ..zoo import ZooModel

        return ZooModel.from_fields(audit["zoo"])
    return RunDir(run if run is not None else audit["run"])


def _read_audit(diag_dir: Path) -> dict:
    path = diag_dir / "audit.json"
    if not path.is_file():
        raise ValueError(f"{diag_dir} is not a `gmr diagnose` folder (no audit.json)")
    try:
        audit = read_json(path)
        validate_audit(audit)
    except Exception as err:  # invalid JSON or a schema violation (e.g. an audit without run_id)
        raise ValueError(f"{path} is not a gmr audit ({str(err).splitlines()[0][:200]}); "
                         "run `gmr diagnose` again") from None
    return audit


def validate_audit(audit: dict) -> None:
    """Raise jsonschema.ValidationError when `audit` does not follow gmr/schemas/audit.schema.json."""
    from ..schemas import validate

    validate(audit, "audit")


# --------------------------------------------------------------------------------------------------
# Files

def write_diagnosis(diag: Diagnosis, out: str | Path) -> list[Path]:
    """Write one CSV per table, the figures, and then audit.json (once, naming the other files) into
    `out`, each atomically; returns the paths written."""
    from ..report.audit_figures import diagnosis_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in diag.tables.items():
        if rows:
            write_csv(out / f"{name}.csv", rows)
            written.append(out / f"{name}.csv")
    written += diagnosis_figures(out, diag.audit)
    diag.audit["files"] = sorted(p.name for p in written)
    write_json(out / "audit.json", diag.audit)
    return written + [out / "audit.json"]


def write_audit(cfg: DiagnoseConfig, out: str | Path, *, audit_only: bool = False) -> dict:
    """What `gmr diagnose` does: check the inputs, audit the run (or, with `audit_only`, rebuild the
    audit from the CSV files already in `out`) and write every file into `out`; returns the audit.
    Bad input (a damaged training log included) raises ValueError (one line) before any work. Holds the
    folder's lock meanwhile (LockHeld when another process writes it), removes the temporary files a
    killed writer left, and removes an old audit.json before writing, so that no verdict stands beside
    files of another audit when a write fails."""
    from ..io import remove_stale_temps
    from ..locks import lock_folder

    inputs = cfg.validate()
    out = ensure_writable_dir(out)
    inputs.run.train_log(inputs.record)  # a damaged log stops here, before any work (RunError)
    with lock_folder(out):  # one writer of the folder (LockHeld: exit 2)
        remove_stale_temps(out)  # left by a killed writer: no live one holds the lock
        if audit_only:
            diag = reaudit(out, cfg.eval_json, cfg.run, cfg.checkpoint, subject=inputs.run if cfg.zoo else None)
        else:
            diag = _diagnose(cfg, inputs)
        (out / "audit.json").unlink(missing_ok=True)  # no verdict beside half-rewritten files if a write fails
        write_diagnosis(diag, out)
    return diag.audit
