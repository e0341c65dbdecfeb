"""Speed of the evaluation: AutoAttack through our adapter against a direct pyautoattack call, and the
images/s of every white-box attack.

AutoAttack: the same model, points, eps, version and seed, measured side by side and interleaved (the
order alternates each round, so a busy machine slows both alike); the ratio of the medians should stay
<= 1.05 (the adapter adds a clean pass, a log handler and the mode/gradient/RNG bookkeeping). Both
calls must give the same robust accuracy.

White-box attacks: each registered attack with the dataset's defaults (`gmr attacks`) on the same
points; images/s counts attacked images per second (all steps and restarts included).

The model is a trained run's (`--run DIR`) or, by default, LeNet+ with its seeded random initialisation
on the first n MNIST test images labelled by its own predictions (clean accuracy 100 %, so every point
goes through the whole first attack).

    python benchmarks/eval.py [--run DIR] [--n 64] [--repeats 3] [--version standard] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from gmr.autoattack_adapter import AutoAttackConfig, run_autoattack
from gmr.cost import device_facts, pick_device, synchronize
from gmr.data import DataSpec, Split, default_data_root, load_split
from gmr.evaluate import attack_correct, resolve_params, whitebox_attacks
from gmr.models import create_model
from gmr.runs import RunDir

TARGET = 1.05


def _setup(args, device):
    if args.run:
        model, meta, _ = RunDir(args.run).load_model("best", device)
        dataset, root, eps = meta["config"]["dataset"], Path(meta["config"]["data_root"]), meta["eps"]
        x, y = load_split(DataSpec(dataset, root, n_test=args.n), Split.TEST)
        return model, x, y, dataset, eps if args.eps is None else args.eps, f"run {args.run} (best)"
    torch.manual_seed(0)
    model = create_model("lenet_plus", "mnist").to(device).eval()
    x, _ = load_split(DataSpec("mnist", Path(args.data_root), n_test=args.n), Split.TEST)
    with torch.no_grad():
        y = model(x.to(device)).argmax(1).cpu()
    return model, x, y, "mnist", 0.3 if args.eps is None else args.eps, "lenet_plus, seeded init, self-labelled"


def _direct(model, x, y, eps, version, seed, batch_size, device):
    from pyautoattack import AutoAttack

    model.eval()
    adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device)
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return float((y_adv.cpu() == y).float().mean())


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a `gmr train` run directory (default: an untrained LeNet+)")
    p.add_argument("--n", type=int, default=64, help="first n test points (default 64)")
    p.add_argument("--eps", type=float, help="default: the run's eps, or 0.3")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (adapter, direct), interleaved")
    p.add_argument("--version", default="standard", help="AutoAttack version (default standard)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--data-root", default=str(default_data_root()))
    p.add_argument("--skip-whitebox", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, x, y, dataset, eps, what = _setup(args, device)
    facts = device_facts(device)
    print(f"# evaluation speed: {what}; {dataset}, n={len(x)}, eps={eps:g}, seed {args.seed}; "
          f"{facts['device']} ({facts['device_name']}), torch {facts['torch_version']}, {facts['threads']} threads")

    cfg = AutoAttackConfig(eps=eps, version=args.version, seed=args.seed, batch_size=args.batch_size, device=device)
    ours, direct, acc_ours, acc_direct = [], [], set(), set()
    for r in range(args.repeats):
        runs = [("adapter", lambda: run_autoattack(model, x, y, cfg).accuracy),
                ("direct", lambda: _direct(model, x, y, eps, args.version, args.seed, args.batch_size, device))]
        for name, fn in (runs if r % 2 == 0 else runs[::-1]):
            synchronize(device)
            seconds, acc = _timed(fn)
            synchronize(device)
            (ours if name == "adapter" else direct).append(seconds)
            (acc_ours if name == "adapter" else acc_direct).add(acc)
    ratio = statistics.median(ours) / statistics.median(direct)
    pairs = ", ".join(f"{a / b:.3f}" for a, b in zip(ours, direct))
    print(f"\n## AutoAttack {args.version}: adapter vs direct pyautoattack ({args.repeats} interleaved rounds)\n")
    print("| call | median s | runs (s) | robust accuracy |")
    print("|---|---|---|---|")
    print(f"| gmr.autoattack_adapter.run_autoattack | {statistics.median(ours):.2f} | "
          f"{', '.join(f'{s:.2f}' for s in ours)} | {', '.join(f'{a:.4f}' for a in sorted(acc_ours))} |")
    print(f"| pyautoattack.AutoAttack.run_standard_evaluation | {statistics.median(direct):.2f} | "
          f"{', '.join(f'{s:.2f}' for s in direct)} | {', '.join(f'{a:.4f}' for a in sorted(acc_direct))} |")
    verdict = "ok" if ratio <= TARGET else "SLOWER THAN TARGET"
    print(f"\nratio adapter/direct (medians) {ratio:.3f} (per round: {pairs}); target <= {TARGET}: {verdict}")
    same = acc_ours == acc_direct
    print(f"same robust accuracy: {same}")

    if not args.skip_whitebox:
        print(f"\n## white-box attacks ({dataset} defaults, n={len(x)}, batch {args.batch_size})\n")
        print("| attack | parameters | passes / image | seconds | images/s | gradient passes/s | accuracy |")
        print("|---|---|---|---|---|---|---|")
        for name in whitebox_attacks():
            params = resolve_params(name, dataset, {}, eps=eps)
            passes = params.get("steps", 1) * params.get("restarts", 1)
            synchronize(device)
            seconds, (ok, _) = _timed(lambda: attack_correct(model, x, y, name, eps, params, args.seed,
                                                             args.batch_size, device))
            synchronize(device)
            text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
            print(f"| {name} | {text or '-'} | {passes} | {seconds:.2f} | {len(x) / seconds:.1f} | "
                  f"{len(x) * passes / seconds:.0f} | {ok.mean():.4f} |")
    return 0 if (ratio <= TARGET and same) else 1


if __name__ == "__main__":
    sys.exit(main())
