"""Input-span projected draws: the width selection's cheaper draws change nothing on the training inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
import zoo.kron.decomposition
from zoo.curvature import kfac
from zoo.errors import ConfigError
from zoo.kron import KronPrecision
from zoo.posterior_fit import posterior_pieces, training_spans
from zoo.predictive import Predictor


def _layer(terms: int = 1) -> tuple[KronPrecision, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(terms):
        a = torch.randn(12, 12, generator=g, dtype=torch.float64)
        gg = torch.randn(3, 3, generator=g, dtype=torch.float64)
        pairs.append((a @ a.T + torch.eye(12, dtype=torch.float64), gg @ gg.T + torch.eye(3, dtype=torch.float64)))
    q = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64)).Q
    return KronPrecision(pairs), q


def _projected_covariance(p: KronPrecision, q: torch.Tensor) -> torch.Tensor:
    """Dense Cov[vec(W QQᵀ)] = (QQᵀ ⊗ I) Λ⁻¹ (QQᵀ ⊗ I), vec stacking columns."""
    proj = torch.kron(q @ q.T, torch.eye(p.shape[0], dtype=torch.float64))
    return proj @ torch.linalg.inv(p.dense()) @ proj


@pytest.mark.parametrize("terms", [1, 2])
def test_the_row_roots_give_the_projected_covariance_exactly(terms: int) -> None:
    """W·Q = T_out·M, M's row o ~ N(0, L_o L_oᵀ): the covariance those roots imply is the dense projected one."""
    p, q = _layer(terms)
    dec = p.decomposition()
    _, _, roots, _ = dec._span(q, torch.float64, dec.device)
    out, r = p.shape[0], q.shape[1]
    cov_m = torch.zeros(out * r, out * r, dtype=torch.float64)  # vec(M): index a·out + o
    for o in range(out):
        idx = torch.arange(r) * out + o
        cov_m[idx[:, None], idx[None, :]] = roots[o] @ roots[o].T
    lift = torch.kron(q.contiguous(), dec.side_out.T.contiguous())  # vec(T_out M Qᵀ) = (Q ⊗ T_out) vec(M)
    torch.testing.assert_close(lift @ cov_m @ lift.T, _projected_covariance(p, q), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("roots", [True, False])
def test_projected_draws_have_the_projected_covariance(roots: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both samplers, through the public draw: the empirical covariance of 100 000 draws against the dense one."""
    if not roots:
        monkeypatch.setattr(zoo.kron.decomposition, "SPAN_ROOT_MAX_RANK", 0)
    p, q = _layer(2)
    n = 100_000
    draws = p.sample(n, torch.Generator().manual_seed(1), dtype=torch.float64, span=q)
    v = draws.mT.reshape(n, -1)
    reference = _projected_covariance(p, q)
    assert ((v.T @ v / n - reference).abs().max() / reference.abs().max()).item() < 0.03
    with pytest.raises(ConfigError, match="input span"):
        p.sample(1, span=q[:5])


def test_without_roots_the_projected_draws_are_the_full_draws_times_the_projector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SPAN_ROOT_MAX_RANK the projection takes the full draw's own noise: W·QQᵀ of the very same W."""
    monkeypatch.setattr(zoo.kron.decomposition, "SPAN_ROOT_MAX_RANK", 0)
    p, q = _layer()
    full = p.sample(5, torch.Generator().manual_seed(1), dtype=torch.float64)
    projected = p.sample(5, torch.Generator().manual_seed(1), dtype=torch.float64, span=q)
    torch.testing.assert_close(projected, full @ q @ q.T)


def test_draws_are_rotated_on_the_requested_device_from_the_same_noise() -> None:
    """A CPU generator's noise, rotated where the network runs (PyTorch's shape-only "meta" device stands in for a
    GPU here; benchmarks/cuda_build_check.py compares the values on a real one). float64 draws stay exact."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    gg = torch.randn(3, 3, generator=g, dtype=torch.float64)
    p = KronPrecision([(a @ a.T + torch.eye(12, dtype=torch.float64), gg @ gg.T + torch.eye(3, dtype=torch.float64))])
    q = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64)).Q
    for span in (None, q):
        here = p.sample(2, torch.Generator().manual_seed(1), dtype=torch.float64, span=span)
        same = p.sample(2, torch.Generator().manual_seed(1), dtype=torch.float64, span=span, device="cpu")
        assert torch.equal(here, same)
        there = p.sample(2, torch.Generator().manual_seed(1), dtype=torch.float32, span=span, device="meta")
        assert there.device.type == "meta" and there.shape == (2, 3, 12) and there.dtype == torch.float32


@pytest.fixture(scope="module")
def conv_posterior() -> tuple[zoo.Prior, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A tiny conv net whose 73-wide conv input sees 8 patches on two images: a low-rank input factor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    x = torch.randn(40, 8, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    prior = zoo.build_prior(model, [(x[:30], y[:30])], holdout=0, progress=False,
                            generator=torch.Generator().manual_seed(0))
    train = [(x[30:32], y[30:32])]
    blocks = kfac(model, train, "mc", progress=False, dtype=torch.float64)
    spans = training_spans(blocks, dict(prior.layers), "expand")
    return prior, x[30:32], x[32:], spans, blocks, model


def test_spans_leave_the_training_deviations_unchanged_and_only_those(conv_posterior,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn from the full noise (no roots), the projected deviations on the training inputs are the full ones, draw
    for draw; on other inputs they are not."""
    monkeypatch.setattr(zoo.kron.decomposition, "SPAN_ROOT_MAX_RANK", 0)
    prior, train_x, other_x, spans, _, _ = conv_posterior
    assert {k: tuple(v.shape) for k, v in spans.items()} == {"0": (73, 8), "3": (17, 2)}
    assert training_spans({}, dict(prior.layers), "reduce") == {}

    def parts(x: torch.Tensor, use: dict | None) -> torch.Tensor:
        predictor = Predictor(prior, mode="glm", samples=6, generator=torch.Generator().manual_seed(3), spans=use)
        return predictor.linear_parts(x)[1]

    torch.testing.assert_close(parts(train_x, spans), parts(train_x, None), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(parts(other_x, spans), parts(other_x, None), rtol=1e-2, atol=1e-3)
    with pytest.raises(ConfigError, match="glm"):
        Predictor(prior, mode="nn", samples=2, spans=spans)


def test_root_drawn_spans_keep_the_training_deviations_distribution(conv_posterior) -> None:
    """With the row roots (both spans here are narrow enough) the draws are another stream: on the training inputs
    the deviations' covariance over 2000 draws matches the full draws'; on other inputs it is smaller."""
    prior, train_x, other_x, spans, _, _ = conv_posterior

    def covariance(x: torch.Tensor, use: dict | None) -> torch.Tensor:
        predictor = Predictor(prior, mode="glm", samples=2000, generator=torch.Generator().manual_seed(3), spans=use)
        dev = predictor.linear_parts(x)[1].reshape(2000, -1).double()
        return dev.T @ dev / dev.shape[0]

    full, projected = covariance(train_x, None), covariance(train_x, spans)
    assert ((projected - full).abs().max() / full.abs().max()).item() < 0.08  # 0.043 measured
    assert covariance(other_x, spans).trace() < 0.5 * covariance(other_x, None).trace()  # 0.18 measured


def test_spans_reuse_the_root_the_extension_found(conv_posterior, monkeypatch: pytest.MonkeyPatch) -> None:
    """posterior_pieces' extension already searched every new input factor for a low-rank root; the spans are built
    from it (bit for bit the same as searching again), and no second search runs."""
    import zoo.posterior_fit

    prior, _, _, spans, blocks, model = conv_posterior
    pieces = posterior_pieces(model, prior, blocks)
    assert {k for k, q in pieces.unit.items() if getattr(q, "new_input_root", None) is not None} == set(spans)

    def searched_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the input factor was searched for a root twice")

    monkeypatch.setattr(zoo.posterior_fit, "input_span", searched_again)
    reused = training_spans(blocks, dict(prior.layers), "expand", pieces.unit)
    assert set(reused) == set(spans)
    for name, span in spans.items():
        assert torch.equal(reused[name], span), name
