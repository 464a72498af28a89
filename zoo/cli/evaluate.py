"""`zoo evaluate RUN_OR_REPO --data DIR [--ood DIR] --out DIR`: the evaluation report of a prior or posterior."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo evaluate` to the CLI\'s sub-parsers."""
    p = sub.add_parser(
        "evaluate", help="write an evaluation report (metrics.json, figures, report.md/.html) for a prior or posterior",
        description="Predict --data (an ImageFolder: one sub-folder per class, named like the model's classes) and "
                    "optionally --ood (any folder of images) with the model's predictive, and write report.md, "
                    "report.html (self-contained), metrics.json and PNG figures to --out.",
    )
    p.add_argument("ref", metavar="RUN_OR_REPO",
                   help="a `zoo finetune` run directory, a prior or posterior repository, or hf-hub:org/name")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled test images, one sub-folder per class")
    p.add_argument("--ood", default=None, metavar="DIR", help="images the model has never seen (any layout)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the report (created)")
    p.add_argument("--samples", type=int, default=32, help="weight draws of the predictive")
    p.add_argument("--mode", default=None, choices=("glm", "nn", "fast"), help="predictive mode (default: glm)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_evaluate)


def _class_index(data_classes: list[str], model_classes: list[str] | None, num_classes: int) -> list[int]:
    """The model's class index of each data folder: by name when the model has names, else folder order."""
    if model_classes is None:
        if len(data_classes) > num_classes:
            raise DataError(f"--data has {len(data_classes)} class folders but the model predicts {num_classes} "
                            "classes; evaluate on the classes the model was trained on")
        return list(range(len(data_classes)))
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise DataError(f"--data folders {missing[:5]} are not classes of this model (it knows "
                        f"{model_classes[:10]}{'…' if len(model_classes) > 10 else ''}); rename the folders")
    return [model_classes.index(c) for c in data_classes]


def _label_names(ref: str, num_classes: int) -> list[str] | None:
    """timm's config.json `label_names` of the repository, when it ships one per class."""
    from zoo.hub import download
    from zoo.loading import one_name_per_class

    try:
        config = json.loads((Path(download(ref)) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return one_name_per_class(config.get("label_names"), num_classes)


def ood_images(root: str, transform: Any) -> Any:
    """Every image file under `root` (recursively), transformed; unreadable files are a DataError."""
    import torch
    from PIL import Image

    path = Path(root)
    if not path.is_dir():
        raise DataError(f"--ood {root} is not a directory; pass a folder of images")
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"--ood {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            try:
                with Image.open(files[i]) as img:
                    return transform(img.convert("RGB")), -1
            except (OSError, Image.DecompressionBombError) as err:
                raise DataError(f"cannot read OOD image {files[i]} ({err}); remove it or convert it") from err

    return Files()


def _predict(model_like: Any, loader: Any, samples: int, mode: str | None, seed: int) -> tuple[Any, Any, bool]:
    """(report Outputs, labels, whether the draws came in antithetic pairs) over a loader, one generator for all
    batches so the run is reproducible."""
    import torch

    from zoo.report import Outputs

    gen = torch.Generator().manual_seed(seed)
    probs, ent, mi, labels, paired = [], [], [], [], False
    for x, y in loader:
        pred = model_like.predict(x, samples=samples, generator=gen, mode=mode)
        probs.append(pred.probs.double())
        ent.append(pred.entropy.double())
        mi.append(pred.mutual_information.double())
        labels.append(torch.as_tensor(y))
        paired = pred.antithetic
    return Outputs(torch.cat(probs), torch.cat(ent), torch.cat(mi)), torch.cat(labels), paired


def _evaluate(args: argparse.Namespace) -> int:
    import timm.data
    import torch

    import zoo
    from zoo.certificate import Certificate
    from zoo.cli.finetune import CERTIFICATE_FILE, image_folder
    from zoo.posterior import Posterior
    from zoo.report import write_report

    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    model, prior = zoo.load(args.ref)
    kind = prior.meta.get("kind", "prior")
    model_like = Posterior.from_prior(model, prior) if kind == "posterior" else prior
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    data = image_folder(args.data, transform, None, args.seed)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    from zoo.loading import one_name_per_class

    names = one_name_per_class(prior.meta.get("classes"), num_classes) or _label_names(args.ref, num_classes)
    index = _class_index(list(data.classes), names, num_classes)
    data.target_transform = lambda t: index[t]
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    ind, labels, paired = _predict(model_like, loader, args.samples, args.mode, args.seed)
    ood = None
    if args.ood:
        ood_loader = torch.utils.data.DataLoader(ood_images(args.ood, transform), batch_size=args.batch_size)
        ood, _, _ = _predict(model_like, ood_loader, args.samples, args.mode, args.seed + 1)
    certificate = None
    cert_file = Path(args.ref) / CERTIFICATE_FILE
    if cert_file.is_file():
        certificate = json.loads(cert_file.read_text())
    elif isinstance(prior.meta.get("certificate"), dict):
        certificate = prior.meta["certificate"]
    text = str(Certificate.from_dict(certificate)) if certificate else None
    class_names = names if names is not None else [str(c) for c in range(num_classes)]
    facts = {"model": str(args.ref), "kind": kind, "architecture": prior.meta.get("architecture"),
             "predictive": f"{args.mode or 'default'} mode, {args.samples} samples"
                           f"{' in antithetic pairs' if paired else ''}, seed {args.seed}",
             "data": f"{args.data} ({len(data)} images, {len(data.classes)} classes)",
             "ood": f"{args.ood} ({ood.probs.shape[0]} images)" if ood is not None else "none"}
    paths = write_report(args.out, ind, labels, ood=ood, class_names=class_names, facts=facts,
                         title=f"prior-zoo evaluation: {Path(str(args.ref)).name}", certificate=certificate,
                         certificate_text=text)
    result = json.loads(paths["metrics.json"].read_text())["metrics"]
    print(f"accuracy {result['accuracy']:.4f}  NLL {result['nll']:.4f}  ECE {result['ece']:.4f}  "
          f"Brier {result['brier']:.4f}" + (f"  OOD AUROC (entropy) {result['ood_auroc_entropy']:.4f}"
                                            if result.get("ood_auroc_entropy") is not None else ""))
    print(f"report written to {paths['report.html']}")
    return 0
