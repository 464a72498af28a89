"""zoo.kron against dense torch.linalg on small layers (docs/method.md §1, §4)."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zoo import InvalidFactorError, SingularPrecisionError, ZooError
from zoo.kron import KronPrecision, kl_divergence

F64 = torch.float64


def spd(n: int, rank: int | None = None, seed: int = 0, cond: float | None = None) -> torch.Tensor:
    """A PSD matrix: Σ x xᵀ of `rank` samples (K-FAC-like), or with a prescribed condition number."""
    g = torch.Generator().manual_seed(seed)
    if cond is not None:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        values = torch.logspace(0, -math.log10(cond), n, dtype=F64) if n > 1 else torch.ones(1, dtype=F64)
        return (q * values) @ q.T
    x = torch.randn(n, rank or n + 2, generator=g, dtype=F64)
    return x @ x.T


def vec(v: torch.Tensor) -> torch.Tensor:
    return v.mT.reshape(*v.shape[:-2], -1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def mp_reference(p: KronPrecision) -> tuple[mpmath.matrix, mpmath.matrix]:
    """The exact precision and its inverse at 50 digits, built from the float64 factors (the float64 dense
    matrix's own rounding would swamp a 1e-8 check once the condition number passes 1e8)."""
    with mpmath.workdps(50):
        d = p.dim
        m = mpmath.zeros(d, d)
        for s, a, g in zip(p.scales.tolist(), p.A, p.G, strict=True):
            k = torch.kron(a, g)  # products of two float64 numbers are exact in 50 digits, not in float64
            ka = a.tolist()
            kg = g.tolist()
            out = len(kg)
            for i in range(k.shape[0]):
                for j in range(k.shape[1]):
                    m[i, j] += mpmath.mpf(s) * mpmath.mpf(ka[i // out][j // out]) * mpmath.mpf(kg[i % out][j % out])
        for i in range(d):
            m[i, i] += mpmath.mpf(p.damping)
        return m, m**-1


def mp_to_torch(m: mpmath.matrix) -> torch.Tensor:
    return torch.tensor([[float(m[i, j]) for j in range(m.cols)] for i in range(m.rows)], dtype=F64)


def dense_kl(mq, lq, mp, lp) -> float:
    sq = torch.linalg.inv(lq)
    d = vec(mq - mp)
    return 0.5 * (torch.trace(lp @ sq) + d @ lp @ d - lq.shape[0] + torch.logdet(lq) - torch.logdet(lp)).item()


# Exact cases on (out, in) shapes that include the 1×1 and 1×n edges, low-rank and ill-conditioned factors.
SHAPES = [(1, 1), (1, 4), (4, 1), (3, 5), (6, 4)]


def exact_cases(out: int, inn: int) -> list[KronPrecision]:
    a_full, g_full = spd(inn, seed=1), spd(out, seed=2)
    a_low, g_low = spd(inn, rank=1, seed=3), spd(out, rank=1, seed=4)
    a_ill, g_ill = spd(inn, cond=1e6, seed=5), spd(out, cond=1e5, seed=6)
    return [
        KronPrecision([(a_full, g_full)]),
        KronPrecision([(a_ill, g_ill)], scales=[2.5]),
        KronPrecision([(a_low, g_low)], damping=0.3),
        KronPrecision([(a_low, g_low), (a_full, g_full)], scales=[3.0, 0.5]),
        KronPrecision([(a_full, g_full), (a_low, g_low)]),  # whitening falls back to the first term
        KronPrecision([(a_ill, g_ill), (a_full, g_full)], scales=[0.1, 7.0]),
        # the prior's G is too ill-conditioned to whiten by, so each side whitens by a different term
        KronPrecision([(a_full, g_full), (spd(inn, seed=8), spd(out, cond=1e12, seed=9))]),
    ]


@pytest.mark.parametrize("out,inn", SHAPES)
def test_exact_operations_match_dense(out: int, inn: int) -> None:
    for p in exact_cases(out, inn):
        assert p.is_exact and p.approximation_error == 0.0
        exact, exact_inv = mp_reference(p)
        dense, inverse = mp_to_torch(exact), mp_to_torch(exact_inv)
        with mpmath.workdps(50):
            logdet = float(mpmath.log(mpmath.det(exact)))
        assert abs(p.logdet().item() - logdet) <= 1e-8 * max(1.0, abs(logdet))
        v = torch.randn(2, out, inn, dtype=F64, generator=torch.Generator().manual_seed(7))
        assert rel(vec(p.solve(v)), vec(v) @ inverse.T) < 1e-8
        quad = torch.einsum("bi,ij,bj->b", vec(v), dense, vec(v))
        assert rel(p.quadratic(v), quad) < 1e-8
        a, g = spd(inn, seed=11), spd(out, seed=12)
        tr = torch.trace(torch.kron(a, g) @ inverse)
        assert abs(p.trace_inv(a, g).item() - tr.item()) <= 1e-8 * tr.item()


def test_dense_is_the_documented_convention() -> None:
    a, g = spd(3, seed=1), spd(2, seed=2)
    p = KronPrecision([(a, g)])
    w = torch.randn(2, 3, dtype=F64)
    # vec(W)ᵀ (A ⊗ G) vec(W) = tr(G W A Wᵀ) and (A ⊗ G) vec(V) = vec(G V Aᵀ)  (docs/method.md §1)
    assert torch.allclose(p.dense(), torch.kron(a, g))
    assert torch.allclose(p.quadratic(w), torch.trace(g @ w @ a @ w.T))
    assert torch.allclose(torch.kron(a, g) @ vec(w), vec(g @ w @ a.T))


def test_singular_precision_refuses_inverse_ops() -> None:
    p = KronPrecision([(spd(4, rank=1), spd(3, rank=2))])
    assert p.quadratic(torch.ones(3, 4, dtype=F64)).item() >= 0  # defined without inverting
    for op in (p.logdet, lambda: p.solve(torch.ones(3, 4)), lambda: p.sample(1)):
        with pytest.raises(SingularPrecisionError, match="damping"):
            op()


@pytest.mark.parametrize("out,inn", [(1, 1), (2, 3), (4, 3)])
def test_samples_have_the_inverse_covariance(out: int, inn: int) -> None:
    p = KronPrecision([(spd(inn, rank=1, seed=3), spd(out, seed=4)), (spd(inn, seed=5), spd(out, seed=6))])
    n = 40_000
    x = vec(p.sample(n, generator=torch.Generator().manual_seed(0)))
    cov = x.T @ x / n
    target = torch.linalg.inv(p.dense())
    # Entrywise, a sample covariance has standard error sqrt((Σ_ij² + Σ_ii Σ_jj) / n).
    se = ((target.square() + torch.outer(target.diag(), target.diag())) / n).sqrt()
    assert ((cov - target).abs() / se).max().item() < 5.0
    assert abs(x.mean(0)).max().item() < 5 * target.diag().sqrt().max().item() / math.sqrt(n)


def test_sampling_is_seeded() -> None:
    p = KronPrecision([(spd(3), spd(2))], damping=0.1)
    a = p.sample(3, generator=torch.Generator().manual_seed(42))
    b = p.sample(3, generator=torch.Generator().manual_seed(42))
    c = p.sample(3, generator=torch.Generator().manual_seed(43))
    assert a.shape == (3, 2, 3) and torch.equal(a, b) and not torch.equal(a, c)


# ---- approximations -------------------------------------------------------------------------------------------


def approx_cases(method: str) -> list[KronPrecision]:
    a_new, g_new = spd(6, rank=2, seed=1), spd(4, rank=3, seed=2)
    a_src, g_src = spd(6, rank=20, seed=3), spd(4, rank=20, seed=4)
    return [
        KronPrecision([(a_new, g_new), (a_src, g_src)], [2.0, 0.5], damping=0.3, approximation=method),
        KronPrecision([(a_new, g_new), (spd(6, seed=5), spd(4, seed=6)), (a_src, g_src)], approximation=method),
        KronPrecision(
            [(a_new, g_new), (spd(6, seed=7), spd(4, seed=8)), (a_src, g_src)], [1, 2, 3], damping=1.0,
            approximation=method,
        ),
    ]


@pytest.mark.parametrize("method", ["eigenbasis", "kronecker", "ekfac"])
def test_approximation_reports_its_dense_error(method: str) -> None:
    for p in approx_cases(method):
        assert not p.is_exact
        measured = rel(p.dense(), p.target_dense())
        assert measured > 1e-6  # these cases really are approximations
        assert abs(p.approximation_error - measured) <= 1e-6 * measured
        # The operations are consistent with the matrix they approximate by.
        v = torch.randn(5, *p.shape, dtype=F64)
        assert rel(vec(p.solve(v)), torch.linalg.solve(p.dense(), vec(v).T).T) < 1e-8
        assert abs(p.logdet().item() - torch.logdet(p.dense()).item()) < 1e-8 * abs(p.logdet().item())


def test_nearest_kronecker_is_the_svd_optimum() -> None:
    """Brute force Van Loan–Pitsianis: rearrange the dense sum and take its top singular pair."""
    p = approx_cases("kronecker")[2]
    out, inn = p.shape
    target = p.target_dense()
    # R[(i,j), (k,l)] = Λ[(block i,j of A), (entry k,l of G)] for Λ = A ⊗ G.
    r = target.reshape(inn, out, inn, out).permute(0, 2, 1, 3).reshape(inn * inn, out * out)
    s = torch.linalg.svdvals(r)
    best = math.sqrt((s[1:] ** 2).sum().item()) / target.norm().item()
    assert abs(p.approximation_error - best) < 1e-8


def test_ekfac_refit_never_loses_to_the_nearest_kronecker_product() -> None:
    for ek, kr in zip(approx_cases("ekfac"), approx_cases("kronecker"), strict=True):
        assert ek.approximation_error <= kr.approximation_error + 1e-9


def test_eigenbasis_keeps_the_prior_exact() -> None:
    """With no new data term (only the prior and damping), the eigenbasis form reproduces it exactly."""
    a_src, g_src = spd(5, seed=3), spd(3, seed=4)
    tiny = 1e-12
    p = KronPrecision([(tiny * spd(5, rank=1), spd(3, rank=1)), (a_src, g_src)], damping=0.5)
    assert rel(p.dense(), p.target_dense()) < 1e-12
    assert p.approximation_error < 1e-7  # the factor-only formula subtracts squared norms: its floor is ~1e-8


def test_rescaling_reuses_the_decomposition() -> None:
    p = approx_cases("eigenbasis")[0]
    dec = p.decomposition()
    q = p.rescaled(scales=[0.25, 4.0], damping=0.7)
    assert q._dec is not None and q._dec.side_in.T is dec.side_in.T
    fresh = KronPrecision(q.terms, [0.25, 4.0], 0.7, approximation="eigenbasis")
    assert rel(q.dense(), fresh.dense()) < 1e-12
    r = (3.0 * p) / 2.0
    assert r._dec is not None and r._dec.side_in.T is dec.side_in.T
    assert rel(r.dense(), 1.5 * p.dense()) < 1e-12
    assert abs(r.logdet().item() - (p.logdet().item() + p.dim * math.log(1.5))) < 1e-9 * abs(r.logdet().item())


def test_addition_carries_the_prior_eigendecomposition() -> None:
    prior = KronPrecision([(spd(5, seed=3), spd(3, seed=4))])
    prior.decomposition()
    post = KronPrecision([(spd(5, rank=2, seed=1), spd(3, rank=1, seed=2))], [2.0]) + 0.5 * prior
    assert post.is_exact and post._eig_a[1] is prior._eig_a[0]
    assert rel(post.dense(), 2.0 * torch.kron(*post.terms[0]) + 0.5 * prior.dense()) < 1e-12
    ones = torch.ones(3, 5, dtype=F64)
    assert rel(vec(post.solve(ones)), torch.linalg.inv(post.dense()) @ vec(ones)) < 1e-8


def test_provided_factor_eigendecompositions_are_used_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    a, g = spd(5, seed=5), spd(3, seed=6)
    given_a, given_g = torch.linalg.eigh(a), torch.linalg.eigh(g)
    p = KronPrecision([(a, g)], [2.0], 0.3)
    p.provide_factor_eigh(0, a=(given_a.eigenvalues, given_a.eigenvectors), g=(given_g.eigenvalues,
                                                                              given_g.eigenvectors))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the eigensolver ran on a factor whose decomposition was provided")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    assert rel(p.dense(), 2.0 * torch.kron(a, g) + 0.3 * torch.eye(15, dtype=F64)) < 1e-12
    with pytest.raises(InvalidFactorError, match=r"A\[0\] must be \(5,\) values"):
        p.provide_factor_eigh(0, a=(given_g.eigenvalues, given_g.eigenvectors))


def test_a_sum_stored_with_its_terms_eigendecompositions_still_loads() -> None:
    """Repositories written before a sum was saved as its decomposition alone hold its terms' eigenpairs as well;
    they load with those and the same decomposition."""
    prior = KronPrecision([(spd(5, seed=3), spd(3, seed=4))])
    prior.decomposition()
    post = KronPrecision([(spd(5, rank=2, seed=1), spd(3, rank=1, seed=2))], [2.0]) + 0.5 * prior
    dec = post.decomposition()
    post.factor_eigh(0)
    tensors = post.to_tensors()
    assert {"eig.A.0.values", "eig.A.1.values", "eig.G.0.values", "eig.G.1.values"} <= set(tensors)
    loaded = KronPrecision.from_tensors(tensors)
    assert set(loaded.to_tensors()) == set(tensors)
    assert set(loaded._eig_a) == set(loaded._eig_g) == {0, 1}
    torch.testing.assert_close(loaded.decomposition().weights, dec.weights)


# ---- KL --------------------------------------------------------------------------------------------------------


def test_kl_matches_dense_and_is_zero_for_identical() -> None:
    out, inn = 3, 4
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(out, inn, generator=g, dtype=F64), torch.randn(out, inn, generator=g, dtype=F64)
    prior = KronPrecision([(spd(inn, seed=3), spd(out, seed=4))], damping=0.2)
    precisions = [
        prior,
        KronPrecision([(spd(inn, seed=5), spd(out, seed=6))]),
        KronPrecision([(spd(inn, rank=1, seed=7), spd(out, seed=8))]) + prior,
        KronPrecision([(spd(inn, rank=1, seed=7), spd(out, seed=8)), (spd(inn, seed=9), spd(out, seed=1))]),
    ]
    for pq in precisions:
        for pp in precisions:
            value = kl_divergence(mq, pq, mp, pp).item()
            assert value >= 0
            assert abs(value - dense_kl(mq, pq.dense(), mp, pp.dense())) < 1e-8 * max(1.0, value)
        assert abs(kl_divergence(mq, pq, mq, pq).item()) < 1e-10
        same = KronPrecision(pq.terms, pq.scales, pq.damping)  # equal values, separate decomposition
        assert abs(kl_divergence(mq, pq, mq, same).item()) < 1e-8


def test_kl_is_differentiable_in_the_mean() -> None:
    p = KronPrecision([(spd(3), spd(2))], damping=0.1)
    m = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    target = torch.ones(2, 3, dtype=F64)
    kl_divergence(m, p, target, p).backward()
    # ∂/∂m ½ (m-μ)ᵀ Λ (m-μ) = Λ (m-μ)
    expected = (p.dense() @ vec(m.detach() - target)).reshape(3, 2).T
    assert torch.allclose(m.grad, expected)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 4), inn=st.integers(1, 4), rank=st.integers(1, 5), seed=st.integers(0, 10_000),
    damping=st.floats(1e-3, 10.0), scale=st.floats(1e-2, 1e2),
)
def test_kl_nonnegative_and_exact_against_dense(out, inn, rank, seed, damping, scale) -> None:
    g = torch.Generator().manual_seed(seed)
    mq, mp = torch.randn(out, inn, generator=g, dtype=F64), torch.randn(out, inn, generator=g, dtype=F64)
    prior = KronPrecision([(spd(inn, rank=rank, seed=seed), spd(out, rank=rank, seed=seed + 1))], damping=damping)
    post = KronPrecision([(spd(inn, rank=1, seed=seed + 2), spd(out, seed=seed + 3))], [scale]) + prior * 0.7
    for pq, pp in ((post, prior), (prior, post), (prior * scale, prior)):
        value = kl_divergence(mq, pq, mp, pp).item()
        assert value >= 0
        ref = dense_kl(mq, pq.dense(), mp, pp.dense())
        assert abs(value - ref) <= 1e-7 * max(1.0, abs(ref))


# ---- export / import -------------------------------------------------------------------------------------------


def _no_eigh(*args: object, **kwargs: object) -> None:
    raise AssertionError("a loaded KronPrecision must not eigendecompose again")


def test_round_trip_through_plain_tensors_needs_no_decomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    for p in [*exact_cases(3, 4), *approx_cases("eigenbasis"), *approx_cases("kronecker"), *approx_cases("ekfac")]:
        tensors = st_load(st_save(p.to_tensors()))
        with monkeypatch.context() as m:
            m.setattr(torch.linalg, "eigh", _no_eigh)
            q = KronPrecision.from_tensors(tensors)
            v = torch.randn(*p.shape, dtype=F64)
            assert rel(q.solve(v), p.solve(v)) < 1e-12
            assert q.logdet().item() == pytest.approx(p.logdet().item(), rel=1e-12)
            assert q.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, *p.shape)
        assert q.is_exact == p.is_exact


