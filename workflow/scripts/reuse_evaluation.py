"""Evaluate the last model of a run, or reuse the evaluation of the selected model when they are the
same weights (the run's best epoch is its last epoch: `model_best.pt` and `model_last.pt` were saved
from the same state, and the attacks are seeded, so the result would be identical).

    python reuse_evaluation.py RUN_JSON BEST_EVAL_JSON OUT_JSON -- gmr evaluate ... --out OUT_JSON

Reusing writes OUT_JSON (and its .npz) with "checkpoint": "last" and "reused_from": the best file;
otherwise the command after `--` runs in place of this script. Standard library only (no torch import).
"""
import json
import os
import shutil
import sys
from pathlib import Path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_json, best_json, out_json = (Path(a) for a in argv[:3])
    command = argv[4:]
    run = json.loads(run_json.read_text())
    sel = run["selection"]
    if sel["best_epoch"] == sel["last_epoch"] and best_json.is_file():
        record = json.loads(best_json.read_text())
        record["checkpoint"] = "last"
        record["reused_from"] = best_json.name
        npz = record.get("per_example_file")
        if npz and (best_json.parent / npz).is_file():
            target = out_json.with_suffix(".npz")
            shutil.copyfile(best_json.parent / npz, target)
            record["per_example_file"] = target.name
        _write_atomic(out_json, json.dumps(record, indent=2) + "\n")
        print(f"{run_json.parent}: best epoch {sel['best_epoch']} is the last epoch; "
              f"{out_json} reuses {best_json}")
        return 0
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
