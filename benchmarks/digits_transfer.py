"""Digits transfer (sklearn digits 0–4 → 5–9): MAP vs isotropic-prior vs learned-prior posteriors, measured.

Prints, for 1, 5 and 20 shots per class: accuracy, NLL and ECE on every held-out downstream image, the rigorous
Gibbs 0-1 certificate (δ = 0.05) and the paper's Taylor bound. MAP rows predict with the mean weights; posterior
rows with the Monte Carlo predictive. Every certificate is of the Laplace posterior around the row's mean against
the row's prior. Run: .venv/bin/python benchmarks/digits_transfer.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import CLASSES, HEAD_LAMBDA, downstream, ece, upstream_prior_dir

import zoo
from zoo.tuning import finetune, isotropic_prior

ROWS = (("MAP + weight decay (N(θ*, λ⁻¹I))", "map", True), ("isotropic-prior posterior", "catoni", True),
        ("learned-prior posterior", "catoni", False))


def measure(shots: int, seed: int, objective: str, isotropic: bool) -> dict[str, float]:
    train, x_test, y_test = downstream(shots, seed)
    model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True, lam=HEAD_LAMBDA)
    if isotropic:
        prior = isotropic_prior(prior)
    post = finetune(model, prior, train, objective, epochs=30, lr=1e-2, progress=False,
                    generator=torch.Generator().manual_seed(seed))
    if objective == "map":
        with torch.no_grad():
            probs = F.softmax(model(x_test).double(), -1)
    else:
        probs = post.predict(x_test, samples=32, generator=torch.Generator().manual_seed(seed)).probs.double()
    cert = post.certificate(train, samples=200, generator=torch.Generator().manual_seed(1000 + seed))
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), y_test).item()
    acc = (probs.argmax(-1) == y_test).double().mean().item()
    return {"acc": acc, "nll": nll, "ece": ece(probs, y_test), "cert": cert.bound, "taylor": cert.taylor_bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 20])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'shots':>5}  {'row':<36} {'acc':>6} {'NLL':>6} {'ECE':>6} {'certificate':>11} {'Taylor':>7}")
    for shots in args.shots:
        for label, objective, iso in ROWS:
            results = [measure(shots, seed, objective, iso) for seed in range(args.seeds)]
            mean = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
            print(f"{shots:>5}  {label:<36} {mean['acc']:6.3f} {mean['nll']:6.3f} {mean['ece']:6.3f} "
                  f"{mean['cert']:11.3f} {mean['taylor']:7.3f}", flush=True)
    print(f"(means over {args.seeds} seeds; δ = 0.05; certificate from 200 weight draws)")


if __name__ == "__main__":
    main()
