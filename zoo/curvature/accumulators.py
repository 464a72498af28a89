"""Per-module accumulators of the K-FAC pass: hooks that turn activations and output gradients into sums.

Each accumulator owns plain tensors (its ``state``), so the pass can checkpoint and all-reduce them
without knowing what they mean, and builds its block at the end. Output gradients are caught with a
tensor hook registered on the module's output inside a forward hook: such a hook sees the gradient of
the output as it was produced, even when a later in-place op (timm's ``ReLU(inplace=True)``, residual
``x += shortcut``) overwrites that tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from zoo.curvature.blocks import Block, DiagonalBlock, KronBlock
from zoo.curvature.conv_factor import ConvFactorPlan, conv_factor_plan
from zoo.curvature.linalg import conv_mean_patches, conv_patch_rows, conv_patches, symmetrize_lower, syrk_lower_


@dataclass
class PassContext:
    """Shared switches of one pass: hooks act only while ``active`` (not during probes or re-evaluations)."""

    dtype: torch.dtype
    device: torch.device
    approx: str = "expand"
    active: bool = False


class Accumulator:
    """Base: hooks in, sums out. Subclasses fill ``state`` with the tensors that must be summed over data."""

    def __init__(self, name: str, module: nn.Module, ctx: PassContext) -> None:
        self.name = name
        self.module = module
        self.ctx = ctx
        self.state: dict[str, Tensor] = {}

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.ctx.dtype, device=self.ctx.device)

    def install(self) -> list[RemovableHandle]:
        """Register this accumulator's hooks on its module; return the handles."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Called after each backward pass (one per class for the exact Fisher)."""

    def end_batch(self) -> None:
        """Drop what was captured for the current batch."""

    def watch(self) -> list[Tensor]:
        """Small state tensors that a NaN gradient would reach; checked after every batch."""
        return list(self.state.values())

    def blocks(self) -> dict[str, Block]:
        """The finished blocks, keyed by owning module name."""
        raise NotImplementedError


class KronAccumulator(Accumulator):
    """Linear / Conv2d (groups == 1): A = Σ ā āᵀ over data and positions, G = Σ g gᵀ / (rows of A).

    ``rows`` counts the rows that entered A: B·positions per call (K-FAC-expand) or B per call
    (K-FAC-reduce). Dividing G by it gives G = (1/N) Σ g gᵀ for a Linear on vectors and
    G = (1/(N·T)) Σ_{n,t} g gᵀ for a conv with T output positions, so kron(A, G) approximates the
    Fisher of the summed NLL (docs/method.md §2).

    For K-FAC-expand convs with a fixed input size, A is not accumulated directly: the state holds the
    shifted-window cell sums of :mod:`zoo.curvature.conv_factor` (~3× fewer multiply-adds than the unfolded
    triangle for 3×3 stride-1), and :meth:`blocks` assembles the same A from them.
    """

    def __init__(self, name: str, module: nn.Module, ctx: PassContext, input_hw: tuple[int, int] | None = None) -> None:
        """``input_hw``: the spatial size of a conv's input, when known and fixed; enables the cell plan."""
        super().__init__(name, module, ctx)
        weight = module.weight
        self.is_conv = isinstance(module, nn.Conv2d)
        self.has_bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
        self.d_in = weight[0].numel()
        d_a = self.d_in + int(self.has_bias)
        # K-FAC-expand convs on CPU: A from shifted-window cell sums (conv_factor.py), assembled at the end.
        # Not on GPUs: there the pass is kernel-launch bound and the one big unfold GEMM was faster (H100).
        use_cells = ctx.approx == "expand" and ctx.device.type == "cpu"
        self.plan: ConvFactorPlan | None = conv_factor_plan(module, input_hw, self.has_bias) if use_cells else None
        a_state = (self.plan.state(ctx.dtype, ctx.device) if self.plan is not None
                   else {"A": self._zeros(d_a, d_a)})
        self.state = {**a_state, "G": self._zeros(weight.shape[0], weight.shape[0]),
                      "rows": torch.zeros((), dtype=torch.float64, device=ctx.device)}

    def install(self) -> list[RemovableHandle]:
        return [self.module.register_forward_pre_hook(self._pre), self.module.register_forward_hook(self._post)]

    def _input_rows(self, x: Tensor) -> Tensor:
        reduce = self.ctx.approx == "reduce"
        if self.is_conv:
            return conv_mean_patches(x, self.module) if reduce else conv_patch_rows(x, self.module)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x.mean(dim=1) if reduce else x.reshape(-1, x.shape[-1])

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.ctx.active:
            return
        if self.plan is not None:
            x = args[0].detach().to(self.ctx.dtype)
            self.plan.accumulate(x, self.state)
            self.state["rows"] += x.shape[0] * self.plan.positions
            return
        rows = self._input_rows(args[0].detach()).to(self.ctx.dtype)
        a, d = self.state["A"], self.d_in
        syrk_lower_(a[:d, :d], rows)
        if self.has_bias:
            a[d, :d] += rows.sum(dim=0)
            a[d, d] += rows.shape[0]
        self.state["rows"] += rows.shape[0]

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if self.ctx.active and out.requires_grad:
            out.register_hook(self._grad)

    def _grad(self, g: Tensor) -> None:
        g = g.detach()
        out = g.shape[1] if self.is_conv else g.shape[-1]
        if self.is_conv and self.ctx.approx == "expand" and _per_image_gram(g):
            g = g.to(self.ctx.dtype).flatten(2)
            for gb in g:  # G += g_b g_bᵀ on the NCHW layout: no transposing copy of the gradient
                self.state["G"].addmm_(gb, gb.T)
            return
        if self.is_conv:
            g = g.sum(dim=(2, 3)) if self.ctx.approx == "reduce" else g.permute(0, 2, 3, 1).reshape(-1, out)
        else:
            g = g.reshape(g.shape[0], -1, out)
            g = g.sum(dim=1) if self.ctx.approx == "reduce" else g.reshape(-1, out)
        syrk_lower_(self.state["G"], g.to(self.ctx.dtype))

    def watch(self) -> list[Tensor]:
        return [self.state["G"]]

    def blocks(self) -> dict[str, Block]:
        rows = self.state["rows"].clamp_min(1).to(self.ctx.dtype)
        a = (self.plan.assemble(self.state, self.state["rows"]) if self.plan is not None
             else symmetrize_lower(self.state["A"]))
        return {self.name: KronBlock(A=a,
                                     G=symmetrize_lower(self.state["G"]) / rows)}


