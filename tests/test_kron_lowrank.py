"""zoo.kron.lowrank: the O(n²r) diag(TᵀXT) of a low-rank factor, against the dense product."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import InvalidFactorError
from zoo.kron import KronPrecision, extend
from zoo.kron.exact import diagonal_eigh
from zoo.kron.extend import ROOT_EIGH_MIN_SIZE
from zoo.kron.lowrank import ROUNDING_MULTIPLE, congruence_diagonal, pivoted_cholesky, root_eigh

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def refuse_wide(monkeypatch: pytest.MonkeyPatch, function: str, width: int) -> None:
    """Make torch.linalg.`function` fail the test on any matrix `width` or more wide: the n³ route was taken."""
    original = getattr(torch.linalg, function)

    def small_only(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        assert x.shape[-1] < width, f"a factor {x.shape[-1]} wide went through torch.linalg.{function}"
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, function, small_only)


def basis(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def gram(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.logspace(0, -3, rank, dtype=torch.float64)
    return x @ x.T


def test_low_rank_factor_takes_the_root_and_matches_the_dense_diagonal() -> None:
    x, t = gram(200, 5, 0), basis(200, 1)
    values, found = congruence_diagonal(x, t, EPS64)
    assert found is not None and found[0].shape == (200, 5)
    torch.testing.assert_close(values, (t.T @ x @ t).diagonal(), rtol=0, atol=1e-12 * x.norm().item())
    root = pivoted_cholesky(x, 1e-12 * x.diagonal().max().item(), 20)
    assert root is not None and root.shape == (200, 5)


def test_float32_rounding_noise_stays_within_the_documented_error() -> None:
    """A float32-accumulated Gram matrix is full rank at rounding level; the root still applies, within
    ROUNDING_MULTIPLE·eps·‖X‖_F per entry (T orthonormal); judged as float64 it is not low rank."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(7, 300, generator=g)
    x = (rows.T @ rows).double()  # float32 product: rounding noise in every entry
    x = (x + x.T) / 2
    t = basis(300, 3)
    dense = (t.T @ x @ t).diagonal()
    values, found = congruence_diagonal(x, t, EPS32)
    assert found is not None and found[0].shape[1] == 7
    assert (values - dense).abs().max().item() <= found[1] <= ROUNDING_MULTIPLE * EPS32 * x.norm().item()
    values, found = congruence_diagonal(x, t, EPS64)
    assert found is None
    torch.testing.assert_close(values, dense)


def test_full_rank_factor_falls_back_to_the_dense_product() -> None:
    x, t = gram(64, 64, 4), basis(64, 5)
    values, found = congruence_diagonal(x, t, EPS64)
    assert found is None
    torch.testing.assert_close(values, (t.T @ x @ t).diagonal())
    assert pivoted_cholesky(x, 1e-12, 8) is None


def test_damped_prior_extension_with_a_wide_low_rank_factor_matches_dense() -> None:
    inn, out = 48, 3
    prior = KronPrecision([(gram(inn, inn, 6) + torch.eye(inn, dtype=torch.float64), gram(out, out, 7))], [1.0],
                          damping=0.3)
    a, g = gram(inn, 2, 8), gram(out, out, 9)
    q = extend(prior, a, g, scale=2.0, prior_scale=0.5)
    dq = q.decomposition()
    tk = torch.kron(dq.side_in.T, dq.side_out.T)
    target = 2.0 * torch.kron(a, g) + 0.5 * prior.dense()
    torch.testing.assert_close(dq.diagonal().T.reshape(-1), (tk.T @ target @ tk).diagonal())


def test_an_indefinite_new_factor_is_refused_on_either_route() -> None:
    inn, out = 48, 3
    prior = KronPrecision([(gram(inn, inn, 10) + torch.eye(inn, dtype=torch.float64), gram(out, out, 11))], [1.0],
                          damping=0.3)
    v = torch.zeros(inn, dtype=torch.float64)
    v[0] = 1.0
    shifted = gram(inn, inn, 13) - 5.0 * torch.eye(inn, dtype=torch.float64)
    for a in (gram(inn, 2, 12) - 0.5 * torch.outer(v, v), shifted):
        with pytest.raises(InvalidFactorError, match="positive semi-definite"):
            extend(prior, a, gram(out, out, 14))


