"""Input checks for Kronecker factors: a bad factor must fail loudly here, not as a NaN three calls later."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from zoo.errors import InvalidFactorError

FACTOR_DTYPE = torch.float64


def default_rtol(dtype: torch.dtype) -> float:
    """Symmetry/PSD tolerance: √eps of the dtype the factor arrived in (float32 sums carry float32 rounding)."""
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else math.sqrt(torch.finfo(FACTOR_DTYPE).eps)


def as_factor(x: Tensor, size: int | None, name: str, rtol: float | None = None) -> Tensor:
    """Return `x` as a symmetric float64 matrix after checking shape, finiteness and symmetry."""
    if not isinstance(x, Tensor):
        raise InvalidFactorError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise InvalidFactorError(f"{name} must be a square matrix, got shape {tuple(x.shape)}")
    if size is not None and x.shape[0] != size:
        raise InvalidFactorError(
            f"{name} is {x.shape[0]}×{x.shape[0]} but the layer needs {size}×{size}; "
            "all A factors must share the input size and all G factors the output size"
        )
    if x.shape[0] == 0:
        raise InvalidFactorError(f"{name} is empty")
    tol = default_rtol(x.dtype) if rtol is None else rtol
    x = x.detach()
    # checked in the stored dtype, one reduction each: these checks of a 4608-wide factor were 0.87 s, a sixth of
    # a 1-shot fine-tune, when done in float64 after the conversion
    scale = torch.linalg.vector_norm(x, ord=math.inf).item()  # NaN propagates, so this is also the finiteness check
    if not math.isfinite(scale):
        raise InvalidFactorError(f"{name} contains NaN or infinite entries; check the curvature pass that made it")
    asym = max_asymmetry(x)
    if asym > tol * max(scale, torch.finfo(FACTOR_DTYPE).tiny):
        raise InvalidFactorError(
            f"{name} is not symmetric (max |A - Aᵀ| = {asym:.3g} vs max |A| = {scale:.3g}); "
            "pass (A + A.T) / 2 if the asymmetry is rounding"
        )
    y = x.to(FACTOR_DTYPE)
    return y if asym == 0 else (y + y.T).mul_(0.5)  # saved factors are exactly symmetric: no second transposed pass


SYMMETRY_BLOCK = 512
"""Block size of max_asymmetry's tiles: a pair of 512 × 512 float32 tiles fits in cache."""


def max_asymmetry(x: Tensor) -> float:
    """max |X − Xᵀ|, tile pair by tile pair over the upper triangle: 0.05 s for a 4608-wide float32 factor where
    one whole transposed pass, X − X.T, took 0.34 s (one thread; the transpose's strided reads miss the cache)."""
    n, b = x.shape[0], SYMMETRY_BLOCK
    worst = torch.zeros((), dtype=x.dtype, device=x.device)
    for i in range(0, n, b):
        for j in range(i, n, b):
            tile = (x[i:i + b, j:j + b] - x[j:j + b, i:i + b].T).abs().max()
            worst = torch.maximum(worst, tile)
    return worst.item()


def check_psd(x: Tensor, name: str, rtol: float) -> None:
    """Refuse a factor with an eigenvalue below -rtol·λmax, by one Cholesky of X + rtol·max(diag X)·I.

    Cheaper than an eigendecomposition (n³/3 flops), so construction can validate eagerly; the decomposition
    repeats the check on the eigenvalues themselves.
    """
    shift = rtol * max(x.diagonal().max().item(), 0.0) + torch.finfo(FACTOR_DTYPE).tiny
    _, info = torch.linalg.cholesky_ex(x + shift * torch.eye(x.shape[0], dtype=x.dtype, device=x.device))
    if int(info) != 0 or x.diagonal().min().item() < -shift:
        raise InvalidFactorError(
            f"{name} is not positive semi-definite (an eigenvalue is below -{rtol:.1g}·λmax); "
            "a curvature factor must be a sum of outer products"
        )


def check_psd_eigenvalues(values: Tensor, name: str, rtol: float) -> Tensor:
    """Reject clearly negative eigenvalues; set rounding-level ones to exactly 0.

    Eigenvalues in [-rtol·λmax, 10·n·eps·λmax] are rounding of a PSD matrix (the input carries at most its own
    dtype's precision), so they become 0 and the precision's singularity is detected exactly. Anything more
    negative means the factor is not PSD and is an error, never silently clipped.
    """
    if values.numel() == 0:
        return values
    top = values.max().item()
    low = values.min().item()
    if top < 0 or low < -rtol * max(top, 0.0):
        raise InvalidFactorError(
            f"{name} is not positive semi-definite (eigenvalues from {low:.3g} to {top:.3g}); "
            "a curvature factor must be a sum of outer products"
        )
    zero_below = 10 * values.numel() * torch.finfo(FACTOR_DTYPE).eps * max(top, 0.0)
    return torch.where(values <= zero_below, torch.zeros_like(values), values)


def check_scales(scales: Sequence[float] | Tensor | None, count: int) -> Tensor:
    """Scales are positive and finite, one per term; a zero scale means: leave the term out."""
    if scales is None:
        return torch.ones(count, dtype=FACTOR_DTYPE)
    s = torch.as_tensor(scales, dtype=FACTOR_DTYPE).detach().flatten().cpu()
    if s.numel() != count:
        raise InvalidFactorError(f"got {s.numel()} scales for {count} terms; pass one scale per (A, G) term")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise InvalidFactorError(
            f"scales must be positive and finite, got {s.tolist()}; drop a term instead of scaling it by 0"
        )
    return s


def check_damping(damping: float | Tensor) -> float:
    """Damping δ ≥ 0 adds δ·I to the precision."""
    d = float(damping)
    if not math.isfinite(d) or d < 0:
        raise InvalidFactorError(f"damping must be finite and ≥ 0, got {d}")
    return d


def diagonal_of(x: Tensor) -> Tensor | None:
    """X's diagonal when X is exactly diagonal (an identity, an isotropic term), else None: O(n) to reject a dense
    curvature factor (its first row has off-diagonal entries), O(n²) to accept."""
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        return None
    if x.shape[0] > 1 and bool(x[0, 1:].ne(0).any()):
        return None
    diag = x.diagonal()
    return diag if bool((x - torch.diag_embed(diag)).eq(0).all()) else None
