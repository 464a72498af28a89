"""resnet50.a1_in1k: timm's ResNet-50 (A1 recipe, ImageNet-1k), the zoo's reference CNN."""

from builders.recipes import DataSpec, Recipe

RECIPE = Recipe(
    name="resnet50.a1_in1k",
    timm_name="resnet50.a1_in1k",
    weights="timm",
    data=DataSpec(),
    resolution=224,  # the training resolution (timm tests this entry at 288); curvature belongs to the train data
    curvature="kfac",
    fisher="mc",
    batch_size=128,
    lam=None,  # d/‖θ‖² of the pretrained weights
    repo_id="prior-zoo/resnet50.a1_in1k-kfac",
)
