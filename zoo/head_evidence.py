"""A new head re-fitted at the prior precision its own Laplace evidence prefers, on the fine-tuned body's features.

Why: zoo.finetune trains a new head without a prior (tuning.STRENGTH_NOTE), so on separable few-shot data its
weights keep growing: its logits are overconfident, and an evidence evaluated *at* those weights prefers a wide
head. For a linear last layer the proper type-II choice is cheap and exact: for each α on a grid, the MAP head under
N(0, α⁻¹I) is a convex re-fit on fixed features, and the evidence's log-determinant is exact in C·min(N, D)
dimensions once the features are reduced to their rank (the GGN of a linear softmax layer is its Hessian). The head
with the highest evidence replaces the trained one. Where no α beats the grid's strongest by a Bayes factor of 3
(EVIDENCE_MARGIN; at one shot per class the evidence prefers a head of zero, or is flat near it: the data give no
evidence for any head), the data cannot choose α but can bound it: the head taken is the strongest re-fit that keeps
every training example right and the total training log-likelihood within the likelihood-ratio region of the
parameters set on it (the head and Q's width T: ½χ²₂(0.95) = 3.00 nats for one head; zoo.tuning pins such a head's
spread and gives T what is left). Measured in benchmarks/transfer.py at one shot per class, against the trained
head: resnet10t NLL 2.06 → 1.35, ECE 0.18 → 0.12; efficientnet_gn NLL 1.43 → 1.32, ECE 0.18 → 0.11 (with a 1.92-nat
region and the head's spread kept). At the weakest edge the trained head is kept; the record says which rule applied.

With labelled validation images (zoo.finetune's `val_loader`, at least VALIDATION_PER_CLASS per class on average),
their NLL sets such a head's scale instead: the re-fit on the grid whose predictions on them are best. That is the
calibration signal one shot per class lacks. Measured on benchmarks/one_shot_head_scale.py's re-fits (15 seeds,
validation images drawn from the test pool and scored on the rest, paired against the likelihood-ratio rule): with
5 per class resnet10t NLL −0.041 ± 0.022 and ECE −0.054 ± 0.021, efficientnet_gn −0.003 ± 0.010 and −0.007 ±
0.015; with 2 per class efficientnet_gn lost NLL +0.021 ± 0.011, hence the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.calibration import check_class_labels, joint_slack, validation_shortfall
from zoo.errors import DataError, NumericalError
from zoo.layers import IsoLayer
from zoo.prior import Prior

ALPHA_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-8, 9))
"""Multipliers of the head's λ: α = λ·m, half-decades from 10⁻⁴ to 10⁴."""
EVIDENCE_MARGIN = math.log(3.0)
"""A Bayes factor under 3 is "not worth more than a bare mention" (Kass & Raftery 1995): a head whose evidence
beats the strongest α's by less is no evidence for a head, and the likelihood-ratio rule sets its scale."""
EXACT_LIMIT = 500
"""The re-fit and the evidence work with exact Hessians in C·min(N, D) dimensions; above this (e.g. more than 50
images of 10 classes) the trained head is kept, where a few-shot head's overconfidence matters less."""


def reduce_features(phi: Tensor) -> tuple[Tensor, Tensor]:
    """(z, back): N × r features with z zᵀ = φ φᵀ, r = rank φ ≤ min(N, D), and the r × D map with W = W_z·back.

    The MAP of an L2-regularised linear layer lies in the row space of φ, and the evidence's log det(I + H/α)
    only sees H's non-zero eigenvalues, so the re-fit and the evidence in z are exactly those in φ."""
    if phi.shape[0] >= phi.shape[1]:
        return phi, torch.eye(phi.shape[1], dtype=phi.dtype)
    values, vectors = torch.linalg.eigh(phi @ phi.T)
    keep = values > values.max().clamp_min(0) * 1e-10
    root = values[keep].sqrt()
    return vectors[:, keep] * root, (vectors[:, keep] / root).T @ phi


