"""`zoo pull REPO_ID`: download a repository into the Hugging Face cache."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo pull` to the CLI's sub-parsers."""
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
