"""zoo.tuning (`zoo.finetune`): the training objectives' gradients, the posterior fit, and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import zoo
from zoo import DataError, ModelError, NumericalError, tuning, width
from zoo.layers import IsoLayer, KronLayer
from zoo.marglik import STRENGTH_GRID
from zoo.pacbayes import catoni_grid
from zoo.tuning import finetune, isotropic_prior, objective_value


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def data(seed: int = 0, n: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


@pytest.fixture(scope="module")
def prior_and_model() -> tuple[zoo.Prior, nn.Module]:
    model = tiny()
    prior = zoo.build_prior(model, data(), progress=False, generator=torch.Generator().manual_seed(0))
    return prior, model


@pytest.mark.parametrize("objective", ["catoni", "mcallester", "map"])
def test_objective_gradient_matches_finite_differences(prior_and_model, objective: str) -> None:
    prior, base = prior_and_model
    model = tiny(1).double()
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = data(3)[0]
    x = x.double()

    def value() -> torch.Tensor:
        return objective_value(model, prior, x, y, objective, n=24, delta=0.05, c=catoni_grid()[12])[0]

    model.zero_grad()
    value().backward()
    eps = 1e-6
    for name, p in model.named_parameters():
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                old = p[idx].item()
                p[idx] = old + eps
                up = value().item()
                p[idx] = old - eps
                down = value().item()
                p[idx] = old
            fd = (up - down) / (2 * eps)
            assert p.grad[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, idx)


def test_map_objective_uses_the_data_set_size(prior_and_model) -> None:
    prior, base = prior_and_model
    model = tiny(1)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        model[3].weight.add_(0.5)
    x, y = data()[0]
    v100, nll, half = objective_value(model, prior, x, y, "map", n=100, delta=0.05)
    assert v100.item() == pytest.approx(nll.item() + half.item() / 100, rel=1e-9)
    assert half.item() == pytest.approx(0.5 * prior.quadratic(model).item())


def test_finetune_returns_a_posterior_whose_kl_matches_the_fit(prior_and_model) -> None:
    prior, base = prior_and_model
    model = tiny(2)
    model.load_state_dict(base.state_dict())
    post = finetune(model, prior, data(5), epochs=5, lr=1e-2, progress=False, width="laplace",
                    generator=torch.Generator().manual_seed(0))
    assert post.meta["kind"] == "posterior" and post.meta["curvature"]["n"] == 24
    assert post.meta["width"]["chosen"] == "laplace" and post.meta["strength"]["method"] == "marglik"
    # the certificate's prior is κP with κ chosen on the grid, paid for by the union bound
    kappa = post.meta["strength"]["kappa"]
    assert set(kappa) == {"body"} and kappa["body"] in STRENGTH_GRID
    assert post.meta["hypotheses"] == len(STRENGTH_GRID)
    assert post.kl(post.prior).item() == pytest.approx(post.meta["bound"]["kl"], rel=1e-6)
    again = finetune(_copy(base), prior, data(5), epochs=5, lr=1e-2, progress=False, width="laplace",
                     generator=torch.Generator().manual_seed(0))
    for k, v in post.mean.items():
        torch.testing.assert_close(v, again.mean[k])  # seeded: identical reruns


def test_bound_choices_keep_the_prior_and_fit_the_scales(prior_and_model) -> None:
    prior, base = prior_and_model
    post = finetune(_copy(base), prior, data(5), epochs=5, lr=1e-2, progress=False, strength="bound", width="bound",
                    sharpen=(1.0,), generator=torch.Generator().manual_seed(0))
    assert post.meta["hypotheses"] == 1 and post.meta["width"]["chosen"] == "bound"
    assert post.kl(prior).item() == pytest.approx(post.meta["bound"]["kl"], rel=1e-6)


def _copy(base: nn.Module) -> nn.Module:
    model = tiny(9)
    model.load_state_dict(base.state_dict())
    return model


def test_isotropic_baseline_has_constant_precision(prior_and_model) -> None:
    prior, _ = prior_and_model
    iso = isotropic_prior(prior, 7.0)
    layer = iso.layers["0"]
    torch.testing.assert_close(layer.precision.dense(), 7.0 * torch.eye(layer.precision.dim, dtype=torch.float64))


def test_bad_input_raises_zoo_errors(prior_and_model) -> None:
    prior, base = prior_and_model
    model = _copy(base)
    with pytest.raises(DataError, match="no examples"):
        finetune(model, prior, [], epochs=1, progress=False)
    bad_labels = [(x, torch.full_like(y, 7)) for x, y in data()]
    with pytest.raises(DataError, match="num_classes"):
        finetune(model, prior, bad_labels, epochs=1, progress=False)
    other = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ModelError, match=r"zoo\.load"):
        finetune(other, prior, data(), epochs=1, progress=False)
    nan = [(torch.full_like(x, math.nan), y) for x, y in data()]
    with pytest.raises(NumericalError):
        finetune(model, prior, nan, epochs=1, progress=False)


def test_laplace_width_never_widens_the_body_past_its_prior(prior_and_model) -> None:
    """κ < 1 weakens the prior for the mean only: Q's body precision stays ≥ P (its covariance ≤ the prior's)."""
    prior, base = prior_and_model
    post = finetune(_copy(base), prior, data(5), epochs=5, lr=1e-2, progress=False, width="laplace",
                    generator=torch.Generator().manual_seed(0))
    assert post.meta["strength"]["kappa"]["body"] < 1.0  # the case the floor is for
    for name, layer in prior.layers.items():
        q = post.layers[name]
        if isinstance(layer, KronLayer):
            gap = q.precision.dense() - layer.precision.dense()
            scale = layer.precision.dense().diagonal().abs().max().item()
            assert torch.linalg.eigvalsh(0.5 * (gap + gap.T)).min().item() >= -1e-9 * scale, name
        else:
            for key, p in layer.precision.items():
                assert bool((q.precision[key].double() >= p.double() * (1 - 1e-12)).all()), (name, key)


def _separable(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    y = (x @ torch.randn(8, 3, generator=torch.Generator().manual_seed(99))).argmax(1)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def _wider(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def test_the_body_keeps_the_prior_width_where_its_evidence_is_weaker_than_the_width(monkeypatch) -> None:
    """Q = (F_new + max(κ, T₁)·P)/T₂, not (F_new + P)/T₁: T₁ is chosen with the body floored at P, then T₂ ≤ T₁ with
    the floor lowered to T₁. Against the old Q = (F_new + P)/T₁, F_new = T₁·Q_old − P, so the new precision is exactly
    (T₁·Q_old − (1 − T₁)·P)/T₂: unseen directions keep the prior's width instead of T₁ times less. Eight separable
    examples on a 16-wide layer: the case where the data leave directions open. T < 1 needs the data to reject T = 1,
    and these eight examples give up only 0.01 nats per example there, so the likelihood-ratio slack is cut to 0.01
    nats (with independent draws, Monte Carlo noise used to flip one example at T = 1; antithetic pairs do not)."""
    monkeypatch.setattr(width, "TRAIN_LOGLIK_SLACK", 0.01)
    base = _wider()
    prior = zoo.build_prior(base, _separable(0, 64), progress=False, generator=torch.Generator().manual_seed(0))

    def fit() -> zoo.Posterior:
        model = _wider()
        model.load_state_dict(base.state_dict())
        return finetune(model, prior, _separable(3, 8), epochs=10, lr=1e-2, progress=False, width="laplace",
                        generator=torch.Generator().manual_seed(0))

    post = fit()
    monkeypatch.setattr(tuning, "BODY_FLOOR_FOLLOWS_WIDTH", False)
    old = fit()
    chosen, t1 = post.meta["width"]["selection"], old.meta["width"]["selection"]["T"]
    t2 = chosen["T"]
    assert post.meta["strength"]["kappa"]["body"] < t1 < 1.0  # the case the lowered floor is for
    assert chosen["first"]["T"] == t1 and chosen["body_floor"] == t1 and t2 <= t1
    checked = 0
    for name, layer in prior.layers.items():
        if isinstance(layer, KronLayer):
            p = layer.precision.dense()
            expected = (t1 * old.layers[name].precision.dense() - (1.0 - t1) * p) / t2
            torch.testing.assert_close(post.layers[name].precision.dense(), expected, rtol=1e-6,
                                       atol=1e-9 * expected.diagonal().abs().max().item())
            gap = post.layers[name].precision.dense() - p  # still never wider than the prior
            assert torch.linalg.eigvalsh(0.5 * (gap + gap.T)).min().item() >= -1e-9 * p.diagonal().max().item()
            checked += 1
        else:
            for key, p in layer.precision.items():
                expected = (t1 * old.layers[name].precision[key].double() - (1.0 - t1) * p.double()) / t2
                torch.testing.assert_close(post.layers[name].precision[key].double(), expected, rtol=1e-6,
                                           atol=1e-12)
                checked += 1
    assert checked >= 3


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).eval()


def test_adapted_norm_statistics_are_the_training_data_moments() -> None:
    """AdaBN: after adaptation the running mean/var are the moments of the first layer's outputs on the data."""
    from zoo.norm_statistics import adapt_norm_statistics

    model = bn_model()
    shifted = [(x * 3.0 + 5.0, y) for x, y in data(4, n=48)]
    assert adapt_norm_statistics(model, shifted) == 1
    h = torch.cat([model[0](x) for x, _ in shifted]).detach()
    bn = model[1]
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    # cumulative average of per-batch unbiased variances, equal-size batches: the mean of the batch variances
    per_batch = torch.stack([model[0](x).detach().var(0) for x, _ in shifted])
    assert torch.allclose(bn.running_var, per_batch.mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training
    with pytest.raises(DataError, match="at least 2"):
        adapt_norm_statistics(bn_model(), [(torch.randn(1, 4), torch.tensor([0]))])


def test_finetune_keeps_norm_statistics_unless_asked() -> None:
    model = bn_model()
    prior = zoo.build_prior(model, data(), progress=False, holdout=0, generator=torch.Generator().manual_seed(0))
    shifted = [(x * 3.0 + 5.0, y) for x, y in data(4, n=48)]
    kept = bn_model()
    kept.load_state_dict(model.state_dict())
    post = finetune(kept, prior, shifted, epochs=1, progress=False)
    assert torch.equal(kept[1].running_mean, model[1].running_mean)
    assert post.meta["finetune"]["norm_statistics"] == {"method": "keep", "adapted_layers": 0}
    adapted = bn_model()
    adapted.load_state_dict(model.state_dict())
    post = finetune(adapted, prior, shifted, epochs=1, progress=False, norm_statistics="adapt")
    assert not torch.allclose(adapted[1].running_mean, model[1].running_mean, atol=0.1)
    assert post.meta["finetune"]["norm_statistics"] == {"method": "adapt", "adapted_layers": 1}
    with pytest.raises(zoo.ConfigError, match="norm_statistics"):
        finetune(bn_model(), prior, shifted, epochs=0, progress=False, norm_statistics="batch")


def test_reference_quadratic_is_the_isotropic_priors_quadratic_on_the_body(prior_and_model) -> None:
    """The cheap elementwise penalty equals the dense quadratic of N(θ*, λ⁻¹I) on the pretrained layers; a new head
    (whose λ is a guess) adds nothing."""
    prior, base = prior_and_model
    model = _copy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    dense = isotropic_prior(prior, lam=0.7).quadratic(model).item()
    assert prior.reference_quadratic(model, 0.7).item() == pytest.approx(dense, rel=1e-6)  # float32 squares
    layers = dict(prior.layers)
    layers["3"] = IsoLayer(2.5, ("weight", "bias"))  # a new head
    mean = dict(prior.mean, **{"3.weight": torch.zeros(3, 6), "3.bias": torch.zeros(3)})
    headed = zoo.Prior(mean, layers, prior.meta)
    head = [model[3].weight.double(), model[3].bias.double()]
    moved = sum(((w - prior.mean[f"3.{k}"].double()) ** 2).sum() for w, k in zip(head, ("weight", "bias"), strict=True))
    assert headed.reference_quadratic(model, 0.7).item() == pytest.approx(dense - 0.7 * moved.item(), rel=1e-6)
    with pytest.raises(zoo.ConfigError, match="positive and finite"):
        prior.reference_quadratic(model, float("nan"))


def test_mean_penalty_reference_trains_the_map_of_the_reference_prior(prior_and_model) -> None:
    """mean_penalty='reference' pulls the fine-tuned mean toward θ* (L2-SP at the prior's λ); the default does not."""
    prior, base = prior_and_model
    strong = zoo.Prior(prior.mean, prior.layers, dict(prior.meta, **{"lambda": 50.0}))
    kwargs = {"epochs": 40, "lr": 1e-2, "progress": False, "width": "laplace", "refit_head": False}

    def distance(**extra: str) -> tuple[float, zoo.Posterior]:
        post = finetune(_copy(base), strong, data(5), generator=torch.Generator().manual_seed(0), **kwargs, **extra)
        return sum(((post.mean[k] - prior.mean[k]) ** 2).sum().item() for k in post.mean), post

    free, default = distance()
    pulled, post = distance(mean_penalty="reference")
    assert pulled < 0.5 * free
    assert default.meta["finetune"]["mean_penalty"]["method"] == "none"
    assert "half_quadratic" not in default.meta["finetune"]["history"][-1]
    record = post.meta["finetune"]["mean_penalty"]
    assert record["method"] == "reference" and record["lambda"] == 50.0
    assert "half_quadratic" in post.meta["finetune"]["history"][-1]
    lost = zoo.Prior(prior.mean, prior.layers, {k: v for k, v in prior.meta.items() if k != "lambda"})
    with pytest.raises(zoo.ConfigError, match="mean_penalty='none'"):
        finetune(_copy(base), lost, data(5), mean_penalty="reference", **kwargs)
    with pytest.raises(zoo.ConfigError, match="mean_penalty must be one of"):
        finetune(_copy(base), prior, data(5), mean_penalty="l2", progress=False)


@pytest.mark.parametrize("n", [24, 10**9])
def test_auto_width_decides_as_the_exact_kl_does(prior_and_model, n: int) -> None:
    """The spectra's mean term ½Σκm is a lower bound on KL(Q ‖ κP) that settles "laplace" without the exact KL;
    where it does not settle (a huge n makes any KL informative), the exact KL decides."""
    from zoo.curvature import kfac
    from zoo.pacbayes import kl_bound
    from zoo.posterior_fit import posterior_pieces
    from zoo.width import AUTO_BOUND, auto_width

    prior, base = prior_and_model
    model = _copy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blocks = kfac(model, data(3), "mc", generator=torch.Generator().manual_seed(0), progress=False)
    pieces = posterior_pieces(model, prior, blocks)
    kappa = dict.fromkeys(prior.layers, 0.1)
    spectra = pieces.rescaled_spectra(kappa)
    layers = pieces.laplace_layers(kappa)
    reference = prior.scaled(kappa)
    mean = {k: v.detach().clone() for k, v in model.named_parameters()}
    mean_term = 0.5 * sum(sp.mahalanobis for sp in spectra)
    exact = zoo.Prior(mean, layers, {}).kl(reference).item()
    assert mean_term == pytest.approx(0.5 * reference.quadratic(model).item(), rel=1e-7)
    assert 0 < mean_term <= exact
    expected = "bound" if kl_bound(0.0, exact, n, 0.05) < AUTO_BOUND else "laplace"
    assert auto_width(mean, layers, reference, spectra, n, 0.05) == expected
    assert expected == ("laplace" if n == 24 else "bound")  # both branches are exercised


def test_a_validation_loader_stops_early_and_keeps_the_best_epochs_weights(prior_and_model) -> None:
    """With val_loader the mean keeps the epoch of lowest validation NLL, and training stops `patience` epochs
    after it; a large learning rate on few data makes the validation NLL turn back up."""
    prior, base = prior_and_model
    val = data(7, 16)
    post = finetune(_copy(base), prior, data(5, 8), val_loader=val, epochs=40, lr=0.3, patience=2, progress=False,
                    width="laplace", generator=torch.Generator().manual_seed(0))
    record = post.meta["finetune"]
    history = record["history"]
    scores = [h["val_nll"] for h in history]
    best = min(range(len(scores)), key=scores.__getitem__)
    assert record["best_epoch"] == best
    assert len(history) == best + 3 < 40  # stopped two epochs after the best
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(post.model(x), y, reduction="sum").item() for x, y in val) / 16
    assert nll == pytest.approx(scores[best], rel=1e-5)  # the model holds the best epoch's weights
    assert nll < scores[-1]