def head_features(model: nn.Module, names: Iterable[str], loader: Iterable[Any],
                  device: torch.device, *, what: str = "training") -> tuple[dict[str, Tensor], Tensor]:
    """The inputs of each named nn.Linear over the loader (float64, a column of ones where it has a bias), and y."""
    modules = dict(model.named_modules())
    captured: dict[str, list[Tensor]] = {name: [] for name in names}
    hooks = [modules[name].register_forward_hook(
        lambda _m, args, _out, name=name: captured[name].append(args[0].detach().flatten(1).double().cpu()))
        for name in captured]
    labels = []
    try:
        model.eval()
        with torch.no_grad():
            for x, y in loader:
                model(x.to(device))
                labels.append(torch.as_tensor(y).long().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    if not labels:
        raise DataError(f"the {what} loader yielded no batches to re-fit the head on")
    out = {}
    for name, parts in captured.items():
        phi = torch.cat(parts)
        if modules[name].bias is not None:
            phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=torch.float64)], 1)
        out[name] = phi
    return out, torch.cat(labels)


def _loss(phi: Tensor, y: Tensor, w: Tensor, alpha: float) -> Tensor:
    return F.cross_entropy(phi @ w.T, y, reduction="sum") + 0.5 * alpha * (w * w).sum()


def _hessian(phi: Tensor, w: Tensor, alpha: float) -> Tensor:
    """Σᵢ Λᵢ ⊗ φᵢφᵢᵀ + αI over vec(W) in row-major (class, input) order: the exact Hessian of the loss."""
    p = (phi @ w.T).softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    size = w.numel()
    h = torch.einsum("icd,ia,ib->cadb", lam, phi, phi).reshape(size, size)
    return h + alpha * torch.eye(size, dtype=h.dtype)


def refit(phi: Tensor, y: Tensor, alpha: float, start: Tensor, *, iterations: int = 100) -> Tensor:
    """argmin_W Σ CE(Wφ, y) + ½α‖W‖², from `start` (C × D, float64), by damped Newton steps: the loss is strictly
    convex and its Hessian is exact and small here, so a few steps reach the optimum to machine precision."""
    w = start.detach().clone()
    loss = _loss(phi, y, w, alpha)
    for _ in range(iterations):
        grad = ((phi @ w.T).softmax(-1) - F.one_hot(y, w.shape[0]).to(phi)).T @ phi + alpha * w
        if grad.abs().max().item() <= 1e-10 * max(1.0, loss.item()):
            break
        step = torch.linalg.solve(_hessian(phi, w, alpha), grad.reshape(-1)).reshape(w.shape)
        decrease = (grad * step).sum().item()
        t = 1.0
        while True:  # Armijo backtracking
            candidate = w - t * step
            new = _loss(phi, y, candidate, alpha)
            if new.item() <= loss.item() - 1e-4 * t * decrease or t < 1e-8:
                break
            t *= 0.5
        if loss.item() - new.item() <= 1e-15 * max(1.0, abs(loss.item())):
            w = candidate if new.item() < loss.item() else w
            break
        w, loss = candidate, new
    return w


def log_evidence(phi: Tensor, y: Tensor, w: Tensor, alpha: float) -> float:
    """Laplace log evidence of a linear softmax layer at its MAP w under N(0, α⁻¹I), up to a constant in α.

    log Z = −Σ CE − ½α‖w‖² + ½P log α − ½ log det(H + αI), with H = Σᵢ Λᵢ ⊗ φᵢφᵢᵀ, Λᵢ = diag(pᵢ) − pᵢpᵢᵀ, in the
    P = C·D dimensions of w (reduce_features first keeps D ≤ N).
    """
    sign, logdet = torch.linalg.slogdet(_hessian(phi, w, alpha))
    if sign.item() <= 0 or not torch.isfinite(logdet):
        raise NumericalError(f"the head's evidence determinant is not positive at α={alpha:g}; check the features "
                             "for NaN or inf")
    nll = F.cross_entropy(phi @ w.T, y, reduction="sum")
    return (-nll - 0.5 * alpha * (w * w).sum() - 0.5 * (logdet - w.numel() * math.log(alpha))).item()


