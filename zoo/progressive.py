"""Bayesian progressive networks: one new column per task, laterals from frozen columns (docs/method.md §8).

Task t adds column t, a copy of the prior's network without its classifier, initialised at the learned prior's
mean and fine-tuned with `zoo.finetune` against the learned prior (a new classifier gets N(0, λ⁻¹I)). The task's
classifier reads the concatenated features of columns 0…t: those of the earlier columns are its lateral
connections. Earlier columns and classifiers are frozen (no gradient, always in eval mode), so earlier tasks'
outputs cannot change: no forgetting, by construction, at the price of one column of parameters per task.

Laterals enter at the classifier only (every timm architecture exposes its pooled features; deeper laterals
would need per-architecture surgery), and the earlier columns act at their posterior means.

The network is registered with timm as `zoo_progressive`, its columns' architecture and class counts in timm's
`model_args`, so a saved repository is a plain timm checkpoint that `zoo.load` and `zoo serve` open; it
answers for its last task.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo.errors import ConfigError, ModelError
from zoo.layers import IsoLayer, Layer
from zoo.posterior import Posterior
from zoo.prior import Prior

ARCHITECTURE = "zoo_progressive"


class ProgressiveNet(nn.Module):
    """Columns of one timm architecture, one classifier per task over the features of its own and earlier columns.

    `forward` answers for the last task; `forward_task(x, k)` for task k (0-based). All but the last column and
    classifier are frozen.
    """

    def __init__(self, base: str, classes: Sequence[int], *, base_args: Mapping[str, Any] | None = None,
                 pretrained_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        counts = [int(c) for c in classes]
        if not counts or any(c < 2 for c in counts):
            raise ConfigError(f"a progressive network needs at least one task of at least 2 classes, got {counts}")
        args = dict(base_args or {})
        self.columns = nn.ModuleList(timm.create_model(base, num_classes=0, **args) for _ in counts)
        width = int(self.columns[0].num_features)
        self.heads = nn.ModuleList(nn.Linear(width * (k + 1), c) for k, c in enumerate(counts))
        for module in [*self.columns[:-1], *self.heads[:-1]]:
            module.requires_grad_(False)
        self.num_classes = counts[-1]
        self.num_features = width * len(counts)
        cfg = dict(pretrained_cfg or self.columns[0].pretrained_cfg)
        first = self.columns[0].pretrained_cfg.get("first_conv")
        cfg.update(architecture=ARCHITECTURE, classifier=f"heads.{len(counts) - 1}", num_classes=counts[-1],
                   first_conv=f"columns.0.{first}" if first else None)
        cfg.pop("hf_hub_id", None)
        self.pretrained_cfg = cfg
        self.default_cfg = cfg
        self._model_args = {"base": base, "classes": counts, "base_args": args}  # timm writes these to config.json

    @property
    def tasks(self) -> int:
        return len(self.heads)

    def forward_task(self, x: Tensor, task: int) -> Tensor:
        """Task `task`'s logits: its classifier on the features of columns 0…task."""
        if not 0 <= task < self.tasks:
            raise ConfigError(f"task must be in 0…{self.tasks - 1}, got {task}")
        features = [self.columns[k](x) for k in range(task + 1)]
        return self.heads[task](torch.cat(features, dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_task(x, self.tasks - 1)

    def train(self, mode: bool = True) -> ProgressiveNet:
        """Frozen columns stay in eval mode, so their normalisation statistics never move."""
        super().train(mode)
        for module in [*self.columns[:-1], *self.heads[:-1]]:
            module.eval()
        return self


@register_model
def zoo_progressive(pretrained: bool = False, *, base: str = "", classes: Sequence[int] = (),
                    base_args: Mapping[str, Any] | None = None, **kwargs: Any) -> ProgressiveNet:
    """timm's entry point: a ProgressiveNet from its `model_args` (as written to config.json)."""
    if pretrained:
        raise ConfigError("zoo_progressive has no pretrained weights; load a saved repository with zoo.load")
    if not base:
        raise ConfigError("zoo_progressive needs base=<timm architecture> and classes=[...] (from config.json)")
    overlay = kwargs.get("pretrained_cfg_overlay") or None
    num_classes = kwargs.get("num_classes")
    if num_classes is not None and classes and int(num_classes) != int(list(classes)[-1]):
        raise ConfigError(f"a progressive network answers for its last task ({list(classes)[-1]} classes); "
                          f"num_classes={num_classes} cannot be changed, drop it")
    return ProgressiveNet(base, classes, base_args=base_args, pretrained_cfg=overlay)


@dataclass
class ColumnRecord:
    """One task of a progressive network: fit time, the parameters it added and the network's size after it."""

    task: int
    name: str
    seconds: float
    column_parameters: int
    total_parameters: int
    path: str | None = None
    artifact_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ProgressiveResult:
    """The network after the last task, each task's posterior, and the growth per task."""

    model: ProgressiveNet
    posteriors: list[Posterior]
    records: list[ColumnRecord]
    extra: dict[str, Any] = field(default_factory=dict)


def learn_progressive(
    model: nn.Module,
    prior: Prior,
    tasks: Sequence[Any],
    *,
    out: str | Path | None = None,
    epochs: int = 30,
    lr: float = 3e-3,
    head_lambda: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    prior_ref: str | None = None,
    **finetune_options: Any,
) -> ProgressiveResult:
    """Learn `tasks` (zoo.continual.Task) with one new column each, from `model` and its learned `prior`.

    With `out`, the network after task t is saved as out/task-<t>. Other keyword arguments go to zoo.finetune
    (defaults: zoo.continual.CHAIN_FINETUNE, for a like-for-like comparison with the chain).
    """
    from zoo.continual import CHAIN_FINETUNE, Task, head_lambda_of, head_name, is_head, save_task
    from zoo.tuning import finetune

    tasks = list(tasks)
    if not tasks:
        raise ConfigError("a progressive network needs at least one task; pass a list of zoo.continual.Task")
    if any(not isinstance(t, Task) for t in tasks):
        raise ConfigError("tasks must be zoo.continual.Task objects")
    head = head_name(model)
    base = str(model.pretrained_cfg.get("architecture") or "")
    if base not in timm.list_models():
        raise ModelError(f"the prior's architecture {base!r} is not a timm model; a column must be one")
    lam = head_lambda_of(prior, head_lambda)
    options = dict(CHAIN_FINETUNE, **finetune_options)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    base_args = {k: v for k, v in dict(getattr(model, "_model_args", {})).items()
                 if k not in ("num_classes", "global_pool", "pretrained_cfg_overlay")}
    body_state = {k: v for k, v in model.state_dict().items() if not is_head(k, head)}
    device = next(model.parameters()).device
    body_layers = {n: prior.layers[n] for n in prior.layers if not is_head(n, head)}
    body_mean = {k: v for k, v in prior.mean.items() if not is_head(k, head)}

    net: ProgressiveNet | None = None
    posteriors: list[Posterior] = []
    records: list[ColumnRecord] = []
    meta = dict(prior.meta)
    for t, task in enumerate(tqdm(tasks, desc="progressive columns", unit="task", disable=not progress)):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen).item()))
            grown = ProgressiveNet(base, [x.num_classes for x in tasks[: t + 1]], base_args=base_args,
                                   pretrained_cfg=cfg)
        if net is not None:
            missing = grown.load_state_dict(net.state_dict(), strict=False).missing_keys
            if any(not k.startswith((f"columns.{t}.", f"heads.{t}.")) for k in missing):
                raise ModelError(f"growing the network lost earlier weights ({missing[:3]}); report this")
        grown.columns[t].load_state_dict(body_state, strict=True)
        grown.to(device)  # where the prior's network runs (timm builds the columns on the CPU)
        grown.eval()
        net = grown
        column_prior = _column_prior(net, t, body_mean, body_layers, meta, lam)
        post = finetune(net, column_prior, task.loader, epochs=epochs, lr=lr, generator=gen, progress=progress,
                        dataset=task.name, prior_ref=prior_ref, **options)
        seconds = time.perf_counter() - t0
        added = sum(p.numel() for p in [*net.columns[t].parameters(), *net.heads[t].parameters()])
        total = sum(p.numel() for p in net.parameters())
        record = ColumnRecord(task=t + 1, name=task.name, seconds=seconds, column_parameters=added,
                              total_parameters=total)
        post.meta["architecture"] = ARCHITECTURE  # the prior's is the columns' (kept in meta["continual"])
        post.meta["continual"] = {"method": "progressive", "base": base, "task": t + 1,
                                  "tasks": [x.name for x in tasks[: t + 1]], "record": record.to_dict(),
                                  "note": PROGRESSIVE_NOTE}
        if task.classes is not None:
            post.meta["classes"] = list(task.classes)
        if out is not None:
            record.path, record.artifact_bytes = save_task(post, out, t + 1)
        posteriors.append(post)
        records.append(record)
    if net is None:  # unreachable: tasks was checked to be non-empty
        raise ConfigError("a progressive network needs at least one task")
    return ProgressiveResult(net, posteriors, records)


PROGRESSIVE_NOTE = ("column t initialised at and regularised by the learned prior; its classifier reads columns "
                    "0…t (laterals from frozen earlier columns, at their means); earlier tasks are untouched")


def _column_prior(net: ProgressiveNet, t: int, mean: Mapping[str, Tensor], layers: Mapping[str, Layer],
                  meta: dict[str, Any], lam: float) -> Prior:
    """The learned prior on column t (its module names prefixed) and N(0, λ⁻¹I) on classifier t."""
    prefix = f"columns.{t}."
    column_mean = {prefix + k: v for k, v in mean.items()}
    column_layers: dict[str, Layer] = {prefix + n if n else prefix[:-1]: layer for n, layer in layers.items()}
    head = net.heads[t]
    column_layers[f"heads.{t}"] = IsoLayer(lam, ("weight", "bias"))
    column_mean[f"heads.{t}.weight"] = torch.zeros_like(head.weight.detach(), device="cpu")
    column_mean[f"heads.{t}.bias"] = torch.zeros_like(head.bias.detach(), device="cpu")
    return Prior(column_mean, column_layers, dict(meta, head="replaced: N(0, λ⁻¹I)"), model=net)