def test_a_validation_loader_without_patience_trains_every_epoch(prior_and_model) -> None:
    """Early stopping is opt-in: without `patience`, val_loader is scored every epoch and the last weights stay
    (the same run as above stopped after a few of 40 epochs)."""
    prior, base = prior_and_model
    val = data(7, 16)
    post = finetune(_copy(base), prior, data(5, 8), val_loader=val, epochs=12, lr=0.3, progress=False,
                    width="laplace", generator=torch.Generator().manual_seed(0))
    record = post.meta["finetune"]
    assert len(record["history"]) == 12 and record["best_epoch"] is None and record["patience"] is None
    scores = [h["val_nll"] for h in record["history"]]
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(post.model(x), y, reduction="sum").item() for x, y in val) / 16
    assert nll == pytest.approx(scores[-1], rel=1e-5) and min(scores) < scores[-1]  # not the best epoch's


def test_a_fine_tune_that_does_not_lower_the_training_nll_warns(prior_and_model) -> None:
    """A learning rate far too high leaves the training NLL above where it started: zoo.finetune says so (warning
    and record) instead of returning a posterior around an untrained network in silence; a sane one does not."""
    prior, base = prior_and_model
    with pytest.warns(tuning.TrainingWarning, match="did not lower the training NLL"):
        post = finetune(_copy(base), prior, data(5), epochs=5, lr=30.0, lr_retries=0, progress=False,
                        width="laplace", generator=torch.Generator().manual_seed(0))
    record = post.meta["finetune"]
    assert record["history"][-1]["train_nll"] >= record["start_nll"]
    assert "lr=30" in record["stalled"]
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(5))
    y = (x @ torch.randn(4, 3, generator=torch.Generator().manual_seed(6))).argmax(1)  # labels it can learn
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.TrainingWarning)
        sane = finetune(_copy(base), prior, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)], epochs=20,
                        lr=3e-2, progress=False, width="laplace", generator=torch.Generator().manual_seed(0))
    assert sane.meta["finetune"]["stalled"] is None
    assert sane.meta["finetune"]["history"][-1]["train_nll"] < sane.meta["finetune"]["start_nll"]