def _per_image_gram(g: Tensor) -> bool:
    """Whether a conv output gradient's G is cheaper as one GEMM per image than after a channels-last copy:
    NCHW-contiguous, many positions per image (the copy costs ~3× the GEMM there), few channels; CPU only
    (on a GPU one launch per image costs more than the copy)."""
    return (g.device.type == "cpu" and g.ndim == 4 and g.is_contiguous() and g.shape[2] * g.shape[3] >= 64
            and g.shape[1] <= 256)


class _PerExample(Accumulator):
    """Diagonal Fisher Σ_n (∂ℓ_n/∂θ)² from per-example gradients, summed over calls before squaring."""

    def __init__(self, name: str, module: nn.Module, ctx: PassContext, params: dict[str, tuple[str, str]]) -> None:
        super().__init__(name, module, ctx)
        # params: name relative to `module` -> (owner module name, local parameter name)
        self.params = params
        self.state = {rel: self._zeros(*module.get_parameter(rel).shape) for rel in params}
        self.pending: dict[str, Tensor] = {}

    def _add(self, rel: str, per_example: Tensor) -> None:
        per_example = per_example.to(self.ctx.dtype)
        prev = self.pending.get(rel)
        self.pending[rel] = per_example if prev is None else prev + per_example

    def after_backward(self) -> None:
        for rel, pe in self.pending.items():
            self.state[rel] += pe.square().sum(dim=0)
        self.pending.clear()

    def blocks(self) -> dict[str, Block]:
        out: dict[str, Block] = {}
        for rel, (owner, local) in self.params.items():
            block = out.setdefault(owner, DiagonalBlock())
            assert isinstance(block, DiagonalBlock)
            block.diagonal[local] = self.state[rel].clone()
        return out


def _layer_norm_2d(x: Tensor, m: nn.Module) -> Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), m.normalized_shape, None, None, m.eps).permute(0, 3, 1, 2)


def _batch_norm(x: Tensor, m: nn.Module) -> Tensor:
    use_batch = m.training or m.running_mean is None
    return F.batch_norm(x, m.running_mean, m.running_var, None, None, use_batch, 0.0, m.eps)


Normalizer = Callable[[Tensor, nn.Module], Tensor]
NORMALIZERS: dict[type, tuple[Normalizer, bool]] = {
    # type -> (x ↦ x̂ without affine, whether the affine acts on dim 1 (True) or on the trailing dims)
    nn.BatchNorm1d: (_batch_norm, True),
    nn.BatchNorm2d: (_batch_norm, True),
    nn.BatchNorm3d: (_batch_norm, True),
    nn.GroupNorm: (lambda x, m: F.group_norm(x, m.num_groups, None, None, m.eps), True),
    nn.LayerNorm: (lambda x, m: F.layer_norm(x, m.normalized_shape, None, None, m.eps), False),
}
try:  # timm's norms share nn.LayerNorm's fields but not always its layout
    from timm.layers.norm import LayerNorm as _TimmLayerNorm
    from timm.layers.norm import LayerNorm2d as _TimmLayerNorm2d

    NORMALIZERS[_TimmLayerNorm] = NORMALIZERS[nn.LayerNorm]
    NORMALIZERS[_TimmLayerNorm2d] = (_layer_norm_2d, True)
except ImportError:  # pragma: no cover - timm is a dependency, but zoo.curvature does not need it
    pass