def test_an_accepted_root_certifies_the_factor_without_a_cholesky(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost saved is real: a wide low-rank A needs neither the dense product nor the n³/3 Cholesky check."""
    inn, out = 96, 3
    prior = KronPrecision([(gram(inn, inn, 15) + torch.eye(inn, dtype=torch.float64), gram(out, out, 16))], [1.0],
                          damping=0.3)
    prior.decomposition()
    refuse_wide(monkeypatch, "cholesky_ex", inn)
    q = extend(prior, gram(inn, 3, 17), gram(out, out, 18))
    assert torch.isfinite(q.decomposition().diagonal()).all()


def iso_prior(inn: int, out: int, value: float) -> KronPrecision:
    return KronPrecision([(torch.eye(inn, dtype=torch.float64), torch.eye(out, dtype=torch.float64))], [value])




def test_root_eigh_is_an_orthonormal_eigendecomposition_of_the_root() -> None:
    root = torch.randn(120, 4, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    values, vectors = root_eigh(root)
    assert values.shape == (120,) and bool((values[1:] >= values[:-1]).all()) and bool((values[:-4] == 0).all())
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(120, dtype=torch.float64))
    torch.testing.assert_close((vectors * values) @ vectors.T, root @ root.T)


def test_isotropic_prior_extension_with_a_low_rank_factor_needs_no_wide_eigensolver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A few-shot posterior against zoo.tuning.isotropic_prior: the prior's identities are read off and the new
    wide factor's basis comes from its root, and the result is still the exact dense sum."""
    inn, out = ROOT_EIGH_MIN_SIZE, 3
    prior = iso_prior(inn, out, 2.0)
    x = torch.randn(inn, 3, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    a, g = x @ x.T, gram(out, out, 21)
    refuse_wide(monkeypatch, "eigh", inn)
    q = extend(prior, a, g, scale=3.0, prior_scale=0.5)
    expected = 3.0 * torch.kron(a, g) + torch.eye(inn * out, dtype=torch.float64)
    dense = q.decomposition().dense()
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-12 * expected.norm().item())
    torch.testing.assert_close(q.logdet(), torch.logdet(expected))
    assert q.new_input_root is not None and q.new_input_root[0].shape == (inn, 3)
    theta = torch.randn(out, inn, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    torch.testing.assert_close(prior.quadratic(theta), 2.0 * theta.square().sum())


def test_isotropic_prior_extension_with_a_full_rank_factor_uses_the_eigensolver() -> None:
    inn, out = 48, 3
    a, g = gram(inn, inn, 23), gram(out, out, 24)
    q = extend(iso_prior(inn, out, 1.5), a, g)
    assert q.new_input_root is None
    expected = torch.kron(a, g) + 1.5 * torch.eye(inn * out, dtype=torch.float64)
    torch.testing.assert_close(q.decomposition().dense(), expected)


def test_an_indefinite_new_factor_is_refused_against_an_isotropic_prior() -> None:
    inn, out = ROOT_EIGH_MIN_SIZE, 3  # wide enough for the root route to be tried
    v = torch.zeros(inn, dtype=torch.float64)
    v[0] = 1.0
    shifted = gram(inn, inn, 26) - 5.0 * torch.eye(inn, dtype=torch.float64)
    for a in (gram(inn, 2, 25) - 0.5 * torch.outer(v, v), shifted):
        with pytest.raises(InvalidFactorError, match="positive semi-definite"):
            extend(iso_prior(inn, out, 1.0), a, gram(out, out, 27))


def test_a_diagonal_factor_is_decomposed_without_lapack(monkeypatch: pytest.MonkeyPatch) -> None:
    diag = torch.tensor([3.0, 1.0, 2.0, 0.0] * 10, dtype=torch.float64)
    refuse_wide(monkeypatch, "eigh", 2)
    values, vectors = diagonal_eigh(torch.diag(diag))
    torch.testing.assert_close(values, diag.sort().values)
    torch.testing.assert_close((vectors * values) @ vectors.T, torch.diag(diag))
    assert diagonal_eigh(gram(40, 40, 28)) is None
    nearly = torch.diag(diag)
    nearly[5, 7] = nearly[7, 5] = 1e-30
    assert diagonal_eigh(nearly) is None