def _no_qr(*args: object, **kwargs: object) -> None:
    raise AssertionError("a one-term decomposition already holds float64 eigenvectors: no QR at load")


def test_single_term_import_takes_the_decompositions_float64_eigenvectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """As an artifact stores it: eigenpairs in float32, the decomposition in float64. Loading reuses the latter."""
    p = KronPrecision([(spd(6, rank=3), spd(4))], [2.0], damping=0.3)
    p.decomposition()
    tensors = {k: (v.float() if k.startswith("eig.") else v) for k, v in p.to_tensors().items()}
    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "qr", _no_qr)
        m.setattr(torch.linalg, "eigh", _no_eigh)
        q = KronPrecision.from_tensors(tensors)
    (la, ua), (lg, ug) = q.factor_eigh()
    assert ua.dtype == F64 and torch.equal(ua, tensors["dec.in.T"]) and torch.equal(ug, tensors["dec.out.T"])
    assert rel(ua.T @ ua, torch.eye(6, dtype=F64)) < 1e-13
    assert rel(ua @ torch.diag(la) @ ua.T, p.A[0]) < 1e-12 and rel(ug @ torch.diag(lg) @ ug.T, p.G[0]) < 1e-12
    bad = dict(tensors, **{"eig.A.0.vectors": tensors["eig.A.0.vectors"] + 1e-3})
    with pytest.raises(InvalidFactorError, match="disagrees"):
        KronPrecision.from_tensors(bad)


