"""Measured cost of one training step of every method, against its counted passes and a plain loop.

For each registered method (or --methods) and each --precision, on lenet_plus with MNIST-shaped random
data, on a CIFAR-shaped small net (tiny_cnn, 3x32x32) and (--settings preact) on PreActResNet-18, this
measures the median wall time of one full training step as `gmr train` runs it (the method under the
precision's autocast, backward through the gradient scaler, SGD step; the model in the layout
gmr/precision.py picks) after warm-up. Every runner is timed interleaved with the others in the same
run, so that a busy machine slows them alike. It counts sample-passes with `gmr.cost.PassCounter`
(forward and backward through the model, averaged: what the literature calls "passes") and reports

    efficiency = step time / (passes per sample x clean step time)

where the clean step is the `standard` method's (1 pass) in the same precision. Around 1 means the method
costs what its passes say; well above 1 points to wasted work (extra copies, passes or syncs).
Input-gradient passes skip the weight gradients, so attack-heavy methods can sit below 1.

The `x plain` column is the plain fp32 loop's step time (benchmarks/plain_loop.py: the loop of the
official repositories, same model, batch and data) divided by ours: above 1 means ours is faster.

    python benchmarks/train_step.py [--batch-size 128] [--repeats 15] [--methods fgsm,gmr]
                                    [--precision fp32,bf16] [--settings mnist,cifar,preact]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plain_loop.py beside this file

import plain_loop  # noqa: E402
from gmr import precision as prec  # noqa: E402
from gmr.cost import PassCounter, device_facts, pick_device, synchronize  # noqa: E402
from gmr.data import dataset_info  # noqa: E402
from gmr.methods import METHODS, make_options  # noqa: E402
from gmr.models import MODELS, create_model  # noqa: E402

TARGET = 1.10           # efficiency at most this
PLAIN_TARGET = 1.8      # FGSM-AT and GMR at least this much faster than the plain loop (bf16 on these CPUs)
LAYOUTS = ("auto", "channels_last", "contiguous")


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    model: str
    dataset: str          # gives the input shape, class count and the method defaults (paper values)


SETTINGS = [Setting("mnist", "lenet_plus / MNIST 1x28x28", "lenet_plus", "mnist"),
            Setting("cifar", "tiny_cnn / CIFAR 3x32x32", "tiny_cnn", "cifar10"),
            Setting("preact", "preact_resnet18 / CIFAR 3x32x32", "preact_resnet18", "cifar10")]


@dataclass(frozen=True)
class Options:
    batch_size: int
    device: torch.device
    width: int            # tiny_cnn width
    layout: str           # auto (the trainer's rule), channels_last or contiguous
    compile: bool


def _model(setting: Setting, o: Options) -> torch.nn.Module:
    torch.manual_seed(0)
    info = dataset_info(setting.dataset)
    if setting.model == "tiny_cnn":
        return MODELS.get("tiny_cnn")(in_channels=info.input_shape[0], num_classes=info.num_classes,
                                      mean=info.mean, std=info.std, width=o.width)
    return create_model(setting.model, setting.dataset)


class Runner:
    """One method's model, optimiser and fixed batch; `step()` is one full training step. With
    `plain=True` the step is benchmarks/plain_loop.py's (fp32, default layout)."""

    def __init__(self, method: str, setting: Setting, precision: str, o: Options, plain: bool = False):
        info = dataset_info(setting.dataset)
        self.model = _model(setting, o).to(o.device).train()
        self.precision, self.device, self.plain = precision, o.device, plain
        layout = o.layout if o.layout != "auto" else (
            "channels_last" if prec.channels_last(precision, o.device, self.model) else "contiguous")
        if layout == "channels_last" and not plain:
            self.model = self.model.to(memory_format=torch.channels_last)
        if o.compile and not plain:
            self.model.compile()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.scaler = prec.grad_scaler(precision, o.device)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.rand(o.batch_size, *info.input_shape, generator=gen).to(o.device)
        self.y = torch.randint(0, info.num_classes, (o.batch_size,), generator=gen).to(o.device)
        self.fn = METHODS.get(method).fn
        self.options = make_options(method, setting.dataset)
        self.eps = info.default_eps
        self.plain_step = plain_loop.STEPS[method] if plain else None
        self.times: list[float] = []

    def step(self) -> None:
        if self.plain_step is not None:
            o = self.options
            self.plain_step(self.model, self.optimizer, self.x, self.y, self.eps, getattr(o, "alpha", 0.0),
                            getattr(o, "lambda_", 0.0))
            return
        with prec.autocast(self.precision, self.device):
            out = self.fn(self.model, self.x, self.y, self.eps, self.options)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

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

    def median(self) -> float:
        return statistics.median(self.times)


def _runners(setting: Setting, methods: list[str], precisions: list[str], o: Options,
             plain: bool) -> dict[tuple[str, str], Runner]:
    """Ours for every (method, precision), the clean step of every precision, and the plain loop's
    step (key ("plain", method)) for each method it has."""
    names = list(dict.fromkeys(["standard", *methods]))  # the clean step is the reference
    runners = {(m, p): Runner(m, setting, p, o) for p in precisions for m in names}
    if plain:
        runners.update({("plain", m): Runner(m, setting, "fp32", o, plain=True)
                        for m in names if m in plain_loop.STEPS})
    return runners


