"""One shot per class: which prior precision α of the new head would predict best, and can the shots tell?

At one shot the head's evidence cannot pick α, and zoo.finetune takes the strongest α whose re-fit keeps the
training data within the likelihood-ratio region (zoo.head_evidence). This benchmark fine-tunes with the defaults,
then re-fits the head exactly on the trained body's features at every α of zoo.head_evidence.ALPHA_GRID and reports,
per α, the held-out accuracy, NLL, ECE and mean top-1 probability of the network with that head (at one shot the
head's spread is pinned, so this is the default predictive), beside:

- the default rule's α (the network zoo.finetune returns);
- the α a test-set oracle would pick (lowest held-out NLL): the room any rule has;
- the α picked by the NLL of augmented views of the shots (each shot shifted by up to 2 px, 8 views): a candidate
  calibration signal from outside the shots, measured here and not adopted (docs/benchmarks.md);
- mixtures over α instead of one α (Bayesian model averaging over the head's precision): weighted by each α's
  Laplace evidence, uniform over the α the likelihood-ratio region admits, and the rule's α mixed with its
  half-decade neighbours. Measured here and not adopted (docs/benchmarks.md, "One shot on this round's machine,
  15 seeds, and mixtures over the head's precision").

    python benchmarks/one_shot_head_scale.py --network resnet10t --seeds 15

Downstream split, fine-tune settings and the 400 seeded test images are benchmarks/transfer.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import downstream
from transfer import EPOCHS, LR, fresh, subsample
from transfer_task import NETWORKS, upstream

import zoo
from zoo import metrics
from zoo.head_evidence import ALPHA_GRID, head_features, log_evidence, new_heads, reduce_features, refit

VIEWS = 8
SHIFT = 2
MAX_TEST = 400
KEYS = ("acc", "nll", "ece", "conf")


def shifted_views(x: Tensor, views: int, generator: torch.Generator, shift: int = SHIFT) -> Tensor:
    """`views` copies of the batch, each translated by a random (dx, dy) in [−shift, shift] (borders replicated)."""
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    out = []
    for _ in range(views):
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
        out.append(padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]])
    return torch.cat(out)


def scores(probs: Tensor, y: Tensor) -> dict[str, float]:
    return {"acc": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y), "ece": metrics.ece(probs, y),
            "conf": float(probs.max(-1).values.mean())}


def mixture(log_probs: list[Tensor], weights: list[float]) -> Tensor:
    """Σₖ wₖ pₖ as probabilities, from per-α log-probabilities (weights normalised here)."""
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.logsumexp(torch.stack(log_probs) + (w / w.sum()).log()[:, None, None], 0).exp()


def mixtures(log_probs: list[Tensor], evidence: list[float], rule: int | None) -> dict[str, list[float]]:
    """{mixture: weights over the grid (strongest α first)}; `rule` is the index of the rule's α."""
    top = max(evidence)
    out = {"evidence": [math.exp(e - top) for e in evidence]}
    if rule is not None:
        out["region"] = [float(i >= rule) for i in range(len(log_probs))]
        out["rule + weaker"] = [float(rule <= i <= rule + 1) for i in range(len(log_probs))]
        out["rule + stronger"] = [float(rule - 1 <= i <= rule) for i in range(len(log_probs))]
    return out


