"""zoo.continual: a sequence of tasks learned from a prior, each posterior the prior of the next (docs/method.md §8).

Task-incremental, one head per task. Task t fine-tunes the shared body and a fresh head with `zoo.finetune`
against the chain's prior; afterwards the body's precision is the Bayesian recursion

    Λ_t = Λ_0 + F₁ + … + F_t       (Λ_0 the learned prior; F_k the K-FAC of task k at its fitted weights)

around the new weights. Per Kronecker layer the latest F_t is kept exact and the older sum is folded into its
nearest Kronecker product (`zoo.kron.chain`), so every repository of the chain has the same size. Where the
algebra allows it the result is exact (one term plus damping, or two terms: an isotropic start's first task); the
rest is measured against the exact sum after every task, on factors for every layer (relative Frobenius error)
and on the dense matrix for small layers (KL), and recorded in the posterior's metadata.

The posterior saved for task t is `zoo.finetune`'s own Q (its widths and strengths are prediction choices), in
its prior's basis, which the chain's `approximation` chose; the prior carried to task t+1 is the un-tempered sum
above, the posterior of the Bayesian recursion. Diagonal layers (normalisation) add exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo.errors import ConfigError, ModelError, NumericalError
from zoo.kron import KronPrecision
from zoo.kron.approx import APPROXIMATIONS
from zoo.kron.chain import add_term, dense_kl, leading_term, relative_error
from zoo.layers import DiagLayer, KronLayer, Layer
from zoo.loading import replace_head, reset_classifier
from zoo.posterior import Posterior
from zoo.prior import Prior
from zoo.tuning import finetune, strength_groups

DENSE_LIMIT = 1024
"""Layers with at most this many weights also get their approximation's KL to the exact sum, on dense matrices."""
DEFAULT_APPROXIMATION = "ekfac"
"""How each posterior's precision is decomposed; the project's measured default (README, benchmarks/kron.py)."""
CHAIN_FINETUNE: dict[str, Any] = {"objective": "map", "strength": "bound", "width": "laplace"}
"""zoo.finetune's choices in a chain: the prior as given (κ = 1) and the MAP objective, which is the mode of the
Bayesian recursion the chain carries; the saved Q's width is the Laplace width check's. Override per call."""


@dataclass(frozen=True)
class Task:
    """One task of a sequence: its training batches (x, y) with labels 0…num_classes−1, and names for the record."""

    name: str
    loader: Iterable[Any]
    num_classes: int
    classes: tuple[str, ...] | None = None


@dataclass
class TaskRecord:
    """What learning one task cost and how far the chain's precision is from the exact sum, per task."""

    task: int
    name: str
    seconds: float
    exact: bool
    prior_error: dict[str, float]  # relative Frobenius error of Λ_t against Λ_0 + ΣF (max, mean over layers)
    posterior_error: dict[str, float]  # the saved Q's decomposition against Q with the exact history
    kl_error: float | None  # Σ over small layers of KL(N(0, Λ_t⁻¹) ‖ N(0, exact⁻¹)), nats; None without any
    kron_terms: int  # the most Kronecker terms any layer of the saved posterior holds
    prior_strength: float  # κ₀ on the learned prior (task 1's record; 1 in later tasks' records)
    path: str | None = None
    artifact_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ChainResult:
    """The chain after its last task: the model (body at the last posterior), every task's head and posterior."""

    model: nn.Module
    posteriors: list[Posterior]
    heads: list[dict[str, Tensor]]
    records: list[TaskRecord]
    prior: Prior  # the prior the next task would use (the recursion's Λ_t, head excluded)
    extra: dict[str, Any] = field(default_factory=dict)

    def use_head(self, task: int) -> nn.Module:
        """Put task `task`'s (0-based) head on the model, for evaluating it with the current body; returns it."""
        set_head(self.model, self.heads[task])
        return self.model


