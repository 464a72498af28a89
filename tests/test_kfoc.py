"""Tests of zoo.curvature.kfoc against dense float64 references built by brute force with torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.curvature.blocks import DiagonalBlock, KronBlock
from zoo.curvature.kfoc import EXACT_MAX_CLASSES, kfoc
from zoo.errors import ConfigError, DataError, ModelError, NumericalError, ZooError

TIGHT = {"iterations": 2000, "tol": 1e-14, "progress": False}


class Tokens(nn.Module):
    """A Linear over positions (B, T, C), as in a transformer, plus a LayerNorm and a root-level parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.pos = nn.Parameter(torch.randn(2, 6) * 0.1)
        self.head = nn.Linear(12, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.embed(x) + self.pos))
        return self.head(h.flatten(1))


class SameConv(nn.Conv2d):
    """Pads TensorFlow-style ("same", the odd pixel at the end) inside forward, like timm's Conv2dSame."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return F.conv2d(F.pad(x, [*pads[1], *pads[0]]), self.weight, self.bias, self.stride)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model


def padded() -> nn.Module:
    """Reflect 'same' padding, in-forward 'same' padding, and a depthwise conv (a diagonal block)."""
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
        nn.Conv2d(3, 3, 3, padding=1, groups=3),
        nn.Tanh(),
        SameConv(3, 4, 2, stride=2),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).double()


def tokens() -> nn.Module:
    torch.manual_seed(2)
    return Tokens().double()


def data(shape: tuple[int, ...], n: int, seed: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


CASES = {"mlp": (mlp, (4,)), "cnn": (cnn, (2, 4, 4)), "padded": (padded, (2, 5, 5)), "tokens": (tokens, (2, 4))}


# -- brute-force references (float64) -------------------------------------------------------------------


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        logits = torch.func.functional_call(model, p, (xn.unsqueeze(0),))
        return F.cross_entropy(logits, yn.unsqueeze(0), reduction="sum")

    model.eval()
    return torch.func.vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, x, y)


def weight_matrices(grads: dict[str, Tensor], name: str, module: nn.Module) -> Tensor:
    """DW_n: (N, out, in [+1]), the kernel flattened and the bias as the last column."""
    w = grads[f"{name}.weight"]
    dw = w.reshape(w.shape[0], w.shape[1], -1)
    if module.bias is not None:
        dw = torch.cat([dw, grads[f"{name}.bias"].unsqueeze(-1)], -1)
    return dw


def dense_fisher(dws: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Σ_n w_n vec(DW_n) vec(DW_n)ᵀ with vec stacking columns (W.T.reshape(-1))."""
    total = None
    for dw, weight in dws:
        vecs = dw.transpose(1, 2).reshape(dw.shape[0], -1)
        term = vecs.T @ (weight.unsqueeze(1) * vecs)
        total = term if total is None else total + term
    assert total is not None
    return total


def nearest_kron(fisher: Tensor, inn: int, out: int) -> Tensor:
    """Van Loan–Pitsianis: the top singular pair of the rearranged F."""
    r = fisher.reshape(inn, out, inn, out).permute(0, 2, 1, 3).reshape(inn * inn, out * out)
    u, s, vh = torch.linalg.svd(r)
    return torch.kron(s[0] * u[:, 0].reshape(inn, inn), vh[0].reshape(out, out))


def kron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    ]


def references(model: nn.Module, x: Tensor, y: Tensor, fisher: str) -> dict[str, Tensor]:
    """Dense F per Linear/Conv2d for the empirical labels, or the exact Fisher (all classes, weighted)."""
    if fisher == "empirical":
        runs = [(per_example_grads(model, x, y), torch.ones(len(x), dtype=torch.float64))]
    else:
        with torch.no_grad():
            probs = torch.softmax(model.eval()(x), -1)
        runs = [(per_example_grads(model, x, torch.full_like(y, c)), probs[:, c]) for c in range(probs.shape[1])]
    return {name: dense_fisher([(weight_matrices(g, name, m), w) for g, w in runs]) for name, m in kron_layers(model)}