def measure(setting: Setting, methods: list[str], precisions: list[str], repeats: int, warmup: int,
            o: Options, plain: bool = True) -> list[dict]:
    runners = _runners(setting, methods, precisions, o, plain)
    counts = {k: r.passes_per_sample() for k, r in runners.items()}
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    keys = list(runners)
    for rep in range(repeats):
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:  # rotate: no fixed neighbour
            runners[k].timed_step()
    rows = []
    for p in precisions:
        clean = runners[("standard", p)].median()
        for m in methods:
            t = runners[(m, p)].median()
            fwd, bwd, passes = counts[(m, p)]
            plain_t = runners[("plain", m)].median() if ("plain", m) in runners else None
            rows.append(dict(setting=setting.label, method=m, precision=p, ms=1e3 * t, passes=passes,
                             forward=fwd, backward=bwd, efficiency=t / (passes * clean),
                             img_s=o.batch_size / t, plain_ms=None if plain_t is None else 1e3 * plain_t,
                             vs_plain=None if plain_t is None else plain_t / t))
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--methods", help="comma-separated methods (default: all registered)")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated precisions of our step: fp32, bf16, fp16, auto (the plain loop: fp32)")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="memory layout of our models (auto: gmr/precision.py's rule, as `gmr train`)")
    p.add_argument("--compile", action="store_true", help="torch.compile our models (model.compile())")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain-loop column")
    p.add_argument("--settings", default="mnist,cifar", help="comma-separated: mnist (lenet_plus), cifar "
                                                             "(tiny_cnn), preact (preact_resnet18)")
    p.add_argument("--cifar-width", type=int, default=32, help="tiny_cnn width for the CIFAR-shaped net")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in (args.methods or ",".join(METHODS.names())).split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid methods: {', '.join(METHODS.names())}")
    if args.batch_size <= 0 or args.repeats <= 0 or args.warmup < 0:
        p.error("--batch-size and --repeats must be positive, --warmup non-negative")
    chosen = {s.strip() for s in args.settings.split(",")}
    args.settings = [s for s in SETTINGS if s.key in chosen]
    if not args.settings or chosen - {s.key for s in SETTINGS}:
        p.error(f"--settings takes a comma-separated list of {', '.join(s.key for s in SETTINGS)}")
    try:
        args.device = pick_device(args.device)
        args.precision = list(dict.fromkeys(prec.resolve(x.strip(), args.device)
                                            for x in args.precision.split(",") if x.strip()))
    except ValueError as err:
        p.error(str(err))
    return args


def _print_rows(rows: list[dict]) -> tuple[float, float]:
    """The table; returns (worst efficiency, worst plain-loop speed-up of FGSM-AT and GMR)."""
    worst, slowest = 0.0, float("inf")
    for row in rows:
        flag = "" if row["efficiency"] <= TARGET else "  efficiency > target"
        worst = max(worst, row["efficiency"])
        plain = "" if row["plain_ms"] is None else f"{row['plain_ms']:>9.1f} {row['vs_plain']:>8.2f}"
        if row["method"] in ("fgsm", "gmr") and row["vs_plain"] is not None:
            slowest = min(slowest, row["vs_plain"])
        print(f"{row['setting']:<32} {row['method']:<10} {row['precision']:<5} {row['ms']:>9.1f} "
              f"{row['img_s']:>8.0f} {row['forward']:>6.3g} {row['backward']:>6.3g} {row['passes']:>7.3g} "
              f"{row['efficiency']:>10.2f} {plain:>18}{flag}", flush=True)
    return worst, slowest


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = device_facts(args.device)
    print(f"# {facts['device_name']} ({facts['device']}), torch {facts['torch_version']}, "
          f"{facts['threads']} threads, batch {args.batch_size}, {args.repeats} repeats, {args.warmup} warm-up; "
          f"precision {','.join(args.precision)}, layout {args.layout}{', compiled' if args.compile else ''}; "
          f"tiny_cnn width {args.cifar_width}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
          flush=True)
    if args.device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        print("# warning: the machine is oversubscribed; multi-threaded small-batch steps (sat_r1's "
              "one-sample I-FGSM) slow down far more than large ones: try --threads 1", flush=True)
    header = f"{'setting':<32} {'method':<10} {'prec':<5} {'step ms':>9} {'img/s':>8} {'fwd':>6} {'bwd':>6} " \
             f"{'passes':>7} {'efficiency':>10} {'plain ms':>9} {'x plain':>8}"
    print(header)
    print("-" * len(header))
    o = Options(args.batch_size, args.device, args.cifar_width, args.layout, args.compile)
    worst, slowest = 0.0, float("inf")
    for setting in args.settings:
        rows = measure(setting, args.methods, args.precision, args.repeats, args.warmup, o, not args.no_plain)
        w, s = _print_rows(rows)
        worst, slowest = max(worst, w), min(slowest, s)
    print(f"# efficiency = step time / (passes x clean step time); target <= {TARGET:.2f}; worst {worst:.2f}")
    if slowest != float("inf"):
        print(f"# x plain = plain fp32 loop step time / ours; target >= {PLAIN_TARGET} for fgsm and gmr "
              f"(bf16 on CPUs with native bf16); lowest {slowest:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
