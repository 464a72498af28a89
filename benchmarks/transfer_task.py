"""The upstream half of the digits transfer benchmark, per network: pretrain on digits 0–4, build the prior.

The data, the downstream split and the prior's λ come from tests/digits_task.py. What is network-specific lives
here: the timm architecture, its pretraining recipe, and a held-out part of the upstream digits that no network
sees during pretraining or prior building, which the benchmark uses as its OOD set (digits 0–4 to a classifier of
digits 5–9). Each network's prior is built once per process and saved in a temporary directory.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import CLASSES, batches, digits, pretrain

import zoo

OOD_FRACTION = 0.3
"""The share of each upstream class held out of pretraining and prior building, to serve as the OOD set."""


@dataclass(frozen=True)
class Network:
    """A timm architecture and how to pretrain it on the upstream digits at 16 px."""

    arch: str
    epochs: int
    lr: float
    note: str


NETWORKS = {
    "efficientnet_gn": Network("test_efficientnet_gn", epochs=8, lr=3e-3,
                               note="timm's test_efficientnet_gn (GroupNorm), as in tests/digits_task.py"),
    "resnet10t": Network("resnet10t", epochs=6, lr=3e-3, note="timm resnet10t (BatchNorm), trained from scratch"),
}


@dataclass(frozen=True)
class Upstream:
    """A network's saved prior, the held-out upstream images used as OOD, and its upstream accuracy on them."""

    name: str
    prior_dir: Path
    ood_images: torch.Tensor
    holdout_accuracy: float
    pretrain_seconds: float
    prior_seconds: float
    precision_multiplier: float
    width_rule: str


def upstream_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pretraining images, labels, held-out images, labels): digits 0–4, OOD_FRACTION of each class held out."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for k in range(CLASSES):
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cut = round(OOD_FRACTION * idx.numel())
        held.append(idx[:cut])
        train.append(idx[cut:])
    tr, ho = torch.cat(train), torch.cat(held)
    return x[tr], y[tr], x[ho], y[ho]


@functools.cache
def upstream(name: str, seed: int = 0) -> Upstream:
    """Pretrain `name` on its upstream split with Adam (BatchNorm in train mode), build and save its prior."""
    if name not in NETWORKS:
        raise SystemExit(f"unknown network {name!r}; choose from {sorted(NETWORKS)}")
    net = NETWORKS[name]
    x, y, x_ood, y_ood = upstream_split(seed)
    t0 = time.perf_counter()
    model = pretrain(net.arch, x, y, epochs=net.epochs, lr=net.lr, seed=seed)
    pretrain_seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x_ood).argmax(-1) == y_ood).double().mean().item()
    t0 = time.perf_counter()
    # half of the held-out upstream digits check the prior's width (build_prior holds out the first batch); the
    # other half is the downstream OOD set, so no image serves both
    half = x_ood.shape[0] // 2
    build_data = [(x_ood[:half], y_ood[:half]), *batches(x, y, 128)]
    x_ood, y_ood = x_ood[half:], y_ood[half:]
    prior = zoo.build_prior(model, build_data, progress=False,
                            dataset="sklearn-digits-0-4-pretrain-split", generator=torch.Generator().manual_seed(seed),
                            timm_name=f"{net.arch}.digits04")
    prior_seconds = time.perf_counter() - t0
    root = Path(tempfile.mkdtemp(prefix=f"zoo-transfer-{name}-"))
    atexit.register(shutil.rmtree, root, True)
    prior_dir = prior.save(str(root / "prior"), model=model)
    held = prior.meta["holdout"]
    return Upstream(name, prior_dir, x_ood, acc, pretrain_seconds, prior_seconds,
                    float(prior.meta["precision_multiplier"]), width_rule(held))


def width_rule(held: dict) -> str:
    """How the prior's width check chose, in words: the fallback taken, or the lowest NLL and its ties."""
    if not held.get("n"):
        return "not checked"
    if not held.get("met"):
        return str(held.get("fallback", "the narrowest"))
    ties = held.get("ties_within_one_se") or []
    return "the lowest held-out NLL; within one SE of it: " + (", ".join(f"×{t:.3g}" for t in ties) or "none")
