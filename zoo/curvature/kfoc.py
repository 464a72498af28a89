"""K-FOC: the nearest Kronecker product, in Frobenius norm, to each layer's per-example-gradient Fisher.

For a Linear or Conv2d (groups == 1) layer with per-example gradients DW_n (out × in, the bias as the last
input column, a conv's kernel flattened to out × in·kh·kw and summed over positions),

    F = Σ_n vec(DW_n) vec(DW_n)ᵀ,     K-FOC = argmin_{A, G} ‖F − A ⊗ G‖_F      (docs/method.md §1 convention).

Derivation (Van Loan–Pitsianis). Under the column-stacking vec, F[(i,a),(j,b)] = Σ_n DW_n[a,i] DW_n[b,j] and
(A ⊗ G)[(i,a),(j,b)] = A[i,j] G[a,b]. Rearranging F into R(F)[(i,j),(a,b)] = F[(i,a),(j,b)] (in² × out²) turns
A ⊗ G into the rank-one vec(A) vec(G)ᵀ, so the optimum is σ·(top left singular vector)·(top right)ᵀ of R(F).
R(F) never has to be formed: as linear maps on matrices,

    R(F) G  = Σ_n DW_nᵀ G DW_n   (in × in),        R(F)ᵀ A = Σ_n DW_n A DW_nᵀ   (out × out),

and the power iteration on R(F) R(F)ᵀ is  A ← R(F) Ĝ,  Ĝ ← normalise(R(F)ᵀ Â).  Both maps send symmetric PSD
matrices to symmetric PSD matrices, so starting from Ĝ₀ = I every iterate, and the limit, is symmetric PSD
(no sign to fix). The iteration stops after `iterations` G-updates, or once both unit-norm iterates move by
at most `tol` in Frobenius norm; it converges like (σ₂/σ₁)^(2k).

Output and scale split: with Â the last unit-norm A-iterate, G* = R(F)ᵀ Â is the optimal G for that Â, and
the product Â ⊗ G* is returned split evenly: ‖A‖_F = ‖G‖_F = √σ, σ = ‖G*‖_F. As in K-FAC, kron(A, G)
approximates the Fisher of the *summed* NLL (it grows with N); only the product is meaningful.

Per-example gradients come from forward hooks (the layer input, unfolded for convs) and tensor hooks on the
layer output (its gradient), one batched backward per batch (C of them for fisher="exact"): DW_n = Σ_t g_t āᵀ_t.
Per batch they are kept as whichever is smaller, the dense (B, out, in) tensor or the factors
(B, T, out), (B, T, in) (for a Linear without positions, T = 1: a rank-one outer product).

Memory and cost. The first pass over the data computes R(F) I and, while their total stays within
`max_cache_bytes`, keeps those per-batch gradients (on the model's device), after which the iteration runs in
memory at Σ_n min(out·in, T·(out + in)) numbers per layer. Above the budget the cache is dropped and the
iteration streams: each half-step is one more forward/backward pass over the data, so up to 2·iterations
passes, with memory of one batch; the loader must then be re-iterable and yield the same data each pass
(checked by a fingerprint), and the MC labels are re-drawn identically from one seed. Each application of
R(F) or R(F)ᵀ costs, per example, out·in·(out + in) (dense) or T·(out² + in²) + T²·(out + in) (factors);
fisher="exact" multiplies the backward passes and the examples by C.

Other modules that own parameters (normalisation layers, grouped/depthwise convs, tokens, layer scales...)
get a DiagonalBlock: the diagonal of the same Fisher, Σ_n (per-example gradient)², computed with
torch.func.vmap over the whole model for those parameters only, once, in the first pass (about one more
per-example forward and backward; ops without a batching rule, e.g. CPU flash attention, fall back to a
loop). A Linear/Conv2d whose forward never runs (its weight is used functionally, e.g.
nn.MultiheadAttention.out_proj) is treated the same way.

Assumptions: the model maps a batch (B, ...) to logits (B, C) and, in eval mode, treats the examples of a
batch independently (true of BatchNorm with running statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo.curvature.blocks import Block, DiagonalBlock, KronBlock
from zoo.errors import ConfigError, DataError, ModelError, NumericalError

FisherType = Literal["mc", "exact", "empirical"]

EXACT_MAX_CLASSES = 100
"""fisher="exact" needs one backward pass per class; above this many classes use fisher="mc"."""

_FISHERS = ("mc", "exact", "empirical")


class _Grads:
    """Per-example gradients DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ of one layer for one group of examples.

    Kept dense, (B, out, in), or as the factors g (B, T, out) and a (B, T, in), whichever is smaller, so
    that both memory and the cost of applying R(F) stay at min(out·in, T·(out + in)) per example.
    """

    def __init__(self, g: Tensor, a: Tensor) -> None:
        out, inn, positions = g.shape[-1], a.shape[-1], g.shape[1]
        self.dense: Tensor | None = None
        self.g: Tensor | None = None
        self.a: Tensor | None = None
        if out * inn <= positions * (out + inn):
            self.dense = torch.einsum("bto,bti->boi", g, a)
        else:
            self.g, self.a = g, a
        self.device = g.device

    def nbytes(self) -> int:
        parts = [self.dense] if self.dense is not None else [self.g, self.a]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def apply_r(self, gmat: Tensor) -> Tensor:
        """Σ_n DW_nᵀ G DW_n (in × in), in float64."""
        gmat = gmat.to(self.device)
        if self.dense is not None:
            d = self.dense
            return torch.einsum("boi,boj->ij", d, gmat.to(d.dtype) @ d).double()
        assert self.g is not None and self.a is not None
        m = self.g @ gmat.to(self.g.dtype) @ self.g.transpose(1, 2)
        return torch.einsum("bti,btj->ij", self.a, m @ self.a).double()

    def apply_rt(self, amat: Tensor) -> Tensor:
        """Σ_n DW_n A DW_nᵀ (out × out), in float64."""
        amat = amat.to(self.device)
        if self.dense is not None:
            d = self.dense
            return torch.einsum("boi,bpi->op", d @ amat.to(d.dtype), d).double()
        assert self.g is not None and self.a is not None
        m = self.a @ amat.to(self.a.dtype) @ self.a.transpose(1, 2)
        return torch.einsum("bto,btp->op", self.g, m @ self.g).double()


def _symmetric(m: Tensor) -> Tensor:
    return (m + m.T) / 2


class _KronLayer:
    """One Linear / Conv2d: captures its inputs and output gradients, and holds its power-iteration state."""

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, tol: float) -> None:
        self.name = name
        self.tol = tol
        self.module = module
        self.is_conv = isinstance(module, nn.Conv2d)
        self.has_bias = module.bias is not None
        self.out = module.weight.shape[0]
        self.inn = module.weight[0].numel() + int(self.has_bias)
        self.fired = False
        self.recording = False
        self.inputs: list[Tensor] = []
        self.out_shapes: list[torch.Size] = []
        self.out_grads: dict[int, Tensor] = {}
        self._patches: dict[int, Tensor] = {}
        # power iteration
        self.cache: list[_Grads] = []
        self.acc: Tensor | None = None
        self.a_hat: Tensor | None = None
        self.a_prev: Tensor | None = None
        device = module.weight.device
        self.g_hat = torch.eye(self.out, dtype=torch.float64, device=device) / math.sqrt(self.out)
        self.g_raw: Tensor | None = None
        self.converged = False

    # -- capture -------------------------------------------------------------------------------------
    def forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.recording:
            return
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise ModelError(f"layer {self.name!r} was called without a tensor input/output; K-FOC needs both")
        index = len(self.inputs)
        self.inputs.append(args[0].detach())
        self.out_shapes.append(output.shape)
        self.fired = True
        if output.requires_grad:
            output.register_hook(partial(self._grad_hook, index))

    def _grad_hook(self, index: int, grad: Tensor) -> None:
        self.out_grads[index] = grad.detach()

    def start_batch(self, recording: bool) -> None:
        self.inputs, self.out_shapes, self.out_grads, self._patches = [], [], {}, {}
        self.recording = recording

    def per_example(self, batch: int) -> _Grads | None:
        """The per-example gradients of the last backward pass, or None if none reached this layer."""
        gs, as_ = [], []
        for index, grad in sorted(self.out_grads.items()):
            if index not in self._patches:
                self._patches[index] = self._input_rows(index, batch)
            as_.append(self._patches[index])
            gs.append(self._grad_rows(grad, batch))
        if not gs:
            return None
        g, a = torch.cat(gs, 1), torch.cat(as_, 1)
        if not (torch.isfinite(g).all() and torch.isfinite(a).all()):
            raise NumericalError(
                f"layer {self.name!r}: NaN or infinity in its inputs or output gradients; check the model's "
                "weights and the data (e.g. for overflow, or a log of zero)"
            )
        return _Grads(g, a)

    def _check_batch(self, t: Tensor, batch: int, what: str) -> None:
        if t.dim() < 2 or t.shape[0] != batch:
            raise ModelError(
                f"layer {self.name!r}: its {what} has shape {tuple(t.shape)}, not batch-first with batch size "
                f"{batch}; K-FOC needs layers that see the batch as their leading dimension"
            )

    def _input_rows(self, index: int, batch: int) -> Tensor:
        """ā_{n,t}: (B, T, in), the (unfolded) layer input with a 1 appended when the layer has a bias."""
        x = self.inputs[index]
        self._check_batch(x, batch, "input")
        if self.is_conv:
            if x.dim() != 4:
                raise ModelError(f"layer {self.name!r}: Conv2d input must be (B, C, H, W), got {tuple(x.shape)}")
            rows = self._unfold(x, self.out_shapes[index]).transpose(1, 2)
        else:
            rows = x.reshape(batch, -1, x.shape[-1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], -1)
        return rows

    def _grad_rows(self, grad: Tensor, batch: int) -> Tensor:
        """g_{n,t}: (B, T, out), the gradient of the output per example and position."""
        self._check_batch(grad, batch, "output")
        if self.is_conv:
            return grad.reshape(batch, self.out, -1).transpose(1, 2)
        return grad.reshape(batch, -1, self.out)

    def _unfold(self, x: Tensor, out_shape: torch.Size) -> Tensor:
        m = self.module
        assert isinstance(m, nn.Conv2d)
        padding: Any = m.padding
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        positions = out_shape[-2] * out_shape[-1]
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        if cols.shape[-1] != positions:
            # Conv2d subclasses that pad inside forward, such as timm's Conv2dSame (TensorFlow "same").
            cols = F.unfold(_pad_same(x, m), m.kernel_size, dilation=m.dilation, stride=m.stride)
        if cols.shape[-1] != positions:
            raise ModelError(
                f"layer {self.name!r} ({type(m).__name__}) computes its output in a way K-FOC cannot unfold; "
                "use nn.Conv2d or a subclass that only adds 'same' padding"
            )
        return cols

    # -- power iteration -----------------------------------------------------------------------------
    def add(self, term: Tensor) -> None:
        self.acc = term if self.acc is None else self.acc + term

    def set_a(self) -> None:
        """Â ← normalise(R(F) Ĝ), from the accumulated sum."""
        acc, self.acc = self.acc, None
        self.a_prev = self.a_hat
        norm = 0.0 if acc is None else float(torch.linalg.matrix_norm(acc))
        if norm == 0.0:  # no gradient ever reached the layer: F = 0, and so is its best approximation
            self.a_hat = self.g_hat.new_zeros(self.inn, self.inn)
            self.g_raw = self.g_hat.new_zeros(self.out, self.out)
            self.converged = True
            return
        assert acc is not None
        self.a_hat = _symmetric(acc) / norm

    def set_g(self) -> None:
        """G* ← R(F)ᵀ Â, Ĝ ← normalise(G*), and the convergence test on the unit-norm iterates."""
        acc, self.acc = self.acc, None
        assert acc is not None and self.a_hat is not None
        self.g_raw = _symmetric(acc)
        norm = float(torch.linalg.matrix_norm(self.g_raw))
        g_prev, self.g_hat = self.g_hat, self.g_raw / norm
        if self.a_prev is not None:
            change = max(
                float(torch.linalg.matrix_norm(self.a_hat - self.a_prev)),
                float(torch.linalg.matrix_norm(self.g_hat - g_prev)),
            )
            self.converged = change <= self.tol

    def block(self) -> KronBlock:
        """A ⊗ G = Â ⊗ G*, split so that ‖A‖_F = ‖G‖_F."""
        assert self.a_hat is not None and self.g_raw is not None
        dtype = self.module.weight.dtype
        scale = math.sqrt(float(torch.linalg.matrix_norm(self.g_raw)))
        if scale == 0.0:
            return KronBlock(A=torch.zeros_like(self.a_hat, dtype=dtype), G=self.g_raw.to(dtype))
        return KronBlock(A=(self.a_hat * scale).to(dtype), G=(self.g_raw / scale).to(dtype))


def _pad_same(x: Tensor, m: nn.Conv2d) -> Tensor:
    """TensorFlow-style "same" padding (the extra pixel at the end), as timm's Conv2dSame applies it."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], m.kernel_size, m.stride, m.dilation, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, [*pads[1], *pads[0]])


