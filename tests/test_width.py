"""zoo.calibration.select_width: the widest Q inside the training data's likelihood-ratio interval."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zoo
from zoo.calibration import JOINT_LOGLIK_SLACK, TRAIN_LOGLIK_SLACK, select_width
from zoo.width import width_slack


@pytest.fixture(scope="module")
def confident() -> tuple[zoo.Prior, torch.Tensor, torch.Tensor]:
    """A confident tiny MLP (labels are its own answers) and a Gaussian around it far wider than its Laplace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(8)
    x = torch.randn(80, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    prior = zoo.build_prior(model, [(x[:40], y[:40])], holdout=0, progress=False,
                            generator=torch.Generator().manual_seed(0))
    return prior.scaled(dict.fromkeys(prior.layers, 1e-3)), x[40:], y[40:]


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
