"""``kfac``: one streaming pass over the data that returns a K-FAC / diagonal Fisher block per module.

Conventions (docs/method.md §2; tested in tests/test_curvature_kfac.py):

- Loss: ℓ_n = NLL of example n, summed over the data (never batch-averaged).
- Linear on vectors: A = Σ_n ā ā^T (ā: input with a 1 appended for the bias), G = (1/N) Σ_n g g^T.
- Conv2d (groups == 1), and Linear on (B, ..., in) tokens, K-FAC-expand (default): the T output positions
  act as extra data. A = Σ_{n,t} ā ā^T (unfolded patches), G = (1/(N·T)) Σ_{n,t} g g^T. Then kron(A, G)
  equals curvlinops' expand K-FAC for a summed loss, and for T = 1 it is the Linear case.
- K-FAC-reduce (``approx="reduce"``, Eschenhagen et al. 2023): ā_n is the mean patch over positions,
  g_n the sum over positions; A = Σ_n ā ā^T, G = (1/N) Σ_n g g^T. Cheaper, a different approximation.
- Every other parameter-owning module: the exact diagonal Σ_n (∂ℓ_n/∂θ)², shaped like each parameter.
  Depthwise / grouped convs are in this group: against the exact Fisher of a small depthwise model the
  diagonal had the smaller error (see tests/test_curvature_kfac.py::test_depthwise_choice).

So kron(A, G) and the diagonals all approximate the Fisher of the summed NLL; they grow with N.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo.curvature.accumulators import Accumulator, PassContext
from zoo.curvature.blocks import Block
from zoo.curvature.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from zoo.curvature.distributed import all_reduce_sum_, rank_and_world
from zoo.curvature.linalg import all_finite
from zoo.curvature.plan import build_accumulators, trainable_owners
from zoo.curvature.targets import FISHER_TYPES, batch_seed, output_grads
from zoo.errors import ConfigError, DataError, ModelError, NumericalError

APPROXIMATIONS = ("expand", "reduce")


class KFACResult(dict[str, Block]):
    """The blocks of a K-FAC pass keyed by module name, plus what the prior fitting needs about the data.

    Attributes: ``n`` (number of data), ``nll_sum`` (summed NLL of the data's own labels at the model's
    weights), ``fisher`` ("mc" | "exact" | "empirical"), ``approx`` ("expand" | "reduce").
    """

    def __init__(self, blocks: dict[str, Block], *, n: int, nll_sum: float, fisher: str, approx: str) -> None:
        super().__init__(blocks)
        self.n = n
        self.nll_sum = nll_sum
        self.fisher = fisher
        self.approx = approx

    def __repr__(self) -> str:
        return f"KFACResult({len(self)} blocks, n={self.n}, fisher={self.fisher!r}, approx={self.approx!r})"


@dataclass
class _Totals:
    """Data-level sums kept next to the factors: examples seen and their summed NLL (float64)."""

    n: Tensor
    nll: Tensor


def kfac(
    model: nn.Module,
    loader: Iterable[Any],
    fisher: str = "mc",
    *,
    approx: str = "expand",
    generator: torch.Generator | None = None,
    max_exact_classes: int = 100,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    shard: bool | None = None,
) -> KFACResult:
    """K-FAC factors of ``model`` on the (x, y) batches of ``loader``, one block per parameter-owning module.

    Args:
        fisher: "mc" (labels sampled from the model, the default), "exact" (expectation over all classes,
            at most ``max_exact_classes``) or "empirical" (the loader's labels).
        approx: "expand" (default) or "reduce" for Conv2d and weight-shared Linear layers.
        generator: seeds the MC labels (one draw from it fixes the pass); None uses seed 0.
        dtype: accumulation dtype of the factors (float32, or float64 for references).
        progress: show a progress bar (images/s, ETA) on rank 0.
        checkpoint_dir, checkpoint_every: write an atomic checkpoint of the partial sums every
            ``checkpoint_every`` batches; ``resume=True`` continues from it (same result when the loader
            yields the same batches in the same order). The checkpoint is deleted on success.
        shard: under torch.distributed, each rank takes every world-th batch (default when a process
            group is initialised); pass False when the loader already shards (DistributedSampler).

    The model runs in eval mode; its modes, hooks, ``.grad`` and ``requires_grad`` are restored and its
    BatchNorm statistics untouched. Factors live on the model's device. See the module docstring for the
    scale convention.
    """
    if fisher not in FISHER_TYPES:
        raise ConfigError(f"unknown fisher={fisher!r}; use one of {', '.join(FISHER_TYPES)}")
    if approx not in APPROXIMATIONS:
        raise ConfigError(f"unknown approx={approx!r}; use one of {', '.join(APPROXIMATIONS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype={dtype} is not supported; use torch.float32 or torch.float64")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every} must be at least 1")
    if not trainable_owners(model):
        raise ModelError("the model has no trainable parameters; nothing to compute curvature for "
                         "(check requires_grad, or pass the model itself rather than a frozen copy)")
    first = next(p for p in model.parameters())
    rank, world = rank_and_world()
    sharded = world > 1 if shard is None else (shard and world > 1)
    base_seed = _base_seed(generator)
    ctx = PassContext(dtype=dtype, device=first.device, approx=approx)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _Pass(model, ctx, fisher, max_exact_classes, base_seed, rank, world, sharded).run(
            loader, progress, checkpoint_dir, checkpoint_every, resume)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _base_seed(generator: torch.Generator | None) -> int:
    if generator is None:
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor) \
            and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    raise DataError(f"the loader yielded a {type(batch).__name__}; kfac needs (x, y) tensor pairs")


class _Pass:
    """The state of one pass: accumulators, totals, position; runs the loop and the bookkeeping."""

    def __init__(self, model: nn.Module, ctx: PassContext, fisher: str, max_exact_classes: int,
                 base_seed: int, rank: int, world: int, sharded: bool) -> None:
        self.model, self.ctx, self.fisher = model, ctx, fisher
        self.max_exact_classes = max_exact_classes
        self.base_seed, self.rank, self.world, self.sharded = base_seed, rank, world, sharded
        self.accs: list[Accumulator] = []
        self.totals = _Totals(n=torch.zeros((), dtype=torch.float64, device=ctx.device),
                              nll=torch.zeros((), dtype=torch.float64, device=ctx.device))
        self.input_shape: tuple[int, ...] | None = None
        self.param_dtype = next(model.parameters()).dtype
        self._print: str | None = None

    # -- setup --------------------------------------------------------------------------------------
    def _setup(self, x: Tensor) -> None:
        self.input_shape = tuple(x.shape[1:])
        self.accs = build_accumulators(self.model, x[:2], self.ctx)

    def _state(self) -> dict[str, Tensor]:
        state = {"totals/n": self.totals.n, "totals/nll": self.totals.nll}
        for i, acc in enumerate(self.accs):
            state.update({f"{i}:{acc.name}/{k}": t for k, t in acc.state.items()})
        return state

    def _fingerprint(self) -> str:
        if self._print is not None:
            return self._print
        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().double().sum().cpu().numpy().tobytes())
        h.update(json.dumps([self.fisher, self.ctx.approx, str(self.ctx.dtype), self.input_shape,
                             self.world, self.sharded, self.base_seed]).encode())
        self._print = h.hexdigest()
        return self._print

    # -- one batch ----------------------------------------------------------------------------------
    def _check(self, x: Tensor, y: Tensor) -> None:
        if x.ndim < 1 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise DataError(f"the loader yielded x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}; "
                            "kfac needs a non-empty batch x (B, ...) and integer labels y (B,)")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"the loader yielded x of shape {tuple(x.shape)} after batches of shape "
                            f"(B, {', '.join(map(str, self.input_shape))}); make every batch the same shape")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")

    def _batch(self, index: int, x: Tensor, y: Tensor) -> None:
        x = x.to(self.ctx.device, self.param_dtype if x.is_floating_point() else x.dtype, non_blocking=True)
        y = y.to(self.ctx.device, non_blocking=True)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True) if x.is_floating_point() else x
            self.ctx.active = True
            try:
                logits = self.model(leaf)
            finally:
                self.ctx.active = False
            classes = logits.shape[1]
            if self.fisher == "exact" and classes > self.max_exact_classes:
                raise ConfigError(f'fisher="exact" needs one backward pass per class and the model has {classes}'
                                  f' classes (limit {self.max_exact_classes}); use fisher="mc" or raise '
                                  "max_exact_classes")
            if int(y.min()) < 0 or int(y.max()) >= classes:
                raise DataError(f"labels must lie in [0, {classes}), got range [{int(y.min())}, {int(y.max())}]")
            if not all_finite(logits):
                raise NumericalError("the model produced NaN/inf logits on a batch; check the inputs and weights")
            wrt = [leaf] if leaf.requires_grad else [p for p in self.model.parameters() if p.requires_grad]
            vectors = output_grads(logits, self.fisher, y, batch_seed(self.base_seed, index))
            for k, v in enumerate(vectors):
                torch.autograd.grad(logits, wrt, v, retain_graph=k + 1 < len(vectors), allow_unused=True)
                for acc in self.accs:
                    acc.after_backward()
        for acc in self.accs:
            acc.end_batch()
        self.totals.n += x.shape[0]
        self.totals.nll += F.cross_entropy(logits.detach().double(), y, reduction="sum")
        for acc in self.accs:
            for t in acc.watch():
                if not all_finite(t):
                    raise NumericalError(f"a NaN/inf gradient reached module {acc.name!r}; check the model's "
                                         "backward (e.g. sqrt or log at 0) and the inputs")

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, loader: Iterable[Any], progress: bool, checkpoint_dir: str | os.PathLike[str] | None,
            checkpoint_every: int, resume: bool) -> KFACResult:
        path = checkpoint_path(checkpoint_dir, self.rank, self.world) if checkpoint_dir is not None else None
        start, restored = 0, None
        if resume and path is not None and path.exists():
            restored = load_checkpoint(path)
            start = int(restored[1]["position"])
        total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
        if total is not None and self.sharded:
            total = -(-total // self.world)
        bar = tqdm(total=total, unit="img", unit_scale=True, desc="K-FAC", disable=not progress or self.rank != 0)
        handles = []
        index = -1
        try:
            for index, batch in enumerate(loader):
                if not self.accs:  # set up on the first batch seen, processed or not, so every rank has a structure
                    x, y = _unpack(batch)
                    self._check(x, y)
                    self._setup(x.to(self.ctx.device, self.param_dtype if x.is_floating_point() else x.dtype))
                    handles = [h for acc in self.accs for h in acc.install()]
                    if restored is not None:
                        self._restore(*restored)
                if index < start:
                    continue
                if not self.sharded or index % self.world == self.rank:
                    x, y = _unpack(batch)
                    self._check(x, y)
                    self._batch(index, x, y)
                    if bar.total is None and hasattr(loader, "__len__"):  # a list / sized iterable: estimate for ETA
                        bar.total = -(-len(loader) // (self.world if self.sharded else 1)) * x.shape[0]
                    bar.update(x.shape[0])
                if path is not None and self.accs and (index + 1) % checkpoint_every == 0:
                    save_checkpoint(path, self._state(), {"position": index + 1, "fingerprint": self._fingerprint(),
                                                          "rank": self.rank, "world": self.world})
        finally:
            for h in handles:
                h.remove()
            for acc in self.accs:
                acc.end_batch()
            bar.close()
        if index < 0:
            raise DataError("the loader yielded no batches; kfac needs at least one (x, y) batch")
        if index + 1 < start:
            raise DataError(f"the checkpoint is at batch {start} but the loader has only {index + 1} batches; "
                            "resume with the same loader, or delete the checkpoint")
        return self._finish(path)

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if meta.get("fingerprint") != self._fingerprint():
            raise ConfigError("the checkpoint was written for another model, data shape or options; "
                              "delete it or pass resume=False")
        state = self._state()
        if set(state) != set(tensors):
            raise ConfigError("the checkpoint's structure does not match this model; delete it or pass resume=False")
        for k, t in state.items():
            t.copy_(tensors[k])

    def _finish(self, path: Any) -> KFACResult:
        state = self._state()
        for t in state.values():
            if not all_finite(t):
                raise NumericalError("the curvature sums contain NaN/inf; check the model's backward and the inputs")
        all_reduce_sum_(list(state.values()))
        found: dict[str, Block] = {}
        for acc in self.accs:
            for name, block in acc.blocks().items():
                if name in found:  # the root's own parameters and orphans routed through it: merge
                    found[name].diagonal.update(block.diagonal)  # type: ignore[union-attr]
                else:
                    found[name] = block
        order = [name for name, _ in self.model.named_modules() if name in found]
        blocks = {name: found[name] for name in order}
        if path is not None and path.exists():
            path.unlink()
        return KFACResult(blocks, n=int(self.totals.n.item()), nll_sum=float(self.totals.nll.item()),
                          fisher=self.fisher, approx=self.ctx.approx)