def _unpack(batch: Any, fisher: str) -> tuple[Tensor, Tensor | None]:
    """(x, y) from a loader batch; y may be missing unless the labels are used."""
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, list | tuple) and len(batch) >= 1:
        x, y = batch[0], (batch[1] if len(batch) >= 2 else None)
    else:
        raise DataError(f"the loader must yield (x, y) pairs of tensors, got {type(batch).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise DataError("the loader's x must be a non-empty, batch-first tensor (B, ...)")
    if y is None:
        if fisher == "empirical":
            raise DataError('fisher="empirical" needs labels: make the loader yield (x, y) pairs')
        return x, None
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise DataError(f"the loader's y must be class indices of shape ({x.shape[0]},), got {shape}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"the loader's y must hold integer class indices, got dtype {y.dtype}")
    return x, y


Step = Callable[[_KronLayer, _Grads], None]


class _Pass:
    """Runs passes over the data: batched forward with hooks, backward(s) for the chosen labels, diagonals."""

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        fisher: str,
        layers: list[_KronLayer],
        diag_names: dict[str, list[str]],
        seed: int | None,
        progress: bool,
    ) -> None:
        self.model, self.loader, self.fisher = model, loader, fisher
        self.layers = layers  # pruned in place of layers whose forward never runs
        self.diag_names = diag_names  # gains those layers' parameters
        self.seed, self.progress = seed, progress
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.diag: dict[str, Tensor] = {}
        self._probed = False

    def run(self, step: Step, todo: list[_KronLayer], *, diagonal: bool, desc: str) -> list[Tensor]:
        """One pass: feed the per-batch gradients of each layer in `todo` to `step`; return a fingerprint."""
        generator = None
        if self.seed is not None:  # the same MC labels on every pass
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.seed)
        total = len(self.loader) if hasattr(self.loader, "__len__") else None  # type: ignore[arg-type]
        fingerprint: list[Tensor] = []
        for batch in tqdm(self.loader, total=total, desc=desc, unit="batch", disable=not self.progress, leave=False):
            x, y = _unpack(batch, self.fisher)
            x = x.to(self.device)
            if x.dtype.is_floating_point:
                x = x.to(self.dtype)
            fingerprint.append(torch.stack([x.new_tensor(x.shape[0], dtype=torch.float64), x.double().sum()]))
            self._batch(x, y, step, todo, diagonal, generator)
        return fingerprint

    def _forward(self, x: Tensor, todo: list[_KronLayer]) -> Tensor:
        for layer in self.layers:
            layer.start_batch(recording=layer in todo)
        try:
            with torch.enable_grad():
                logits = self.model(x)
        except (RuntimeError, TypeError, IndexError) as err:
            raise DataError(
                f"the model failed on a batch of shape {tuple(x.shape)} ({err}); make the loader yield inputs "
                "the model accepts"
            ) from err
        finally:
            for layer in self.layers:
                layer.recording = False
        batch = x.shape[0]
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ModelError(f"the model must map a batch of {batch} inputs to logits ({batch}, C); got {shape}")
        if not torch.isfinite(logits).all():
            raise NumericalError("the model's logits contain NaN or infinity; check the weights and the inputs")
        if self.fisher == "exact" and logits.shape[1] > EXACT_MAX_CLASSES:
            raise ConfigError(
                f'fisher="exact" takes one backward pass per class and is limited to {EXACT_MAX_CLASSES} '
                f'classes; this model has {logits.shape[1]}: use fisher="mc"'
            )
        if not self._probed:  # a Linear/Conv2d whose forward never runs gets a diagonal block instead
            self._probed = True
            for layer in [layer for layer in self.layers if not layer.inputs]:
                self.layers.remove(layer)
                todo.remove(layer)
                self.diag_names[layer.name] = [local for local, _ in layer.module.named_parameters(recurse=False)]
        return logits

    def _labels(self, logits: Tensor, y: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """The labels whose NLL gradients define F; None for "exact" (all classes)."""
        if self.fisher == "mc":
            return torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=generator)[:, 0]
        if self.fisher == "exact":
            return None
        assert y is not None
        y = y.to(self.device)
        classes = logits.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise DataError(f"the loader's labels must lie in [0, {classes}), got [{int(y.min())}, {int(y.max())}]")
        return y

    def _batch(
        self,
        x: Tensor,
        y: Tensor | None,
        step: Step,
        todo: list[_KronLayer],
        diagonal: bool,
        generator: torch.Generator | None,
    ) -> None:
        batch = x.shape[0]
        logits = self._forward(x, todo)
        labels = self._labels(logits, y, generator)
        probs = torch.softmax(logits.detach(), -1)
        fired = [layer for layer in todo if layer.inputs]
        if fired:
            if labels is not None:
                targets = [(torch.ones_like(probs[:, 0]), labels)]
            else:  # exact: pseudo-examples (n, c), gradients scaled by √p(c | x_n)
                classes = torch.arange(probs.shape[1], device=probs.device).expand(batch, -1)
                targets = [(probs[:, c].sqrt(), classes[:, c]) for c in range(probs.shape[1])]
            weights = [layer.module.weight for layer in fired]
            for i, (weight, target) in enumerate(targets):
                for layer in fired:
                    layer.out_grads = {}
                loss = (weight * F.cross_entropy(logits, target, reduction="none")).sum()
                torch.autograd.grad(loss, weights, retain_graph=i + 1 < len(targets), allow_unused=True)
                for layer in fired:
                    grads = layer.per_example(batch)
                    if grads is not None:
                        step(layer, grads)
        for layer in self.layers:
            layer.start_batch(recording=False)
        if diagonal and self.diag_names:
            self._diagonal(x, labels, probs)

    def _diagonal(self, x: Tensor, labels: Tensor | None, probs: Tensor) -> None:
        """Σ_n (per-example gradient)² of the non-Kronecker parameters, by torch.func.vmap over the model."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        full = [f"{m}.{local}" if m else local for m, locals_ in self.diag_names.items() for local in locals_]
        params = {name: named[name].detach() for name in full}

        def logits_of(p: dict[str, Tensor], xn: Tensor) -> Tensor:
            return torch.func.functional_call(self.model, p, (xn.unsqueeze(0),))[0]

        def log_probs(p: dict[str, Tensor], xn: Tensor) -> Tensor:
            return torch.log_softmax(logits_of(p, xn), -1)

        def nll(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
            return F.cross_entropy(logits_of(p, xn).unsqueeze(0), yn.unsqueeze(0), reduction="sum")

        try:
            if labels is None:  # exact: Σ_c p_c (∂ log p_c)²
                jac = torch.func.vmap(torch.func.jacrev(log_probs), in_dims=(None, 0))(params, x)
                terms = {k: torch.einsum("bc,bc...->...", probs.to(j.dtype), j.square()) for k, j in jac.items()}
            else:
                grads = torch.func.vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, x, labels)
                terms = {k: g.square().sum(0) for k, g in grads.items()}
        except (RuntimeError, NotImplementedError) as err:
            raise ModelError(
                "K-FOC takes the diagonal Fisher of parameters outside Linear/Conv2d layers with "
                f"torch.func.vmap, which failed on this model ({err}); use zoo.curvature.kfac for those blocks"
            ) from err
        for k, t in terms.items():
            if not torch.isfinite(t).all():
                raise NumericalError(f"parameter {k!r}: NaN or infinity in its per-example gradients")
            self.diag[k] = t.double() if k not in self.diag else self.diag[k] + t.double()


def _kron_eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def kfoc(
    model: nn.Module,
    loader: Iterable[Any],
    fisher: FisherType = "mc",
    *,
    iterations: int = 20,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
    progress: bool = True,
    max_cache_bytes: int = 1 << 30,
) -> dict[str, Block]:
    """K-FOC curvature: per Linear/Conv2d, the Frobenius-nearest A ⊗ G to Σ_n vec(DW_n) vec(DW_n)ᵀ.

    Returns {module name (as in model.named_modules(), "" for the root): block}, one block per module that
    owns parameters: a KronBlock (A in × in with the bias as the last row/column, G out × out, symmetric PSD,
    ‖A‖_F = ‖G‖_F) for Linear and Conv2d with groups == 1, a DiagonalBlock (Σ_n squared per-example
    gradients) for every other module. `fisher` picks the labels: "mc" samples one per example from the
    model's predictive (seeded from `generator`), "empirical" uses the loader's, "exact" sums over classes
    weighted by the predictive (at most EXACT_MAX_CLASSES). `iterations` bounds the power iteration (G-updates),
    `tol` stops it earlier. Per-example gradients are cached in memory up to `max_cache_bytes`; beyond that
    every half-step re-reads the data (module docstring). The model is left exactly as it was.
    """
    if fisher not in _FISHERS:
        raise ConfigError(f"unknown fisher {fisher!r}: use one of {', '.join(map(repr, _FISHERS))}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations must be a positive integer, got {iterations!r}")
    if not tol >= 0:
        raise ConfigError(f"tol must be a non-negative number, got {tol!r}")
    if max_cache_bytes < 0:
        raise ConfigError(f"max_cache_bytes must be non-negative, got {max_cache_bytes!r}")
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise ModelError("the model has no parameters, so it has no curvature: pass a model with parameters")

    owners = [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    layers = [_KronLayer(name, m, tol) for name, m in owners if _kron_eligible(m)]  # type: ignore[arg-type]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if fisher == "mc" else None

    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    handles = [layer.module.register_forward_hook(layer.forward_hook) for layer in layers]
    try:
        model.eval()
        for layer in layers:  # so that each layer's output carries a gradient
            layer.module.weight.requires_grad_(True)
        return _run(model, loader, fisher, owners, layers, seed, iterations, progress, max_cache_bytes)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in training.items():
            m.training = mode
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


def _run(
    model: nn.Module,
    loader: Iterable[Any],
    fisher: str,
    owners: list[tuple[str, nn.Module]],
    layers: list[_KronLayer],
    seed: int | None,
    iterations: int,
    progress: bool,
    max_cache_bytes: int,
) -> dict[str, Block]:
    """The passes and the power iteration; kfoc() owns validation and restoring the model."""
    kron_names = {layer.name for layer in layers}
    diag_names = {
        name: [local for local, _ in m.named_parameters(recurse=False)] for name, m in owners if name not in kron_names
    }
    runner = _Pass(model, loader, fisher, layers, diag_names, seed, progress)

    # Pass 1: R(F) Ĝ₀ (Ĝ₀ ∝ I), the diagonal blocks, and the per-example gradients while they fit.
    cache_bytes = 0

    def first(layer: _KronLayer, grads: _Grads) -> None:
        nonlocal cache_bytes
        layer.add(grads.apply_r(layer.g_hat))
        if cache_bytes >= 0:
            cache_bytes += grads.nbytes()
            if cache_bytes <= max_cache_bytes:
                layer.cache.append(grads)
            else:  # over budget: stream instead
                cache_bytes = -1
                for each in layers:
                    each.cache = []

    fingerprint = runner.run(first, list(layers), diagonal=True, desc="K-FOC pass 1")
    if not fingerprint:
        raise DataError("the loader yielded no data: K-FOC needs at least one batch")
    for layer in layers:
        layer.set_a()

    def half_g(layer: _KronLayer, grads: _Grads) -> None:
        layer.add(grads.apply_rt(layer.a_hat))  # type: ignore[arg-type]

    def half_a(layer: _KronLayer, grads: _Grads) -> None:
        layer.add(grads.apply_r(layer.g_hat))

    streaming = cache_bytes < 0
    if streaming and iter(loader) is loader:  # type: ignore[comparison-overlap]
        raise DataError(
            "the per-example gradients exceed max_cache_bytes, so K-FOC must read the data several times, "
            "but the loader is a one-shot iterator: pass a DataLoader or a list, or raise max_cache_bytes"
        )
    passes = 1
    for k in range(iterations):
        for step, update in ((half_g, _KronLayer.set_g), (half_a, _KronLayer.set_a)):
            todo = [layer for layer in layers if not layer.converged]
            if not todo or (update is _KronLayer.set_a and k + 1 == iterations):
                break
            if streaming:
                passes += 1
                again = runner.run(step, todo, diagonal=False, desc=f"K-FOC pass {passes}")
                _same_data(fingerprint, again)
            else:
                for layer in todo:
                    for grads in layer.cache:
                        step(layer, grads)
            for layer in todo:
                update(layer)

    blocks: dict[str, Block] = {}
    by_name = {layer.name: layer for layer in layers}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, _ in owners:
        if name in by_name:
            blocks[name] = by_name[name].block()
            continue
        diagonal = {}
        for local in diag_names[name]:
            full = f"{name}.{local}" if name else local
            value = runner.diag.get(full, torch.zeros_like(params[full], dtype=torch.float64))
            diagonal[local] = value.to(device=params[full].device, dtype=params[full].dtype)
        blocks[name] = DiagonalBlock(diagonal=diagonal)
    return blocks


def _same_data(first: list[Tensor], again: list[Tensor]) -> None:
    if len(first) != len(again) or not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
        raise DataError(
            "the loader yielded different data on a later pass; with per-example gradients above "
            "max_cache_bytes K-FOC reads the data several times, so turn off shuffling and random "
            "augmentation, or raise max_cache_bytes"
        )
