"""The hub repository of a prior or posterior (docs/design.md contract): safetensors and JSON only.

    config.json          timm's config, so timm alone loads the weights
    model.safetensors    the mean
    prior.safetensors    factors, stored eigendecompositions and diagonal precisions (float32, scalars float64);
                         its header holds the metadata as JSON under "prior_zoo"
    prior_config.json    the same metadata plus the sha256 of both safetensors files
    README.md            the model card

Loading is lazy (`safe_open`, one layer at a time on first use), verifies both hashes, and checks every layer's
shape against the model before a single tensor is used. Nothing is pickled and nothing runs code on load.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from zoo.errors import ArtifactError
from zoo.hub_mirror import sha256_file
from zoo.kron import KronPrecision
from zoo.layers import DiagLayer, IsoLayer, KronLayer, Layer, LazyLayers

if TYPE_CHECKING:
    from zoo.prior import Prior

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PRIOR = "prior.safetensors"
PRIOR_CONFIG = "prior_config.json"
RELIABILITY = "reliability.png"
"""The model card's reliability diagram, drawn from meta["evaluation"] when a posterior carries held-out figures."""
CARD = "README.md"
META_KEY = "prior_zoo"
SEP = "::"


def _layer_index(prior: Prior) -> dict[str, dict[str, Any]]:
    """What each layer is, readable without opening the tensors (used to check shapes and to load lazily)."""
    index: dict[str, dict[str, Any]] = {}
    for name, layer in prior.layers.items():
        if isinstance(layer, KronLayer):
            index[name] = {"kind": "kron", "params": list(layer.params), "shape": list(layer.precision.shape),
                           "terms": len(layer.precision.terms)}
        elif isinstance(layer, DiagLayer):
            index[name] = {"kind": "diag", "params": {k: list(v.shape) for k, v in layer.precision.items()}}
        else:
            index[name] = {"kind": "iso", "params": list(layer.params), "lambda": layer.lam}
    return index


def _layer_tensors(name: str, layer: Layer) -> dict[str, Tensor]:
    if isinstance(layer, KronLayer):
        p = layer.precision
        if len(p.terms) == 1:
            p.factor_eigh()  # a one-term decomposition is its factors' eigenpairs: stored, so loading never
            tensors = p.to_tensors(decompose=False)  # eigendecomposes
        else:
            # a sum is used through its decomposition, which is stored; its terms' own eigenpairs are not needed
            # (loading checks those factors by Cholesky); computing them took about 4 of the 5.5 s that saving a
            # fine-tuned efficientnet_lite0 cost. Writing only the decomposition also keeps the file independent of
            # which terms happened to be decomposed before.
            tensors = {k: v for k, v in p.to_tensors().items() if not k.startswith("eig.")}
    elif isinstance(layer, DiagLayer):
        tensors = {f"diag.{k}": v for k, v in layer.precision.items()}
    else:
        return {}
    out = {}
    for key, value in tensors.items():
        # Factors and their eigendecompositions are float32 (the contract). A decomposition stays float64: a
        # multi-term one's whitened bases are not orthogonal and float32 would cost the KL its accuracy, and a
        # one-term one holds the factors' float64 eigenvectors, which loading then uses (checked against the
        # float32 copy) instead of re-orthonormalising that copy with a QR.
        keep64 = value.numel() <= 1 or key == "scales" or key.startswith("dec.")
        out[f"{name}{SEP}{key}"] = (value if keep64 or not value.is_floating_point() else value.float()).contiguous()
    return out


