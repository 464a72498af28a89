"""`zoo demo`: the largest end-to-end path, offline, on CPU, in about a minute.

1. A real ImageNet network: timm's efficientnet_lite0 with the offline weights (zoo.pretrained); it labels
   scikit-learn's two sample photos.
2. Whole-network K-FAC (MC Fisher) on random crops of those photos: every trainable parameter gets a block.
3. A Kronecker-factored Laplace posterior N(θ*, (F + λI)⁻¹) per layer through zoo.kron (exact: one term plus
   damping), decomposed once, with λ = d/‖θ‖² per layer (the fitted PAC-Bayes scales arrive with `zoo build`).
4. A last-layer predictive (labelled as such): 32 classifier draws give probabilities, total entropy,
   aleatoric (expected entropy) and epistemic (mutual information) uncertainty for the photos and a noise image.

This is a smoke build on two photos, not an ImageNet prior; the full loop replaces it as the issues land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from zoo.curvature import DiagonalBlock, KronBlock, kfac
from zoo.kron import KronPrecision
from zoo.pretrained import efficientnet_lite0

CROPS = 24
SAMPLES = 32


def isotropic_precision(weight: torch.Tensor) -> float:
    """λ = d / ‖θ‖²: the maximum-likelihood precision of an isotropic zero-mean Gaussian for the layer's weights."""
    return weight.numel() / weight.double().square().sum().item()


def _sample_photos() -> list[tuple[str, Image.Image]]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return [(Path(f).stem, Image.fromarray(a)) for f, a in zip(photos.filenames, photos.images, strict=True)]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def run_demo(json_path: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the demo, print a report, and return (and optionally write) the measured results."""
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    model = efficientnet_lite0().eval()
    cfg = resolve_data_config(model=model)
    evaluate = create_transform(**cfg)
    train = create_transform(**cfg, is_training=True, hflip=0.5, color_jitter=0.0)
    photos = _sample_photos()
    info = ImageNetInfo()
    x_eval = torch.stack([evaluate(img) for _, img in photos])
    with torch.no_grad():
        top = model(x_eval).softmax(-1).max(-1)
    print("1. pretrained efficientnet_lite0 (offline ImageNet weights)")
    for (name, _), p, i in zip(photos, top.values, top.indices, strict=True):
        print(f"   {name:>7s}: {info.index_to_description(int(i))} ({p:.2f})")

    crops = torch.stack([train(photos[i % len(photos)][1]) for i in range(CROPS)])
    labels = torch.zeros(CROPS, dtype=torch.long)  # unused by the MC Fisher
    loader = [(crops[i : i + 8], labels[i : i + 8]) for i in range(0, CROPS, 8)]
    t0 = time.perf_counter()
    blocks = kfac(model, loader, fisher="mc", generator=torch.Generator().manual_seed(seed), progress=True)
    t_kfac = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kron = {k: b for k, b in blocks.items() if isinstance(b, KronBlock)}
    diag = {k: b for k, b in blocks.items() if isinstance(b, DiagonalBlock)}
    covered = sum(
        (b.A.shape[0] * b.G.shape[0] if isinstance(b, KronBlock) else sum(v.numel() for v in b.diagonal.values()))
        for b in blocks.values()
    )
    print(f"2. K-FAC (MC) on {blocks.n} crops in {t_kfac:.1f} s: {len(kron)} Kronecker + {len(diag)} diagonal blocks,"
          f" {covered:,} of {n_params:,} parameters covered ({100 * covered / n_params:.1f}%)")

    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    lambdas = {k: isotropic_precision(modules[k].weight) for k in kron}
    posteriors = {k: KronPrecision([(b.A, b.G)], damping=lambdas[k]) for k, b in kron.items()}
    for p in posteriors.values():
        p.decomposition()
    t_dec = time.perf_counter() - t0
    print(f"3. Laplace posterior N(θ*, (F + λI)⁻¹), λ = d/‖θ‖² per layer (classifier: {lambdas['classifier']:.0f}): "
          f"{len(posteriors)} layers decomposed in {t_dec:.1f} s (float64)")

    head = model.get_classifier()
    post = posteriors["classifier"]
    noise = torch.rand(1, *x_eval.shape[1:], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    inputs = torch.cat([x_eval, noise])
    names = [n for n, _ in photos] + ["noise"]
    with torch.no_grad():
        features = model.forward_head(model.forward_features(inputs), pre_logits=True)
        mean = torch.cat([head.weight, head.bias[:, None]], dim=1)  # (out, in + 1): the bias is the last column
        draws = mean + post.sample(SAMPLES, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        feats = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        probs_s = torch.einsum("ni,soi->sno", feats, draws).softmax(-1)
    probs = probs_s.mean(0)
    entropy = _entropy(probs)
    aleatoric = _entropy(probs_s).mean(0)
    epistemic = entropy - aleatoric
    print(f"4. last-layer K-FAC Laplace predictive, {SAMPLES} samples (nats)")
    rows = []
    for i, name in enumerate(names):
        label = info.index_to_description(int(probs[i].argmax()))
        rows.append({"input": name, "label": label, "prob": float(probs[i].max()), "entropy": float(entropy[i]),
                     "expected_entropy": float(aleatoric[i]), "mutual_information": float(epistemic[i])})
        print(f"   {name:>7s}: {label[:28]:<28s} p={rows[-1]['prob']:.2f}  total={entropy[i]:.3f}  "
              f"aleatoric={aleatoric[i]:.3f}  epistemic={epistemic[i]:.4f}")
    result = {
        "model": "efficientnet_lite0 (offline ImageNet weights)", "crops": int(blocks.n), "kfac_seconds": t_kfac,
        "coverage": covered / n_params, "kron_blocks": len(kron), "diagonal_blocks": len(diag),
        "decompose_seconds": t_dec, "predictive": rows, "samples": SAMPLES,
        "total_seconds": time.perf_counter() - t_start,
    }
    print(f"done in {result['total_seconds']:.0f} s")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=lambda o: np.asarray(o).tolist()))
    return result
