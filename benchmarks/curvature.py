"""K-FAC pass cost relative to a plain forward+backward over the same data, for the five reference models.

    .venv/bin/python benchmarks/curvature.py [--archs resnet18 ...] [--n 256] [--batch 32] [--repeats 3]
                                             [--profile]

Prints, per architecture at 64px: our K-FAC-expand and K-FAC-reduce passes and curvlinops'
KFACLinearOperator (Linear/Conv2d parameters only, when it runs), each as the median over ``repeats``
runs (interleaved with the others) divided by the median plain pass. On a shared machine use
``--threads 1`` for stable ratios. For resnet18 also the relative factor error of the float32 pass
against a float64 reference, and with --profile where our pass spends its time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.curvature import KronBlock, kfac

ARCHS = {
    "resnet18": {},
    "resnet50": {},
    "efficientnet_lite0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 64},
}


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the repeats interleaved round-robin so that a change in the
    machine's load (shared CI runners) hits every function alike and the ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plain_pass(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> None:
    """What K-FAC is compared with: forward + backward of the summed NLL (eval mode, as in the K-FAC pass)."""
    for x, y in data:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def curvlinops_pass(model: nn.Module, data: list[tuple[Tensor, Tensor]], n: int) -> Callable[[], object] | None:
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        return None
    params = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1
              for p in m.parameters()]

    def run() -> object:
        op = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, data, fisher_type="mc",
                                check_deterministic=False, num_data=n, separate_weight_and_bias=False)
        op.compute_kronecker_factors()
        return op

    try:
        run()
    except Exception as err:  # curvlinops refuses some layers; report instead of failing the table
        print(f"    curvlinops failed: {type(err).__name__}: {str(err)[:100]}")
        return None
    return run


def factor_error(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> float:
    """Largest relative Frobenius error over all blocks of the fp32 pass against a float64 reference."""
    seed = torch.Generator().manual_seed(0)
    ours = kfac(model, data, progress=False, generator=seed)
    ref_model = copy.deepcopy(model).double()
    ref = kfac(ref_model, [(x.double(), y) for x, y in data], progress=False, dtype=torch.float64,
               generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for name, block in ours.items():
        pairs = ([(block.A, ref[name].A), (block.G, ref[name].G)] if isinstance(block, KronBlock)
                 else [(v, ref[name].diagonal[k]) for k, v in block.diagonal.items()])
        for a, b in pairs:
            worst = max(worst, float((a.double() - b).norm() / b.norm()))
    return worst


def profile(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        kfac(model, data, progress=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=list(ARCHS))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, batch {args.batch}, "
          f"{args.size}px, median of {args.repeats}")
    print(f"{'model':24s} {'plain s':>8s} {'expand':>8s} {'reduce':>8s} {'curvlinops':>10s}")
    for arch in args.archs:
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=1000, **ARCHS[arch]).eval()
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(args.batch, 3, args.size, args.size, generator=g),
                 torch.randint(0, 1000, (args.batch,), generator=g)) for _ in range(args.n // args.batch)]
        fns: dict[str, Callable[[], object]] = {
            "plain": lambda model=model, data=data: plain_pass(model, data),
            "expand": lambda model=model, data=data: kfac(model, data, progress=False),
            "reduce": lambda model=model, data=data: kfac(model, data, approx="reduce", progress=False),
        }
        theirs = curvlinops_pass(model, data, args.n)
        if theirs is not None:
            fns["curvlinops"] = theirs
        t = median_times(fns, args.repeats)
        base = t["plain"]
        cl = f"{t['curvlinops'] / base:9.2f}x" if theirs else f"{'n/a':>10s}"
        print(f"{arch:24s} {base:8.2f} {t['expand'] / base:7.2f}x {t['reduce'] / base:7.2f}x {cl}", flush=True)
        if arch == "resnet18":
            print(f"    resnet18 fp32 vs float64 reference: max relative factor error {factor_error(model, data):.2e}")
            if args.profile:
                profile(model, data)


if __name__ == "__main__":
    main()
