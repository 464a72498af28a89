"""`zoo continual`: learn a sequence of ImageFolder tasks from a prior, one repository per task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError

SUMMARY_FILE = "continual.json"
APPROXIMATIONS = ("eigenbasis", "kronecker", "ekfac")
"""zoo.kron's approximations, spelled out so that `zoo --help` does not import torch (a test keeps them equal)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo continual` to the CLI\'s sub-parsers."""
    p = sub.add_parser(
        "continual", help="learn tasks in sequence from a prior (posterior → prior chain, or progressive columns)",
        description="Load PRIOR (directory or hf-hub:org/name) and learn each --task ImageFolder in order, one "
                    "classifier per task. chain: each task's posterior is the next task's prior. progressive: a "
                    "new column per task with laterals from the frozen earlier ones. Every task's posterior is "
                    "written to OUT/task-<k> (a repository zoo.load reads and zoo serve serves), and a summary "
                    f"to OUT/{SUMMARY_FILE}.",
    )
    p.add_argument("prior", metavar="PRIOR", help="a prior or posterior repository (local directory or hf-hub:...)")
    p.add_argument("--task", action="append", required=True, metavar="DIR", dest="tasks",
                   help="an ImageFolder (one sub-folder of images per class); repeat, in task order")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write task-1, task-2, … and the summary")
    p.add_argument("--method", choices=("chain", "progressive"), default="chain")
    p.add_argument("--approximation", choices=APPROXIMATIONS, default="ekfac",
                   help="chain: how precisions beyond the exact cases are decomposed (default ekfac, by measurement)")
    p.add_argument("--prior-strength", type=float, default=1.0, metavar="KAPPA",
                   help="chain: κ₀, the learned prior's precision multiplier, fixed in advance (default 1: as built)")
    p.add_argument("--epochs", type=int, default=15, help="per task (default 15, as measured in the README)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (default 3e-3, as measured)")
    p.add_argument("--shots", type=int, default=None, help="use at most this many images per class and task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_continual)


def _continual(args: argparse.Namespace) -> int:
    import timm.data
    import torch

    import zoo
    from zoo.cli.finetune import image_folder
    from zoo.continual import Task, learn_chain
    from zoo.progressive import learn_progressive

    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if not args.prior_strength > 0:
        raise ConfigError(f"--prior-strength must be positive, e.g. 1; got {args.prior_strength}")
    if len(set(args.tasks)) != len(args.tasks):
        raise ConfigError("a --task folder is given twice; pass each task once, in order")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a directory")
    probes = [image_folder(folder, None, None, args.seed) for folder in args.tasks]  # DataError when unusable
    model, prior = zoo.load(args.prior)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)
    tasks = []
    for k, (folder, probe) in enumerate(zip(args.tasks, probes, strict=True)):
        data = image_folder(folder, transform, args.shots, args.seed + k)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(args.seed + k))
        tasks.append(Task(str(folder), loader, len(probe.classes), tuple(probe.classes)))
    options: dict[str, Any] = {"out": out, "epochs": args.epochs, "lr": args.lr, "prior_ref": str(args.prior),
                               "generator": torch.Generator().manual_seed(args.seed)}
    if args.method == "chain":
        result = learn_chain(model, prior, tasks, approximation=args.approximation,
                             prior_strength=args.prior_strength, **options)
    else:
        result = learn_progressive(model, prior, tasks, **options)
    records = [r.to_dict() for r in result.records]
    summary = {"method": args.method, "prior": str(args.prior), "tasks": list(args.tasks), "seed": args.seed,
               "approximation": args.approximation if args.method == "chain" else None, "records": records}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    for r in records:
        extra = (f"prior error {r['prior_error']['max']:.2e}" if args.method == "chain"
                 else f"+{r['column_parameters']:,} parameters (total {r['total_parameters']:,})")
        print(f"task {r['task']} ({r['name']}): {r['seconds']:.1f} s, {r['artifact_bytes']:,} bytes, {extra} "
              f"-> {r['path']}")
    print(f"summary written to {out / SUMMARY_FILE}")
    return 0
