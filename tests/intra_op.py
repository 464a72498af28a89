"""Pinning torch's intra-op threads, for results that must not depend on the machine's core count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Pin torch to one intra-op thread: pretraining and few-shot fine-tunes are chaotic in the last bits, so their
    results would otherwise depend on the machine's core count (a 20-shot NLL comparison flipped between 2 and 4
    threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
