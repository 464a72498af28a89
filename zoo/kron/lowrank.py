"""diag(Tᵀ X T) of a PSD factor in O(n²r) through a pivoted-Cholesky root, when X has low numerical rank.

Why: a few-shot K-FAC input factor of a wide convolution has rank at most images × positions (5 of 4608 at one shot
per class on resnet10t at 16 px, 100 at twenty shots, measured), and the dense n³ congruence was the largest fixed
cost of building a posterior in the prior's basis. A root L is used only when the measured remainder satisfies
‖X − LLᵀ‖_F ≤ ROUNDING_MULTIPLE·eps·‖X‖_F, eps the unit rounding of the dtype the factor was accumulated in: then
every entry tᵢᵀXtᵢ is within that of the dense value, about the rounding the factor carries already (a float32
K-FAC factor of 4608 rows, rank 100: 6.5e-7·‖X‖_F, measured). Otherwise the dense product runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROUNDING_MULTIPLE = 100.0
"""Accepted ‖X − LLᵀ‖_F, in units of eps·‖X‖_F."""
PIVOT_RTOL = 1e-6
"""Pivoting stops once every remaining diagonal entry is below this fraction of X's largest: above float32 rounding
(pivots on rounding noise made the remainder larger, measured), below any curvature that matters next to a prior."""
MAX_RANK_FRACTION = 8
"""A root wider than n / MAX_RANK_FRACTION would cost more than the dense product saves: use the dense one."""


def pivoted_cholesky(x: Tensor, stop: float, max_rank: int) -> Tensor | None:
    """L (n × r) with X ≈ LLᵀ, pivoting on the largest remaining diagonal until it is ≤ `stop`; None past
    `max_rank` columns."""
    n = x.shape[0]
    remaining = x.diagonal().clone()
    root = x.new_zeros(n, max_rank)
    for k in range(max_rank + 1):
        p = int(torch.argmax(remaining))
        pivot = remaining[p].item()
        if pivot <= stop:
            return root[:, :k]
        if k == max_rank:
            return None
        column = (x[:, p] - root[:, :k] @ root[p, :k]) / math.sqrt(pivot)
        root[:, k] = column
        remaining -= column.square()
    return None


def low_rank_root(x: Tensor, eps: float) -> tuple[Tensor, float] | None:
    """(L, ‖X − LLᵀ‖_F) when a root of at most n / MAX_RANK_FRACTION columns is within ROUNDING_MULTIPLE·eps·‖X‖_F
    of X, else None."""
    n = x.shape[0]
    top = x.diagonal().max().item()
    if n < 2 * MAX_RANK_FRACTION or not top > 0:
        return None
    root = pivoted_cholesky(x, PIVOT_RTOL * top, n // MAX_RANK_FRACTION)
    if root is None:
        return None
    remainder = torch.linalg.matrix_norm(torch.addmm(x, root, root.T, alpha=-1.0)).item()
    if remainder > ROUNDING_MULTIPLE * eps * torch.linalg.matrix_norm(x).item():
        return None
    return root, remainder


def congruence_diagonal(x: Tensor, t: Tensor, eps: float) -> tuple[Tensor, tuple[Tensor, float] | None]:
    """(diag(Tᵀ X T), the low-rank root it was computed from or None for the dense product)."""
    found = low_rank_root(x, eps)
    if found is None:
        return ((x @ t) * t).sum(0), None
    return (found[0].mT @ t).square().sum(0), found  # LᵀT, not TᵀL: a transposed square T is a slow path


def input_span(a: Tensor, eps: float) -> Tensor | None:
    """An orthonormal basis (in × r) of the inputs whose second moment is the K-FAC factor A, when A has a low-rank
    root (low_rank_root), else None. Every input a layer saw while A was accumulated lies in it, up to A's rounding."""
    x = a.detach().double()
    found = low_rank_root((x + x.T) / 2, eps)
    return None if found is None else span_of(found[0])


def span_of(root: Tensor) -> Tensor:
    """An orthonormal basis of the columns of a low-rank root L (n × r): the range of LLᵀ."""
    return torch.linalg.qr(root).Q


def root_eigh(root: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues ascending, n × n orthonormal eigenvectors) of LLᵀ for a root L (n × r, r ≪ n), in O(n²r).

    The range comes from L's thin SVD (LLᵀ = U S² Uᵀ); the null space, whose eigenvalue is 0, from the Householder
    reflectors that map U onto the first r coordinates: their product is orthogonal with U (up to signs) as its
    first r columns, so its other n − r columns complete the basis without the n³ eigensolver."""
    n, r = root.shape
    u, s, _ = torch.linalg.svd(root, full_matrices=False)
    reflectors, tau = torch.geqrf(u)
    padded = torch.zeros(n, n, dtype=u.dtype, device=u.device)
    padded[:, :r] = reflectors
    q = torch.linalg.householder_product(padded, tau)
    values = torch.cat([torch.zeros(n - r, dtype=s.dtype, device=s.device), s.square().flip(0)])
    return values, torch.cat([q[:, r:], u.flip(1)], dim=1)
