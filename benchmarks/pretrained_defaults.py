"""zoo.finetune with its library defaults on a real ImageNet network: does the posterior beat its network?

zoo.finetune's default lr (3e-3) was set on the small networks of benchmarks/transfer.py. On the offline ImageNet
efficientnet_lite0 Adam at that rate collapses to chance (benchmarks/pretrained_lr.py), so a stalled fit now restarts
from its start at lr / 10 (zoo.tuning.LR_BACKOFF_NOTE). This runs the whole user path, per seed: the embedded default
prior, `zoo.load(..., num_classes=10, reset_head=True)`, `zoo.finetune(model, prior, train)` and
`posterior.predict(test)`, all with defaults but for `--epochs`, once at the library default lr (restarts on) and
once at the 3e-4 the README's quick start passes. It prints the rate each fit ended at, the fit time, Q's width T,
and the held-out accuracy, NLL and ECE of the posterior's predictive (default glm, 32 draws; and `fast` with 1,024
draws) and of its mean network alone. Per seed it also fits the MAP networks a timm user would have without us, from
the same start (the same new head, Adam at 3e-4 in eval mode, every weight, the same epochs and batches): the plain
fine-tune (cross-entropy alone, which is what zoo.finetune trains its mean with before the new head's re-fit), and
the fair baseline of benchmarks/transfer.py, L2-SP (decay toward the pretrained body, toward zero for the head) with
its decay chosen by 5-fold cross-validated NLL on the training shots from (0,) + transfer.WD_GRID, the folds' fits
counted in its fit time. A third MAP row keeps the decay with the lowest *test* NLL: an oracle, an upper bound on any
tuned MAP. It ends with the fit-time ratios, medians over seeds: library default ÷ 3e-4, and zoo.finetune ÷ the plain
fine-tune and ÷ the cross-validated L2-SP MAP. `--keep-head` adds, per rate, a fit with `refit_head=False` (row
"zoo RATE keep"): the trained new head instead of its evidence re-fit, the comparison behind the README's lite0 bullet.
`--mean-penalty` adds one with `mean_penalty="reference"` (row "zoo RATE l2sp"): the mean trained against L2-SP toward
the pretrained body at the prior's λ instead of by likelihood alone.

    python benchmarks/pretrained_defaults.py --seeds 0 1 2 --px 64 --per-class 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from torch import Tensor, nn

import zoo
from zoo import metrics
from zoo.demo import channels_last, embedded_default
from zoo.demo_transfer import digit_images, input_config
from zoo.tuning import TrainingWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import class_balanced_batches, l2sp_fine_tune
from transfer import WD_GRID, cv_choice

Task = tuple[nn.Module, zoo.Prior, list[tuple[Tensor, Tensor]], Tensor, Tensor]
PLAIN_LR = 3e-4
MAP_WDS = (0.0, *WD_GRID)
"""The MAP decays tried: 0 (the plain fine-tune) and the digits benchmark's grid."""
MAP_LABELS = {"plain": "plain (wd 0)", "l2sp_cv": "L2-SP, wd CV", "l2sp_oracle": "L2-SP, oracle"}


def task(seed: int, args: argparse.Namespace) -> Task:
    """The network with a new head drawn from `seed`, its prior, the training batches, and the held-out digits."""
    images, labels = digit_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train = torch.cat([order[labels[order] == c][: args.per_class] for c in range(10)])
    test = order[~torch.isin(order, train)][: args.test]
    model, prior = zoo.load(str(embedded_default(progress=False)), num_classes=10, reset_head=True,
                            generator=torch.Generator().manual_seed(seed))
    model = channels_last(model)
    transform = create_transform(**input_config(model, args.px))

    def tensors(idx: Tensor) -> Tensor:
        return torch.stack([transform(images[i].convert("RGB")) for i in idx.tolist()])

    batches = class_balanced_batches(tensors(train), labels[train], 50)  # one batch up to 5 per class
    return model, prior, batches, tensors(test), labels[test]


def scores(probs: Tensor, y: Tensor, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}acc": metrics.accuracy(probs, y), f"{prefix}nll": metrics.nll(probs, y),
            f"{prefix}ece": metrics.ece(probs, y)}


def maps(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float | str]]:
    """The MAP rows: the plain fine-tune (wd = 0), L2-SP with wd by k-fold CV on the shots, and the test oracle."""
    start, _, train, x_test, y_test = task(seed, args)
    fits: list[dict[str, float | str]] = []
    for wd in MAP_WDS:
        model = copy.deepcopy(start)
        seconds = l2sp_fine_tune(model, train, wd, epochs=args.epochs, lr=PLAIN_LR)
        with torch.no_grad():
            probs = torch.softmax(model.eval()(x_test).double(), dim=-1)
        fits.append({"fit_s": seconds, "wd": wd, **scores(probs, y_test)})

    def fold_fit(part: list[tuple[Tensor, Tensor]], wd: float) -> nn.Module:
        model = copy.deepcopy(start)
        l2sp_fine_tune(model, part, wd, epochs=args.epochs, lr=PLAIN_LR)
        return model

    cv, cv_seconds = cv_choice(fold_fit, train, MAP_WDS, seed)
    chosen = fits[min(range(len(fits)), key=cv.__getitem__)]
    return {"plain": fits[0],
            "l2sp_cv": dict(chosen, fit_s=float(chosen["fit_s"]) + cv_seconds,
                            cv=", ".join(f"{wd:g}: {v:.3f}" for wd, v in zip(MAP_WDS, cv, strict=True))),
            "l2sp_oracle": min(fits, key=lambda f: f["nll"])}


