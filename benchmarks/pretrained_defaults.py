"""zoo.finetune with its library defaults on a real ImageNet network: does the posterior beat its network?

zoo.finetune's default lr (3e-3) was set on the small networks of benchmarks/transfer.py. On the offline ImageNet
efficientnet_lite0 Adam at that rate collapses to chance (benchmarks/pretrained_lr.py), so a stalled fit now
restarts from its start at lr / 10 (zoo.tuning.LR_BACKOFF_NOTE). This runs the whole user path, per seed: the
embedded default prior, `zoo.load(..., num_classes=10, reset_head=True)`, `zoo.finetune(model, prior, train)` and
`posterior.predict(test)`, all with defaults but for `--epochs`, once at the library default lr (restarts on) and
once at the 3e-4 the README's quick start passes. It prints the rate each fit ended at, the fit time, Q's width T,
and the held-out accuracy, NLL and ECE of the posterior's predictive and of its network alone, then the ratios
default ÷ 3e-4 of the fit times (median over seeds).

    python benchmarks/pretrained_defaults.py --seeds 0 1 2 --px 64 --per-class 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from timm.data import create_transform

import zoo
from zoo import metrics
from zoo.demo import channels_last, embedded_default
from zoo.demo_transfer import digit_images, input_config
from zoo.tuning import TrainingWarning


def run(seed: int, lr: float | None, args: argparse.Namespace) -> dict[str, float | str]:
    images, labels = digit_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train = torch.cat([order[labels[order] == c][: args.per_class] for c in range(10)])
    test = order[~torch.isin(order, train)][: args.test]
    model, prior = zoo.load(str(embedded_default(progress=False)), num_classes=10, reset_head=True,
                            generator=torch.Generator().manual_seed(seed))
    model = channels_last(model)
    transform = create_transform(**input_config(model, args.px))

    def tensors(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([transform(images[i].convert("RGB")) for i in idx.tolist()])

    x_train, x_test = tensors(train), tensors(test)
    batches = [(x_train[i : i + 50], labels[train][i : i + 50]) for i in range(0, len(train), 50)]
    options = {} if lr is None else {"lr": lr}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingWarning)
        posterior = zoo.finetune(model, prior, batches, epochs=args.epochs, progress=False,
                                 generator=torch.Generator().manual_seed(seed), **options)
    fit = time.perf_counter() - t0
    pred = posterior.predict(x_test, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        network = torch.softmax(posterior.model.eval()(x_test).double(), dim=-1)
    y = labels[test]
    record = posterior.meta["finetune"]
    width = posterior.meta["width"]["selection"] or {}
    attempts = (record.get("lr_retries") or {}).get("attempts", [None])
    return {"lr": record["lr"], "restarts": len(attempts) - 1, "fit_s": fit,
            "T": width.get("T", float("nan")),
            "warned": any(issubclass(w.category, TrainingWarning) for w in caught),
            "acc": metrics.accuracy(pred.probs, y), "nll": metrics.nll(pred.probs, y),
            "ece": metrics.ece(pred.probs, y),
            "net_acc": metrics.accuracy(network, y), "net_nll": metrics.nll(network, y),
            "net_ece": metrics.ece(network, y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--lrs", nargs="+", default=["default", "3e-4"],
                        help="'default' (the library's, with its restarts) and/or rates")
    args = parser.parse_args()
    print(f"efficientnet_lite0 (ImageNet) and its embedded prior; digits at {args.px} px, {args.per_class} per class, "
          f"{args.epochs} epochs; {args.test} held-out digits; predictive = posterior.predict defaults")
    print("seed  asked   ended   restarts warned  fit s   T       predictive acc/NLL/ECE   network acc/NLL/ECE")
    ratios = []
    for seed in args.seeds:
        times = {}
        for label in args.lrs:
            lr = None if label == "default" else float(label)
            r = run(seed, lr, args)
            times[label] = r["fit_s"]
            print(f"{seed:<5d} {label:<7s} {r['lr']:<7g} {r['restarts']:<8d} {r['warned']!s:<7s} {r['fit_s']:<7.1f} "
                  f"{r['T']:<7g} "
                  f"{r['acc']:.3f} / {r['nll']:.3f} / {r['ece']:.3f}    {r['net_acc']:.3f} / {r['net_nll']:.3f} / "
                  f"{r['net_ece']:.3f}", flush=True)
        if "default" in times and "3e-4" in times:
            ratios.append(times["default"] / times["3e-4"])
    if ratios:
        print(f"fit time, library default ÷ lr=3e-4: median {statistics.median(ratios):.2f}× "
              f"(per seed {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
