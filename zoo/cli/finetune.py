"""`zoo finetune`: the fine-tuning loop on an ImageFolder, writing a posterior run with its certificate."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError, DataError

CERTIFICATE_FILE = "certificate.json"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo finetune` to the CLI's sub-parsers."""
    p = sub.add_parser(
        "finetune", help="PAC-Bayes fine-tuning of a prior on an ImageFolder; writes a posterior with a certificate",
        description="Load PRIOR (directory or hf-hub:org/name), replace its head for the classes in --data, "
                    "fine-tune with the PAC-Bayes objective, fit the posterior, certify it on the training data "
                    "and write the posterior repository to --out (atomically).",
    )
    p.add_argument("prior", metavar="PRIOR", help="a prior or posterior repository (local directory or hf-hub:...)")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder: one sub-folder of images per class")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to write (replaced if it exists)")
    p.add_argument("--val", default=None, metavar="DIR",
                   help="labelled held-out images, an ImageFolder with the same class folders: their NLL is "
                        "recorded every epoch; with at least 5 per class they set a new head's scale where the "
                        "training images cannot (one shot per class), and with at least 20 per class they also "
                        "choose the posterior's width T (the one whose predictive is best on them)")
    p.add_argument("--objective", default="catoni", choices=("catoni", "mcallester", "map"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-4,
                   help="Adam's learning rate (default 3e-4, for pretrained ImageNet networks: efficientnet_lite0 on "
                        "5 digits per class at 64 px reached 0.83 held-out accuracy at 3e-4, 0.81 at 1e-4, 0.62 at "
                        "1e-3, chance at 3e-3; zoo.finetune's 3e-3 suits small networks trained from scratch)")
    p.add_argument("--lr-retries", type=int, default=2,
                   help="a fit whose training NLL did not fall, or stayed near chance, restarts from the start at a "
                        "tenth of the rate, up to this many times (0: never); the run's prior_config.json records "
                        "the rate used")
    p.add_argument("--shots", type=int, default=None, help="use at most this many images per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--samples", type=int, default=100, help="weight draws for the certificate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-head", action="store_true", help="keep the prior's head (same task, same classes)")
    p.add_argument("--no-head-refit", action="store_true",
                   help="keep the new head as trained instead of re-fitting it at the precision its evidence prefers "
                        "(zoo.finetune(refit_head=False)); Q's spread then tempers it. Measured better on the ImageNet "
                        "efficientnet_lite0 at 5 images per class, mixed at 1, worse on small networks trained from "
                        "scratch (README, 'Where ours still loses')")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="train at PX × PX (timm's eval transform at that size) and record it in the posterior's "
                        "config.json, so that zoo serve and zoo evaluate preprocess the same way (default: the "
                        "prior's input size; small images on a CPU want less than 224)")
    p.add_argument("--norm-statistics", choices=("keep", "adapt"), default=None,
                   help="BatchNorm's running statistics: keep the prior's, or adapt: re-estimate them on the "
                        "training images first (AdaBN), which a domain shift such as ImageNet to digits needs (kept, "
                        "such a network can stay at chance); the certificate does not account for adapting on its "
                        "own data. Default: keep, and for --certificate data-dependent adapt on the prior's half")
    p.add_argument("--head-curvature", choices=("bohning", "fisher"), default="bohning",
                   help="a new head's curvature in Q: Böhning's bound on the softmax Hessian, so its spread grows "
                        "on inputs unlike the training images (default), or K-FAC's output factor, near zero once "
                        "the head fits. --certificate data-dependent always uses fisher, as its figures were measured")
    p.add_argument("--certificate", choices=("training", "data-dependent"), default="training",
                   help="training: fine-tune on all the data and certify against the prior (vacuous for small n); "
                        "data-dependent: re-centre the prior on half the data, fit Q's width and certify on the rest "
                        "(zoo.certified; the run's posterior is then that Q)")
    p.set_defaults(handler=_finetune)


def image_folder(root: str, transform: Any, shots: int | None, seed: int, *, flag: str = "--data") -> Any:
    """The ImageFolder at `root`, optionally `shots` images per class (chosen by `seed`); ZooError when unusable."""
    import torch
    from torchvision.datasets import ImageFolder

    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{flag} {root} is not a directory; pass an ImageFolder (one sub-folder per class)")
    try:
        data = ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"{flag} {root} holds no readable images ({err}); put images in one sub-folder per class"
                        ) from err
    if len(data.classes) < 2:
        raise DataError(f"{flag} {root} has {len(data.classes)} class folder(s); a classifier needs at least two")
    if shots is None:
        return data
    if shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {shots}")
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(data.targets)
    keep = []
    for k in range(len(data.classes)):
        idx = torch.nonzero(targets == k).flatten()
        keep += idx[torch.randperm(idx.numel(), generator=g)][:shots].tolist()
    return torch.utils.data.Subset(data, sorted(keep))