def test_a_stalled_fit_restarts_from_its_start_at_a_tenth_of_the_rate(prior_and_model) -> None:
    """Adam at 30 and at 3 leaves this learnable task's training NLL above its start, at 0.3 it learns it: by
    default zoo.finetune restarts twice and returns exactly the fit that lr=0.3 gives from the same weights and
    seed, records both stalled attempts, and does not warn; with the restarts off it warns, and when every
    attempt stalls the warning names them all."""
    prior, base = prior_and_model
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(5))
    y = (x @ torch.randn(4, 3, generator=torch.Generator().manual_seed(6))).argmax(1)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    kwargs = {"epochs": 20, "progress": False, "width": "laplace"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.TrainingWarning)
        restarted = finetune(_copy(base), prior, loader, lr=30.0, generator=torch.Generator().manual_seed(0), **kwargs)
        direct = finetune(_copy(base), prior, loader, lr=0.3, generator=torch.Generator().manual_seed(0), **kwargs)
    record = restarted.meta["finetune"]
    assert record["lr"] == pytest.approx(0.3) and record["requested_lr"] == 30.0 and record["stalled"] is None
    tried = record["lr_retries"]["attempts"]
    assert [r["lr"] for r in tried] == pytest.approx([30.0, 3.0, 0.3])
    assert all(r["kept_train_nll"] >= record["start_nll"] for r in tried[:2])
    # never below 0.9 of chance after half their epochs: both stalled attempts stopped there (GIVE_UP_FRACTION)
    assert [(r["epochs_run"], r.get("gave_up", False)) for r in tried] == [(10, True), (10, True), (20, False)]
    # half the epochs, never fewer than 10: a short fit is judged at its end only
    assert [tuning.give_up_epoch(e) for e in (2, 20, 30, 100)] == [10, 10, 15, 50]
    assert tried[2]["kept_train_nll"] == record["history"][-1]["train_nll"] < 0.1
    assert record["history"] == direct.meta["finetune"]["history"]
    for name, value in direct.mean.items():
        torch.testing.assert_close(restarted.mean[name], value, rtol=0, atol=0)
    assert [a["lr"] for a in direct.meta["finetune"]["lr_retries"]["attempts"]] == [0.3]
    with pytest.warns(tuning.TrainingWarning, match=r"lr=30\b"):
        finetune(_copy(base), prior, loader, lr=30.0, lr_retries=0, generator=torch.Generator().manual_seed(0),
                 **kwargs)
    with pytest.warns(tuning.TrainingWarning, match=r"tried lr=300, 30, 3 from the same start") as caught:
        worst = finetune(_copy(base), prior, loader, lr=300.0, generator=torch.Generator().manual_seed(0), **kwargs)
    attempts = worst.meta["finetune"]["lr_retries"]["attempts"]
    lowest = min(attempts, key=lambda a: a["kept_train_nll"])
    assert worst.meta["finetune"]["lr"] == lowest["lr"] and f"lr={lowest['lr']:g})" in str(caught[0].message)
    assert worst.meta["finetune"]["history"][-1]["train_nll"] == lowest["kept_train_nll"]  # its weights are kept
    assert attempts[-1]["epochs_run"] == 20 and "gave_up" not in attempts[-1]  # no restart left: it runs to the end
    with pytest.raises(zoo.ZooError, match="lr_retries"):
        finetune(_copy(base), prior, loader, lr_retries=-1, **kwargs)


