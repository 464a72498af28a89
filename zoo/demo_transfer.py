"""The demo's downstream half: the ImageNet prior fine-tuned on scikit-learn's digits, certified, evaluated, saved.

5. `zoo.load(..., num_classes=10, reset_head=True)` and `zoo.finetune` (Catoni objective, the defaults' evidence
   strengths and Laplace width) on a seeded share of the digits at 32 px. The digits are a domain shift from
   ImageNet, so BatchNorm statistics are re-estimated on the training digits first (`norm_statistics="adapt"`).
6. The certificate of that posterior against the pretrained prior, labelled: with a few hundred images and a prior
   centred on ImageNet weights, it is vacuous, and the demo says why (the KL).
7. The predictive on held-out digits against the fine-tuned network alone (accuracy, NLL, ECE), and on
   out-of-distribution inputs (the two photos and noise, at the same resolution): their uncertainty.
8. `zoo evaluate`'s report (markdown, HTML, PNGs), written to a printed path.
9. The posterior saved as a repository that `zoo serve PATH` serves, with the command printed.

The digits go through timm's eval transform for a 32 px input (set in the saved repository's config), so `zoo
serve` and `zoo evaluate` preprocess uploads exactly as training did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import Tensor

from zoo import metrics
from zoo.demo import channels_last
from zoo.loading import load
from zoo.report import Outputs, evaluation_record, write_report
from zoo.tuning import finetune

RESOLUTION = 32


@dataclass(frozen=True)
class TransferPlan:
    """Sizes of the downstream run; `quick` ones keep the test of the demo short.

    Twenty epochs at 3e-4, not fewer and not faster (measured on seeds 0–2, 300 digits): after five the
    network is underfit (training accuracy 0.77, held-out 0.57), and the training data then reject any width, so Q's T
    falls to 10⁻⁶ and the predictive equals its network, with no epistemic uncertainty anywhere; after twenty (14–22 s)
    the training NLL is 0.001–0.014, held-out accuracy 0.86, T = 0.3, and the photos and noise get 2–8× the digits'
    epistemic uncertainty. Adam at 1e-3 or 3e-3 does not train this network at 32 px with BatchNorm in eval mode
    (training NLL 1.48 and 2.64 after twenty epochs, from 2.44)."""

    train: int = 300
    test: int = 300
    epochs: int = 20
    lr: float = 3e-4
    batch: int = 50
    samples: int = 1024
    mode: str = "fast"
    certificate_samples: int = 20
    selection_samples: int = 2


QUICK = TransferPlan(train=100, test=100, epochs=2, samples=4, certificate_samples=4, selection_samples=1)
"""The demo predicts in the fast mode (the new head's exact logit Gaussian, one forward pass): on 300 digits the
default glm mode takes 35–43 s of a 2-minute budget. Its draws are of 10 logits per image, so 1,024 cost 0.2 s; with
the library's 32 the Monte Carlo error alone moved the held-out NLL by 0.05 (0.484 against 0.436 with 2,048 draws,
seed 0) and top-1 on a few digits."""


def input_config(model: torch.nn.Module, resolution: int = RESOLUTION) -> dict[str, Any]:
    """timm's data config of the network at `resolution` px, with no centre crop (digits fill the frame)."""
    cfg = dict(resolve_data_config(model=model))
    cfg.update(input_size=(3, resolution, resolution), crop_pct=1.0, interpolation="bilinear")
    return cfg


