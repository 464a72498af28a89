"""zoo.calibration.select_width: the widest Q inside the training data's likelihood-ratio interval."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.calibration import TRAIN_LOGLIK_SLACK, select_width


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
