"""The model card (README.md) of a prior or posterior repository, rendered from its metadata.

The card is rendered through huggingface_hub's `ModelCard.from_template`, so the YAML header is the one the
Hub validates and indexes (library_name, tags, base_model + base_model_relation, datasets, license, metrics,
model-index), and `ModelCard.load` parses it back. The template is package data (`zoo/templates/model_card.md`,
the same file as `model_cards/template.md`), so an installed zoo renders cards without the source tree.

The only input is the metadata dict of `prior_config.json` (docs/design.md, "Hub repository"): a card never says
more than the artifact records. A card whose metadata has no curvature is marked "not yet built"; one whose
metadata says `smoke` is marked a smoke build, never an ImageNet prior.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from zoo.errors import ArtifactError

__all__ = ["CARD_TAGS", "card_data", "render_card", "write_card"]

CARD_TAGS: tuple[str, ...] = ("timm", "bayesian", "laplace", "pac-bayes", "prior-zoo")
"""Tags every prior-zoo card carries, so the Hub lists the zoo's entries under each."""

LIBRARY_NAME = "timm"
"""The Hub's library_name: `config.json` + `model.safetensors` load with timm alone, so the Hub's timm snippet works."""

METRIC = "pac-bayes-bound"

_RELATION = {"prior": "adapter", "posterior": "finetune"}
"""base_model_relation: a prior keeps the base weights and adds a file to use with them (closest Hub value:
adapter); a posterior's mean moved away from the base weights (finetune)."""


def _template_text() -> str:
    """The card template shipped with the package (a symlink to model_cards/template.md in the source tree)."""
    try:
        return resources.files("zoo").joinpath("templates", "model_card.md").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as err:
        raise ArtifactError(
            "the model card template zoo/templates/model_card.md is missing; reinstall prior-zoo "
            "(`pip install -e .` from the source tree)"
        ) from err


def _fmt(value: float | None) -> str:
    """A scale or bound value, compactly (3 significant digits)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3g}"


def _duration(seconds: float | None) -> str:
    """Seconds as '41 s', '12 min 5 s' or '3 h 20 min'."""
    if seconds is None:
        return "not recorded"
    s = round(float(seconds))
    if s < 60:
        return f"{float(seconds):.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _get(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    return default if value is None else value


def _check(meta: Any) -> Mapping[str, Any]:
    if not isinstance(meta, Mapping):
        raise ArtifactError(f"card metadata must be the dict of prior_config.json, got {type(meta).__name__}")
    if not meta.get("timm_name") and not meta.get("architecture"):
        raise ArtifactError("card metadata names no model; it needs 'timm_name' or 'architecture' "
                            "(write the card from prior.meta)")
    return meta


def _is_built(meta: Mapping[str, Any]) -> bool:
    return isinstance(meta.get("curvature"), Mapping)


def default_repo_id(meta: Mapping[str, Any]) -> str:
    """The repository id the card's usage section shows when the caller names none."""
    name = _get(meta, "timm_name", _get(meta, "architecture", "model"))
    suffix = "kfac" if _get(meta, "kind", "prior") == "prior" else "kfac-posterior"
    return f"ORG/{name}-{suffix}"


def card_data(meta: Mapping[str, Any], *, repo_id: str | None = None) -> ModelCardData:
    """The YAML header of the card: what the Hub indexes (library, tags, base model, data, license, metrics)."""
    meta = _check(meta)
    kind = _get(meta, "kind", "prior")
    smoke = bool(meta.get("smoke"))
    built = _is_built(meta)
    tags = [*CARD_TAGS, "kfac", kind, "image-classification"]
    if smoke:
        tags.append("smoke-build")
    if not built:
        tags.append("not-yet-built")
    extra: dict[str, Any] = {}
    base_model = meta.get("base_model") or None
    if base_model:
        extra["base_model_relation"] = _RELATION.get(kind, "adapter")
    datasets = [d for d in _get(meta, "datasets", []) if d] if not smoke else []
    bound = meta.get("bound") if built else None
    eval_results = None
    if isinstance(bound, Mapping) and bound.get("value") is not None and math.isfinite(float(bound["value"])):
        curvature = meta["curvature"]
        dataset = str(curvature.get("dataset") or "unknown")
        eval_results = [EvalResult(
            task_type="image-classification",
            dataset_type=datasets[0] if datasets else dataset,
            dataset_name=f"{dataset} (source data, n={curvature.get('n', '?')})",
            metric_type=METRIC,
            metric_value=float(bound["value"]),
            metric_name=f"{_get(meta, 'objective', 'pac-bayes')} bound, delta={bound.get('delta', '?')}",
        )]
    return ModelCardData(
        library_name=LIBRARY_NAME,
        tags=tags,
        base_model=base_model,
        datasets=datasets or None,
        license=_get(meta, "license", "unknown"),
        metrics=[METRIC],
        pipeline_tag="image-classification",
        model_name=(repo_id or default_repo_id(meta)).split("/")[-1],
        eval_results=eval_results,
        **extra,
    )


