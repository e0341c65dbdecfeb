"""Are the study's conclusions stable under the evaluation's own randomness?

Runs the evaluation, AutoAttack and audit stages of a finished study again with other evaluation seeds
(PGD random starts, AutoAttack's seed, the probes' draws) on the same trained models, and prints the
masking verdicts and the comparison readings of every seed side by side:

    python benchmarks/stability.py                       # the default study in results/, seeds 1 2 3
    python benchmarks/stability.py --configfile config/paper-mnist.yaml --results results/paper-mnist

Each seed gets its own results folder beside the study's (<results>-stability/seed<k>) whose runs/ are
hard links to the study's (nothing is trained again). Exit code 0 when every seed gives the verdicts
and readings of the study, 1 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def conclusions(tables: Path) -> dict[str, str]:
    """What a study concludes: each audited model's verdict and each comparison's reading."""
    out = {}
    for r in _rows(tables / "masking.csv"):
        out[f"masking {r['method']} ({r['checkpoint']})"] = r["verdict"]
    for r in _rows(tables / "comparisons.csv"):
        out[f"{r['method_a']} vs {r['method_b']}, {r['attack']} ({r['checkpoint']})"] = r["reading"]
    return out


def seed_config(configfile: Path, results: Path, seed: int) -> Path:
    """The study's config with its own results folder and evaluation/audit seed."""
    cfg = yaml.safe_load(configfile.read_text())
    cfg["results"] = str(results)
    cfg.setdefault("evaluate", {})["seed"] = seed
    cfg.setdefault("diagnose", {})["seed"] = seed
    path = results.parent / f"config-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def link_trained(study: Path, results: Path) -> None:
    """Hard links to the study's runs/ and data marker (same files, same times: nothing retrains)."""
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    for sub in ("runs", "data"):
        subprocess.run(["cp", "-al", str(study / sub), str(results / sub)], check=True)


def run_seed(study: Path, configfile: Path, seed: int, cores: int) -> dict[str, str]:
    results = Path(f"{study}-stability") / f"seed{seed}"
    link_trained(study, results)
    cfg = seed_config(configfile, results, seed)
    targets = [str(results / "tables" / f"{t}.csv") for t in ("masking", "comparisons")]
    cmd = [sys.executable, "-m", "snakemake", "--configfile", str(cfg), "--cores", str(cores),
           "--workflow-profile", str(ROOT / "workflow/profiles/default"), *targets]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or "rule train:" in proc.stdout + proc.stderr:
        sys.exit(f"seed {seed}: snakemake failed or trained again:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return conclusions(results / "tables")


def print_table(columns: dict[str, dict[str, str]]) -> bool:
    keys = list(next(iter(columns.values())))
    names = list(columns)
    print("| conclusion | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    same = True
    for k in keys:
        values = [columns[n].get(k, "(missing)") for n in names]
        same &= len(set(values)) == 1
        print(f"| {k} | " + " | ".join(values) + " |")
    print(f"\n{'identical' if same else 'NOT identical'} across {', '.join(names)}")
    return same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configfile", type=Path, default=ROOT / "config/config.yaml")
    p.add_argument("--results", type=Path, help="the finished study's results folder (default: its config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    study = (args.results or Path(yaml.safe_load(args.configfile.read_text())["results"])).resolve()
    if not (study / "tables" / "comparisons.csv").is_file():
        p.error(f"{study} is not a finished study (no tables/comparisons.csv); run it first")
    base = yaml.safe_load(args.configfile.read_text()).get("evaluate", {}).get("seed", 0)
    columns = {f"seed {base} (study)": conclusions(study / "tables")}
    for seed in args.seeds:
        columns[f"seed {seed}"] = run_seed(study, args.configfile.resolve(), seed, args.cores)
    return 0 if print_table(columns) else 1


if __name__ == "__main__":
    sys.exit(main())
