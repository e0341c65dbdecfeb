"""Which GPU a local workflow job runs on: each job gets a slot, k jobs may share one GPU.

Snakemake's local executor counts a `gpu` resource (`--resources gpu=N`) but never says which device a
job may use, so every job would start on GPU 0. A GPU job of the workflow therefore runs as

    python -m gmr.gpu_slots [--devices 0,1] [--jobs-per-gpu K] -- gmr train ...

which takes the first free slot (device d, place j < K) and becomes the command (exec) with
CUDA_VISIBLE_DEVICES=d, so signals reach the command itself (Ctrl-C lets `gmr train` stop cleanly). A slot
is a kernel lock (flock) on a file in the host's temporary folder, held through the exec by the command's
process: the kernel releases it when that process ends however it ends, so no slot is ever left taken
by a killed job, and two workflows on one host share its GPUs correctly. Small jobs (LeNet+ or
ResNet-18 at batch 128) leave a modern GPU mostly idle, hence K > 1; with `--resources gpu=N*K`
Snakemake starts no more jobs than there are slots (more would wait here for a free one).

The devices are, in order: --devices; else those CUDA_VISIBLE_DEVICES lists (a Slurm allocation, or
the user's own restriction); else every GPU torch sees. None (a CPU machine): the command runs as it is.
On a Slurm cluster each job is its own allocation: the slot files are kept per allocation
(SLURM_JOB_ID), so each job gets the device Slurm gave it and jobs never share one.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Sequence

POLL_SECONDS = 2.0


def visible_devices(devices: Sequence[str] | None = None, environ: dict | None = None) -> list[str]:
    """The device ids slots are made of (the order of the module docstring)."""
    environ = os.environ if environ is None else environ
    if devices:
        return [str(d) for d in devices]
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def slots(devices: Sequence[str], jobs_per_gpu: int) -> list[tuple[str, int]]:
    """Every (device, place), devices first: with fewer jobs than GPUs each job gets a GPU to itself."""
    if jobs_per_gpu < 1:
        raise ValueError(f"jobs_per_gpu must be at least 1, got {jobs_per_gpu}")
    return [(d, j) for j in range(jobs_per_gpu) for d in devices]


def lock_dir(environ: dict | None = None) -> Path:
    """The slot files of this host (and of this Slurm allocation, if any) for this user."""
    environ = os.environ if environ is None else environ
    scope = f"slurm-{environ['SLURM_JOB_ID']}" if environ.get("SLURM_JOB_ID") else "local"
    return Path(tempfile.gettempdir()) / f"gmr-gpu-slots-{os.getuid()}" / scope


def _try_lock(path: Path):
    """An open file holding the exclusive lock of `path`, or None when another process holds it."""
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def acquire(all_slots: Sequence[tuple[str, int]], folder: Path,
            poll_seconds: float = POLL_SECONDS) -> tuple[str, int, IO]:
    """The first free slot as (device, place, open lock file), waiting while all are taken. The slot is
    held until the file is closed, or until every process holding it (after an exec too) has ended."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for device, place in all_slots:
            name = "".join(c if c.isalnum() or c in "-_" else "_" for c in device)
            fh = _try_lock(folder / f"gpu-{name}-{place}.lock")
            if fh is not None:
                return device, place, fh
        time.sleep(poll_seconds)


def exec_on_slot(command: Sequence[str], devices: Sequence[str] | None, jobs_per_gpu: int) -> None:
    """Become `command` on a free slot's device (or as it is, with no GPU); returns only on error."""
    program = shutil.which(command[0])
    if program is None:
        raise FileNotFoundError(f"command not found: {command[0]}")
    found = visible_devices(devices)
    env = dict(os.environ)
    if found:
        device, _, fh = acquire(slots(found, jobs_per_gpu), lock_dir())
        os.set_inheritable(fh.fileno(), True)  # the command's process keeps the lock
        env["CUDA_VISIBLE_DEVICES"] = device
    os.execve(program, list(command), env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmr.gpu_slots", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", help="comma-separated GPU ids (default: CUDA_VISIBLE_DEVICES, else all)")
    p.add_argument("--jobs-per-gpu", type=int, default=1, help="jobs that share one GPU")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (after --)")
    if args.jobs_per_gpu < 1:
        p.error(f"--jobs-per-gpu must be at least 1, got {args.jobs_per_gpu}")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    try:
        exec_on_slot(command, devices, args.jobs_per_gpu)
    except OSError as err:
        print(f"gmr.gpu_slots: error: {err}", file=sys.stderr)
        return 127
    return 0


if __name__ == "__main__":
    sys.exit(main())
