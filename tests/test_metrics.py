"""zoo.metrics against brute-force computations on small hand-made cases, and its input errors."""

from __future__ import annotations

import math

import pytest
import torch

from zoo import DataError, metrics


def random_case(n: int = 200, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, c, (n,), generator=g)
    return probs, y


def brute_ece(probs: torch.Tensor, y: torch.Tensor, bins: int) -> float:
    """Equal-width bins [k/B, (k+1)/B), a confidence of 1 in the last one; Σ_bins (n_b/N)·|acc_b − conf_b|."""
    total = 0.0
    n = probs.shape[0]
    for k in range(bins):
        members = []
        for i in range(n):
            conf = float(probs[i].max())
            idx = min(int(conf * bins), bins - 1)
            if idx == k:
                members.append(i)
        if members:
            acc = sum(int(probs[i].argmax()) == int(y[i]) for i in members) / len(members)
            conf = sum(float(probs[i].max()) for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def pairwise_auroc(score_in: list[float], score_out: list[float]) -> float:
    """P(OOD score > in score) + ½ P(tie), counted over every (in, out) pair."""
    wins = sum((o > i) + 0.5 * (o == i) for i in score_in for o in score_out)
    return wins / (len(score_in) * len(score_out))


def test_accuracy_nll_brier_on_a_hand_case() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])
    y = torch.tensor([0, 2, 1, 0])
    assert metrics.accuracy(probs, y) == pytest.approx(0.5)
    assert metrics.nll(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.25)
                                                    + math.log(0.2)) / 4, rel=1e-6)
    per = metrics.nll_per_example(probs, y)
    assert per.dtype == torch.float64
    assert per.tolist() == pytest.approx([-math.log(0.7), -math.log(0.8), -math.log(0.25), -math.log(0.2)], rel=1e-6)
    assert float(per.mean()) == metrics.nll(probs, y)
    assert metrics.nll_per_example(torch.tensor([[1.0, 0.0]]), torch.tensor([1])).item() == -math.log(metrics.FLOOR)
    rows = [(0.3**2 + 0.2**2 + 0.1**2), (0.1**2 + 0.1**2 + 0.2**2), (0.5**2 + 0.75**2 + 0.25**2),
            (0.8**2 + 0.6**2 + 0.2**2)]
    assert metrics.brier(probs, y) == pytest.approx(sum(rows) / 4, rel=1e-6)


def test_perfect_and_worst_brier() -> None:
    y = torch.tensor([0, 1])
    assert metrics.brier(torch.eye(2), y) == 0.0
    assert metrics.brier(torch.eye(2).flip(0), y) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bins", [1, 5, 15])
def test_ece_matches_equal_width_binning(seed: int, bins: int) -> None:
    probs, y = random_case(seed=seed)
    assert metrics.ece(probs, y, bins) == pytest.approx(brute_ece(probs, y, bins), abs=1e-6)


def test_ece_of_a_calibrated_hand_case_is_zero_and_of_an_overconfident_one_is_the_gap() -> None:
    # confidence 0.75 in every row, right 3 times of 4: calibrated
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert metrics.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-7)
    # confidence 0.9, right half the time: the gap is 0.4
    probs = torch.tensor([[0.9, 0.1]] * 4)
    assert metrics.ece(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.4, abs=1e-6)


def test_auroc_matches_a_pairwise_count_with_ties() -> None:
    g = torch.Generator().manual_seed(3)
    score_in = torch.randint(0, 6, (40,), generator=g).double()  # many ties on purpose
    score_out = torch.randint(2, 8, (30,), generator=g).double()
    expected = pairwise_auroc(score_in.tolist(), score_out.tolist())
    assert metrics.ood_auroc(score_in, score_out) == pytest.approx(expected, abs=1e-6)  # torchmetrics: float32


def test_auroc_extremes() -> None:
    low, high = torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9, 0.7])
    assert metrics.ood_auroc(low, high) == pytest.approx(1.0)
    assert metrics.ood_auroc(high, low) == pytest.approx(0.0)
    assert metrics.ood_auroc(torch.ones(3), torch.ones(4)) == pytest.approx(0.5)


