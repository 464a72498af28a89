"""Running `zoo` sub-commands in-process, the way a user types them, with user errors as exit code 2."""

from __future__ import annotations

import zoo
from zoo.cli import build_parser


def cli(*argv: str) -> int:
    """Parse and run one `zoo` command line; a ZooError prints `error: ...` to stdout and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except zoo.ZooError as err:
        print(f"error: {err}")
        return 2
