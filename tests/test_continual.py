"""zoo.continual, zoo.progressive, zoo.kron.chain and `zoo continual`: chains against the dense sum, forgetting,
progressive columns, repositories that load, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from api_support import tiny_repo_once
from cli_support import cli
from digits_task import digits, save_image_folder
from safetensors import safe_open

import zoo
from api.models import load_model
from api.settings import Settings
from zoo import ConfigError
from zoo.cli.continual import APPROXIMATIONS as CLI_APPROXIMATIONS
from zoo.continual import Task, head_state, learn_chain, set_head
from zoo.kron import KronPrecision
from zoo.kron.approx import APPROXIMATIONS
from zoo.kron.chain import add_term, dense_kl, fold, relative_error
from zoo.layers import KronLayer
from zoo.posterior import Posterior
from zoo.progressive import ProgressiveNet, learn_progressive

SIZE = 32  # the tiny repository's input size
Batches = list[tuple[torch.Tensor, torch.Tensor]]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ---- the algebra: three tasks against the dense sum --------------------------------------------------------------
def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return x @ x.T / (rank or n)


def term(seed: int, out: int = 3, inn: int = 4) -> KronPrecision:
    return KronPrecision([(spd(inn, seed, rank=2), spd(out, seed + 50))])


def dense_kl_reference(lu: torch.Tensor, le: torch.Tensor) -> float:
    return 0.5 * (torch.linalg.solve(lu, le).trace() - lu.shape[0] + torch.logdet(lu) - torch.logdet(le)).item()


@pytest.mark.parametrize("approximation", APPROXIMATIONS)
def test_three_task_chain_matches_the_dense_sum(approximation: str) -> None:
    prior = KronPrecision([(spd(4, 1), spd(3, 2))], [2.0], damping=0.5)  # a learned prior: one term + damping
    keep, full = prior, prior
    dense = prior.target_dense()
    for t in range(3):
        new = term(10 + t)
        keep, full = add_term(keep, new, approximation=approximation, exact=full)
        dense = dense + new.target_dense()
        torch.testing.assert_close(full.target_dense(), dense)  # the exact running sum, prior + F₁ + … + F_t
        assert len(keep.terms) == 2 and keep.damping == 0.5  # constant size: F_t and the folded rest
        used = keep.decomposition().dense()
        measured = (torch.linalg.matrix_norm(used - dense) / torch.linalg.matrix_norm(dense)).item()
        assert relative_error(keep, full) == pytest.approx(measured, rel=1e-6, abs=1e-9)
        assert dense_kl(keep, full) == pytest.approx(dense_kl_reference(used, dense), rel=1e-6, abs=1e-9)
        assert 0 < measured < 1
    assert len(full.terms) == 4  # the exact sum grows; it is only ever kept in memory


def test_isotropic_start_is_exact_for_one_task_then_measured() -> None:
    eye_in, eye_out = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    prior = KronPrecision([(eye_in, eye_out)], [3.0])
    keep, full = add_term(prior, term(1))
    assert keep.is_exact and relative_error(keep, full) < 1e-7
    torch.testing.assert_close(keep.dense(), prior.target_dense() + term(1).target_dense())
    keep2, full2 = add_term(keep, term(2), exact=full)  # three terms: the older two folded, the error measured
    assert len(keep2.terms) == 2 and len(full2.terms) == 3 and relative_error(keep2, full2) > 1e-4
    folded = fold(keep)
    assert len(folded.terms) == 1 and folded.damping == keep.damping


# ---- a tiny timm model on digit pairs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repo_once(tmp_path_factory.getbasetemp())


def pair(a: int, b: int, shots: int, seed: int = 0) -> tuple[Batches, torch.Tensor, torch.Tensor]:
    """Digits a (label 0) and b (label 1) at the tiny model's size: `shots` per class to train, 40 to test."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    xs, ys, xt, yt = [], [], [], []
    for label, k in enumerate((a, b)):
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        xs.append(x[idx[:shots]])
        ys.append(torch.full((shots,), label))
        xt.append(x[idx[shots : shots + 40]])
        yt.append(torch.full((40,), label))
    up = lambda t: F.interpolate(torch.cat(t), size=(SIZE, SIZE), mode="bilinear", align_corners=False)  # noqa: E731
    xtr, ytr = up(xs), torch.cat(ys)
    order = torch.randperm(xtr.shape[0], generator=g)
    xtr, ytr = xtr[order], ytr[order]
    return [(xtr[i : i + 16], ytr[i : i + 16]) for i in range(0, xtr.shape[0], 16)], up(xt), torch.cat(yt)


