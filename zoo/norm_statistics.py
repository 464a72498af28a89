"""BatchNorm's running statistics re-estimated on the training data (AdaBN, Li et al. 2016), before fine-tuning.

zoo.finetune trains in eval mode, so BatchNorm keeps the prior's statistics and the classifier is a function of the
weights alone (what the bound is over). Across a domain shift those statistics make every input look alike and
nothing trains (efficientnet_lite0 from ImageNet on 200 digits at 32 px stays at chance); `norm_statistics="adapt"`
re-estimates them first. The statistics then depend on the training data, which a certificate on that same data
does not account for, so it is opt-in; zoo.certify_data_dependent adapts on the prior's half only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from zoo.errors import DataError

NORM_STATISTICS = ("keep", "adapt")


def adapt_norm_statistics(model: nn.Module, loader: Iterable[Any]) -> int:
    """Re-estimate every BatchNorm's running mean and variance on `loader` (a cumulative average over all its
    batches, no gradients, weights untouched); returns how many layers were adapted."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        with torch.no_grad():
            for x, _ in loader:
                if x.shape[0] < 2:
                    raise DataError("adapting BatchNorm statistics needs batches of at least 2 examples; use a "
                                    "larger batch size or norm_statistics='keep'")
                model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(norms)
