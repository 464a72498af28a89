"""How wide zoo.finetune makes Q: the rule that picks between the Laplace width and the bound-fitted one, the
likelihood-ratio slack Q's width T may spend, the body's floor, and the pinned new heads (docs/method.md §6).

zoo.calibration chooses T on data; this module holds the policy around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo.calibration import TRAIN_LOGLIK_SLACK, WIDTH_GRID, joint_slack
from zoo.layers import Layer
from zoo.pacbayes import kl_bound
from zoo.posterior import Posterior
from zoo.posterior_fit import PosteriorFit
from zoo.prior import Prior
from zoo.scales import LayerSpectrum

WIDTHS = ("auto", "laplace", "bound")
AUTO_BOUND = 0.2
"""width="auto" fits the bound-based Q when even zero training error would certify below this. At 0.5 it took the
isotropic prior's 5-shot posteriors (KL under 7 nats once the head is re-fitted) to the bound-fitted width, whose
predictive fell to 0.21–0.40 accuracy on 4 of 5 seeds (benchmarks/transfer.py): a bound near 0.5 says little."""
BODY_COVARIANCE_FLOOR = 1.0
"""The first width choice's body precision is F_new + max(κ, this)·P: the evidence may weaken the prior for the mean,
not widen Q past it (BODY_FLOOR_FOLLOWS_WIDTH then lowers this to the width found)."""
BODY_FLOOR_FOLLOWS_WIDTH = True
"""Q = (F_new + κ̄P)/T is never wider than P where κ̄ ≥ T. So once T₁ is chosen with κ̄ = max(κ, 1), the body's
floor drops to max(κ, T₁) and T is chosen again at or below T₁: where κ < T the body's precision is F_new/T + P, the
training curvature tempered by T against the prior at its full, upstream-checked width, instead of (F_new + P)/T,
T times narrower than the prior in every direction the data did not see. That body spread is the part that grows
on inputs unlike the training data (benchmarks/ood_sets.py): on efficientnet_gn at 5 and 20 shots it lowered the
predictive's NLL and ECE and raised its AUROC against uniform noise (docs/method.md §6)."""


def body_floor(kappa: dict[str, float], groups: dict[str, str], at_least: float) -> dict[str, float]:
    """κ̄ per layer: max(κ, at_least) in the pretrained body, κ in a new head."""
    return {name: (max(k, at_least) if groups[name] == "body" else k) for name, k in kappa.items()}


WIDTH_NOTE = (
    "laplace: Q = (F_new + κ̄P)/T, κ in a new head, T the widest on calibration.WIDTH_GRID whose predictive keeps "
    "the training data's accuracy and its total log-likelihood within 1.92 nats (Wilks' 95% interval), or, where a "
    "new head was shrunk by the likelihood-ratio rule, within what that left of the two parameters' joint 3.00 nats "
    "(zoo.width.width_slack), with that head's covariance pinned at PINNED_HEAD_WIDTH·T (its τ in scales); "
    "in the body κ̄ = max(κ, T₁), T₁ that widest T with κ̄ = max(κ, 1), and T chosen again at "
    "or below T₁ (selection['first']), so Q is never wider than the prior and, where κ < T, equal to it in the "
    "directions the data did not see; where a new head has Böhning's curvature and is not pinned, T must also pass "
    "the same test with each training example left out of the head's precision and mean (zoo.head_loo: a new "
    "image's features lie mostly outside the shots' span, which the in-sample test cannot see); given val_loader "
    "with at least VALIDATION_WIDTH_PER_CLASS images per class, both "
    "choices take instead the T on calibration.VALIDATION_WIDTH_GRID (up to 30) with the lowest NLL of the "
    "predictive on those images (selection['rule'] 'validation'); bound: scales fitted on the Taylor bound, s by "
    "the kl-bound."
)


