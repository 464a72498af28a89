"""Seeded randomness for data augmentation, which draws from more than torch's generator.

timm's training transforms (RandomResizedCropAndInterpolation, and others) draw their crop boxes from Python's
`random` module, so seeding torch alone leaves the crops, and every prior built from them, different on each run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded_augmentation(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's `random` for the block, and restore both afterwards."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)
