"""`zoo demo`: the whole loop, offline, on CPU, in about 2 minutes on 2 cores (steps 5–9 in zoo.demo_transfer).

1. A real ImageNet network: timm's efficientnet_lite0 with the offline weights (zoo.pretrained); it labels
   scikit-learn's two sample photos.
2. `zoo.build_prior`: whole-network K-FAC (MC Fisher) on random crops of those photos, every trainable
   parameter in a block, and per-layer scales α, β, τ fitted by the Catoni bound against N(0, λ⁻¹I).
3. The hub repository format: saved, placed in a local Hugging Face cache, and loaded back by its repository id
   with `zoo.load` through huggingface_hub, offline (hashes and shapes verified, lazy).
4. A last-layer predictive (labelled as such): 32 draws of the classifier from the prior give probabilities,
   total entropy, aleatoric (expected entropy) and epistemic (mutual information) uncertainty for the photos
   and a noise image.

5–9. Fine-tuning on digits, the certificate, the predictive on digits and OOD inputs, the report, and the serve
   command (zoo.demo_transfer), unless `--prior-only`.

This is a smoke build on two photos, not an ImageNet prior.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from zoo.build import build_prior
from zoo.hub_cache import populate_cache
from zoo.loading import load
from zoo.predictive import DEFAULT_MODE
from zoo.pretrained import efficientnet_lite0
from zoo.prior import Prior
from zoo.seeding import seeded_augmentation

CROPS = 40
SAMPLES = 16
"""Draws for step 4's prior predictive of three 224 px images (the library's default is 32). Each glm draw is a
forward-mode pass of efficientnet_lite0, and 32 took 21.6 s of a demo that must stay under 2 minutes; 16 take
11.1 s and keep every figure the demo states (palace and daisy at top-1, the most epistemic uncertainty on the
noise image: 0.120 nats against 0.013 and 0.024, with 32 draws 0.141 against 0.016 and 0.024)."""
WIDTH_CHECK_SAMPLES = 8
"""Draws for the smoke build's width check on its 8 held-out crops (build_prior's default is 16): each is a 224 px
forward-mode pass of every crop, about 1 s on 2 cores, and the demo's budget is 2 minutes."""
PHOTO_LABELS = {"china": 698, "flower": 985}
"""What the two sample photos show, as ImageNet classes (our reading of the photos, not the network's): the
china photo is a palace, the flower photo a daisy. They label the crops the prior's width is checked on."""
DEFAULT_NAME = "efficientnet_lite0-smoke-kfac"
"""The repository name of the embedded default (what `zoo serve` with no REF serves)."""
DEMO_REPO = "prior-zoo/" + DEFAULT_NAME
"""The id the demo loads its prior by, from a local Hugging Face cache (zoo.hub_cache)."""


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in place in channels_last, as timm users run convnets on CPU: efficientnet_lite0's depthwise
    convolutions are 1.5–4× faster that way (measured: a forward pass of 300 digits at 32 px 0.30 s against 1.33 s,
    a forward-backward of 8 images at 224 px 1.02 s against 1.82 s, one thread). zoo samples, saves and predicts in
    the network's own layout."""
    return model.to(memory_format=torch.channels_last)


BUILD_REVISION = "r2"
"""Bumped whenever build_prior's defaults change, so a cache built by an older prior-zoo is not served."""


def cache_root(cache_dir: str | None = None) -> Path:
    """Where prior-zoo keeps what it builds on first use: `cache_dir`, else $ZOO_CACHE, else ~/.cache/prior-zoo."""
    root = cache_dir or os.environ.get("ZOO_CACHE") or str(Path.home() / ".cache" / "prior-zoo")
    return Path(root).expanduser()


