"""Input-span projected draws: the width selection's cheaper draws change nothing on the training inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.curvature import kfac
from zoo.errors import ConfigError
from zoo.kron import KronPrecision
from zoo.predictive import Predictor
from zoo.tuning import training_spans


def test_projected_draws_are_the_full_draws_times_the_projector() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    gg = torch.randn(3, 3, generator=g, dtype=torch.float64)
    p = KronPrecision([(a @ a.T + torch.eye(12, dtype=torch.float64), gg @ gg.T + torch.eye(3, dtype=torch.float64))])
    q = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64)).Q
    full = p.sample(5, torch.Generator().manual_seed(1), dtype=torch.float64)
    projected = p.sample(5, torch.Generator().manual_seed(1), dtype=torch.float64, span=q)
    torch.testing.assert_close(projected, full @ q @ q.T)
    with pytest.raises(ConfigError, match="input span"):
        p.sample(1, span=q[:5])


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


def test_spans_leave_the_training_deviations_unchanged_and_only_those(conv_posterior) -> None:
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


def test_spans_reuse_the_root_the_extension_found(conv_posterior, monkeypatch: pytest.MonkeyPatch) -> None:
    """posterior_pieces' extension already searched every new input factor for a low-rank root; the spans are built
    from it (bit for bit the same as searching again), and no second search runs."""
    import zoo.tuning

    prior, _, _, spans, blocks, model = conv_posterior
    pieces = zoo.tuning.posterior_pieces(model, prior, blocks)
    assert {k for k, q in pieces.unit.items() if getattr(q, "new_input_root", None) is not None} == set(spans)

    def searched_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the input factor was searched for a root twice")

    monkeypatch.setattr(zoo.tuning, "input_span", searched_again)
    reused = training_spans(blocks, dict(prior.layers), "expand", pieces.unit)
    assert set(reused) == set(spans)
    for name, span in spans.items():
        assert torch.equal(reused[name], span), name