def no_evidence_for_a_head(rows: list[dict[str, Any]]) -> bool:
    """Whether no head on the grid beats the strongest α (a head of almost zero) by EVIDENCE_MARGIN nats.

    At one shot per class the evidence is flat at the strong end, and its maximum can land a few rows in by 10⁻⁴
    nats; taking that row gave near-uniform predictions (the test suite's digits task, seed 3: mean top-1
    probability 0.20 on five classes at accuracy 0.70)."""
    best = max(row["log_evidence"] for row in rows)
    return best - rows[-1]["log_evidence"] < EVIDENCE_MARGIN


def new_heads(model: nn.Module, prior: Prior) -> dict[str, float]:
    """The new heads' names (an isotropic prior on an nn.Linear) and their λ."""
    modules = dict(model.named_modules())
    return {name: layer.lam for name, layer in prior.layers.items()
            if isinstance(layer, IsoLayer) and isinstance(modules.get(name), nn.Linear)}


def refit_new_heads(model: nn.Module, prior: Prior, loader: Iterable[Any], device: torch.device,
                    validation: Iterable[Any] | None = None) -> dict[str, dict[str, Any]]:
    """Replace each new head by its evidence-optimal MAP re-fit (in place); returns a record per head.

    `validation` (labelled batches the head was not fitted on) sets the scale where the evidence cannot, if it
    holds enough images (VALIDATION_PER_CLASS); otherwise, or without it, the likelihood-ratio rule does."""
    heads = new_heads(model, prior)
    if not heads:
        return {}
    features, y = head_features(model, heads, loader, device)
    held: dict[str, Tensor] = {}
    held_y = None
    if validation is not None:
        held, held_y = head_features(model, heads, validation, device, what="validation")
    modules = dict(model.named_modules())
    records = {}
    for name, lam in heads.items():
        linear = modules[name]
        phi = features[name]
        classes, inputs = linear.weight.shape
        if classes * min(phi.shape) > EXACT_LIMIT:
            records[name] = {"refit": False, "reason": f"over {EXACT_LIMIT} dimensions for the exact evidence; "
                             "the trained head is kept"}
            continue
        check_class_labels(y, classes, f"labels must be class indices in [0, {classes}) to re-fit the head {name!r}")
        z, back = reduce_features(phi)
        table = []
        w_z = torch.zeros(classes, z.shape[1], dtype=torch.float64)
        for m in sorted(ALPHA_GRID, reverse=True):  # strongest first, each re-fit warm-started from the last
            w_z = refit(z, y, lam * m, w_z)
            table.append({"alpha": lam * m, "log_evidence": log_evidence(z, y, w_z, lam * m), "weights": w_z})
        table.reverse()
        best = max(range(len(table)), key=lambda i: table[i]["log_evidence"])
        rows = [{k: v for k, v in row.items() if k != "weights"} for row in table]
        rule, trained_nll = "evidence", None
        if no_evidence_for_a_head(rows):  # the evidence wants no head at all: shrink as far as the data allow
            trained = torch.cat([linear.weight.detach().double().cpu(), linear.bias.detach().double().cpu()[:, None]],
                                1) if linear.bias is not None else linear.weight.detach().double().cpu()
            slack = head_slack(len(heads))
            best, trained_nll = _strongest_tolerated(z, y, table, phi @ trained.T, rows, slack)
            rule = "likelihood-ratio"
            too_few = _too_few_for_validation(held_y, classes)
            if held_y is not None and too_few is None:
                best = _best_on_validation(table, back, held[name], held_y, rows)
                rule = "validation"
        if best is None or best == 0:
            reason = {"likelihood-ratio": "no head has more evidence than the grid's strongest edge, and no stronger "
                                          "re-fit keeps the training data's likelihood",
                      "validation": "the validation images prefer the grid's weakest edge",
                      "evidence": "the evidence peaks at the grid's weakest edge"}[rule]
            records[name] = {"refit": False, "lambda": lam, "table": rows,
                             "reason": f"{reason}; the trained head is kept"}
            continue
        w = table[best]["weights"] @ back  # back to the layer's inputs, for the chosen α only
        with torch.no_grad():
            linear.weight.copy_(w[:, :inputs].to(linear.weight))
            if linear.bias is not None:
                linear.bias.copy_(w[:, -1].to(linear.bias))
        records[name] = {"refit": True, "lambda": lam, "alpha": table[best]["alpha"], "rule": rule, "table": rows}
        if rule == "likelihood-ratio" and held_y is not None:
            records[name]["validation_unused"] = too_few
        if trained_nll is not None:
            # the training log-likelihood this shrinkage gave up: Q's width gets the rest (zoo.width.width_slack)
            records[name]["loglik_given_up"] = rows[best]["train_nll_sum"] - trained_nll
            records[name]["loglik_slack"] = slack
    return records