def embedded_default(cache_dir: str | None = None, *, progress: bool = True, seed: int = 0) -> Path:
    """The embedded default's repository directory, built on first use (about 30 s on CPU) and reused after."""
    target = cache_root(cache_dir) / BUILD_REVISION / DEFAULT_NAME
    if (target / "prior_config.json").is_file():
        return target
    model = channels_last(efficientnet_lite0().eval())
    prior = build_default_prior(model, seed=seed, progress=progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    return prior.save(str(target), model=model)


def build_default_prior(model: torch.nn.Module, *, seed: int = 0, progress: bool = True) -> Prior:
    """The smoke prior of the offline ImageNet efficientnet_lite0 on random crops of the two sample photos."""
    crops, labels = demo_crops(model, seed)
    generator = torch.Generator().manual_seed(seed)
    loader = [(crops[i : i + 8], labels[i : i + 8]) for i in range(0, CROPS, 8)]
    # holdout=0.2: the first of the five batches is held out to check the prior's predictive against the network,
    # with WIDTH_CHECK_SAMPLES draws
    return build_prior(model, loader, fisher="mc", holdout=0.2, samples=WIDTH_CHECK_SAMPLES, generator=generator,
                       progress=progress,
                       dataset="sklearn-sample-photos (labelled crops)", smoke=True, timm_name="efficientnet_lite0")


def demo_crops(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CROPS labelled random crops and flips of the two sample photos, through efficientnet_lite0's training
    transform; the same tensors for the same seed (the transform's crop boxes come from Python's random too)."""
    train = create_transform(**resolve_data_config(model=model), is_training=True, hflip=0.5, color_jitter=0.0)
    photos = _sample_photos()
    with seeded_augmentation(seed):
        crops = torch.stack([train(photos[i % len(photos)][1]) for i in range(CROPS)])
    return crops, torch.tensor([PHOTO_LABELS[photos[i % len(photos)][0]] for i in range(CROPS)])


def _sample_photos() -> list[tuple[str, Image.Image]]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return [(Path(f).stem, Image.fromarray(a)) for f, a in zip(photos.filenames, photos.images, strict=True)]


def run_demo(json_path: str | None = None, seed: int = 0, *, transfer: bool = True, quick: bool = False,
             out_dir: str | None = None) -> dict[str, Any]:
    """Run the demo, print a report, and return (and optionally write) the measured results.

    `transfer` adds steps 5–9 (zoo.demo_transfer: fine-tune on digits, certificate, predictive, report, serve);
    their repositories and report go to `out_dir` (default: the cache's demo/ folder). `quick` shrinks them.
    """
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    model = channels_last(efficientnet_lite0().eval())
    cfg = resolve_data_config(model=model)
    evaluate = create_transform(**cfg)
    photos = _sample_photos()
    info = ImageNetInfo()
    x_eval = torch.stack([evaluate(img) for _, img in photos])
    with torch.no_grad():
        top = model(x_eval).softmax(-1).max(-1)
    print("1. pretrained efficientnet_lite0 (offline ImageNet weights)")
    for (name, _), p, i in zip(photos, top.values, top.indices, strict=True):
        print(f"   {name:>7s}: {info.index_to_description(int(i))} ({p:.2f})")

    t0 = time.perf_counter()
    prior = build_default_prior(model, seed=seed, progress=True)
    t_build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kinds = [type(layer).__name__ for layer in prior.layers.values()]
    covered = sum(p.numel() for p in prior.mean.values())
    scales = prior.meta["scales_summary"]
    held = prior.meta["holdout"]
    print(f"2. prior built in {t_build:.0f} s (K-FAC on {prior.meta['curvature']['n']} crops, "
          f"{prior.meta['curvature']['seconds']:.0f} s): {kinds.count('KronLayer')} Kronecker + "
          f"{kinds.count('DiagLayer')} diagonal blocks, {covered:,} of {n_params:,} parameters "
          f"({100 * covered / n_params:.1f}%); fitted β median {scales['beta']['median']:.3g}, "
          f"α median {scales['alpha']['median']:.3g}, τ median {scales['tau']['median']:.3g}")
    print(f"   width checked on {held['n']} held-out labelled crops ({held['mode']} predictive, precision × "
          f"{held['t']:g}): accuracy {held['predictive']['accuracy']:.3f} vs the network's "
          f"{held['network']['accuracy']:.3f}, NLL {held['predictive']['nll']:.3f} vs "
          f"{held['network']['nll']:.3f}, ECE {held['predictive']['ece']:.3f} vs {held['network']['ece']:.3f}"
          + ("" if held["met"] else f"  (no width met all three; kept: {held.get('fallback', 'the narrowest')})"))

    out = Path(out_dir) if out_dir else cache_root() / "demo"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = prior.save(str((out if transfer else Path(tmp)) / DEFAULT_NAME), model=model)
        sizes = {f.name: f.stat().st_size for f in sorted(path.iterdir())}
        hub_cache = (out if transfer else Path(tmp)) / "hf-cache"
        commit = populate_cache(path, DEMO_REPO, cache_dir=hub_cache)
        model, prior = load(DEMO_REPO, cache_dir=hub_cache, local_files_only=True)
        channels_last(model)  # in place: prior.model is this module
        t_io = time.perf_counter() - t0
        print(f"3. saved, placed in a local Hugging Face cache ({hub_cache}) as {DEMO_REPO}@{commit[:8]}, and "
              f"loaded back by id with zoo.load through huggingface_hub, offline (hashes and shapes verified) in "
              f"{t_io:.1f} s: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))

    noise = torch.rand(1, *x_eval.shape[1:], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    inputs = torch.cat([x_eval, noise])
    names = [n for n, _ in photos] + ["noise"]
    rows = []
    for mode in (DEFAULT_MODE, "fast"):
        t0 = time.perf_counter()
        pred = prior.predict(inputs, samples=SAMPLES, generator=torch.Generator().manual_seed(seed), mode=mode)
        seconds = time.perf_counter() - t0
        print(f"4. the prior's predictive, mode {mode!r}{' (default)' if mode == DEFAULT_MODE else ''}, "
              f"{SAMPLES} samples{' in antithetic pairs' if pred.antithetic else ''}, {seconds:.1f} s "
              "(nats: total = aleatoric + epistemic)")
        for i, name in enumerate(names):
            label = info.index_to_description(int(pred.probs[i].argmax()))
            rows.append({"mode": mode, "input": name, "label": label, "prob": float(pred.probs[i].max()),
                         "entropy": float(pred.entropy[i]), "expected_entropy": float(pred.expected_entropy[i]),
                         "mutual_information": float(pred.mutual_information[i])})
            print(f"   {name:>7s}: {label[:28]:<28s} p={rows[-1]['prob']:.2f}  total={pred.entropy[i]:.3f}  "
                  f"aleatoric={pred.expected_entropy[i]:.3f}  epistemic={pred.mutual_information[i]:.4f}")
    result = {
        "model": "efficientnet_lite0 (offline ImageNet weights)", "crops": prior.meta["curvature"]["n"],
        "build_seconds": t_build, "coverage": covered / n_params, "blocks": len(kinds),
        "artifact_bytes": sizes, "save_load_seconds": t_io, "scales_summary": scales,
        "hub": {"repo_id": DEMO_REPO, "commit": commit, "cache_dir": str(hub_cache)},
        "predictive": rows, "samples": SAMPLES, "holdout": prior.meta["holdout"],
    }
    if transfer:
        from zoo.demo_transfer import QUICK, TransferPlan, run_transfer

        ood = [*photos, ("noise", Image.fromarray(((noise[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
                                                  .to(torch.uint8).numpy()))]
        result["transfer"] = run_transfer(path, out, ood, seed=seed, plan=QUICK if quick else TransferPlan())
    result["steps"] = ["pretrained", "prior", "save_load", "predictive"] + (
        ["finetune", "certificate", "transfer_predictive", "report", "serve"] if transfer else [])
    result["total_seconds"] = time.perf_counter() - t_start
    print(f"done in {result['total_seconds']:.0f} s")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=lambda o: np.asarray(o).tolist()))
    return result
