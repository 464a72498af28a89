"""Does the posterior's spread help flag inputs it has never seen? OOD AUROC on four OOD sets, predictive vs its mean.

The transfer benchmark's OOD set is the upstream digits 0–4, on which a learned prior is narrow by construction.
This script adds three others for the same fits: the downstream test digits rotated by 90°, the same digits with
their intensities inverted, and uniform noise, 135 images each. For each seed it fine-tunes with `zoo.finetune`
defaults (transfer.py's protocol), then scores in-distribution test images against each OOD set by predictive
entropy, for the default glm predictive and for its mean network (the same fit without the spread), and by the
predictive's mutual information. It prints the means and the paired difference predictive − mean network.

With `--map`, the same seeds' L2-SP MAP fine-tunes of transfer.py (wd by 5-fold cross-validation on the shots, and
the oracle's wd best on test NLL) are scored on every OOD set too, with the paired difference predictive − MAP: is
a loss to MAP on the upstream digits, where a learned prior is narrow by construction, a loss on other OOD sets?

    python benchmarks/ood_sets.py --network efficientnet_gn --shots 5 20 --seeds 10
    python benchmarks/ood_sets.py --network efficientnet_gn --shots 20 --seeds 10 --map
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import downstream
from transfer import EPOCHS, LR, fresh, paired, run_map, softmax_predict, subsample
from transfer_task import NETWORKS, upstream

import zoo
from zoo import metrics

OOD_IMAGES = 135  # as many as the upstream OOD set


def ood_sets(upstream_ood: torch.Tensor, test: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    noise = torch.rand((OOD_IMAGES, *test.shape[1:]), generator=torch.Generator().manual_seed(100 + seed))
    return {"upstream digits": upstream_ood, "rotated 90°": torch.rot90(test[:OOD_IMAGES], 1, (2, 3)),
            "inverted": -test[:OOD_IMAGES], "uniform noise": noise * 2 - 1}


def one_seed(network: str, shots: int, seed: int, max_test: int, with_map: bool) -> dict[str, tuple[float, ...]]:
    """Per OOD set: (mean network AUROC by entropy, predictive AUROC by entropy, predictive AUROC by MI), then with
    `with_map` the fair and the oracle MAP's AUROC by entropy."""
    up = upstream(network)
    train, x, y = downstream(shots, seed)
    keep = subsample(x.shape[0], max_test, 10_000 + seed)
    x, y = x[keep], y[keep]
    sets = ood_sets(up.ood_images, x, seed)
    model, prior = fresh(up, seed)
    post = zoo.finetune(model, prior, train, epochs=EPOCHS, lr=LR, progress=False,
                        generator=torch.Generator().manual_seed(seed))
    images = torch.cat([x, *sets.values()])
    pred = post.predict(images, generator=torch.Generator().manual_seed(seed))  # one call: shared draws
    mean_probs, _ = softmax_predict(post.model, images)
    map_probs = []
    if with_map:
        oracle, _, _, _, fair = run_map(up, train, x, y, seed, EPOCHS)
        map_probs = [softmax_predict(fair, images)[0], softmax_predict(oracle, images)[0]]
    out, start, n = {}, x.shape[0], x.shape[0]
    for name, ood in sets.items():
        part = slice(start, start + ood.shape[0])
        bayes = metrics.summary(pred.probs[:n], y, ood_probs=pred.probs[part],
                                mutual_information=pred.mutual_information[:n],
                                ood_mutual_information=pred.mutual_information[part])
        plain = metrics.summary(mean_probs[:n], y, ood_probs=mean_probs[part])
        maps = tuple(metrics.summary(p[:n], y, ood_probs=p[part])["ood_auroc_entropy"] for p in map_probs)
        out[name] = (plain["ood_auroc_entropy"], bayes["ood_auroc_entropy"], bayes["ood_auroc_mi"], *maps)
        start += ood.shape[0]
    return out


def paired_auroc(rows: list[tuple[float, ...]], ours: int, other: int) -> str:
    """Column `ours` − column `other` of one OOD set's per-seed AUROCs, paired over seeds: "mean ± SE"."""
    d = paired({"per_seed": [{"auroc": r[ours]} for r in rows]}, {"per_seed": [{"auroc": r[other]} for r in rows]},
               "auroc")
    return f"{d['paired_diff']:+.3f} ± {d['paired_se']:.3f}" if d else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=list(NETWORKS), default="efficientnet_gn")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 … N−1")
    parser.add_argument("--max-test", type=int, default=400)
    parser.add_argument("--map", action="store_true", help="also score transfer.py's fair and oracle L2-SP MAP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for shots in args.shots:
        runs = [one_seed(args.network, shots, seed, args.max_test, args.map) for seed in range(args.seeds)]
        print(f"\n{args.network}, {shots} shot(s) per class, seeds 0–{args.seeds - 1}: OOD AUROC")
        print("| OOD set | mean network (entropy) | predictive (entropy) | paired Δ | predictive (MI) |")
        print("|---|---|---|---|---|")
        for name in runs[0]:
            rows = [r[name] for r in runs]
            means = [statistics.mean(r[i] for r in rows) for i in range(3)]
            print(f"| {name} | {means[0]:.3f} | {means[1]:.3f} | {paired_auroc(rows, 1, 0)} | {means[2]:.3f} |",
                  flush=True)
        if args.map:
            print("\n| OOD set | predictive (entropy) | MAP, wd by CV | paired Δ | MAP, wd best on test | paired Δ |")
            print("|---|---|---|---|---|---|")
            for name in runs[0]:
                rows = [r[name] for r in runs]
                cells = [f"{statistics.mean(r[1] for r in rows):.3f}"]
                for i in (3, 4):
                    cells += [f"{statistics.mean(r[i] for r in rows):.3f}", paired_auroc(rows, 1, i)]
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
