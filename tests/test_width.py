"""zoo.calibration's width choices: select_width, the widest Q inside the training data's likelihood-ratio interval,
and select_width_on_validation, the T whose predictive has the lowest NLL on held-out images."""

from __future__ import annotations

import math

import pytest
import torch
from dense_reference import dense_covariance, jacobian
from torch import nn

import zoo
from zoo import DataError
from zoo.calibration import (
    JOINT_LOGLIK_SLACK,
    TRAIN_LOGLIK_SLACK,
    VALIDATION_WIDTH_GRID,
    VALIDATION_WIDTH_PER_CLASS,
    select_width,
    select_width_on_validation,
)
from zoo.width import width_slack


def _mlp_prior(n: int, *, flip_held_out: bool = False) -> tuple[zoo.Prior, torch.Tensor, torch.Tensor]:
    """A confident tiny MLP whose labels are its own answers, its prior built on the first 40 of `n` inputs, and
    the rest held out (with `flip_held_out`, a third of those labels moved to another class)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(8)
    x = torch.randn(n, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    if flip_held_out:
        y[40::3] = (y[40::3] + 1) % 3
    prior = zoo.build_prior(model, [(x[:40], y[:40])], holdout=0, progress=False,
                            generator=torch.Generator().manual_seed(0))
    return prior, x[40:], y[40:]


@pytest.fixture(scope="module")
def confident() -> tuple[zoo.Prior, torch.Tensor, torch.Tensor]:
    """The confident MLP and a Gaussian around it far wider than its Laplace."""
    prior, x, y = _mlp_prior(80)
    return prior.scaled(dict.fromkeys(prior.layers, 1e-3)), x, y


@pytest.fixture(scope="module")
def narrow() -> tuple[zoo.Prior, torch.Tensor, torch.Tensor]:
    """The same network, its Laplace widened ×10, and held-out labels of which a third are not its answers: still
    overconfident on them, so the held-out NLL wants Q wider yet, past T = 1 but not to the grid's edge."""
    prior, x, y = _mlp_prior(100, flip_held_out=True)
    return prior.scaled(dict.fromkeys(prior.layers, 0.1)), x, y


