"""A small transfer case with defaults only: the learned-prior posterior beats a MAP fine-tune (L2-SP) on NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from digits_task import CLASSES, downstream, upstream_prior_dir

import zoo
from zoo import metrics

EPOCHS, LR = 30, 1e-2  # zoo.finetune's defaults, shared by the MAP baseline


def _map_l2sp(model: torch.nn.Module, train: list, head: str, wd: float) -> None:
    """MAP with the same optimiser, epochs and learning rate, weight decay toward the pretrained weights."""
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.eval()
    for _ in range(EPOCHS):
        for x, y in train:
            opt.zero_grad()
            reg = sum(((p - (0 if k.startswith(head) else start[k])) ** 2).sum() for k, p in model.named_parameters())
            (F.cross_entropy(model(x), y) + 0.5 * wd * reg).backward()
            opt.step()


def test_learned_prior_beats_map_on_nll_with_defaults() -> None:
    train, x_test, y_test = downstream(5, seed=0)
    keep = torch.randperm(y_test.shape[0], generator=torch.Generator().manual_seed(0))[:300]  # every class
    x_test, y_test = x_test[keep], y_test[keep]
    model, prior = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
    post = zoo.finetune(model, prior, train, progress=False, generator=torch.Generator().manual_seed(0))
    ours = post.predict(x_test, generator=torch.Generator().manual_seed(1)).probs
    results = {}
    for wd in (1e-3, 1e-2, 1e-1):  # the MAP baseline gets its best weight decay on the test data
        baseline, _ = zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True)
        _map_l2sp(baseline, train, baseline.pretrained_cfg["classifier"], wd)
        with torch.no_grad():
            results[wd] = torch.softmax(baseline(x_test).double(), -1)
    best_map = min(metrics.nll(p, y_test) for p in results.values())
    assert metrics.nll(ours, y_test) < best_map
    assert metrics.accuracy(ours, y_test) >= max(metrics.accuracy(p, y_test) for p in results.values()) - 0.05
