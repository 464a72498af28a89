"""Approximations for three or more terms, or two terms plus damping (docs/method.md §4).

- "eigenbasis": keep the prior exact (the last term with the damping, or the last two terms) and take every
  other term's diagonal in the prior's decomposed coordinates (the EKFAC idea). The result stays PD, and
  changing any scale only reweights, so fitting scales never decomposes again.
- "kronecker": the nearest single Kronecker product in Frobenius norm (Van Loan–Pitsianis). Rearranged, the sum
  is the rank-K matrix Σ s_k vec(A_k) vec(G_k)ᵀ; its top singular pair lies in the span of the terms, so a power
  iteration on K coefficients with the Gram matrices tr(A_k A_l), tr(G_k G_l) finds it without d × d work.
  Non-negative coefficients keep the product PSD.
- "ekfac": the eigenbasis of that nearest Kronecker product, with the exact diagonal of every term refitted in
  it. In an orthogonal basis the diagonal of UᵀΛU is the Frobenius-optimal diagonal, and Â⊗Ĝ is itself diagonal
  there, so this is never worse than "kronecker" in Frobenius norm. Rescaling keeps the basis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zoo.errors import NumericalError
from zoo.kron.decomposition import Decomposition
from zoo.kron.exact import Eigh, EighOf, eigh_psd, single_term, two_terms

APPROXIMATIONS = ("eigenbasis", "kronecker", "ekfac")


def eigenbasis(
    a: Sequence[Tensor],
    g: Sequence[Tensor],
    scales: Tensor,
    damping: float,
    eig_a: EighOf,
    eig_g: EighOf,
    rtol: float,
) -> Decomposition:
    """Exact prior part, diagonal of the other terms in its basis."""
    k = len(a)
    if damping > 0:
        base = single_term(eig_a(k - 1), eig_g(k - 1), scales[k - 1].item(), damping, index=k - 1)
        rest = range(k - 1)
    else:
        base = two_terms(
            (a[k - 2], a[k - 1]), (g[k - 2], g[k - 1]),
            lambda j: eig_a(k - 2 + j), lambda j: eig_g(k - 2 + j),
            (scales[k - 2].item(), scales[k - 1].item()), (k - 2, k - 1), rtol,
        )
        rest = range(k - 2)
    return with_diagonal_terms(base, a, g, scales, list(rest))


def with_diagonal_terms(
    base: Decomposition, a: Sequence[Tensor], g: Sequence[Tensor], scales: Tensor, rest: list[int]
) -> Decomposition:
    """Add terms `rest` to `base` as their diagonals diag(Tᵀ A T) ⊗ diag(Tᵀ G T) in base's coordinates."""
    t_in, t_out = base.side_in.T, base.side_out.T
    extra_in = [((a[i] @ t_in) * t_in).sum(0) for i in rest]
    extra_out = [((g[i] @ t_out) * t_out).sum(0) for i in rest]
    return Decomposition(
        side_in=base.side_in,
        side_out=base.side_out,
        coords_in=torch.cat([base.coords_in, *(c[None] for c in extra_in)]),
        coords_out=torch.cat([base.coords_out, *(c[None] for c in extra_out)]),
        weights=torch.cat([base.weights, scales[rest].to(base.weights)]),
        term_index=base.term_index + tuple(rest),
    )


def gram(xs: Sequence[Tensor]) -> Tensor:
    """tr(X_k X_l) for symmetric X: the Frobenius Gram matrix."""
    flat = torch.stack([x.reshape(-1) for x in xs])
    return flat @ flat.T


def nearest_kronecker(
    a: Sequence[Tensor], g: Sequence[Tensor], weights: Tensor, iterations: int = 500, tol: float = 1e-15
) -> tuple[Tensor, Tensor]:
    """(Â, Ĝ) minimising ‖Σ w_k A_k⊗G_k − Â⊗Ĝ‖_F, with Â = Σ c_k A_k and Ĝ = Σ e_k G_k."""
    ga, gg = gram(a), gram(g)
    w = weights.to(ga)
    e = torch.ones_like(w)
    c = torch.zeros_like(w)
    for _ in range(iterations):
        c_new = w * (gg @ e)
        c_new = c_new / c_new.norm()
        e = w * (ga @ c_new)
        done = (c_new - c).abs().max().item() < tol
        c = c_new
        if done:
            break
    # The optimal split: Â = c/|c|, Ĝ = R ᵀ vec(Â), so that Â⊗Ĝ is the projection onto the top singular pair.
    e = w * (ga @ c) / (c @ ga @ c)
    a_hat = sum(ck * ak for ck, ak in zip(c, a, strict=True))
    g_hat = sum(ek * gk for ek, gk in zip(e, g, strict=True))
    if not (torch.isfinite(a_hat).all() and torch.isfinite(g_hat).all()):
        raise NumericalError("the nearest-Kronecker power iteration diverged; check the factors for huge values")
    # Balance the arbitrary split so neither factor under- or overflows.
    ratio = (g_hat.norm() / a_hat.norm()).sqrt()
    return a_hat * ratio, g_hat / ratio


def kronecker(
    a: Sequence[Tensor], g: Sequence[Tensor], scales: Tensor, damping: float, rtol: float
) -> tuple[Decomposition, Eigh, Eigh]:
    """The single-Kronecker approximation, decomposed in the eigenbases of Â and Ĝ."""
    a_all, g_all, w = list(a), list(g), scales.clone()
    if damping > 0:
        a_all.append(torch.eye(a[0].shape[0], dtype=a[0].dtype, device=a[0].device))
        g_all.append(torch.eye(g[0].shape[0], dtype=g[0].dtype, device=g[0].device))
        w = torch.cat([w, torch.tensor([damping], dtype=w.dtype, device=w.device)])
    a_hat, g_hat = nearest_kronecker(a_all, g_all, w)
    ea, eg = eigh_psd(a_hat, "Â", rtol), eigh_psd(g_hat, "Ĝ", rtol)
    return single_term(ea, eg, 1.0, 0.0, index=-2), ea, eg


def ekfac(a: Sequence[Tensor], g: Sequence[Tensor], scales: Tensor, damping: float, rtol: float) -> Decomposition:
    """Every term's exact diagonal in the eigenbasis of the nearest Kronecker product."""
    nearest, _, _ = kronecker(a, g, scales, damping, rtol)
    ones_in, ones_out = torch.ones_like(nearest.coords_in[:1]), torch.ones_like(nearest.coords_out[:1])
    empty = Decomposition(
        side_in=nearest.side_in, side_out=nearest.side_out,
        coords_in=ones_in[:0], coords_out=ones_out[:0], weights=nearest.weights[:0], term_index=(),
    )
    if damping > 0:
        empty = Decomposition(
            side_in=nearest.side_in, side_out=nearest.side_out, coords_in=ones_in, coords_out=ones_out,
            weights=torch.tensor([damping], dtype=nearest.weights.dtype, device=nearest.weights.device),
            term_index=(-1,),
        )
    return with_diagonal_terms(empty, a, g, scales, list(range(len(a))))
