"""`zoo push DIR REPO_ID`: publish a repository to the Hub, or into a local olah mirror."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo push` to the CLI's sub-parsers."""
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
