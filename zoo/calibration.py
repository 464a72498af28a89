"""A Gaussian's width chosen on held-out data, so that its predictive is at least as good as its network's.

A prior is the Laplace posterior of its upstream data, and must predict like the network it came from: on
held-out upstream data its accuracy within half a point of the network's, its NLL no worse, its ECE no worse
beyond ECE_SLACK (ECE's resolution on a few hundred images). The scale fit
(zoo.scales) serves the PAC-Bayes bound, not this; so the whole precision is then multiplied by the t of
`PRECISION_GRID` that gives the lowest held-out NLL among the widths meeting those three conditions and keeping
the network's top-1 answer on all but half a percent of the held-out images; the record lists the widths whose
NLL is within one standard error of it (`ties_within_one_se`: a choice the held-out images do not determine). The
predictive modes "glm" and "fast" are linear in the draw, so one pass of draws serves every t (deviations / √t).
As t grows the predictive tends to the network itself, so the largest t meets the conditions up to Monte Carlo
noise. Where none does, because the network is right and sure on every held-out image (any spread then raises
its NLL, if only by 10⁻⁶ nats), the widest t whose NLL is within NLL_TIE of the network's (and every narrower one
too) is taken, and the record says so: a point mass would be a prior with no uncertainty to give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from zoo import metrics
from zoo.errors import DataError
from zoo.predictive import Predictor, network_of

if TYPE_CHECKING:
    from zoo.prior import Prior

PRECISION_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(13))  # 1 … 1e6, half-decades
ACCURACY_SLACK = 0.005
"""The predictive may lose at most half a point of held-out accuracy against the network."""
ECE_SLACK = 0.005
"""ECE differences smaller than this count as ties. ECE is binned: one image crossing a bin edge moves it by up to
2/n of that image's gap, so near the network (large t) it jitters by a few thousandths with the Monte Carlo draws.
Held to a strict inequality, no width met the conditions on 8 of 12 data splits and thread counts of
tests/test_build_predictive.py's task (450 held-out digits), not even t = 10⁶, the network itself up to rounding;
within half a point all 12 met."""

NLL_TIE = 0.005
"""Held-out NLL differences (nats per image) below this count as ties, used only where no width is strictly no
worse than the network. resnet10t on the upstream digits (benchmarks/transfer.py) has held-out accuracy 1.0 and NLL
0.0035: every width raised it, even t = 10⁶ (by 2·10⁻⁶, Monte Carlo), so the prior fell back to the narrowest, a
point mass whose posteriors had no body spread at any shot count. Within 0.005 nats its widest tie is t = 10^2.5
(NLL +0.0014, ECE +0.0013, every top-1 answer kept)."""


def predictive_probs(mean: Tensor, deviations: Tensor, t: float) -> Tensor:
    """(N, C) Bayesian model average of softmax(mean + deviation_s / √t)."""
    logits = mean[None].double() + deviations.double() / math.sqrt(t)
    return torch.softmax(logits, dim=-1).mean(0)


def _scores(probs: Tensor, y: Tensor, network: Tensor | None = None) -> dict[str, float]:
    """Accuracy and NLL of (N, C) probabilities; with the network's own probabilities, also ECE and the share of
    its top-1 answers kept (what a prior is held to)."""
    out = {"accuracy": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y)}
    if network is not None:
        out["ece"] = metrics.ece(probs, y)
        out["agreement"] = (probs.argmax(-1) == network.argmax(-1)).double().mean().item()
    return out


def _linear_parts(
    gaussian: Prior, batches: Iterable[Any], mode: str, samples: int, generator: torch.Generator, empty: str,
    spans: Mapping[str, Tensor] | None = None, antithetic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(labels, mean logits, deviations) of every batch, one pass of draws for a whole grid of widths."""
    x, y = gather_batches(batches, empty)
    predictor = Predictor(gaussian, mode=mode, samples=samples, generator=generator, spans=spans,
                          antithetic=antithetic)
    mean, deviations = predictor.linear_parts(x)
    return y, mean, deviations


def gather_batches(batches: Iterable[Any], empty: str) -> tuple[Tensor, Tensor]:
    """(images, labels) of every (x, y) batch concatenated; DataError(empty) where there is none."""
    xs, ys = [], []
    for batch in batches:
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise DataError(empty)
    return torch.cat(xs), torch.cat(ys).long()


