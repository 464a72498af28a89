"""Exact decompositions: one term (+ damping) and two terms (docs/method.md §4, "Two terms are exact").

Two PSD terms s₀ A₀⊗G₀ + s₁ A₁⊗G₁ are diagonalised exactly by a congruence on each side: whiten by one
factor (X_w = L Lᵀ), eigendecompose the other in whitened coordinates (L⁻¹ X_o L⁻ᵀ = V μ Vᵀ) and use
T = L⁻ᵀ V, so Tᵀ X_w T = I and Tᵀ X_o T = diag μ. Each side picks its whitener independently: the prior
(last) term when it is well conditioned, since its eigendecomposition is usually stored already, else the
other term, else their sum.
"""

from __future__ import annotations

from collections.abc import Callable

import scipy.linalg
import torch
from torch import Tensor

from zoo.errors import NumericalError, SingularPrecisionError
from zoo.kron.decomposition import Basis, Decomposition
from zoo.kron.validate import check_psd_eigenvalues, diagonal_of

Eigh = tuple[Tensor, Tensor]
"""(eigenvalues ascending, eigenvectors as columns), float64, rounding-level eigenvalues set to 0."""

EighOf = Callable[[int], Eigh]
"""Eigendecomposition of the k-th factor on one side, cached by the caller."""

MAX_WHITENING_CONDITION = 1e10


EIGH_FALLBACKS: list[dict[str, object]] = []
"""Every eigendecomposition that needed a fallback in this process (what, size, how), for the run's record."""
JITTERS = (1e-13, 1e-11, 1e-9)
"""Relative shifts tried, in this order, when LAPACK's divide-and-conquer eigh fails to converge."""


def robust_eigh(x: Tensor, name: str) -> Eigh:
    """float64 symmetric eigendecomposition that survives LAPACK's convergence failures.

    torch's eigh (divide and conquer) can fail on matrices with clustered or repeated eigenvalues. The fallbacks,
    in order, each recorded in EIGH_FALLBACKS: a shift by jitter·‖X‖_max·I (the shift is subtracted from the
    eigenvalues again, so only rounding changes), then scipy's QR-iteration driver ("ev"). If all fail, or X has
    NaN/inf entries, a NumericalError says what to do.
    """
    x64 = x.to(torch.float64)
    if not bool(torch.isfinite(x64).all()):
        raise NumericalError(f"{name} has NaN or infinite entries; the curvature pass diverged, check the data and "
                             "the model's outputs for NaN")
    try:
        return torch.linalg.eigh(x64)
    except torch.linalg.LinAlgError as err:
        first = err
    sym = 0.5 * (x64 + x64.mT)
    scale = float(sym.abs().max()) or 1.0
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    for jitter in JITTERS:
        shift = jitter * scale
        try:
            values, vectors = torch.linalg.eigh(sym + shift * eye)
        except torch.linalg.LinAlgError:
            continue
        EIGH_FALLBACKS.append({"factor": name, "size": sym.shape[0], "method": "jitter", "relative": jitter})
        return values - shift, vectors
    try:
        w, v = scipy.linalg.eigh(sym.cpu().numpy(), driver="ev")
    except (ValueError, scipy.linalg.LinAlgError) as err:
        raise NumericalError(f"the eigendecomposition of {name} ({sym.shape[0]}×{sym.shape[0]}) failed with every "
                             f"LAPACK driver ({first}); add damping or use fisher='exact'/more data so the factor is "
                             "better conditioned, and report this with the model name") from err
    EIGH_FALLBACKS.append({"factor": name, "size": sym.shape[0], "method": "scipy-ev"})
    return (torch.from_numpy(w).to(sym), torch.from_numpy(v).to(sym))


def eigh_psd(x: Tensor, name: str, rtol: float) -> Eigh:
    """float64 eigendecomposition of a validated PSD factor (with robust_eigh's fallbacks).

    A diagonal factor (an isotropic prior's identities) is read off exactly instead: LAPACK would take as long on an
    identity as on a dense factor (49 s of a 1-shot resnet10t fit against zoo.tuning.isotropic_prior, measured)."""
    found = diagonal_eigh(x)
    values, vectors = found if found is not None else robust_eigh(x, name)
    return check_psd_eigenvalues(values, name, rtol), vectors


