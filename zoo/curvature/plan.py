"""Which accumulator handles which parameters: decided from module types and one small probe forward.

The probe runs the model on two examples without gradients and records, per parameter-owning module,
whether its forward ran and returned a tensor. Parameters whose module cannot be handled on its own
(never called, or a non-tensor output) are differentiated through the root module instead, so every
trainable parameter gets a block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zoo.curvature.accumulators import (
    NORMALIZERS,
    Accumulator,
    FunctionalAccumulator,
    GroupedConvAccumulator,
    KronAccumulator,
    NormAccumulator,
    PassContext,
)
from zoo.errors import DataError, ModelError

_STANDARD_FORWARD = {nn.Linear: nn.Linear.forward, nn.Conv2d: nn.Conv2d.forward}


def trainable_owners(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Module name -> its own (non-recursive) trainable parameters, for every module that has some."""
    seen: set[int] = set()
    owners: dict[str, dict[str, nn.Parameter]] = {}
    for name, module in model.named_modules():
        own = {}
        for local, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                own[local] = p
        if own:
            owners[name] = own
    return owners


def _is_standard(module: nn.Module) -> bool:
    """A Linear / Conv2d whose forward is the stock one, so its input is the layer's input."""
    for cls, fwd in _STANDARD_FORWARD.items():
        if isinstance(module, cls):
            return type(module).forward is fwd or type(module).__module__.startswith("timm.layers.linear")
    return False


def _probe(model: nn.Module, x: Tensor, names: list[str],
           sizes: dict[str, set[tuple[int, ...]]] | None = None) -> dict[str, bool]:
    """Run ``model`` on ``x`` and report, per module name, whether its forward ran and returned a tensor.

    ``sizes``, when given, collects the spatial sizes of each Conv2d's input over its calls (a conv's
    input factor plan is made for one fixed size).
    """
    ok = dict.fromkeys(names, True)
    called: set[str] = set()
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            called.add(name)
            if not isinstance(out, Tensor):
                ok[name] = False
            if sizes is not None and isinstance(module, nn.Conv2d) and args and isinstance(args[0], Tensor):
                sizes.setdefault(name, set()).add(tuple(args[0].shape[2:]))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise DataError(
            f"the model could not process a batch of shape {tuple(x.shape)} ({err}); "
            "check that the loader yields preprocessed (x, y) batches of the model's input shape"
        ) from err
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"the model returned {shape}; kfac needs a classifier returning logits (batch, classes)")
    return {n: ok[n] and n in called for n in names}


def build_accumulators(model: nn.Module, probe_x: Tensor, ctx: PassContext) -> list[Accumulator]:
    """One accumulator per parameter-owning module, plus a root fallback for orphaned parameters."""
    owners = trainable_owners(model)
    if not owners:
        raise ModelError("the model has no trainable parameters; nothing to compute curvature for "
                         "(check requires_grad, or pass the model itself rather than a frozen copy)")
    sizes: dict[str, set[tuple[int, ...]]] = {}
    usable = _probe(model, probe_x, list(owners), sizes)
    accs: list[Accumulator] = []
    orphans: dict[str, tuple[str, str]] = {}
    for name, params in owners.items():
        module = model.get_submodule(name)
        mapping = {local: (name, local) for local in params}
        if not usable[name]:
            prefix = f"{name}." if name else ""
            orphans.update({prefix + local: (name, local) for local in params})
        elif _is_standard(module) and getattr(module, "groups", 1) == 1 and "weight" in params \
                and set(params) <= {"weight", "bias"}:
            hw = sizes.get(name, set())
            accs.append(KronAccumulator(name, module, ctx, next(iter(hw)) if len(hw) == 1 else None))
        elif type(module) in NORMALIZERS and set(params) <= {"weight", "bias"}:
            accs.append(NormAccumulator(name, module, ctx, mapping))
        elif _is_standard(module) and isinstance(module, nn.Conv2d) and set(params) <= {"weight", "bias"}:
            accs.append(GroupedConvAccumulator(name, module, ctx, mapping))
        elif name == "":
            orphans.update(mapping)
        else:
            accs.append(FunctionalAccumulator(name, module, ctx, mapping))
    if orphans:
        accs.append(FunctionalAccumulator("", model, ctx, orphans))
    return accs