def test_a_fit_that_collapses_to_chance_warns_even_below_its_start() -> None:
    """A fresh head starts near chance, so a fit that collapses to a uniform guess can end just below its start
    (efficientnet_lite0 at lr 3e-3: 0.97–0.99 of its first epoch, benchmarks/pretrained_lr.py): the label entropy
    catches it. A fit that learns, or one that starts good and stays good, does not warn."""
    chance = math.log(10)
    collapsed = [{"epoch": 0, "train_nll": 2.36}, {"epoch": 1, "train_nll": 2.31}]
    message = tuning.stalled_training(2.40, chance, collapsed, None, 3e-3)
    assert message is not None and "near chance" in message and "2.303" in message and "lr=0.003" in message
    learnt = [{"epoch": 0, "train_nll": 2.2}, {"epoch": 1, "train_nll": 1.48}]
    assert tuning.stalled_training(2.40, chance, learnt, None, 1e-3) is None
    kept_good = [{"epoch": 0, "train_nll": 0.06}, {"epoch": 1, "train_nll": 0.04}]
    assert tuning.stalled_training(0.05, chance, kept_good, None, 3e-4) is None
    # early stopping keeps the best epoch's weights, so that epoch is the one judged
    best = (0.5, 0, [])
    assert tuning.stalled_training(2.40, chance, [{"epoch": 0, "train_nll": 1.0}, {"epoch": 1, "train_nll": 2.5}],
                                   best, 1e-2) is None
    assert tuning.stalled_training(0.05, chance, kept_good[::-1], None, 3e-4) is not None  # rose above its start