def select_precision_multiplier(
    gaussian: Prior,
    batches: Iterable[Any],
    *,
    mode: str,
    samples: int,
    generator: torch.Generator,
    grid: Sequence[float] = PRECISION_GRID,
) -> tuple[float, dict[str, Any]]:
    """The t for which `gaussian` · t predicts best on `batches` (held out) without losing to the network."""
    y, mean, deviations = _linear_parts(gaussian, batches, mode, samples, generator,
                                        "no held-out batches to choose the prior's width on; pass more data or "
                                        "holdout=0")
    if int(y.min()) < 0 or int(y.max()) >= mean.shape[-1]:
        raise DataError(f"held-out labels must be class indices in [0, {mean.shape[-1]}); the build data's labels "
                        "are used to check the prior's predictive, so give the loader real labels or holdout=0")
    net = torch.softmax(mean.double(), dim=-1)
    reference = {k: v for k, v in _scores(net, y, net).items() if k != "agreement"}
    rows, losses = [], []
    for t in grid:
        probs = predictive_probs(mean, deviations, t)
        row = {"t": float(t), **_scores(probs, y, net)}
        # the prior is the network's Bayesian counterpart: it may change at most ACCURACY_SLACK of its top-1 answers
        # (on a few held-out images accuracy alone could be kept while the answers move)
        row["meets"] = _predicts_like_the_network(row, reference, nll_slack=0.0)
        rows.append(row)
        losses.append(metrics.nll_per_example(probs, y))
    feasible = [i for i, r in enumerate(rows) if r["meets"]]
    fallback = None
    ties: list[float] = []
    if feasible:
        best = lowest_with_gaps(rows, losses, feasible)
        chosen = rows[best]
        ties = sorted(rows[i]["t"] for i in feasible if i != best and rows[i]["nll_gap"] <= rows[i]["nll_gap_se"])
    else:
        chosen, fallback = _widest_tie(rows, reference)
    record = {"n": int(y.shape[0]), "mode": mode, "samples": samples, "network": reference,
              "predictive": {k: chosen[k] for k in ("accuracy", "nll", "ece")}, "t": chosen["t"],
              "met": bool(feasible), "ties_within_one_se": ties, "grid": rows}
    if fallback is not None:
        record["fallback"] = fallback
    return chosen["t"], record


def lowest_with_gaps(rows: Sequence[dict[str, Any]], losses: Sequence[Tensor], candidates: Sequence[int]) -> int:
    """Index of the candidate with the lowest mean loss; every candidate row gets its gap to it and that gap's
    standard error over the per-image differences (`nll_gap`, `nll_gap_se`).

    Near the network the held-out NLL is flat, and the lowest can beat its neighbours by less than the rounding
    that differs between machines, so the record says which widths the held-out images cannot tell apart from it.
    Breaking such ties toward the wider prior (glmnet's one-standard-error rule) was measured and not adopted: on
    resnet10t's transfer prior it widened ×316 to ×100 and cost the weight-space predictive 0.14 nats of NLL at 5
    shots (docs/benchmarks.md).
    """
    if not candidates:
        raise ValueError("lowest_with_gaps needs at least one candidate")
    best = min(candidates, key=lambda i: float(losses[i].mean()))
    for i in candidates:
        diff = losses[i] - losses[best]
        se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
        rows[i]["nll_gap"], rows[i]["nll_gap_se"] = float(diff.mean()), se
    return best


def _predicts_like_the_network(row: Mapping[str, float], reference: Mapping[str, float], *, nll_slack: float) -> bool:
    """A width's held-out scores against the network's: accuracy within ACCURACY_SLACK, NLL within `nll_slack`,
    ECE within ECE_SLACK, and all but ACCURACY_SLACK of its top-1 answers kept."""
    return (row["accuracy"] >= reference["accuracy"] - ACCURACY_SLACK and row["nll"] <= reference["nll"] + nll_slack
            and row["ece"] <= reference["ece"] + ECE_SLACK and row["agreement"] >= 1 - ACCURACY_SLACK)


