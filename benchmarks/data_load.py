"""Start-up cost of a job's data load: a fresh process that loads the MNIST test split through the
decoded-tensor cache (`<root>/.gmr-cache/`) against one that decodes it through torchvision, and a
process that only imports torch (the floor every `gmr` job pays).

Each round runs the three in a fresh interpreter, in alternating order (a busy machine slows all
alike); the table gives the median wall time and the ratio to the torchvision load. The cache should
save about the cost of importing torchvision (which imports torch._dynamo).

    python benchmarks/data_load.py [--data-root data] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from gmr.data import DataSpec, Split, default_data_root, load_split

LOAD = ("from pathlib import Path; from gmr import data; "
        "data._{fn}('MNIST', Path({root!r}), False, None, '')")
CASES = {
    "import torch only": "import torch",
    "cached tensors": LOAD.replace("{fn}", "load_torchvision"),
    "torchvision decode": LOAD.replace("{fn}", "decode_torchvision"),
}


def run(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(default_data_root()))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_split(DataSpec("mnist", args.data_root, n_test=1), Split.TEST)  # fills the root and the cache
    codes = {name: code.format(root=args.data_root) for name, code in CASES.items()}
    times = {name: [] for name in codes}
    for r in range(args.repeats):
        order = list(codes) if r % 2 == 0 else list(reversed(codes))
        for name in order:
            times[name].append(run(codes[name]))
    base = statistics.median(times["torchvision decode"])
    print(f"{'process':<22} {'median s':>9} {'vs torchvision':>15}   ({args.repeats} rounds)")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<22} {med:>9.2f} {med / base:>15.2f}")


if __name__ == "__main__":
    main()
