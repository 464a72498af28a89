"""The `zoo` command: one entry point, one sub-command per verb, one module per sub-command.

zoo's own commands live beside this file (demo, push, pull, finetune, certify, evaluate, continual); other packages
add theirs through the `prior_zoo.commands` entry points (builders: build; api: serve), and every command module
exposes the same `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

from zoo import __version__
from zoo.errors import ZooError

Handler = Callable[[argparse.Namespace], int]


def _own_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """zoo's own commands, one module each in this package, each with a `register(subparsers)` like a plugin's."""
    from zoo.cli import certify, continual, demo, evaluate, finetune, pull, push

    return [m.register for m in (demo, push, pull, finetune, certify, evaluate, continual)]


ENTRY_POINT_GROUP = "prior_zoo.commands"
"""Packages add `zoo` sub-commands here: `name = "module:register"`, where register(subparsers) adds one parser.
builders registers `zoo build` this way, so zoo never imports builders."""


def _add_unavailable(sub: argparse._SubParsersAction, ep: EntryPoint, err: Exception) -> None:
    """A broken plugin still shows up, and says what went wrong when used, instead of breaking every command."""
    p = sub.add_parser(ep.name, help=f"(unavailable: {type(err).__name__}; run it for details)")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        from zoo.errors import ConfigError

        raise ConfigError(f"the command {ep.name!r} ({ep.value}) failed to load: {type(err).__name__}: {err}; "
                          "reinstall prior-zoo (`pip install -e .` in the source tree)")

    p.set_defaults(handler=run)


def _plugin_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """The register functions of the installed `prior_zoo.commands` entry points, by name."""
    adders: list[Callable[[argparse._SubParsersAction], None]] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        def add(sub: argparse._SubParsersAction, ep: EntryPoint = ep) -> None:
            try:
                register = ep.load()
            except Exception as err:  # any import failure of a plugin
                _add_unavailable(sub, ep, err)
                return
            register(sub)

        adders.append(add)
    return adders


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main() so tests can inspect it."""
    parser = argparse.ArgumentParser(
        prog="zoo",
        description="prior-zoo: learned Kronecker-factored Bayesian priors for timm models.",
    )
    parser.add_argument("--version", action="version", version=f"prior-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in [*_plugin_commands(), *_own_commands()]:
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
