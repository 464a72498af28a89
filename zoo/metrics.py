"""Classification and OOD metrics on predictive probabilities, computed with torchmetrics where it has them.

Every function takes probabilities `probs` (N, C) whose rows sum to 1 (a Bayesian model average, or the softmax
of a network) and integer labels `y` (N,). Inputs are checked first, so a shape or range mistake raises a
`zoo.errors.DataError` that says what to pass instead of a torchmetrics assertion deep inside a metric.

- accuracy: top-1, torchmetrics `multiclass_accuracy` (micro average).
- nll: mean −log p(y|x) in nats, in float64; from log-probabilities when the caller has them (exact for logits).
- ece: top-label expected calibration error, l1, equal-width bins (torchmetrics `multiclass_calibration_error`;
  its bins are [lo, hi), and a confidence of exactly 1 gets a bin of its own).
- brier: mean over examples of Σ_c (p_c − 1[c = y])², in [0, 2]. torchmetrics 1.x has no multiclass Brier score
  on probabilities, so it is the formula itself, in float64.
- ood_auroc: torchmetrics `binary_auroc` with the OOD set as the positive class (a higher score means more OOD),
  so 0.5 is chance and ties count one half.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from zoo.errors import DataError

ROW_SUM_TOL = 1e-3
"""How far a row of `probs` may sum from 1 (float32 averages of 32 softmaxes are off by ~1e-7; logits are off by
far more than this, so passing logits by mistake is caught)."""


def _classification() -> Any:
    """torchmetrics' functional classification metrics, imported on first use: the import pulls in scipy.signal
    and scipy.stats, 2.9 s of every `zoo` command's start-up (measured with python -X importtime)."""
    from torchmetrics.functional import classification

    return classification


FLOOR = torch.finfo(torch.float64).tiny
"""The documented floor of `nll` on probabilities: p(y|x) = 0 counts as −log(tiny) ≈ 708 nats instead of ∞, with
a warning that says how many examples it hit. Pass log-probabilities (`from_log=True`) to avoid it."""


def _check(probs: Tensor, y: Tensor, *, log: bool = False) -> tuple[Tensor, Tensor]:
    """Validate (N, C) probabilities (or log-probabilities) and (N,) labels; return float64 copies on one device."""
    what = "log-probabilities" if log else "probabilities"
    if not isinstance(probs, Tensor) or not isinstance(y, Tensor):
        raise DataError(f"{what} and labels must be torch tensors, got {type(probs).__name__} and "
                        f"{type(y).__name__}; wrap them with torch.as_tensor")
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise DataError(f"{what} must be a non-empty (N, C) tensor with C ≥ 2 classes, got shape "
                        f"{tuple(probs.shape)}; pass one row per example (e.g. Prediction.probs)")
    if y.ndim != 1 or y.shape[0] != probs.shape[0]:
        raise DataError(f"labels must be a (N,) tensor with one label per row of the {what}, got shape "
                        f"{tuple(y.shape)} for {what} of shape {tuple(probs.shape)}; flatten them or pass the "
                        "labels of the same examples")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices, got dtype {y.dtype}; convert with y.long()")
    n_classes = probs.shape[1]
    if bool(((y < 0) | (y >= n_classes)).any()):
        raise DataError(f"labels must lie in [0, {n_classes}) for {n_classes}-class {what}, got range "
                        f"[{int(y.min())}, {int(y.max())}]; relabel the classes to 0..C−1")
    p = probs.detach().double()
    if log:
        if bool(torch.isnan(p).any()) or bool((p > 0).any()):
            raise DataError("log-probabilities must be ≤ 0 and not NaN; pass log_softmax(logits), not logits")
        mass = p.exp().sum(-1)
    else:
        if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
            raise DataError("probabilities must be finite and lie in [0, 1]; pass softmax(logits), not logits")
        mass = p.sum(-1)
    worst = float((mass - 1).abs().max())
    if worst > ROW_SUM_TOL:
        raise DataError(f"each row of the {what} must sum to 1 (worst row is off by {worst:.3g}); normalise "
                        "them, or pass softmax(logits) if these are logits")
    return p, y.detach().long().to(p.device)


def accuracy(probs: Tensor, y: Tensor) -> float:
    """Top-1 accuracy (ties in the argmax go to the lowest class, as in torch.argmax)."""
    p, t = _check(probs, y)
    return float(_classification().multiclass_accuracy(p, t, num_classes=p.shape[1], average="micro"))


def _true_class(probs: Tensor, y: Tensor, *, log: bool = False) -> Tensor:
    """(N,) float64 probability (or log-probability) of each example's true class, validated."""
    p, t = _check(probs, y, log=log)
    return p.gather(1, t[:, None]).squeeze(1)


def _floored_nll(picked: Tensor) -> Tensor:
    return -picked.clamp_min(FLOOR).log()