def test_a_fit_that_rose_above_its_start_and_recovered_slowly_is_restarted_but_not_warned_about() -> None:
    """efficientnet_lite0 on 20 digits per class at 3e-4: up from 2.36 to 3.03, then at chance for most of the fit,
    then down to 1.85. Below 0.9 × chance, so not the warning's stall, but a rate too high: restarted. A fit that only
    fell, however slowly (a short fit), is not: a lower rate would not help it, and neither is a spike that ends
    trained (resnet10t's few-shot fits rise to 5.8 before falling to 0.0006)."""
    chance = math.log(10)
    recovering = [{"epoch": e, "train_nll": v} for e, v in enumerate([3.03, 2.31, 2.30, 2.29, 2.13, 1.85])]
    assert tuning.stalled_training(2.40, chance, recovering, None, 3e-4) is None
    assert tuning.needs_restart(2.40, chance, recovering, None)
    falling = [{"epoch": e, "train_nll": v} for e, v in enumerate([2.35, 2.1, 1.9])]
    assert not tuning.needs_restart(2.40, chance, falling, None)
    spiked = [{"epoch": e, "train_nll": v} for e, v in enumerate([1.6, 5.8, 0.9, 0.0006])]
    assert not tuning.needs_restart(1.60, math.log(5), spiked, None)
    collapsed = [{"epoch": 0, "train_nll": 2.36}, {"epoch": 1, "train_nll": 2.31}]
    assert tuning.needs_restart(2.40, chance, collapsed, None)  # every stall is restarted
    assert not tuning.needs_restart(2.40, chance, [], None)  # epochs=0 trains nothing to judge