def test_corrupt_import_is_refused() -> None:
    tensors = KronPrecision([(spd(3), spd(2))], damping=0.1).to_tensors()
    bad = dict(tensors, **{"dec.in.T": torch.eye(4, dtype=F64)})
    with pytest.raises(InvalidFactorError, match="does not fit"):
        KronPrecision.from_tensors(bad)
    with pytest.raises(InvalidFactorError, match="missing"):
        KronPrecision.from_tensors({k: v for k, v in tensors.items() if k != "G.0"})


# ---- invalid input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: KronPrecision([]),
        lambda: KronPrecision([(torch.ones(2, 3), torch.eye(2))]),
        lambda: KronPrecision([(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.eye(2))]),
        lambda: KronPrecision([(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.eye(2))]),  # indefinite
        lambda: KronPrecision([(torch.eye(2) * float("nan"), torch.eye(2))]),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2)), (torch.eye(3), torch.eye(2))]),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))], scales=[-1.0]),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))], scales=[1.0, 2.0]),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))], damping=-0.1),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))], approximation="best"),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))]).solve(torch.ones(2, 3)),
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))]) * -1.0,
        lambda: KronPrecision([(torch.eye(2), torch.eye(2))]).sample(-1),
        lambda: kl_divergence(torch.zeros(2, 2), KronPrecision([(torch.eye(2), torch.eye(2))]), torch.zeros(3, 2),
                              KronPrecision([(torch.eye(2), torch.eye(2))])),
    ],
)
def test_invalid_input_raises_zoo_error(make) -> None:
    with pytest.raises(ZooError):
        make()