def _select(gaussian: zoo.Prior, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    return select_width(gaussian, [(x, y)], mode="glm", samples=64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [5, 40])
def test_chosen_width_is_the_widest_the_training_likelihood_allows(confident, n: int) -> None:
    gaussian, x, y = confident
    t, record = _select(gaussian, x[:n], y[:n])
    ref = record["network"]
    rows = record["grid"]
    allowed = [r for r in rows
               if r["accuracy"] >= ref["accuracy"] and n * (r["nll"] - ref["nll"]) <= TRAIN_LOGLIK_SLACK]
    assert t == max(r["T"] for r in allowed) and record["met"]
    assert all(not r["meets"] for r in rows if r["T"] > t)


def test_slack_is_a_total_so_few_examples_allow_a_wider_q(confident) -> None:
    """Five images tolerate a per-example NLL rise far above what forty do: the slack is summed, not averaged."""
    gaussian, x, y = confident
    t_few, few = _select(gaussian, x[:5], y[:5])
    t_many, _ = _select(gaussian, x[:40], y[:40])
    rise = next(r for r in few["grid"] if r["T"] == t_few)["nll"] - few["network"]["nll"]
    assert 0.05 < rise <= TRAIN_LOGLIK_SLACK / 5
    assert t_few > t_many


def test_a_smaller_slack_gives_a_narrower_q(confident) -> None:
    """What a head shrinkage already gave up of the joint region is not available to T again."""
    gaussian, x, y = confident
    t_full, _ = _select(gaussian, x[:5], y[:5])
    t_rest, rest = select_width(gaussian, [(x[:5], y[:5])], mode="glm", samples=64,
                                generator=torch.Generator().manual_seed(0), slack=0.5)
    rise = next(r for r in rest["grid"] if r["T"] == t_rest)["nll"] - rest["network"]["nll"]
    assert rest["slack"] == 0.5 and 5 * rise <= 0.5 and t_rest < t_full


def test_the_width_slack_is_what_the_head_left_of_the_joint_region() -> None:
    # ½χ²₁(0.95) and ½χ²₂(0.95) = −ln 0.05: one parameter set on the training likelihood, then two
    assert pytest.approx(0.5 * 3.841459, abs=1e-3) == TRAIN_LOGLIK_SLACK
    assert pytest.approx(-math.log(0.05), abs=1e-3) == JOINT_LOGLIK_SLACK
    assert width_slack({}) == TRAIN_LOGLIK_SLACK
    assert width_slack({"fc": {"refit": True, "rule": "evidence"}}) == TRAIN_LOGLIK_SLACK
    assert width_slack({"fc": {"loglik_given_up": 1.25}}) == pytest.approx(JOINT_LOGLIK_SLACK - 1.25)
    two = {"a": {"loglik_given_up": 1.0}, "b": {"loglik_given_up": 1.5}}
    assert width_slack(two) == pytest.approx(0.5 * 7.814728 - 2.5, abs=1e-5)  # ½χ²₃(0.95)
    assert width_slack({"a": {"loglik_given_up": 1.9}, "b": {"loglik_given_up": 1.9},
                        "c": {"loglik_given_up": 1.9}}) == 0.0  # nothing left: T as narrow as the grid allows


def test_validation_width_has_the_lowest_held_out_nll_against_a_dense_reference(narrow) -> None:
    """The record's NLL per T is the predictive's: checked against logits ~ N(f(x), T·J Σ Jᵀ) from the explicit
    Jacobian and the dense covariance (many draws), and the chosen T is the lowest, here above 1."""
    gaussian, x, y = narrow
    t, record = select_width_on_validation(gaussian, [(x, y)], mode="glm", samples=2000,
                                           generator=torch.Generator().manual_seed(0))
    rows = record["grid"]
    assert record["rule"] == "validation" and [r["T"] for r in rows] == list(VALIDATION_WIDTH_GRID)
    assert t == min(rows, key=lambda r: r["nll"])["T"] and 1 < t < max(VALIDATION_WIDTH_GRID)
    jac, names = jacobian(gaussian.model, x)
    root = torch.linalg.cholesky(dense_covariance(gaussian, names))
    logit_root = jac @ root  # (N, C, d): logit deviations are logit_root @ z, z ~ N(0, I)
    z = torch.randn(root.shape[0], 20_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    deviations = torch.einsum("ncd,ds->snc", logit_root, z)
    with torch.no_grad():
        mean = gaussian.model(x)
    dense = {}
    for row in rows:
        probs = torch.softmax(mean + deviations * row["T"] ** 0.5, -1).mean(0)
        dense[row["T"]] = -probs[torch.arange(y.numel()), y].log().mean().item()
        assert row["nll"] == pytest.approx(dense[row["T"]], abs=0.02)
    assert dense[t] <= min(dense.values()) + 0.01
    assert dense[t] < dense[1.0] - 0.02  # past the given width, not a tie with it


def test_validation_width_needs_enough_images_and_real_labels(narrow) -> None:
    gaussian, x, y = narrow
    few = VALIDATION_WIDTH_PER_CLASS * 3 - 1
    generator = torch.Generator().manual_seed(0)
    untouched = generator.get_state()
    t, record = select_width_on_validation(gaussian, [(x[:few], y[:few])], mode="glm", samples=8,
                                           generator=generator)
    assert t is None and f"{few} validation images" in record["unused"] and "grid" not in record
    assert torch.equal(generator.get_state(), untouched)  # found before any draw: no wasted Kronecker sampling
    with pytest.raises(DataError, match="validation labels must be class indices in \\[0, 3\\)"):
        select_width_on_validation(gaussian, [(x, y + 3)], mode="glm", samples=8,
                                   generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="the validation loader yielded no batches"):
        select_width_on_validation(gaussian, [], mode="glm", samples=8, generator=torch.Generator().manual_seed(0))
