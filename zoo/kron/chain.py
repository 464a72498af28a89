"""Precisions of a task chain, prior + F₁ + … + F_t, kept at constant size (docs/method.md §4, §8).

A chain adds one Kronecker term per task. Stored as is, the artifact would grow with every task, so the chain
keeps the latest task's term exact and folds everything older into one Kronecker term (the paper's nearest
Kronecker product, Van Loan–Pitsianis), with the damping kept exact beside it:

    Λ_t = A_t⊗G_t + Â⊗Ĝ + δI,     Â⊗Ĝ ≈ the older terms.

That is at most two terms plus damping, whatever t is. How operations use it (its decomposition) is the
precision's own `approximation`; the two errors that matter, of the folding and of the decomposition, are
measured against the exact sum on factors (`relative_error`), or on the dense matrix for small layers
(`dense_kl`), never assumed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.errors import InvalidFactorError, NumericalError
from zoo.kron.approx import gram, nearest_kronecker
from zoo.kron.decomposition import frobenius_inner_terms, frobenius_norm_sq
from zoo.kron.precision import Approximation, KronPrecision

__all__ = ["add_term", "dense_kl", "fold", "leading_term", "relative_error"]


def fold(p: KronPrecision) -> KronPrecision:
    """All of p's terms as their nearest single Kronecker product, damping kept exactly (one term + damping).

    One term (with or without damping) is returned unchanged: there is nothing to fold.
    """
    if len(p.terms) == 1:
        return p
    a_hat, g_hat = nearest_kronecker(p.A, p.G, p.scales)
    return KronPrecision([(a_hat, g_hat)], [1.0], p.damping, approximation=p.approximation, rtol=p._rtol)


def leading_term(p: KronPrecision) -> KronPrecision:
    """p's first term alone, scale 1, with p's tolerance (its factors were checked when p was built)."""
    a, g = p.terms[0]
    return KronPrecision([(a, g)], check_psd=False, rtol=p._rtol)


def add_term(prior: KronPrecision, term: KronPrecision, *, approximation: Approximation | None = None,
             exact: KronPrecision | None = None) -> tuple[KronPrecision, KronPrecision]:
    """(term + fold(prior) when prior has two or more terms, else term + prior; the exact running sum).

    `term` is the new task's curvature, one Kronecker term. `exact` is the exact sum the prior stands for
    (default: the prior itself); the second result is term + exact with every term kept, for measuring the first
    against it. It lives in memory only.
    """
    if len(term.terms) != 1 or term.damping != 0:
        raise InvalidFactorError("the new term must be a single Kronecker product without damping")
    if term.shape != prior.shape:
        raise InvalidFactorError(f"the new term is over {term.shape} weights but the prior over {prior.shape}")
    base = fold(prior) if len(prior.terms) > 1 else prior
    reference = exact if exact is not None else prior
    lead = term.rescaled()  # a copy that carries the chain's approximation; sums reuse checked factors
    lead.approximation = approximation or prior.approximation
    return lead + base, lead + reference


def relative_error(used: KronPrecision, exact: KronPrecision) -> float:
    """‖Λ_used − Λ_exact‖_F / ‖Λ_exact‖_F on factors, Λ_used being what `used`'s operations apply.

    Λ_exact is the plain sum of `exact`'s terms and damping (never its decomposition), so a chain's folding and
    its decomposition are both counted. Float64 floor about 1e-8.
    """
    if used.shape != exact.shape:
        raise InvalidFactorError(f"cannot compare precisions over {used.shape} and {exact.shape} weights")
    dec = used.decomposition()
    a, g, w = _terms_with_damping(exact)
    target_sq = (w[:, None] * w[None, :] * gram(a) * gram(g)).sum()
    cross = sum(wk * frobenius_inner_terms(dec, ak.to(dec.dtype), gk.to(dec.dtype))
                for wk, ak, gk in zip(w, a, g, strict=True))
    err_sq = (frobenius_norm_sq(dec) - 2 * cross + target_sq).item()
    if not math.isfinite(err_sq) or err_sq < -1e-10 * target_sq.item():
        raise NumericalError(f"the approximation error is not computable (‖E‖² = {err_sq:.3g}); report this")
    return math.sqrt(max(err_sq, 0.0) / target_sq.item())


def dense_kl(used: KronPrecision, exact: KronPrecision) -> float:
    """KL(N(0, Λ_used⁻¹) ‖ N(0, Λ_exact⁻¹)) in nats on the dense d × d matrices (small layers only: O(d³)).

    What the approximation costs a certificate or a predictive that uses it in place of the exact sum.
    """
    lu = used.decomposition().dense()
    le = exact.target_dense().to(lu)
    d = lu.shape[0]
    cu, ce = torch.linalg.cholesky_ex(lu), torch.linalg.cholesky_ex(le)
    if int(cu.info) or int(ce.info):
        raise NumericalError("a chain precision is not positive definite; the curvature pass produced an "
                             "invalid factor, report this")
    lu_chol, le_chol = cu.L, ce.L
    trace = torch.cholesky_solve(le, lu_chol).diagonal().sum()
    logdet_u = 2 * lu_chol.diagonal().log().sum()
    logdet_e = 2 * le_chol.diagonal().log().sum()
    kl = 0.5 * (trace - d + logdet_u - logdet_e).item()
    if not math.isfinite(kl) or kl < -1e-8 * d:  # below rounding level: a bug, never clamped away
        raise NumericalError(f"KL between the chain's precision and the exact sum is {kl}; report this")
    return kl


def _terms_with_damping(p: KronPrecision) -> tuple[list[Tensor], list[Tensor], Tensor]:
    a, g, w = list(p.A), list(p.G), p.scales
    if p.damping > 0:
        out, inn = p.shape
        a.append(torch.eye(inn, dtype=a[0].dtype, device=a[0].device))
        g.append(torch.eye(out, dtype=g[0].dtype, device=g[0].device))
        w = torch.cat([w, torch.tensor([p.damping], dtype=w.dtype, device=w.device)])
    return a, g, w
