"""/v1: the models served, and predictions with uncertainty for uploaded image files (multipart, field "files")."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, File, Query, UploadFile
from torch import Tensor

from api.errors import TooLarge
from api.limits import decode_image
from api.models import ServedModel
from api.schemas import (
    ErrorBody,
    ImagePrediction,
    ModelInfo,
    ModelList,
    PredictiveInfo,
    PredictResponse,
    TopClass,
)
from api.state import ServiceDep

router = APIRouter(prefix="/v1", tags=["v1"])

MAX_TOP_K = 1000
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503)}


def model_info(served: ServedModel) -> ModelInfo:
    return ModelInfo(
        name=served.name, architecture=served.architecture, num_classes=served.num_classes, labels=served.labels,
        kind="posterior" if served.kind == "posterior" else "prior", source=served.source,
        certificate=served.certificate,
        predictive=PredictiveInfo(mode=served.mode, samples=1 if served.mode == "map" else served.samples,
                                  antithetic=served.predictor().antithetic, note=served.note),
    )


@router.get("/models", response_model=ModelList, responses={c: {"model": ErrorBody} for c in (401, 503)})
def list_models(service: ServiceDep) -> ModelList:
    """The models this server serves (the REFs of its command line)."""
    service.require_ready()
    return ModelList(models=[model_info(m) for m in service.registry.models.values()])


def _decode(served: ServedModel, data: bytes, max_pixels: int, name: str) -> Tensor:
    """Decode (bounded) and preprocess one upload with the architecture's timm eval transform."""
    return served.preprocess([decode_image(data, max_pixels=max_pixels, name=name)])[0]


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    name: str,
    files: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, WebP, GIF, BMP)")],
    service: ServiceDep,
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="classes per image (at most the class count)")] = 5,
    samples: Annotated[int | None, Query(ge=1, description="draws for this request (default: --samples)")] = None,
) -> PredictResponse:
    """Predictive probabilities and the entropy split (total, aleatoric, epistemic; nats), one entry per file."""
    settings = service.settings
    served = service.model(name)
    served.check_samples(samples, settings.max_samples)
    if len(files) > settings.max_files:
        raise TooLarge(f"{len(files)} files in one request, over the limit of {settings.max_files} "
                       "(--max-files / ZOO_MAX_FILES); split the request")
    tensors = []
    for i, upload in enumerate(files):
        data = await upload.read()
        label = f"file {i} ({upload.filename!r})" if upload.filename else f"file {i}"
        tensors.append(await service.in_decoder(_decode, served, data, settings.max_pixels, label))
    pred = await service.predict(name, samples, torch.stack(tensors))
    k = min(top_k, served.num_classes)
    values, indices = pred.probs.topk(k, dim=-1)
    predictions = [
        ImagePrediction(
            top=[TopClass(label=served.label(int(j)), index=int(j), prob=float(p))
                 for p, j in zip(values[i], indices[i], strict=True)],
            entropy=float(pred.entropy[i]), expected_entropy=float(pred.expected_entropy[i]),
            mutual_information=float(pred.mutual_information[i]),
        )
        for i in range(len(tensors))
    ]
    return PredictResponse(model=name, mode=pred.mode, samples=pred.samples, predictions=predictions)
