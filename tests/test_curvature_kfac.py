"""zoo.curvature.kfac against float64 references: dense Fisher blocks, curvlinops, brute-force per-example grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from curvature_models import batches, mlp, tiny_cnn
from torch import Tensor, nn

from zoo.curvature import DiagonalBlock, KFACResult, KronBlock, kfac

DT = torch.float64


def dense_fisher(model: nn.Module, x: Tensor, names: list[str]) -> Tensor:
    """Exact Fisher Σ_n J_nᵀ (diag p - p pᵀ) J_n of the summed NLL w.r.t. the named parameters (flattened)."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def logits(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, x)
    j = torch.cat([jac[n].reshape(x.shape[0], -1, params[n].numel()) for n in names], dim=2)
    p = model(x).softmax(1).detach()
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", j, h, j).detach()


def kron_in_param_order(block: KronBlock, layer: nn.Module) -> Tensor:
    """kron(A, G) re-indexed from the docs/method.md column-stacking of [W, b] to [W.flatten(), b] order."""
    out, d = layer.weight.shape[0], layer.weight[0].numel()
    dense = torch.kron(block.A, block.G)
    # our index of (i, j) is j·out + i, with j = d for the bias
    ours = [j * out + i for i in range(out) for j in range(d)] + [d * out + i for i in range(out)]
    idx = torch.tensor(ours)
    return dense[idx][:, idx]


def test_one_datum_exact_equals_dense_fisher() -> None:
    """One datum, exact Fisher: K-FAC is exact for Linear layers, kron(A, G) == the dense Fisher block."""
    model = mlp(classes=4).eval()
    x = torch.randn(1, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    blocks = kfac(model, [(x, torch.tensor([1]))], "exact", dtype=DT, progress=False)
    assert isinstance(blocks, KFACResult) and blocks.n == 1 and blocks.fisher == "exact"
    for name in ["0", "2", "4"]:
        layer = model.get_submodule(name)
        want = dense_fisher(model, x, [f"{name}.weight", f"{name}.bias"])
        got = kron_in_param_order(blocks[name], layer)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [mlp, tiny_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_matches_curvlinops_type2(make, approx: str) -> None:
    """Several data, exact Fisher: the same kron(A, G) as curvlinops' K-FAC of the summed cross-entropy."""
    curvlinops = pytest.importorskip("curvlinops")
    model = make(classes=3).eval()
    shape = (5,) if make is mlp else (2, 5, 5)
    data = batches(3, 4, shape, 3, seed=1)
    blocks = kfac(model, data, "exact", approx=approx, dtype=DT, progress=False)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    params = [p for n in layers for p in model.get_submodule(n).parameters()]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(reduction="sum"), params, data, fisher_type="type-2", kfac_approx=approx,
        separate_weight_and_bias=False, check_deterministic=False, num_data=12)
    theirs = op @ torch.eye(sum(p.numel() for p in params), dtype=DT)
    ours = torch.block_diag(*[kron_in_param_order(blocks[n], model.get_submodule(n)) for n in layers])
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


def test_conv_scale_convention() -> None:
    """Conv (expand): A sums patches over data and positions, G = Σ g gᵀ / (N·T). Checked from first principles."""
    model = tiny_cnn().eval()
    (x, y), = batches(1, 5, (2, 5, 5), 3, seed=2)
    blocks = kfac(model, [(x, y)], "empirical", dtype=DT, progress=False)
    conv = model[2]
    seen = {}
    conv.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o))
    logits = model(x)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), seen["out"])
    conv._forward_hooks.clear()
    patches = F.unfold(seen["x"], 3, stride=2).transpose(1, 2).reshape(-1, 3 * 9)
    patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=DT)], 1)
    t = seen["out"].shape[2] * seen["out"].shape[3]
    rows = g.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(blocks["2"].A, patches.T @ patches)
    torch.testing.assert_close(blocks["2"].G, rows.T @ rows / (5 * t))


