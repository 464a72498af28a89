"""zoo.card: the model card renders through huggingface_hub's ModelCard and parses back with ModelCard.load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

from zoo.card import CARD_TAGS, write_card
from zoo.errors import ArtifactError

REPO_ROOT = Path(__file__).resolve().parents[1]

META: dict[str, Any] = {
    "format_version": 1, "kind": "prior", "library": "prior-zoo", "library_version": "0.1.0",
    "architecture": "resnet50", "timm_name": "resnet50.a1_in1k", "num_classes": 1000,
    "curvature": {"type": "kfac", "fisher": "mc", "approx": "expand", "n": 1281167, "dataset": "imagenet-1k",
                  "seconds": 7384.2},
    "objective": "catoni", "lambda": 812.5,
    "bound": {"kind": "catoni PAC-Bayes bound", "value": 0.4213, "delta": 0.05},
    "scales": {"fc": {"alpha": 1.0, "beta": 2.0, "tau": 0.5}, "conv1": {"alpha": 0.1, "beta": 3.0, "tau": 1.0}},
    "scales_summary": {"alpha": {"min": 0.1, "median": 0.55, "max": 1.0},
                       "beta": {"min": 2.0, "median": 2.5, "max": 3.0},
                       "tau": {"min": 0.5, "median": 0.75, "max": 1.0}},
    "model_sha256": "ab" * 32, "smoke": False, "base_model": "timm/resnet50.a1_in1k",
    "datasets": ["imagenet-1k"], "license": "apache-2.0",
}


def written(tmp_path: Path, meta: dict[str, Any], **kwargs: Any) -> ModelCard:
    """Write the card like an artifact does, then read it back the way the Hub client does."""
    path = write_card(tmp_path, meta, **kwargs)
    assert path == tmp_path / "README.md"
    return ModelCard.load(path)


def test_header_holds_what_the_hub_indexes(tmp_path: Path) -> None:
    card = written(tmp_path, META, repo_id="prior-zoo/resnet50.a1_in1k-kfac")
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert set(CARD_TAGS) <= set(data["tags"]) and {"timm", "bayesian", "laplace", "pac-bayes", "prior-zoo"} \
        <= set(data["tags"])
    assert data["base_model"] == "timm/resnet50.a1_in1k" and data["base_model_relation"] == "adapter"
    assert data["datasets"] == ["imagenet-1k"] and data["license"] == "apache-2.0"
    assert data["metrics"] == ["pac-bayes-bound"]
    result = card.data.eval_results[0]
    assert result.metric_value == pytest.approx(0.4213) and result.dataset_type == "imagenet-1k"
    assert "smoke-build" not in data["tags"] and "not-yet-built" not in data["tags"]


def test_body_says_how_it_was_built_the_scales_the_bound_and_usage(tmp_path: Path) -> None:
    text = written(tmp_path, META, repo_id="prior-zoo/resnet50.a1_in1k-kfac").text
    assert "1,281,167" in text and "2 h 3 min" in text and "mc Fisher" in text
    assert "| α | 0.1 | 0.55 | 1 |" in text and "2 modules" in text
    assert "0.421" in text and "δ = 0.05" in text
    assert 'zoo.load("hf-hub:prior-zoo/resnet50.a1_in1k-kfac")' in text
    assert "zoo pull prior-zoo/resnet50.a1_in1k-kfac" in text
    assert "Smoke build" not in text and "Not yet built" not in text


def test_card_shows_the_held_out_check(tmp_path: Path) -> None:
    meta = copy.deepcopy(META)
    meta["holdout"] = {"n": 5000, "mode": "glm", "t": 100.0, "met": True,
                       "ties_within_one_se": [31.6, 1000.0],
                       "network": {"accuracy": 0.801, "nll": 0.85, "ece": 0.052},
                       "predictive": {"accuracy": 0.799, "nll": 0.81, "ece": 0.021}}
    text = written(tmp_path, meta).text
    assert "Checked on 5000 held-out images" in text and "accuracy 0.799 against the network's 0.801" in text
    assert "ECE 0.021 against 0.052" in text and "narrowest" not in text
    assert "not told apart by these images: precision × 31.6, 1e+03." in text
    meta["holdout"]["ties_within_one_se"] = []
    assert "not told apart" not in written(tmp_path, meta).text
    meta["holdout"] = {"n": 0}
    assert "not checked on held-out data" in written(tmp_path, meta).text


def test_posterior_is_a_finetune_of_its_base(tmp_path: Path) -> None:
    meta = dict(META, kind="posterior")
    data = written(tmp_path, meta).data.to_dict()
    assert data["base_model_relation"] == "finetune" and "posterior" in data["tags"]


def test_smoke_build_says_so_and_claims_no_dataset(tmp_path: Path) -> None:
    meta = copy.deepcopy(META)
    meta.update(smoke=True, base_model=None, datasets=["photos"])
    meta["curvature"].update(n=8, dataset="photos")
    card = written(tmp_path, meta)
    data = card.data.to_dict()
    assert "smoke-build" in data["tags"]
    assert "datasets" not in data and "base_model" not in data and "base_model_relation" not in data
    assert "**Smoke build.**" in card.text and "not an ImageNet prior" in card.text
    assert "hf-hub:ORG/resnet50.a1_in1k-kfac" in card.text  # no repository named: a placeholder, not a guess


def test_not_yet_built_card_shows_the_plan(tmp_path: Path) -> None:
    meta = {"kind": "prior", "timm_name": "vit_small_patch16_224.augreg_in21k_ft_in1k", "architecture": "vit",
            "num_classes": 1000, "curvature": None, "bound": None, "license": "apache-2.0",
            "base_model": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "datasets": ["imagenet-1k"]}
    plan = {"dataset_text": "ImageNet-1k train", "num_images": 1281167, "resolution": 224, "batch_size": 128,
            "fisher": "mc"}
    card = written(tmp_path, meta, plan=plan)
    assert "not-yet-built" in card.data.tags
    assert "**Not yet built.**" in card.text and "1,281,167" in card.text and "224×224" in card.text
    assert card.data.eval_results is None


def test_reference_cards_are_committed_and_current() -> None:
    """model_cards/<entry>.md equal what the recipes render now (regenerate: python -m builders.publish cards)."""
    from builders.publish import reference_cards

    cards = reference_cards()
    assert len(cards) == 4
    for name, text in cards.items():
        path = REPO_ROOT / "model_cards" / f"{name}.md"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale; run `python -m builders.publish cards`"
        assert "**Not yet built.**" in text
    assert (REPO_ROOT / "zoo" / "templates" / "model_card.md").read_text() == \
        (REPO_ROOT / "model_cards" / "template.md").read_text()


@pytest.mark.parametrize("meta", [None, {}, {"kind": "prior"}])
def test_metadata_without_a_model_is_refused(tmp_path: Path, meta: Any) -> None:
    with pytest.raises(ArtifactError, match=r"prior_config\.json|timm_name"):
        write_card(tmp_path, meta)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="create the artifact directory"):
        write_card(tmp_path / "nope", META)


def test_posterior_card_shows_its_certificate_labelled(tmp_path: Path) -> None:
    meta = dict(META, kind="posterior", certificate={
        "bound": 0.3351, "kind": "kl", "delta": 0.05, "n": 359, "kl": 19.84, "empirical_risk": 0.055,
        "samples": 100, "hypotheses": 3, "taylor_bound": 0.436},
        certificate_kind="data-dependent prior: prior mean fitted on the first 358 training examples")
    text = written(tmp_path, meta).text
    assert "## Certificate" in text and "**Certificate: 0.335**" in text
    assert "n = 359" in text and "KL = 19.8 nats" in text and "3 prior(s)" in text
    assert "not a certificate: 0.436" in text and "data-dependent prior" in text
    (tmp_path / "prior").mkdir()
    assert "## Certificate" not in written(tmp_path / "prior", dict(META)).text


def test_posterior_card_shows_held_out_figures_and_its_reliability_diagram(tmp_path: Path) -> None:
    import torch

    from zoo.report import Outputs, evaluation_record

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    outputs = Outputs(probs, torch.special.entr(probs).sum(-1), torch.zeros(4, dtype=torch.float64))
    ev = evaluation_record(outputs, labels, dataset="toy", mode="glm", samples=8)
    assert ev["accuracy"] == pytest.approx(0.75) and ev["n"] == 4 and len(ev["reliability"]) > 0
    text = written(tmp_path, dict(META, kind="posterior", evaluation=ev)).text
    assert "## Held-out evaluation" in text and "On 4 held-out examples of toy (glm predictive, 8 samples)" in text
    assert "| accuracy | 0.75 |" in text and "](reliability.png)" in text
    (tmp_path / "prior").mkdir()
    assert "## Held-out evaluation" not in written(tmp_path / "prior", dict(META)).text
