"""The publish step of the zoo's reference entries: their model cards, rendered from the recipes.

`python -m builders.publish cards [DIR]` rewrites model_cards/<entry>.md. An entry whose artifact exists under
`--built ROOT/<entry>/prior_config.json` gets the card of that artifact; every other entry gets a card marked
"not yet built" with its recipe's plan. Publishing an artifact itself is `zoo push DIR REPO_ID`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from builders.recipes import Recipe, recipes
from zoo.card import render_card

MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"


def planned_meta(recipe: Recipe) -> dict[str, Any]:
    """The metadata an entry will have, minus everything only a build knows (curvature, scales, bound, hashes)."""
    return {
        "kind": "prior",
        "library": "prior-zoo",
        "architecture": recipe.architecture,
        "timm_name": recipe.timm_name,
        "num_classes": recipe.data.num_classes,
        "curvature": None,
        "objective": recipe.objective,
        "lambda": recipe.lam,
        "bound": None,
        "scales": {},
        "smoke": False,
        "base_model": f"timm/{recipe.timm_name}" if recipe.weights == "timm" else None,
        "datasets": [recipe.data.dataset],
        "license": "apache-2.0",
    }


def entry_card(recipe: Recipe, built: Path | None = None) -> str:
    """The card text of one reference entry: from its artifact when built, else "not yet built"."""
    config = built / "prior_config.json" if built is not None else None
    meta = json.loads(config.read_text()) if config is not None and config.is_file() else planned_meta(recipe)
    command = f"zoo build {recipe.name} --data /path/to/imagenet --out OUT_DIR --fisher {recipe.fisher}"
    return str(render_card(meta, repo_id=recipe.repo_id, plan=recipe.plan(), build_command=command))


def reference_cards(built_root: Path | None = None) -> dict[str, str]:
    """The card text of every reference entry, by entry name."""
    return {name: entry_card(r, built_root / name if built_root is not None else None)
            for name, r in recipes().items()}


def write_reference_cards(directory: Path = MODEL_CARDS, built_root: Path | None = None) -> list[Path]:
    """Write model_cards/<entry>.md for every reference entry; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in reference_cards(built_root).items():
        path = directory / f"{name}.md"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builders.publish", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cards = sub.add_parser("cards", help="render model_cards/<entry>.md for the reference entries")
    cards.add_argument("directory", nargs="?", type=Path, default=MODEL_CARDS)
    cards.add_argument("--built", type=Path, metavar="ROOT", help="ROOT/<entry>/ holds built artifacts")
    args = parser.parse_args(argv)
    for path in write_reference_cards(args.directory, args.built):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
