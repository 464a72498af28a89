"""`zoo serve`: registered into the `zoo` command through the entry-point group `prior_zoo.commands` (zoo never
imports api)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from api.settings import SERVE_MODES, SETTINGS_ENV, Settings
from zoo.errors import ConfigError

EPILOG = """examples:
  zoo serve                                   # the embedded default (efficientnet_lite0, built on first use)
  zoo serve priors/my-prior hf-hub:me/my-posterior --port 8080 --mode nn --samples 64
  ZOO_API_TOKEN=secret zoo serve runs/posterior --workers 4

limits (flag / environment variable / default): --max-body-bytes ZOO_MAX_BODY_BYTES 16 MiB,
  --max-files ZOO_MAX_FILES 16, --max-pixels ZOO_MAX_PIXELS 12582912, --queue-size ZOO_QUEUE_SIZE 64,
  --max-samples ZOO_MAX_SAMPLES 256; ZOO_API_TOKEN protects every route but /health and /v2/health.
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` sub-command to the `zoo` parser."""
    p = sub.add_parser(
        "serve", help="serve priors or posteriors over HTTP (/v1 JSON, /v2 Open Inference Protocol, web page)",
        description="Load each REF (a repository directory or hf-hub:org/name[@rev]) and serve its predictive "
                    "uncertainty. Without REF: the embedded default. Flags override ZOO_* environment variables.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("refs", nargs="*", metavar="REF", help="repository directory or hf-hub:org/name[@rev]")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (8000)")
    p.add_argument("--samples", type=_positive, help="default draws per prediction (32)")
    p.add_argument("--mode", choices=SERVE_MODES, help="predictive mode (fast: one forward pass; map: no prior)")
    p.add_argument("--seed", type=int, help="seed of the weight draws (0)")
    p.add_argument("--workers", type=_positive, default=1, help="server processes, each with its own models (1)")
    p.add_argument("--max-batch", type=_positive, help="images per micro-batch (32)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests (5)")
    p.add_argument("--queue-size", type=_positive, help="inference requests admitted at once; more get 503 (64)")
    p.add_argument("--max-body-bytes", type=_positive, help="largest request body (16777216)")
    p.add_argument("--max-files", type=_positive, help="images per request (16)")
    p.add_argument("--max-pixels", type=_positive, help="decoded pixels per image (12582912)")
    p.add_argument("--max-samples", type=_positive, help="largest ?samples= (256)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN (repeatable; CORS is off without it)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags over ZOO_* variables over defaults."""
    return Settings.from_env(
        refs=tuple(args.refs), samples=args.samples, mode=args.mode, seed=args.seed, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, max_body_bytes=args.max_body_bytes,
        max_files=args.max_files, max_pixels=args.max_pixels, max_samples=args.max_samples,
        cors_origins=args.cors_origin,
    )


def check_refs(refs: tuple[str, ...]) -> None:
    """Fail at once on a local REF that is missing or incomplete, before any server starts."""
    from zoo.hub import REQUIRED_FILES, as_local_dir, check_local_dir, parse_repo_ref

    for ref in refs:
        local = as_local_dir(ref)
        if local is None:
            parse_repo_ref(ref)
        else:
            check_local_dir(local, REQUIRED_FILES)


def run(args: argparse.Namespace) -> int:
    """Start uvicorn; with --workers N the embedded default is built first so the workers share one cache."""
    import uvicorn

    settings = settings_from_args(args)
    check_refs(settings.refs)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.workers > 1:
        if not settings.refs:
            from api.app import resolve_refs

            settings = dataclasses.replace(settings, refs=tuple(resolve_refs(settings)))
        os.environ[SETTINGS_ENV] = settings.to_json()
        uvicorn.run("api.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level)
        return 0
    from api.app import create_app

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_loaded(error: str | None) -> None:
        if error is not None:
            failure.append(error)
            if server is not None:
                server.should_exit = True

    app = create_app(settings, on_loaded=on_loaded)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if failure:
        raise ConfigError(f"could not load the models: {failure[0]}")
    if not server.started:
        print(f"zoo serve: could not start on {args.host}:{args.port} (port in use?)", file=sys.stderr)
        return 1
    return 0