def test_mc_converges_to_exact() -> None:
    """The MC Fisher's G approaches the exact one as samples grow (A does not depend on the labels)."""
    model = mlp(classes=3).eval()
    data = batches(1, 8, (5,), 3, seed=4)
    exact = kfac(model, data, "exact", dtype=DT, progress=False)

    def error(repeats: int, seed: int) -> float:
        mc = kfac(model, data * repeats, "mc", dtype=DT, progress=False, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(mc["2"].A / repeats, exact["2"].A)
        return max(float((mc[n].G - exact[n].G).norm() / exact[n].G.norm()) for n in ["0", "2", "4"])

    few = sum(error(2, s) for s in range(3)) / 3
    many = error(1500, 0)
    assert many < 0.05
    assert many < few / 5


class _LayerScaleBlock(nn.Module):
    """A container that uses its own parameter directly (like ConvNeXt's layer-scale gamma)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn(self.conv(x))
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x += shortcut  # in place on a norm's output
        return F.relu(x, inplace=True)


class _Mixed(nn.Module):
    """BN + in-place ReLU, depthwise conv, GroupNorm, timm LayerNorm2d / BatchNormAct2d, LayerNorm, a root token."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, LayerNorm2d

        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.block = _LayerScaleBlock(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bnact = BatchNormAct2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln2d = LayerNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.token = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.ln2d(self.gn(self.bnact(self.dw(x))))
        x = x.mean(dim=(2, 3)) + self.token
        return self.head(self.ln(x))


def _randomize_norm_stats(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)
        for p in m.parameters(recurse=False):
            p.data.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def test_diagonal_blocks_match_brute_force() -> None:
    """Every non-Kronecker block equals Σ_n (∂ℓ_n/∂θ)² from one autograd call per example (empirical Fisher)."""
    torch.manual_seed(0)
    model = _Mixed().double()
    _randomize_norm_stats(model, 1)
    model.eval()
    data = batches(2, 3, (3, 6, 6), 3, seed=5)
    blocks = kfac(model, data, "empirical", dtype=DT, progress=False)
    want: dict[str, Tensor] = {}
    for x, y in data:
        for xi, yi in zip(x, y, strict=True):
            loss = F.cross_entropy(model(xi[None]), yi[None], reduction="sum")
            names = [n for n, _ in model.named_parameters()]
            grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
            for n, g in zip(names, grads, strict=True):
                want[n] = want.get(n, 0) + g.square()
    diag_modules = {"bn", "block", "block.bn", "dw", "bnact", "gn", "ln2d", "ln", ""}
    assert {n for n, b in blocks.items() if isinstance(b, DiagonalBlock)} == diag_modules
    assert {n for n, b in blocks.items() if isinstance(b, KronBlock)} == {"stem", "block.conv", "head"}
    for owner in diag_modules:
        for local, value in blocks[owner].diagonal.items():
            full = f"{owner}.{local}" if owner else local
            torch.testing.assert_close(value, want[full], rtol=1e-10, atol=1e-14)


def _per_group_kron_error(model: nn.Module, x: Tensor, dw: nn.Conv2d, exact: Tensor) -> float:
    """Relative Frobenius error of per-channel K-FAC-expand blocks A_c·G_c for a depthwise conv."""
    seen = {}
    handle = dw.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), out=o))
    out = model(x)
    handle.remove()
    n, c = x.shape[0], dw.out_channels
    t = seen["out"].shape[2] * seen["out"].shape[3]
    u = F.unfold(seen["x"], 3, padding=1).reshape(n, c, 9, t)
    u = torch.cat([u, torch.ones(n, c, 1, t, dtype=DT)], 2)
    a = torch.einsum("ncit,ncjt->cij", u, u)
    p = out.softmax(1).detach()
    g2 = torch.zeros(c, dtype=DT)
    for k in range(p.shape[1]):
        v = p[:, k : k + 1].sqrt() * (p - torch.eye(p.shape[1], dtype=DT)[k])
        (g,) = torch.autograd.grad(out, seen["out"], v, retain_graph=True)
        g2 += g.square().sum((0, 2, 3))
    approx = torch.block_diag(*[a[i] * g2[i] / (n * t) for i in range(c)])
    return float((approx - exact).norm() / exact.norm())


