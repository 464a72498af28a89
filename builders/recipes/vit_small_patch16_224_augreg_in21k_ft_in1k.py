"""vit_small_patch16_224.augreg_in21k_ft_in1k: ViT-S/16 (AugReg), ImageNet-21k pretraining, ImageNet-1k fine-tune.

Linear layers act on 197 tokens; K-FAC-expand treats the tokens as extra data (weight sharing).
"""

from builders.recipes import DataSpec, Recipe

RECIPE = Recipe(
    name="vit_small_patch16_224.augreg_in21k_ft_in1k",
    timm_name="vit_small_patch16_224.augreg_in21k_ft_in1k",
    weights="timm",
    data=DataSpec(),
    resolution=224,  # fixed by the patch grid of the position embedding
    curvature="kfac",
    fisher="mc",
    approx="expand",
    batch_size=128,
    lam=None,  # d/‖θ‖² of the pretrained weights
    repo_id="prior-zoo/vit_small_patch16_224.augreg_in21k_ft_in1k-kfac",
)