def _contiguous(model: nn.Module) -> nn.Module:
    """The model, or a contiguous copy of a channels_last one: safetensors refuses non-contiguous tensors."""
    if all(t.is_contiguous() for t in model.state_dict().values()):
        return model
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def save_prior(prior: Prior, directory: str | os.PathLike[str], model: nn.Module) -> Path:
    """Write the repository atomically: into a temporary sibling directory, then renamed into place."""
    from timm.models import save_for_hf

    from zoo.card import write_card

    target = Path(directory)
    _check_mean_is_model(prior, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_for_hf(_contiguous(model), str(tmp), safe_serialization=True)
        meta = dict(prior.meta)
        meta["model_sha256"] = sha256_file(tmp / WEIGHTS)
        meta["layers"] = _layer_index(prior)
        tensors: dict[str, Tensor] = {}
        for name, layer in prior.layers.items():
            tensors.update(_layer_tensors(name, layer))
        for key, value in prior.mean.items():
            if not any(key == f"{n}.{p}" or (not n and key == p) for n, p in _iso_params(prior)):
                continue
            tensors[f"mean{SEP}{key}"] = value.contiguous()  # a new head's mean is not in model.safetensors
        save_file(tensors, str(tmp / PRIOR), metadata={META_KEY: json.dumps(meta)})
        config = dict(meta, prior_sha256=sha256_file(tmp / PRIOR))
        (tmp / PRIOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if isinstance(meta.get("evaluation"), dict) and meta["evaluation"].get("reliability"):
            from zoo.report import reliability_figure

            ev = meta["evaluation"]
            reliability_figure(ev["reliability"], float(ev["ece"]), int(ev["n"]), tmp / RELIABILITY)
        write_card(tmp, config)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prior.meta = {k: v for k, v in config.items() if k not in ("layers", "prior_sha256")}
    return target


def _check_mean_is_model(prior: Prior, model: nn.Module) -> None:
    """model.safetensors holds the mean, so the model passed to save must carry exactly the prior's mean."""
    iso = {f"{n}.{p}" if n else p for n, p in _iso_params(prior)}
    params = dict(model.named_parameters())
    for key, value in prior.mean.items():
        if key in iso:
            continue
        if key not in params or params[key].shape != value.shape or not params[key].detach().cpu().equal(value.cpu()):
            raise ArtifactError(f"the model's {key} differs from the prior's mean; save with the model the prior "
                                "was built from (or the posterior's own model)")


def _iso_params(prior: Prior) -> list[tuple[str, str]]:
    return [(n, p) for n, layer in prior.layers.items() if isinstance(layer, IsoLayer) for p in layer.params]


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / PRIOR_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {PRIOR_CONFIG}; it is not a prior-zoo repository (build one with "
                            "`zoo build` or pass the directory that `prior.save` wrote)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); the download is corrupt, pull it again") from err


def verify_hashes(directory: Path, config: dict[str, Any]) -> None:
    """Refuse tampered or mismatched files: both safetensors files must hash to what prior_config.json says."""
    for filename, key in ((WEIGHTS, "model_sha256"), (PRIOR, "prior_sha256")):
        path = directory / filename
        if not path.is_file():
            raise ArtifactError(f"{directory} is missing {filename}; pull the repository again")
        expected = config.get(key)
        if not expected or sha256_file(path) != expected:
            raise ArtifactError(f"{filename} in {directory} does not match the sha256 in {PRIOR_CONFIG}: the file "
                                "was modified or mixed from another build; pull or rebuild it")


def check_shapes(config: dict[str, Any], model: nn.Module) -> None:
    """Every layer of the artifact must exist in the model with matching parameter shapes."""
    modules = dict(model.named_modules())
    for name, entry in config.get("layers", {}).items():
        module = modules.get(name)
        if module is None:
            raise ArtifactError(f"the prior has a layer {name!r} that the model lacks; it was built for "
                                f"{config.get('architecture')}, not this model")
        own = dict(module.named_parameters(recurse=False))
        if entry["kind"] == "kron":
            weight = own.get("weight")
            cols = 0 if weight is None else weight[0].numel() + ("bias" in entry["params"])
            got = [0, 0] if weight is None else [weight.shape[0], cols]
            if got != entry["shape"]:
                raise ArtifactError(f"layer {name!r}: the prior is over {entry['shape']} but the model's "
                                    f"[W | b] is {got}; wrong architecture or class count")
        elif entry["kind"] == "diag":
            for local, shape in entry["params"].items():
                if local not in own or list(own[local].shape) != shape:
                    raise ArtifactError(f"layer {name!r}.{local}: prior shape {shape} does not match the model")


def read_prior(
    directory: str | os.PathLike[str], model: nn.Module, *, verify: bool = True
) -> tuple[dict[str, Tensor], LazyLayers, dict[str, Any]]:
    """(mean, lazily read layers, metadata) of a repository; the mean is the model's own parameters (load its
    weights first). `Prior.load` wraps them; this module knows tensors and JSON, not the Prior."""
    root = Path(directory)
    config = read_config(root)
    if config.get("format_version") != 1:
        raise ArtifactError(f"unsupported format_version {config.get('format_version')}; upgrade prior-zoo")
    if verify:
        verify_hashes(root, config)
    check_shapes(config, model)
    handle = safe_open(str(root / PRIOR), framework="pt")
    all_keys = list(handle.keys())
    index = config["layers"]

    def load(name: str) -> Layer:
        entry = index[name]
        prefix = f"{name}{SEP}"
        if entry["kind"] == "iso":
            return IsoLayer(float(entry["lambda"]), tuple(entry["params"]))
        keys = [k for k in all_keys if k.startswith(prefix)]
        tensors = {k[len(prefix):]: handle.get_tensor(k) for k in keys}
        if entry["kind"] == "kron":
            return KronLayer(KronPrecision.from_tensors(tensors), tuple(entry["params"]))
        return DiagLayer({k[len("diag."):]: v.double() for k, v in tensors.items()})

    mean = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    for key in all_keys:
        if key.startswith(f"mean{SEP}"):
            mean[key[len(f"mean{SEP}"):]] = handle.get_tensor(key)
    meta = {k: v for k, v in config.items() if k not in ("layers", "prior_sha256")}
    return mean, LazyLayers(list(index), load), meta


def load_weights(directory: Path, model: nn.Module, config: dict[str, Any], *, verify: bool = True) -> None:
    """Load model.safetensors into the model (shapes checked by load_state_dict, hash by verify_hashes)."""
    from safetensors.torch import load_file

    path = directory / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{directory} is missing {WEIGHTS}; pull the repository again")
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{WEIGHTS} does not fit {config.get('architecture')}: {str(err)[:300]}") from err