def run_seed(name: str, seed: int, shots: int) -> dict[str, Any]:
    up = upstream(name)
    train, x, y = downstream(shots, seed)
    keep = subsample(x.shape[0], MAX_TEST, 10_000 + seed)
    x, y = x[keep], y[keep]
    model, prior = fresh(up, seed)
    post = zoo.finetune(model, prior, train, epochs=EPOCHS, lr=LR, progress=False,
                        generator=torch.Generator().manual_seed(seed))
    heads = new_heads(model, prior)
    head, lam = next(iter(heads.items()))
    record = post.meta["head_refit"]["heads"][head]
    x_train, y_train = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])
    x_views = shifted_views(x_train, VIEWS, torch.Generator().manual_seed(seed))
    phi = {key: head_features(model, heads, [(inputs, labels)], torch.device("cpu"))[0][head]
           for key, (inputs, labels) in {"train": (x_train, y_train), "views": (x_views, y_train.repeat(VIEWS)),
                                         "test": (x, y)}.items()}
    z, back = reduce_features(phi["train"])
    w_z = torch.zeros(len(torch.unique(y)), z.shape[1], dtype=torch.float64)
    rows, log_probs, evidence = [], [], []
    for m in sorted(ALPHA_GRID, reverse=True):  # strongest first, warm-started, as zoo.head_evidence does
        w_z = refit(z, y_train, lam * m, w_z)
        w = w_z @ back
        views = scores((phi["views"] @ w.T).softmax(-1), y_train.repeat(VIEWS))
        log_probs.append((phi["test"] @ w.T).log_softmax(-1))
        evidence.append(log_evidence(z, y_train, w_z, lam * m))
        rows.append({"multiplier": m, **scores(log_probs[-1].exp(), y),
                     **{f"views_{k}": v for k, v in views.items()}})
    with torch.no_grad():
        model.eval()
        default = scores(model(x).double().softmax(-1), y)
    default["multiplier"] = record["alpha"] / lam if record.get("refit") else None
    chosen = None if default["multiplier"] is None else min(
        range(len(rows)), key=lambda i: abs(math.log(rows[i]["multiplier"] / default["multiplier"])))
    mixed = {label: scores(mixture(log_probs, weights), y)
             for label, weights in mixtures(log_probs, evidence, chosen).items()}
    return {"seed": seed, "rule": record.get("rule"), "default": default, "rows": rows, "mixtures": mixed,
            "oracle": min(rows, key=lambda r: r["nll"]), "views": min(rows, key=lambda r: r["views_nll"])}


def mean(values: list[float]) -> str:
    sd = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=list(NETWORKS), default="resnet10t")
    parser.add_argument("--seeds", type=int, default=15)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for seed in range(args.seeds):
        results.append(run_seed(args.network, seed, args.shots))
        r = results[-1]
        print(f"seed {seed}: default α/λ {r['default']['multiplier']} " + " ".join(
            f"{k} {r['default'][k]:.3f}" for k in KEYS) + f"; oracle α/λ {r['oracle']['multiplier']:g}, "
              f"shifted views α/λ {r['views']['multiplier']:g}", flush=True)
    print(f"\n{args.network}, {args.shots} shot(s), seeds 0–{args.seeds - 1}, {MAX_TEST} test images; per α/λ, "
          "seed means (held-out, and on the shifted views of the shots):")
    print("| α/λ | acc | NLL | ECE | mean top-1 p | views acc | views mean top-1 p |\n|---|---|---|---|---|---|---|")
    for i, row in enumerate(results[0]["rows"]):
        cells = [statistics.mean(r["rows"][i][k] for r in results)
                 for k in ("acc", "nll", "ece", "conf", "views_acc", "views_conf")]
        print(f"| {row['multiplier']:.3g} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    for label in ("oracle", "views"):
        print(f"{label} − default (paired, mean ± SE): " + ", ".join(
            f"{k} {mean([r[label][k] - r['default'][k] for r in results])}" for k in KEYS))
    print("\nmixtures over α, seed means, then mixture − default (paired, mean ± SE):")
    for label in results[0]["mixtures"]:
        held = [r for r in results if label in r["mixtures"]]
        print(f"{label}: " + " ".join(f"{k} {statistics.mean(r['mixtures'][label][k] for r in held):.3f}"
                                      for k in KEYS) + "; " + ", ".join(
            f"{k} {mean([r['mixtures'][label][k] - r['default'][k] for r in held])}" for k in KEYS))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
