"""Fixtures shared by test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from intra_op import one_intra_op_thread


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
