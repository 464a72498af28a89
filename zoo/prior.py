"""zoo.Prior: a Gaussian over a whole timm model, one block per parameter-owning module (docs/method.md §1, §3)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from zoo.errors import ArtifactError, ConfigError, ModelError
from zoo.kron import kl_divergence, kl_to_isotropic
from zoo.layers import DiagLayer, IsoLayer, KronLayer, Layer, in_layout_of, kron_matrix, split_matrix

if TYPE_CHECKING:
    from zoo.predictive import Prediction


class Prior:
    """N(mean, Λ⁻¹) over a model's trainable parameters, block-diagonal over modules.

    `mean` maps full parameter names to tensors, `layers` maps module names to KronLayer / DiagLayer / IsoLayer,
    `meta` is the JSON metadata of the artifact (prior_config.json). A Posterior is a Prior too.
    """

    def __init__(
        self, mean: Mapping[str, Tensor], layers: Mapping[str, Layer], meta: dict[str, Any],
        model: nn.Module | None = None,
    ) -> None:
        self.mean = mean
        self.layers = layers
        self.meta = meta
        self.model = model  # the model carrying the mean (and its buffers), when known: what save() writes

    def __repr__(self) -> str:
        kind = self.meta.get("kind", "prior").capitalize()
        name = self.meta.get("timm_name") or self.meta.get("architecture")
        return f"{kind}({name}, {len(self.layers)} layers)"

    def save(self, directory: str, *, model: nn.Module | None = None) -> Path:
        """Write the hub repository (docs/design.md format); `model` carries the mean (default: the prior's own)."""
        from zoo.artifact import save_prior

        target = model if model is not None else self.model
        if target is None:
            raise ModelError("this prior does not know its model; pass save(directory, model=model) with the "
                             "model whose weights are its mean")
        return save_prior(self, directory, target)

    @classmethod
    def load(cls, directory: str, *, model: nn.Module, verify: bool = True) -> Prior:
        """Open a repository written by `save` (lazily; hashes and shapes verified) for a model with its weights."""
        from zoo.artifact import read_prior

        mean, layers, meta = read_prior(directory, model, verify=verify)
        return cls(mean, layers, meta, model=model)

    # ---- the Gaussian ----------------------------------------------------------------------------------------------
    def _mean_of(self, module: str, local: str) -> Tensor:
        key = f"{module}.{local}" if module else local
        return self.mean[key]

    def _layer_mean(self, name: str, module: nn.Module) -> Tensor:
        layer = self.layers[name]
        assert isinstance(layer, KronLayer)
        parts = [self._mean_of(name, p).reshape(module.weight.shape[0], -1) for p in layer.params]
        return torch.cat(parts, dim=1)

    def quadratic(self, model: nn.Module, *, single: bool = False) -> Tensor:
        """(θ − μ)ᵀ Λ (θ − μ) summed over layers, differentiable in the model's parameters, accumulated in float64.

        `single=True` evaluates the Kronecker layers in float32 (about twice as fast): for training objectives,
        which evaluate it every step; values and certificates use the float64 default.
        """
        modules = dict(model.named_modules())
        total = torch.zeros((), dtype=torch.float64)
        for name, layer in self.layers.items():
            module = _module(modules, name)
            if isinstance(layer, KronLayer):
                delta = kron_matrix(module, layer.params) - self._layer_mean(name, module).to(module.weight)
                term = layer.precision.quadratic_single(delta) if single else layer.precision.quadratic(delta)
                total = total + term.to(device=total.device, dtype=total.dtype)
            elif isinstance(layer, DiagLayer):
                for local, prec in layer.precision.items():
                    p = getattr(module, local) if local else module
                    diff = p - self._mean_of(name, local).to(p)
                    total = total + (prec.to(p) * diff.square()).sum().to(total)
            else:
                for local in layer.params:
                    total = total + layer.lam * getattr(module, local).square().sum().to(total)
        return total

    def reference_quadratic(self, model: nn.Module, lam: float) -> Tensor:
        """λ‖θ − μ‖² over the layers with a pretrained prior, differentiable, summed in float64; a new head
        (IsoLayer) contributes nothing.

        The quadratic of the isotropic reference N(μ, λ⁻¹I) on the pretrained body, without forming its identity
        Kronecker factors: one elementwise pass, which fine-tuning can afford every step. A new head's λ is a
        guess, not a measurement (zoo.head_evidence chooses the head's precision after training).
        """
        if not (math.isfinite(lam) and lam > 0):
            raise ConfigError(f"the reference precision λ must be positive and finite, got {lam}")
        modules = dict(model.named_modules())
        total = torch.zeros((), dtype=torch.float64)
        for name, layer in self.layers.items():
            if isinstance(layer, IsoLayer):
                continue
            module = _module(modules, name)
            locals_ = layer.params if isinstance(layer, KronLayer) else tuple(layer.precision)
            for local in locals_:
                p = getattr(module, local) if local else module
                total = total + lam * (p - self._mean_of(name, local).to(p)).square().sum().to(total)
        return total

    def sample(self, model: nn.Module, generator: torch.Generator | None = None,
               spans: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One draw θ ~ N(μ, Λ⁻¹) as {parameter name: tensor}, seeded by `generator`.

        `spans` ({Kronecker layer: in × r orthonormal Q}) projects those layers' deviations onto the inputs in
        span(Q) (KronPrecision.sample): exact for a linearised predictive evaluated on those inputs only."""
        return self._centred_draw(model, generator, spans, noise=True)

    def draw_center(self, model: nn.Module) -> dict[str, Tensor]:
        """The point `sample` draws around, keyed and laid out like a draw: μ, except a new head's N(0, λ⁻¹I),
        centred at zero. An antithetic pair mirrors a draw about it (zoo.predictive)."""
        return self._centred_draw(model, None, None, noise=False)

    def _centred_draw(self, model: nn.Module, generator: torch.Generator | None,
                      spans: Mapping[str, Tensor] | None, *, noise: bool) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            module = _module(modules, name)
            prefix = f"{name}." if name else ""
            if isinstance(layer, KronLayer):
                dev = module.weight.device  # rotated where the network runs: on a GPU, 2 matmuls there per layer
                full = self._layer_mean(name, module).float().to(dev)
                if noise:
                    span = None if spans is None else spans.get(name)
                    full = full + layer.precision.sample(1, generator=generator, dtype=torch.float32, span=span,
                                                         device=dev)[0]
                out.update({prefix + k: v for k, v in split_matrix(module, full).items()})
            elif isinstance(layer, DiagLayer):
                for local, prec in layer.precision.items():
                    value = self._mean_of(name, local).float()
                    if noise:
                        value = value + _noise(prec.shape, generator).to(prec.device) * prec.float().rsqrt()
                    out[prefix + local] = value
            else:
                for local in layer.params:
                    shape = getattr(module, local).shape  # a new head's N(0, λ⁻¹I) is centred at zero
                    out[prefix + local] = (_noise(shape, generator) / math.sqrt(layer.lam) if noise
                                           else torch.zeros(shape))
        params = dict(model.named_parameters())
        return {k: in_layout_of(v, params[k]) if k in params else v for k, v in out.items()}

    def predict(
        self,
        images: Tensor,
        samples: int = 32,
        generator: torch.Generator | None = None,
        *,
        mode: str | None = None,
        batch_size: int = 256,
        antithetic: bool | None = None,
    ) -> Prediction:
        """The predictive of preprocessed (N, C, H, W) images on this Gaussian's label space, labelled by `mode`.

        mode "glm" (linearised, the default), "nn" (weight draws through the network) or "fast" (the classifier's
        logit Gaussian, one forward pass); see zoo.predictive. A prior predicts like the network it came from.
        `antithetic` (default: in glm and fast with an even `samples`) draws samples / 2 weight draws and their
        mirror images: less Monte Carlo noise in the probabilities, and in glm half the forward-mode products.
        """
        from zoo.predictive import predict

        return predict(self, images, samples, generator, mode=mode, batch_size=batch_size, antithetic=antithetic)

    def scaled(self, factors: Mapping[str, float]) -> Prior:
        """The same Gaussian with layer l's precision multiplied by factors[l] (absent layers keep theirs).

        Decompositions are reweighted, never recomputed; used to apply a prior strength κ chosen on data.
        """
        layers: dict[str, Layer] = {}
        for name in self.layers:
            k = float(factors.get(name, 1.0))
            if not (math.isfinite(k) and k > 0):
                raise ConfigError(f"a precision factor must be positive and finite, got {k} for layer {name!r}")
            layer = self.layers[name]
            if k == 1.0:
                layers[name] = layer
            elif isinstance(layer, KronLayer):
                layers[name] = KronLayer(layer.precision * k, layer.params)
            elif isinstance(layer, DiagLayer):
                layers[name] = DiagLayer({p: v * k for p, v in layer.precision.items()})
            else:
                layers[name] = IsoLayer(layer.lam * k, layer.params)
        return Prior(self.mean, layers, dict(self.meta), model=self.model)

    def kl(self, other: Prior) -> Tensor:
        """KL(self ‖ other), summed over layers; both must cover the same modules."""
        self._check_comparable(other)
        total = torch.zeros((), dtype=torch.float64)
        for name in self.layers:
            total = total + _layer_kl(self, other, name).cpu()
        return total

    def kl_by_layer(self, other: Prior) -> dict[str, float]:
        """KL(self ‖ other) per module, to see which layers a certificate pays for (they sum to `kl`)."""
        self._check_comparable(other)
        return {name: float(_layer_kl(self, other, name)) for name in self.layers}

    def _check_comparable(self, other: Prior) -> None:
        if set(self.layers) != set(other.layers):
            missing = sorted(set(self.layers) ^ set(other.layers))[:5]
            raise ModelError(f"the two Gaussians cover different modules (e.g. {missing}); they are not comparable")


def _module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise ModelError(f"the model has no module {name!r}; this prior was built for another architecture")
    return modules[name]


def _kron_mean(prior: Prior, name: str, layer: KronLayer, out: int) -> Tensor:
    return torch.cat([prior._mean_of(name, p).reshape(out, -1) for p in layer.params], dim=1).double()


def _layer_kl(q: Prior, p: Prior, name: str) -> Tensor:
    lq, lp = q.layers[name], p.layers[name]
    if isinstance(lq, KronLayer) and isinstance(lp, KronLayer):
        out = lq.precision.shape[0]
        return kl_divergence(_kron_mean(q, name, lq, out), lq.precision, _kron_mean(p, name, lp, out), lp.precision)
    if isinstance(lq, KronLayer) and isinstance(lp, IsoLayer):
        return kl_to_isotropic(_kron_mean(q, name, lq, lq.precision.shape[0]), lq.precision, lp.lam)
    if isinstance(lq, DiagLayer) and isinstance(lp, DiagLayer):
        total = torch.zeros((), dtype=torch.float64)
        for local, prec_q in lq.precision.items():
            pq, pp = prec_q.double(), lp.precision[local].double()
            diff = q._mean_of(name, local).double() - p._mean_of(name, local).double()
            total = total + 0.5 * (pp / pq + pp * diff.square() - 1 + (pq / pp).log()).sum()
        return total
    if isinstance(lq, IsoLayer) and isinstance(lp, IsoLayer):
        total = torch.zeros((), dtype=torch.float64)
        for local in lq.params:
            mq = q._mean_of(name, local).double()
            r = lp.lam / lq.lam
            total = total + 0.5 * (mq.numel() * (r - 1 - math.log(r)) + lp.lam * mq.square().sum())
        return total
    raise ArtifactError(f"cannot compare a {type(lq).__name__} with a {type(lp).__name__} at module {name!r}")


def _noise(shape: torch.Size, generator: torch.Generator | None) -> Tensor:
    """float32 N(0, I) drawn where its generator lives (a CUDA generator cannot fill a CPU tensor)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
