"""The build pipeline behind `zoo build`: weights + ImageFolder data → curvature → scales → artifact → card.

Four steps, as docs/design.md's data flow says:

1. the curvature pass (`zoo.build_prior` → `zoo.curvature.kfac`): resumable from a checkpoint in
   ``OUT/.checkpoint`` (`--resume`), and distributed when started under torchrun (kfac gives rank r the
   batches r, r+w, ... of the same deterministic loader and all-reduces the partial sums);
2. the PAC-Bayes scale fit (inside `zoo.build_prior`);
3. the artifact (`Prior.save`: config.json, model.safetensors, prior.safetensors, prior_config.json);
4. the rendered model card (README.md, with the entry's repository id and the command that rebuilds it).

`dry_run` instead measures the curvature pass on a few batches and extrapolates time and memory to the whole
data set, so nobody starts a multi-day ImageNet pass blind.
"""

from __future__ import annotations

import math
import os
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from builders.recipes import Recipe, generic_recipe, get_recipe, recipes
from zoo.errors import ConfigError, DataError, ModelError

WEIGHT_SOURCES = ("timm", "pypi", "random")
CHECKPOINT_DIR = ".checkpoint"


@dataclass
class BuildOptions:
    """Everything `zoo build` takes; None means "the recipe's value"."""

    model: str
    data: Path
    out: Path | None = None
    recipe: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    fisher: str | None = None
    batch_size: int | None = None
    resolution: int | None = None
    lam: float | None = None
    objective: str | None = None
    workers: int | None = None
    device: str | None = None
    resume: bool = False
    checkpoint_every: int = 100
    seed: int = 0
    smoke: bool = False
    repo_id: str | None = None
    dry_run: bool = False
    dry_run_batches: int = 3
    progress: bool = True


@dataclass
class Source:
    """The model to build on, and what the card says about its weights."""

    model: nn.Module
    weights: str
    base_model: str | None
    num_classes: int


@dataclass
class Estimate:
    """What a dry run measured and what it extrapolates to."""

    name: str
    device: str
    batch_size: int
    input_size: tuple[int, ...]
    images: int
    seconds: float
    peak_bytes: int
    peak_what: str
    factor_bytes: int
    weight_bytes: int
    kron_blocks: int
    diag_blocks: int
    targets: list[tuple[str, int]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.inf

    def seconds_for(self, images: int, processes: int = 1) -> float:
        return images / self.images_per_second / processes

    @property
    def artifact_bytes(self) -> int:
        """model.safetensors + factors + their eigendecompositions (eigenvectors as large as the factor)."""
        return self.weight_bytes + 2 * self.factor_bytes

    def report(self) -> str:
        h, w = self.input_size[-2:]
        lines = [
            f"dry run: {self.name} on {self.device}, batch {self.batch_size}, {h}×{w}",
            f"  measured: {self.images} images in {self.seconds:.1f} s after a warm-up batch "
            f"→ {self.images_per_second:.2f} images/s per process",
            f"  curvature: {self.kron_blocks} Kronecker + {self.diag_blocks} diagonal blocks, "
            f"factors {gib(self.factor_bytes)} (float32)",
            f"  peak memory: {gib(self.peak_bytes)} ({self.peak_what})",
        ]
        for what, images in self.targets:
            one = self.seconds_for(images)
            lines.append(f"  estimated time for {what} ({images:,} images): {duration(one)} on 1 process; "
                         f"about {duration(one / 8)} with torchrun --nproc-per-node 8")
        lines.append(f"  estimated memory: {gib(self.peak_bytes)} per process for any data-set size "
                     f"(the pass streams; the factors do not grow with N); artifact about "
                     f"{gib(self.artifact_bytes)} on disk")
        lines.append("  not included: the one-off eigendecompositions and scale fit after the pass")
        return "\n".join(lines)


def gib(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), for humans."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    """Seconds as '41 s', '12 min', '5 h 3 min' or '3 d 4 h'."""
    if not math.isfinite(seconds):
        return "unknown"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# ---------------------------------------------------------------------------------------------------- recipe


def resolve_recipe(options: BuildOptions) -> Recipe:
    """The recipe named by --recipe or by MODEL, else timm defaults; command-line options override it."""
    if options.recipe is not None:
        recipe = get_recipe(options.recipe)
        if options.model not in (recipe.name, recipe.timm_name, recipe.architecture):
            raise ConfigError(f"recipe {recipe.name!r} builds {recipe.timm_name}, not {options.model!r}; "
                              "drop --recipe or name the recipe's model")
    elif options.model in recipes():
        recipe = recipes()[options.model]
    else:
        if not timm.is_model(options.model.split(".")[0]):
            raise ConfigError(f"{options.model!r} is neither a recipe ({', '.join(recipes())}) nor a timm "
                              "model; see timm.list_models() for names")
        recipe = generic_recipe(options.model)
    if options.weights is not None and options.weights not in WEIGHT_SOURCES \
            and not options.weights.endswith(".safetensors"):
        raise ConfigError(f"--weights {options.weights!r}: use timm, pypi, random or a path to a .safetensors file")
    return recipe.with_options(weights=options.weights, fisher=options.fisher, batch_size=options.batch_size,
                               resolution=options.resolution, lam=options.lam, objective=options.objective)


# ---------------------------------------------------------------------------------------------------- weights


def classifier_key(model: nn.Module) -> str:
    """The state-dict prefix of the model's classifier, from timm's pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0]
    return name or "fc"


