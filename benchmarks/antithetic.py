"""Antithetic against independent weight draws in the predictive: Monte Carlo error and predict time.

For each network, shot count and fit seed, one `zoo.finetune` with defaults; then, for several draw seeds, the
posterior's predictive of the digits transfer task's test and OOD images with `samples` independent draws and with
`samples / 2` antithetic pairs (each draw δ and its mirror −δ, one forward-mode product per pair):
- per-image Monte Carlo error: the standard deviation over draw seeds of each image's model average p̄, summed
  over classes and averaged over images;
- the spread over draw seeds of NLL, ECE and OOD AUROC (entropy and mutual information), and their mean
  difference from a reference predictive of `--reference` independent draws (a finite-sample NLL is biased up);
- predict time, the median over draw seeds, as antithetic ÷ independent.

    python benchmarks/antithetic.py --networks efficientnet_gn resnet10t --shots 5 20 --seeds 3 --draw-seeds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import downstream
from transfer import EPOCHS, LR, fresh, measure, subsample
from transfer_task import NETWORKS, upstream

import zoo
from zoo.predictive import PinnedHeadWarning, Predictor

KEYS = ("nll", "ece", "ood_auroc_entropy", "ood_auroc_mi")


def scores(pred: zoo.Prediction, y: Tensor) -> dict[str, float]:
    n = y.shape[0]
    mi = pred.mutual_information
    result = measure(pred.probs[:n], y, pred.probs[n:], mi=mi[:n], ood_mi=mi[n:])
    return {k: float(result[k]) for k in KEYS}


def timed(predictor: Predictor, images: Tensor) -> tuple[zoo.Prediction, float]:
    t0 = time.perf_counter()
    pred = predictor(images)
    return pred, time.perf_counter() - t0


def run_fit(network: str, shots: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    up = upstream(network)
    train, x, y = downstream(shots, seed)
    keep = subsample(x.shape[0], args.max_test, 10_000 + seed)
    x, y = x[keep], y[keep]
    images = torch.cat([x, up.ood_images])
    model, prior = fresh(up, seed)
    post = zoo.finetune(model, prior, train, epochs=EPOCHS, lr=LR, progress=False,
                        generator=torch.Generator().manual_seed(seed))
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinnedHeadWarning)
        for mode in args.modes:
            ref = Predictor(post, mode=mode, samples=args.reference, seed=99_999)(images)
            ref_scores = scores(ref, y)
            rows: dict[str, list[dict[str, float]]] = {"independent": [], "antithetic": []}
            probs: dict[str, list[Tensor]] = {"independent": [], "antithetic": []}
            for d in range(args.draw_seeds):
                for kind in ("independent", "antithetic") if d % 2 == 0 else ("antithetic", "independent"):
                    predictor = Predictor(post, mode=mode, samples=args.samples, seed=1_000 * seed + d,
                                          antithetic=kind == "antithetic")
                    pred, seconds = timed(predictor, images)
                    probs[kind].append(pred.probs)
                    rows[kind].append({**scores(pred, y), "predict_s": seconds})
            spread = {kind: torch.stack(p).std(0).sum(-1).mean().item() for kind, p in probs.items()}
            out[mode] = {"reference": ref_scores, "spread": spread, **rows}
    return out


def summarise(runs: list[dict[str, Any]], mode: str) -> dict[str, dict[str, float]]:
    """Per estimator: per-image spread of p̄, the spread over draw seeds (mean over fits), bias, median time."""
    table: dict[str, dict[str, float]] = {}
    for kind in ("independent", "antithetic"):
        entry: dict[str, float] = {"spread": statistics.mean(run[mode]["spread"][kind] for run in runs)}
        for key in KEYS:
            entry[key + "_sd"] = statistics.mean(statistics.stdev(r[key] for r in run[mode][kind]) for run in runs)
            entry[key + "_bias"] = statistics.mean(statistics.mean(r[key] for r in run[mode][kind])
                                                   - run[mode]["reference"][key] for run in runs)
            entry[key] = statistics.mean(r[key] for run in runs for r in run[mode][kind])
        entry["predict_s"] = statistics.median(r["predict_s"] for run in runs for r in run[mode][kind])
        table[kind] = entry
    table["reference"] = {key: statistics.mean(run[mode]["reference"][key] for run in runs) for key in KEYS}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["efficientnet_gn", "resnet10t"], choices=sorted(NETWORKS))
    parser.add_argument("--shots", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--seeds", type=int, default=3, help="fits per cell (seeds 0..n-1)")
    parser.add_argument("--draw-seeds", type=int, default=8, help="predictive draw seeds per fit")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--reference", type=int, default=256, help="independent draws of the reference predictive")
    parser.add_argument("--modes", nargs="+", default=["glm"], choices=["glm", "fast"])
    parser.add_argument("--max-test", type=int, default=400)
    args = parser.parse_args()
    if args.samples % 2 or args.draw_seeds < 2:
        raise SystemExit("--samples must be even and --draw-seeds at least 2")
    print(f"torch threads {torch.get_num_threads()}; {args.samples} draws against a {args.reference}-draw reference; "
          f"fits: seeds 0-{args.seeds - 1}; {args.draw_seeds} draw seeds each")
    for network in args.networks:
        for shots in args.shots:
            runs = []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                runs.append(run_fit(network, shots, seed, args))
                print(f"  ({network}, {shots} shots, seed {seed}: {time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
            for mode in args.modes:
                table = summarise(runs, mode)
                ind, anti, ref = table["independent"], table["antithetic"], table.pop("reference")
                print(f"\n{network}, {shots} shots per class, mode {mode}")
                print("| estimator | per-image sd of p̄ | sd NLL | sd ECE | sd AUROC-H | sd AUROC-MI | bias NLL "
                      "| bias AUROC-MI | predict s (median) |")
                print("|---|---|---|---|---|---|---|---|---|")
                for kind, entry in table.items():
                    print(f"| {kind} | {entry['spread']:.4f} | {entry['nll_sd']:.4f} | {entry['ece_sd']:.4f} | "
                          f"{entry['ood_auroc_entropy_sd']:.4f} | {entry['ood_auroc_mi_sd']:.4f} | "
                          f"{entry['nll_bias']:+.4f} | {entry['ood_auroc_mi_bias']:+.4f} | "
                          f"{entry['predict_s']:.2f} |")
                print("means over fits and draw seeds (NLL / ECE / AUROC-H / AUROC-MI): "
                      + "; ".join(f"{kind} " + " / ".join(f"{entry[k]:.4f}" for k in KEYS)
                                  for kind, entry in (("independent", ind), ("antithetic", anti),
                                                      (f"{args.reference}-draw reference", ref))))
                print(f"ratios antithetic ÷ independent: per-image sd {anti['spread'] / ind['spread']:.2f}×, "
                      f"sd NLL {anti['nll_sd'] / ind['nll_sd']:.2f}×, "
                      f"sd AUROC-MI {anti['ood_auroc_mi_sd'] / ind['ood_auroc_mi_sd']:.2f}×, "
                      f"predict time {anti['predict_s'] / ind['predict_s']:.2f}× (medians)", flush=True)


if __name__ == "__main__":
    main()