@pytest.mark.parametrize("seed", [0, 1])
def test_depthwise_choice(seed: int) -> None:
    """Depthwise convs get the exact diagonal: closer to the exact Fisher than per-channel K-FAC blocks.

    Measured (relative Frobenius error of the depthwise layer's Fisher block, 4 seeds): with global pooling
    after the depthwise conv (the EfficientNet / ConvNeXt pattern) diagonal 0.63–0.80, per-channel
    K-FAC-expand 0.98; with a flatten head, diagonal 0.69–0.82 vs 0.70–0.87. The cross-channel mass that
    both drop is 0.50–0.72 of the norm, so neither is good, and the diagonal is exact where it is nonzero.
    """
    torch.manual_seed(seed)
    c = 6
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4)).double().eval()
    x = torch.randn(16, 3, 6, 6, dtype=DT)
    exact = dense_fisher(model, x, ["2.weight", "2.bias"])
    # reorder the dense block to per-channel [w_c (9), b_c] to match the per-channel blocks
    order = torch.tensor([ch * 9 + k for ch in range(c) for k in range(9)])
    order = torch.stack([torch.cat([order[ch * 9 : ch * 9 + 9], torch.tensor([c * 9 + ch])]) for ch in range(c)])
    order = order.reshape(-1)
    exact = exact[order][:, order]
    block = kfac(model, [(x, torch.zeros(16, dtype=torch.long))], "exact", dtype=DT, progress=False)["2"]
    diag = torch.cat([block.diagonal["weight"].reshape(c, 9), block.diagonal["bias"][:, None]], 1).reshape(-1)
    torch.testing.assert_close(diag, torch.diagonal(exact), rtol=1e-10, atol=1e-14)
    diag_error = float((torch.diag(diag) - exact).norm() / exact.norm())
    assert diag_error < _per_group_kron_error(model, x, model[2], exact)


def test_linear_on_tokens_counts_positions() -> None:
    """A Linear applied to (B, T, d) tokens is K-FAC-expand with T positions, like a conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 2)).double().eval()
    x = torch.randn(6, 5, 3, dtype=DT)
    y = torch.randint(0, 2, (6,))
    blocks = kfac(model, [(x, y)], "empirical", dtype=DT, progress=False)
    seen = {}
    model[0].register_forward_hook(lambda m, a, o: seen.update(out=o))
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), seen["out"])
    model[0]._forward_hooks.clear()
    ones = torch.ones(30, 1, dtype=DT)
    rows = torch.cat([x.reshape(30, 3), ones], 1)
    torch.testing.assert_close(blocks["0"].A, rows.T @ rows)
    torch.testing.assert_close(blocks["0"].G, g.reshape(30, 4).T @ g.reshape(30, 4) / 30)
    assert blocks.nll_sum == pytest.approx(float(F.cross_entropy(model(x), y, reduction="sum")))


def test_frozen_parameters_are_skipped() -> None:
    """requires_grad=False parameters get no block entry; a frozen bias is not folded into A."""
    model = tiny_cnn()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    blocks = kfac(model, batches(1, 2, (2, 5, 5), 3), progress=False)
    assert set(blocks) == {"2", "5"}
    assert blocks["2"].A.shape == (27, 27)
    assert blocks["5"].A.shape == (17, 17)


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2}, {"kernel_size": 1, "stride": 2},
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (2, 1)},
    {"kernel_size": 3, "padding": "same"}, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
])
def test_patch_rows_reproduce_the_conv(kwargs: dict) -> None:
    """The rows that enter A are the conv's real inputs: rows @ Wᵀ + b equals the conv output."""
    from zoo.curvature.linalg import conv_mean_patches, conv_patch_rows

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs).double()
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    rows = conv_patch_rows(x, conv)
    out = conv(x).detach()
    torch.testing.assert_close(rows @ conv.weight.reshape(4, -1).T + conv.bias, out.permute(0, 2, 3, 1).reshape(-1, 4))
    mean = conv_mean_patches(x, conv)
    torch.testing.assert_close(mean, rows.reshape(2, -1, rows.shape[1]).mean(1))


def _unfold_factor(xs: list[Tensor], conv: nn.Conv2d) -> Tensor:
    """Brute-force A = Σ ā āᵀ from F.unfold patches (bias as a trailing 1), the definition in docs/method.md §2."""
    total = 0
    for x in xs:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
        else:
            padding = conv.padding
        rows = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])
        if conv.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
        total = total + rows.T @ rows
    return total


