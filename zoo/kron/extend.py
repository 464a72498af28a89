"""A new Kronecker term added to an existing precision, in that precision's own decomposition (docs/method.md §4).

A posterior precision scale·(A ⊗ G) + prior_scale·P keeps the prior's basis: P is already diagonal there (D_P),
and the new term contributes its exact diagonal diag(T_outᵀ G T_out) diag(T_inᵀ A T_in)ᵀ in the same coordinates
(the EKFAC idea, applied to whatever decomposition P has, including a posterior's own, so chains of tasks keep
one basis). The result is a valid Gaussian in its own right: its sampling, log-determinant and KL to P are exact
for the precision it represents, so a PAC-Bayes certificate computed on it stays rigorous, and its
`approximation_error` measures how far it is from the dense sum. Two cases are exact and used as such:

- P isotropic (c·I, one (cI, cI) term plus damping): scale·A⊗G + prior_scale·c·I, one term plus damping,
  decomposed in the eigenbases of A and G (a few-shot A's from its low-rank root, without the n³ eigensolver);
- P one term without damping: the exact two-term decomposition (zoo.kron.exact).

In every case the new term's rows have term index 0 and the prior's rows the others, so `split_diagonal` returns
the two diagonals E and D_P whose ratio u = E / D_P is what `zoo.scales.fit_scales` needs, and `rescale_parts`
changes both scales without decomposing again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.errors import InvalidFactorError
from zoo.kron.decomposition import Decomposition
from zoo.kron.exact import Eigh
from zoo.kron.lowrank import congruence_diagonal, low_rank_root, root_eigh
from zoo.kron.precision import KronPrecision
from zoo.kron.validate import check_psd as validate_psd
from zoo.kron.validate import check_psd_eigenvalues, diagonal_of

__all__ = ["extend", "isotropic_value", "rescale_parts", "split_diagonal"]


def isotropic_value(p: KronPrecision) -> float | None:
    """c when the precision is exactly c·I (one term with A ∝ I and G ∝ I, plus damping), else None."""
    if len(p.terms) != 1:
        return None
    a, g = p.A[0], p.G[0]
    values = []
    for x in (a, g):
        diag = x.diagonal()
        # the O(n) test first: a curvature factor's diagonal is never constant, so it skips the O(n²) one
        if not bool(diag.eq(diag[0]).all()) or diagonal_of(x) is None:
            return None
        values.append(diag[0].item())
    return p.scales[0].item() * values[0] * values[1] + p.damping


def _check_scale(value: float, name: str) -> float:
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise InvalidFactorError(f"{name} must be positive and finite, got {value}")
    return x


def extend(prior: KronPrecision, a: Tensor, g: Tensor, scale: float = 1.0, prior_scale: float = 1.0) -> KronPrecision:
    """scale·(A ⊗ G) + prior_scale·prior, with the new term's exact diagonal in the prior's decomposition.

    `is_exact` tells whether the result equals the dense sum (isotropic or one-term priors) or only its diagonal
    in the prior's basis (then `approximation_error` is the measured relative Frobenius error). Against an
    isotropic prior, and on that second path, the result's `new_input_root` holds the low-rank root (L,
    ‖A − LLᵀ‖_F) of A it used, or None when A has none (zoo.kron.lowrank), so that callers needing A's span
    (zoo.posterior_fit.training_spans) do not search again.
    """
    s, ps = _check_scale(scale, "scale"), _check_scale(prior_scale, "prior_scale")
    new = KronPrecision([(a, g)], [s], approximation="eigenbasis", check_psd=False)  # checked below, per path
    if new.shape != prior.shape:
        raise InvalidFactorError(f"the new term is over {new.shape} weights but the prior over {prior.shape}")
    iso = isotropic_value(prior)
    if iso is not None:
        out = new.rescaled(damping=ps * iso)
        # the decomposition's eigenbases, without the n³ eigensolver where a factor has a root
        root_a = _low_rank_eigh(out.A[0], "A", out._rtol)
        root_g = _low_rank_eigh(out.G[0], "G", out._rtol)
        out.provide_factor_eigh(0, a=None if root_a is None else root_a[0], g=None if root_g is None else root_g[0])
        out.new_input_root = None if root_a is None else root_a[1]
        return out
    if len(prior.terms) == 1 and prior.damping == 0:
        validate_psd(new.A[0], "A", new._rtol)
        validate_psd(new.G[0], "G", new._rtol)
        return new + prior * ps  # two terms: exact, the prior (last) term whitens
    base = prior.decomposition()
    shifted = Decomposition(
        side_in=base.side_in, side_out=base.side_out, coords_in=base.coords_in, coords_out=base.coords_out,
        weights=base.weights * ps, term_index=tuple(i + 1 if i >= 0 else i for i in base.term_index),
    )
    out = new + prior * ps
    c_in, out.new_input_root = _psd_diagonal(out.A[0], base.side_in.T, "A", out._rtol)
    c_out, _ = _psd_diagonal(out.G[0], base.side_out.T, "G", out._rtol)
    out._dec = Decomposition(
        side_in=shifted.side_in, side_out=shifted.side_out,
        coords_in=torch.cat([shifted.coords_in, c_in[None]]), coords_out=torch.cat([shifted.coords_out, c_out[None]]),
        weights=torch.cat([shifted.weights, out.scales[:1].to(shifted.weights)]), term_index=(*shifted.term_index, 0),
    )
    return out


ROOT_EIGH_MIN_SIZE = 1024
"""Factors narrower than this keep LAPACK's eigh against an isotropic prior: it takes under 0.1 s at 512 (0.7 s at
1024, 5 s at 2048, one thread, measured), and keeping it keeps the seeded draws of a new head (always against an
isotropic prior) what they were before the root route existed."""


def _low_rank_eigh(x: Tensor, name: str, rtol: float) -> tuple[Eigh, tuple[Tensor, float]] | None:
    """(X's eigendecomposition, the root it came from) for a new factor of low numerical rank whose root also
    certifies it PSD (as in _psd_diagonal), in O(n²r) (zoo.kron.lowrank.root_eigh); else None, after checking X PSD.

    Used where the prior is isotropic: any basis diagonalises it, so the posterior needs only the new factors'
    eigenbases, and a few-shot factor's is its root's range plus any completion (the eigenvalues dropped are within
    ROUNDING_MULTIPLE·eps·‖X‖_F, the rounding X carries). 44 s → 2 s of a 1-shot resnet10t fit, measured."""
    found = low_rank_root(x.double(), rtol * rtol) if x.shape[0] >= ROOT_EIGH_MIN_SIZE else None
    if not _certifies_psd(found, rtol):
        validate_psd(x, name, rtol)
        return None
    values, vectors = root_eigh(found[0])
    return (check_psd_eigenvalues(values, name, rtol), vectors), found


def _certifies_psd(found: tuple[Tensor, float] | None, rtol: float) -> bool:
    """Whether a root L with remainder S = X − LLᵀ proves X PSD at tolerance rtol: ‖S‖_F ≤ ½·rtol·λmax(LLᵀ) gives
    λmin(X) ≥ −‖S‖₂ ≥ −rtol·λmax(X)."""
    return found is not None and found[1] <= 0.5 * rtol * torch.linalg.eigvalsh(found[0].T @ found[0]).max().item()


def _psd_diagonal(x: Tensor, t: Tensor, name: str, rtol: float) -> tuple[Tensor, tuple[Tensor, float] | None]:
    """(diag(Tᵀ X T) of a PSD factor, the low-rank root it came from or None): rounding-level negatives
    (≥ −rtol·‖X‖_F) are zeros, anything lower raises.

    A few-shot factor of low numerical rank takes the O(n²r) pivoted-Cholesky route (zoo.kron.lowrank), exact to
    the factor's own rounding. An accepted root L also certifies X PSD to the factor's tolerance when the remainder
    S = X − LLᵀ has ‖S‖_F ≤ ½·rtol·λmax(LLᵀ) (then λmin(X) ≥ −‖S‖₂ ≥ −rtol·λmax(X)); otherwise one Cholesky checks
    it (zoo.kron.validate.check_psd). rtol is √eps of the factor's dtype."""
    values, found = congruence_diagonal(x, t, rtol * rtol)
    if not _certifies_psd(found, rtol):
        validate_psd(x, name, rtol)
    floor = -rtol * torch.linalg.matrix_norm(x).item()
    if values.min().item() < floor:
        raise InvalidFactorError(f"the new {name} factor is not positive semi-definite in the prior's basis (a "
                                 f"diagonal entry {values.min().item():.3g} < {floor:.3g}); check the curvature pass")
    return torch.where(values < 0, torch.zeros_like(values), values), found


def split_diagonal(q: KronPrecision) -> tuple[Tensor, Tensor]:
    """(E, R), both (out × in): the diagonal of the new term (index 0) and of the prior's part, in q's basis."""
    dec = q.decomposition()
    index = torch.tensor(dec.term_index, device=dec.weights.device)
    new_rows = index == 0
    if not bool(new_rows.any()):
        raise InvalidFactorError("this precision has no new term (index 0); build it with zoo.kron.extend")

    def part(mask: Tensor) -> Tensor:
        return torch.einsum("j,jo,ji->oi", dec.weights[mask], dec.coords_out[mask], dec.coords_in[mask])

    return part(new_rows), part(~new_rows)


def rescale_parts(q: KronPrecision, new_factor: float, prior_factor: float) -> KronPrecision:
    """q with its new term multiplied by new_factor and its prior part by prior_factor, in the same basis."""
    a, b = _check_scale(new_factor, "new_factor"), _check_scale(prior_factor, "prior_factor")
    dec = q.decomposition()
    index = torch.tensor(dec.term_index, device=dec.weights.device)
    factors = torch.where(index == 0, a, b).to(dec.weights)
    scales = q.scales.clone()
    scales[0] *= a
    scales[1:] *= b
    out = q._derived(scales, q.damping * b)
    out._dec = dec.reweighted(dec.weights * factors)
    return out