def nll_per_example(probs: Tensor, y: Tensor) -> Tensor:
    """(N,) float64 −log p(y) in nats, floored at `FLOOR` as `nll` floors it (without its warning): the values whose
    mean `nll` is, for paired comparisons and their standard errors."""
    return _floored_nll(_true_class(probs, y))


def nll(probs: Tensor, y: Tensor, *, from_log: bool = False) -> float:
    """Mean negative log-likelihood of the true labels in nats.

    With `from_log=True`, `probs` holds log-probabilities (e.g. log_softmax of logits) and is used as is, which is
    exact even where a probability underflows. On probabilities a zero for the true class would make the mean
    infinite; it is floored at float64's smallest normal number (`FLOOR`, ≈ 708 nats) and a warning says so.
    """
    picked = _true_class(probs, y, log=from_log)
    if from_log:
        return float(-picked.mean())
    zeros = int((picked < FLOOR).sum())
    if zeros:
        warnings.warn(f"nll: {zeros} of {picked.numel()} examples give their true class probability < float64 tiny; "
                      "floored at 2.2e-308 (≈ 708 nats each). Pass log-probabilities with from_log=True for the "
                      "exact value", RuntimeWarning, stacklevel=2)
    return float(_floored_nll(picked).mean())


def ece(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    """Top-label expected calibration error (l1) over `bins` equal-width confidence bins."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise DataError(f"bins must be a positive integer, e.g. 15; got {bins!r}")
    p, t = _check(probs, y)
    return float(_classification().multiclass_calibration_error(p, t, num_classes=p.shape[1], n_bins=bins, norm="l1"))


def brier(probs: Tensor, y: Tensor) -> float:
    """Multiclass Brier score: the mean over examples of Σ_c (p_c − onehot_c)², 0 for a perfect sure classifier."""
    p, t = _check(probs, y)
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(-1).mean())


def ood_auroc(score_in: Tensor, score_out: Tensor) -> float:
    """AUROC of telling OOD inputs from in-distribution ones by a score (higher = more OOD, e.g. entropy).

    The probability that a random OOD input scores above a random in-distribution one, ties counting one half.
    """
    parts = []
    for name, s in (("score_in", score_in), ("score_out", score_out)):
        if not isinstance(s, Tensor) or s.ndim != 1 or s.numel() == 0:
            raise DataError(f"{name} must be a non-empty 1-D tensor of per-example scores, got "
                            f"{getattr(s, 'shape', type(s).__name__)}; pass e.g. Prediction.entropy")
        if not bool(torch.isfinite(s).all()):
            raise DataError(f"{name} contains NaN or infinite scores; check the predictive that produced them")
        parts.append(s.detach().double().flatten().cpu())
    scores = torch.cat(parts)
    target = torch.cat([torch.zeros(parts[0].numel(), dtype=torch.long), torch.ones(parts[1].numel(),
                                                                                   dtype=torch.long)])
    return float(_classification().binary_auroc(scores, target))


def summary(
    probs: Tensor,
    y: Tensor,
    *,
    log_probs: Tensor | None = None,
    mutual_information: Tensor | None = None,
    ood_probs: Tensor | None = None,
    ood_mutual_information: Tensor | None = None,
    bins: int = 15,
) -> dict[str, Any]:
    """Every metric of one predictive in a dict: accuracy, nll, ece, brier, and with OOD data the AUROCs.

    `log_probs` (optional) makes the NLL exact. `ood_auroc_entropy` scores by the predictive entropy of `probs`
    vs `ood_probs`; `ood_auroc_mi` by mutual information when both `mutual_information` and
    `ood_mutual_information` are given, else it is None (a method with a single network has no MI).
    """
    out: dict[str, Any] = {
        "accuracy": accuracy(probs, y),
        "nll": nll(log_probs, y, from_log=True) if log_probs is not None else nll(probs, y),
        "ece": ece(probs, y, bins),
        "brier": brier(probs, y),
        "ood_auroc_entropy": None,
        "ood_auroc_mi": None,
    }
    if ood_probs is not None:
        if ood_probs.ndim != 2 or ood_probs.shape[1] != probs.shape[1]:
            raise DataError(f"ood_probs must be (M, {probs.shape[1]}) like probs, got {tuple(ood_probs.shape)}; "
                            "predict the OOD images with the same model")
        # H[p] = Σ_c entr(p_c), entr(p) = −p·log p with entr(0) = 0: the predictive entropy in nats
        ent_in = torch.special.entr(probs.detach().double()).sum(-1)
        out["ood_auroc_entropy"] = ood_auroc(ent_in, torch.special.entr(ood_probs.detach().double()).sum(-1))
    if (mutual_information is None) != (ood_mutual_information is None):
        raise DataError("pass both mutual_information and ood_mutual_information, or neither")
    if mutual_information is not None and ood_mutual_information is not None:
        out["ood_auroc_mi"] = ood_auroc(mutual_information, ood_mutual_information)
    return out
