"""`zoo certify RUN_DIR`: print the certificate a `zoo finetune` run recorded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoo.cli.finetune import CERTIFICATE_FILE
from zoo.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `zoo certify` to the CLI's sub-parsers."""
    c = sub.add_parser("certify", help="print the certificate of a fine-tuning run",
                       description="Print the certificate recorded in RUN_DIR (by `zoo finetune`).")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--json", action="store_true", help="print the raw JSON record")
    c.set_defaults(handler=_certify)


def _certify(args: argparse.Namespace) -> int:
    from zoo.posterior import Certificate

    path = Path(args.run_dir) / CERTIFICATE_FILE
    if not path.is_file():
        raise DataError(f"{args.run_dir} has no {CERTIFICATE_FILE}; pass a directory written by `zoo finetune`")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); rerun `zoo finetune`") from err
    print(json.dumps(record, indent=2, sort_keys=True) if args.json else Certificate.from_dict(record))
    config = Path(args.run_dir) / "prior_config.json"
    how = json.loads(config.read_text()).get("certificate_kind") if config.is_file() and not args.json else None
    if how:
        print(f"prior: {how}")
    return 0
