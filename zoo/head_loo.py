"""Leave-one-out logits of a new head, so that Q's width is judged on examples that did not narrow it.

The training-likelihood width rule (zoo.calibration.select_width) scores Q's predictive on the very examples whose
curvature narrowed Q. In a new head that hides the spread a new image gets: a training feature's logit variance is
held down by its own term in the precision, while a new image's features lie mostly outside the span of a few shots.
On the ImageNet efficientnet_lite0 with 5 digits per class the rule took T = 0.3, whose predictive had test NLL
0.77 against the network's 0.47, while the training NLL stayed at 0.04–0.06 for every T.

With Böhning's bound the head's precision is Σᵢ āᵢāᵢᵀ ⊗ B + κλI exactly (zoo.posterior_fit.bohning_factor), so
taking one example out is a rank-one change in each of the precision's output directions (Sherman–Morrison):
vⱼ → vⱼ / (1 − bⱼvⱼ), with vⱼ the logit variance and bⱼ B's eigenvalue in that direction. One Newton step gives the
example's mean without itself: f₋ᵢ = fᵢ + V₋ᵢ(pᵢ − yᵢ). The body keeps its in-sample fit (its leave-one-out would
need a refit per example), so this is still optimistic about the features; it is exact for the head's Laplace GLM.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import metrics
from zoo.errors import DataError
from zoo.posterior_fit import bohning_factor
from zoo.predictive import _head_covariance, _pre_logits

if TYPE_CHECKING:
    from zoo.prior import Prior

LOO_SAMPLES = 512
"""Draws of the head's leave-one-out logit Gaussian per example: ten logits each, so they cost nothing beside the
forward pass, and the slack they are compared with is a total of nats."""
DIAGONAL_TOLERANCE = 1e-8
"""Where B is not diagonal in the head's output basis (relative to its largest entry), the precision is not the
Böhning form this module assumes and no leave-one-out is computed."""


@dataclass(frozen=True)
class HeadLeaveOneOut:
    """Each training example's head logits without itself: N(mean, rotation · diag(variance) · rotationᵀ) at T = 1."""

    mean: Tensor
    variance: Tensor
    rotation: Tensor
    labels: Tensor

    def probs(self, t: float, z: Tensor) -> Tensor:
        """(N, C) predictive of Q × T, averaged over standard normal draws z (S, N, C)."""
        logits = self.mean[None] + (z * (self.variance * t).sqrt()[None]) @ self.rotation.T
        return torch.softmax(logits, dim=-1).mean(0)


def head_leave_one_out(gaussian: Prior, model: nn.Module, head: str, batches: Iterable[Any]) -> HeadLeaveOneOut | str:
    """The head's leave-one-out logits of every training example, or why they cannot be computed here.

    `gaussian` must be Q at T = 1 with the head's precision built from these very batches with Böhning's bound."""
    t_out, inv_d, t_in, has_bias = _head_covariance(gaussian, model, head)
    module = dict(model.named_modules())[head]
    means, variances, labels = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x, y = batch[0], torch.as_tensor(batch[1]).long()
                features = _pre_logits(model, head, x.to(t_out.device))
                means.append(module(features).double())
                phi = features.double()
                if has_bias:
                    phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=phi.device)], dim=1)
                a = phi @ t_in if t_in is not None else phi
                variances.append(a.square() @ inv_d.T)
                labels.append(y.to(t_out.device))
    finally:
        model.train(was_training)
    if not means:
        raise DataError("the training loader yielded no batches to choose the width on")
    f, v, y = torch.cat(means), torch.cat(variances), torch.cat(labels)
    rotated = t_out.T @ bohning_factor(f.shape[1], dtype=t_out.dtype).to(t_out.device) @ t_out
    b = torch.diagonal(rotated)
    off = (rotated - torch.diag(b)).abs().max()
    if off > DIAGONAL_TOLERANCE * rotated.abs().max():
        return f"Böhning's bound is not diagonal in the head's output basis (off-diagonal {off.item():.2e})"
    shrink = 1.0 - b[None] * v
    if not bool((shrink > 0).all()):
        return ("an example's curvature exceeds the head's precision (1 − b·v down to "
                f"{shrink.min().item():.2e}): the head's precision was not built from these batches")
    v_loo = v / shrink
    residual = torch.softmax(f, dim=-1) - F.one_hot(y, f.shape[1]).double()
    f_loo = f + ((residual @ t_out) * v_loo) @ t_out.T
    return HeadLeaveOneOut(f_loo, v_loo, t_out, y)


def select_width_leave_one_out(
    loo: HeadLeaveOneOut, grid: Iterable[float], *, slack: float, generator: torch.Generator,
    samples: int = LOO_SAMPLES,
) -> tuple[float, dict[str, Any]]:
    """The widest T whose head predictive, each example scored without itself, the training data do not reject.

    The same likelihood-ratio test as zoo.calibration.select_width (no accuracy lost against the leave-one-out
    mean, total log-likelihood within `slack` nats of it), on leave-one-out logits instead of in-sample ones."""
    y = loo.labels
    z = torch.randn((samples, *loo.mean.shape), generator=generator, dtype=torch.float64).to(loo.mean.device)
    mean_probs = torch.softmax(loo.mean, dim=-1)
    reference = {"accuracy": metrics.accuracy(mean_probs, y), "nll": metrics.nll(mean_probs, y)}
    rows = []
    for width in grid:
        probs = loo.probs(float(width), z)
        row = {"T": float(width), "accuracy": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y)}
        row["meets"] = (row["accuracy"] >= reference["accuracy"]
                        and row["nll"] <= reference["nll"] + slack / y.shape[0])
        rows.append(row)
    if not rows:
        raise ValueError("the width grid is empty")
    feasible = [r for r in rows if r["meets"]]
    chosen = max(feasible, key=lambda r: r["T"]) if feasible else min(rows, key=lambda r: r["T"])
    record = {"rule": "head leave-one-out likelihood", "samples": samples, "n": int(y.shape[0]), "slack": slack,
              "mean": reference, "T": chosen["T"], "met": bool(feasible), "grid": rows}
    return chosen["T"], record