def test_nll_from_log_probs_is_exact_where_probabilities_underflow() -> None:
    logits = torch.tensor([[0.0, -800.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    log_p = torch.log_softmax(logits, -1)
    assert metrics.nll(log_p, y, from_log=True) == pytest.approx((800 + math.log(2)) / 2, rel=1e-9)
    with pytest.warns(RuntimeWarning, match="floored"):
        floored = metrics.nll(log_p.exp(), y)
    assert floored == pytest.approx((-math.log(torch.finfo(torch.float64).tiny) + math.log(2)) / 2, rel=1e-9)


def test_summary_with_and_without_ood() -> None:
    probs, y = random_case(n=50, c=3, seed=4)
    ood, _ = random_case(n=30, c=3, seed=5)
    plain = metrics.summary(probs, y)
    assert plain["ood_auroc_entropy"] is None and plain["ood_auroc_mi"] is None
    assert plain["accuracy"] == metrics.accuracy(probs, y) and plain["ece"] == metrics.ece(probs, y)
    mi_in, mi_out = torch.rand(50, dtype=torch.float64), torch.rand(30, dtype=torch.float64) + 0.5
    full = metrics.summary(probs, y, ood_probs=ood, mutual_information=mi_in, ood_mutual_information=mi_out)
    ent = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    assert full["ood_auroc_entropy"] == pytest.approx(pairwise_auroc(ent(probs).tolist(), ent(ood).tolist()))
    assert full["ood_auroc_mi"] == pytest.approx(pairwise_auroc(mi_in.tolist(), mi_out.tolist()))
    logits = torch.randn(50, 3, dtype=torch.float64)
    exact = metrics.summary(torch.softmax(logits, -1), y, log_probs=torch.log_softmax(logits, -1))
    assert exact["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-9)


@pytest.mark.parametrize(("probs", "y", "match"), [
    (torch.full((4, 3), 1 / 3), torch.zeros(5, dtype=torch.long), "one label per row"),
    (torch.full((4, 3), 1 / 3), torch.zeros(4, 1, dtype=torch.long), "one label per row"),
    (torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), r"\(N, C\)"),
    (torch.full((4, 3), 1 / 3), torch.zeros(4), "convert with y.long"),
    (torch.full((4, 3), 1 / 3), torch.tensor([0, 1, 2, 3]), "relabel"),
    (torch.randn(4, 3) * 5, torch.zeros(4, dtype=torch.long), "softmax"),
    (torch.full((4, 3), 0.3), torch.zeros(4, dtype=torch.long), "sum to 1"),
    (torch.full((0, 3), 0.3), torch.zeros(0, dtype=torch.long), "non-empty"),
])
def test_bad_inputs_raise_data_errors_that_say_what_to_do(probs: torch.Tensor, y: torch.Tensor, match: str) -> None:
    for metric in (metrics.accuracy, metrics.nll, metrics.ece, metrics.brier):
        with pytest.raises(DataError, match=match):
            metric(probs, y)


def test_bad_ood_scores_and_options() -> None:
    with pytest.raises(DataError, match="1-D"):
        metrics.ood_auroc(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(DataError, match="non-empty"):
        metrics.ood_auroc(torch.zeros(3), torch.zeros(0))
    with pytest.raises(DataError, match="NaN"):
        metrics.ood_auroc(torch.tensor([float("nan")]), torch.zeros(3))
    with pytest.raises(DataError, match="logits"):
        metrics.nll(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), from_log=True)
    with pytest.raises(DataError, match="bins"):
        metrics.ece(torch.full((2, 2), 0.5), torch.zeros(2, dtype=torch.long), bins=0)
    probs, y = random_case(n=5, c=3)
    with pytest.raises(DataError, match="both"):
        metrics.summary(probs, y, mutual_information=torch.zeros(5))
    with pytest.raises(DataError, match="same model"):
        metrics.summary(probs, y, ood_probs=torch.full((4, 2), 0.5))
