"""CUDA check of zoo.curvature.kfac (≤ 3 min on an H100): matches the CPU result, and what it costs.

    .venv/bin/python benchmarks/cuda_curvature_check.py [--n 512] [--batch 64]

For resnet18 and resnet50 at 64px:
1. on one small batch (empirical Fisher, so no sampling differs), the CUDA factors match the CPU ones
   (max relative Frobenius error over all blocks, fp32; TF32 disabled so the comparison is meaningful);
2. the ratio of the K-FAC pass (MC, expand and reduce) to a plain forward+backward over N images,
   median of 3, with TF32 off (default fp32 matmuls).
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch
import torch.nn.functional as F
from timing import cuda_median_time

from zoo.curvature import KronBlock, kfac

TOLERANCE = 1e-4


def block_error(a: dict, b: dict) -> float:
    worst = 0.0
    for name, block in a.items():
        other = b[name]
        pairs = ([(block.A, other.A), (block.G, other.G)] if isinstance(block, KronBlock)
                 else [(v, other.diagonal[k]) for k, v in block.diagonal.items()])
        for x, y in pairs:
            x, y = x.double().cpu(), y.double().cpu()
            worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, N={args.n}, batch {args.batch}, 64px")
    ok = True
    for arch in ["resnet18", "resnet50"]:
        torch.manual_seed(0)
        cpu_model = timm.create_model(arch, num_classes=100).eval()
        gpu_model = copy.deepcopy(cpu_model).cuda()
        g = torch.Generator().manual_seed(0)
        small = [(torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 100, (8,), generator=g))]
        err = block_error(kfac(gpu_model, small, "empirical", progress=False),
                          kfac(cpu_model, small, "empirical", progress=False))
        ok &= err <= TOLERANCE
        print(f"{arch}: CUDA vs CPU max relative factor error {err:.2e} ({'ok' if err <= TOLERANCE else 'FAIL'})")
        data = [(torch.randn(args.batch, 3, 64, 64, generator=g).cuda(),
                 torch.randint(0, 100, (args.batch,), generator=g).cuda()) for _ in range(args.n // args.batch)]

        def plain(model: torch.nn.Module = gpu_model, data: list = data) -> None:
            for x, y in data:
                F.cross_entropy(model(x), y, reduction="sum").backward()
            model.zero_grad(set_to_none=True)

        base = cuda_median_time(plain)
        expand = cuda_median_time(lambda model=gpu_model, data=data: kfac(model, data, progress=False))
        reduce = cuda_median_time(lambda model=gpu_model, data=data: kfac(model, data, approx="reduce", progress=False))
        print(f"{arch}: plain {base:.3f}s, K-FAC expand {expand / base:.2f}x, reduce {reduce / base:.2f}x", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
