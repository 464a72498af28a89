"""zoo.kron.extend: a new Kronecker term in an existing precision's basis, against dense matrices."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.kron import KronPrecision, extend, kl_divergence, rescale_parts, split_diagonal


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return x @ x.T / (rank or n)


def dense_kl(mq: torch.Tensor, lq: torch.Tensor, mp: torch.Tensor, lp: torch.Tensor) -> float:
    d = (mq - mp).T.reshape(-1)
    sq = torch.linalg.inv(lq)
    return 0.5 * ((lp @ sq).trace() + d @ lp @ d - lq.shape[0] + torch.logdet(lq) - torch.logdet(lp)).item()


OUT, IN = 3, 4


def test_isotropic_prior_is_exact() -> None:
    prior = KronPrecision([(torch.eye(IN, dtype=torch.float64), torch.eye(OUT, dtype=torch.float64))], [2.0])
    a, g = spd(IN, 1, rank=2), spd(OUT, 2)
    q = extend(prior, a, g, scale=3.0, prior_scale=0.5)
    assert q.is_exact
    expected = 3.0 * torch.kron(a, g) + 0.5 * 2.0 * torch.eye(OUT * IN, dtype=torch.float64)
    torch.testing.assert_close(q.dense(), expected)
    e, r = split_diagonal(q)
    torch.testing.assert_close(r, torch.full((OUT, IN), 1.0, dtype=torch.float64))
    torch.testing.assert_close(e + r, q.decomposition().diagonal())


def test_one_term_prior_without_damping_is_exact() -> None:
    prior = KronPrecision([(spd(IN, 3), spd(OUT, 4))], [1.5])
    a, g = spd(IN, 5), spd(OUT, 6)
    q = extend(prior, a, g, scale=2.0, prior_scale=0.7)
    assert q.is_exact
    torch.testing.assert_close(q.decomposition().dense(), 2.0 * torch.kron(a, g) + 0.7 * prior.target_dense())


@pytest.mark.parametrize("chain", [1, 2])
def test_damped_prior_keeps_its_basis_and_the_new_diagonal(chain: int) -> None:
    prior = KronPrecision([(spd(IN, 7), spd(OUT, 8))], [1.0], damping=0.3)
    for step in range(chain):  # a posterior is the next task's prior
        prior = extend(prior, spd(IN, 20 + step, rank=2), spd(OUT, 30 + step), scale=1.3, prior_scale=0.9)
    a, g = spd(IN, 9, rank=2), spd(OUT, 10)
    q = extend(prior, a, g, scale=2.0, prior_scale=0.5)
    dq, dp = q.decomposition(), prior.decomposition()
    assert not q.is_exact and dq.side_in.T is dp.side_in.T and dq.side_out.T is dp.side_out.T
    t = torch.kron(dq.side_in.T, dq.side_out.T)
    target = 2.0 * torch.kron(a, g) + 0.5 * prior.dense()
    torch.testing.assert_close(dq.diagonal().T.reshape(-1), (t.T @ target @ t).diagonal())
    exact = q.target_dense()  # the dense sum of every term: what approximation_error measures against
    err = torch.linalg.matrix_norm(q.dense() - exact) / torch.linalg.matrix_norm(exact)
    assert q.approximation_error == pytest.approx(err.item(), rel=1e-6, abs=1e-7)
    _, r = split_diagonal(q)
    torch.testing.assert_close(r, 0.5 * dp.diagonal())
    g0 = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(OUT, IN, generator=g0, dtype=torch.float64), torch.zeros(OUT, IN, dtype=torch.float64)
    kl = kl_divergence(mq, q, mp, prior).item()
    assert kl == pytest.approx(dense_kl(mq, q.dense(), mp, prior.dense()), rel=1e-8)
    assert kl >= 0 and math.isfinite(kl)


def test_rescale_parts_matches_a_fresh_extension() -> None:
    prior = KronPrecision([(spd(IN, 11), spd(OUT, 12))], [1.0], damping=0.2)
    a, g = spd(IN, 13), spd(OUT, 14)
    q = rescale_parts(extend(prior, a, g), 4.0, 0.25)
    fresh = extend(prior, a, g, scale=4.0, prior_scale=0.25)
    torch.testing.assert_close(q.dense(), fresh.dense())
    torch.testing.assert_close(q.scales, fresh.scales)
    assert q.damping == pytest.approx(fresh.damping)


def test_round_trip_keeps_the_extended_decomposition() -> None:
    prior = KronPrecision([(spd(IN, 15), spd(OUT, 16))], [1.0], damping=0.2)
    q = extend(prior, spd(IN, 17, rank=1), spd(OUT, 18))
    back = KronPrecision.from_tensors(q.to_tensors())
    torch.testing.assert_close(back.dense(), q.dense())