def digit_images() -> tuple[list[Image.Image], Tensor]:
    """scikit-learn's 1,797 8×8 digits as greyscale PIL images (0–16 scaled to 0–255), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.clip(np.rint(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return [Image.fromarray(p, mode="L") for p in pixels], torch.as_tensor(d.target, dtype=torch.long)


def run_transfer(prior_dir: Path, out: Path, ood: list[tuple[str, Image.Image]], *, seed: int = 0,
                 plan: TransferPlan = TransferPlan(), progress: bool = True) -> dict[str, Any]:
    """Steps 5–9 of the demo from a saved prior repository; prints as it goes and returns every figure."""
    t_start = time.perf_counter()
    # the new head is seeded from `seed`, not torch's global RNG: otherwise step 5 depended on what steps 1–4 drew
    model, prior = load(str(prior_dir), num_classes=10, reset_head=True,
                        generator=torch.Generator().manual_seed(seed))
    model = channels_last(model)
    cfg = input_config(model)
    model.pretrained_cfg = dict(model.pretrained_cfg, **cfg)  # saved in config.json: serve preprocesses the same
    transform = create_transform(**cfg)
    images, labels = digit_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    tr, te = order[: plan.train], order[plan.train : plan.train + plan.test]
    x = torch.stack([transform(images[i].convert("RGB")) for i in torch.cat([tr, te]).tolist()])
    x_train, x_test, y_train, y_test = x[: len(tr)], x[len(tr) :], labels[tr], labels[te]
    train = [(x_train[i : i + plan.batch], y_train[i : i + plan.batch]) for i in range(0, len(tr), plan.batch)]

    t0 = time.perf_counter()
    posterior = finetune(model, prior, train, "catoni", epochs=plan.epochs, lr=plan.lr, norm_statistics="adapt",
                         generator=torch.Generator().manual_seed(seed), progress=progress,
                         selection_samples=plan.selection_samples, dataset="sklearn-digits (32 px)")
    t_fit = time.perf_counter() - t0
    kappa = posterior.meta["strength"]["kappa"]
    selection = posterior.meta["width"]["selection"] or {}
    print(f"5. fine-tuned on {len(tr)} digits at {RESOLUTION} px in {t_fit:.0f} s (Catoni objective, BatchNorm "
          f"statistics re-estimated on the digits; prior strength κ by the Laplace evidence: body {kappa['body']:g}, "
          f"new head {kappa.get('head', float('nan')):g}; Q = the {posterior.meta['width']['chosen']} posterior"
          + (f" × T = {selection['T']:g}, by the {selection['rule']} rule)" if "T" in selection else ")"))

    t0 = time.perf_counter()
    cert = posterior.certificate(train, samples=plan.certificate_samples,
                                 generator=torch.Generator().manual_seed(seed + 1))
    t_cert = time.perf_counter() - t0
    print(f"6. certificate (a rigorous Gibbs-risk kl-bound, δ = {cert.delta:g}, n = {cert.n}, "
          f"{plan.certificate_samples} draws, {t_cert:.0f} s): {cert.bound:.3f}. KL to the pretrained prior "
          f"{cert.kl:,.0f} nats, empirical Gibbs risk {cert.empirical_risk:.3f}.")
    if cert.bound > 0.99:
        print("   Vacuous, as expected here: the prior is centred on ImageNet weights, and moving them to digits "
              "costs more nats than a few hundred examples can pay for. zoo.certify_data_dependent (zoo "
              "finetune --certificate data-dependent) re-centres the prior on half the data to fix that.")

    t0 = time.perf_counter()
    predict = posterior.predict(x_test, samples=plan.samples, mode=plan.mode,
                                generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        posterior.model.eval()
        network = torch.softmax(posterior.model(x_test).double(), dim=-1)
    ood_x = torch.stack([transform(img.convert("RGB")) for _, img in ood])
    ood_pred = posterior.predict(ood_x, samples=plan.samples, mode=plan.mode,
                                 generator=torch.Generator().manual_seed(seed + 3))
    t_pred = time.perf_counter() - t0
    evaluation = evaluation_record(Outputs.of(predict), y_test, dataset="sklearn digits (32 px)", mode=predict.mode,
                                   samples=plan.samples, ood=Outputs.of(ood_pred))
    figures = {
        "posterior": {k: evaluation[k] for k in ("accuracy", "nll", "ece")},
        "network": {"accuracy": metrics.accuracy(network, y_test), "nll": metrics.nll(network, y_test),
                    "ece": metrics.ece(network, y_test)},
    }
    pairs = " in antithetic pairs" if predict.antithetic else ""
    print(f"7. predictive ({predict.mode}, {plan.samples} samples{pairs}, {t_pred:.1f} s) on {len(te)} held-out "
          f"digits: accuracy / NLL / ECE {_row(figures['posterior'])}; the fine-tuned network alone "
          f"{_row(figures['network'])}")
    mi_in = float(predict.mutual_information.mean())
    ood_rows = []
    for (name, _), h, mi in zip(ood, ood_pred.entropy, ood_pred.mutual_information, strict=True):
        ood_rows.append({"input": name, "entropy": float(h), "mutual_information": float(mi)})
        print(f"   {name:>7s} (OOD): total {float(h):.3f}, epistemic {float(mi):.4f} nats")
    print(f"   held-out digits: mean total {float(predict.entropy.mean()):.3f}, mean epistemic {mi_in:.4f} nats")

    posterior.meta["classes"] = [str(k) for k in range(10)]
    posterior.meta["evaluation"] = evaluation
    report = write_report(out / "report", Outputs.of(predict), y_test, ood=Outputs.of(ood_pred),
                          class_names=posterior.meta["classes"], title="prior-zoo demo: efficientnet_lite0 on digits",
                          facts={"model": "efficientnet_lite0 (ImageNet) → sklearn digits, 32 px", "train": len(tr),
                                 "test": len(te), "ood": ", ".join(n for n, _ in ood)},
                          certificate=cert.to_dict(), certificate_text=str(cert))
    print(f"8. report: {report['report.html']} (and report.md, metrics.json, PNG figures beside it)")
    repo = posterior.save(str(out / "efficientnet_lite0-digits-posterior"))
    print(f"9. serve it: zoo serve {repo}   (then open http://127.0.0.1:8000/)")
    return {
        "train": len(tr), "test": len(te), "fit_seconds": t_fit, "kappa": kappa,
        "width": posterior.meta["width"]["chosen"], "T": selection.get("T"),
        "certificate": {"bound": cert.bound, "kl": cert.kl, "empirical_risk": cert.empirical_risk, "n": cert.n,
                        "delta": cert.delta, "seconds": t_cert},
        "test_metrics": figures, "mode": predict.mode, "ood": ood_rows, "in_distribution_mi": mi_in,
        "report": str(report["report.html"]), "repository": str(repo), "serve": f"zoo serve {repo}",
        "seconds": time.perf_counter() - t_start,
    }


def _row(m: dict[str, float]) -> str:
    return f"{m['accuracy']:.3f} / {m['nll']:.3f} / {m['ece']:.3f}"

