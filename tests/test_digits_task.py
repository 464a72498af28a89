"""The shared few-shot task's batching: every training batch must hold every class, or an unshuffled epoch steps
through the classes one group at a time and both MAP and ours fit worse than the task allows."""

import torch
from digits_task import CLASSES, class_balanced_batches, downstream


def test_class_balanced_batches_hold_every_class_in_proportion() -> None:
    y = torch.arange(CLASSES).repeat_interleave(20)  # sorted by class, as downstream's shots come
    x = torch.arange(y.numel()).float()[:, None]
    parts = class_balanced_batches(x, y, 64)
    assert [len(b[1]) for b in parts] == [50, 50]
    for _, yb in parts:
        assert torch.equal(torch.bincount(yb, minlength=CLASSES), torch.full((CLASSES,), 10))
    seen = torch.cat([xb[:, 0] for xb, _ in parts]).long()
    assert torch.equal(seen.sort().values, torch.arange(y.numel()))  # every example once
    for xb, yb in parts:
        assert torch.equal(y[xb[:, 0].long()], yb)  # images stay with their labels


def test_class_balanced_batches_sort_an_unsorted_set_and_keep_one_batch_whole() -> None:
    y = torch.tensor([3, 0, 1, 3, 0, 1, 2, 2])
    x = torch.arange(8)
    (xb, yb), = class_balanced_batches(x, y, 8)
    assert yb.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert xb.tolist() == [1, 4, 2, 5, 6, 7, 0, 3]  # a stable sort


def test_downstream_batches_at_twenty_shots_hold_every_class() -> None:
    train, _, _ = downstream(20, 0)
    assert len(train) == 2
    for _, yb in train:
        assert torch.equal(torch.bincount(yb, minlength=CLASSES), torch.full((CLASSES,), 10))
