"""KronPrecision: a Gaussian precision Σ s_i kron(A_i, G_i) + δI over one (out × in) weight matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from zoo.errors import ConfigError, InvalidFactorError
from zoo.kron import approx, exact
from zoo.kron.decomposition import (
    Basis,
    Decomposition,
    check_shapes,
    frobenius_inner_terms,
    frobenius_norm_sq,
)
from zoo.kron.exact import Eigh
from zoo.kron.validate import FACTOR_DTYPE, as_factor, check_damping, check_psd_eigenvalues, check_scales, default_rtol
from zoo.kron.validate import check_psd as validate_psd

Approximation = Literal["eigenbasis", "kronecker", "ekfac"]
DEFAULT_APPROXIMATION: Approximation = "ekfac"
"""Chosen by measurement (benchmarks/kron.py, README): on K-FAC-like posteriors β·F_new + α·(F_src + δI) its
Frobenius error is the lowest of the three in every case measured, and its KL error is 10–300× below the paper's
nearest Kronecker product; "eigenbasis" wins on KL only when β/α ≈ 1 with data like the source's."""


class KronPrecision:
    """Precision Σ s_i kron(A_i, G_i) + damping·I of an (out × in) weight, vec(W) = W.T.reshape(-1).

    A_i are in × in, G_i out × out, symmetric PSD. One term, one term plus damping, and two terms are
    represented exactly; more (or two plus damping) use `approximation` and set `is_exact = False`.
    Decompositions are float64, computed once on first use, and exportable (`to_tensors`) so that a
    loaded artifact never decomposes again. Multiplying by a scalar or changing scales reuses them.
    """

    def __init__(
        self,
        terms: Sequence[tuple[Tensor, Tensor]],
        scales: Sequence[float] | Tensor | None = None,
        damping: float = 0.0,
        *,
        approximation: Approximation | None = None,
        rtol: float | None = None,
        check_psd: bool = True,
    ) -> None:
        if not terms:
            raise InvalidFactorError("a KronPrecision needs at least one (A, G) term; use (I, I) for isotropy")
        try:
            pairs = [(a, g) for a, g in terms]
        except (TypeError, ValueError) as err:
            raise InvalidFactorError("terms must be a sequence of (A, G) tensor pairs") from err
        method = approximation or DEFAULT_APPROXIMATION
        if method not in approx.APPROXIMATIONS:
            raise ConfigError(f"approximation must be one of {approx.APPROXIMATIONS}, got {method!r}")
        a0, g0 = pairs[0]
        if not isinstance(a0, Tensor) or not isinstance(g0, Tensor):
            raise InvalidFactorError("terms must be (A, G) pairs of torch.Tensors")
        self.device = a0.device
        self._rtol = rtol if rtol is not None else max(default_rtol(a.dtype) for a, _ in pairs)
        size_in, size_out = a0.shape[0] if a0.ndim == 2 else None, g0.shape[0] if g0.ndim == 2 else None
        self.A: list[Tensor] = [as_factor(a, size_in, f"A[{i}]", self._rtol) for i, (a, _) in enumerate(pairs)]
        self.G: list[Tensor] = [as_factor(g, size_out, f"G[{i}]", self._rtol) for i, (_, g) in enumerate(pairs)]
        if check_psd:
            for i, (a, g) in enumerate(zip(self.A, self.G, strict=True)):
                validate_psd(a, f"A[{i}]", self._rtol)
                validate_psd(g, f"G[{i}]", self._rtol)
        self.scales: Tensor = check_scales(scales, len(pairs)).to(self.device)
        self.damping: float = check_damping(damping)
        self.approximation: Approximation = method
        self._eig_a: dict[int, Eigh] = {}
        self._eig_g: dict[int, Eigh] = {}
        self._dec: Decomposition | None = None
        self._error: float | None = None

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight this precision is over."""
        return self.G[0].shape[0], self.A[0].shape[0]

    @property
    def dim(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def is_exact(self) -> bool:
        """False when the operations use an approximation (three or more terms, or two plus damping)."""
        k = len(self.A)
        return k == 1 or (k == 2 and self.damping == 0)

    @property
    def terms(self) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.A, self.G, strict=True))

    def __repr__(self) -> str:
        out, inn = self.shape
        kind = "exact" if self.is_exact else f"approx:{self.approximation}"
        return f"KronPrecision(out={out}, in={inn}, terms={len(self.A)}, damping={self.damping:g}, {kind})"

    # ---- decomposition ---------------------------------------------------------------------------------------
    def _eigh(self, side: str, k: int) -> Eigh:
        cache, factors = (self._eig_a, self.A) if side == "A" else (self._eig_g, self.G)
        if k not in cache:
            cache[k] = exact.eigh_psd(factors[k], f"{side}[{k}]", self._rtol)
        return cache[k]

    def factor_eigh(self, k: int = 0) -> tuple[Eigh, Eigh]:
        """float64 eigendecompositions (values, vectors) of term k's A and G, computed once and stored with it."""
        return self._eigh("A", k), self._eigh("G", k)

    def provide_factor_eigh(self, k: int, *, a: Eigh | None = None, g: Eigh | None = None) -> None:
        """Store eigendecompositions of term k's factors that the caller computed another way (zoo.kron.extend takes
        them from a certified low-rank root), so the decomposition does not run the O(n³) eigensolver on them. The
        caller vouches for their accuracy; shapes are checked, and a decomposition already made is kept."""
        for side, eigh, factors, cache in (("A", a, self.A, self._eig_a), ("G", g, self.G, self._eig_g)):
            if eigh is None:
                continue
            n = factors[k].shape[0]
            values, vectors = eigh
            if values.shape != (n,) or vectors.shape != (n, n):
                raise InvalidFactorError(f"an eigendecomposition of {side}[{k}] must be ({n},) values and ({n}, {n}) "
                                         f"vectors, got {tuple(values.shape)} and {tuple(vectors.shape)}")
            cache[k] = (values.to(self.device, FACTOR_DTYPE), vectors.to(self.device, FACTOR_DTYPE))

    def decomposition(self) -> Decomposition:
        """The decomposed form all operations use, computed once (float64)."""
        if self._dec is None:
            self._dec = self._decompose()
        return self._dec

    def _decompose(self) -> Decomposition:
        k, s = len(self.A), self.scales
        eig_a = lambda i: self._eigh("A", i)  # noqa: E731
        eig_g = lambda i: self._eigh("G", i)  # noqa: E731
        if k == 1:
            return exact.single_term(eig_a(0), eig_g(0), s[0].item(), self.damping)
        if k == 2 and self.damping == 0:
            return exact.two_terms(
                (self.A[0], self.A[1]), (self.G[0], self.G[1]), eig_a, eig_g,
                (s[0].item(), s[1].item()), (0, 1), self._rtol,
            )
        if self.approximation == "eigenbasis":
            return approx.eigenbasis(self.A, self.G, s, self.damping, eig_a, eig_g, self._rtol)
        if self.approximation == "ekfac":
            return approx.ekfac(self.A, self.G, s, self.damping, self._rtol)
        dec, _, _ = approx.kronecker(self.A, self.G, s, self.damping, self._rtol)
        return dec

    @property
    def approximation_error(self) -> float:
        """Relative Frobenius error ‖Λ_used − Λ_exact‖ / ‖Λ_exact‖, computed on factors (0 when exact).

        It is ‖Λ_used‖² − 2⟨Λ_used, Λ_exact⟩ + ‖Λ_exact‖², so its float64 floor is about 1e-8.
        """
        if self.is_exact:
            return 0.0
        if self._error is None:
            self._error = self._frobenius_error()
        return self._error

    def _frobenius_error(self) -> float:
        dec = self.decomposition()
        a, g, w = self._all_terms()
        target_sq = (w[:, None] * w[None, :] * approx.gram(a) * approx.gram(g)).sum()
        cross = sum(wk * frobenius_inner_terms(dec, ak, gk) for wk, ak, gk in zip(w, a, g, strict=True))
        err_sq = (frobenius_norm_sq(dec) - 2 * cross + target_sq).item()
        tol = 1e-12 * target_sq.item()
        if err_sq < -tol or not math.isfinite(err_sq):
            raise InvalidFactorError(f"approximation error is not computable (‖E‖² = {err_sq:.3g}); report this")
        return math.sqrt(max(err_sq, 0.0) / target_sq.item())

    def _all_terms(self) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The terms with damping as an explicit (I, I) term."""
        a, g, w = list(self.A), list(self.G), self.scales
        if self.damping > 0:
            out, inn = self.shape
            a.append(torch.eye(inn, dtype=FACTOR_DTYPE, device=self.device))
            g.append(torch.eye(out, dtype=FACTOR_DTYPE, device=self.device))
            w = torch.cat([w, torch.tensor([self.damping], dtype=w.dtype, device=w.device)])
        return a, g, w

    # ---- operations ------------------------------------------------------------------------------------------
    def dense(self) -> Tensor:
        """The d × d precision that the operations use (the approximation when not exact). Tests only."""
        if not self.is_exact:
            return self.decomposition().dense()
        return self.target_dense()

    def target_dense(self) -> Tensor:
        """The d × d exact sum Σ s_i kron(A_i, G_i) + δI, whatever is used. Tests only."""
        out = sum(s * torch.kron(a, g) for s, a, g in zip(self.scales, self.A, self.G, strict=True))
        return out + self.damping * torch.eye(self.dim, dtype=FACTOR_DTYPE, device=self.device)

    def logdet(self) -> Tensor:
        """log det Λ (raises SingularPrecisionError when Λ is singular)."""
        return self.decomposition().logdet()

    def solve(self, v: Tensor) -> Tensor:
        """Λ⁻¹ vec(V) for V of shape (..., out, in), returned in the same shape."""
        return self.decomposition().solve(self._check_matrix(v, "V"))

    def quadratic(self, v: Tensor) -> Tensor:
        """vec(V)ᵀ Λ vec(V) for V of shape (..., out, in); differentiable in V."""
        return self.decomposition().quadratic(self._check_matrix(v, "V"))

    def quadratic_single(self, v: Tensor) -> Tensor:
        """`quadratic` in float32 (a training objective's prior term; the decomposition stays float64)."""
        if not isinstance(v, Tensor) or v.ndim < 2 or tuple(v.shape[-2:]) != self.shape:
            self._check_matrix(v, "V")  # raises with the expected shape
        return self.decomposition().quadratic_single(v)

    def trace_inv(self, a: Tensor, g: Tensor) -> Tensor:
        """tr((A ⊗ G) Λ⁻¹) for A in × in and G out × out."""
        out, inn = self.shape
        a = as_factor(a, inn, "A", rtol=self._rtol).to(self.device)
        g = as_factor(g, out, "G", rtol=self._rtol).to(self.device)
        return self.decomposition().trace_inv(a, g)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               span: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
        """n draws from N(0, Λ⁻¹), shape (n, out, in); two matmuls per draw, seeded by `generator`.

        `span` (in × r, orthonormal columns) projects the draws on the input side; `device` is where they are
        rotated and returned, the same draws as on the CPU for a CPU generator (Decomposition.sample)."""
        if int(n) != n or n < 0:
            raise ConfigError(f"the number of samples must be a non-negative integer, got {n}")
        if span is not None and (span.ndim != 2 or span.shape[0] != self.shape[1]):
            raise ConfigError(f"an input span must be ({self.shape[1]}, r), got {tuple(span.shape)}")
        return self.decomposition().sample(int(n), generator, dtype, span, device)

    def _check_matrix(self, v: Tensor, name: str) -> Tensor:
        if not isinstance(v, Tensor) or v.ndim < 2 or tuple(v.shape[-2:]) != self.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InvalidFactorError(f"{name} must have shape (..., {self.shape[0]}, {self.shape[1]}), got {got}")
        return v.to(device=self.device, dtype=FACTOR_DTYPE)

    # ---- arithmetic (reuses decompositions) --------------------------------------------------------------------
    def _derived(self, scales: Tensor, damping: float, a: list[Tensor] | None = None,
                 g: list[Tensor] | None = None) -> KronPrecision:
        new = object.__new__(KronPrecision)
        new.device, new._rtol, new.approximation = self.device, self._rtol, self.approximation
        new.A, new.G = (a if a is not None else self.A), (g if g is not None else self.G)
        new.scales, new.damping = scales, damping
        new._eig_a, new._eig_g = dict(self._eig_a), dict(self._eig_g)
        new._dec, new._error = None, None
        return new

    def rescaled(self, scales: Sequence[float] | Tensor | None = None, damping: float | None = None) -> KronPrecision:
        """The same terms with new scales and/or damping; the decomposition is reused whenever it can be."""
        s = self.scales if scales is None else check_scales(scales, len(self.A)).to(self.device)
        d = self.damping if damping is None else check_damping(damping)
        new = self._derived(s, d)
        if self._dec is not None and new.is_exact == self.is_exact:
            new._dec = _reweight(self._dec, s, d)
        return new

    def __mul__(self, c: float) -> KronPrecision:
        c = float(c)
        if not math.isfinite(c) or c <= 0:
            raise InvalidFactorError(f"a precision can only be multiplied by a positive finite number, got {c}")
        new = self._derived(self.scales * c, self.damping * c)
        if self._dec is not None:
            new._dec = self._dec.reweighted(self._dec.weights * c)
        new._error = self._error
        return new

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> KronPrecision:
        return self * (1.0 / float(c))

    def __add__(self, other: KronPrecision) -> KronPrecision:
        """Λ₁ + Λ₂: terms concatenated (self's first), dampings added; cached eigendecompositions carried."""
        if not isinstance(other, KronPrecision):
            return NotImplemented
        if other.shape != self.shape:
            raise InvalidFactorError(f"cannot add precisions over {self.shape} and {other.shape} weights")
        k = len(self.A)
        new = self._derived(
            torch.cat([self.scales, other.scales.to(self.device)]), self.damping + other.damping,
            a=self.A + [x.to(self.device) for x in other.A], g=self.G + [x.to(self.device) for x in other.G],
        )
        new._rtol = max(self._rtol, other._rtol)
        new._eig_a.update({k + i: e for i, e in other._eig_a.items()})
        new._eig_g.update({k + i: e for i, e in other._eig_g.items()})
        return new

    # ---- export / import ---------------------------------------------------------------------------------------
    def to_tensors(self, *, decompose: bool = True) -> dict[str, Tensor]:
        """Plain tensors (factors, scales, cached eigendecompositions, the decomposition) for safetensors."""
        out: dict[str, Tensor] = {"scales": self.scales, "damping": torch.tensor([self.damping], dtype=FACTOR_DTYPE)}
        out["approximation"] = torch.tensor([approx.APPROXIMATIONS.index(self.approximation)])
        for i, (a, g) in enumerate(self.terms):
            out[f"A.{i}"], out[f"G.{i}"] = a, g
        for side, cache in (("A", self._eig_a), ("G", self._eig_g)):
            for i, (values, vectors) in cache.items():
                out[f"eig.{side}.{i}.values"], out[f"eig.{side}.{i}.vectors"] = values, vectors
        dec = self.decomposition() if decompose else self._dec
        if dec is not None:
            for name, basis in (("in", dec.side_in), ("out", dec.side_out)):
                out[f"dec.{name}.T"] = basis.T
                out[f"dec.{name}.logabsdet"] = torch.tensor([basis.logabsdet], dtype=FACTOR_DTYPE)
                if basis.B is not None:
                    out[f"dec.{name}.B"] = basis.B
            out["dec.coords_in"], out["dec.coords_out"] = dec.coords_in, dec.coords_out
            out["dec.weights"] = dec.weights
            out["dec.term_index"] = torch.tensor(dec.term_index, dtype=torch.int64)
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, device: torch.device | str | None = None,
                     rtol: float | None = None) -> KronPrecision:
        """Rebuild from `to_tensors` output without decomposing again (shapes are verified)."""
        try:
            n = sum(1 for key in tensors if key.startswith("A."))
            terms = [(tensors[f"A.{i}"].to(device), tensors[f"G.{i}"].to(device)) for i in range(n)]
            method = approx.APPROXIMATIONS[int(tensors["approximation"][0])]
            p = cls(terms, tensors["scales"], float(tensors["damping"][0]), approximation=method, rtol=rtol,
                    check_psd=False)
            if "dec.weights" in tensors:
                p._dec = _decomposition_from(tensors, device)
            exact_eigh = _single_term_eigh(p._dec, n)
            for side, cache in (("A", p._eig_a), ("G", p._eig_g)):
                for i in range(n):
                    key = f"eig.{side}.{i}"
                    if f"{key}.values" not in tensors:
                        continue
                    values, vectors = tensors[f"{key}.values"], tensors[f"{key}.vectors"]
                    if exact_eigh is not None:  # one term, so i == 0
                        cache[i] = _agreeing(exact_eigh[side], values, vectors, f"{side}[{i}]")
                    else:
                        cache[i] = (values.to(device, FACTOR_DTYPE),
                                    _orthonormal(vectors.to(device, FACTOR_DTYPE), vectors.dtype))
        except (KeyError, IndexError) as err:
            raise InvalidFactorError(f"stored KronPrecision is missing {err}; the artifact is incomplete") from err
        out, inn = p.shape
        check_shapes(p._dec, out, inn) if p._dec is not None else None
        for side, cache, factors, size in (("A", p._eig_a, p.A, inn), ("G", p._eig_g, p.G, out)):
            for i, factor in enumerate(factors):
                if i not in cache:  # no stored eigenvalues to check PSD-ness on
                    validate_psd(factor, f"{side}[{i}]", p._rtol)
                    continue
                values, vectors = cache[i]
                if values.shape != (size,) or vectors.shape != (size, size):
                    raise InvalidFactorError("a stored eigendecomposition does not fit its factor; artifact is corrupt")
                check_psd_eigenvalues(values, f"stored {side}[{i}]", p._rtol)
        return p


