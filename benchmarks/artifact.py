"""Size and load time of a resnet50-sized prior repository.

Builds a prior of timm's resnet50 (random weights; the sizes and times do not depend on them) from a small
random batch at 64px, saves it, then measures:
  - each file's size;
  - `zoo.load` to first use (hashes verified, shapes checked, one layer read and solved);
  - full materialisation (every layer read and decomposed);
  - the same load with verify=False (no hashing);
each the median of several repetitions in one process.

    python benchmarks/artifact.py [--arch resnet50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import zoo
from zoo.layers import KronLayer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.arch).eval()
    x = torch.randn(32, 3, 64, 64)
    loader = [(x[i : i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 32, 16)]
    t0 = time.perf_counter()
    prior = zoo.build_prior(model, loader, progress=True, smoke=True, dataset="random-64px")
    build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = prior.save(str(Path(tmp) / "prior"), model=model)
        save = time.perf_counter() - t0
        curvature = prior.meta["curvature"]["seconds"]
        print(f"{args.arch}: build {build:.1f} s (curvature {curvature:.1f} s), save {save:.1f} s")
        total = 0
        for f in sorted(path.iterdir()):
            size = f.stat().st_size
            total += size
            print(f"  {f.name:<20s} {size / 2**20:10.1f} MiB")
        print(f"  {'total':<20s} {total / 2**20:10.1f} MiB")

        def first_use(verify: bool) -> float:
            t = time.perf_counter()
            _, p = zoo.load(str(path), verify=verify)
            name = next(n for n in p.layers if isinstance(p.layers[n], KronLayer))
            layer = p.layers[name]
            layer.precision.solve(torch.ones(layer.precision.shape, dtype=torch.float64))
            return time.perf_counter() - t

        def materialise() -> float:
            t = time.perf_counter()
            _, p = zoo.load(str(path))
            for layer in p.layers.values():
                if isinstance(layer, KronLayer):
                    layer.precision.decomposition()
            return time.perf_counter() - t

        rows = [
            ("zoo.load to first use (hashes verified)", [first_use(True) for _ in range(args.repeats)]),
            ("zoo.load to first use (verify=False)", [first_use(False) for _ in range(args.repeats)]),
            ("full materialisation (all layers decomposed)", [materialise() for _ in range(args.repeats)]),
        ]
        for name, times in rows:
            print(f"  {name:<48s} {statistics.median(times):8.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
