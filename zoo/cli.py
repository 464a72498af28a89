"""The `zoo` command: one entry point, one sub-command per verb (build, push, pull, finetune, certify, evaluate,
continual, serve, demo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

from zoo import __version__
from zoo.errors import ZooError

Handler = Callable[[argparse.Namespace], int]


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop offline on the embedded default (CPU, minutes)")
    p.add_argument("--json", metavar="FILE", help="also write the measured results to FILE as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed for every sampled quantity")
    p.add_argument("--prior-only", action="store_true",
                   help="stop after the prior's predictive (steps 1–4, about 80 s): no fine-tuning on the digits")
    p.add_argument("--out", metavar="DIR", help="where steps 5–9 write the repositories and the report "
                   "(default: the cache's demo/ folder)")
    p.add_argument("--quick", action="store_true", help="small fine-tuning sizes (a smoke run, for tests)")

    def run(args: argparse.Namespace) -> int:
        from zoo.demo import run_demo

        run_demo(json_path=args.json, seed=args.seed, transfer=not args.prior_only, quick=args.quick, out_dir=args.out)
        return 0

    p.set_defaults(handler=run)


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="publish an artifact directory to the Hub (or to a local olah mirror with --mirror)",
        description="Upload DIR as repository REPO_ID: create_repo(exist_ok=True), then upload_folder. The token "
                    "comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks the hub. With --mirror ROOT the "
                    "folder is committed into a local git mirror that olah serves instead.",
    )
    p.add_argument("directory", metavar="DIR", help="the artifact directory (zoo build --out, prior.save)")
    p.add_argument("repo_id", metavar="REPO_ID", help="org/name")
    p.add_argument("--private", action="store_true", help="create the repository private (Hub only)")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing (Hub only)")
    p.add_argument("--mirror", metavar="ROOT", help="commit into the local mirror ROOT (ROOT/models/org/name)")
    p.add_argument("--tag", help="with --mirror: also tag the commit")
    p.add_argument("--message", help="commit message")

    def run(args: argparse.Namespace) -> int:
        from zoo.errors import ConfigError

        if args.mirror is None:
            if args.tag is not None:
                raise ConfigError("--tag works with --mirror only; tag Hub repositories with `hf repo tag create`")
            from zoo.hub import push

            url = push(args.directory, args.repo_id, private=args.private, revision=args.revision,
                       create_pr=args.create_pr, commit_message=args.message)
            print(url)
            return 0
        if args.private or args.create_pr:
            raise ConfigError("--private and --create-pr apply to the Hub; a local mirror has neither, drop them")
        from zoo.hub_mirror import publish_to_mirror

        kwargs = {"commit_message": args.message} if args.message else {}
        commit = publish_to_mirror(args.directory, args.mirror, args.repo_id, revision=args.revision or "main",
                                   tag=args.tag, **kwargs)
        print(commit)
        return 0

    p.set_defaults(handler=run)


def _add_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="download a prior or posterior repository into the HF cache and print its directory",
        description="Fetch REPO_ID (hf-hub:org/name[@rev] or org/name) through huggingface_hub's "
                    "snapshot_download; honours HF_ENDPOINT and HF_HUB_OFFLINE.",
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="org/name, optionally hf-hub: and @revision")
    p.add_argument("--revision", help="branch, tag or commit (overrides @revision)")
    p.add_argument("--cache-dir", metavar="DIR", help="HF cache directory (default: HF_HUB_CACHE)")

    def run(args: argparse.Namespace) -> int:
        from zoo.hub import download, parse_repo_ref

        parse_repo_ref(args.repo_id)  # a repository id, never a local path
        ref = args.repo_id if args.repo_id.startswith("hf-hub:") else f"hf-hub:{args.repo_id}"
        print(download(ref, revision=args.revision, cache_dir=args.cache_dir))
        return 0

    p.set_defaults(handler=run)


def _add_finetune_and_certify(sub: argparse._SubParsersAction) -> None:
    from zoo.commands_finetune import add_commands

    add_commands(sub)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from zoo.commands_evaluate import add_commands

    add_commands(sub)


def _add_continual(sub: argparse._SubParsersAction) -> None:
    from zoo.commands_continual import add_commands

    add_commands(sub)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_push, _add_pull, _add_finetune_and_certify, _add_evaluate, _add_continual,
]

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
    for add in [*_plugin_commands(), *_COMMANDS]:
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
