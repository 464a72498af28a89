"""The learned prior's posterior, with every default, against a fairly tuned MAP fine-tune of the same network.

A digits transfer as a user would run it: the upstream network and its prior (digits 0–4, tests/digits_task.py),
a new head for digits 5–9, 5 shots per class. MAP is L2-SP (decay toward the pretrained body and toward zero
for the new head) with the same optimiser, learning rate and epochs as `zoo.finetune`, at the better on the test
set of two decays (what cross-validation on the shots picks most often in benchmarks/transfer.py, and ten times
it): an optimistic baseline. The claim checked is the product's: the posterior's predictive has the lower NLL,
at no cost in accuracy, on the mean over seeds (measured: 0.313 against 0.367, accuracy 0.902 for both).

At 20 shots per class the claim no longer holds on this task against this test-tuned MAP: 0.172 against 0.145
once the training batches hold every class (they held two or three classes each before, which handicapped the
MAP more than ours; README, "Where ours still loses"). It is not asserted there.
"""

from __future__ import annotations

import pytest
import torch
from digits_task import CLASSES, HEAD_LAMBDA, Batches, downstream, l2sp_fine_tune, upstream_prior_dir
from torch import nn

import zoo

SHOTS = 5
SEEDS = (0, 1, 2)
TEST_IMAGES = 300
EPOCHS = 30  # zoo.finetune's default
LR = 3e-3  # zoo.finetune's default
DECAYS = (0.01, 0.1)


def fresh(seed: int) -> tuple[nn.Module, zoo.Prior]:
    torch.manual_seed(seed)  # the new head's initialisation, the same for both fits
    return zoo.load(upstream_prior_dir(), num_classes=CLASSES, reset_head=True, lam=HEAD_LAMBDA)


def l2sp(seed: int, train: Batches, wd: float) -> nn.Module:
    model, _ = fresh(seed)
    l2sp_fine_tune(model, train, wd, epochs=EPOCHS, lr=LR)
    return model


def nll_and_accuracy(probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    probs = probs.double()
    return -probs.gather(1, y[:, None]).log().mean().item(), (probs.argmax(-1) == y).double().mean().item()


def test_building_the_upstream_prior_leaves_the_global_rng_alone() -> None:
    """fresh(seed) seeds, then loads upstream_prior_dir(), whose first call in a process builds it. The build must
    not draw from the global RNG, or that first call's new head differs from every later one's, and the posterior
    and the MAP fine-tune it is compared with start from different heads (it did: seed 0, 0.12 apart)."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    upstream_prior_dir(epochs=1, seed=1)  # a build no other test has cached
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_learned_prior_posterior_beats_a_tuned_map_fine_tune_on_nll(one_thread: None) -> None:
    ours, baseline = [], []
    for seed in SEEDS:
        train, x, y = downstream(SHOTS, seed)
        x, y = x[:TEST_IMAGES], y[:TEST_IMAGES]
        model, prior = fresh(seed)
        post = zoo.finetune(model, prior, train, progress=False, generator=torch.Generator().manual_seed(seed))
        ours.append(nll_and_accuracy(post.predict(x, generator=torch.Generator().manual_seed(seed)).probs, y))
        fits = []
        for wd in DECAYS:
            map_model = l2sp(seed, train, wd)
            with torch.no_grad():
                fits.append(nll_and_accuracy(map_model(x).softmax(-1), y))
        baseline.append(min(fits))
    mean = [sum(col) / len(SEEDS) for col in zip(*ours, strict=True)]
    base = [sum(col) / len(SEEDS) for col in zip(*baseline, strict=True)]
    assert mean[0] < base[0], f"posterior NLL {mean[0]:.3f} not below MAP's {base[0]:.3f}: {ours} vs {baseline}"
    assert mean[1] >= base[1] - 0.01, f"posterior accuracy {mean[1]:.3f} more than a point below MAP's {base[1]:.3f}"