def _context(meta: Mapping[str, Any], repo_id: str, plan: Mapping[str, Any], build_command: str | None
             ) -> dict[str, Any]:
    """The template's variables, every one derived from the metadata (or, when not yet built, the plan)."""
    built = _is_built(meta)
    kind = _get(meta, "kind", "prior")
    timm_name = _get(meta, "timm_name", _get(meta, "architecture", "?"))
    curvature: Mapping[str, Any] = meta["curvature"] if built else {}
    fisher = curvature.get("fisher") or plan.get("fisher", "mc")
    approx = curvature.get("approx") or plan.get("approx", "expand")
    ctype = str(curvature.get("type") or plan.get("curvature", "kfac")).upper().replace("KFAC", "K-FAC")
    n = curvature.get("n")
    base_model = meta.get("base_model")
    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else \
        str(plan.get("weights_text") or "pretrained weights without a Hub repository (see `config.json`)")
    lam = meta.get("lambda", plan.get("lambda"))
    bound = meta.get("bound") if built else None
    bound_text = ""
    if isinstance(bound, Mapping) and bound.get("value") is not None:
        delta = bound.get("delta")
        conf = f" (δ = {float(delta):g})" if delta is not None else ""
        what = str(bound.get("kind") or "PAC-Bayes bound")
        bound_text = (
            f"**Bound at the fitted scales{conf}: {_fmt(float(bound['value']))}**, the {what}. It is the value "
            "of the fitting objective on the source data, not a certificate for your task: fine-tune and call "
            "`posterior.certificate(...)` for that."
        )
    held = meta.get("holdout") if built else None
    holdout_text = ""
    if isinstance(held, Mapping) and held.get("n"):
        net, pred = held.get("network") or {}, held.get("predictive") or {}
        holdout_text = (
            f"**Checked on {int(held['n'])} held-out images** ({held.get('mode')} predictive, precision × "
            f"{_fmt(held.get('t'))}): accuracy {_fmt(pred.get('accuracy'))} against the network's "
            f"{_fmt(net.get('accuracy'))}, NLL {_fmt(pred.get('nll'))} against {_fmt(net.get('nll'))}, ECE "
            f"{_fmt(pred.get('ece'))} against {_fmt(net.get('ece'))}."
            + (" Within one standard error of its NLL, so not told apart by these images: precision × "
               + ", ".join(_fmt(t) for t in held["ties_within_one_se"]) + "."
               if held.get("met") and held.get("ties_within_one_se") else "")
            + ("" if held.get("met") else " No width met all three conditions strictly; kept: "
               f"{held.get('fallback', 'the narrowest')}.")
        )
    elif isinstance(held, Mapping):
        holdout_text = "The width was not checked on held-out data (the build had none)."
    certificate_text = _certificate_text(meta.get("certificate"), meta.get("certificate_kind"))
    evaluation_text = _evaluation_text(meta.get("evaluation"))
    summary = meta.get("scales_summary") if built else None
    rows = []
    if isinstance(summary, Mapping):
        for name in ("alpha", "beta", "tau"):
            stats = summary.get(name)
            if isinstance(stats, Mapping):
                rows.append({"name": {"alpha": "α", "beta": "β", "tau": "τ"}[name], "min": _fmt(stats.get("min")),
                             "median": _fmt(stats.get("median")), "max": _fmt(stats.get("max"))})
    planned_n = plan.get("num_images")
    resolution = plan.get("resolution")
    dataset = str(curvature.get("dataset") or "unknown data")
    return {
        "built": built,
        "smoke": bool(meta.get("smoke")),
        "kind": kind,
        "title": f"{timm_name}: K-FAC Laplace {kind}" + ("" if built else " (not yet built)"),
        "timm_name": timm_name,
        "architecture": _get(meta, "architecture", timm_name),
        "num_classes": _get(meta, "num_classes", plan.get("num_classes", "?")),
        "repo_id": repo_id,
        "dataset": dataset,
        "planned_dataset": str(plan.get("dataset_text") or "ImageNet-1k (train)"),
        "planned_n_text": f"{int(planned_n):,}" if planned_n else "",
        "n_text": f"{int(n):,}" if n is not None else "an unrecorded number of",
        "curvature_text": f"{ctype}, {fisher} Fisher, K-FAC-{approx} for convolutions and shared weights; "
                          "diagonal Fisher for every other parameter",
        "seconds_text": _duration(curvature.get("seconds")),
        "objective": _get(meta, "objective", plan.get("objective", "catoni")),
        "lam_text": _fmt(lam) if lam is not None else "d/‖θ‖² of the pretrained weights (set at build time)",
        "model_sha256": _get(meta, "model_sha256", "not recorded"),
        "library_version": _get(meta, "library_version", "?"),
        "format_version": _get(meta, "format_version", "?"),
        "base_model_text": base_text,
        "resolution_text": f"{resolution}×{resolution}" if resolution else "the model's default",
        "batch_size_text": str(plan.get("batch_size", "?")),
        "scales_rows": rows,
        "scales_count_text": _count(len(meta.get("scales") or {}), "module"),
        "bound_text": bound_text,
        "holdout_text": holdout_text,
        "certificate_text": certificate_text,
        "evaluation_text": evaluation_text,
        "build_command": build_command or f"zoo build {timm_name} --data /path/to/imagenet --out OUT_DIR "
                                          f"--fisher {fisher}",
    }


