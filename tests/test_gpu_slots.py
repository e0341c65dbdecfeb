"""GPU slots of local workflow jobs (gmr/gpu_slots.py), on CPU with a fake device list: each job its own
device, k jobs per device, a full house waits, a killed job frees its slot, Slurm allocations apart,
and the workflow wraps GPU jobs only."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gmr import gpu_slots

ROOT = Path(__file__).resolve().parents[1]
SHOW = "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(float(sys.argv[1]))"


def test_slots_fill_every_device_before_sharing_one():
    assert gpu_slots.slots(["0", "1"], 2) == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]
    assert gpu_slots.slots(["3"], 1) == [("3", 0)]
    with pytest.raises(ValueError, match="at least 1"):
        gpu_slots.slots(["0"], 0)


def test_devices_come_from_the_option_then_the_environment():
    assert gpu_slots.visible_devices(["2", "5"], {"CUDA_VISIBLE_DEVICES": "0"}) == ["2", "5"]
    assert gpu_slots.visible_devices(None, {"CUDA_VISIBLE_DEVICES": "1, 3"}) == ["1", "3"]
    assert gpu_slots.visible_devices(None, {"CUDA_VISIBLE_DEVICES": ""}) == []


def test_slurm_allocations_keep_their_own_slots():
    local, a, b = (gpu_slots.lock_dir(env) for env in ({}, {"SLURM_JOB_ID": "7"}, {"SLURM_JOB_ID": "8"}))
    assert len({local, a, b}) == 3 and a.name == "slurm-7"


def test_held_slots_are_skipped_and_a_full_house_waits(tmp_path):
    all_slots = gpu_slots.slots(["0", "1"], 2)
    held = [gpu_slots.acquire(all_slots, tmp_path) for _ in all_slots]
    assert [(d, p) for d, p, _ in held] == all_slots
    got = {}

    def waiter():
        got["slot"] = gpu_slots.acquire(all_slots, tmp_path, poll_seconds=0.05)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    assert "slot" not in got, "every slot is taken: the next job waits"
    held[2][2].close()                      # the job on ("0", 1) ends
    thread.join(timeout=5)
    assert got["slot"][:2] == ("0", 1)
    for _, _, fh in held[:2] + held[3:] + [got["slot"]]:
        fh.close()


def _start(tmp_path: Path, seconds: float, *options: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path), **(env_extra or {})}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-m", "gmr.gpu_slots", *options, "--",
                             sys.executable, "-c", SHOW, str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_each_job_gets_its_own_device_and_k_share_one(tmp_path):
    first = [_start(tmp_path, 3, "--devices", "0,1", "--jobs-per-gpu", "2") for _ in range(4)]
    devices = sorted(p.stdout.readline().strip() for p in first)
    assert devices == ["0", "0", "1", "1"]
    start = time.monotonic()
    late = _start(tmp_path, 0, "--devices", "0,1", "--jobs-per-gpu", "2")
    assert late.stdout.readline().strip() in ("0", "1")
    assert time.monotonic() - start > 1.0, "a fifth job waits until one of the four ends"
    for p in first + [late]:
        assert p.wait(timeout=30) == 0


def test_a_killed_job_frees_its_slot(tmp_path):
    job = _start(tmp_path, 60, "--devices", "4")
    assert job.stdout.readline().strip() == "4"
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    nxt = _start(tmp_path, 0, "--devices", "4")
    assert nxt.stdout.readline().strip() == "4" and nxt.wait(timeout=30) == 0


def test_without_gpus_the_command_runs_as_it_is_and_keeps_its_exit_code(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "gmr.gpu_slots", "--", sys.executable, "-c",
                           "import os, sys; print(repr(os.environ['CUDA_VISIBLE_DEVICES'])); sys.exit(3)"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and proc.stdout.strip() == "''"


def test_bad_usage_is_one_line(tmp_path):
    for args in (["--jobs-per-gpu", "0", "--", "true"], ["--devices", "0"]):
        proc = subprocess.run([sys.executable, "-m", "gmr.gpu_slots", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "error:" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gmr.gpu_slots", "--devices", "0", "--", "no-such-program-x"],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 127 and "command not found: no-such-program-x" in proc.stderr


# --------------------------------------------------------------------------------------------------
# The workflow

def _train_commands(tmp_path: Path, **changes) -> list[str]:
    cfg = yaml.safe_load((ROOT / ".test" / "config.yaml").read_text())
    cfg.update(changes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run(["timeout", "-s", "INT", "300", sys.executable, "-m", "snakemake", "--snakefile",
                           str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(config),
                           "--dry-run", "--printshellcmds", "--cores", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if " train --out " in line]


def test_workflow_wraps_gpu_jobs_only(tmp_path):
    cpu = _train_commands(tmp_path / "cpu")
    assert cpu and not any("gmr.gpu_slots" in c for c in cpu)
    resources = yaml.safe_load((ROOT / ".test" / "config.yaml").read_text())["resources"]
    resources["train"]["gpu"] = 1
    gpu = _train_commands(tmp_path / "gpu", device="cuda", resources=resources,
                          gpus={"devices": [0, 2], "jobs_per_gpu": 3})
    assert gpu and all("-m gmr.gpu_slots --jobs-per-gpu 3 --devices 0,2 -- " in c for c in gpu)


def test_workflow_refuses_a_gpus_section_no_job_uses(tmp_path):
    cfg = yaml.safe_load((ROOT / ".test" / "config.yaml").read_text())
    cfg["gpus"] = {"jobs_per_gpu": 2}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run(["timeout", "-s", "INT", "300", sys.executable, "-m", "snakemake", "--snakefile",
                           str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(config),
                           "--dry-run"], capture_output=True, text=True)
    assert proc.returncode != 0 and "config key gpus: set, but no job runs on a GPU" in proc.stdout + proc.stderr
