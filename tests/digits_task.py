"""A small real transfer task for fine-tuning tests and the digits benchmark (sklearn's 1,797 8×8 digits).

Upstream: classes 0–4 pretrain a tiny timm model (test_resnet at 16 px) and build its prior with
`zoo.build_prior`. Downstream: classes 5–9 (relabelled 0–4), a few shots per class for training and every other
downstream image for testing. The upstream artifact is built once per process (`upstream_prior_dir`) and reused.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from intra_op import one_intra_op_thread
from PIL import Image
from sklearn.datasets import load_digits

import zoo

ARCH = "test_efficientnet_gn"
SIZE = 16
CLASSES = 5
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 3, 16, 16) images normalised like the model's config (mean = std = 0.5), and labels."""
    return digits_at(SIZE)


@functools.cache
def digits_at(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 3, size, size) images normalised with mean = std = 0.5 (the test networks' config
    and the ImageNet efficientnet_lite0's), and labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(data.target, dtype=torch.long)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> Batches:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def class_balanced_batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> Batches:
    """The fewest batches of at most `size` that each hold every class in proportion: batch b takes every k-th
    example of the label-sorted list from b. Few-shot training sets come out sorted by class, and consecutive
    slices of them gave batches of two or three classes at 20 shots, which an unshuffled epoch then steps through
    class by class. With one batch this is `batches` up to the order inside the batch."""
    order = torch.sort(y, stable=True).indices
    k = -(-y.numel() // size)
    return [(x[order[b::k]], y[order[b::k]]) for b in range(k)]


def upstream_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits()
    keep = y < CLASSES
    return x[keep], y[keep]


PRIOR_LAMBDA: float | None = None
"""The reference precision of the upstream prior: None, build_prior's own (the evidence-chosen λ, then the width
checked on held-out upstream digits), fixed before any downstream data is seen."""
HOLDOUT = 128
"""Upstream digits kept out of pretraining: the first batch of the build data, which build_prior holds out."""
HEAD_LAMBDA = 24.0
"""The new head's N(0, λ⁻¹I), fixed in advance (≈ d/‖θ‖² of the upstream network)."""


def pretrain(arch: str, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int) -> torch.nn.Module:
    """A timm `arch` trained from scratch on (x, y) at SIZE px with Adam (norm layers in train mode), then eval."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=CLASSES)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, SIZE, SIZE), crop_pct=1.0,
                                interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for xb, yb in batches(x[order], y[order]):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def l2sp_fine_tune(model: torch.nn.Module, train: Batches, wd: float, *, epochs: int, lr: float) -> float:
    """The MAP baseline, in place: Adam in eval mode with weight decay toward the pretrained body and toward zero
    for the new head (L2-SP), at the given epochs and lr (wd = 0: a plain fine-tune); returns the seconds it took."""
    head = model.pretrained_cfg["classifier"]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchor = {n: (torch.zeros_like(p) if n == head or n.startswith(head + ".") else p.detach().clone())
              for n, p in params}
    opt = torch.optim.Adam([p for _, p in params], lr=lr)
    model.eval()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if wd:  # at wd = 0 (the plain fine-tune) the penalty would only cost time
                loss = loss + 0.5 * wd * sum(((p - anchor[n]) ** 2).sum() for n, p in params)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


@functools.cache
def upstream_prior_dir(epochs: int = 8, seed: int = 0, lam: float | None = PRIOR_LAMBDA,
                       holdout: float = 0.1) -> Path:
    """Pretrain on digits 0–4 but HOLDOUT of them, build the prior with those first, save; lives for the process.
    One thread, so that the core count does not change the upstream network and prior; and the global RNG left as
    it was, so that `torch.manual_seed(s); zoo.load(upstream_prior_dir(), reset_head=True)` initialises the new
    head alike on the first call of a process (which builds) and every later one (before, the two differed)."""
    with one_intra_op_thread(), torch.random.fork_rng(devices=[]):
        return _build_upstream_prior(epochs, seed, lam, holdout)


def _build_upstream_prior(epochs: int, seed: int, lam: float | None, holdout: float) -> Path:
    x_all, y_all = upstream_data()
    if holdout == 0:  # no width check: pretrain on every upstream digit, as the paper's setting does
        x, y = x_all, y_all
        held: list[tuple[torch.Tensor, torch.Tensor]] = []
    else:
        order = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(seed))
        held = [(x_all[order[:HOLDOUT]], y_all[order[:HOLDOUT]])]
        x, y = x_all[order[HOLDOUT:]], y_all[order[HOLDOUT:]]
    model = pretrain(ARCH, x, y, epochs=epochs, lr=3e-3, seed=seed)
    build_data = [*held, *batches(x, y, 128)]  # with holdout, batch 0 is held out by build_prior
    prior = zoo.build_prior(model, build_data, lam=lam, holdout=holdout, progress=False, dataset="sklearn-digits-0-4",
                            generator=torch.Generator().manual_seed(seed), timm_name=f"{ARCH}.digits04")
    root = Path(tempfile.mkdtemp(prefix="zoo-digits-"))
    atexit.register(shutil.rmtree, root, True)
    return prior.save(str(root / "prior"), model=model)


def class_split(y: torch.Tensor, cut: Callable[[int], int], g: torch.Generator,
                classes: Iterable[int] = range(CLASSES, 2 * CLASSES)) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of `classes` (default digits 5–9): per class a seeded permutation, cut(count) of it in the first
    part, the rest after."""
    first, rest = [], []
    for k in classes:
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        first.append(idx[:cut(idx.numel())])
        rest.append(idx[cut(idx.numel()):])
    return torch.cat(first), torch.cat(rest)


def downstream(shots: int, seed: int) -> tuple[Batches, torch.Tensor, torch.Tensor]:
    """(training batches with `shots` images per class, test images, test labels); digits 5–9 relabelled 0–4."""
    x, y = digits()
    tr, te = class_split(y, lambda _: shots, torch.Generator().manual_seed(seed))
    return class_balanced_batches(x[tr], y[tr] - CLASSES), x[te], y[te] - CLASSES


def save_image_folder(root: Path, x: torch.Tensor, y: torch.Tensor | None = None, *, prefix: str = "") -> None:
    """Images normalised like digits() as PNGs: in a folder `prefix`<label> per class, or flat under root."""
    for i in range(x.shape[0]):
        folder = root / (f"{prefix}{int(y[i])}" if y is not None else "")
        folder.mkdir(parents=True, exist_ok=True)
        img = ((x[i].permute(1, 2, 0) * 0.5 + 0.5) * 255).round().clamp(0, 255).byte().numpy()
        Image.fromarray(img).save(folder / f"{i}.png")


def gibbs_test_error(posterior: zoo.Prior, x: torch.Tensor, y: torch.Tensor, samples: int, seed: int) -> float:
    """Held-out 0-1 error of the Gibbs classifier: the mean over `samples` weight draws of each draw's error."""
    errors, n = posterior.gibbs_errors(batches(x, y, 512), samples, torch.Generator().manual_seed(seed))
    return errors / (n * samples)


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top label, equal-width confidence bins."""
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = correct[inside].mean().item() - conf[inside].double().mean().item()
            total += inside.double().mean().item() * abs(gap)
    return total
