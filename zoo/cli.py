"""The `zoo` command: one entry point, one sub-command per verb (build, push, pull, finetune, certify, serve, demo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from zoo import __version__
from zoo.errors import ZooError

Handler = Callable[[argparse.Namespace], int]


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop offline on the embedded default (CPU, minutes)")
    p.add_argument("--json", metavar="FILE", help="also write the measured results to FILE as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed for every sampled quantity")

    def run(args: argparse.Namespace) -> int:
        from zoo.demo import run_demo

        run_demo(json_path=args.json, seed=args.seed)
        return 0

    p.set_defaults(handler=run)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main() so tests can inspect it."""
    parser = argparse.ArgumentParser(
        prog="zoo",
        description="prior-zoo: learned Kronecker-factored Bayesian priors for timm models.",
    )
    parser.add_argument("--version", action="version", version=f"prior-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print a one-line message and exit 2 instead of a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return handler(args)
    except ZooError as err:
        print(f"zoo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