def auto_width(mean: dict[str, Tensor], layers: dict[str, Layer], reference: Prior, spectra: Sequence[LayerSpectrum],
               n: int, delta: float) -> str:
    """"bound" where the Laplace Q's kl-bound at zero training error is below AUTO_BOUND (a bound can then be
    informative), else "laplace".

    KL(Q ‖ κP) is at least its mean term ½Σκ·m (the rest is a KL between zero-mean Gaussians, ≥ 0), which the
    spectra already hold; where that alone puts the kl-bound above AUTO_BOUND, as in every few-shot fine-tune, the
    exact KL (1.5 s of a 1-shot resnet10t fit) cannot change the answer and is not computed."""
    if kl_bound(0.0, 0.5 * sum(sp.mahalanobis for sp in spectra), n, delta) >= AUTO_BOUND:
        return "laplace"
    kl = Prior(mean, layers, {}).kl(reference).item()
    return "bound" if kl_bound(0.0, kl, n, delta) < AUTO_BOUND else "laplace"


def width_slack(head_record: Mapping[str, Mapping[str, Any]]) -> float:
    """The training log-likelihood Q's width T may give up: ½χ²₁(0.95) when T is the only parameter the training
    likelihood sets; where k new heads were shrunk by the likelihood-ratio rule too, what they left of the joint
    ½χ²ₖ₊₁(0.95) region (none left: T is as narrow as the grid allows)."""
    given_up = likelihood_ratio_heads(head_record)
    if not given_up:
        return TRAIN_LOGLIK_SLACK
    return max(joint_slack(len(given_up) + 1) - sum(given_up.values()), 0.0)


def likelihood_ratio_heads(head_record: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{head: training log-likelihood its shrinkage gave up} for the new heads re-fitted by the likelihood-ratio rule
    (zoo.head_evidence records that loss only for them): the one test both width_slack and the pin use."""
    return {name: float(r["loglik_given_up"]) for name, r in head_record.items() if "loglik_given_up" in r}


PINNED_HEAD_WIDTH = WIDTH_GRID[-1]
"""Covariance multiplier of a new head whose scale the evidence could not set, on top of Q's width T."""


def unidentified_heads(head_record: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{head: precision factor 1/PINNED_HEAD_WIDTH} for each new head shrunk by the likelihood-ratio rule.

    Where the evidence cannot set a head's precision (one shot per class), the shots cannot tell its spread from
    its shrinkage either: both only temper every prediction alike (its logit variance grows with the feature norm
    alone). The shrinkage takes the joint likelihood-ratio region (zoo.head_evidence) and the head's spread is
    pinned near zero, so Q's width T is chosen on, and its epistemic spread comes from, the body, whose prior was
    checked upstream and widens most on inputs unlike the shots. Measured in benchmarks/transfer.py and
    benchmarks/suite_task.py at one shot (docs/method.md §6)."""
    return dict.fromkeys(likelihood_ratio_heads(head_record), 1.0 / PINNED_HEAD_WIDTH)


SHARPEN_NOTE = (
    "Q = (s·β F_new + α P)/τ with s picked from the grid by the kl-bound on a Monte Carlo estimate of the Gibbs "
    "training error from draws independent of the certificate's; Q may depend on the data, so this costs the "
    "certificate nothing. It corrects the Taylor fit where the Fisher underestimates the curvature (confident fits)."
)
SHARPEN_GRID = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def select_sharpen(
    model: nn.Module, prior: Prior, pieces: PosteriorFit, mean: dict[str, Tensor], loader: Iterable[Any],
    grid: Sequence[float] | None, samples: int, delta: float, generator: torch.Generator, progress: bool,
) -> tuple[float, list[dict[str, float]]]:
    """The curvature multiplier s whose Q has the lowest kl-bound on a selection estimate of its Gibbs error."""
    values = tuple(grid) if grid is not None else SHARPEN_GRID
    if len(values) == 1 or samples == 0:
        return float(values[0]), []
    rows = []
    for s in tqdm(values, desc="choosing the posterior width", unit="width", disable=not progress):
        candidate = Posterior(mean, pieces.layers(s), {}, model=model, prior=prior)
        kl = candidate.kl(prior).item()
        errors, n = candidate.gibbs_errors(loader, samples, generator)
        rows.append({"sharpen": s, "gibbs_train_error": errors / (n * samples), "kl": kl,
                     "kl_bound": kl_bound(errors / (n * samples), kl, n, delta)})
    best = min(rows, key=lambda r: (r["kl_bound"], r["kl"]))
    return best["sharpen"], rows
