"""KL divergence between Kronecker-factored Gaussians, on factors only (docs/method.md §5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.errors import InvalidFactorError, NumericalError
from zoo.kron.decomposition import mixed_trace
from zoo.kron.precision import KronPrecision

KL_ROUNDING_RTOL = 1e-9
"""A KL this far below 0, relative to the size of its terms, is rounding and reads as 0; anything lower raises."""


def kl_divergence(mean_q: Tensor, p_q: KronPrecision, mean_p: Tensor, p_p: KronPrecision) -> Tensor:
    """KL(N(mean_q, P_q⁻¹) ‖ N(mean_p, P_p⁻¹)) in nats, differentiable in both means.

    ½ [tr(Λ_p Σ_q) + Δᵀ Λ_p Δ − d + log det Λ_q − log det Λ_p]. When both precisions share one orthogonal basis
    (a posterior built on its prior's eigenbasis), the trace and log-determinants combine as Σ (r − 1 − log r) with
    r = D_p / D_q, each term non-negative, so the KL is accurate even when it is tiny.
    """
    if p_q.shape != p_p.shape:
        raise InvalidFactorError(f"precisions are over {p_q.shape} and {p_p.shape} weights; they must match")
    for name, m in (("mean_q", mean_q), ("mean_p", mean_p)):
        if not isinstance(m, Tensor) or tuple(m.shape) != p_q.shape:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise InvalidFactorError(f"{name} must have shape {p_q.shape}, got {got}")
    dq, dp = p_q.decomposition(), p_p.decomposition()
    delta = mean_q.to(p_p.device, torch.float64) - mean_p.to(p_p.device, torch.float64)
    mahalanobis = p_p.quadratic(delta)
    shared = (
        dq.side_in.orthogonal and dp.side_in.orthogonal and dq.side_out.orthogonal and dp.side_out.orthogonal
        and dq.side_in.T is dp.side_in.T and dq.side_out.T is dp.side_out.T
    )
    if shared:
        r = dp.positive_diagonal() / dq.positive_diagonal()
        kl = 0.5 * ((r - 1 - r.log()).sum() + mahalanobis)
        scale = r.numel()
    else:
        trace = mixed_trace(dp, dq)
        ld_q, ld_p = dq.logdet(), dp.logdet()
        kl = 0.5 * (trace + mahalanobis - p_q.dim + ld_q - ld_p)
        scale = abs(trace.item()) + p_q.dim + abs(ld_q.item()) + abs(ld_p.item())
    value = kl.item()
    if not math.isfinite(value):
        raise NumericalError(f"KL is {value}; one of the precisions is degenerate (check scales and damping)")
    if value < 0:
        if value < -KL_ROUNDING_RTOL * scale:
            raise NumericalError(
                f"KL came out negative ({value:.3g}) beyond rounding; the precisions are ill-conditioned — "
                "increase damping or report this"
            )
        kl = kl - kl.detach()  # rounding of an exact zero: report 0 (gradient kept)
    return kl


def kl_to_isotropic(mean_q: Tensor, p_q: KronPrecision, lam: float) -> Tensor:
    """KL(N(mean_q, P_q⁻¹) ‖ N(0, λ⁻¹I)) = ½ [λ tr(Λ⁻¹) + λ‖m‖² − d + log det Λ − d log λ], on factors only."""
    if not (math.isfinite(lam) and lam > 0):
        raise InvalidFactorError(f"the isotropic precision λ must be positive and finite, got {lam}")
    if not isinstance(mean_q, Tensor) or tuple(mean_q.shape) != p_q.shape:
        raise InvalidFactorError(f"mean_q must have shape {p_q.shape}")
    dec = p_q.decomposition()
    m = mean_q.to(p_q.device, torch.float64)
    d = p_q.dim
    kl = 0.5 * (lam * dec.trace_inv_identity() + lam * m.square().sum() - d + dec.logdet() - d * math.log(lam))
    value = kl.item()
    if not math.isfinite(value):
        raise NumericalError(f"KL to the isotropic reference is {value}; check scales and damping")
    if value < -KL_ROUNDING_RTOL * (d + abs(dec.logdet().item()) + abs(d * math.log(lam))):
        raise NumericalError(f"KL to the isotropic reference came out negative ({value:.3g}); report this")
    return kl