def kfac_style(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """(Σ_n,t ā āᵀ) ⊗ ((1/N) Σ_n,t g gᵀ) per layer, from the layers' inputs and output gradients."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        inputs[name], outputs[name] = args[0], out

    layers = kron_layers(model)
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o)) for n, m in layers]
    model.eval()
    loss = F.cross_entropy(model(x), y, reduction="sum")
    for h in handles:
        h.remove()
    names = [n for n, _ in layers]
    gouts = torch.autograd.grad(loss, [outputs[n] for n in names])
    result = {}
    n_data = len(x)
    for (name, m), gout in zip(layers, gouts, strict=True):
        a = inputs[name]
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(a, m.kernel_size, padding=m.padding, stride=m.stride)
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            g = gout.flatten(2).transpose(1, 2).reshape(-1, gout.shape[1])
        else:
            a = a.reshape(-1, a.shape[-1])
            g = gout.reshape(-1, gout.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        result[name] = torch.kron(a.T @ a, g.T @ g / n_data)
    return result


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- correctness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_svd_nearest_kronecker_and_beats_kfac(case: str) -> None:
    make, shape = CASES[case]
    model = make()
    x, y = data(shape, 7)
    blocks = kfoc(model, batches(x, y, 3), "empirical", **TIGHT)
    dense = references(model, x, y, "empirical")
    kfac_products = kfac_style(model, x, y) if case != "padded" else {}  # the test's unfold pads with zeros only
    for name, m in kron_layers(model):
        block = blocks[name]
        assert isinstance(block, KronBlock)
        inn, out = block.A.shape[0], block.G.shape[0]
        assert out == m.weight.shape[0] and inn == m.weight[0].numel() + (m.bias is not None)
        product = torch.kron(block.A, block.G)
        assert rel(product, nearest_kron(dense[name], inn, out)) <= 1e-6, name
        if kfac_products:
            assert (product - dense[name]).norm() <= (kfac_products[name] - dense[name]).norm() + 1e-12, name
        # symmetric PSD factors, balanced scale split
        for f in (block.A, block.G):
            assert torch.equal(f, f.T)
            assert float(torch.linalg.eigvalsh(f).min()) >= -1e-10 * float(f.norm())
        assert torch.isclose(block.A.norm(), block.G.norm(), rtol=1e-10)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_exact_fisher_matches_dense_reference(case: str) -> None:
    make, shape = CASES[case]
    model = make()
    x, y = data(shape, 5)
    blocks = kfoc(model, batches(x, y, 2), "exact", **TIGHT)
    dense = references(model, x, y, "exact")
    for name, _ in kron_layers(model):
        block = blocks[name]
        assert isinstance(block, KronBlock)
        target = nearest_kron(dense[name], block.A.shape[0], block.G.shape[0])
        assert rel(torch.kron(block.A, block.G), target) <= 1e-6, name


def test_one_datum_is_exact() -> None:
    model = mlp()
    x, y = data((4,), 1)
    blocks = kfoc(model, [(x, y)], "empirical", **TIGHT)
    dense = references(model, x, y, "empirical")
    for name, _ in kron_layers(model):
        block = blocks[name]
        assert isinstance(block, KronBlock)
        assert rel(torch.kron(block.A, block.G), dense[name]) <= 1e-10


def test_mc_one_datum_uses_a_sampled_label() -> None:
    model = mlp()
    x, _ = data((4,), 1)
    for seed in range(3):
        blocks = kfoc(model, [x], "mc", generator=torch.Generator().manual_seed(seed), **TIGHT)
        block = blocks["2"]
        assert isinstance(block, KronBlock)
        product = torch.kron(block.A, block.G)
        errors = [rel(product, references(model, x, torch.tensor([c]), "empirical")["2"]) for c in range(3)]
        assert min(errors) <= 1e-10


def test_diagonal_blocks_match_per_example_gradients() -> None:
    cases = (
        (cnn, (2, 4, 4), "empirical"),
        (padded, (2, 5, 5), "empirical"),
        (tokens, (2, 4), "empirical"),
        (cnn, (2, 4, 4), "exact"),
    )
    for make, shape, fisher in cases:
        model = make().eval()
        x, y = data(shape, 6)
        blocks = kfoc(model, batches(x, y, 4), fisher, iterations=2, progress=False)
        if fisher == "empirical":
            runs = [(per_example_grads(model, x, y), torch.ones(len(x), dtype=torch.float64))]
        else:
            with torch.no_grad():
                probs = torch.softmax(model(x), -1)
            runs = [(per_example_grads(model, x, torch.full_like(y, c)), probs[:, c]) for c in range(3)]
        kron_names = {n for n, _ in kron_layers(model)}
        owners = {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
        assert set(blocks) == owners
        for name in owners - kron_names:
            block = blocks[name]
            assert isinstance(block, DiagonalBlock)
            for local, value in block.diagonal.items():
                full = f"{name}.{local}" if name else local
                expected = sum(torch.einsum("n,n...->...", w, g[full].square()) for g, w in runs)
                assert value.shape == dict(model.named_parameters())[full].shape
                torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-14)


def test_streaming_equals_cached() -> None:
    model = cnn()
    x, y = data((2, 4, 4), 7)
    loader = batches(x, y, 3)
    cached = kfoc(model, loader, "empirical", iterations=5, tol=0.0, progress=False)
    streamed = kfoc(model, loader, "empirical", iterations=5, tol=0.0, progress=False, max_cache_bytes=0)
    for name, block in cached.items():
        other = streamed[name]
        if isinstance(block, KronBlock):
            assert isinstance(other, KronBlock)
            torch.testing.assert_close(other.A, block.A, rtol=1e-12, atol=0)
            torch.testing.assert_close(other.G, block.G, rtol=1e-12, atol=0)


def test_streaming_rejects_changing_or_one_shot_loaders() -> None:
    model = mlp()
    x, y = data((4,), 6)

    class Shuffled:
        def __init__(self) -> None:
            self.calls = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            self.calls += 1
            perm = torch.randperm(6, generator=torch.Generator().manual_seed(self.calls))
            return iter(batches(x[perm], y[perm], 4))

    with pytest.raises(DataError, match="different data"):
        kfoc(model, Shuffled(), "empirical", progress=False, max_cache_bytes=0)
    with pytest.raises(DataError, match="one-shot"):
        kfoc(model, iter(batches(x, y, 4)), "empirical", progress=False, max_cache_bytes=0)


def test_seeds_reproduce() -> None:
    model = cnn()
    x, y = data((2, 4, 4), 6)
    loader = batches(x, y, 4)

    def run(seed: int) -> dict:
        return kfoc(model, loader, "mc", generator=torch.Generator().manual_seed(seed), progress=False)

    a, b, c = run(0), run(0), run(1)
    for name, block in a.items():
        if isinstance(block, KronBlock):
            assert torch.equal(block.A, b[name].A) and torch.equal(block.G, b[name].G)
    assert any(isinstance(blk, KronBlock) and not torch.equal(blk.A, c[n].A) for n, blk in a.items())


def test_model_left_unchanged() -> None:
    model = cnn()
    model.train()
    model[0].eval()  # a mixed mode must come back as it was
    model[3].weight.requires_grad_(False)
    model[5].weight.grad = torch.full_like(model[5].weight, 0.5)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    x, y = data((2, 4, 4), 5)
    for fisher in ("mc", "exact", "empirical"):
        kfoc(model, batches(x, y, 2), fisher, iterations=3, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # including BatchNorm running stats
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks


def test_float32_model_and_frozen_weights_work() -> None:
    model = mlp().float().requires_grad_(False)
    x, y = data((4,), 5)
    blocks = kfoc(model, batches(x.float(), y, 5), "mc", progress=False)
    block = blocks["0"]
    assert isinstance(block, KronBlock) and block.A.dtype == torch.float32
    assert torch.isfinite(block.A).all() and torch.isfinite(block.G).all()


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_input_raises_zoo_errors() -> None:
    model = mlp()
    x, y = data((4,), 4)
    good = batches(x, y, 2)
    with pytest.raises(ConfigError, match="unknown fisher"):
        kfoc(model, good, "fancy", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        kfoc(model, good, iterations=0, progress=False)
    with pytest.raises(ModelError, match="no parameters"):
        kfoc(nn.Sequential(nn.Tanh()), good, progress=False)
    with pytest.raises(DataError, match="no data"):
        kfoc(model, [], progress=False)
    with pytest.raises(DataError, match="y must be"):
        kfoc(model, [(x, y[:3])], progress=False)
    with pytest.raises(DataError, match="labels"):
        kfoc(model, [x], "empirical", progress=False)
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        kfoc(model, [(x, y + 5)], "empirical", progress=False)
    with pytest.raises(ZooError):
        kfoc(model, [(x[:, :3], y)], progress=False)  # wrong feature size
    with pytest.raises(DataError):
        kfoc(model, [("not a tensor", y)], progress=False)
    with pytest.raises(ModelError, match="logits"):
        kfoc(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)).double(), good, progress=False)
    broken = mlp()
    with torch.no_grad():
        broken[2].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        kfoc(broken, good, progress=False)
    wide = nn.Linear(4, EXACT_MAX_CLASSES + 1).double()
    with pytest.raises(ConfigError, match="mc"):
        kfoc(wide, good, "exact", progress=False)
    # a failed call leaves no hooks behind
    for m in (model, broken, wide):
        assert all(not sub._forward_hooks for sub in m.modules())