CELL_CONVS = [  # (kernel, stride, padding, dilation, (H, W), bias, padding_mode)
    (1, 1, 0, 1, (6, 5), True, "zeros"),
    (1, 2, 0, 1, (7, 6), False, "zeros"),
    (1, 1, 1, 1, (5, 5), True, "zeros"),
    (3, 1, 1, 1, (8, 8), False, "zeros"),
    (3, 1, 1, 1, (7, 9), True, "zeros"),
    (3, 2, 1, 1, (8, 8), False, "zeros"),
    (3, 2, 1, 1, (9, 7), True, "zeros"),
    (3, 1, 0, 1, (6, 7), True, "zeros"),
    (3, 2, 0, 2, (11, 10), True, "zeros"),
    (3, 1, 2, 2, (7, 8), False, "zeros"),
    (3, 1, "same", 1, (6, 5), True, "zeros"),
    (3, 1, "same", 2, (7, 6), False, "zeros"),
    (3, 1, 1, 1, (6, 7), True, "reflect"),
    (3, 2, 2, 1, (2, 2), True, "zeros"),
    (3, 1, 1, 1, (1, 1), True, "zeros"),
    (5, 1, 2, 1, (9, 8), True, "zeros"),
    (5, 2, 2, 1, (10, 9), False, "zeros"),
    (5, 1, 0, 2, (12, 11), True, "zeros"),
    (5, 1, "same", 1, (6, 6), True, "zeros"),
    (5, 2, 1, 2, (13, 12), True, "replicate"),
    (7, 2, 3, 1, (16, 15), False, "zeros"),
    (7, 1, 3, 1, (9, 10), True, "zeros"),
    (7, 2, 2, 2, (17, 16), True, "zeros"),
    (7, 1, "same", 1, (5, 8), False, "zeros"),
    ((2, 3), (2, 1), (0, 1), (1, 2), (9, 8), True, "zeros"),
    ((4, 4), (4, 4), 0, 1, (8, 12), True, "zeros"),
    ((2, 2), (2, 2), 0, 1, (7, 9), False, "zeros"),
    (4, 1, "same", 1, (7, 6), True, "zeros"),
]


@pytest.mark.parametrize("spec", CELL_CONVS, ids=[str(i) for i in range(len(CELL_CONVS))])
def test_cell_factor_equals_unfold(spec: tuple) -> None:
    """The shifted-window cell method gives exactly the unfold-based A (float64), over two batches."""
    from zoo.curvature.conv_factor import ConvFactorPlan

    kernel, stride, padding, dilation, hw, bias, mode = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                     padding_mode=mode).double()
    xs = [torch.randn(3, 3, *hw, dtype=DT), torch.randn(2, 3, *hw, dtype=DT)]
    plan = ConvFactorPlan(conv, hw, bias)
    state = plan.state(DT, torch.device("cpu"))
    for x in xs:
        plan.accumulate(x, state)
    rows = sum(x.shape[0] for x in xs) * plan.positions
    assert plan.positions == conv(xs[0]).shape[2] * conv(xs[0]).shape[3]
    got = plan.assemble(state, torch.tensor(float(rows), dtype=torch.float64))
    torch.testing.assert_close(got, _unfold_factor(xs, conv), rtol=1e-12, atol=1e-12)


def test_kfac_cell_path_equals_unfold_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: kfac with the cell method (wide convs) returns the same factors as with plain unfolding."""
    import zoo.curvature.conv_factor as conv_factor

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 5, padding="same"),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 3)).double().eval()
    data = batches(2, 3, (3, 8, 8), 3, seed=4)
    assert conv_factor.conv_factor_plan(model[2], (8, 8), False) is not None
    cells = kfac(model, data, "exact", dtype=DT, progress=False)
    monkeypatch.setattr(conv_factor, "MIN_CHANNELS", 10**9)
    plain = kfac(model, data, "exact", dtype=DT, progress=False)
    assert set(cells) == set(plain)
    for name, block in plain.items():
        if isinstance(block, KronBlock):
            torch.testing.assert_close(cells[name].A, block.A, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cells[name].G, block.G, rtol=1e-12, atol=1e-12)
        else:
            for k, v in block.diagonal.items():
                torch.testing.assert_close(cells[name].diagonal[k], v, rtol=1e-12, atol=1e-12)
