"""`gmr` command line: parses options, calls library functions, writes files.

Wrong input exits with code 2 and one line on stderr before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

EXIT_USAGE = 2
# gmr.runs.CHECKPOINTS, spelled out so that building the parser does not import torch (a test keeps
# the two equal)
CHECKPOINT_CHOICES = ("best", "last", "ema", "ema_last")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line on stderr (exit code 2), like every other error of `gmr`:
    argparse prints the whole usage first, which buries the one line that says what is wrong."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _key_values(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--opt needs KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--opt {item!r}: cannot read the value {value!r}") from None
    return out


def _load_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.strip():
        raise UsageError("--config is empty; give a YAML file")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _build(cls, values: dict[str, Any]):
    """A config dataclass from YAML and command-line values, checked by its annotations."""
    from .options import build

    try:
        return build(cls, values)
    except ValueError as err:
        raise UsageError(str(err)) from None


# --------------------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) one run",
                       description="Train a model with a method; resumes when --out holds a checkpoint.")
    p.add_argument("--config", help="YAML file of options (command-line options override it)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--dataset"); p.add_argument("--model"); p.add_argument("--method")
    p.add_argument("--eps", type=float, help="Linf budget in [0, 1] (default: dataset's usual)")
    p.add_argument("--epochs", type=int); p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float); p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", help="step (paper), cyclic (Wong et al. 2020), onecycle or constant")
    p.add_argument("--seed", type=int); p.add_argument("--split-seed", type=int)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --opt lambda_=5 (see `gmr methods`)")
    p.add_argument("--n-train", type=int); p.add_argument("--n-val", type=int)
    p.add_argument("--val-size", type=int)
    p.add_argument("--probe-pgd-steps", type=int); p.add_argument("--probe-pgd-step-size", type=float)
    p.add_argument("--data-root"); p.add_argument("--device"); p.add_argument("--threads", type=int)
    p.add_argument("--keep-epoch-checkpoints", action="store_true", default=None)
    p.add_argument("--keep-resume-state", action="store_true", default=None,
                   help="keep checkpoint.pt (optimizer momentum, RNG states) after the last epoch")
    p.add_argument("--precision",
                   help="of the training step: fp32 (default), bf16, fp16 (CUDA only) or auto (bf16 where "
                        "the device computes it natively); evaluation and probes stay fp32")
    p.add_argument("--label-smoothing", type=float,
                   help="label smoothing of the training cross-entropy, in [0, 1] (default 0)")
    p.add_argument("--ema-decay", type=float,
                   help="keep an exponential moving average of the weights with this decay, probed each "
                        "epoch and saved as checkpoints ema (its best epoch) and ema_last (default: none)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (opt-in: about 2x slower on CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .io import ensure_writable_dir
    from .runs import run_warnings
    from .train import TrainConfig, train

    values = _load_yaml(args.config)
    opts = values.pop("method_options", {}) or {}
    if not isinstance(opts, dict):
        raise UsageError(f"method_options in {args.config} must be a mapping of option: value")
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "method_options":
            values[f.name] = v
    values["method_options"] = {**opts, **_key_values(args.opt)}
    cfg = _build(TrainConfig, values)
    try:  # everything the input can get wrong, before any work; train() checks it again for callers
        cfg.validate()
        ensure_writable_dir(args.out)
    except ValueError as err:
        raise UsageError(str(err)) from None
    result = train(cfg, args.out, progress=not args.no_progress)
    for warning in run_warnings(result):  # also in run.json and the tables
        print(f"gmr train: warning: {args.out}: {warning}", file=sys.stderr)
    best, last = result["metrics"]["best"], result["metrics"]["last"]
    print(f"{args.out}: best epoch {result['selection']['best_epoch']} "
          f"(val clean {best['val_clean']:.3f}, fgsm {best['val_fgsm']:.3f}, pgd {best['val_pgd']:.3f}); "
          f"last: clean {last['val_clean']:.3f}, fgsm {last['val_fgsm']:.3f}, pgd {last['val_pgd']:.3f}; "
          f"{result['cost']['train_seconds']:.1f}s training")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="attack a trained run on the test set",
                       description="White-box attacks, AutoAttack, transfer attacks and eps sweeps on the first "
                       "n test points; writes one JSON record (gmr/schemas/eval.schema.json) and an .npz of "
                       "per-example correctness beside it.")
    p.add_argument("--run", help="run directory written by `gmr train`")
    _add_zoo_options(p)
    p.add_argument("--attacks", default="clean,fgsm,pgd", type=_csv_list,
                   help="comma-separated attacks (see `gmr attacks`), e.g. clean,fgsm,rfgsm,ifgsm,pgd,pgd_cw,autoattack")
    p.add_argument("--n-test", default="1000", help="first n test points in order (default 1000; all: whole set)")
    p.add_argument("--checkpoint", default="best", choices=CHECKPOINT_CHOICES,
                   help="best (selected, the paper's), last, ema or ema_last (runs trained with --ema-decay)")
    p.add_argument("--eps", type=float, help="budget (default: the run's training eps)")
    p.add_argument("--eps-list", type=_csv_list, metavar="E1,E2,...",
                   help="also run every attack at these budgets (result key eps_sweep)")
    p.add_argument("--attack-param", "--param", dest="attack_param", action="append", metavar="ATTACK.KEY=VALUE",
                   help="override an attack default, e.g. pgd.steps=200 (repeatable)")
    p.add_argument("--restarts", type=int, help="restarts of pgd and pgd_cw (default 1)")
    p.add_argument("--transfer-from", metavar="SOURCE_RUN",
                   help="craft transfer attacks on this run's model (result key transfer)")
    p.add_argument("--transfer-checkpoint", default="best", choices=CHECKPOINT_CHOICES)
    p.add_argument("--transfer-attacks", default="fgsm,rfgsm,pgd", type=_csv_list)
    p.add_argument("--aa-version", default="standard", help="AutoAttack version: standard (default), plus, custom")
    p.add_argument("--aa-norm", default="Linf", help="AutoAttack norm: Linf (default) or L2 (needs --eps)")
    p.add_argument("--aa-attacks", type=_csv_list, help="AutoAttack custom cascade, e.g. apgd-ce,square")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root")
    p.add_argument("--card", metavar="CARD.json", help="also write a RobustBench model card (needs autoattack)")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    p.add_argument("--reuse-from", metavar="EVAL.json",
                   help="copy this evaluation of the run's other checkpoint instead of evaluating when the "
                   "run's best epoch is its last and the settings match (a file not there yet: evaluate)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--out", required=True, help="result JSON file (.npz and AutoAttack state files beside it)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("card", help="RobustBench model card from an evaluation with AutoAttack",
                       description="Write a RobustBench model card (gmr/schemas/card.schema.json) from a "
                       "`gmr evaluate` result and its run's run.json.")
    p.add_argument("--eval", dest="eval_json", required=True, metavar="EVAL.json", help="`gmr evaluate` result")
    p.add_argument("--run", help="run directory (default: the one named in the result)")
    p.add_argument("--name", help="card name (default: method, architecture, seed, checkpoint)")
    p.add_argument("--out", required=True, help="card JSON file")
    p.set_defaults(func=_cmd_card)


def _add_zoo_options(p) -> None:
    """A RobustBench model in place of --run (`gmr evaluate` and `gmr diagnose`; see `gmr zoo list`)."""
    p.add_argument("--zoo", metavar="NAME", help="a RobustBench model instead of --run, e.g. Wong2020Fast "
                   "(needs the zoo extra; see `gmr zoo list`)")
    p.add_argument("--dataset", help="with --zoo: its dataset, e.g. cifar10")
    p.add_argument("--threat-model", default="Linf", help="with --zoo: the zoo's threat model (Linf)")
    p.add_argument("--model-dir", help="with --zoo: folder of RobustBench checkpoints, "
                   "<dir>/<dataset>/<threat model>/<NAME>.pt (default ./models; a missing one is downloaded)")


def _zoo_values(args) -> dict[str, Any]:
    """The zoo options as config values; a zoo model's one checkpoint is `published`."""
    checkpoint = "published" if args.zoo is not None else args.checkpoint
    return dict(run=args.run, zoo=args.zoo, dataset=args.dataset, threat_model=args.threat_model,
                model_dir=args.model_dir, checkpoint=checkpoint)


