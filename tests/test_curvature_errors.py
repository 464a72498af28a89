"""Bad input to zoo.curvature.kfac raises ZooError subclasses and leaves no checkpoint that looks complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from curvature_models import batches, mixed_cnn
from safetensors import safe_open
from torch import Tensor, nn

from zoo.curvature import kfac
from zoo.errors import ConfigError, DataError, ModelError, NumericalError, ZooError


def data(n: int = 2, classes: int = 4) -> list[tuple[Tensor, Tensor]]:
    return batches(n, 2, (3, 8, 8), classes, dtype=torch.float32)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_without_parameters() -> None:
    with pytest.raises(ModelError, match="no trainable parameters"):
        kfac(nn.Sequential(nn.Flatten()), data(), progress=False)
    frozen = mixed_cnn().requires_grad_(False)
    with pytest.raises(ModelError):
        kfac(frozen, data(), progress=False)


@pytest.mark.parametrize("kwargs", [{"fisher": "fancy"}, {"approx": "shrink"}, {"dtype": torch.float16},
                                    {"checkpoint_every": 0}])
def test_unknown_options(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        kfac(mixed_cnn(), data(), progress=False, **kwargs)


def test_wrong_shapes() -> None:
    model = mixed_cnn()
    good = data()
    bad_channels = [(torch.randn(2, 5, 8, 8), torch.tensor([0, 1]))]
    changing = [good[0], (torch.randn(2, 3, 9, 9), torch.tensor([0, 1]))]
    bad_labels = [(good[0][0], torch.tensor([0, 1, 2]))]
    float_labels = [(good[0][0], torch.tensor([0.0, 1.0]))]
    out_of_range = [(good[0][0], torch.tensor([0, 9]))]
    for loader in [bad_channels, changing, bad_labels, float_labels, out_of_range, [good[0][0]], []]:
        with pytest.raises(DataError):
            kfac(model, loader, "empirical", progress=False)
        assert no_hooks(model)


def test_exact_with_too_many_classes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_exact_classes"):
        kfac(mixed_cnn(classes=5), data(classes=5), "exact", max_exact_classes=4, progress=False,
             checkpoint_dir=tmp_path, checkpoint_every=1)
    assert not list(tmp_path.iterdir())


class _NaNGrad(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        _NaNGrad.calls += 1
        return g * float("nan") if _NaNGrad.calls == 3 else g


class _Poisoned(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _NaNGrad.apply(x)


def test_nan_gradient(tmp_path: Path) -> None:
    """The third backward is NaN: NumericalError, and only the valid 2-batch checkpoint remains, marked partial."""
    _NaNGrad.calls = 0
    model = mixed_cnn()
    model.insert(8, _Poisoned())
    with pytest.raises(NumericalError, match="NaN"):
        kfac(model, data(4), progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert no_hooks(model)
    (path,) = tmp_path.iterdir()
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["position"] == 2 and meta["complete"] is False


def test_nan_logits() -> None:
    x, y = data(1)[0]
    with pytest.raises(NumericalError):
        kfac(mixed_cnn(), [(x.fill_(float("nan")), y)], progress=False)


def test_errors_are_zoo_errors() -> None:
    assert all(issubclass(e, ZooError) for e in (ConfigError, DataError, ModelError, NumericalError))
