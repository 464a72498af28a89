"""The decomposed form every KronPrecision operation runs on.

A precision over an (out × in) weight is held as

    Λ = (B_in ⊗ B_out) · diag(vec D) · (B_in ⊗ B_out)ᵀ,   B = T⁻ᵀ,   D = Σ_j w_j · c_out_j c_in_jᵀ  (out × in)

so that, with vec(W) = (T_in ⊗ T_out) u, the precision of u is the diagonal D (docs/method.md §4). Orthogonal bases
(eigenvectors) have B = T. Solves, samples, log-determinants, traces and KL terms are then a few factor-sized
matmuls; nothing d × d is ever built except in `dense()`, which exists for tests.

Rescaling the terms only changes the weights w, so temperatures and fitted scales never decompose again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from zoo.errors import InvalidFactorError, SingularPrecisionError
from zoo.kron.validate import diagonal_of

SPAN_ROOT_MAX_RANK = 32
"""Projected draws through per-row roots up to this span rank. The roots cost out·in·r² once per span and
decomposition, each draw then out·r normals and the output rotation; the full draw costs out·in normals and a
multiply every time. At 512 × 4608 (one thread, float32 draws): r = 5, 11 ms once then 6 ms a draw, against
27 ms; r = 25, 125 ms then 5 ms, against 30 ms; r = 64, 709 ms then 13 ms, against 30 ms, so past about 40 the
16 draws of a width selection no longer pay for the roots."""


@dataclass(frozen=True)
class Basis:
    """One side's coordinates: T (n × n), its inverse transpose B (None when T is orthogonal) and log|det T|."""

    T: Tensor
    B: Tensor | None
    logabsdet: float

    @property
    def cobasis(self) -> Tensor:
        return self.T if self.B is None else self.B

    @property
    def orthogonal(self) -> bool:
        return self.B is None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Basis:
        return Basis(self.T.to(device=device, dtype=dtype), None if self.B is None else self.B.to(device, dtype),
                     self.logabsdet)