def _subject(args) -> str:
    """How the one-line summary names what was measured."""
    return args.run if args.zoo is None else f"RobustBench {args.zoo} ({args.dataset} {args.threat_model})"


def _attack_params(items: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        attack, dot, name = key.strip().partition(".")
        if not sep or not dot or not attack or not name:
            raise UsageError(f"--attack-param needs ATTACK.KEY=VALUE (e.g. pgd.steps=200), got {item!r}")
        try:
            out.setdefault(attack, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--attack-param {item!r}: cannot read the value {value!r}") from None
    return out


def _eval_config(args):
    from .evaluate import EvalConfig

    n_test = args.n_test.strip().lower()
    try:
        n = None if n_test == "all" else int(n_test)
    except ValueError:
        n = 0
    if n is not None and n < 1:  # 0 points is no evaluation; `all` asks for the whole test set
        raise UsageError(f"--n-test must be a positive integer or all, got {args.n_test!r}")
    try:
        eps_list = [float(e) for e in args.eps_list or []]
    except ValueError:
        raise UsageError(f"--eps-list must be comma-separated numbers, got {','.join(args.eps_list)!r}") from None
    out = Path(args.out)
    if not args.out.strip() or not out.name:
        raise UsageError(f"--out must be the path of the result's .json file, got {args.out!r}")
    return _build(EvalConfig, dict(
        **_zoo_values(args), attacks=args.attacks, n_test=n, eps=args.eps,
        eps_list=eps_list, batch_size=args.batch_size, seed=args.seed, device=args.device,
        data_root=args.data_root, attack_params=_attack_params(args.attack_param), restarts=args.restarts,
        transfer_from=args.transfer_from, transfer_checkpoint=args.transfer_checkpoint,
        transfer_attacks=args.transfer_attacks, aa_version=args.aa_version, aa_norm=args.aa_norm,
        aa_attacks=args.aa_attacks, state_prefix=str(out.with_name(out.stem)), threads=args.threads))


def _cmd_evaluate(args) -> int:
    from .evaluate import check_outputs, evaluate_to_file

    cfg = _eval_config(args)
    try:  # everything the input can get wrong, before any work (a damaged model file: RunError, exit 2)
        cfg.validate()
        out = check_outputs(cfg, args.out, args.card, args.reuse_from)
    except ValueError as err:
        raise UsageError(" ".join(str(err).split())) from None  # one line, whatever the cause says
    say = None if args.quiet else (lambda text: print(f"  {text}", flush=True))
    record = evaluate_to_file(cfg, out, card=args.card, reuse_from=args.reuse_from, progress=say)
    summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in record["attacks"].items())
    if record["transfer"]:
        summary += "; transfer " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in record["transfer"].items())
    flags = record["attacks"].get("autoattack", {}).get("flags", [])
    print(f"{_subject(args)} ({record['checkpoint']}, n={record['n_examples']}, eps {record['eps']:g}): {summary}; "
          f"worst case {record['worst_case']['accuracy']:.3f}"
          + (f"; AutoAttack flags: {len(flags)}" if flags else "")
          + (f"; reused {record['reused_from']}" if "reused_from" in record else "") + f" -> {out}")
    return 0