class NormAccumulator(_PerExample):
    """Known normalisation layers: per-example grads Σ g·x̂ (weight) and Σ g (bias) from one hook each."""

    def __init__(self, name: str, module: nn.Module, ctx: PassContext, params: dict[str, tuple[str, str]]) -> None:
        super().__init__(name, module, ctx, params)
        self.normalize, self.channel_dim1 = NORMALIZERS[type(module)]

    def install(self) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(self._post)]

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if not (self.ctx.active and out.requires_grad):
            return
        with torch.no_grad():
            xhat = self.normalize(args[0].detach(), module).to(self.ctx.dtype)
        out.register_hook(lambda g: self._grad(g, xhat))

    def _reduce(self, t: Tensor) -> Tensor:
        if self.channel_dim1:
            return t.sum(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t
        k = len(self.module.normalized_shape)
        return t.sum(dim=tuple(range(1, t.ndim - k))) if t.ndim > k + 1 else t

    def _grad(self, g: Tensor, xhat: Tensor) -> None:
        g = g.detach().to(self.ctx.dtype)
        if "weight" in self.params:
            self._add("weight", self._reduce(g * xhat))
        if "bias" in self.params:
            self._add("bias", self._reduce(g))


class GroupedConvAccumulator(_PerExample):
    """Depthwise / grouped Conv2d: exact diagonal from per-example weight gradients (per-group bmm)."""

    def __init__(self, name: str, module: nn.Module, ctx: PassContext, params: dict[str, tuple[str, str]]) -> None:
        super().__init__(name, module, ctx, params)
        self.inputs: list[Tensor] = []

    def install(self) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(self._post)]

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if not (self.ctx.active and out.requires_grad):
            return
        x = args[0].detach().clone()
        out.register_hook(lambda g: self._grad(g, x))

    def _grad(self, g: Tensor, x: Tensor) -> None:
        conv = self.module
        b, groups = g.shape[0], conv.groups
        g = g.detach().reshape(b, groups, conv.out_channels // groups, -1).to(self.ctx.dtype)
        if "weight" in self.params:
            u = conv_patches(x, conv).to(self.ctx.dtype)
            u = u.reshape(b, groups, -1, u.shape[-1])
            pe = torch.matmul(g, u.transpose(2, 3))  # (B, groups, out/groups, in/groups·kh·kw)
            self._add("weight", pe.reshape(b, *conv.weight.shape))
        if "bias" in self.params:
            self._add("bias", g.sum(dim=3).reshape(b, -1))


class FunctionalAccumulator(_PerExample):
    """Any other module: exact per-example gradients by re-running its own forward under torch.func.

    The module's inputs and output gradients are captured during the pass; after each backward,
    ``vmap(vjp(module.forward))`` over the examples gives the per-example gradients of the listed
    parameters (its own, or, for the root, parameters that no module's forward uses on its own).
    """

    def __init__(self, name: str, module: nn.Module, ctx: PassContext, params: dict[str, tuple[str, str]]) -> None:
        super().__init__(name, module, ctx, params)
        self.calls: list[_Call] = []

    def install(self) -> list[RemovableHandle]:
        return [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                self.module.register_forward_hook(self._post)]

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.ctx.active:
            return
        args = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
        self.calls.append(_Call(args=args, kwargs=dict(kwargs)))

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if not (self.ctx.active and isinstance(out, Tensor) and out.requires_grad):
            return
        call = self.calls[-1]
        out.register_hook(lambda g: call.grads.append(g.detach()))

    def after_backward(self) -> None:
        was_active, self.ctx.active = self.ctx.active, False
        try:
            for call in self.calls:
                for g in call.grads:
                    for rel, pe in self._per_example(call, g).items():
                        self._add(rel, pe)
                call.grads.clear()
        finally:
            self.ctx.active = was_active
        super().after_backward()

    def _per_example(self, call: _Call, g: Tensor) -> dict[str, Tensor]:
        module, b = self.module, g.shape[0]
        wrt = {rel: module.get_parameter(rel).detach() for rel in self.params}
        batched = [i for i, a in enumerate(call.args) if isinstance(a, Tensor) and a.ndim and a.shape[0] == b]

        def one(xs: list[Tensor], gn: Tensor) -> dict[str, Tensor]:
            def f(p: dict[str, Tensor]) -> Tensor:
                args = list(call.args)
                for i, x in zip(batched, xs, strict=True):
                    args[i] = x.unsqueeze(0)
                return torch.func.functional_call(module, p, tuple(args), call.kwargs).squeeze(0)

            _, pull = torch.func.vjp(f, wrt)
            return pull(gn)[0]

        with torch.enable_grad():
            return torch.func.vmap(one)([call.args[i] for i in batched], g)

    def end_batch(self) -> None:
        self.calls.clear()


@dataclass
class _Call:
    """One forward call of a module: its inputs, and the output gradients of each backward pass."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grads: list[Tensor] = field(default_factory=list)