def _evaluation_text(ev: Any) -> str:
    """Held-out figures and the reliability diagram (meta["evaluation"], written by zoo.report), or empty."""
    if not isinstance(ev, Mapping) or ev.get("accuracy") is None:
        return ""
    names = (("accuracy", "accuracy"), ("nll", "NLL (nats)"), ("ece", "ECE"), ("brier", "Brier"),
             ("ood_auroc_entropy", "OOD AUROC (entropy)"), ("ood_auroc_mi", "OOD AUROC (mutual information)"))
    rows = "\n".join(f"| {label} | {_fmt(float(ev[key]))} |" for key, label in names if ev.get(key) is not None)
    text = (f"On {ev.get('n')} held-out examples of {ev.get('dataset', 'the task')} ({ev.get('mode')} predictive, "
            f"{ev.get('samples')} samples), none of them used in fitting:\n\n| metric | value |\n|---|---|\n{rows}")
    if ev.get("reliability"):
        text += "\n\n![reliability diagram: accuracy against confidence per bin](reliability.png)"
    return text


def _certificate_text(cert: Any, how: Any) -> str:
    """The posterior's certificate, labelled: kind, δ, n, KL, empirical Gibbs risk (empty for a prior)."""
    if not isinstance(cert, Mapping) or cert.get("bound") is None:
        return ""
    text = (f"**Certificate: {_fmt(float(cert['bound']))}**, an upper bound on the 0-1 error of the Gibbs "
            f"classifier (weights drawn from this posterior) that holds with probability ≥ "
            f"{1 - float(cert.get('delta', 0.05)):g}: {cert.get('kind', 'PAC-Bayes')} bound, n = {cert.get('n')}, "
            f"KL = {_fmt(cert.get('kl'))} nats, empirical Gibbs risk {_fmt(cert.get('empirical_risk'))} over "
            f"{cert.get('samples')} weight draws, {cert.get('hypotheses', 1)} prior(s) paid by the union bound.")
    if cert.get("taylor_bound") is not None:
        text += f" The paper's Taylor-approximated bound, not a certificate: {_fmt(float(cert['taylor_bound']))}."
    if how:
        text += f" Prior: {how}."
    return text


def render_card(
    meta: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    plan: Mapping[str, Any] | None = None,
    build_command: str | None = None,
) -> ModelCard:
    """The model card of an artifact from its metadata (prior.meta / prior_config.json).

    `repo_id` is the repository the usage section loads from (default `ORG/<timm_name>-kfac`). `plan` fills
    the "how it will be built" table of a card whose metadata has no curvature yet (keys: dataset_text,
    num_images, resolution, batch_size, fisher, curvature, objective, lambda, weights_text, num_classes).
    """
    meta = _check(meta)
    repo_id = repo_id or default_repo_id(meta)
    data = card_data(meta, repo_id=repo_id)
    context = _context(meta, repo_id, plan or {}, build_command)
    try:
        card = ModelCard.from_template(data, template_str=_template_text(), **context)
    except ImportError as err:
        raise ArtifactError("rendering a model card needs Jinja2; run `pip install jinja2`") from err
    text = str(card)
    if not text.endswith("\n"):
        text += "\n"
    return ModelCard(text)


def write_card(
    directory: str | os.PathLike[str],
    meta: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    plan: Mapping[str, Any] | None = None,
    build_command: str | None = None,
) -> Path:
    """Render the card and write it as `directory/README.md`; return its path."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a directory; create the artifact directory before writing its card")
    path = folder / "README.md"
    text = str(render_card(meta, repo_id=repo_id, plan=plan, build_command=build_command))
    path.write_text(text, encoding="utf-8")
    return path