def _cmd_card(args) -> int:
    from .report.cards import CardError, write_card

    try:
        card = write_card(args.eval_json, args.out, args.run, args.name)
    except CardError as err:
        raise UsageError(f"{args.eval_json}: {err}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"{card['name']}: clean {card['clean_acc']}%, AutoAttack {card['autoattack_acc']}% -> {args.out}")
    return 0


def _add_listings(sub) -> None:
    p = sub.add_parser("models", help="list models with parameter counts and input shapes")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("methods", help="list training methods, their cost and default options")
    p.add_argument("--dataset", default="mnist")
    p.set_defaults(func=_cmd_methods)
    p = sub.add_parser("datasets", help="list datasets")
    p.set_defaults(func=_cmd_datasets)
    p = sub.add_parser("attacks", help="list evaluation attacks")
    p.set_defaults(func=_cmd_attacks)
    p = sub.add_parser("prepare-data", help="fill the data root from offline sources or a download")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", default="data")
    p.set_defaults(func=_cmd_prepare)


def _cmd_models(args) -> int:
    from .models import MODELS, count_parameters, create_model, normalizes_inputs

    print(f"{'model':<18}{'parameters':>12}  {'input shapes':<20} {'inputs':<11} description")
    for entry in MODELS:
        sizes = entry.meta.get("input_sizes")
        ds = "mnist" if sizes == [(28, 28)] or entry.name == "tiny_cnn" else "cifar10"
        shape = "1x28x28" if ds == "mnist" else "3x32x32"
        shapes = shape if sizes else "any (3x32x32 shown)" if entry.name != "tiny_cnn" else "any"
        n = count_parameters(create_model(entry.name, ds))
        inputs = "normalised" if normalizes_inputs(entry.name) else "[0, 1] raw"
        print(f"{entry.name:<18}{n:>12,}  {shapes:<20} {inputs:<11} {entry.meta.get('description', '')}")
    return 0


def _cmd_methods(args) -> int:
    from .methods import METHODS, make_options, method_cost

    print(f"{'method':<12}{'passes/sample':>14}  {'attack BN':<10} options ({args.dataset} defaults)   description")
    for entry in METHODS:
        opts = make_options(entry.name, args.dataset)
        cost = method_cost(entry.name, opts, 128)
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in dataclasses.asdict(opts).items())
        print(f"{entry.name:<12}{cost.passes:>14.3g}  {entry.obj.attack_bn:<10} {text or '-':<34} "
              f"{entry.obj.description}")
        print(f"{'':<12}{'':>14}  source: {entry.obj.source or '-'}")
    return 0


