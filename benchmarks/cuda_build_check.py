"""CUDA check of the builder and the predictor, as one short script for a GPU machine.

1. `zoo build --dry-run` for resnet50.a1_in1k (random weights, the recipe's batch 128 at 224px) on a synthetic
   ImageFolder: the measured throughput and the extrapolated ImageNet time and memory.
2. The loop on CUDA with a small model: build_prior → save → zoo.load with a new head → (when available)
   finetune, certificate and predict — checking the results are finite and well-formed.

    python benchmarks/cuda_build_check.py [--images 400]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

import zoo
from builders.pipeline import BuildOptions, dry_run


def synthetic_imagefolder(root: Path, images: int, classes: int = 4, size: int = 256) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    print(f"torch {torch.__version__}, timm {timm.__version__} on {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_imagefolder(Path(tmp) / "data", args.images)
        estimate = dry_run(BuildOptions(model="resnet50.a1_in1k", data=data, weights="random", device="cuda",
                                        num_classes=1000, workers=8, progress=False, dry_run_batches=2))
        print(estimate.report())

        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=4).cuda().eval()
        x = torch.randn(64, 3, 64, 64, device="cuda")
        y = torch.randint(0, 4, (64,), device="cuda")
        loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 64, 32)]
        t0 = time.perf_counter()
        prior = zoo.build_prior(model, loader, progress=False, smoke=True, dataset="random-64px")
        bound = prior.meta["bound"]["value"]
        print(f"build_prior resnet18 on CUDA: {time.perf_counter() - t0:.1f} s, bound {bound:.4f}")
        path = prior.save(str(Path(tmp) / "prior"), model=model.cpu())
        loaded_model, loaded = zoo.load(str(path), num_classes=3)
        kl = loaded.kl(loaded).item()
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"saved {size:.1f} MiB, reloaded: KL(self‖self) = {kl:.2e}")
        loaded_model = loaded_model.cuda()
        q = loaded.quadratic(loaded_model).item()
        print(f"quadratic at the loaded weights on CUDA: {q:.4g} (head only, N(0, λ⁻¹I))")
        assert np.isfinite(q) and abs(kl) < 1e-9


if __name__ == "__main__":
    main()
