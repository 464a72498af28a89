"""convnext_tiny.in12k_ft_in1k: ConvNeXt-T pretrained on ImageNet-12k, fine-tuned on ImageNet-1k.

The prior is built on ImageNet-1k, the data of the weights' last training stage.
"""

from builders.recipes import DataSpec, Recipe

RECIPE = Recipe(
    name="convnext_tiny.in12k_ft_in1k",
    timm_name="convnext_tiny.in12k_ft_in1k",
    weights="timm",
    data=DataSpec(),
    resolution=224,
    curvature="kfac",  # depthwise 7×7 convs get diagonal blocks, the pointwise MLPs Kronecker blocks
    fisher="mc",
    batch_size=128,
    lam=None,  # d/‖θ‖² of the pretrained weights
    repo_id="prior-zoo/convnext_tiny.in12k_ft_in1k-kfac",
)