def _cmd_datasets(args) -> int:
    from .data import dataset_info, list_datasets

    for name in list_datasets():
        info = dataset_info(name)
        print(f"{name:<14} classes {info.num_classes:<4} shape {'x'.join(map(str, info.input_shape)):<8} "
              f"eps {info.default_eps:.4g}")
    return 0


def _cmd_attacks(args) -> int:
    from .attacks import ATTACKS

    print("clean          no attack")
    for entry in ATTACKS:
        print(f"{entry.name:<14} {entry.meta['description']}")
    print("autoattack     AutoAttack via pyautoattack (--aa-version standard|plus|custom, --aa-norm Linf|L2)")
    return 0


def _cmd_prepare(args) -> int:
    from .data import DataSpec, Split, list_datasets, load_split

    if args.dataset not in list_datasets():
        raise UsageError(f"unknown dataset {args.dataset!r}; valid datasets: {', '.join(list_datasets())}")
    spec = DataSpec(args.dataset, Path(args.data_root))
    n_train = len(load_split(spec, Split.TRAIN)[0])
    n_test = len(load_split(spec, Split.TEST)[0])
    print(f"{args.dataset} ready under {args.data_root}: {n_train} train, {n_test} test examples")
    return 0


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="gradient-masking probes and audit of one run",
                       description="Probe a trained run for gradient masking on the first n test points; "
                       "write audit.json (checks + verdict), one CSV per probe and figures into --out.")
    p.add_argument("--run", help="run directory written by `gmr train`")
    _add_zoo_options(p)
    p.add_argument("--out", required=True, help="output folder (audit.json, *.csv, *.png, *.pdf)")
    p.add_argument("--checkpoint", default="best", help="best (default) or last")
    p.add_argument("--eps", type=float, help="with --zoo: the Linf budget audited (default: the zoo's, "
                   "8/255 on CIFAR; a run is audited at its training eps)")
    p.add_argument("--n-test", type=int, default=500, help="first n test points (default 500)")
    p.add_argument("--n-curve", type=int, help="points for the sanity curves (default 200)")
    p.add_argument("--eval", dest="eval_json", metavar="EVAL.json",
                   help="`gmr evaluate` result of this run (same run_id; AutoAttack flags and breakdown)")
    p.add_argument("--transfer-from", metavar="SOURCE_RUN", help="run whose PGD examples are transferred")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", help="default: the run's own data root")
    p.add_argument("--batch-size", type=int, help="default 250")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true",
                   help="small probes for smoke tests (fewer PGD steps, restarts and grid points)")
    p.add_argument("--audit-only", action="store_true",
                   help="no model work: rebuild audit.json, checks and figures from the probe CSVs already "
                   "in --out (e.g. with an --eval whose AutoAttack finished later)")
    p.set_defaults(func=_cmd_diagnose)


