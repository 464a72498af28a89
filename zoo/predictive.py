"""Predictive distributions of a Gaussian over a network's weights (docs/method.md §6), in three labelled modes.

- "glm": the linearised network f(x; θ̂) + J(x)(θ − θ̂), one forward-mode Jacobian-vector product per weight
  draw. Its logits stay a Gaussian around the trained network, so a broad posterior widens the predictive
  instead of moving it to where the network is bad (Immer, Korzepa & Bauer 2021).
- "nn": Monte Carlo over weight draws θ_s ~ Q through the network itself; faithful, but broad Kronecker
  posteriors underfit in it.
- "fast": one forward pass. The classifier's exact logit Gaussian given the features, N(W̄φ̃, T_out diag(c) T_outᵀ)
  with c = (1/D)(T_inᵀφ̃)², is sampled in function space (the body stays at its mean).

All draws are made once per `Predictor` from its seed and shared by every image (common random numbers), so an
image's prediction does not depend on what else is in the batch: micro-batched and single calls agree.

Antithetic draws (glm and fast with an even number of samples; the default there) pair every draw with its mirror
image about the Gaussian's centre. Their logits are the centre's ± the same J(x)δ, so each pair costs one
forward-mode product instead of two, and the estimate of the softmax average stays unbiased, with its odd-order
Monte Carlo error cancelled. The mutual information's second term, E_s H[p_s], is even in the draw, so pairs help
the mutual information less, and at one or five shots in glm not at all (benchmarks/antithetic.py). A network moved
off the centre costs one more product per batch, J(x)(c − θ̂), shared by every pair. zoo.finetune's width selection
uses them too: on efficientnet_lite0 its 2 × 16 products over the training images were 14 of a 33-second fit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from zoo.errors import ConfigError, DataError, ModelError, NumericalError
from zoo.layers import IsoLayer, KronLayer

if TYPE_CHECKING:
    from zoo.prior import Prior

MODES = ("glm", "nn", "fast")
GLM_CHUNK = 8
"""Weight draws pushed through one vectorised forward-mode pass (memory grows with it)."""
DEFAULT_MODE = "glm"
"""Chosen by measurement (benchmarks/transfer.py, README "Predictive modes"): the linearised predictive keeps the
network's accuracy and lowers NLL/ECE where Monte Carlo through the network underfits."""


class PinnedHeadWarning(UserWarning):
    """mode="fast" on a classifier whose spread is pinned: its answers carry no epistemic uncertainty."""


def pinned_head_message(head: str) -> str:
    """What `fast` leaves out for a classifier whose spread is pinned; callers add how to get the body's spread."""
    return (f"the classifier {head!r} has its spread pinned (the training data could not set its scale, e.g. one image "
            "per class), so mode 'fast' gives the mean network's probabilities and no epistemic uncertainty")


def pinned_heads(gaussian: object) -> dict[str, float]:
    """The classifiers whose covariance zoo.finetune pinned (meta["width"]["pinned_heads"], multiplier below 1):
    their scale could not be set from the training data (one image per class), so their spread is near zero."""
    meta = getattr(gaussian, "meta", None) or {}
    recorded = (meta.get("width") or {}).get("pinned_heads") or {}
    return {name: float(value) for name, value in recorded.items() if float(value) < 1.0}


@dataclass(frozen=True)
class Prediction:
    """A predictive distribution and its uncertainty split, all in nats, labelled with how it was computed."""

    probs: Tensor  # (N, C): (1/S) Σ_s softmax(f_s(x))
    entropy: Tensor  # (N,): H[p̄], total uncertainty
    expected_entropy: Tensor  # (N,): E_s H[p_s], aleatoric
    mutual_information: Tensor  # (N,): H[p̄] − E_s H[p_s], epistemic
    samples: int
    mode: str = "nn"
    antithetic: bool = False  # half the draws were the other half's mirror images


