"""`zoo evaluate` and zoo.report: every promised file, valid figures, and numbers that agree with each other."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_support import cli
from digits_task import CLASSES, digits, save_image_folder, upstream_prior_dir
from PIL import Image

import zoo
from zoo import metrics, width
from zoo.predictive import PinnedHeadWarning, pinned_heads
from zoo.report import FIGURES, FILES, Outputs, reliability_bins, write_report


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Labelled upstream digits 0–4 (20 per class, one folder per class) and unlabelled digits 5–9 as OOD."""
    root = tmp_path_factory.mktemp("evaluate")
    x, y = digits()
    keep = torch.cat([torch.nonzero(y == k).flatten()[-20:] for k in range(CLASSES)])
    save_image_folder(root / "data", x[keep], y[keep])
    ood = torch.cat([torch.nonzero(y == k).flatten()[:8] for k in range(CLASSES, 2 * CLASSES)])
    save_image_folder(root / "ood", x[ood], None)
    return root / "data", root / "ood"


def check_report(out: Path) -> dict:
    for name in FILES:
        assert (out / name).is_file(), f"{name} missing"
    for name in FIGURES:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200
        assert (out / name).stat().st_size > 5_000, f"{name} is suspiciously small"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)  # self-contained
    assert all(name in (out / "report.md").read_text() for name in FIGURES)
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_prior_report_agrees_with_its_own_predictive(folders: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    data, ood = folders
    out = tmp_path / "report"
    assert cli("evaluate", str(upstream_prior_dir()), "--data", str(data), "--ood", str(ood), "--out", str(out),
               "--samples", "4", "--mode", "fast") == 0
    assert str(out / "report.html") in capsys.readouterr().out
    assert "fast mode, 4 samples in antithetic pairs, seed 0" in (out / "report.md").read_text()  # the estimator used
    record = check_report(out)
    m = record["metrics"]
    assert m["n"] == 100 and m["ood_n"] == 40 and record["certificate"] is None
    # the report's numbers against the prior's predictive computed here, on the same decoded images
    _, prior = zoo.load(str(upstream_prior_dir()))
    images, labels = [], []
    for k in range(CLASSES):
        for f in sorted((data / str(k)).iterdir(), key=lambda p: int(p.stem)):
            arr = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))
            images.append(((arr / 255 - 0.5) / 0.5).permute(2, 0, 1))
            labels.append(k)
    pred = prior.predict(torch.stack(images), samples=4, mode="fast")
    assert m["accuracy"] == pytest.approx(metrics.accuracy(pred.probs, torch.tensor(labels)), abs=0.011)
    assert m["accuracy"] > 0.9  # the upstream network knows these digits
    counts = [b["count"] for b in m["reliability"]]
    assert sum(counts) == 100
    per_class = m["per_class_accuracy"]
    assert sum(per_class) / CLASSES == pytest.approx(m["accuracy"])  # 20 images per class
    assert m["ood_mean_entropy"] > m["mean_entropy"]  # unseen digits are more uncertain


def test_evaluate_a_finetune_run_carries_its_certificate(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    data, _ = folders
    out = tmp_path / "run"
    assert cli("finetune", str(upstream_prior_dir()), "--data", str(data), "--out", str(out), "--epochs", "2",
               "--lr", "1e-2", "--shots", "3", "--samples", "5") == 0
    report = tmp_path / "report"
    assert cli("evaluate", str(out), "--data", str(data), "--out", str(report), "--samples", "4") == 0
    record = check_report(report)
    cert = json.loads((out / "certificate.json").read_text())
    assert record["certificate"]["bound"] == cert["bound"]
    assert "certificate:" in (report / "report.md").read_text()
    assert record["metrics"]["ood_auroc_entropy"] is None and record["classes"] == [str(k) for k in range(5)]


@pytest.fixture(scope="module")
def one_shot_run(tmp_path_factory: pytest.TempPathFactory, folders: tuple[Path, Path]) -> tuple[Path, str]:
    """`zoo finetune --shots 1` on the upstream digits (a new head), and what it printed."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("one-shot") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli("finetune", str(upstream_prior_dir()), "--data", str(folders[0]), "--out", str(run), "--epochs",
                   "1", "--shots", "1", "--samples", "2") == 0
    return run, printed.getvalue()


def test_one_shot_run_says_its_head_is_pinned_and_the_service_logs_it(one_shot_run: tuple[Path, str],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """One image per class: the new head's scale comes from the likelihood-ratio rule and its spread is pinned, so
    `fast` has no epistemic part. The saved run keeps that, the command says it, and so does a `fast` service."""
    from api.models import load_model
    from api.routes.v1 import model_info
    from api.settings import Settings

    run, printed = one_shot_run
    _, posterior = zoo.load(str(run))
    assert pinned_heads(posterior) == {"classifier": width.PINNED_HEAD_WIDTH}
    assert "note: the new head 'classifier' could not be scaled from 5 training images" in printed
    with caplog.at_level("WARNING", logger="api"), warnings.catch_warnings():
        warnings.simplefilter("error", PinnedHeadWarning)  # said once, in the log, not again on stderr
        served = load_model(str(run), Settings(mode="fast", samples=4))
    assert any("'classifier' has its spread pinned" in r.getMessage() and "--mode glm" in r.getMessage()
               for r in caplog.records)
    note = model_info(served).predictive.note  # what /v1/models tells a client
    assert note is not None and "'classifier' has its spread pinned" in note and "no epistemic" in note
    caplog.clear()
    with caplog.at_level("WARNING", logger="api"):
        served = load_model(str(run), Settings(mode="glm", samples=2))  # glm reads the body's spread: nothing to say
    assert not any("pinned" in r.getMessage() for r in caplog.records)
    assert model_info(served).predictive.note is None


def test_evaluate_refuses_folders_the_model_does_not_know(tmp_path: Path, one_shot_run: tuple[Path, str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = one_shot_run
    other = tmp_path / "other"
    (other / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(other / "cat" / "a.png")
    (other / "dog").mkdir()
    Image.new("RGB", (16, 16)).save(other / "dog" / "b.png")
    capsys.readouterr()
    assert cli("evaluate", str(run), "--data", str(other), "--out", str(tmp_path / "r")) == 2
    assert "rename the folders" in capsys.readouterr().out


def test_reliability_bins_and_class_name_checks(tmp_path: Path) -> None:
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    bins = reliability_bins(probs, labels, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[5]["accuracy"] == 1.0 and bins[0]["accuracy"] is None
    outputs = Outputs(probs, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(zoo.ZooError, match="one name per class"):
        write_report(tmp_path, outputs, labels, class_names=["a", "b", "c"])
    paths = write_report(tmp_path / "ok", outputs, labels, class_names=["a", "b"])
    assert json.loads(paths["metrics.json"].read_text())["metrics"]["ece"] == pytest.approx(
        metrics.ece(probs, labels))
