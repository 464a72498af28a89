"""Which Adam learning rate fine-tunes a real ImageNet network: the offline efficientnet_lite0 on sklearn digits.

zoo.finetune's default lr (3e-3) was measured on the small networks of benchmarks/transfer.py, trained from
scratch at 16 px. The product's main use is a pretrained timm network, and there the same lr does not train at all.
This fits the mean as zoo.finetune does (plain cross-entropy, Adam, every weight, the network in eval mode, a new
10-class head drawn from `--seed`) at each lr, with BatchNorm's statistics kept or re-estimated on the shots
(`norm_statistics`), and prints the held-out accuracy and NLL on 300 other digits and the training NLL's last epoch
as a ratio of its first.

    python benchmarks/pretrained_lr.py --px 64 --per-class 5 --lrs 3e-3 1e-3 3e-4 1e-4
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch import Tensor, nn

from zoo.demo import channels_last
from zoo.demo_transfer import digit_images, input_config
from zoo.norm_statistics import adapt_norm_statistics
from zoo.pretrained import efficientnet_lite0


def split(per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """`per_class` training digits of each class and 300 held-out ones, as indices."""
    _, labels = digit_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train = torch.cat([order[labels[order] == c][:per_class] for c in range(10)])
    return train, order[~torch.isin(order, train)][:300]


def network(px: int, seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = efficientnet_lite0()
    model.reset_classifier(10)
    return channels_last(model), input_config(model, px)


def fine_tune(lr: float, norm: str, args: argparse.Namespace) -> dict[str, float]:
    images, labels = digit_images()
    train, test = split(args.per_class, args.seed)
    model, cfg = network(args.px, args.seed)
    transform = create_transform(**cfg)

    def tensors(idx: Tensor) -> Tensor:
        return torch.stack([transform(images[i].convert("RGB")) for i in idx.tolist()])

    x_train, x_test = tensors(train), tensors(test)
    batches = [(x_train[i : i + 50], labels[train][i : i + 50]) for i in range(0, len(train), 50)]
    if norm == "adapt":
        adapt_norm_statistics(model, batches)
    model.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    epoch_nll = []
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        total = 0.0
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * y.shape[0]
        epoch_nll.append(total / len(train))
    with torch.no_grad():
        logits = model(x_test)
    return {"accuracy": (logits.argmax(-1) == labels[test]).float().mean().item(),
            "nll": F.cross_entropy(logits, labels[test]).item(),
            "train_ratio": epoch_nll[-1] / epoch_nll[0], "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3, 3e-4, 1e-4])
    parser.add_argument("--norm", nargs="+", default=["keep", "adapt"], choices=("keep", "adapt"))
    args = parser.parse_args()
    print(f"efficientnet_lite0 (ImageNet), digits at {args.px} px, {args.per_class} per class, {args.epochs} epochs "
          f"of Adam, eval mode, seed {args.seed}; 300 held-out digits")
    print("norm   lr      held-out acc  held-out NLL  train NLL last/first  seconds")
    for norm in args.norm:
        for lr in args.lrs:
            r = fine_tune(lr, norm, args)
            print(f"{norm:<6s} {lr:<7g} {r['accuracy']:>12.3f}  {r['nll']:>12.3f}  {r['train_ratio']:>20.4f}  "
                  f"{r['seconds']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
