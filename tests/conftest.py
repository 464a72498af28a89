"""Fixtures shared by test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def _one_intra_op_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Few-shot fine-tunes are chaotic in the last bits: pin the arithmetic to one thread, as it was measured."""
    yield from _one_intra_op_thread()


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    """One intra-op thread for a whole module whose factors' eigendecompositions are small: two threads on two
    shared cores made them 100× slower (measured: tests/test_continual.py in 7 min instead of 30 s while other
    jobs ran)."""
    yield from _one_intra_op_thread()