def head_name(model: nn.Module) -> str:
    """The timm classifier's module name (pretrained_cfg 'classifier'); ModelError when there is none."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not isinstance(name, str) or not hasattr(model, "reset_classifier") or name not in dict(model.named_modules()):
        raise ModelError("a task-incremental chain needs a timm classifier it can reset (pretrained_cfg "
                         "'classifier' and reset_classifier); load the model with zoo.load")
    return name


def head_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the classifier's parameters."""
    head = dict(model.named_modules())[head_name(model)]
    return {k: v.detach().clone() for k, v in head.named_parameters(recurse=False)}


def set_head(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Replace the classifier by one with `state`'s parameters (its class count follows the weight's rows)."""
    name = head_name(model)
    classes = int(state["weight"].shape[0])
    if getattr(model, "num_classes", None) != classes:
        reset_classifier(model, classes)
    head = dict(model.named_modules())[name]
    with torch.no_grad():
        for k, v in state.items():
            getattr(head, k).copy_(v)


def is_head(name: str, head: str) -> bool:
    """Whether the parameter or module `name` belongs to the classifier `head`."""
    return name == head or name.startswith(head + ".")


def head_lambda_of(prior: Prior, head_lambda: float | None) -> float:
    """The new classifiers' N(0, λ⁻¹I) precision: `head_lambda`, else the prior's reference λ."""
    lam = float(head_lambda if head_lambda is not None else prior.meta.get("lambda", float("nan")))
    if not (math.isfinite(lam) and lam > 0):
        raise ConfigError(f"the new heads' λ must be positive and finite, got {lam} (pass head_lambda=)")
    return lam


def save_task(posterior: Posterior, out: str | Path, task: int) -> tuple[str, int]:
    """Save task `task`'s (1-based) posterior as the repository out/task-<task>; (its path, its size in bytes)."""
    path = posterior.save(str(Path(out) / f"task-{task}"))
    return str(path), sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def learn_chain(
    model: nn.Module,
    prior: Prior,
    tasks: Sequence[Task],
    *,
    approximation: str = DEFAULT_APPROXIMATION,
    out: str | Path | None = None,
    epochs: int = 30,
    lr: float = 3e-3,
    head_lambda: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    dense_limit: int = DENSE_LIMIT,
    prior_ref: str | None = None,
    prior_strength: float | str = 1.0,
    after_task: Callable[[int, nn.Module, list[dict[str, Tensor]]], None] | None = None,
    **finetune_options: Any,
) -> ChainResult:
    """Learn `tasks` in order from `prior` (the model's weights are its mean); see the module docstring.

    `approximation` ("ekfac", "eigenbasis" or "kronecker") decomposes every carried precision with more than the
    exactly representable terms; each task's posterior lives in its prior's basis. With `out`, task t's posterior
    is saved as the repository out/task-<t> (1-based), which `zoo.load` reads and `zoo serve` serves. Each new
    head gets N(0, λ⁻¹I), λ = `head_lambda` or the prior's. `generator` seeds the heads' initialisation and every
    fine-tune. Other keyword arguments go to `zoo.finetune` (defaults: CHAIN_FINETUNE).

    `prior_strength` is κ₀ in Λ_0 = κ₀·P, fixed in advance: 1 (default) is the learned prior as built, its width
    checked upstream; "evidence" lets the first task's Laplace evidence choose it (`strength="marglik"` for that
    task only), which serves that task and weakens the memory of the whole chain (measured: benchmarks/continual.py).
    Later tasks use the recursion as it is.
    `after_task(t, model, heads)` is called after each task (0-based t; the heads so far), e.g. to evaluate.
    """
    if approximation not in APPROXIMATIONS:
        raise ConfigError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("a chain needs at least one task; pass a list of zoo.continual.Task")
    for task in tasks:
        if not isinstance(task, Task):
            raise ConfigError(f"tasks must be zoo.continual.Task objects, got {type(task).__name__}")
        if isinstance(task.num_classes, bool) or not isinstance(task.num_classes, int) or task.num_classes < 2:
            raise ConfigError(f"task {task.name!r}: a classifier needs at least 2 classes, got {task.num_classes!r}")
    head = head_name(model)
    lam = head_lambda_of(prior, head_lambda)
    options = dict(CHAIN_FINETUNE, **finetune_options)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    evidence = prior_strength == "evidence"
    if not evidence and not (isinstance(prior_strength, int | float) and not isinstance(prior_strength, bool)
                             and math.isfinite(prior_strength) and prior_strength > 0):
        raise ConfigError(f"prior_strength must be 'evidence' or a positive number, got {prior_strength!r}")

    carried: dict[str, Layer] = {n: layer for n, layer in prior.layers.items() if not is_head(n, head)}
    if not evidence:
        carried = dict(Prior(prior.mean, carried, {}).scaled(dict.fromkeys(carried, float(prior_strength))).layers)
    exact: dict[str, KronPrecision] = {n: layer.precision for n, layer in carried.items()
                                       if isinstance(layer, KronLayer)}
    meta = dict(prior.meta)
    posteriors: list[Posterior] = []
    heads: list[dict[str, Tensor]] = []
    records: list[TaskRecord] = []
    for t, task in enumerate(tqdm(tasks, desc="continual tasks", unit="task", disable=not progress)):
        t0 = time.perf_counter()
        mean = {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}
        base = Prior(mean, carried, meta, model=model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen).item()))
            task_prior = replace_head(model, base, task.num_classes, lam)
        first = dict(options, strength="marglik") if evidence and t == 0 else options
        post = finetune(model, task_prior, task.loader, epochs=epochs, lr=lr, generator=gen, progress=progress,
                        dataset=task.name, prior_ref=prior_ref, **first)
        # Λ_0 = κ₀·P from here on, κ₀ the body strength the first task's evidence chose
        kappa = float(post.meta["strength"]["kappa"]["body"]) if evidence and t == 0 else 1.0
        carried, exact, layers, errors = _next_prior(post, carried, exact, head, approximation, dense_limit, kappa)
        seconds = time.perf_counter() - t0
        saved_meta = dict(post.meta)
        if task.classes is not None:
            saved_meta["classes"] = list(task.classes)
        kron_terms = max((len(layer.precision.terms) for layer in layers.values() if isinstance(layer, KronLayer)),
                         default=0)
        kappa0 = (kappa if evidence else float(prior_strength)) if t == 0 else 1.0
        record = TaskRecord(task=t + 1, name=task.name, seconds=seconds, kron_terms=kron_terms,
                            prior_strength=kappa0, **errors)
        saved_meta["continual"] = {
            "method": "chain", "task": t + 1, "tasks": [x.name for x in tasks[: t + 1]],
            "approximation": approximation, "record": record.to_dict(), "note": CHAIN_NOTE,
        }
        saved = Posterior(post.mean, layers, saved_meta, model=model, prior=task_prior)
        if out is not None:
            record.path, record.artifact_bytes = save_task(saved, out, t + 1)
        posteriors.append(saved)
        heads.append(head_state(model))
        records.append(record)
        meta = dict(saved.meta)
        if after_task is not None:
            after_task(t, model, heads)
            set_head(model, heads[-1])
    final = Prior({k: v.detach().cpu().clone() for k, v in model.named_parameters() if not is_head(k, head)},
                  carried, meta, model=model)
    return ChainResult(model, posteriors, heads, records, final)


