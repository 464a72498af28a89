"""Fixtures shared by test modules, and what makes a test's outcome independent of where and after what it runs."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from intra_op import one_intra_op_thread

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: one intra-op thread each (and in every process they
    # start), since two threads per worker would oversubscribe the cores (see one_thread_per_module)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def seed_global_rngs() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module", autouse=True)
def seeded_module() -> None:
    """Module-scoped fixtures start from the same global RNG state, whichever modules ran before in this process
    (xdist decides that): a new head's initialisation in `zoo.load(..., reset_head=True)` draws from it."""
    seed_global_rngs()


@pytest.fixture(autouse=True)
def seeded_test() -> None:
    """And so does every test."""
    seed_global_rngs()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Few-shot fine-tunes are chaotic in the last bits: pin the arithmetic to one thread, as it was measured."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    """One intra-op thread for a whole module whose factors' eigendecompositions are small: two threads on two
    shared cores made them 100× slower (measured: tests/test_continual.py in 7 min instead of 30 s while other
    jobs ran)."""
    with one_intra_op_thread():
        yield