def _finetune(args: argparse.Namespace) -> int:
    import timm.data
    import torch

    import zoo
    from zoo.calibration import VALIDATION_PER_CLASS
    from zoo.certified import certify_data_dependent
    from zoo.predictive import pinned_heads
    from zoo.tuning import finetune

    out = Path(args.out)
    probe = image_folder(args.data, None, None, args.seed)
    classes = probe.classes
    model, prior = zoo.load(args.prior, num_classes=len(classes), reset_head=not args.keep_head)
    if args.resolution is not None:
        if args.resolution < 1:
            raise ConfigError(f"--resolution must be a positive number of pixels, got {args.resolution}")
        # saved in config.json: the posterior is served and evaluated at the size it was trained at
        model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, args.resolution, args.resolution))
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    data = image_folder(args.data, transform, args.shots, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=g)
    fixed = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    val_loader = None
    if args.val is not None:
        if args.certificate == "data-dependent":
            raise ConfigError("--val works with --certificate training; the data-dependent certificate holds out "
                              "part of --data itself")
        held = image_folder(args.val, transform, None, args.seed, flag="--val")
        if held.classes != classes:
            raise DataError(f"--val {args.val} has class folders {held.classes}, --data has {classes}; use the same "
                            "class folder names in both")
        val_loader = torch.utils.data.DataLoader(held, batch_size=args.batch_size, shuffle=False)
    norms = {} if args.norm_statistics is None else {"norm_statistics": args.norm_statistics}  # else each path's own
    if args.certificate == "data-dependent":
        if args.objective == "map":
            raise ConfigError("--certificate data-dependent fits Q's width on a bound; use --objective catoni or "
                              "mcallester")
        run = certify_data_dependent(model, prior, fixed, objective=args.objective, epochs=args.epochs, lr=args.lr,
                                     delta=args.delta, samples=args.samples,
                                     generator=torch.Generator().manual_seed(args.seed), progress=True, **norms)
        posterior, cert = run.posterior, run.certificate
        print(run.describe())
    else:
        posterior = finetune(model, prior, loader, args.objective, epochs=args.epochs, lr=args.lr,
                             lr_retries=args.lr_retries, delta=args.delta,
                             generator=torch.Generator().manual_seed(args.seed), dataset=str(args.data),
                             prior_ref=str(args.prior), head_curvature=args.head_curvature, val_loader=val_loader,
                             refit_head=not args.no_head_refit, **norms)
        cert = posterior.certificate(fixed, delta=args.delta, samples=args.samples,
                                     generator=torch.Generator().manual_seed(args.seed + 1), progress=True)
    posterior.meta["classes"] = list(classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        posterior.save(str(tmp / "repo"))
        for item in (tmp / "repo").iterdir():
            item.rename(tmp / item.name)
        (tmp / "repo").rmdir()
        (tmp / CERTIFICATE_FILE).write_text(json.dumps(cert.to_dict(), indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(cert)
    refits = (posterior.meta.get("head_refit") or {}).get("heads") or {}
    for head in pinned_heads(posterior):
        scaled = (f"was scaled on the {len(val_loader.dataset)} --val images"
                  if val_loader is not None and refits.get(head, {}).get("rule") == "validation"
                  else f"could not be scaled from {len(data)} training images (as at one image per class; --val with "
                       f"{VALIDATION_PER_CLASS} or more held-out images per class can scale it)")
        print(f"note: the new head {head!r} {scaled}: its shrinkage tempers the predictions and its spread is pinned, "
              "so the epistemic uncertainty comes from the body; predict with mode='glm' (zoo serve --mode glm), "
              "since 'fast' reads only the head")
    selection = (posterior.meta.get("width") or {}).get("selection") or {}
    if selection.get("rule") == "validation":
        print(f"note: the posterior's width T = {selection['T']:g} was chosen on the {selection['n']} --val images "
              "(the lowest NLL of its predictive on them)")
    elif val_loader is not None and "validation_unused" in selection:
        print(f"note: --val did not choose the posterior's width: {selection['validation_unused']}")
    print(f"posterior written to {out}")
    return 0
