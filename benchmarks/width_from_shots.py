"""Q's width T chosen on the training shots themselves, against the default rule (measured, not adopted).

For each network, shot count and seed, one `zoo.finetune` with defaults (its T chosen by the training-likelihood
rule), then T on a grid chosen by:
- **Laplace leave-one-out**: each shot's glm logits without its own curvature term in the precision,
  V₋ᵢ = (Vᵢ⁻¹ − Hᵢ)⁻¹ (Hᵢ the softmax Hessian at the network, Vᵢ the logit covariance of Q estimated from
  `--loo-samples` antithetic draws), and its mean moved by one Newton step, f₋ᵢ = fᵢ + V₋ᵢ(pᵢ − yᵢ); T minimises
  the shots' leave-one-out NLL. No refit: it costs the draws on the shots.
- **k-fold cross-validation**: one default fit per fold on the other folds' shots (transfer.cv_folds: stratified
  by class), its glm predictive scored on the held-out fold at every T (relative to that fit's own T); T
  minimises the summed NLL. It costs k more fits.
- **oracle**: the T with the lowest NLL on the test images themselves (a bound on what any rule could gain).

Each T is applied to the full-data posterior by rescaling its covariance, and scored on the test images and the
upstream digits as OOD. Prints per-seed figures and each rule − default, mean ± SE over seeds.

    python benchmarks/width_from_shots.py --networks efficientnet_gn --shots 20 --seeds 5
    python benchmarks/width_from_shots.py --networks resnet10t --shots 5 --seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import class_balanced_batches, downstream
from transfer import EPOCHS, LR, cv_folds, fresh, subsample
from transfer_task import NETWORKS, Upstream, upstream

import zoo
from zoo import metrics
from zoo.calibration import gather_batches, predictive_probs
from zoo.predictive import PinnedHeadWarning, Predictor, entropy

GRID = (30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3)
KEYS = ("accuracy", "nll", "ece", "auroc")


def default_fit(up: Upstream, seed: int, batches: list[tuple[Tensor, Tensor]]) -> tuple[zoo.Posterior, float]:
    model, prior = fresh(up, seed)
    post = zoo.finetune(model, prior, batches, epochs=EPOCHS, lr=LR, progress=False,
                        generator=torch.Generator().manual_seed(seed))
    return post, float(post.meta["width"]["selection"]["T"])


def glm_parts(post: zoo.Posterior, x: Tensor, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinnedHeadWarning)
        return Predictor(post, mode="glm", samples=samples, seed=seed, antithetic=True).linear_parts(x)


def leave_one_out_nll(
    f: Tensor, dev: Tensor, y: Tensor, t_fit: float, samples: int,
) -> tuple[dict[float, float], float]:
    """{T: the shots' Laplace leave-one-out NLL}, and the largest eigenvalue of HᵢVᵢ (below 1 where it is defined)."""
    f, dev = f.double(), dev.double()
    centred = dev - dev.mean(0, keepdim=True)
    v = torch.einsum("snc,snd->ncd", centred, centred) / (dev.shape[0] - 1) / t_fit  # Vᵢ of Q at T = 1
    p = torch.softmax(f, -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    eye = torch.eye(f.shape[1], dtype=torch.float64)
    hv = h @ v
    largest = torch.linalg.eigvals(hv).real.max().item()
    v_loo = torch.linalg.solve((eye - hv).mT, v.mT).mT  # V (I − HV)⁻¹ = (V⁻¹ − H)⁻¹
    v_loo = 0.5 * (v_loo + v_loo.mT)
    f_loo = f + (v_loo @ (p - torch.nn.functional.one_hot(y, f.shape[1]).double())[..., None])[..., 0]
    values, vectors = torch.linalg.eigh(v_loo)
    if bool((values <= 0).any()):
        raise RuntimeError("a leave-one-out covariance is not positive definite: HᵢVᵢ has an eigenvalue ≥ 1")
    root = vectors * values.sqrt()[:, None, :]
    z = torch.randn(samples // 2, *f.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.cat([z, -z])
    out = {}
    for t in GRID:
        probs = torch.softmax(f_loo[None] + math.sqrt(t) * torch.einsum("ncd,snd->snc", root, z), -1).mean(0)
        out[t] = metrics.nll(probs, y)
    return out, largest


def cross_validated_nll(up: Upstream, seed: int, x: Tensor, y: Tensor, k: int, samples: int) -> dict[float, float]:
    fold = cv_folds(y, k, 500 + seed)  # the MAP baseline's stratified folds, drawn apart from its seeds
    total = dict.fromkeys(GRID, 0.0)
    for f in range(k):
        post, t_fit = default_fit(up, seed, class_balanced_batches(x[fold != f], y[fold != f]))
        mean, dev = glm_parts(post, x[fold == f], samples, 11)
        for t in GRID:
            total[t] += metrics.nll_per_example(predictive_probs(mean, dev, t_fit / t), y[fold == f]).sum().item()
    return total


def run_seed(up: Upstream, shots: int, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    train, x, y = downstream(shots, seed)
    keep = subsample(x.shape[0], args.max_test, 10_000 + seed)
    x, y = x[keep], y[keep]
    xt, yt = gather_batches(train, "the task has no training batches")
    post, t_default = default_fit(up, seed, train)
    test_mean, test_dev = glm_parts(post, torch.cat([x, up.ood_images]), args.samples, 8)
    n = x.shape[0]
    scored = {}
    for t in GRID:
        probs = predictive_probs(test_mean, test_dev, t_default / t)
        scored[t] = {"T": t, "accuracy": metrics.accuracy(probs[:n], y), "nll": metrics.nll(probs[:n], y),
                     "ece": metrics.ece(probs[:n], y),
                     "auroc": metrics.ood_auroc(entropy(probs[:n]), entropy(probs[n:]))}
    chosen = {"default": t_default, "oracle": min(GRID, key=lambda t: scored[t]["nll"])}
    loo, largest = leave_one_out_nll(*glm_parts(post, xt, args.loo_samples, 7), yt, t_default, args.loo_samples)
    chosen["leave-one-out"] = min(GRID, key=loo.__getitem__)
    if args.folds > 1:
        cv = cross_validated_nll(up, seed, xt, yt, args.folds, args.samples)
        chosen[f"{args.folds}-fold CV"] = min(GRID, key=cv.__getitem__)
    print(f"  seed {seed}: max eig HᵢVᵢ {largest:.3f}; " + "; ".join(
        f"{rule} T={t:g} " + " / ".join(f"{scored[t][key]:.3f}" for key in KEYS) for rule, t in chosen.items()),
        flush=True)
    return {rule: scored[t] for rule, t in chosen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["efficientnet_gn", "resnet10t"], choices=sorted(NETWORKS))
    parser.add_argument("--shots", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=2, help="k of the cross-validation (1: skip it)")
    parser.add_argument("--samples", type=int, default=64, help="glm draws scored on test and held-out folds")
    parser.add_argument("--loo-samples", type=int, default=256, help="glm draws that estimate each shot's Vᵢ")
    parser.add_argument("--max-test", type=int, default=400)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; T grid {GRID}; figures accuracy / NLL / ECE / AUROC (entropy)")
    for network in args.networks:
        up = upstream(network)
        for shots in args.shots:
            print(f"\n{network}, {shots} shots per class")
            t0 = time.perf_counter()
            runs = [run_seed(up, shots, seed, args) for seed in range(args.seeds)]
            for rule in runs[0]:
                if rule == "default":
                    continue
                deltas = []
                for key in KEYS:
                    d = [r[rule][key] - r["default"][key] for r in runs]
                    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
                    deltas.append(f"{key} {statistics.mean(d):+.3f} ± {se:.3f}")
                print(f"{rule} − default: " + ", ".join(deltas) + "; T per seed "
                      + ", ".join(f"{r[rule]['T']:g}" for r in runs))
            print(f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