def test_batches_that_bring_the_classes_in_turn_warn_and_mixed_ones_do_not(prior_and_model) -> None:
    """A fixed order of class-sorted batches (the few-shot pitfall that handicapped benchmarks/transfer.py's MAP at
    20 shots) is said; the same examples shuffled by a DataLoader, or in fixed batches that mix the classes, are not."""
    prior, base = prior_and_model
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(7))
    y = torch.arange(3).repeat_interleave(16)  # sorted by class
    in_turn = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]  # one class per batch
    common = {"epochs": 1, "lr_retries": 0, "progress": False, "width": "laplace"}
    said = r"batch 1 of 6 holds 1 of the 3 classes in 8 examples \(6 of the batches"
    with pytest.warns(tuning.BatchOrderWarning, match=said):
        finetune(_copy(base), prior, in_turn, generator=torch.Generator().manual_seed(0), **common)
    dataset = torch.utils.data.TensorDataset(x, y)
    with pytest.warns(tuning.BatchOrderWarning, match="Shuffle the data"):
        finetune(_copy(base), prior, torch.utils.data.DataLoader(dataset, batch_size=8),
                 generator=torch.Generator().manual_seed(0), **common)
    mixed = [(x[i::6], y[i::6]) for i in range(6)]  # every batch holds every class
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.BatchOrderWarning)
        for loader in (mixed, shuffled):
            finetune(_copy(base), prior, loader, generator=torch.Generator().manual_seed(0), **common)