CHAIN_NOTE = ("body precision carried to the next task: Λ_0 + F_1 + … + F_t, the latest F exact and the older "
              "terms folded into their nearest Kronecker product (damping exact); errors against the exact sum")


def _next_prior(
    post: Posterior, carried: dict[str, Layer], exact: dict[str, KronPrecision], head: str, approximation: str,
    dense_limit: int, kappa: float,
) -> tuple[dict[str, Layer], dict[str, KronPrecision], dict[str, Layer], dict[str, Any]]:
    """(the next prior's body layers κ·Λ + F, the exact sums, the posterior's layers to save, the error record)."""
    factors = _diag_factors(post)
    new_carried: dict[str, Layer] = {}
    new_exact: dict[str, KronPrecision] = {}
    layers: dict[str, Layer] = {}
    prior_errors, post_errors, kls = [], [], []
    all_exact = True
    for name, layer in post.layers.items():
        if is_head(name, head):
            layers[name] = layer
            continue
        old = carried[name]
        if isinstance(layer, KronLayer) and isinstance(old, KronLayer):
            q = layer.precision
            term = leading_term(q)  # F_t: zoo.finetune keeps it, unscaled, as Q's first term (zoo.kron.extend)
            keep, full = add_term(_times(old.precision, kappa), term, approximation=approximation,
                                  exact=_times(exact[name], kappa))
            new_carried[name] = KronLayer(keep, old.params)
            new_exact[name] = full
            # Q as zoo.finetune made it, b·F_t + a·(the carried prior) in the prior's basis (docs/method.md §4),
            # against the same with the exact history
            layers[name] = KronLayer(q, layer.params)
            target = term * q.scales[0].item() + exact[name] * _prior_multiplier(q, old.precision)
            prior_errors.append(relative_error(keep, full))
            post_errors.append(relative_error(q, target))
            all_exact &= keep.is_exact and len(full.terms) == len(keep.terms)
            if keep.dim <= dense_limit:
                kls.append(dense_kl(keep, full))
        elif isinstance(layer, DiagLayer) and isinstance(old, DiagLayer):
            b, a = factors[name]
            fisher = {}
            for k, value in layer.precision.items():
                f = (value.double() - a * old.precision[k].double()) / b
                if f.min().item() < -1e-6 * max(f.abs().max().item(), 1.0):
                    raise NumericalError(f"layer {name!r}.{k}: the posterior's diagonal is below its prior's; "
                                         "the fit's scales do not match its record, report this")
                fisher[k] = f.clamp_min(0.0)  # rounding-level negatives of a sum of squares
            new_carried[name] = DiagLayer({k: kappa * old.precision[k].double() + fisher[k] for k in fisher})
            layers[name] = layer
        else:
            raise ModelError(f"layer {name!r}: the posterior holds a {type(layer).__name__} where the chain's prior "
                             f"holds a {type(old).__name__}; the chain needs one architecture throughout")
    record = {
        "exact": all_exact,
        "prior_error": _summary(prior_errors),
        "posterior_error": _summary(post_errors),
        "kl_error": float(sum(kls)) if kls else None,
    }
    return new_carried, new_exact, layers, record