def entropy(p: Tensor) -> Tensor:
    """H[p] in nats along the last axis, with 0·log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def summarise(logits: Tensor, mode: str, *, antithetic: bool = False) -> Prediction:
    """The Bayesian model average of (S, N, C) logit draws, with total / aleatoric / epistemic entropy."""
    if not bool(torch.isfinite(logits).all()):
        raise NumericalError("a draw produced non-finite logits; the Gaussian is too wide for this network "
                             "(use mode='glm' or 'fast', or refit the posterior)")
    log_p = F.log_softmax(logits.double(), dim=-1)
    p = log_p.exp()
    mean = p.mean(0)
    expected = -(p * log_p).sum(-1).mean(0)
    total = entropy(mean)
    # H[p̄] ≥ E H[p_s] by concavity; rounding can leave −1e-16, which is a zero, not a negative information
    info = total - expected
    if bool((info < -1e-9).any()):
        raise NumericalError(f"mutual information {info.min().item():.3g} < 0; report this")
    info = torch.where(info < 0, torch.zeros_like(info), info)
    return Prediction(probs=mean.float().cpu(), entropy=total.cpu(), expected_entropy=expected.cpu(),
                      mutual_information=info.cpu(), samples=int(logits.shape[0]), mode=mode, antithetic=antithetic)


def check_mode(mode: str | None) -> str:
    """The mode to use (None: DEFAULT_MODE), or a ConfigError naming the choices."""
    chosen = DEFAULT_MODE if mode is None else mode
    if chosen not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    return chosen


def check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim < 2 or images.shape[0] == 0:
        raise DataError("images must be a non-empty preprocessed tensor (N, C, H, W); use the model's timm "
                        "transforms (timm.data.create_transform) to make one")
    if not images.dtype.is_floating_point:
        raise DataError(f"images must be floating point (got {images.dtype}); preprocess them with the model's "
                        "timm transforms")
    return images


def classifier_name(model: nn.Module) -> str:
    """The module name of the network's final Linear layer (timm's pretrained_cfg 'classifier', else the last)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    modules = dict(model.named_modules())
    name = cfg.get("classifier")
    if isinstance(name, str) and isinstance(modules.get(name), nn.Linear):
        return name
    linear = [k for k, m in modules.items() if isinstance(m, nn.Linear)]
    if not linear:
        raise ModelError("the fast predictive needs a Linear classifier; this model has none, use mode='glm'")
    return linear[-1]


def network_of(gaussian: Prior) -> nn.Module:
    """The network carrying the Gaussian's mean, or a ModelError that says how to attach one."""
    model = getattr(gaussian, "model", None)
    if model is None:
        raise ModelError("this Gaussian does not know its network; load it with zoo.load (which sets .model)")
    return model


