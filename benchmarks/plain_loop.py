"""The reference for speed: a plain fp32 PyTorch loop of the kind the official repositories use.

Written as val-iisc/SAT-Rx trains (tools/reg_utils.py, train_reg2 and GenerateAdvSamples_sat_r2; FGSM
as tools/attacks.py FGSM_Attack_step): the attack in eval mode with a `loss.backward()` on an input that
requires grad (so it also fills the weight gradients, which `optimizer.zero_grad()` then discards), the
update in train mode, SGD. Unlike that code (numpy noise on the host, a DataLoader), the data and the noise
stay on the device, so the comparison measures the training step and not data loading. Same model, batch
and data as `benchmarks/train_step.py`, which times these steps beside the suite's own.

    python benchmarks/plain_loop.py [--method gmr] [--epochs 1] [--n-train 10000] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from gmr.data import DataSpec, Split, load_split
from gmr.models import create_model


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return x.grad


def fgsm_step(model, optimizer, x, y, eps: float, alpha: float, lam: float) -> torch.Tensor:
    """FGSM-AT: x + eps sign(grad), clipped; CE on it."""
    model.eval()
    x_adv = (x + eps * _input_grad(model, x, y).sign()).clamp(0, 1)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss


def gmr_step(model, optimizer, x, y, eps: float, alpha: float, lam: float) -> torch.Tensor:
    """GMR (SAT-R2): gradients at [x; x + alpha sign(N(0, I))], full eps steps from both, clipped; CE on the
    FGSM half + lam * squared logit distance between the halves."""
    model.eval()
    both = torch.cat([x, x + alpha * torch.randn_like(x).sign()])
    adv = (both + eps * _input_grad(model, both, torch.cat([y, y])).sign()).clamp(0, 1)
    model.train()
    optimizer.zero_grad()
    out = model(adv)
    b = len(x)
    loss = F.cross_entropy(out[:b], y) + lam * (out[:b] - out[b:]).pow(2).sum(1).mean()
    loss.backward()
    optimizer.step()
    return loss


def standard_step(model, optimizer, x, y, eps: float, alpha: float, lam: float) -> torch.Tensor:
    """Clean training: the unit every method's cost is measured in."""
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


STEPS = {"standard": standard_step, "fgsm": fgsm_step, "gmr": gmr_step}


def train_epoch(step, model, optimizer, x, y, batch_size: int, eps: float, alpha: float, lam: float) -> float:
    """One epoch over (x, y) in shuffled batches; returns its seconds."""
    start = time.perf_counter()
    order = torch.randperm(len(x), device=x.device)
    for lo in range(0, len(x), batch_size):
        idx = order[lo:lo + batch_size]
        step(model, optimizer, x[idx], y[idx], eps, alpha, lam)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="gmr", choices=sorted(STEPS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x, y = (t.to(device) for t in load_split(DataSpec("mnist", args.data_root, n_train=args.n_train), Split.TRAIN))
    model = create_model("lenet_plus", "mnist").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.epochs):
        seconds = train_epoch(STEPS[args.method], model, optimizer, x, y, args.batch_size, 0.3, 0.01, 5.0)
        print(f"plain {args.method} epoch {epoch + 1}: {seconds:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
