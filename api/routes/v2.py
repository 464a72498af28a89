"""/v2: the Open Inference Protocol (KServe v2 / Triton HTTP), so tritonclient and KServe clients work unchanged.

One input, "images": FP32 [N, 3, H, W], already preprocessed with the model's timm transform. Outputs "probs"
[N, C] and "entropy", "expected_entropy", "mutual_information" [N] (nats). Tensors travel as JSON or with the
binary tensor data extension (Inference-Header-Content-Length), as tritonclient sends them by default.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from api.errors import ApiError, TooLarge, Unprocessable
from api.models import ServedModel
from api.schemas import (
    ErrorBody,
    InferRequest,
    InferResponse,
    LiveResponse,
    ModelMetadata,
    ModelReady,
    ReadyResponse,
    ServerMetadata,
    TensorMetadata,
)
from api.state import ServiceDep
from zoo import __version__

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

INPUT = "images"
OUTPUTS = ("probs", "entropy", "expected_entropy", "mutual_information")
HEADER_LENGTH = "Inference-Header-Content-Length"
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 503)}


@router.get("", response_model=ServerMetadata)
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="prior-zoo", version=__version__, extensions=["binary_tensor_data"])


@router.get("/health/live", response_model=LiveResponse)
def server_live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get("/health/ready", response_model=ReadyResponse, responses={503: {"model": ErrorBody}})
def server_ready(service: ServiceDep) -> ReadyResponse:
    service.require_ready()
    return ReadyResponse(ready=True)


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
def model_metadata(name: str, service: ServiceDep) -> ModelMetadata:
    served = service.model(name)
    c, h, w = served.input_size
    return ModelMetadata(
        name=served.name, versions=["1"], platform="pytorch_prior-zoo",
        inputs=[TensorMetadata(name=INPUT, datatype="FP32", shape=[-1, c, h, w])],
        outputs=[TensorMetadata(name="probs", datatype="FP32", shape=[-1, served.num_classes])]
        + [TensorMetadata(name=n, datatype="FP32", shape=[-1]) for n in OUTPUTS[1:]],
    )


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS)
def model_ready(name: str, service: ServiceDep) -> ModelReady:
    served = service.model(name)
    return ModelReady(name=served.name, ready=True)


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "JSON header of Inference-Header-Content-Length bytes, then the "
                                                "binary tensors (binary tensor data extension)"},
}}}


@router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True, responses=ERRORS,
             openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, service: ServiceDep) -> Any:
    """Run the predictive on preprocessed images; outputs as JSON, or binary when the request asks for it."""
    served = service.model(name)
    body = await request.body()
    header, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
    try:
        req = InferRequest.model_validate_json(header)
    except ValidationError as err:
        raise Unprocessable(f"not an inference request: {_first_error(err)}") from None
    images = _input_tensor(req, binary, served, service.settings.max_files)
    pred = await service.predict(name, None, images)
    values = {"probs": pred.probs, "entropy": pred.entropy, "expected_entropy": pred.expected_entropy,
              "mutual_information": pred.mutual_information}
    return _response(req, served, {k: v.float().numpy() for k, v in values.items()})


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ApiError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise ApiError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    return body[:n], body[n:]


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"{where}: {first.get('msg', 'invalid')}"


def _input_tensor(req: InferRequest, binary: bytes, served: ServedModel, max_images: int) -> torch.Tensor:
    """The "images" input as a float32 tensor, after checking name, datatype, shape and size (422 / 413)."""
    if len(req.inputs) != 1 or req.inputs[0].name != INPUT:
        got = [i.name for i in req.inputs]
        raise Unprocessable(f"expected exactly one input named {INPUT!r}, got {got}")
    tensor = req.inputs[0]
    if tensor.datatype != "FP32":
        raise Unprocessable(f"input {INPUT!r} must have datatype FP32, got {tensor.datatype!r}")
    c, h, w = served.input_size
    shape = tensor.shape
    if len(shape) != 4 or list(shape[1:]) != [c, h, w] or shape[0] < 1:
        raise Unprocessable(f"input {INPUT!r} must have shape [N, {c}, {h}, {w}] with N ≥ 1 (preprocessed with "
                            f"the model's timm transform), got {shape}")
    if shape[0] > max_images:
        raise TooLarge(f"{shape[0]} images in one request, over the limit of {max_images} (--max-files); split it")
    count = shape[0] * c * h * w
    params = tensor.parameters or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != 4 * count or len(binary) != size:
            raise Unprocessable(f"binary_data_size must be {4 * count} bytes for FP32 {shape} and match the body "
                                f"after the JSON header ({len(binary)} bytes), got {size!r}")
        array = np.frombuffer(binary, dtype="<f4")
    else:
        if tensor.data is None:
            raise Unprocessable(f"input {INPUT!r} has neither data nor parameters.binary_data_size")
        try:
            array = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise Unprocessable(f"input {INPUT!r} data must be numbers (FP32), nested or flat") from None
    if array.size != count:
        raise Unprocessable(f"input {INPUT!r} has {array.size} values, shape {shape} needs {count}")
    if not np.isfinite(array).all():
        raise Unprocessable(f"input {INPUT!r} holds NaN or infinite values")
    return torch.from_numpy(array.copy()).reshape(shape)


def _response(req: InferRequest, served: ServedModel, outputs: dict[str, np.ndarray]) -> Any:
    """JSON tensors, or the binary tensor data extension where the request asked for binary outputs."""
    wanted = [(o.name, bool((o.parameters or {}).get("binary_data", False))) for o in req.outputs or []]
    if not wanted:
        everything_binary = bool((req.parameters or {}).get("binary_data_output", False))
        wanted = [(n, everything_binary) for n in OUTPUTS]
    unknown = [n for n, _ in wanted if n not in outputs]
    if unknown:
        raise Unprocessable(f"unknown outputs {unknown}; this model has {list(OUTPUTS)}")
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, as_binary in wanted:
        array = np.ascontiguousarray(outputs[name], dtype="<f4")
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if as_binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    result: dict[str, Any] = {"model_name": served.name, "model_version": "1", "outputs": tensors}
    if req.id is not None:
        result["id"] = req.id
    if not blobs:
        return result
    head = json.dumps(result).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})
