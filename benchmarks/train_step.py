"""Measured cost of one training step of every method, against its counted passes.

For each registered method (or --methods), on lenet_plus with MNIST-shaped random data and on a
CIFAR-shaped small net (tiny_cnn, 3x32x32), this measures the median wall time of one full training
step (method + backward + SGD step) after warm-up, with all methods measured interleaved in the same
run so that a busy machine slows them alike. It counts sample-passes with `gmr.cost.PassCounter`
(forward and backward through the model, averaged: what the literature calls "passes") and reports

    efficiency = step time / (passes per sample x clean step time)

where the clean step is the `standard` method's (1 pass). Around 1 means the method costs what its
passes say; well above 1 points to wasted work (extra copies, passes or syncs). Input-gradient passes
skip the weight gradients, so attack-heavy methods can sit below 1.

    python benchmarks/train_step.py [--batch-size 128] [--repeats 15] [--methods fgsm,gmr]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from gmr.cost import PassCounter, device_facts, pick_device, synchronize
from gmr.data import dataset_info
from gmr.methods import METHODS, make_options
from gmr.models import MODELS, create_model

TARGET = 1.10


@dataclass(frozen=True)
class Setting:
    label: str
    model: str
    dataset: str          # gives the input shape, class count and the method defaults (paper values)


SETTINGS = [Setting("lenet_plus / MNIST 1x28x28", "lenet_plus", "mnist"),
            Setting("tiny_cnn / CIFAR 3x32x32", "tiny_cnn", "cifar10")]


class Runner:
    """One method's model, optimiser and fixed batch; `step()` is one full training step."""

    def __init__(self, method: str, setting: Setting, batch_size: int, device: torch.device, width: int):
        torch.manual_seed(0)
        info = dataset_info(setting.dataset)
        if setting.model == "tiny_cnn":
            self.model = MODELS.get("tiny_cnn")(in_channels=info.input_shape[0], num_classes=info.num_classes,
                                                mean=info.mean, std=info.std, width=width)
        else:
            self.model = create_model(setting.model, setting.dataset)
        self.model.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.rand(batch_size, *info.input_shape, generator=gen).to(device)
        self.y = torch.randint(0, info.num_classes, (batch_size,), generator=gen).to(device)
        self.fn = METHODS.get(method).fn
        self.options = make_options(method, setting.dataset)
        self.eps = info.default_eps
        self.device = device
        self.times: list[float] = []

    def step(self) -> None:
        out = self.fn(self.model, self.x, self.y, self.eps, self.options)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()

    def passes_per_sample(self) -> tuple[float, float, float]:
        counter = PassCounter(self.model)
        try:
            self.step()
        finally:
            counter.remove()
        b = len(self.x)
        return counter.count.forward / b, counter.count.backward / b, counter.count.passes / b

    def timed_step(self) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)


def measure(setting: Setting, methods: list[str], batch_size: int, repeats: int, warmup: int,
            device: torch.device, width: int) -> list[dict]:
    names = list(dict.fromkeys(["standard", *methods]))  # the clean step is the reference
    runners = {m: Runner(m, setting, batch_size, device, width) for m in names}
    counts = {m: r.passes_per_sample() for m, r in runners.items()}
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no fixed neighbour
        for m in order:
            runners[m].timed_step()
    clean = statistics.median(runners["standard"].times)
    rows = []
    for m in names:
        if m not in methods:
            continue
        t = statistics.median(runners[m].times)
        fwd, bwd, passes = counts[m]
        rows.append(dict(setting=setting.label, method=m, ms=1e3 * t, passes=passes, forward=fwd,
                         backward=bwd, efficiency=t / (passes * clean), img_s=batch_size / t))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--methods", help="comma-separated methods (default: all registered)")
    p.add_argument("--settings", default="mnist,cifar", help="mnist (lenet_plus), cifar (tiny_cnn) or both")
    p.add_argument("--cifar-width", type=int, default=32, help="tiny_cnn width for the CIFAR-shaped net")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)

    methods = [m.strip() for m in (args.methods or ",".join(METHODS.names())).split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid methods: {', '.join(METHODS.names())}")
    if args.batch_size <= 0 or args.repeats <= 0 or args.warmup < 0:
        p.error("--batch-size and --repeats must be positive, --warmup non-negative")
    chosen = {s.strip() for s in args.settings.split(",")}
    settings = [s for s, key in zip(SETTINGS, ("mnist", "cifar")) if key in chosen]
    if not settings:
        p.error("--settings takes mnist, cifar or mnist,cifar")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    facts = device_facts(device)
    print(f"# {facts['device_name']} ({facts['device']}), torch {facts['torch_version']}, "
          f"{facts['threads']} threads, batch {args.batch_size}, {args.repeats} repeats, "
          f"{args.warmup} warm-up; CIFAR-shaped net: tiny_cnn width {args.cifar_width}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        print("# warning: the machine is oversubscribed; multi-threaded small-batch steps (sat_r1's "
              "one-sample I-FGSM) slow down far more than large ones: try --threads 1", flush=True)

    header = f"{'setting':<28} {'method':<10} {'step ms':>9} {'img/s':>8} {'fwd':>6} {'bwd':>6} " \
             f"{'passes':>7} {'efficiency':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for setting in settings:
        for row in measure(setting, methods, args.batch_size, args.repeats, args.warmup, device,
                           args.cifar_width):
            flag = "" if row["efficiency"] <= TARGET else "  > target"
            worst = max(worst, row["efficiency"])
            print(f"{row['setting']:<28} {row['method']:<10} {row['ms']:>9.1f} {row['img_s']:>8.0f} "
                  f"{row['forward']:>6.3g} {row['backward']:>6.3g} {row['passes']:>7.3g} "
                  f"{row['efficiency']:>10.2f}{flag}", flush=True)
    print(f"# efficiency = step time / (passes x clean step time); target <= {TARGET:.2f}; "
          f"worst {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
