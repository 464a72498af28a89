"""The served models: loaded once from the command line's REFs, each with its predictors, transform and labels."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from api.errors import NotFound, Unprocessable
from api.settings import Settings
from zoo.errors import ConfigError
from zoo.loading import one_name_per_class
from zoo.prior import Prior

log = logging.getLogger("api")

IMAGENET_CLASSES = 1000


class MapPredictor:
    """The network alone (one pass, softmax): the baseline of a plain timm model, served by the same app."""

    mode = "map"
    samples = 1
    antithetic = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Any:
        from zoo.predictive import Prediction, entropy

        probs = F.softmax(self.model(images).double(), dim=-1)
        h = entropy(probs)
        return Prediction(probs=probs.float(), entropy=h, expected_entropy=h, mutual_information=torch.zeros_like(h),
                          samples=1, mode="map")


class Predict(Protocol):
    """A served predictor: zoo.predictive.Predictor, or MapPredictor for the network alone."""

    mode: str
    samples: int
    antithetic: bool

    def __call__(self, images: Tensor) -> Any: ...


@dataclass
class ServedModel:
    """One model as the service sees it: names, metadata for /v1/models, preprocessing, and cached predictors."""

    name: str
    source: str
    model: nn.Module
    gaussian: Prior
    labels: list[str] | None
    transform: Callable[[Image.Image], Tensor]
    input_size: tuple[int, int, int]
    mode: str
    samples: int
    seed: int
    cache_size: int
    _predictors: OrderedDict[int, Predict] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kind(self) -> str:
        return str(self.gaussian.meta.get("kind", "prior"))

    @property
    def architecture(self) -> str:
        return str(self.gaussian.meta.get("architecture") or self.model.pretrained_cfg.get("architecture"))

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def certificate(self) -> dict[str, Any] | None:
        cert = self.gaussian.meta.get("certificate")
        return cert if isinstance(cert, dict) else None

    @property
    def note(self) -> str | None:
        """What this mode leaves out for this model, said in /v1/models and at load: in `fast`, a classifier whose
        spread is pinned (fitted on about one image per class) gives no epistemic uncertainty."""
        if self.mode != "fast":
            return None
        from zoo.predictive import pinned_head_message, pinned_heads

        heads = sorted(pinned_heads(self.gaussian))
        if not heads:
            return None
        return pinned_head_message(heads[0]) + "; serve it with --mode glm for the body's"

    @property
    def draws_weights(self) -> bool:
        """Whether a predictor holds whole-network weight draws (nn, glm): memory grows with samples × parameters."""
        return self.mode in ("nn", "glm")

    def check_samples(self, samples: int | None, max_samples: int) -> None:
        """422 unless `samples` is servable: at most --max-samples, and in nn/glm at most the draws made at startup,
        so that no request can allocate more weight draws than the server was started with."""
        if samples is None:
            return
        if samples > max_samples:
            raise Unprocessable(f"samples must be at most {max_samples} (--max-samples), got {samples}")
        if self.draws_weights and samples > self.samples:
            raise Unprocessable(f"in {self.mode} mode the weight draws are made once at startup: samples must be at "
                                f"most {self.samples} (start the server with a larger --samples), got {samples}")

    def predictor(self, samples: int | None = None) -> Predict:
        """The predictor for `samples` draws: the default one is built at load, others on first use (LRU-bounded).

        Draws come from the served seed, so every predictor is a fixed function of its inputs and batch company
        does not change an image's numbers.
        """
        s = self.samples if samples is None else samples
        if self.mode == "map":
            s = 1
        with self._lock:
            if s in self._predictors:
                self._predictors.move_to_end(s)
                return self._predictors[s]
        predictor = self._build(s)
        with self._lock:
            self._predictors[s] = predictor
            # the default predictor stays; others are evicted oldest first
            keep = 1 if self.draws_weights else self.cache_size  # weight draws are large: one other set at most
            while len(self._predictors) > keep + 1:
                oldest = next(k for k in self._predictors if k != self.samples)
                del self._predictors[oldest]
        return predictor

    def _build(self, samples: int) -> Predict:
        if self.mode == "map":
            return MapPredictor(self.model)
        from zoo.predictive import Predictor

        if samples == self.samples and self.note is not None:  # once, at load
            log.warning("%s: %s", self.name, self.note)
        # the note is logged above, once; Python's warning would repeat it on stderr from a worker thread
        return Predictor(self.gaussian, mode=self.mode, samples=samples, seed=self.seed, warn_pinned=False)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """timm's eval transform of this architecture, stacked."""
        return torch.stack([self.transform(img) for img in images])

    def label(self, index: int) -> str | None:
        return self.labels[index] if self.labels is not None else None