def run(seed: int, lr: float | None, args: argparse.Namespace,
        variant: dict[str, Any] | None = None) -> dict[str, float | str]:
    """zoo.finetune with library defaults but `lr` and the opt-ins in `variant` (refit_head, mean_penalty)."""
    model, prior, batches, x_test, y = task(seed, args)
    options = {} if lr is None else {"lr": lr}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingWarning)
        posterior = zoo.finetune(model, prior, batches, epochs=args.epochs, progress=False,
                                 generator=torch.Generator().manual_seed(seed), **(variant or {}), **options)
    fit = time.perf_counter() - t0
    pred = posterior.predict(x_test, generator=torch.Generator().manual_seed(seed + 1))
    fast = posterior.predict(x_test, samples=1024, mode="fast", generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        network = torch.softmax(posterior.model.eval()(x_test).double(), dim=-1)
    record = posterior.meta["finetune"]
    width = posterior.meta["width"]["selection"] or {}
    attempts = (record.get("lr_retries") or {}).get("attempts", [None])
    return {"lr": record["lr"], "restarts": len(attempts) - 1, "fit_s": fit,
            "T": width.get("T", float("nan")),
            "warned": any(issubclass(w.category, TrainingWarning) for w in caught),
            **scores(pred.probs, y), **scores(fast.probs, y, "fast_"), **scores(network, y, "net_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--lrs", nargs="+", default=["default", "3e-4"],
                        help="'default' (the library's, with its restarts) and/or rates")
    parser.add_argument("--no-map", action="store_true", help="skip the MAP fine-tunes (plain and L2-SP)")
    parser.add_argument("--keep-head", action="store_true",
                        help="also fit each rate with refit_head=False (the trained head, not its re-fit)")
    parser.add_argument("--mean-penalty", action="store_true",
                        help="also fit each rate with mean_penalty='reference' (L2-SP to the body at the prior's λ)")
    args = parser.parse_args()
    variants: list[tuple[str, dict[str, Any]]] = [("", {})]
    if args.keep_head:
        variants.append((" keep", {"refit_head": False}))
    if args.mean_penalty:
        variants.append((" l2sp", {"mean_penalty": "reference"}))
    print(f"efficientnet_lite0 (ImageNet) and its embedded prior; digits at {args.px} px, {args.per_class} per class, "
          f"{args.epochs} epochs; {args.test} held-out digits; predictive = posterior.predict defaults")
    print("seed  fit          ended   restarts warned  fit s   T       glm (default) acc/NLL/ECE  fast×1024 acc/NLL/ECE"
          "      mean network acc/NLL/ECE")
    ratios: dict[str, list[float]] = {}
    for seed in args.seeds:
        times = {}
        for label in args.lrs:
            lr = None if label == "default" else float(label)
            for suffix, variant in variants:
                r = run(seed, lr, args, variant)
                if not variant:
                    times[label] = r["fit_s"]
                name = f"zoo {label}{suffix}"
                print(f"{seed:<5d} {name:<12s} {r['lr']:<7g} {r['restarts']:<8d} {r['warned']!s:<7s} "
                      f"{r['fit_s']:<7.1f} {r['T']:<7g} {triple(r)}       {triple(r, 'fast_')}       "
                      f"{triple(r, 'net_')}", flush=True)
        if not args.no_map:
            for key, r in maps(seed, args).items():
                times[key] = float(r["fit_s"])
                note = f"wd {r['wd']:g}" + (f" (CV NLL {r['cv']})" if "cv" in r else "")
                print(f"{seed:<5d} {MAP_LABELS[key]:<13s}{PLAIN_LR:<7g} {'-':<8s} {'-':<7s} {r['fit_s']:<7.1f} "
                      f"{'-':<7s} {'':26s} {'':26s} {triple(r)}   {note}", flush=True)
        for label in args.lrs:
            if label != "3e-4" and "3e-4" in times:
                ratios.setdefault(f"zoo.finetune at {label} ÷ at 3e-4", []).append(times[label] / times["3e-4"])
            for key in ("plain", "l2sp_cv"):
                if key in times:
                    ratios.setdefault(f"zoo.finetune at {label} ÷ MAP {MAP_LABELS[key]}", []).append(
                        times[label] / times[key])
    for name, values in ratios.items():
        print(f"fit time, {name}: median {statistics.median(values):.2f}× "
              f"(per seed {', '.join(f'{v:.2f}' for v in values)})")


def triple(r: dict[str, float | str], prefix: str = "") -> str:
    return f"{r[prefix + 'acc']:.3f} / {r[prefix + 'nll']:.3f} / {r[prefix + 'ece']:.3f}"


if __name__ == "__main__":
    main()
