"""No LinAlgError escapes: robust_eigh's recorded fallbacks, and a build that survives a failing LAPACK driver."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
import zoo.tuning
from zoo import NumericalError
from zoo.kron import KronPrecision
from zoo.kron import exact as kron_exact
from zoo.kron.exact import EIGH_FALLBACKS, robust_eigh

_EIGH = torch.linalg.eigh


def _failing_eigh(failures: int):
    """torch.linalg.eigh that raises LAPACK's convergence error on its first `failures` calls."""
    calls = {"n": 0}

    def eigh(x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return _EIGH(x, *args, **kwargs)

    return eigh


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + torch.eye(n, dtype=torch.float64)


def test_jitter_fallback_is_exact_and_recorded(monkeypatch) -> None:
    x = _spd(12)
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(1))
    before = len(EIGH_FALLBACKS)
    values, vectors = robust_eigh(x, "A[0]")
    assert EIGH_FALLBACKS[before:] == [{"factor": "A[0]", "size": 12, "method": "jitter", "relative": 1e-13}]
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, x, atol=1e-9)
    assert torch.allclose(values, _EIGH(x)[0], rtol=1e-10)


def test_scipy_driver_when_every_shift_fails(monkeypatch) -> None:
    x = _spd(9, seed=1)
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(10))
    before = len(EIGH_FALLBACKS)
    values, vectors = robust_eigh(x, "G[0]")
    assert EIGH_FALLBACKS[before:][-1]["method"] == "scipy-ev"
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, x, atol=1e-9)


def test_non_finite_factor_is_a_numerical_error() -> None:
    x = _spd(4)
    x[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        robust_eigh(x, "A[0]")


def test_repeated_eigenvalues_decompose() -> None:
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    x = q @ torch.diag(torch.tensor([1.0] * 25 + [1e-12] * 25, dtype=torch.float64)) @ q.T
    p = KronPrecision([(x, _spd(3))], damping=1e-3)
    assert torch.isfinite(p.logdet())


def test_build_and_finetune_survive_a_failing_driver(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(3))
    prior = zoo.build_prior(model, loader, holdout=0, progress=False, generator=torch.Generator().manual_seed(0))
    # plain eigh and two shifts fail on the first factor; the third shift (1e-9) succeeds and is recorded
    assert prior.meta["numerics"]["eigh_fallbacks"] == [{"factor": "A[0]", "size": 6, "method": "jitter",
                                                          "relative": 1e-9}]
    monkeypatch.setattr(kron_exact.torch.linalg, "eigh", _failing_eigh(1))
    isotropic = zoo.tuning.isotropic_prior(prior)  # F_new ⊗ in the eigenbases of its own factors: eigh runs
    post = zoo.finetune(model, isotropic, loader, epochs=2, progress=False, generator=torch.Generator().manual_seed(0))
    assert [r["method"] for r in post.meta["numerics"]["eigh_fallbacks"]] == ["jitter"]
    assert torch.isfinite(post.kl(post.prior))