def diagonal_eigh(x: Tensor) -> Eigh | None:
    """(sorted diagonal, the matching permutation of I) when X is exactly diagonal (validate.diagonal_of), else
    None."""
    diag = diagonal_of(x)
    if diag is None or not bool(torch.isfinite(diag).all()):
        return None
    values, order = torch.sort(diag.to(torch.float64))
    return values, torch.eye(x.shape[0], dtype=torch.float64, device=x.device)[:, order]


def single_term(eig_a: Eigh, eig_g: Eigh, scale: float, damping: float, index: int = 0) -> Decomposition:
    """s·A⊗G (+ δI) in the eigenbases of A and G: D = s·λ_G λ_Aᵀ (+ δ)."""
    (la, ua), (lg, ug) = eig_a, eig_g
    coords_in, coords_out, weights, term_index = [la], [lg], [scale], [index]
    if damping > 0:
        coords_in.append(torch.ones_like(la))
        coords_out.append(torch.ones_like(lg))
        weights.append(damping)
        term_index.append(-1)
    return Decomposition(
        side_in=Basis(ua, None, 0.0),
        side_out=Basis(ug, None, 0.0),
        coords_in=torch.stack(coords_in),
        coords_out=torch.stack(coords_out),
        weights=torch.tensor(weights, dtype=la.dtype, device=la.device),
        term_index=tuple(term_index),
    )


def _condition(eig: Eigh) -> float:
    values = eig[0]
    low = values.min().item()
    return float("inf") if low <= 0 else values.max().item() / low


def _whiten(eig_w: Eigh, x_o: Tensor, name: str, rtol: float) -> tuple[Basis, Tensor]:
    """Basis T = U_w Λ_w^{-1/2} V with Tᵀ X_w T = I and Tᵀ X_o T = diag μ; returns (basis, μ)."""
    values, vectors = eig_w
    root = values.sqrt()
    half_inv = vectors / root
    mu, v = robust_eigh(half_inv.T @ x_o @ half_inv, "whitened factor")
    mu = check_psd_eigenvalues(mu, f"whitened {name}", rtol)
    basis = Basis(T=half_inv @ v, B=(vectors * root) @ v, logabsdet=-0.5 * values.log().sum().item())
    return basis, mu


def pair_basis(
    x: tuple[Tensor, Tensor], eig: EighOf, name: str, rtol: float
) -> tuple[Basis, Tensor, Tensor]:
    """Simultaneously diagonalise one side's two factors; returns (basis, coords of x[0], coords of x[1])."""
    for w in (1, 0):
        e = eig(w)
        if _condition(e) <= MAX_WHITENING_CONDITION:
            basis, mu = _whiten(e, x[1 - w], name, rtol)
            ones = torch.ones_like(mu)
            return (basis, mu, ones) if w == 1 else (basis, ones, mu)
    total = x[0] + x[1]
    e_sum = eigh_psd(total, f"{name} sum", rtol)
    if e_sum[0].min().item() <= 0:
        raise SingularPrecisionError(
            f"both {name} factors share a null space, so the two-term precision is singular; add damping > 0"
        )
    basis, mu0 = _whiten(e_sum, x[0], name, rtol)
    mu1 = check_psd_eigenvalues(((x[1] @ basis.T) * basis.T).sum(0), f"whitened {name}", rtol)
    return basis, mu0, mu1


def two_terms(
    a: tuple[Tensor, Tensor],
    g: tuple[Tensor, Tensor],
    eig_a: EighOf,
    eig_g: EighOf,
    scales: tuple[float, float],
    indices: tuple[int, int],
    rtol: float,
) -> Decomposition:
    """s₀ A₀⊗G₀ + s₁ A₁⊗G₁ exactly: D = s₀ μ_G0 μ_A0ᵀ + s₁ μ_G1 μ_A1ᵀ in the joint bases."""
    side_in, a0, a1 = pair_basis(a, eig_a, "A", rtol)
    side_out, g0, g1 = pair_basis(g, eig_g, "G", rtol)
    return Decomposition(
        side_in=side_in,
        side_out=side_out,
        coords_in=torch.stack([a0, a1]),
        coords_out=torch.stack([g0, g1]),
        weights=torch.tensor(scales, dtype=a0.dtype, device=a0.device),
        term_index=indices,
    )
