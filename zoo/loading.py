"""zoo.load: a model and its prior from "hf-hub:org/name[@rev]" or a local directory, like timm.create_model."""

from __future__ import annotations

import json
import os
from typing import Any

import timm
import torch
from torch import nn

from zoo.artifact import CONFIG, load_weights, read_config
from zoo.errors import ArtifactError, ConfigError
from zoo.hub import download
from zoo.layers import IsoLayer, Layer, LazyLayers
from zoo.prior import Prior


def one_name_per_class(names: Any, num_classes: int) -> list[str] | None:
    """`names` when it is a list of exactly one string per class, else None: class names read from a repository
    (config.json `label_names`, or the `classes` that zoo finetune records in the metadata) are used only then."""
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return None


def load(
    ref: str | os.PathLike[str],
    num_classes: int | None = None,
    *,
    reset_head: bool = False,
    lam: float | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | None = None,
    verify: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, Prior]:
    """Return (model, prior): the weights are the prior's mean.

    A head of another size than `num_classes` (or any head with reset_head=True, for a new task of equal size)
    is replaced by timm's `reset_classifier` and gets an N(0, λ⁻¹I) prior, λ defaulting to the artifact's. timm
    initialises it from torch's global RNG; with `generator` it is seeded from that instead, whatever the global
    state (creating the architecture still draws from the global RNG, as timm.create_model does).
    Hashes and shapes are verified before anything is used; the prior's layers are read lazily.
    """
    root = download(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    config = read_config(root)
    model = create_model(root, config)
    load_weights(root, model, config, verify=verify)
    prior = Prior.load(root, model=model, verify=verify)
    current = getattr(model, "num_classes", None)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if reset_head or (num_classes is not None and num_classes != current):
        prior = replace_head(model, prior, num_classes or current, lam if lam is not None else config["lambda"],
                             generator=generator)
    return model, prior


def create_model(root: os.PathLike[str], config: dict[str, Any]) -> nn.Module:
    """Instantiate the architecture from timm's config.json (never from code in the repository)."""
    path = os.path.join(root, CONFIG)
    try:
        with open(path) as f:
            timm_config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"cannot read {path} ({err}); pull the repository again") from err
    arch = timm_config.get("architecture") or config.get("architecture")
    if arch == "zoo_progressive":
        import zoo.progressive  # noqa: F401  (registers the progressive-network architecture with timm)
    if arch not in timm.list_models():
        raise ArtifactError(f"architecture {arch!r} is not known to timm {timm.__version__}; upgrade timm")
    kwargs = dict(timm_config.get("model_args") or {})
    kwargs.setdefault("num_classes", timm_config.get("num_classes", config.get("num_classes")))
    overlay = timm_config.get("pretrained_cfg") or {}
    return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)


def reset_classifier(model: nn.Module, num_classes: int, generator: torch.Generator | None = None) -> None:
    """timm's reset_classifier, with the new head on the device and dtype of the rest of the network.

    timm builds the new layer on the CPU in float32, so a model already moved to a GPU would fail at its first
    forward pass. With `generator`, its initialisation is drawn from a seed taken from it, in a forked CPU RNG."""
    first = next(model.parameters(), None)
    if generator is None:
        model.reset_classifier(num_classes)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.reset_classifier(num_classes)
    head = dict(model.named_modules()).get(model.pretrained_cfg.get("classifier", ""))
    if first is not None and head is not None:
        head.to(device=first.device, dtype=first.dtype)


def replace_head(model: nn.Module, prior: Prior, num_classes: int, lam: float,
                 generator: torch.Generator | None = None) -> Prior:
    """A fresh classifier with an N(0, λ⁻¹I) prior; every other layer keeps the pretrained prior."""
    head_name = model.pretrained_cfg.get("classifier")
    if not head_name or not hasattr(model, "reset_classifier"):
        raise ConfigError("this model has no classifier that timm can reset; pass num_classes=None")
    reset_classifier(model, num_classes, generator)
    modules = dict(model.named_modules())
    head = modules.get(head_name)
    if head is None:
        raise ConfigError(f"the model's classifier {head_name!r} vanished after reset (num_classes=0?)")
    params = tuple(k for k, p in head.named_parameters(recurse=False) if p.requires_grad)
    mean = {k: v for k, v in prior.mean.items() if not (k == head_name or k.startswith(head_name + "."))}
    for local in params:
        mean[f"{head_name}.{local}"] = torch.zeros_like(getattr(head, local).detach(), device="cpu")
    names = [n for n in prior.layers if n != head_name and not n.startswith(head_name + ".")] + [head_name]
    old = prior.layers
    new_head = IsoLayer(float(lam), params)

    def layer(name: str) -> Layer:
        return new_head if name == head_name else old[name]

    meta = dict(prior.meta, num_classes=num_classes, head="replaced: N(0, λ⁻¹I)")
    return Prior(mean, LazyLayers(names, layer), meta, model=model)