class Predictor:
    """A Gaussian's predictive in one mode, with its draws made once (from `seed` or `generator`) and reused."""

    def __init__(
        self,
        gaussian: Prior,
        *,
        mode: str | None = None,
        samples: int = 32,
        seed: int = 0,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        spans: Mapping[str, Tensor] | None = None,
        warn_pinned: bool = True,
        antithetic: bool | None = None,
    ) -> None:
        """`spans` (glm only) projects each named Kronecker layer's draws onto the inputs it will see (Prior.sample):
        the deviations are then exact only on the images those spans were taken from, e.g. a training set.
        `warn_pinned=False` is for callers that say it themselves (the service logs it once per model).
        `antithetic` (glm and fast, an even `samples`) draws samples / 2 and adds each one's mirror image; None (the
        default) does so wherever it applies, False always draws independently."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples must be a positive integer, got {samples!r}")
        if spans is not None and check_mode(mode) != "glm":
            raise ConfigError("input spans are exact only for the linearised predictive; use mode='glm'")
        if antithetic is None:
            antithetic = check_mode(mode) != "nn" and samples % 2 == 0
        if antithetic and (check_mode(mode) == "nn" or samples % 2):
            raise ConfigError("antithetic pairs need a mode linear in the draw ('glm' or 'fast') and an even number "
                              f"of samples, got mode {check_mode(mode)!r} and {samples} samples")
        model = network_of(gaussian)
        self.gaussian, self.model, self.mode, self.samples = gaussian, model, check_mode(mode), samples
        self.antithetic = antithetic
        draws = samples // 2 if antithetic else samples
        self.batch_size = batch_size
        # vmap over draws helps a contiguous network a little and slows a channels_last one down (its pooling
        # has no batching rule): measured on efficientnet_lite0, 4 draws of 300 images at 32 px, one thread
        self._vectorise = not _channels_last(model)
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.device = next(model.parameters()).device
        if self.mode == "fast":
            self._head = classifier_name(model)
            self._head_cov = _head_covariance(gaussian, model, self._head)
            if warn_pinned and self._head in pinned_heads(gaussian):
                warnings.warn(pinned_head_message(self._head) + "; use mode='glm' for the body's", PinnedHeadWarning,
                              stacklevel=2)
            out = self._head_cov[0].shape[0]
            self._z = torch.randn((draws, out), generator=gen, dtype=torch.float64)
        else:
            mean = {k: v for k, v in model.named_parameters() if k in gaussian.mean}
            # glm tangents are θ_s − θ̂ from whole draws: tried, zero-mean deviations plus μ − θ̂ made the JVPs about
            # 2× slower on resnet10t (0.57–0.71 s against 0.30–0.40 s for 16 draws, not yet understood)
            self._draws = [_like(gaussian.sample(model, gen, spans=spans), mean) for _ in range(draws)]
            if self.mode == "glm":
                self._draws = [{k: d[k] - mean[k].detach() for k in d} for d in self._draws]
                self._offset = self._center_offset(gaussian, model, mean) if antithetic else None

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """(S, N, C) logit draws in this predictor's mode."""
        x = check_images(images)
        chunks = [self._logits(x[i:i + self.batch_size].to(self.device))
                  for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(chunks, dim=1)

    def __call__(self, images: Tensor) -> Prediction:
        training = self.model.training
        self.model.eval()
        try:
            return summarise(self.logits(images), self.mode, antithetic=self.antithetic)
        finally:
            self.model.train(training)

    @torch.no_grad()
    def linear_parts(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean logits (N, C), deviations (S, N, C)) of a mode linear in the draw ("glm" or "fast").

        Logits are mean + deviation_s; a Gaussian whose precision is multiplied by t has deviations / √t, so one
        pass serves a whole grid of widths (zoo.calibration).
        """
        if self.mode == "nn":
            raise ConfigError("the nn predictive is not linear in the weight draw; use mode='glm' or 'fast'")
        x = check_images(images)
        training = self.model.training
        self.model.eval()
        try:
            means, devs = [], []
            for i in range(0, x.shape[0], self.batch_size):
                mean, dev = self._linear(x[i:i + self.batch_size].to(self.device))
                means.append(mean)
                devs.append(dev)
        finally:
            self.model.train(training)
        return torch.cat(means), torch.cat(devs, dim=1)

    def _logits(self, x: Tensor) -> Tensor:
        if self.mode == "nn":
            return torch.stack([functional_call(self.model, d, (x,), strict=False) for d in self._draws])
        mean, dev = self._linear(x)
        return mean[None] + dev

    def _center_offset(self, gaussian: Prior, model: nn.Module, mean: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """c − θ̂, the glm tangent of the draws' centre (None where the network sits on it, as a posterior's does):
        a mirrored draw 2c − θ_s has tangent 2(c − θ̂) − (θ_s − θ̂)."""
        center = _like(gaussian.draw_center(model), mean)
        offset = {k: center[k] - mean[k].detach() for k in self._draws[0]}
        return offset if any(bool(v.any()) for v in offset.values()) else None

    def _linear(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, deviations) of a linear mode, each antithetic draw followed by its mirror half."""
        if self.mode == "glm":
            mean, dev, shift = self._glm_parts(x)
        else:
            (mean, dev), shift = self._fast_parts(x), None
        if not self.antithetic:
            return mean, dev
        mirror = -dev if shift is None else 2 * shift[None] - dev  # mirrored about the centre, not about θ̂
        return mean, torch.cat([dev, mirror])

    def _glm_parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """f(x; θ̂), J(x)(θ_s − θ̂) for every draw by forward-mode products (vectorised over draws), and J(x)(c − θ̂)
        where antithetic pairs are mirrored about a centre c off the network (else None)."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        names = list(self._draws[0])

        def f(*values: Tensor) -> Tensor:
            return functional_call(self.model, {**params, **dict(zip(names, values, strict=True))}, (x,))

        primals = tuple(params[k] for k in names)
        mean = f(*primals)
        shift = None if self._offset is None else jvp(f, primals, tuple(self._offset[k] for k in names))[1]
        if self._vectorise:
            try:
                return mean, torch.cat([self._glm_chunk(f, primals, names, start)
                                        for start in range(0, len(self._draws), GLM_CHUNK)]), shift
            except RuntimeError:  # a module vmap cannot batch (e.g. an in-place op on a batched tangent)
                self._vectorise = False
        devs = [jvp(f, primals, tuple(t[k] for k in names))[1] for t in self._draws]
        return mean, torch.stack(devs), shift

    def _glm_chunk(self, f: Callable[..., Tensor], primals: tuple[Tensor, ...], names: list[str],
                   start: int) -> Tensor:
        chunk = self._draws[start:start + GLM_CHUNK]
        tangents = tuple(torch.stack([t[k] for t in chunk]) for k in names)
        return vmap(lambda *tan: jvp(f, primals, tan)[1])(*tangents)

    def _fast_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t_out, inv_d, t_in, has_bias = self._head_cov
        head = dict(self.model.named_modules())[self._head]
        features = _pre_logits(self.model, self._head, x)
        mean = head(features).double()
        phi = features.double()
        if has_bias:
            phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=phi.device)], dim=1)
        a = phi.to(t_in) @ t_in if t_in is not None else phi.to(inv_d)
        c = a.square() @ inv_d.T  # (N, out): variance of each rotated logit coordinate
        std = c.sqrt()
        # f_s = mean + T_out (√c ⊙ z_s): the rotation T_out is applied per image to its scaled draws
        draws = torch.einsum("oj,nj,sj->sno", t_out, std.to(t_out), self._z.to(t_out))
        return mean, draws.to(mean)


def _channels_last(model: nn.Module) -> bool:
    return any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               and p.shape[1] > 1 for p in model.parameters())


def _like(params: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A draw on the device and in the dtype of the network's own parameters."""
    return {k: v.to(reference[k]) for k, v in params.items()}