def test_float32_rounding_is_tolerated_but_not_indefiniteness() -> None:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    a32 = x @ x.T  # float32, rank 3: eigenvalues at rounding level on both sides of 0
    p = KronPrecision([(a32, torch.eye(2))], damping=1e-3)
    assert math.isfinite(p.logdet().item())
    with pytest.raises(InvalidFactorError, match="positive semi-definite"):
        KronPrecision([(a32 - 0.1 * torch.eye(50), torch.eye(2))])


def test_kl_to_isotropic_matches_dense() -> None:
    from zoo.kron import kl_to_isotropic

    p = KronPrecision([(spd(4, rank=2), spd(3))], [2.0], damping=0.5)
    m = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    lam = 0.7
    ref = dense_kl(m, p.dense(), torch.zeros(3, 4, dtype=F64), lam * torch.eye(12, dtype=F64))
    assert abs(kl_to_isotropic(m, p, lam).item() - ref) < 1e-10 * max(1.0, ref)
    with pytest.raises(ZooError):
        kl_to_isotropic(m, p, 0.0)


@pytest.mark.parametrize("n", [7, 512, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_symmetry_is_checked_tile_by_tile_like_the_dense_check(n: int, dtype: torch.dtype) -> None:
    from zoo.kron.validate import as_factor, max_asymmetry

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = (a + a.T).to(dtype)
    assert max_asymmetry(a) == 0.0
    assert torch.equal(as_factor(a, n, "A"), a.double())  # an exactly symmetric factor is only converted
    i, j = n - 1, n // 3  # a lower-triangle entry, in the last (partial) tile
    a[i, j] += 1e-3 * a.abs().max()
    assert max_asymmetry(a) == pytest.approx((a - a.T).abs().max().item(), rel=1e-6)
    with pytest.raises(InvalidFactorError, match="not symmetric"):
        as_factor(a, n, "A")
    small = a.clone()
    small[i, j] = small[j, i] * (1 + torch.finfo(dtype).eps)  # rounding-level asymmetry is symmetrised
    fixed = as_factor(small, n, "A")
    assert torch.equal(fixed, fixed.T) and fixed.dtype == torch.float64


def test_float32_draws_drop_basis_noise_that_would_make_subnormal_products() -> None:
    """An input factor with an exact-zero block (a conv's zero-padded border) gives eigenvectors with rounding
    noise where they should be 0; as float32 operands such entries make subnormal products, which slowed resnet10t's
    draws 8×. The float32 sampler's bases hold none below eps² of their column, and the draws keep the dense
    covariance."""
    from zoo.kron.decomposition import basis_for_matmul

    noisy = torch.tensor([[1.0, 1e-39], [3e-38, 0.5], [1e-20, -1e-12]], dtype=torch.float64)
    clean = basis_for_matmul(noisy, torch.float32)
    assert clean.dtype == torch.float32
    assert clean.tolist() == [[1.0, 0.0], [0.0, 0.5], [0.0, pytest.approx(-1e-12)]]

    a = torch.zeros(6, 6, dtype=torch.float64)
    a[:4, :4] = spd(4, seed=1)  # two input coordinates are never seen: their factor rows are exactly zero
    p = KronPrecision([(a, spd(3, seed=2)), (spd(6, seed=3), spd(3, seed=4))], damping=1e-3)
    t_out, t_in, _ = p.decomposition()._single_sampler
    for t in (t_out, t_in):
        nonzero = t[t != 0].abs()
        assert (nonzero >= t.abs().amax(0).min() * torch.finfo(torch.float32).eps ** 2).all()
    n = 40_000
    x = vec(p.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float32)).double()
    target = torch.linalg.inv(p.dense())
    se = ((target.square() + torch.outer(target.diag(), target.diag())) / n).sqrt()
    assert ((x.T @ x / n - target).abs() / se).max().item() < 5.0