def _cmd_diagnose(args) -> int:
    from .masking.audit import DiagnoseConfig, ProbeSettings, write_audit

    settings = ProbeSettings.quick() if args.quick else ProbeSettings()
    if args.n_curve is not None:
        settings.n_curve = args.n_curve
    if args.batch_size is not None:
        settings.batch_size = args.batch_size
    cfg = DiagnoseConfig(**_zoo_values(args), eps=args.eps, n_test=args.n_test,
                         eval_json=args.eval_json, transfer_from=args.transfer_from, seed=args.seed,
                         device=args.device, data_root=args.data_root, threads=args.threads,
                         settings=settings)
    if args.audit_only and not Path(args.out).is_dir():
        raise UsageError(f"--audit-only rebuilds the audit in the folder of an earlier `gmr diagnose`; "
                         f"--out {args.out} is not a folder")
    try:
        audit = write_audit(cfg, args.out, audit_only=args.audit_only)
    except ValueError as err:
        raise UsageError(" ".join(str(err).split())) from None
    s, v = audit["summary"], audit["verdict"]
    print(f"{_subject(args)} ({audit['checkpoint']}, n={audit['n_examples']}): clean {s['clean_accuracy']:.3f}, "
          f"fgsm {s['fgsm_accuracy']:.3f}, pgd {s['pgd_accuracy']:.3f}, alignment {s['gradient_alignment']:.3f}; "
          f"masking: {v['masking']} -> {Path(args.out) / 'audit.json'}")
    return 0


def _add_plots(sub) -> None:
    p = sub.add_parser("plots", help="comparison figures across runs",
                       description="Draw training curves, robust accuracy vs cost and, from `gmr diagnose` "
                       "folders, loss surfaces, accuracy vs eps and vs steps side by side (see gmr/report/plots.py).")
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run directories")
    p.add_argument("--out", required=True, help="output folder for the figures")
    p.add_argument("--diagnostics", nargs="*", default=[], metavar="DIR", help="`gmr diagnose` folders")
    p.add_argument("--evals", nargs="*", default=[], metavar="FILE", help="`gmr evaluate` JSON files")
    p.set_defaults(func=_cmd_plots)


def _cmd_plots(args) -> int:
    from .report.plots import comparison_figures
    from .report.tables import TableInputError

    try:
        written = comparison_figures(args.runs, args.out, args.diagnostics, args.evals)
    except TableInputError as err:
        raise UsageError(str(err)) from None
    print(f"{len(written)} files -> {args.out}: " + ", ".join(sorted({p.stem for p in written})))
    return 0