def _widest_tie(rows: list[dict[str, Any]], reference: Mapping[str, float]) -> tuple[dict[str, Any], str]:
    """Where no width meets the conditions: the widest t that meets them with the NLL held to NLL_TIE, every
    narrower t meeting them too, else the narrowest t (the network itself, up to rounding)."""
    chosen = None
    for row in sorted(rows, key=lambda r: -r["t"]):  # from the network itself towards wider
        row["meets_within_nll_tie"] = _predicts_like_the_network(row, reference, nll_slack=NLL_TIE)
        if not row["meets_within_nll_tie"]:
            break
        chosen = row
    if chosen is None:
        return max(rows, key=lambda r: r["t"]), "the narrowest"
    return chosen, f"the widest within {NLL_TIE} nats of the network's NLL"


WIDTH_GRID: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)
"""Covariance multipliers T for a posterior's width, widest first."""
VALIDATION_WIDTH_GRID: tuple[float, ...] = (30.0, 10.0, 3.0, *WIDTH_GRID)
"""T's grid where held-out images choose it: up to 30× the Laplace posterior's covariance in the directions the
data saw (the body's floor keeps Q within the prior elsewhere, zoo.width). The training likelihood cannot judge
T > 1 (it only rejects), held-out images can: on efficientnet_gn at 5 and 20 shots T = 3–10 lowered the
predictive's test NLL by 0.03, on resnet10t at 5 shots it raised it by 0.015 (docs/benchmarks.md)."""
VALIDATION_PER_CLASS = 5
"""Validation images per class (on average) below which their NLL is too noisy to set a new head's scale: with 2
per class that choice cost efficientnet_gn 0.021 nats at one shot (zoo.head_evidence)."""
VALIDATION_WIDTH_PER_CLASS = 20
"""Validation images per class (on average) below which their NLL is too noisy to choose Q's width T. T moves the
predictive far less than a one-shot head's scale does: on benchmarks/transfer.py at 5 and 20 shots (5 seeds, both
networks) the choice on 5 per class moved NLL by −0.019 to +0.003 with signs that differ between cells, on 20 per
class it lowered NLL and ECE in every cell (docs/benchmarks.md)."""
TRAIN_LOGLIK_SLACK = 1.92
"""How far (nats, summed over the training set) the predictive may lower the training data's log-likelihood below
the trained network's: ½·χ²₁(0.95) = 1.92, Wilks' 95% likelihood-ratio interval for the one parameter T."""
JOINT_LOGLIK_SLACK = 2.996
"""½·χ²₂(0.95): Wilks' 95% region when two parameters are set on the same training likelihood, a new head's
shrinkage (zoo.head_evidence, where its evidence cannot choose) and then Q's width T. Together they may lower the
training log-likelihood by this much below the trained network's, not by 1.92 each."""


def joint_slack(parameters: int) -> float:
    """½·χ²ₖ(0.95) for k parameters set on one training likelihood (k = 1, 2 without scipy's 1 s import)."""
    if parameters == 1:
        return TRAIN_LOGLIK_SLACK
    if parameters == 2:
        return JOINT_LOGLIK_SLACK
    from scipy.stats import chi2

    return 0.5 * float(chi2.ppf(0.95, parameters))


def check_class_labels(y: Tensor, classes: int, message: str) -> None:
    """DataError(message) unless every label is a class index in [0, classes)."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DataError(message)


def validation_shortfall(y: Tensor, classes: int, per_class: int = VALIDATION_PER_CLASS) -> str | None:
    """Why validation labels `y` of `classes` classes are too few to choose on (None: enough); a DataError unless
    every label is a class index, the one check for the head's scale (zoo.head_evidence) and Q's width."""
    check_class_labels(y, classes, f"validation labels must be class indices in [0, {classes}), like the training "
                                   "labels")
    if y.numel() < per_class * classes:
        return (f"{y.numel()} validation images, fewer than {per_class} per class on average "
                f"({per_class * classes}): too few to choose on")
    return None


def _output_size(model: nn.Module, x: Tensor) -> int:
    """The network's number of outputs, from one image (eval mode, no gradients)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1].to(next(model.parameters()).device)).shape[-1])
    finally:
        model.train(training)


