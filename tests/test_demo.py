"""`zoo demo`: every step of the story lands in the JSON, and its outputs are real and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import cli

import zoo
from zoo.demo import DEFAULT_NAME


@pytest.mark.slow
def test_demo_json_has_every_step_and_its_outputs_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    result_file = tmp_path / "demo.json"
    assert cli("demo", "--json", str(result_file), "--quick", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert result["steps"] == ["pretrained", "prior", "save_load", "predictive", "finetune", "certificate",
                               "transfer_predictive", "report", "serve"]
    for step in range(1, 10):
        assert f"\n{step}. " in "\n" + printed, f"step {step} is not printed"
    transfer = result["transfer"]
    # the certificate is a probability bound, labelled with its n, and at least the empirical Gibbs risk
    cert = transfer["certificate"]
    assert cert["n"] == transfer["train"] and cert["empirical_risk"] <= cert["bound"] <= 1.0 and cert["kl"] > 0
    # the report's accuracy is the posterior's, and it writes the files it names
    report = Path(transfer["report"])
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["metrics"]["accuracy"] == pytest.approx(transfer["test_metrics"]["posterior"]["accuracy"])
    assert (report.parent / "reliability.png").stat().st_size > 5000
    # its card carries the held-out figures and the reliability diagram, drawn into the repository
    card = (Path(transfer["repository"]) / "README.md").read_text()
    assert "## Held-out evaluation" in card and f"On {transfer['test']} held-out examples" in card
    assert (Path(transfer["repository"]) / "reliability.png").stat().st_size > 5000
    # the served repository is a posterior whose preprocessing is the 32 px one training used, with digit labels
    repo = Path(transfer["repository"])
    assert transfer["serve"] == f"zoo serve {repo}" and (out / DEFAULT_NAME / "prior_config.json").is_file()
    model, loaded = zoo.load(str(repo))
    assert loaded.meta["kind"] == "posterior" and loaded.meta["classes"] == [str(k) for k in range(10)]
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32) and model.num_classes == 10
    # step 5 names Q's width T and the rule that chose it, as the saved posterior records them
    selection = loaded.meta["width"]["selection"]
    assert transfer["T"] == selection["T"]
    assert f"× T = {selection['T']:g}, by the {selection['rule']} rule" in printed
    # steps 5–9 are the seed's, whatever the caller's global torch RNG: the new head used to be drawn from it, so
    # the demo's fine-tune depended on what steps 1–4 had drawn (held-out accuracy 0.58 inside the demo, 0.55 from
    # the same prior alone)
    from PIL import Image

    from zoo.demo_transfer import QUICK, run_transfer

    torch.manual_seed(12345)
    torch.rand(1000)
    again = run_transfer(out / DEFAULT_NAME, tmp_path / "again", [("grey", Image.new("RGB", (64, 64), (128,) * 3))],
                         seed=0, plan=QUICK, progress=False)
    assert again["test_metrics"] == transfer["test_metrics"]
    assert again["certificate"]["empirical_risk"] == cert["empirical_risk"]


def test_the_demo_crops_are_the_same_for_the_same_seed() -> None:
    # timm's RandomResizedCrop draws its boxes from Python's random, which seeding torch alone does not fix: the
    # demo's prior then changed from run to run (held-out accuracy 0.625 on one run, 0.375 on the next)
    import random

    from zoo.demo import demo_crops
    from zoo.pretrained import efficientnet_lite0

    model = efficientnet_lite0()
    first, labels = demo_crops(model, seed=3)
    random.seed(12345)  # whatever the caller's Python random state, the crops are the seed's
    again, labels_again = demo_crops(model, seed=3)
    other, _ = demo_crops(model, seed=4)
    assert torch.equal(first, again) and torch.equal(labels, labels_again)
    assert not torch.equal(first, other)
    state = random.getstate()
    demo_crops(model, seed=3)
    assert random.getstate() == state  # the caller's random stream is left where it was
