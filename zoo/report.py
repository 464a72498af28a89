"""An evaluation report from predictive outputs: metrics.json, matplotlib figures, report.md and report.html.

Model-free on purpose: it takes the probabilities and uncertainty split of a predictive (in-distribution, with
labels, and optionally OOD), so `zoo evaluate` and the benchmarks write the same report. Scalar metrics come from
`zoo.metrics` (torchmetrics for accuracy, ECE and AUROC); the reliability diagram's bins use the same equal-width
binning as that ECE. The HTML embeds its figures (base64), so it is one self-contained file; the Markdown links the
PNGs beside it.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo import metrics
from zoo.errors import DataError

FIGURES = ("reliability.png", "entropy.png", "mutual_information.png", "per_class_accuracy.png")
FILES = ("metrics.json", "report.md", "report.html", *FIGURES)
BINS = 15


@dataclass(frozen=True)
class Outputs:
    """One predictive on one set of images: mean probabilities and the entropy split, all in nats."""

    probs: Tensor  # (N, C)
    entropy: Tensor  # (N,)
    mutual_information: Tensor  # (N,)

    @classmethod
    def of(cls, prediction: Any) -> Outputs:
        """From a zoo Prediction (or anything with probs / entropy / mutual_information)."""
        return cls(prediction.probs.detach().double().cpu(), prediction.entropy.detach().double().cpu(),
                   prediction.mutual_information.detach().double().cpu())


def reliability_bins(probs: Tensor, labels: Tensor, bins: int = BINS) -> list[dict[str, float | None]]:
    """Per equal-width confidence bin: its range, the count, the mean confidence and the accuracy (empty: None)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    index = torch.clamp((conf * bins).long(), max=bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": count,
                     "confidence": conf[inside].double().mean().item() if count else None,
                     "accuracy": correct[inside].mean().item() if count else None})
    return rows


def per_class_accuracy(probs: Tensor, labels: Tensor, classes: int) -> list[float | None]:
    """Top-1 accuracy within each true class (None where the class has no example)."""
    pred = probs.argmax(-1)
    out: list[float | None] = []
    for c in range(classes):
        inside = labels == c
        out.append((pred[inside] == c).double().mean().item() if bool(inside.any()) else None)
    return out


def compute_metrics(ind: Outputs, labels: Tensor, ood: Outputs | None = None) -> dict[str, Any]:
    """Scalar metrics (zoo.metrics.summary) with per-class accuracy, reliability bins and uncertainty means."""
    if ind.probs.shape[0] != labels.shape[0]:
        raise DataError(f"{ind.probs.shape[0]} predictions but {labels.shape[0]} labels; pass one label per image")
    out = metrics.summary(ind.probs, labels, mutual_information=None if ood is None else ind.mutual_information,
                          ood_probs=None if ood is None else ood.probs,
                          ood_mutual_information=None if ood is None else ood.mutual_information, bins=BINS)
    out["n"] = int(labels.shape[0])
    out["per_class_accuracy"] = per_class_accuracy(ind.probs, labels, ind.probs.shape[1])
    out["reliability"] = reliability_bins(ind.probs, labels)
    out["mean_entropy"] = ind.entropy.mean().item()
    out["mean_mutual_information"] = ind.mutual_information.mean().item()
    if ood is not None:
        out["ood_n"] = int(ood.probs.shape[0])
        out["ood_mean_entropy"] = ood.entropy.mean().item()
        out["ood_mean_mutual_information"] = ood.mutual_information.mean().item()
    return out