def create_model(recipe: Recipe, num_classes: int | None, data_classes: int) -> Source:
    """The network whose weights become the prior mean, with the class count the build asks for."""
    weights = recipe.weights
    if weights == "pypi":
        if recipe.architecture != "efficientnet_lite0":
            raise ConfigError(f"--weights pypi exists only for efficientnet_lite0, not {recipe.architecture}; "
                              "use timm, random or a .safetensors file")
        from zoo.pretrained import efficientnet_lite0

        model = efficientnet_lite0()
        source = Source(model, "pypi", None, model.num_classes)
    elif weights == "timm":
        try:
            model = timm.create_model(recipe.timm_name, pretrained=True)
        except Exception as err:  # timm surfaces hub, network and cache failures as many exception types
            raise ModelError(
                f"cannot get timm's pretrained weights for {recipe.timm_name} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); set HF_ENDPOINT to a reachable hub, "
                "pre-populate the HF cache, or pass --weights path.safetensors (or --weights random for a smoke "
                "build)"
            ) from err
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = Source(model, "timm", cfg.get("hf_hub_id") or None, model.num_classes)
    elif weights == "random":
        model = timm.create_model(recipe.timm_name, pretrained=False, num_classes=num_classes or data_classes)
        source = Source(model, "random", None, model.num_classes)
        return source
    else:
        source = _from_safetensors(recipe, Path(weights))
    if num_classes is not None and num_classes != source.num_classes:
        source.model.reset_classifier(num_classes)
        source.num_classes = num_classes
    return source


def _from_safetensors(recipe: Recipe, path: Path) -> Source:
    """A timm model with weights from a local safetensors file (class count read from its classifier)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file; pass a .safetensors state dict of {recipe.timm_name}")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise ModelError(f"{path} is not a readable safetensors file ({err}); re-export it with "
                         "safetensors.torch.save_file(model.state_dict(), ...)") from err
    probe = timm.create_model(recipe.timm_name, pretrained=False)
    key = f"{classifier_key(probe)}.weight"
    classes = int(state[key].shape[0]) if key in state else probe.num_classes
    model = timm.create_model(recipe.timm_name, pretrained=False, num_classes=classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path} does not fit {recipe.timm_name}: {str(err).splitlines()[0]}; pass the weights "
                         "of this architecture (or name the matching model)") from err
    return Source(model, str(path), None, classes)


# ---------------------------------------------------------------------------------------------------- data


def image_root(data: Path) -> Path:
    """The ImageFolder root: DATA/train in the ImageNet layout, else DATA itself."""
    if not data.is_dir():
        raise DataError(f"--data {data} is not a directory; pass an ImageFolder (DIR/train/<class>/*.JPEG "
                        "or DIR/<class>/*.jpg)")
    train = data / "train"
    return train if train.is_dir() else data


def imagenet_indices(classes: list[str], num_classes: int) -> dict[str, int] | None:
    """ImageNet's own class indices when every folder is an ImageNet-1k wnid and the model has 1000 classes.

    Then a subset of ImageNet (or a few test images in wnid folders) gets the labels the pretrained head uses,
    instead of the positions of the folders that happen to be present.
    """
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    wnids = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    if classes and all(c in wnids for c in classes):
        return {c: wnids[c] for c in classes}
    return None


def image_dataset(data: Path, transform: Any, num_classes: int | None) -> Dataset[Any]:
    """The images under `data` as (tensor, label) pairs through torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = image_root(data)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} holds no class folders; lay the images out as {root}/<class>/<image>.jpg")
    mapping = imagenet_indices(classes, num_classes) if num_classes else None

    class Folder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return classes, mapping or {c: i for i, c in enumerate(classes)}

    try:
        dataset = Folder(str(root), transform=transform)
    except FileNotFoundError as err:
        raise DataError(f"{root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders") from err
    labels = max(dataset.class_to_idx.values()) + 1
    if num_classes is not None and labels > num_classes:
        raise DataError(f"{root} has {len(classes)} class folders but the model has {num_classes} classes; pass "
                        f"--num-classes {len(classes)} (a new head) or use folders named by ImageNet wnids")
    return dataset


