"""A prior predicts like the network it came from: zoo.build_prior checks its width on held-out upstream data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import zoo
from zoo import metrics
from zoo.calibration import ACCURACY_SLACK, ECE_SLACK, NLL_TIE, lowest_with_gaps


@pytest.fixture(scope="module")
def overconfident() -> tuple[nn.Module, zoo.Prior, torch.Tensor, torch.Tensor]:
    """An MLP trained to overconfidence on 300 digits; its prior built on those plus 450 held-out ones."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train_x, train_y = x[:300], y[:300]
    held = (x[300:750], y[300:750])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # long enough to be overconfident on unseen digits
        opt.zero_grad()
        F.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    loader = [held, *[(train_x[i:i + 100], train_y[i:i + 100]) for i in range(0, 300, 100)]]
    prior = zoo.build_prior(model, loader, holdout=0.25, progress=False, generator=torch.Generator().manual_seed(0))
    return model, prior, x[750:], y[750:]


def test_held_out_figures_are_recorded_and_meet_the_targets(overconfident) -> None:
    _, prior, _, _ = overconfident
    held = prior.meta["holdout"]
    assert held["n"] == 450 and held["met"]
    assert held["predictive"]["accuracy"] >= held["network"]["accuracy"] - ACCURACY_SLACK
    assert held["predictive"]["nll"] <= held["network"]["nll"]
    assert held["predictive"]["ece"] <= held["network"]["ece"] + ECE_SLACK
    assert held["t"] < max(row["t"] for row in held["grid"])  # a real width, not the network itself
    # the lowest held-out NLL among the qualifying widths; the record names the widths it cannot tell apart from it
    feasible = [r for r in held["grid"] if r["meets"]]
    chosen = min(feasible, key=lambda r: r["nll"])
    assert held["t"] == chosen["t"] and chosen["nll_gap"] == 0.0
    assert all(r["nll_gap"] == pytest.approx(r["nll"] - chosen["nll"], abs=1e-12) for r in feasible)
    assert held["ties_within_one_se"] == sorted(r["t"] for r in feasible
                                                if r is not chosen and r["nll_gap"] <= r["nll_gap_se"])


def test_prior_predicts_like_its_network_on_unseen_data(overconfident) -> None:
    model, prior, x, y = overconfident
    with torch.no_grad():
        net = torch.softmax(model(x).double(), -1)
    pred = prior.predict(x, samples=32, generator=torch.Generator().manual_seed(1))
    assert metrics.accuracy(pred.probs, y) >= metrics.accuracy(net, y) - 0.01
    assert metrics.nll(pred.probs, y) < metrics.nll(net, y)
    assert metrics.ece(pred.probs, y) < metrics.ece(net, y)


def test_evidence_lambda_is_recorded(overconfident) -> None:
    _, prior, _, _ = overconfident
    record = prior.meta["lambda_evidence"]
    best = max(record["grid"], key=lambda r: r["log_evidence"])
    assert prior.meta["lambda"] == pytest.approx(best["kappa"] * record["base"])


def test_no_holdout_records_that_the_width_was_not_checked() -> None:
    model = nn.Linear(3, 2)
    loader = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    prior = zoo.build_prior(model, loader, progress=False)
    assert prior.meta["holdout"]["n"] == 0


def test_a_network_sure_and_right_on_every_held_out_image_gets_the_widest_tie_not_a_point_mass() -> None:
    """Any spread raises such a network's held-out NLL, so no width is strictly no worse. The prior is then the
    widest whose NLL is within NLL_TIE of the network's (every narrower one too), not the narrowest: a point mass
    would leave its posteriors no uncertainty (resnet10t on the upstream digits, benchmarks/transfer.py)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0]])
    y = torch.arange(2).repeat(200)
    x = centres[y] + 0.3 * torch.randn(400, 2, generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 400, 50)]
    prior = zoo.build_prior(model, loader, holdout=0.25, progress=False, generator=torch.Generator().manual_seed(0))
    held = prior.meta["holdout"]
    assert held["network"]["accuracy"] == 1.0 and held["network"]["nll"] < 1e-3
    assert not held["met"] and held["fallback"] == f"the widest within {NLL_TIE} nats of the network's NLL"
    rows = sorted(held["grid"], key=lambda r: r["t"])
    assert held["t"] < rows[-1]["t"]  # a real width, not the network itself
    assert held["predictive"]["nll"] <= held["network"]["nll"] + NLL_TIE
    assert all(r["meets_within_nll_tie"] for r in rows if r["t"] >= held["t"])
    wider = [r for r in rows if r["t"] < held["t"]]
    assert wider and not wider[-1].get("meets_within_nll_tie", False)
    assert prior.meta["precision_multiplier"] == held["t"]


def test_gaps_to_the_lowest_and_their_standard_errors_by_brute_force() -> None:
    """Hand-made per-image losses: t = 10 is lowest by 0.001 nats, with an SE of about 0.03 for t = 1 and a clear
    0.5 for t = 0.1; a row outside the candidates is neither chosen nor annotated, however low its loss."""
    gen = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(100, generator=gen, dtype=torch.float64)
    best = 1.0 + noise
    spread = torch.randn(100, generator=gen, dtype=torch.float64)
    losses = [best + 0.5 + 0.01 * noise, best + 0.001 + 0.3 * (spread - spread.mean()), best, best - 1.0]
    rows = [{"t": 0.1}, {"t": 1.0}, {"t": 10.0}, {"t": 0.01}]
    assert lowest_with_gaps(rows, losses, [0, 1, 2]) == 2
    diff = losses[1] - losses[2]
    se = float(diff.std() / 10.0)
    assert 0 < rows[1]["nll_gap"] <= rows[1]["nll_gap_se"]  # a tie the 100 images cannot resolve
    assert rows[1]["nll_gap"] == pytest.approx(0.001) and rows[1]["nll_gap_se"] == pytest.approx(se)
    assert rows[0]["nll_gap"] == pytest.approx(0.5 + 0.01 * float(noise.mean()))
    assert rows[0]["nll_gap"] > rows[0]["nll_gap_se"]  # not a tie
    assert rows[2]["nll_gap"] == 0.0 and "nll_gap" not in rows[3]
    with pytest.raises(ValueError):
        lowest_with_gaps(rows, losses, [])
