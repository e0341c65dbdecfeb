"""The pinned Snakemake keeps `--cores`: after a job that ran alone, two jobs that each claim every
core run one after the other. Snakemake 9.10 to 9.16 ran them at once (snakemake/snakemake#3913,
measured with this test's Snakefile and --scheduler greedy: 9.15.0, 9.16.0 and 9.16.3 overlap; 9.9.0,
9.17.0, 9.17.3, 9.18.2, 9.19.0, 9.20.0, 9.24.0 and 9.27.1 do not), so the Makefile pins a release
without the bug instead of patching the scheduler."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The minimal example: `prepare` runs alone, then two jobs that each claim every core.
SNAKEFILE = """
rule final:
    input: "job1", "job2"

rule prepare:
    output: "common"
    threads: 2
    shell: "touch {output}"

rule job:
    input: "common"
    output: "job{n}"
    threads: 2
    shell: "python3 -c 'import time; print(time.time())' > {output}.start; sleep 3; python3 -c 'import time; print(time.time())' > {output}"
"""


def run_intervals(tmp_path: Path, scheduler: str) -> list[tuple[float, float]]:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--scheduler", scheduler,
                           "--directory", str(tmp_path), "--snakefile", str(tmp_path / "Snakefile")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(float((tmp_path / f"job{n}.start").read_text()), float((tmp_path / f"job{n}").read_text()))
            for n in (1, 2)]


def overlap(intervals: list[tuple[float, float]]) -> bool:
    (a0, a1), (b0, b1) = sorted(intervals)
    return b0 < a1


@pytest.mark.parametrize("scheduler", ["greedy", "ilp"])
def test_scheduler_respects_cores_after_a_lone_job(tmp_path, scheduler):
    assert not overlap(run_intervals(tmp_path, scheduler))