def reliability_figure(bins: Sequence[Mapping[str, Any]], ece: float, n: int, path: Path) -> Path:
    """The reliability diagram of `reliability_bins` output, as a PNG (reports and model cards share it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    width = 1.0 / len(bins)
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centres, [b["accuracy"] or 0.0 for b in bins], width=width * 0.95,
           color="#4477aa", edgecolor="white", label="accuracy")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    for c, b in zip(centres, bins, strict=True):
        if b["count"]:
            ax.text(c, 0.02, str(b["count"]), ha="center", va="bottom", fontsize=6, rotation=90, color="white")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {ece:.3f}, {n} images")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluation_record(ind: Outputs, labels: Tensor, *, dataset: str, mode: str, samples: int,
                      ood: Outputs | None = None) -> dict[str, Any]:
    """Held-out figures for a model card (meta["evaluation"]): scalars and the reliability bins it draws."""
    result = compute_metrics(ind, torch.as_tensor(labels).long().cpu(), ood)
    keep = ("accuracy", "nll", "ece", "brier", "ood_auroc_entropy", "ood_auroc_mi")
    return {"dataset": dataset, "n": result["n"], "mode": mode, "samples": samples,
            **{k: result[k] for k in keep if result.get(k) is not None}, "reliability": result["reliability"]}


def _figures(out: Path, ind: Outputs, ood: Outputs | None, result: Mapping[str, Any],
             class_names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reliability_figure(result["reliability"], result["ece"], result["n"], out / "reliability.png")

    for name, key, label in (("entropy.png", "entropy", "predictive entropy H[p̄] (nats)"),
                             ("mutual_information.png", "mutual_information", "mutual information (nats)")):
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        values = getattr(ind, key)
        top = max(values.max().item(), getattr(ood, key).max().item() if ood is not None else 0.0, 1e-12)
        edges = torch.linspace(0, top, 31).tolist()
        ax.hist(values.tolist(), bins=edges, alpha=0.6, density=True, label=f"in-distribution ({len(values)})")
        if ood is not None:
            ax.hist(getattr(ood, key).tolist(), bins=edges, alpha=0.6, density=True,
                    label=f"OOD ({len(getattr(ood, key))})")
        auroc = result.get("ood_auroc_entropy" if key == "entropy" else "ood_auroc_mi")
        ax.set_title(label + (f": OOD AUROC {auroc:.3f}" if auroc is not None else ""), fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    accs = result["per_class_accuracy"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(accs) + 1.5), 3.5))
    ax.bar(range(len(accs)), [a if a is not None else 0.0 for a in accs], color="#228833")
    ax.set_xticks(range(len(accs)), [str(c) for c in class_names], rotation=60 if len(accs) > 8 else 0,
                  fontsize=7 if len(accs) > 8 else 9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"per-class accuracy (overall {result['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(out / "per_class_accuracy.png", dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


SCALARS = (("accuracy", "accuracy"), ("nll", "NLL (nats)"), ("ece", f"ECE ({BINS} bins)"), ("brier", "Brier"),
           ("mean_entropy", "mean predictive entropy (nats)"), ("mean_mutual_information", "mean mutual information"),
           ("ood_mean_entropy", "OOD mean predictive entropy"), ("ood_mean_mutual_information", "OOD mean MI"),
           ("ood_auroc_entropy", "OOD AUROC, by entropy"), ("ood_auroc_mi", "OOD AUROC, by mutual information"))


def _markdown(title: str, facts: Mapping[str, Any], result: Mapping[str, Any], certificate: str | None) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(result.get(key))} |" for key, label in SCALARS if key in result]
    if certificate:
        lines += ["", "## Certificate", "", "```", certificate, "```"]
    lines += ["", "## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in FIGURES]
    return "\n".join(lines) + "\n"


def _html(title: str, facts: Mapping[str, Any], result: Mapping[str, Any], certificate: str | None,
          out: Path) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{esc(_fmt(result.get(key)))}</td></tr>"
                   for key, label in SCALARS if key in result)
    items = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in facts.items())
    images = "".join(
        f'<figure><img alt="{esc(name[:-4])}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{esc(name[:-4])}</figcaption></figure>'
        for name in FIGURES)
    cert = f"<h2>Certificate</h2><pre>{esc(certificate)}</pre>" if certificate else ""
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td{border:1px solid #ccc;padding:.2em .6em}"
             "figure{display:inline-block;margin:.5em}img{max-width:28em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            f"</head><body><h1>{esc(title)}</h1><ul>{items}</ul><h2>Metrics</h2><table>{rows}</table>{cert}"
            f"<h2>Figures</h2>{images}</body></html>\n")


def write_report(
    out: str | Path,
    ind: Outputs,
    labels: Tensor,
    *,
    ood: Outputs | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "prior-zoo evaluation",
    facts: Mapping[str, Any] | None = None,
    certificate: Mapping[str, Any] | None = None,
    certificate_text: str | None = None,
) -> dict[str, Path]:
    """Write every file of FILES into `out` (created) and return their paths; metrics.json holds all numbers."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    labels = torch.as_tensor(labels).long().cpu()
    result = compute_metrics(ind, labels, ood)
    names = list(class_names) if class_names is not None else [str(c) for c in range(ind.probs.shape[1])]
    if len(names) != ind.probs.shape[1]:
        raise DataError(f"{len(names)} class names for {ind.probs.shape[1]} classes; pass one name per class")
    _figures(directory, ind, ood, result, names)
    record = {"title": title, "facts": dict(facts or {}), "classes": names, "metrics": result,
              "certificate": dict(certificate) if certificate is not None else None}
    (directory / "metrics.json").write_text(json.dumps(record, indent=2, default=_json_default))
    facts = dict(facts or {})
    (directory / "report.md").write_text(_markdown(title, facts, result, certificate_text))
    (directory / "report.html").write_text(_html(title, facts, result, certificate_text, directory))
    return {name: directory / name for name in FILES}


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
