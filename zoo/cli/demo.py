"""`zoo demo`: the whole loop, offline, on the embedded default (zoo.demo)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo demo` to the CLI's sub-parsers."""
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
