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
    parser.add_argument("--cpu", action="store_true", help="rehearse the loop on the CPU (no dry run)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --cpu to rehearse)")
        return
    dev = "cpu" if args.cpu else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, timm {timm.__version__} on {dev}")
    with tempfile.TemporaryDirectory() as tmp:
        if dev == "cuda":
            data = synthetic_imagefolder(Path(tmp) / "data", args.images)
            estimate = dry_run(BuildOptions(model="resnet50.a1_in1k", data=data, weights="random", device="cuda",
                                            num_classes=1000, workers=8, progress=False, dry_run_batches=2))
            print(estimate.report())

        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=4).to(dev).eval()
        x = torch.randn(64, 3, 64, 64, device=dev)
        y = torch.randint(0, 4, (64,), device=dev)
        loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 64, 32)]
        t0 = time.perf_counter()
        prior = zoo.build_prior(model, loader, progress=False, smoke=True, dataset="random-64px")
        bound = prior.meta["bound"]["value"]
        print(f"build_prior resnet18 on {dev}: {time.perf_counter() - t0:.1f} s, bound {bound:.4f}")
        path = prior.save(str(Path(tmp) / "prior"), model=model.cpu())
        loaded_model, loaded = zoo.load(str(path), num_classes=3)
        kl = loaded.kl(loaded).item()
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"saved {size:.1f} MiB, reloaded: KL(self‖self) = {kl:.2e}")
        cpu_draw = loaded.sample(loaded_model, torch.Generator().manual_seed(0))
        loaded_model = loaded_model.to(dev)
        dev_draw = loaded.sample(loaded_model, torch.Generator().manual_seed(0))
        worst = max(float((dev_draw[k].cpu() - v).norm() / v.norm()) for k, v in cpu_draw.items())
        print(f"a draw rotated on {dev} against the same noise on the CPU: max relative error {worst:.1e}")
        assert worst < 1e-4, worst
        q = loaded.quadratic(loaded_model).item()
        print(f"quadratic at the loaded weights on {dev}: {q:.4g} (head only, N(0, λ⁻¹I))")
        assert np.isfinite(q) and abs(kl) < 1e-9

        y3 = torch.randint(0, 3, (64,), device=dev)
        train = [(x[i : i + 32], y3[i : i + 32]) for i in range(0, 64, 32)]
        t0 = time.perf_counter()
        posterior = zoo.finetune(loaded_model, loaded, train, epochs=3, lr=1e-3, progress=False,
                                 generator=torch.Generator().manual_seed(0))
        t_ft = time.perf_counter() - t0
        t0 = time.perf_counter()
        cert = posterior.certificate(train, samples=20, generator=torch.Generator().manual_seed(0))
        t_cert = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = posterior.predict(x[:16], samples=32, generator=torch.Generator(device=dev).manual_seed(0))
        sync()
        t_pred = time.perf_counter() - t0
        print(f"finetune on {dev} {t_ft:.1f} s; certificate (20 draws) {t_cert:.1f} s: bound {cert.bound:.3f}, "
              f"KL {cert.kl:.3g}; predict 16 images × 32 samples {t_pred * 1e3:.0f} ms")
        total = pred.expected_entropy + pred.mutual_information
        assert torch.allclose(pred.probs.sum(-1), torch.ones(16, device=pred.probs.device), atol=1e-5)
        assert torch.allclose(total, pred.entropy, atol=1e-5) and bool((pred.mutual_information >= -1e-6).all())
        print("predict: probabilities sum to 1; entropy = aleatoric + epistemic; epistemic ≥ 0")


if __name__ == "__main__":
    main()
