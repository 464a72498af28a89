"""The pydantic models of every JSON body the service sends or accepts; they are the OpenAPI schema at /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: one message that says what went wrong and what to do."""

    error: str


class Health(BaseModel):
    status: Literal["live", "ready"]
    models: list[str] | None = None


# ---- /v1 ----------------------------------------------------------------------------------------------------------
class PredictiveInfo(BaseModel):
    mode: str = Field(description="glm | nn | fast (zoo.predictive), or map: the network alone")
    samples: int = Field(description="default weight or function-space draws per prediction")
    antithetic: bool = Field(description="whether those draws come in mirrored pairs (half the draws, each with its "
                             "mirror image about the Gaussian's centre): glm and fast with an even samples")
    note: str | None = Field(default=None, description="what this mode leaves out for this model, if anything (e.g. "
                             "no epistemic uncertainty in fast mode where the classifier's spread is pinned)")


class ModelInfo(BaseModel):
    name: str = Field(description="the repository's name; the {name} in model URLs")
    architecture: str
    num_classes: int
    labels: list[str] | None = Field(description="class names by index, or null when unknown")
    kind: Literal["prior", "posterior"]
    source: str = Field(description="the REF it was loaded from")
    certificate: dict[str, Any] | None = Field(description="the posterior's recorded PAC-Bayes certificate, if any")
    predictive: PredictiveInfo


class ModelList(BaseModel):
    models: list[ModelInfo]


class TopClass(BaseModel):
    label: str | None
    index: int
    prob: float


class ImagePrediction(BaseModel):
    top: list[TopClass]
    entropy: float = Field(description="total predictive uncertainty H[p̄], nats")
    expected_entropy: float = Field(description="aleatoric part E_s H[p_s], nats")
    mutual_information: float = Field(description="epistemic part H[p̄] − E_s H[p_s], nats")


class PredictResponse(BaseModel):
    model: str
    mode: str
    samples: int
    predictions: list[ImagePrediction] = Field(description="one per uploaded file, in upload order")


# ---- /v2: Open Inference Protocol (KServe v2 / Triton) -----------------------------------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInputTensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="row-major values (flat or nested); omitted when "
                                                              "parameters.binary_data_size is set")


class InferRequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutputTensor]
