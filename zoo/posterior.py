"""zoo.Posterior: a fine-tuned Gaussian over a network's weights, its certificate and predictive (docs/method.md §5–§7).

A Posterior is a Prior (same layers, same repository format) that also carries the model it runs on, the prior it
was fitted against (to compute KL(Q‖P) for certificates) and the record of how it was fitted in `meta`. Saved,
it loads through `zoo.load` like any prior, which is how a posterior becomes the prior of the next task.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from zoo.certificate import DEFAULT_SAMPLE_SHARE, Certificate
from zoo.errors import ConfigError, DataError, ModelError, NumericalError
from zoo.layers import Layer
from zoo.pacbayes import gibbs_certificate
from zoo.predictive import Prediction, entropy
from zoo.prior import Prior

__all__ = ["DEFAULT_SAMPLE_SHARE", "Certificate", "Posterior", "Prediction", "entropy"]

class Posterior(Prior):
    """N(θ̂, Λ_Q⁻¹) after fine-tuning: a Prior that can certify itself, predict and be published.

    `model` is the network whose weights are the mean θ̂ (evaluated in eval mode: BatchNorm statistics are part of
    the fixed architecture, not of the random weights); `prior` is the Gaussian it was fitted against, needed for
    KL(Q‖P). A posterior loaded from a repository has no prior attached; pass one to `certificate`.
    """

    def __init__(
        self,
        mean: Mapping[str, Tensor],
        layers: Mapping[str, Layer],
        meta: dict[str, Any],
        *,
        model: nn.Module,
        prior: Prior | None = None,
    ) -> None:
        super().__init__(mean, layers, meta)
        self.model = model
        self.prior = prior

    @classmethod
    def from_prior(cls, model: nn.Module, prior: Prior) -> Posterior:
        """View a loaded posterior repository (`zoo.load` returns it as a Prior) as a Posterior again."""
        if prior.meta.get("kind") != "posterior":
            raise ConfigError(f"this artifact is a {prior.meta.get('kind', 'prior')!r}, not a posterior; "
                              "fine-tune it with zoo.finetune to get one")
        return cls(prior.mean, prior.layers, prior.meta, model=model)

    @classmethod
    def load(cls, ref: str | os.PathLike[str], **kwargs: Any) -> Posterior:
        """Load a posterior repository (local directory or "hf-hub:org/name") through `zoo.load`."""
        from zoo.loading import load

        model, prior = load(ref, **kwargs)
        return cls.from_prior(model, prior)

    # ---- publishing --------------------------------------------------------------------------------------------
    def save(self, directory: str, *, model: nn.Module | None = None) -> Path:  # type: ignore[override]
        """Write the repository (docs/design.md format; kind "posterior", the prior's identity, the certificate)."""
        return super().save(directory, model=self.model if model is None else model)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ) -> str:
        """Save into a temporary directory and upload it with `zoo.hub.push`; return the commit or PR URL."""
        from zoo.hub import push

        tmp = Path(tempfile.mkdtemp(prefix="zoo-posterior-"))
        try:
            folder = self.save(str(tmp / "repo"))
            return push(folder, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                        commit_message=commit_message or "Upload posterior with prior-zoo")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- sampling and evaluation -------------------------------------------------------------------------------
    def _draw(self, generator: torch.Generator | None) -> dict[str, Tensor]:
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in self.sample(self.model, generator).items()}

    def _forward(self, params: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
        if params is None:
            return self.model(x)
        return functional_call(self.model, dict(params), (x,), strict=False)

    @torch.no_grad()
    def gibbs_errors(
        self, loader: Iterable[Any], samples: int, generator: torch.Generator | None = None, *, progress: bool = False
    ) -> tuple[int, int]:
        """(total 0-1 errors over `samples` independent draws, each on every example; number of examples n)."""
        m = _positive_int(samples, "samples")
        batches = _materialise(loader)
        n = sum(int(y.shape[0]) for _, y in batches)
        if n == 0:
            raise DataError("the loader yielded no examples; point it at the training data")
        device = next(self.model.parameters()).device
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        mode = self.model.training
        self.model.eval()
        errors = 0
        try:
            for _ in tqdm(range(m), desc="certificate draws", unit="draw", disable=not progress):
                params = self._draw(gen)
                for x, y in batches:
                    pred = self._forward(params, x.to(device)).argmax(-1).cpu()
                    errors += int((pred != y.cpu()).sum())
        finally:
            self.model.train(mode)
        return errors, n

    def certificate(
        self,
        train_loader: Iterable[Any],
        delta: float = 0.05,
        samples: int = 100,
        generator: torch.Generator | None = None,
        *,
        prior: Prior | None = None,
        delta_sample: float | None = None,
        hypotheses: int | None = None,
        progress: bool = False,
    ) -> Certificate:
        """The rigorous Gibbs 0-1 certificate on the training data, and the paper's Taylor bound beside it.

        m = `samples` fresh weight draws θ_j ~ Q are each evaluated on all n training examples; the error rate is
        bounded by the sample-convergence bound at δ' (default 0.2·δ), which is plugged into the Seeger/Maurer
        kl-bound with KL(Q‖P) at (δ − δ')/H, H = `hypotheses` (the priors or prior hyperparameters searched;
        default the number recorded at fine-tuning, 1). The result is also stored in `meta["certificate"]`, so
        `save` publishes it.
        """
        reference = prior if prior is not None else self.prior
        if reference is None:
            raise ConfigError("this posterior has no prior attached (it was loaded from a repository); pass "
                              "prior= the Gaussian it was fine-tuned against (zoo.load of its prior)")
        d = _probability(delta, "delta")
        ds = d * DEFAULT_SAMPLE_SHARE if delta_sample is None else _probability(delta_sample, "delta_sample")
        if ds >= d:
            raise ConfigError(f"delta_sample ({ds}) must be smaller than delta ({d}): it is a share of it")
        h = int(hypotheses if hypotheses is not None else self.meta.get("hypotheses", 1))
        kl = self.kl(reference).item()
        if not math.isfinite(kl) or kl < 0:
            raise NumericalError(f"KL(Q‖P) = {kl}; the posterior and prior precisions are inconsistent, report this")
        errors, n = self.gibbs_errors(train_loader, samples, generator, progress=progress)
        gibbs = gibbs_certificate(errors, n=n, samples=samples, kl=kl, delta=d - ds, delta_sample=ds, hypotheses=h)
        taylor = self.meta.get("bound") or {}
        cert = Certificate(
            bound=gibbs.bound,
            kind=gibbs.kind,
            delta=d,
            empirical_risk=gibbs.empirical_risk,
            kl=kl,
            n=n,
            samples=gibbs.samples,
            taylor_bound=taylor.get("value"),
            taylor_kind=taylor.get("kind"),
            hypotheses=h,
            gibbs=gibbs,
        )
        self.meta["certificate"] = cert.to_dict()
        return cert

    @property
    def stored_certificate(self) -> Certificate | None:
        """The certificate recorded in the metadata (by `certificate` or `zoo finetune`), if any."""
        data = self.meta.get("certificate")
        return Certificate.from_dict(data) if isinstance(data, Mapping) else None


def _materialise(loader: Iterable[Any]) -> list[tuple[Tensor, Tensor]]:
    """The (x, y) batches once, so every weight draw sees exactly the same n examples."""
    out = []
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            out.append((x, torch.as_tensor(y)))
    except (OSError, RuntimeError) as err:
        raise DataError(f"could not read the data ({type(err).__name__}: {err}); check the data folder") from err
    return out


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _probability(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < float(value) < 1:
        raise ConfigError(f"{name} must lie in (0, 1), e.g. 0.05; got {value!r}")
    return float(value)


def check_architecture(model: nn.Module, prior: Prior) -> None:
    """Every layer of the prior must exist in the model with the same shapes, and cover every trainable weight."""
    from zoo.layers import DiagLayer, KronLayer, kron_matrix

    modules = dict(model.named_modules())
    covered: set[str] = set()
    hint = "load the model and its prior together: model, prior = zoo.load(ref, num_classes=...)"
    for name, layer in prior.layers.items():
        module = modules.get(name)
        if module is None:
            raise ModelError(f"the prior has a layer {name!r} that the model lacks; {hint}")
        prefix = f"{name}." if name else ""
        own = dict(module.named_parameters(recurse=False))
        if isinstance(layer, KronLayer):
            if "weight" not in own or any(p not in own for p in layer.params):
                raise ModelError(f"layer {name!r}: the model has no {layer.params} there; {hint}")
            got = tuple(kron_matrix(module, layer.params).shape)
            if got != tuple(layer.precision.shape):
                raise ModelError(f"layer {name!r}: the prior is over {tuple(layer.precision.shape)} weights but the "
                                 f"model's [W | b] is {got} (another architecture or class count); {hint}")
            covered |= {prefix + p for p in layer.params}
        elif isinstance(layer, DiagLayer):
            for local, prec in layer.precision.items():
                if local not in own or own[local].shape != prec.shape:
                    raise ModelError(f"layer {name!r}.{local}: the prior's shape {tuple(prec.shape)} does not fit "
                                     f"the model; {hint}")
                covered.add(prefix + local)
        else:
            for local in layer.params:
                if local not in own:
                    raise ModelError(f"layer {name!r}: the model has no parameter {local!r}; {hint}")
                covered.add(prefix + local)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - covered)
    if missing:
        raise ModelError(f"the prior covers no prior for the model's parameters {missing[:5]} (every trained "
                         f"parameter needs one); freeze them (requires_grad=False) or {hint}")
