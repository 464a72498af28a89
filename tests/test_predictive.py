"""zoo.predictive: each mode against brute force on a tiny MLP, the entropy split, seeding and batch independence."""

from __future__ import annotations

import pytest
import torch
from dense_reference import dense_covariance, jacobian
from torch import Tensor, nn
from torch.func import functional_call

import zoo
from zoo import ConfigError, DataError
from zoo.layers import IsoLayer
from zoo.predictive import MODES, Predictor, summarise

torch.set_default_dtype(torch.float32)


def _mlp() -> tuple[nn.Module, zoo.Prior, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(60, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    loader = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    prior = zoo.build_prior(model, loader, holdout=0, progress=False, generator=torch.Generator().manual_seed(0))
    return model, prior, torch.randn(7, 4, dtype=torch.float64)


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, zoo.Prior, Tensor]:
    return _mlp()


def test_glm_deviations_are_the_jacobian_times_the_draw(mlp) -> None:
    model, prior, x = mlp
    predictor = Predictor(prior, mode="glm", samples=5, seed=3)
    mean, dev = predictor.linear_parts(x)
    jac, names = jacobian(model, x)
    assert torch.allclose(mean, model(x), atol=1e-12)
    for s, tangent in enumerate(predictor._draws):
        step = torch.cat([tangent[k].reshape(-1) for k in names])
        assert torch.allclose(dev[s], jac @ step, atol=1e-10)


def test_glm_tangents_are_the_weight_draws_minus_the_network() -> None:
    """The glm tangents are θ_s − θ̂ from Prior.sample on the same random stream, also with the network moved off μ
    (then they carry μ − θ̂ as well as the draw's deviation)."""
    model, prior, _ = _mlp()
    with torch.no_grad():
        model[2].weight.add_(0.5)  # the classifier away from the Gaussian's mean; the first layer stays at μ
    draw = prior.sample(model, torch.Generator().manual_seed(4))
    predictor = Predictor(prior, mode="glm", samples=1, generator=torch.Generator().manual_seed(4))
    params = dict(model.named_parameters())
    for k, tangent in predictor._draws[0].items():
        torch.testing.assert_close(tangent, draw[k].to(params[k]) - params[k].detach(), rtol=0, atol=1e-6)
    deviation = draw["2.weight"].double() - prior.mean["2.weight"].double()
    assert not torch.allclose(predictor._draws[0]["2.weight"], deviation, atol=0.1)


def test_glm_covariance_matches_jacobian_times_dense_covariance(mlp) -> None:
    model, prior, x = mlp
    jac, names = jacobian(model, x[:2])
    sigma = dense_covariance(prior, names)
    expected = jac[0] @ sigma @ jac[0].T  # the first input's logit covariance
    _, dev = Predictor(prior, mode="glm", samples=2000, seed=1).linear_parts(x[:2])
    got = torch.cov(dev[:, 0, :].T)
    scale = expected.diagonal().sqrt()
    # Monte Carlo with 2000 draws (standard errors ≈ 3 % and 0.02): correlations within 0.1, variances within 10 %
    assert torch.allclose(got.diagonal(), expected.diagonal(), rtol=0.1)
    assert torch.allclose(got / torch.outer(scale, scale), expected / torch.outer(scale, scale), atol=0.1)


def test_fast_mode_equals_monte_carlo_over_classifier_draws(mlp) -> None:
    model, prior, x = mlp
    fast = Predictor(prior, mode="fast", samples=20000, seed=0)(x)
    head = prior.layers["2"].precision
    draws = head.sample(20000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean = torch.cat([model[2].weight, model[2].bias[:, None]], dim=1).detach()
    with torch.no_grad():
        phi = torch.cat([torch.tanh(model[0](x)), torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        probs = torch.softmax(torch.einsum("ni,soi->sno", phi, mean + draws), -1).mean(0)
    assert torch.allclose(fast.probs.double(), probs, atol=5e-3)


@pytest.mark.parametrize("mode", ["glm", "fast"])
def test_antithetic_draws_are_the_first_half_and_their_mirrors(mlp, mode: str) -> None:
    """Each antithetic draw is the independent predictor's draw on the same stream, followed by its negative; the
    glm half is still the Jacobian times the tangent (so each pair cost one forward-mode product)."""
    model, prior, x = mlp
    paired = Predictor(prior, mode=mode, samples=6, generator=torch.Generator().manual_seed(7), antithetic=True)
    plain = Predictor(prior, mode=mode, samples=3, generator=torch.Generator().manual_seed(7))
    mean, dev = paired.linear_parts(x)
    plain_mean, plain_dev = plain.linear_parts(x)
    assert dev.shape == (6, x.shape[0], 3)
    torch.testing.assert_close(mean, plain_mean, rtol=0, atol=0)
    torch.testing.assert_close(dev[:3], plain_dev, rtol=0, atol=0)
    torch.testing.assert_close(dev[3:], -plain_dev, rtol=0, atol=0)
    if mode == "glm":
        assert len(paired._draws) == 3
        jac, names = jacobian(model, x)
        for s, tangent in enumerate(paired._draws):
            step = torch.cat([tangent[k].reshape(-1) for k in names])
            assert torch.allclose(dev[s + 3], -(jac @ step), atol=1e-10)
    logits = paired.logits(x)
    torch.testing.assert_close(logits, mean[None] + dev)


def test_antithetic_glm_covariance_matches_jacobian_times_dense_covariance(mlp) -> None:
    """Mirrored pairs leave the logit covariance unbiased (the mean of the deviations is exactly zero)."""
    model, prior, x = mlp
    jac, names = jacobian(model, x[:2])
    expected = jac[0] @ dense_covariance(prior, names) @ jac[0].T
    _, dev = Predictor(prior, mode="glm", samples=2000, seed=1, antithetic=True).linear_parts(x[:2])
    assert torch.allclose(dev.mean(0), torch.zeros_like(dev[0]), atol=1e-12)
    got = dev[:, 0, :].T @ dev[:, 0, :] / dev.shape[0]
    scale = expected.diagonal().sqrt()
    assert torch.allclose(got.diagonal(), expected.diagonal(), rtol=0.1)
    assert torch.allclose(got / torch.outer(scale, scale), expected / torch.outer(scale, scale), atol=0.1)


def test_antithetic_glm_mirrors_about_the_centre_when_the_network_is_off_it() -> None:
    """A network off the Gaussian's centre c (e.g. a new head still at its initialisation): the mirror of θ_s is
    2c − θ_s, so its deviation is 2J(c − θ̂) − J(θ_s − θ̂), not −J(θ_s − θ̂)."""
    model, prior, x = _mlp()
    with torch.no_grad():
        model[2].weight.add_(0.5)
    paired = Predictor(prior, mode="glm", samples=6, generator=torch.Generator().manual_seed(7), antithetic=True)
    plain = Predictor(prior, mode="glm", samples=3, generator=torch.Generator().manual_seed(7), antithetic=False)
    _, dev = paired.linear_parts(x)
    _, plain_dev = plain.linear_parts(x)
    jac, names = jacobian(model, x)
    params = dict(model.named_parameters())
    center = prior.draw_center(model)
    shift = jac @ torch.cat([(center[k].double() - params[k].detach()).reshape(-1) for k in names])
    assert shift.abs().max() > 0.1
    torch.testing.assert_close(dev[:3], plain_dev, rtol=0, atol=0)
    torch.testing.assert_close(dev[3:], 2 * shift[None] - plain_dev, rtol=0, atol=1e-10)


def test_draw_center_is_where_the_draws_average() -> None:
    """Kronecker layers draw around μ, a new head's N(0, λ⁻¹I) around zero (not around its initialisation)."""
    model, prior, _ = _mlp()
    zeros = {k: torch.zeros(3, *shape, dtype=torch.float64) for k, shape in (("2.weight", (6,)), ("2.bias", ()))}
    mean = {**prior.mean, **zeros}
    headed = zoo.Prior(mean, {"0": prior.layers["0"], "2": IsoLayer(4.0, ("weight", "bias"))}, {}, model=model)
    center = headed.draw_center(model)
    assert set(center) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(center["0.weight"].double(), prior.mean["0.weight"].double(), rtol=0, atol=1e-6)
    assert not torch.allclose(model[2].weight.detach(), torch.zeros(3, 6, dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    draws = [headed.sample(model, gen) for _ in range(4000)]
    for k, c in center.items():
        stack = torch.stack([d[k].double() for d in draws])
        tolerance = 5 * stack.std(0) / 4000 ** 0.5
        assert bool(((stack.mean(0) - c.double()).abs() <= tolerance).all()), k


def test_antithetic_is_the_default_in_the_linear_modes(mlp) -> None:
    """glm and fast with an even count pair their draws by default; nn and an odd count draw independently."""
    _, prior, x = mlp

    def run(mode: str, **kwargs: bool) -> zoo.Prediction:
        return prior.predict(x, samples=8, generator=torch.Generator().manual_seed(5), mode=mode, **kwargs)

    for mode in ("glm", "fast"):
        auto, paired, plain = run(mode), run(mode, antithetic=True), run(mode, antithetic=False)
        assert auto.antithetic and paired.antithetic and not plain.antithetic
        assert torch.equal(auto.probs, paired.probs) and not torch.equal(auto.probs, plain.probs)
    assert not run("nn").antithetic
    assert not prior.predict(x, samples=7, mode="glm").antithetic


def test_antithetic_needs_a_linear_mode_and_even_samples(mlp) -> None:
    _, prior, _ = mlp
    with pytest.raises(ConfigError, match="antithetic"):
        Predictor(prior, mode="nn", samples=4, antithetic=True)
    with pytest.raises(ConfigError, match="even"):
        Predictor(prior, mode="glm", samples=5, antithetic=True)


def test_nn_mode_is_the_network_under_weight_draws(mlp) -> None:
    model, prior, x = mlp
    predictor = Predictor(prior, mode="nn", samples=3, seed=2)
    with torch.no_grad():
        logits = predictor.logits(x)
        for s, draw in enumerate(predictor._draws):
            assert torch.allclose(logits[s], functional_call(model, draw, (x,)))


@pytest.mark.parametrize("mode", MODES)
def test_entropy_split_and_labels(mlp, mode: str) -> None:
    _, prior, x = mlp
    pred = prior.predict(x, samples=16, mode=mode)
    assert pred.mode == mode and pred.samples == 16
    assert torch.allclose(pred.probs.sum(-1), torch.ones(x.shape[0]), atol=1e-6)
    assert torch.allclose(pred.entropy, pred.expected_entropy + pred.mutual_information, atol=1e-12)
    assert bool((pred.mutual_information >= 0).all())
    assert bool((pred.mutual_information > 0).any())


@pytest.mark.parametrize("mode", MODES)
def test_seeded_and_independent_of_the_batch(mlp, mode: str) -> None:
    _, prior, x = mlp
    a = prior.predict(x, samples=8, generator=torch.Generator().manual_seed(11), mode=mode)
    b = prior.predict(x, samples=8, generator=torch.Generator().manual_seed(11), mode=mode)
    c = prior.predict(x, samples=8, generator=torch.Generator().manual_seed(12), mode=mode)
    assert torch.equal(a.probs, b.probs) and not torch.equal(a.probs, c.probs)
    predictor = Predictor(prior, mode=mode, samples=8, seed=4)
    whole = predictor(x)
    parts = [predictor(x[i:i + 2]) for i in range(0, x.shape[0], 2)]
    assert torch.allclose(whole.probs, torch.cat([p.probs for p in parts]), atol=1e-6)
    assert torch.allclose(whole.mutual_information, torch.cat([p.mutual_information for p in parts]), atol=1e-9)


def test_wider_gaussian_is_more_uncertain(mlp) -> None:
    _, prior, x = mlp
    narrow = prior.scaled(dict.fromkeys(prior.layers, 100.0)).predict(x, samples=64, mode="glm")
    wide = prior.scaled(dict.fromkeys(prior.layers, 0.01)).predict(x, samples=64, mode="glm")
    assert bool((wide.mutual_information > narrow.mutual_information).all())


def test_bad_input_raises_zoo_errors(mlp) -> None:
    _, prior, x = mlp
    with pytest.raises(ConfigError, match="mode must be one of"):
        prior.predict(x, mode="laplace")
    with pytest.raises(ConfigError, match="samples"):
        prior.predict(x, samples=0)
    with pytest.raises(DataError, match="non-empty"):
        prior.predict(x[:0])
    with pytest.raises(DataError, match="floating point"):
        prior.predict(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="not linear"):
        Predictor(prior, mode="nn", samples=2).linear_parts(x)
    with pytest.raises(zoo.NumericalError, match="non-finite"):
        summarise(torch.full((2, 1, 3), float("nan")), "nn")