def count_classes(data: Path) -> int:
    """The number of class folders, for --weights random without --num-classes."""
    root = image_root(data)
    n = sum(1 for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if n == 0:
        raise DataError(f"{root} holds no class folders; lay the images out as {root}/<class>/<image>.jpg")
    return n


def transform_for(model: nn.Module, resolution: int) -> tuple[Any, tuple[int, ...]]:
    """timm's evaluation transform from the model's own pretrained_cfg, at the recipe's resolution."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(args={"input_size": (3, resolution, resolution)}, model=model)
    return create_transform(**cfg), tuple(cfg["input_size"])


def make_loader(dataset: Dataset[Any], batch_size: int, workers: int, device: torch.device) -> DataLoader[Any]:
    """A deterministic loader (fixed order, so a resumed pass sees the same batches)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


# ---------------------------------------------------------------------------------------------------- devices


def distributed_setup(device: str | None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when there is one; return (rank, world, device)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)  # "--device cuda" means this rank's GPU
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


# ---------------------------------------------------------------------------------------------------- steps


@dataclass
class Prepared:
    """A resolved build: recipe, model on its device, data set, and the process's place in the group."""

    recipe: Recipe
    source: Source
    dataset: Dataset[Any]
    input_size: tuple[int, ...]
    device: torch.device
    rank: int
    world: int


def prepare(options: BuildOptions) -> Prepared:
    """Resolve the recipe, create the model, and open the data, checking each before any long work."""
    recipe = resolve_recipe(options)
    rank, world, device = distributed_setup(options.device)
    data_classes = count_classes(options.data) if recipe.weights == "random" and options.num_classes is None \
        else 0
    source = create_model(recipe, options.num_classes, data_classes)
    source.model.to(device).eval()
    transform, input_size = transform_for(source.model, recipe.resolution)
    dataset = image_dataset(options.data, transform, source.num_classes)
    return Prepared(recipe, source, dataset, input_size, device, rank, world)


def is_smoke(options: BuildOptions, prepared: Prepared) -> tuple[bool, str]:
    """Whether this build is a smoke build, and why: not the recipe's data, or not real weights."""
    if options.smoke:
        return True, "--smoke"
    if prepared.recipe.weights == "random":
        return True, "random weights"
    expected = prepared.recipe.data.num_images
    found = len(prepared.dataset)  # type: ignore[arg-type]
    if expected is not None and found < expected:
        return True, f"{found:,} images, not the recipe's {expected:,} ({prepared.recipe.data.description})"
    return False, ""


def dataset_name(options: BuildOptions, prepared: Prepared, smoke: bool) -> str:
    """The data set recorded in the metadata: the recipe's id for a full build, else the folder's name."""
    if not smoke and prepared.recipe.data.dataset != "custom":
        return prepared.recipe.data.dataset
    root = image_root(options.data)
    return (root.parent.name if root.name == "train" else root.name) or "local images"


def build_command(options: BuildOptions, recipe: Recipe) -> str:
    """The `zoo build` line that rebuilds the entry on its full data, for the card."""
    parts = ["zoo", "build", recipe.name, "--data", "/path/to/imagenet" if recipe.data.num_images else "DATA_DIR",
             "--out", "OUT_DIR", "--fisher", recipe.fisher]
    if recipe.weights not in ("timm", "pypi", "random"):
        parts += ["--weights", "path/to/weights.safetensors"]
    return shlex.join(parts)


def build(options: BuildOptions) -> Path:
    """Run the four steps and return the artifact directory (rank 0 writes; other ranks return it unwritten)."""
    import zoo

    resolve_recipe(options)  # a wrong name or option fails before anything else
    if options.out is None:
        raise ConfigError("zoo build needs --out DIR for the artifact (or --dry-run to only estimate)")
    prepared = prepare(options)
    recipe, model = prepared.recipe, prepared.source.model
    smoke, why = is_smoke(options, prepared)
    loader = make_loader(prepared.dataset, recipe.batch_size, _workers(options), prepared.device)
    if prepared.rank == 0:
        note = f" (smoke build: {why})" if smoke else ""
        print(f"zoo build: {recipe.name}, weights {prepared.source.weights}, {prepared.source.num_classes} classes, "
              f"{len(prepared.dataset):,} images, {recipe.curvature} {recipe.fisher}, batch {recipe.batch_size}, "  # type: ignore[arg-type]
              f"{prepared.world} process(es) on {prepared.device}{note}", file=sys.stderr)
    generator = torch.Generator().manual_seed(options.seed)
    prior = zoo.build_prior(
        model, loader, recipe.fisher, lam=recipe.lam, objective=recipe.objective, generator=generator,
        progress=options.progress, checkpoint_dir=str(options.out / CHECKPOINT_DIR),
        checkpoint_every=options.checkpoint_every, resume=options.resume,
        dataset=dataset_name(options, prepared, smoke), smoke=smoke, timm_name=recipe.timm_name,
        approx=recipe.approx,
        # a smoke folder's class indices are not the network's classes, so nothing can be checked against them
        holdout=0.0 if smoke else 0.1,
    )
    if prepared.rank != 0:
        return options.out
    if prepared.source.weights != "timm":
        prior.meta["base_model"] = None  # the mean is not timm's published checkpoint of this name
    if smoke:
        prior.meta["datasets"] = []
    model.cpu()
    prior.save(options.out, model=model)
    from zoo.card import write_card

    meta = dict(prior.meta)
    write_card(options.out, meta, repo_id=options.repo_id or recipe.repo_id,
               plan=recipe.plan(), build_command=build_command(options, recipe))
    return options.out


def _workers(options: BuildOptions) -> int:
    if options.workers is not None:
        return max(0, options.workers)
    return min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------- dry run


class _FirstBatches:
    """The first `count` batches of a loader, with the loader's dataset (for kfac's progress total)."""

    def __init__(self, loader: DataLoader[Any], start: int, count: int) -> None:
        self.loader, self.start, self.count = loader, start, count

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i >= self.start + self.count:
                return
            if i >= self.start:
                yield batch


def _peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA, torch.cuda.max_memory_allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib * 1024, "process peak RSS, including Python and torch"


def dry_run(options: BuildOptions) -> Estimate:
    """Time the curvature pass on a few batches and extrapolate to the folder's and the recipe's data set."""
    from zoo.curvature import DiagonalBlock, KronBlock, kfac

    prepared = prepare(options)
    recipe, model = prepared.recipe, prepared.source.model
    loader = make_loader(prepared.dataset, recipe.batch_size, _workers(options), prepared.device)
    batches = -(-len(prepared.dataset) // recipe.batch_size)  # type: ignore[arg-type]
    if batches < 2:
        raise DataError(f"a dry run needs at least 2 batches of {recipe.batch_size} images and the data has "
                        f"{len(prepared.dataset)}; add images or pass a smaller --batch-size")  # type: ignore[arg-type]
    timed = max(1, min(options.dry_run_batches, batches - 1))
    kfac(model, _FirstBatches(loader, 0, 1), recipe.fisher, approx=recipe.approx, progress=False)  # warm-up
    if prepared.device.type == "cuda":
        torch.cuda.synchronize(prepared.device)
        torch.cuda.reset_peak_memory_stats(prepared.device)
    start = time.perf_counter()
    result = kfac(model, _FirstBatches(loader, 1, timed), recipe.fisher, approx=recipe.approx,
                  progress=options.progress)
    if prepared.device.type == "cuda":
        torch.cuda.synchronize(prepared.device)
    seconds = time.perf_counter() - start
    factor_bytes = 0
    kron = diag = 0
    for block in result.values():
        if isinstance(block, KronBlock):
            kron += 1
            factor_bytes += 4 * (block.A.numel() + block.G.numel())
        elif isinstance(block, DiagonalBlock):
            diag += 1
            factor_bytes += 4 * sum(v.numel() for v in block.diagonal.values())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    peak, what = _peak_bytes(prepared.device)
    found = len(prepared.dataset)  # type: ignore[arg-type]
    targets = [(f"the folder {options.data}", found)]
    if recipe.data.num_images and recipe.data.num_images != found:
        targets.append((f"{recipe.data.description}, the recipe's data", recipe.data.num_images))
    return Estimate(
        name=f"{recipe.name} ({prepared.source.weights} weights), {recipe.curvature} {recipe.fisher}",
        device=str(prepared.device), batch_size=recipe.batch_size, input_size=prepared.input_size,
        images=result.n, seconds=seconds, peak_bytes=peak, peak_what=what, factor_bytes=factor_bytes,
        weight_bytes=weight_bytes, kron_blocks=kron, diag_blocks=diag, targets=targets,
    )