SUBCOMMANDS: list[Callable] = [_add_train, _add_evaluate, _add_listings, _add_diagnose, _add_plots]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gmr", description="gmr-bench: fast adversarial training suite")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _add_tables(sub) -> None:
    p = sub.add_parser("tables", help="every registered table (robustness, comparisons, reference, cost, ...)",
                       description="Write every table registered in gmr/report/tables.py as CSV, Markdown, "
                       "LaTeX, HTML and a report caption (.rst) into --out.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run directories (`gmr train`)")
    p.add_argument("--evals", nargs="*", default=[], metavar="EVAL.json", help="`gmr evaluate` results")
    p.add_argument("--audits", nargs="*", default=[], metavar="AUDIT.json",
                   help="`gmr diagnose` audit.json files (or their folders)")
    p.add_argument("--out", required=True, help="output folder, e.g. results/tables")
    p.add_argument("--comparisons", nargs="+", metavar="A:B1,B2",
                   help="pairs for the comparisons table: method A against each baseline B, e.g. gmr:fgsm,pgd "
                        "(default: gmr:fgsm,rfgsm,pgd, where both were evaluated)")
    p.set_defaults(func=_cmd_tables)


def _cmd_tables(args) -> int:
    from .report.comparisons import parse_pairs
    from .report.tables import TableInputError, make_tables

    try:
        pairs = parse_pairs(args.comparisons) if args.comparisons is not None else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        names, written = make_tables(args.runs, args.evals, args.audits, args.out, pairs)
    except TableInputError as err:
        raise UsageError(str(err)) from None
    print(f"{len(names)} tables ({', '.join(names)}) -> {args.out} ({len(written)} files)")
    return 0


SUBCOMMANDS.append(_add_tables)


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="RobustBench model zoo (needs the zoo extra)",
                       description="Models of the RobustBench model zoo, evaluated and audited with "
                       "`gmr evaluate --zoo NAME` and `gmr diagnose --zoo NAME`.")
    zoo = p.add_subparsers(dest="zoo_command", required=True)
    q = zoo.add_parser("list", help="the zoo's models with their published accuracies",
                       description="Every zoo model for a dataset and threat model, in RobustBench's order: "
                       "architecture, clean and robust (AutoAttack) accuracy as the leaderboard publishes them, "
                       "and whether its checkpoint is in --model-dir.")
    q.add_argument("--dataset", default="cifar10", help="cifar10 (default) or cifar100")
    q.add_argument("--threat-model", default="Linf", help="Linf (default), L2 or corruptions")
    q.add_argument("--model-dir", help="folder of RobustBench checkpoints to look in (default ./models)")
    q.set_defaults(func=_cmd_zoo_list)


def _cmd_zoo_list(args) -> int:
    from .zoo import DEFAULT_MODEL_DIR, ZooModel, list_models

    try:
        models = list_models(args.dataset, args.threat_model)
    except ValueError as err:
        raise UsageError(str(err)) from None
    model_dir = args.model_dir or DEFAULT_MODEL_DIR
    print(f"{'model':<48} {'architecture':<28} {'clean %':>8} {'robust %':>9}  checkpoint in {model_dir}")
    for m in models:
        files = ZooModel(m.name, m.dataset, m.threat_model, model_dir).checkpoint_files()
        here = "yes" if files and all(f.is_file() for f in files) else "no" if files else "hub"
        print(f"{m.name:<48} {m.architecture:<28} {_percent(m.clean_accuracy):>8} "
              f"{_percent(m.robust_accuracy):>9}  {here}")
    return 0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


SUBCOMMANDS.append(_add_zoo)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input, a damaged input file, or an output another process is writing
    (nothing was done; fix and run again); 1 the work failed (data unavailable, training diverged, a full
    disk: what finished is kept, run again once the cause is fixed). Errors are one line on stderr."""
    from .data import DataUnavailableError
    from .io import DiskFullError
    from .locks import LockHeld
    from .registry import UnknownNameError
    from .runs import RunError
    from .train import RunConflict, TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, UnknownNameError, RunConflict, RunError, LockHeld) as err:
        print(f"gmr {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (DataUnavailableError, TrainingDiverged, DiskFullError) as err:
        print(f"gmr {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