def _too_few_for_validation(y: Tensor | None, classes: int) -> str | None:
    """Why validation labels cannot set a head's scale (None: they can)."""
    if y is None:
        return "no validation data"
    return validation_shortfall(y, classes)


def _best_on_validation(table: list[dict[str, Any]], back: Tensor, phi: Tensor, y: Tensor,
                        rows: list[dict[str, Any]]) -> int:
    """The row (ascending α) whose re-fit has the lowest NLL on the validation features; ties go to the stronger
    α. Each row's validation NLL (summed) is recorded."""
    chosen, lowest = 0, math.inf
    for i, row in enumerate(table):
        nll = F.cross_entropy(phi @ (row["weights"] @ back).T, y, reduction="sum").item()
        rows[i]["validation_nll_sum"] = nll
        if nll <= lowest:
            chosen, lowest = i, nll
    return chosen


def head_slack(heads: int) -> float:
    """The training log-likelihood each of `heads` new heads may give up under the likelihood-ratio rule: an equal
    share of the region ½χ²ₖ₊₁(0.95) of the heads and Q's width T (3.00 nats for one head), T taking what is left
    (zoo.width.width_slack). A head's shrinkage is all that tempers its predictions, since its spread is pinned
    (zoo.width.unidentified_heads)."""
    return joint_slack(heads + 1) / heads


def _strongest_tolerated(z: Tensor, y: Tensor, table: list[dict[str, Any]], trained_logits: Tensor,
                         rows: list[dict[str, Any]], slack: float) -> tuple[int | None, float]:
    """The strongest α whose re-fit the training data do not reject against the trained head: every training
    example still right, total log-likelihood within `slack` nats (zoo.calibration's rule for Q's width,
    here for the head's scale). Where the evidence prefers a zero head, few-shot data cannot pick a precision, but
    they can bound how small the head may be; the trained head itself (no prior) is the unshrunk end. Returns the
    row (None: none qualifies) and the trained head's total training NLL."""
    reference_nll = F.cross_entropy(trained_logits, y, reduction="sum").item()
    reference_correct = (trained_logits.argmax(-1) == y).sum().item()
    chosen = None
    for i, row in enumerate(table):  # ascending α
        logits = z @ row["weights"].T
        nll = F.cross_entropy(logits, y, reduction="sum").item()
        correct = (logits.argmax(-1) == y).sum().item()
        rows[i].update(train_nll_sum=nll, train_correct=correct)
        if correct >= reference_correct and nll <= reference_nll + slack:
            chosen = i
    return chosen, reference_nll