def task_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def prior_tensor_bytes(repo_dir: Path) -> int:
    with safe_open(str(repo_dir / "prior.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118


def test_chain_of_three_tasks_saves_loadable_constant_size_repositories(repo: Path, tmp_path: Path) -> None:
    tasks = [Task(f"{a}/{b}", pair(a, b, 8, seed=a)[0], 2, (str(a), str(b))) for a, b in ((0, 1), (2, 3), (4, 5))]
    model, prior = zoo.load(str(repo))
    result = learn_chain(model, prior, tasks, out=tmp_path / "chain", epochs=2, progress=False,
                         generator=torch.Generator().manual_seed(0), selection_samples=2)
    records = result.records
    assert [r.task for r in records] == [1, 2, 3] and all(r.path for r in records)
    assert records[0].kron_terms == 2 and records[1].kron_terms == records[2].kron_terms == 3
    sizes = [prior_tensor_bytes(Path(r.path)) for r in records]
    assert sizes[1] == sizes[2], sizes  # a chain's artifact does not grow with the number of tasks
    # the carried precision of a small layer against the dense prior + F₁ + F₂ + F₃
    kappa = records[0].prior_strength
    name = min((n for n, layer in prior.layers.items() if isinstance(layer, KronLayer) and n != "classifier"),
               key=lambda n: prior.layers[n].precision.dim)
    assert prior.layers[name].precision.dim <= 2048
    carried = result.prior.layers[name].precision
    dense = kappa * prior.layers[name].precision.target_dense()
    for post in result.posteriors:
        dense = dense + torch.kron(*post.layers[name].precision.terms[0])
    used = carried.decomposition().dense()
    error = (torch.linalg.matrix_norm(used - dense) / torch.linalg.matrix_norm(dense)).item()
    assert error <= records[2].prior_error["max"] + 1e-6
    # every intermediate posterior is a repository zoo.load reads, with its head and its chain record
    loaded_model, loaded = zoo.load(records[1].path)
    assert loaded.meta["kind"] == "posterior" and loaded.meta["continual"]["task"] == 2
    assert loaded.meta["classes"] == ["2", "3"]
    _, x2, _ = pair(2, 3, 8, seed=2)
    set_head(result.model, result.heads[1])
    posterior = Posterior.from_prior(loaded_model, loaded)
    pred = posterior.predict(x2[:8], samples=4, generator=torch.Generator().manual_seed(0))
    assert pred.probs.shape == (8, 2)
    assert torch.equal(head_state(loaded_model)["weight"], result.heads[1]["weight"])
    served = load_model(records[2].path, Settings(refs=(records[2].path,)))  # what `zoo serve` does per REF
    assert served.kind == "posterior" and served.labels == ["4", "5"]


def test_chain_forgets_less_than_plain_fine_tuning(repo: Path) -> None:
    first, x1, y1 = pair(0, 1, 12, seed=0)
    second, _, _ = pair(6, 9, 12, seed=1)
    epochs, lr = 6, 1e-2

    # plain fine-tuning: the same optimiser, epochs and heads, no prior
    plain, _ = zoo.load(str(repo))
    torch.manual_seed(0)
    heads = []
    for data in (first, second):
        plain.reset_classifier(2)
        opt = torch.optim.Adam(plain.parameters(), lr=lr)
        plain.eval()
        for _ in range(epochs):
            for xb, yb in data:
                opt.zero_grad()
                F.cross_entropy(plain(xb), yb).backward()
                opt.step()
        heads.append(head_state(plain))
        if len(heads) == 1:
            before_plain = task_nll(plain, x1, y1)
    set_head(plain, heads[0])
    forgetting_plain = task_nll(plain, x1, y1) - before_plain

    model, prior = zoo.load(str(repo))
    seen: list[float] = []

    def after(t: int, m: torch.nn.Module, hs: list[dict[str, torch.Tensor]]) -> None:
        set_head(m, hs[0])
        seen.append(task_nll(m, x1, y1))

    learn_chain(model, prior, [Task("0/1", first, 2), Task("6/9", second, 2)], epochs=epochs, lr=lr,
                prior_strength=1.0, progress=False, generator=torch.Generator().manual_seed(0), selection_samples=2,
                after_task=after)
    forgetting_chain = seen[1] - seen[0]
    assert forgetting_chain < forgetting_plain, (forgetting_chain, forgetting_plain)


def test_progressive_columns_leave_earlier_tasks_bit_identical(repo: Path, tmp_path: Path) -> None:
    tasks = [Task(f"{a}/{b}", pair(a, b, 6, seed=a)[0], 2, (str(a), str(b))) for a, b in ((0, 1), (2, 3), (4, 5))]
    _, x, _ = pair(7, 8, 2)
    model, prior = zoo.load(str(repo))
    result = learn_progressive(model, prior, tasks, out=tmp_path / "prog", epochs=2, progress=False,
                               generator=torch.Generator().manual_seed(0), selection_samples=2)
    net = result.model
    assert isinstance(net, ProgressiveNet) and net.tasks == 3
    for k, post in enumerate(result.posteriors[:-1]):
        with torch.no_grad():
            before = post.model.forward_task(x, k)  # the network right after task k
            assert torch.equal(before, net.forward_task(x, k))  # … and after every later column was trained
    growth = [r.column_parameters for r in result.records]
    totals = [r.total_parameters for r in result.records]
    assert growth[1] > growth[0] and totals[2] - totals[1] > totals[1] - totals[0] - 1  # laterals widen each head
    loaded_model, loaded = zoo.load(result.records[1].path)  # a plain timm checkpoint of architecture zoo_progressive
    assert isinstance(loaded_model, ProgressiveNet) and loaded.meta["continual"]["method"] == "progressive"
    with torch.no_grad():
        assert torch.equal(loaded_model(x), result.posteriors[1].model(x))
        assert torch.equal(loaded_model.forward_task(x, 0), net.forward_task(x, 0))
    pred = Posterior.from_prior(loaded_model, loaded).predict(x, samples=4, mode="fast",
                                                               generator=torch.Generator().manual_seed(0))
    assert pred.probs.shape == (x.shape[0], 2)
    with pytest.raises(ConfigError, match="classifier"):
        zoo.load(result.records[1].path, num_classes=3)
    served = load_model(result.records[2].path, Settings(refs=(result.records[2].path,), mode="fast"))
    assert served.architecture == "zoo_progressive" and served.labels == ["4", "5"]


# ---- the command line and bad input ------------------------------------------------------------------------------
def test_cli_continual_writes_a_repository_per_task(repo: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folders = []
    x, y = digits()
    for a, b in ((1, 7), (3, 8)):
        keep = torch.nonzero((y == a) | (y == b)).flatten()[:16]
        folder = tmp_path / f"task-{a}{b}"
        save_image_folder(folder, x[keep], (y[keep] == b).long(), prefix=f"digit{a}-or-")
        folders.append(folder)
    out = tmp_path / "out"
    args = ["continual", str(repo), "--task", str(folders[0]), "--task", str(folders[1]), "--out", str(out),
            "--epochs", "1", "--batch-size", "16"]
    assert cli(*args) == 0
    printed = capsys.readouterr().out
    assert "task 2" in printed and "summary written" in printed
    summary = json.loads((out / "continual.json").read_text())
    assert summary["method"] == "chain" and [r["task"] for r in summary["records"]] == [1, 2]
    for k in (1, 2):
        model, posterior = zoo.load(str(out / f"task-{k}"))
        assert posterior.meta["kind"] == "posterior" and model.num_classes == 2
        assert posterior.meta["continual"]["approximation"] == "ekfac"
    # bad input: each says what to do, exit code 2
    assert cli("continual", str(repo), "--task", str(tmp_path / "missing"), "--out", str(tmp_path / "x")) == 2
    assert "ImageFolder" in capsys.readouterr().out
    assert cli("continual", str(repo), "--task", str(folders[0]), "--task", str(folders[0]),
               "--out", str(tmp_path / "x")) == 2
    assert "twice" in capsys.readouterr().out
    assert cli(*args[:-4], "--epochs", "0") == 2
    assert "--epochs" in capsys.readouterr().out


def test_bad_input_raises_zoo_errors_that_say_what_to_do(repo: Path) -> None:
    model, prior = zoo.load(str(repo))
    data = pair(0, 1, 2)[0]
    with pytest.raises(ConfigError, match="approximation must be one of"):
        learn_chain(model, prior, [Task("t", data, 2)], approximation="svd")
    with pytest.raises(ConfigError, match="at least one task"):
        learn_chain(model, prior, [])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        learn_chain(model, prior, [Task("t", data, 1)])
    with pytest.raises(ConfigError, match="prior_strength"):
        learn_chain(model, prior, [Task("t", data, 2)], prior_strength=-1.0)
    with pytest.raises(ConfigError, match=r"zoo\.continual\.Task"):
        learn_progressive(model, prior, [data])
    assert tuple(CLI_APPROXIMATIONS) == tuple(APPROXIMATIONS)
