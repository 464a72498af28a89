"""The prior strength κ chosen by the Laplace marginal likelihood (docs/method.md §6, "Widths").

With Q = N(θ̂, (F + κP)⁻¹) the Laplace evidence of the prior κP is, up to terms free of κ,

    log Z(κ) = −½ κ m − ½ Σ_i log(1 + u_i / κ),    m = (θ̂ − μ)ᵀ P (θ̂ − μ),  u = E/R,

where u are the ratios of F's diagonal to P's in the basis shared by the two (the same spectra `zoo.scales` fits
on, exact for isotropic and one-term priors). It measures how well the prior predicts the training data, which
is what a width has to serve when every PAC-Bayes bound is vacuous (n of 5–100). κ comes from a fixed geometric
grid so that a certificate against κP can pay for the choice with a union bound over the grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from zoo.errors import NumericalError
from zoo.scales import LayerSpectrum

STRENGTH_GRID: tuple[float, ...] = tuple(10.0 ** k for k in range(-10, 3))
"""κ candidates, 1e-10 … 1e2: from 'the prior barely constrains' to 'a hundred times the prior's precision'.
A prior whose width was checked on upstream data can be far narrower than a new task needs, hence the range."""


def log_evidence(spectra: Sequence[LayerSpectrum], kappa: float) -> float:
    """log Z(κ) up to a constant in κ, summed over the layers (one κ for all of them)."""
    total = 0.0
    for sp in spectra:
        total += -0.5 * kappa * sp.mahalanobis - 0.5 * torch.log1p(sp.ratios / kappa).sum().item()
    if not math.isfinite(total):
        raise NumericalError(f"the Laplace evidence at κ = {kappa:g} is {total}; the curvature has non-finite "
                             "entries, check the training data for NaN")
    return total


def choose_strength(
    spectra: Sequence[LayerSpectrum], grid: Sequence[float] = STRENGTH_GRID
) -> tuple[float, list[dict[str, float]]]:
    """The grid κ of highest evidence, with the evidence of every candidate (for the record)."""
    rows = [{"kappa": float(k), "log_evidence": log_evidence(spectra, float(k))} for k in grid]
    best = max(rows, key=lambda r: r["log_evidence"])
    return best["kappa"], rows


def choose_strengths(
    spectra: Sequence[LayerSpectrum], groups: Mapping[str, str], grid: Sequence[float] = STRENGTH_GRID
) -> tuple[dict[str, float], dict[str, list[dict[str, float]]]]:
    """One κ per group of layers (`groups`: spectrum name → group); the evidence separates over layers."""
    by_group: dict[str, list[LayerSpectrum]] = {}
    for sp in spectra:
        by_group.setdefault(groups[sp.name], []).append(sp)
    chosen: dict[str, float] = {}
    tables: dict[str, list[dict[str, float]]] = {}
    for group, members in sorted(by_group.items()):
        chosen[group], tables[group] = choose_strength(members, grid)
    return chosen, tables