def _pre_logits(model: nn.Module, head: str, x: Tensor) -> Tensor:
    """The classifier's input for x, captured by a hook on one forward pass (any architecture)."""
    captured: list[Tensor] = []
    module = dict(model.named_modules())[head]
    handle = module.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].reshape(x.shape[0], -1)


def _head_covariance(gaussian: Prior, model: nn.Module, head: str) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """(T_out, 1/D, T_in, bias?) with Cov[vec W] = (T_in ⊗ T_out) diag(1/D) (T_in ⊗ T_out)ᵀ, float64."""
    layer = gaussian.layers.get(head) if hasattr(gaussian.layers, "get") else None
    module = dict(model.named_modules())[head]
    device = next(model.parameters()).device
    if isinstance(layer, KronLayer):
        dec = layer.precision.decomposition()
        inv_d = 1.0 / dec.positive_diagonal()
        return (dec.side_out.T.to(device), inv_d.to(device), dec.side_in.T.to(device), "bias" in layer.params)
    if isinstance(layer, IsoLayer):
        out = module.weight.shape[0]
        inn = module.weight.shape[1] + (1 if "bias" in layer.params else 0)
        eye = torch.eye(out, dtype=torch.float64, device=device)
        return eye, torch.full((out, inn), 1.0 / layer.lam, dtype=torch.float64, device=device), None, \
            "bias" in layer.params
    raise ModelError(f"the classifier {head!r} has no Kronecker or isotropic block in this Gaussian; "
                     "use mode='glm' or mode='nn'")


def predict(
    gaussian: Prior,
    images: Tensor,
    samples: int = 32,
    generator: torch.Generator | None = None,
    *,
    mode: str | None = None,
    batch_size: int = 256,
    antithetic: bool | None = None,
) -> Prediction:
    """One-off predictive of `images` under `gaussian` (Prior.predict / Posterior.predict call this)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return Predictor(gaussian, mode=mode, samples=samples, generator=gen, batch_size=batch_size,
                     antithetic=antithetic)(images)