def _times(p: KronPrecision, c: float) -> KronPrecision:
    return p if c == 1.0 else p * c


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"max": 0.0, "mean": 0.0}
    return {"max": max(values), "mean": sum(values) / len(values)}


def _prior_multiplier(q: KronPrecision, prior: KronPrecision) -> float:
    """a in Q = b·F + a·prior: zoo.finetune rescales the prior part by one number (κ/τ, or α/τ)."""
    if prior.damping > 0:
        return q.damping / prior.damping
    return q.scales[1].item() / prior.scales[0].item()


def _diag_factors(post: Posterior) -> dict[str, tuple[float, float]]:
    """(b, a) per layer with Q = b·F_new + a·P, from the fit's record (zoo.posterior_fit.PosteriorFit's scales)."""
    meta = post.meta
    strength = meta.get("strength") or {}
    kappas = strength.get("kappa") if strength.get("method") == "marglik" else None
    sharpen = float((meta.get("sharpen") or {}).get("chosen") or 1.0)
    groups = strength_groups(post.prior) if post.prior is not None else {}
    out = {}
    for label, s in (meta.get("scales") or {}).items():
        name = "" if label == "<root>" else label
        kappa = float(kappas[groups.get(name, "body")]) if kappas else 1.0
        out[name] = (sharpen * s["beta"] / s["tau"], kappa * s["alpha"] / s["tau"])
    for name, layer in post.layers.items():  # the record must agree with the Kronecker layers' own scales
        if isinstance(layer, KronLayer) and name in out and groups.get(name) == "body":
            b = out[name][0]
            if not math.isclose(b, layer.precision.scales[0].item(), rel_tol=1e-6):
                raise NumericalError(f"layer {name!r}: the recorded scales give β/τ = {b:.6g} but the posterior "
                                     f"holds {layer.precision.scales[0].item():.6g}; report this")
    return out