def _single_term_eigh(dec: Decomposition | None, terms: int) -> dict[str, tuple[Tensor, Tensor]] | None:
    """The float64 eigenpairs of A and G that a one-term decomposition already holds (exact.single_term's bases are
    the factors' eigenvectors, its first coordinates their eigenvalues), or None where it holds other bases."""
    if (dec is None or terms != 1 or dec.term_index[0] != 0 or not dec.side_in.orthogonal
            or not dec.side_out.orthogonal or any(i not in (0, -1) for i in dec.term_index)):
        return None
    return {"A": (dec.coords_in[0], dec.side_in.T), "G": (dec.coords_out[0], dec.side_out.T)}


def _agreeing(exact_eigh: tuple[Tensor, Tensor], values: Tensor, vectors: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """The decomposition's float64 eigenpairs, after checking the stored lower-precision copy says the same.

    Reusing them skips a QR re-orthonormalisation per factor at load (16 s of a 19 s resnet10t prior load at
    4608-wide factors); the O(n²) comparison catches an artifact whose two copies disagree.
    """
    exact_values, exact_vectors = exact_eigh
    scale = exact_values.abs().max().clamp_min(torch.finfo(FACTOR_DTYPE).tiny)
    tol = 10 * torch.finfo(values.dtype).eps
    # the vectors compared in the stored dtype (the float64 copy rounded to it: within half a unit of the stored
    # dtype's rounding, far inside tol): the float64 difference of two 4608-wide bases took 2.4× as long, one thread
    if (values.shape != exact_values.shape or vectors.shape != exact_vectors.shape
            or (values.to(exact_values) - exact_values).abs().max() > tol * scale
            or (vectors - exact_vectors.to(vectors.dtype)).abs_().max() > tol):
        raise InvalidFactorError(f"the stored eigendecomposition of {name} disagrees with the stored decomposition; "
                                 "the artifact is corrupt: rebuild or re-download it")
    return exact_values, exact_vectors


def _orthonormal(vectors: Tensor, stored: torch.dtype) -> Tensor:
    """Eigenvectors stored below float64 made exactly orthonormal again (one QR, no eigendecomposition).

    float32 columns are orthogonal only to ~1e-7, which an ill-conditioned precision amplifies into wrong solves and
    negative KLs; re-orthonormalised, the loaded Gaussian is a valid one within float32 of the saved one.
    """
    if stored == FACTOR_DTYPE or vectors.shape[0] == 0:
        return vectors
    q, r = torch.linalg.qr(vectors)
    return q * torch.sign(r.diagonal())  # keep each column's direction (R ≈ I with a positive diagonal)


def _decomposition_from(t: dict[str, Tensor], device: torch.device | str | None) -> Decomposition:
    def basis(name: str) -> Basis:
        b = t.get(f"dec.{name}.B")
        return Basis(t[f"dec.{name}.T"].to(device, FACTOR_DTYPE), None if b is None else b.to(device, FACTOR_DTYPE),
                     float(t[f"dec.{name}.logabsdet"][0]))

    return Decomposition(
        side_in=basis("in"), side_out=basis("out"),
        coords_in=t["dec.coords_in"].to(device, FACTOR_DTYPE), coords_out=t["dec.coords_out"].to(device, FACTOR_DTYPE),
        weights=t["dec.weights"].to(device, FACTOR_DTYPE), term_index=tuple(int(i) for i in t["dec.term_index"]),
    )


def _reweight(dec: Decomposition, scales: Tensor, damping: float) -> Decomposition | None:
    """New weights for new scales, or None when the decomposition's structure cannot express them."""
    if any(i == -2 for i in dec.term_index):
        return None  # a fitted nearest-Kronecker product depends on the scales themselves
    has_identity = -1 in dec.term_index
    if (damping > 0) != has_identity:
        return None
    w = [damping if i == -1 else scales[i].item() for i in dec.term_index]
    return dec.reweighted(torch.tensor(w, dtype=dec.weights.dtype))