def model_name(ref: str) -> str:
    """The repository's name: the last path component of a directory, the name of `hf-hub:org/name@rev`."""
    from zoo.hub import as_local_dir, parse_repo_ref

    local = as_local_dir(ref)
    if local is not None:
        return Path(local).resolve().name
    repo_id, _ = parse_repo_ref(ref)
    return repo_id.split("/")[-1]


def repository_labels(root: Path | None, num_classes: int) -> list[str] | None:
    """Labels the repository ships (timm's config.json `label_names`), else ImageNet's for 1000 classes, else None."""
    if root is not None:
        try:
            config = json.loads((root / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        names = one_name_per_class(config.get("label_names"), num_classes)
        if names is not None:
            descriptions = config.get("label_descriptions")
            if isinstance(descriptions, dict):
                return [str(descriptions.get(n, n)) for n in names]
            return names
    if num_classes == IMAGENET_CLASSES:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(IMAGENET_CLASSES)]
    return None


def load_model(ref: str, settings: Settings) -> ServedModel:
    """zoo.load one REF, and build its default predictor now (weight draws, covariance pieces) so requests don't."""
    from timm.data import create_transform, resolve_data_config

    import zoo
    from zoo.hub import download

    model, prior = zoo.load(ref)
    model.eval()
    if prior.meta.get("kind") == "posterior":
        prior = zoo.Posterior.from_prior(model, prior)
    root = Path(download(ref))
    config = resolve_data_config(model=model)
    served = ServedModel(
        name=model_name(ref), source=ref, model=model, gaussian=prior,
        labels=(repository_labels(root, int(model.num_classes))
                or one_name_per_class(prior.meta.get("classes"), int(model.num_classes))),
        transform=create_transform(**config),
        input_size=tuple(int(v) for v in config["input_size"]),  # type: ignore[arg-type]
        mode=settings.mode, samples=settings.samples, seed=settings.seed, cache_size=settings.predictor_cache,
    )
    served.predictor()
    return served


class Registry:
    """The models being served, filled once by `load` (in a background thread) before readiness."""

    def __init__(self) -> None:
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.error: str | None = None

    def load(self, settings: Settings, resolve: Callable[[Settings], Sequence[str]]) -> None:
        """Resolve the REFs and load each; a failure is recorded (readiness then says why), never raised."""
        try:
            loaded: dict[str, ServedModel] = {}
            for ref in resolve(settings):
                log.info("loading %s", ref)
                served = load_model(ref, settings)
                if served.name in loaded:
                    raise ConfigError(f"two REFs are named {served.name!r} ({loaded[served.name].source} and "
                                      f"{ref}); serve repositories with distinct names")
                loaded[served.name] = served
                log.info("serving %s (%s, %s, mode %s)", served.name, served.architecture, served.kind, served.mode)
            self.models = loaded
            self.ready = True
        except Exception as err:  # any loading failure is reported by /health/ready and the CLI
            self.error = f"{type(err).__name__}: {err}"
            log.error("loading failed: %s", self.error)

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none yet"
            raise NotFound(f"no model named {name!r}; served: {served} (GET /v1/models)")
        return model