def select_width_on_validation(
    gaussian: Prior,
    batches: Iterable[Any],
    *,
    mode: str,
    samples: int,
    generator: torch.Generator,
    grid: Sequence[float] = VALIDATION_WIDTH_GRID,
    antithetic: bool = False,
) -> tuple[float | None, dict[str, Any]]:
    """The T whose predictive has the lowest NLL on labelled held-out `batches`; None where they hold fewer than
    VALIDATION_WIDTH_PER_CLASS images per class (the record's `unused` says so; the caller keeps the training rule).

    The training data can only reject a width (select_width); held-out images measure the predictive itself, so
    they may also widen Q past its Laplace covariance, as laplace-torch's grid search of the prior precision on a
    validation set does. Q may depend on any data, so this costs the certificate nothing. Too few images are
    found before any draw is made (a Kronecker draw of a whole network is the expensive part)."""
    x, y = gather_batches(batches, "the validation loader yielded no batches to choose Q's width on; pass labelled "
                                   "held-out images, or val_loader=None")
    shortfall = validation_shortfall(y, _output_size(network_of(gaussian), x), VALIDATION_WIDTH_PER_CLASS)
    if shortfall is not None:
        return None, {"rule": "validation", "unused": shortfall}
    mean, deviations = Predictor(gaussian, mode=mode, samples=samples, generator=generator,
                                 antithetic=antithetic).linear_parts(x)
    rows, losses = [], []
    for width in grid:
        probs = predictive_probs(mean, deviations, 1.0 / width)
        rows.append({"T": float(width), **_scores(probs, y)})
        losses.append(metrics.nll_per_example(probs, y))
    best = lowest_with_gaps(rows, losses, range(len(rows)))
    return rows[best]["T"], {"rule": "validation", "mode": mode, "samples": samples, "antithetic": antithetic,
                             "n": int(y.shape[0]),
                             "network": _scores(torch.softmax(mean.double(), dim=-1), y), "T": rows[best]["T"],
                             "met": True, "grid": rows}


def select_width(
    gaussian: Prior,
    batches: Iterable[Any],
    *,
    mode: str,
    samples: int,
    generator: torch.Generator,
    grid: Sequence[float] = WIDTH_GRID,
    spans: Mapping[str, Tensor] | None = None,
    slack: float = TRAIN_LOGLIK_SLACK,
    antithetic: bool = False,
) -> tuple[float, dict[str, Any]]:
    """The widest T (covariance × T) whose predictive the training data do not reject.

    `slack` (nats) is what is left of the likelihood-ratio region for T: TRAIN_LOGLIK_SLACK when T is the only
    parameter set on the training likelihood, less where the head's shrinkage already took part of
    JOINT_LOGLIK_SLACK (zoo.finetune).

    `spans` (Predictor) must come from these very batches' layer inputs; they make the draws cheaper, not different.
    `antithetic` (Predictor) halves the forward-mode products for the same number of samples.

    With 5–100 examples no bound and no held-out split can say how wide Q may be (at one shot per class every
    held-out image belongs to a class its fold never saw), and the Laplace evidence prefers widths whose
    predictive underfits (measured in benchmarks/transfer.py). What the data can say is how much uncertainty
    they tolerate: T stays in the likelihood-ratio interval of the training data (no accuracy lost, total
    log-likelihood within TRAIN_LOGLIK_SLACK nats of the network's), and the widest such Q still widens
    everywhere the data did not pin the network down, which is where new inputs and OOD inputs fall. A total,
    not a per-example, slack: five images can rule out far less than a hundred.
    """
    y, mean, deviations = _linear_parts(gaussian, batches, mode, samples, generator,
                                        "the training loader yielded no batches to choose the width on", spans,
                                        antithetic)
    reference = _scores(torch.softmax(mean.double(), dim=-1), y)
    rows = []
    for width in grid:
        row = {"T": float(width), **_scores(predictive_probs(mean, deviations, 1.0 / width), y)}
        row["meets"] = (row["accuracy"] >= reference["accuracy"]
                        and row["nll"] <= reference["nll"] + slack / y.shape[0])
        rows.append(row)
    feasible = [r for r in rows if r["meets"]]
    chosen = max(feasible, key=lambda r: r["T"]) if feasible else min(rows, key=lambda r: r["T"])
    return chosen["T"], {"rule": "training likelihood", "mode": mode, "samples": samples, "antithetic": antithetic,
                         "n": int(y.shape[0]),
                         "network": reference, "slack": slack, "T": chosen["T"], "met": bool(feasible), "grid": rows}