@dataclass(frozen=True)
class Decomposition:
    """Diagonal coordinates of a Kronecker-factored precision (see the module docstring).

    `term_index[j]` says which input term row j stands for, -1 for the damping identity, so that new scales
    map onto new weights without decomposing again.
    """

    side_in: Basis
    side_out: Basis
    coords_in: Tensor  # (J, in)
    coords_out: Tensor  # (J, out)
    weights: Tensor  # (J,)
    term_index: tuple[int, ...]

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.coords_out.shape[1], self.coords_in.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.side_in.T.dtype

    @property
    def device(self) -> torch.device:
        return self.side_in.T.device

    def diagonal(self) -> Tensor:
        """D (out × in): the precision in the decomposed coordinates (computed once; the form is immutable)."""
        return self._diagonal

    @cached_property
    def _diagonal(self) -> Tensor:
        return torch.einsum("j,jo,ji->oi", self.weights, self.coords_out, self.coords_in)

    def reweighted(self, weights: Tensor) -> Decomposition:
        return replace(self, weights=weights.to(self.weights))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Decomposition:
        return Decomposition(
            self.side_in.to(device, dtype), self.side_out.to(device, dtype),
            self.coords_in.to(device, dtype), self.coords_out.to(device, dtype),
            self.weights.to(device, dtype), self.term_index,
        )

    def positive_diagonal(self) -> Tensor:
        """D, checked to be strictly positive: operations needing Λ⁻¹ call this."""
        d = self.diagonal()
        if not bool((d > 0).all()):
            raise SingularPrecisionError(
                "the precision is singular (rank-deficient factors and no damping); "
                "add damping > 0 or a full-rank prior term before inverting, sampling or taking log det"
            )
        return d

    # ---- operations ------------------------------------------------------------------------------------------
    def dense(self) -> Tensor:
        """The d × d precision (tests only)."""
        # contiguous: torch.kron views its inputs, and LAPACK's column-major eigenvectors cannot be viewed so
        b = torch.kron(self.side_in.cobasis.contiguous(), self.side_out.cobasis.contiguous())
        diag = self.diagonal().T.reshape(-1)
        return (b * diag) @ b.T

    def logdet(self) -> Tensor:
        out, inn = self.shape
        d = self.positive_diagonal()
        return d.log().sum() - 2 * (out * self.side_in.logabsdet + inn * self.side_out.logabsdet)

    def to_coords(self, v: Tensor) -> Tensor:
        """(T_in ⊗ T_out)ᵀ vec(V), batched over leading dims."""
        return self.side_out.T.mT @ v @ self.side_in.T

    def from_coords(self, u: Tensor) -> Tensor:
        """(T_in ⊗ T_out) vec(U), batched over leading dims."""
        return self.side_out.T @ u @ self.side_in.T.mT

    def solve(self, v: Tensor) -> Tensor:
        return self.from_coords(self.to_coords(v) / self.positive_diagonal())

    def quadratic(self, v: Tensor) -> Tensor:
        y = self.side_out.cobasis.mT @ v @ self.side_in.cobasis
        return (self.diagonal() * y.square()).sum(dim=(-2, -1))

    def quadratic_single(self, v: Tensor) -> Tensor:
        """`quadratic` in float32 on cached float32 copies of the bases and D: a training loss's prior term,
        evaluated every step, at half the float64 cost. Nothing is decomposed here."""
        out_b, in_b, d = self._single
        y = out_b.mT @ v.to(device=d.device, dtype=torch.float32) @ in_b
        return (d * y.square()).sum(dim=(-2, -1))

    @cached_property
    def _single(self) -> tuple[Tensor, Tensor, Tensor]:
        f32 = torch.float32
        return self.side_out.cobasis.to(f32), self.side_in.cobasis.to(f32), self.diagonal().to(f32)

    def trace_inv(self, a: Tensor, g: Tensor) -> Tensor:
        """tr((A ⊗ G) Λ⁻¹) = Σ_oi diag(T_outᵀ G T_out)_o · diag(T_inᵀ A T_in)_i / D_oi."""
        da = _diag_congruence(a, self.side_in.T)
        dg = _diag_congruence(g, self.side_out.T)
        return dg @ (1.0 / self.positive_diagonal()) @ da

    def trace_inv_identity(self) -> Tensor:
        """tr(Λ⁻¹), the damping part of a trace."""
        da = self.side_in.T.square().sum(0)
        dg = self.side_out.T.square().sum(0)
        return dg @ (1.0 / self.positive_diagonal()) @ da

    def sample(self, n: int, generator: torch.Generator | None, dtype: torch.dtype | None = None,
               span: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
        """n draws from N(0, Λ⁻¹): Z scaled by D^{-1/2}, rotated once per side (2 matmuls).

        With `span` (in × r, orthonormal columns Q) the draws are the projections W·QQᵀ: what any input in span(Q)
        sees of them. W·Q = T_out·M with M's rows independent, row o ~ N(0, Rᵀ diag(D_o⁻¹) R), R = T_inᵀQ; for
        r ≤ SPAN_ROOT_MAX_RANK M is drawn from those rows' Cholesky roots (out·r normals, not out·in), otherwise
        from the full Z. Both are exact in distribution; they are different random streams.

        `device` (default: where the decomposition lives) is where the rotation runs and the draws land. The noise
        comes from `generator` on the generator's own device and moves there, so a CPU generator gives the same
        draws on any device (up to the matmuls' rounding); the rotation bases are copied to `device` once and
        cached."""
        out, inn = self.shape
        dt = dtype or self.dtype
        target = self.device if device is None else torch.device(device)
        source = generator.device if generator is not None else target
        if span is not None:
            q, rotated, roots, t_out = self._span(span, dt, target)
            if roots is not None:
                eps = torch.randn((n, out, q.shape[1], 1), generator=generator, dtype=dt, device=source).to(target)
                return t_out @ (roots @ eps)[..., 0] @ q.mT
        t_out, t_in, scale = self._sampler_on(dt, target)
        z = torch.randn((n, out, inn), generator=generator, dtype=dt, device=source).to(target)
        if span is None:
            return t_out @ (z * scale) @ t_in.mT
        return t_out @ ((z * scale) @ rotated) @ q.mT

    def _span(self, span: Tensor, dt: torch.dtype,
              target: torch.device) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(Q, T_inᵀQ, the rows' roots or None, T_out) in `dt` on `target`, computed once per span (a width
        selection draws 16 times through it). With roots, T_in is never converted (at 4608 wide that copy cost
        more than the 16 draws)."""
        cache = self.__dict__.setdefault("_spans", {})
        hit = cache.get((id(span), dt, target))
        if hit is None or hit[0] is not span:
            q = span.to(self.side_in.T)
            rotated = (q.mT @ self.side_in.T).mT  # Tᵀ·Q as (QᵀT)ᵀ: a thin Q after a transposed square T took a
            # slow path (1.18 s against 0.09 s at 4608 × 5, measured)
            roots = self._row_roots(rotated) if q.shape[1] <= SPAN_ROOT_MAX_RANK else None
            hit = (span, q.to(target, dt), rotated.to(target, dt), None if roots is None else roots.to(target, dt),
                   self.side_out.T.to(target, dt))
            cache[(id(span), dt, target)] = hit
        return hit[1], hit[2], hit[3], hit[4]

    def _row_roots(self, rotated: Tensor) -> Tensor | None:
        """(out, r, r) lower Cholesky roots of Rᵀ diag(D_o⁻¹) R, row o's covariance of W·Q in T_out's coordinates,
        in float64; None where one is not numerically positive definite (the full draw is used instead)."""
        r = rotated.shape[1]
        outer = (rotated[:, :, None] * rotated[:, None, :]).reshape(rotated.shape[0], r * r)
        cov = (1.0 / self.positive_diagonal()) @ outer.to(self.dtype)
        roots, info = torch.linalg.cholesky_ex(cov.reshape(-1, r, r))
        return None if bool((info != 0).any()) else roots

    def _sampler(self, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return (basis_for_matmul(self.side_out.T, dt), basis_for_matmul(self.side_in.T, dt),
                without_subnormals(self.positive_diagonal().rsqrt(), dt))

    def _sampler_on(self, dt: torch.dtype, target: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The rotation bases in `dt` on `target`: float32 ones cached (per device), others converted per call."""
        if dt != torch.float32:
            t_out, t_in, scale = self._sampler(dt)
            return t_out.to(target), t_in.to(target), scale.to(target)
        if target == self.device:
            return self._single_sampler
        cache = self.__dict__.setdefault("_device_samplers", {})
        if target not in cache:
            t_out, t_in, scale = self._single_sampler
            cache[target] = (t_out.to(target), t_in.to(target), scale.to(target))
        return cache[target]

    @cached_property
    def _single_sampler(self) -> tuple[Tensor, Tensor, Tensor]:
        """float32 copies for repeated float32 draws (a width selection takes 16): converting a 4608-wide
        float64 basis on every draw cost more than the draw's own matmuls on small layers."""
        return self._sampler(torch.float32)


def without_subnormals(x: Tensor, dt: torch.dtype) -> Tensor:
    """`x` in `dt` with the entries that would be subnormal there set to zero (a draw's scale: x86 matmuls slow down
    on subnormal operands, and such entries are below `dt`'s resolution of the largest anyway)."""
    y = x.to(dt)
    return torch.where(y.abs() < torch.finfo(dt).tiny, torch.zeros((), dtype=dt, device=y.device), y)


def basis_for_matmul(t: Tensor, dt: torch.dtype) -> Tensor:
    """A basis in `dt` with each column's entries below eps(dt)² of that column's largest, or subnormal in `dt`,
    set to zero.

    Eigenvectors of factors with an exact-zero structure (a conv's zero-padded border, a constant input) carry
    rounding noise down to 1e-38 where they should be 0; multiplied by a draw, such entries give subnormal
    products, which x86 matmuls process at a fraction of their speed (a resnet10t posterior's float32 draw: 3.6 s,
    1.4 s with only the cast's subnormals zeroed, 0.43 s with this; docs/benchmarks.md). At 2⁻⁴⁶ of the column's
    scale they are 22 bits below float32's resolution, so the draws do not change beyond rounding (tested against
    the dense covariance)."""
    y = t.to(dt)
    if y.ndim != 2 or y.numel() == 0:
        return without_subnormals(y, dt)
    cut = (y.abs().amax(dim=0, keepdim=True) * torch.finfo(dt).eps ** 2).clamp_min(torch.finfo(dt).tiny)
    return torch.where(y.abs() < cut, torch.zeros((), dtype=dt, device=y.device), y)


def _diag_congruence(x: Tensor, t: Tensor) -> Tensor:
    """diag(Tᵀ X T) in one matmul, or in O(n²) for a diagonal X (a damping term's identity)."""
    d = diagonal_of(x)
    if d is not None:
        return (d[:, None] * t.square()).sum(0)
    return ((x @ t) * t).sum(0)


def mixed_trace(p: Decomposition, q: Decomposition) -> Tensor:
    """tr(Λ_p Λ_q⁻¹) from two decompositions: Σ D_p ⊙ (M_out∘M_out)(1/D_q)(M_in∘M_in)ᵀ, M = B_pᵀ T_q."""
    inv_q = 1.0 / q.positive_diagonal()
    d_p = p.diagonal()
    m_in = _cross(p.side_in, q.side_in)
    m_out = _cross(p.side_out, q.side_out)
    if m_in is None and m_out is None:
        return (d_p * inv_q).sum()
    mid = inv_q if m_out is None else m_out.square() @ inv_q
    mid = mid if m_in is None else mid @ m_in.square().T
    return (d_p * mid).sum()


def _cross(p: Basis, q: Basis) -> Tensor | None:
    """B_pᵀ T_q, or None when both sides share one orthogonal basis (then it is I)."""
    if p.orthogonal and q.orthogonal and p.T is q.T:
        return None
    return p.cobasis.T @ q.T


def frobenius_inner_terms(dec: Decomposition, a: Tensor, g: Tensor) -> Tensor:
    """⟨Λ_dec, A ⊗ G⟩_F = Σ_oi D_oi · (B_inᵀ A B_in)_ii · (B_outᵀ G B_out)_oo."""
    da = _diag_congruence(a, dec.side_in.cobasis)
    dg = _diag_congruence(g, dec.side_out.cobasis)
    return dg @ dec.diagonal() @ da


def frobenius_norm_sq(dec: Decomposition) -> Tensor:
    """‖Λ_dec‖²_F = Σ D ⊙ (K_out∘K_out) D (K_in∘K_in), K = BᵀB (the identity for orthogonal bases)."""
    d = dec.diagonal()
    if dec.side_in.orthogonal and dec.side_out.orthogonal:
        return d.square().sum()
    k_in = dec.side_in.cobasis.T @ dec.side_in.cobasis
    k_out = dec.side_out.cobasis.T @ dec.side_out.cobasis
    return (d * (k_out.square() @ d @ k_in.square())).sum()


def check_shapes(dec: Decomposition, out: int, inn: int) -> None:
    """Imported decompositions must fit the layer they claim to describe."""
    ok = (
        dec.side_in.T.shape == (inn, inn)
        and dec.side_out.T.shape == (out, out)
        and (dec.side_in.B is None or dec.side_in.B.shape == (inn, inn))
        and (dec.side_out.B is None or dec.side_out.B.shape == (out, out))
        and dec.coords_in.shape[1:] == (inn,)
        and dec.coords_out.shape[1:] == (out,)
        and dec.coords_in.shape[0] == dec.coords_out.shape[0] == dec.weights.shape[0] == len(dec.term_index)
    )
    if not ok:
        raise InvalidFactorError(
            f"stored decomposition does not fit an {out}×{inn} layer; the artifact is corrupt or for another model"
        )
