"""The HTTP service (api/) under a real uvicorn server on 127.0.0.1, driven by httpx and tritonclient."""

from __future__ import annotations

import asyncio
import io
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from api_support import TINY_LABELS, Server, encode, noise_image, photo, serving, tiny_repo_once, tiny_tensor
from PIL import Image
from tritonclient.utils import InferenceServerException

from api.settings import Settings

NAME = "tiny-prior"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repo_once(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(repo: Path) -> Server:
    with serving(refs=(str(repo),), max_files=4, max_body_bytes=4 * 2**20, max_pixels=1_000_000) as s:
        yield s


def predict(url: str, *images: bytes, **params: object) -> httpx.Response:
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/v1/models/{NAME}/predict", files=files, params=params, timeout=60)


def assert_alive(url: str) -> None:
    """The server still answers, and still predicts, after whatever the test threw at it."""
    assert httpx.get(f"{url}/health/live").status_code == 200
    assert predict(url, photo()).status_code == 200


# ---- health, listing, docs ----------------------------------------------------------------------------------------
def test_health_routes(server: Server) -> None:
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "live", "models": None}
    assert httpx.get(f"{server.url}/health/ready").json() == {"status": "ready", "models": [NAME]}
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{server.url}/v2").json()
    assert meta["name"] == "prior-zoo" and "binary_tensor_data" in meta["extensions"]


def test_models_lists_what_is_served(server: Server, repo: Path) -> None:
    body = httpx.get(f"{server.url}/v1/models").json()
    assert body == {"models": [{
        "name": NAME, "architecture": "test_efficientnet_gn", "num_classes": 5, "labels": TINY_LABELS,
        "kind": "prior", "source": str(repo), "certificate": None,
        "predictive": {"mode": "fast", "samples": 32, "antithetic": True, "note": None},
    }]}


def test_docs_and_openapi(server: Server) -> None:
    assert "swagger" in httpx.get(f"{server.url}/docs").text.lower()
    spec = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/models", "/v1/models/{name}/predict", "/v2/models/{name}/infer", "/health/ready"):
        assert path in spec["paths"]
    assert "InferRequest" in spec["components"]["schemas"]
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and 'type="file"' in page.text


def test_unknown_route_and_method(server: Server) -> None:
    r = httpx.get(f"{server.url}/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.delete(f"{server.url}/v1/models")
    assert r.status_code == 405 and "error" in r.json()


# ---- /v1 predict --------------------------------------------------------------------------------------------------
def test_predict_one_entry_per_file_in_order(server: Server) -> None:
    a, b = photo("china"), photo("flower")
    both = predict(server.url, a, b, top_k=5).json()
    assert both["model"] == NAME and both["mode"] == "fast" and both["samples"] == 32
    assert len(both["predictions"]) == 2
    for single, entry in ((a, both["predictions"][0]), (b, both["predictions"][1])):
        alone = predict(server.url, single, top_k=5).json()["predictions"][0]
        assert [t["index"] for t in alone["top"]] == [t["index"] for t in entry["top"]]
        assert alone["entropy"] == pytest.approx(entry["entropy"], abs=1e-5)
        probs = [t["prob"] for t in entry["top"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
        assert {t["label"] for t in entry["top"]} == set(TINY_LABELS)
        assert all(TINY_LABELS[t["index"]] == t["label"] for t in entry["top"])
        assert entry["mutual_information"] == pytest.approx(entry["entropy"] - entry["expected_entropy"], abs=1e-6)
        assert 0 <= entry["mutual_information"] <= entry["entropy"] <= np.log(5) + 1e-6


def test_predict_matches_the_library(server: Server, repo: Path) -> None:
    """What the service answers is zoo.predictive's Predictor on timm's preprocessing, in nats."""
    import zoo
    from zoo.predictive import Predictor

    images = [photo("china"), photo("flower")]
    _, prior = zoo.load(str(repo))
    expected = Predictor(prior, mode="fast", samples=32, seed=0)(tiny_tensor(images))
    got = predict(server.url, *images, top_k=5).json()["predictions"]
    for i, entry in enumerate(got):
        for t in entry["top"]:
            assert t["prob"] == pytest.approx(float(expected.probs[i, t["index"]]), abs=1e-5)
        assert entry["entropy"] == pytest.approx(float(expected.entropy[i]), abs=1e-5)
        assert entry["mutual_information"] == pytest.approx(float(expected.mutual_information[i]), abs=1e-5)


def test_predict_query_parameters(server: Server) -> None:
    body = predict(server.url, photo(), top_k=2, samples=8).json()
    assert len(body["predictions"][0]["top"]) == 2 and body["samples"] == 8
    assert len(predict(server.url, photo(), top_k=999).json()["predictions"][0]["top"]) == 5  # at most C
    for params in ({"top_k": 0}, {"top_k": "many"}, {"samples": 0}, {"samples": 100000}):
        r = predict(server.url, photo(), **params)
        assert r.status_code == 422 and set(r.json()) == {"error"}, params


def test_predict_accepts_other_formats_and_modes(server: Server) -> None:
    grey = Image.open(io.BytesIO(photo())).convert("L")
    for data in (encode(grey, "PNG"), encode(grey.convert("RGB"), "WEBP"), encode(grey, "GIF"),
                 encode(grey.convert("RGBA"), "PNG")):
        assert predict(server.url, data).status_code == 200


# ---- bad input: the right 4xx, {"error": ...}, and the server keeps answering ----------------------------------------
def bomb() -> bytes:
    """A PNG of a few kilobytes that decodes to 100 megapixels."""
    return encode(Image.new("L", (10_000, 10_000)), "PNG", optimize=True)


BAD_UPLOADS = {
    "empty": (b"", 415),
    "text": (b"this is not an image, whatever the Content-Type says\n" * 20, 415),
    "truncated jpeg": (photo(size=None)[:2000], 415),
    "decompression bomb": (bomb(), 413),
    "4000x4000 noise": (encode(noise_image(4000, 4000), "JPEG", quality=90), 413),
    "4000x4000 noise, small file": (encode(noise_image(4000, 4000), "JPEG", quality=1), 413),
    "zlib garbage": (zlib.compress(b"\x89PNG" * 1000), 415),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_the_right_4xx(server: Server, case: str) -> None:
    data, status = BAD_UPLOADS[case]
    r = predict(server.url, data)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and "Traceback" not in r.text
    assert_alive(server.url)


def test_too_many_files_and_unknown_model(server: Server) -> None:
    r = predict(server.url, *[photo()] * 5)
    assert r.status_code == 413 and "5 files" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/models/nope/predict", files=[("files", ("a.png", photo(), "image/png"))])
    assert r.status_code == 404 and "nope" in r.json()["error"] and NAME in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/models/{NAME}/predict")
    assert r.status_code == 422 and "files" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/models/{NAME}/predict", data={"files": "not a file"})
    assert r.status_code == 422
    assert_alive(server.url)


def test_body_limit_with_and_without_content_length(server: Server) -> None:
    big = b"\0" * (5 * 2**20)
    r = httpx.post(f"{server.url}/v1/models/{NAME}/predict", files=[("files", ("a.png", big, "image/png"))])
    assert r.status_code == 413 and "ZOO_MAX_BODY_BYTES" in r.json()["error"]

    def chunks():  # no Content-Length: the server counts while reading
        for _ in range(6):
            yield b"\0" * 2**20

    r = httpx.post(f"{server.url}/v2/models/{NAME}/infer", content=chunks(), timeout=60)
    assert r.status_code == 413 and set(r.json()) == {"error"}
    assert_alive(server.url)


# ---- /v2 Open Inference Protocol through tritonclient --------------------------------------------------------------
@pytest.fixture
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def images_input(x: np.ndarray, datatype: str = "FP32", binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("images", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_tritonclient_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "probs": [-1, 5], "entropy": [-1], "expected_entropy": [-1], "mutual_information": [-1]}
    assert client.get_server_metadata()["name"] == "prior-zoo"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_matches_v1(client: triton.InferenceServerClient, server: Server, binary: bool) -> None:
    images = [photo("china"), photo("flower")]
    x = tiny_tensor(images).numpy()
    outputs = None if binary else [triton.InferRequestedOutput(n, binary_data=False)
                                   for n in ("probs", "entropy", "expected_entropy", "mutual_information")]
    result = client.infer(NAME, [images_input(x, binary=binary)], outputs=outputs, request_id="r1")
    probs = result.as_numpy("probs")
    assert probs.shape == (2, 5) and result.as_numpy("entropy").shape == (2,)
    assert result.get_response()["id"] == "r1"
    v1 = predict(server.url, *images, top_k=5).json()["predictions"]
    for i, entry in enumerate(v1):
        for t in entry["top"]:
            assert probs[i, t["index"]] == pytest.approx(t["prob"], abs=1e-5)
        assert result.as_numpy("mutual_information")[i] == pytest.approx(entry["mutual_information"], abs=1e-5)


@pytest.mark.parametrize(("shape", "datatype", "name"), [
    ((2, 3, 16, 16), "FP32", "images"),  # wrong spatial size
    ((3, 32, 32), "FP32", "images"),  # no batch axis
    ((1, 1, 32, 32), "FP32", "images"),  # one channel
    ((1, 3, 32, 32), "FP64", "images"),  # wrong datatype
    ((1, 3, 32, 32), "INT32", "images"),
    ((1, 3, 32, 32), "FP32", "pixels"),  # wrong input name
])
def test_tritonclient_wrong_tensor_is_422(client: triton.InferenceServerClient, server: Server,
                                          shape: tuple[int, ...], datatype: str, name: str) -> None:
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32}[datatype]
    tensor = triton.InferInput(name, list(shape), datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, [tensor])
    assert err.value.status() == "422", err.value.message()
    assert_alive(server.url)


def test_v2_bad_requests(client: triton.InferenceServerClient, server: Server) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [images_input(np.zeros((1, 3, 32, 32), np.float32))])
    assert err.value.status() == "404"
    url = f"{server.url}/v2/models/{NAME}/infer"
    cases = [
        (b"{not json", 422),
        (b'{"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1, 2]}]}', 422),
        (b'{"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ["x"]}]}', 422),
        (b'{"inputs": [{"name": "images", "shape": [100, 3, 32, 32], "datatype": "FP32", "data": []}]}', 413),
        (b'{"inputs": []}', 422),
    ]
    for body, status in cases:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status and set(r.json()) == {"error"}, (body, r.text)
    r = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400
    r = httpx.get(f"{server.url}/v2/models/nope")
    assert r.status_code == 404
    assert_alive(server.url)


# ---- metrics --------------------------------------------------------------------------------------------------------
def test_metrics(server: Server) -> None:
    predict(server.url, photo())
    text = httpx.get(f"{server.url}/metrics").text
    assert 'zoo_http_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"}' in text
    assert "zoo_http_request_duration_seconds_bucket" in text and "zoo_batch_size_images_count" in text
    assert "zoo_queue_depth" in text and "zoo_inflight_inference_requests" in text
    count = [line for line in text.splitlines() if line.startswith("zoo_batch_size_images_count")]
    assert float(count[0].split()[-1]) >= 1


# ---- security: token, CORS ------------------------------------------------------------------------------------------
def test_bearer_token_protects_all_but_health(repo: Path) -> None:
    with serving(refs=(str(repo),), api_token="s3cret") as s:
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
            assert httpx.get(s.url + path).status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json", "/", f"/v2/models/{NAME}"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and "error" in r.json() and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = predict(s.url, photo())
        assert r.status_code == 401
        c = triton.InferenceServerClient(s.url.removeprefix("http://"))
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata(NAME)
        assert err.value.status() == "401"
        assert c.get_model_metadata(NAME, headers={"Authorization": "Bearer s3cret"})["name"] == NAME


def test_cors_off_unless_enabled(server: Server, repo: Path) -> None:
    origin = {"Origin": "http://example.org"}
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models", headers=origin).headers
    with serving(refs=(str(repo),), cors_origins=("http://example.org",)) as s:
        r = httpx.get(f"{s.url}/v1/models", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.org"


# ---- throughput: micro-batching, bounded queue -----------------------------------------------------------------------
async def _concurrent(url: str, images: list[bytes], **params: object) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as http:
        return await asyncio.gather(*[
            http.post(f"{url}/v1/models/{NAME}/predict", params=params,
                      files=[("files", ("x.png", data, "image/png"))]) for data in images])


def _batch_mean(url: str) -> float:
    lines = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                 if line.startswith("zoo_batch_size_images_"))
    return float(lines["zoo_batch_size_images_sum"]) / float(lines["zoo_batch_size_images_count"])


def test_micro_batching_returns_the_unbatched_numbers(repo: Path) -> None:
    """Concurrent requests batched together give what one-at-a-time requests give with the same seed (nn mode)."""
    images = [encode(noise_image(40, 40, seed=i), "PNG") for i in range(6)] + [photo("china"), photo("flower")]
    common = {"refs": (str(repo),), "mode": "nn", "samples": 8, "seed": 3}
    with serving(**common, max_batch=1, max_wait_ms=0) as alone:
        one_by_one = [predict(alone.url, img, top_k=5).json() for img in images]
        assert _batch_mean(alone.url) == 1
    with serving(**common, max_batch=32, max_wait_ms=300) as batched:
        together = [r.json() for r in asyncio.run(_concurrent(batched.url, images, top_k=5))]
        assert _batch_mean(batched.url) > 1  # they really shared forward passes
        # nn draws weights once at startup: a request may use fewer draws, never more than were made
        assert predict(batched.url, images[0], samples=4).json()["samples"] == 4
        (info,) = httpx.get(f"{batched.url}/v1/models").json()["models"]
        assert info["predictive"] == {"mode": "nn", "samples": 8, "antithetic": False, "note": None}  # nn: no pairs
        r = predict(batched.url, images[0], samples=9)
        assert r.status_code == 422 and "--samples" in r.json()["error"]
    for a, b in zip(one_by_one, together, strict=True):
        pa, pb = a["predictions"][0], b["predictions"][0]
        assert a["mode"] == b["mode"] == "nn"
        assert {t["index"]: t["prob"] for t in pa["top"]} == pytest.approx({t["index"]: t["prob"] for t in pb["top"]},
                                                                           abs=1e-5)
        for key in ("entropy", "expected_entropy", "mutual_information"):
            assert pa[key] == pytest.approx(pb[key], abs=1e-5)


def test_full_queue_is_503_with_retry_after(repo: Path) -> None:
    with serving(refs=(str(repo),), mode="nn", samples=64, queue_size=1) as s:
        responses = asyncio.run(_concurrent(s.url, [photo()] * 8))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
        assert predict(s.url, photo()).status_code == 200


def test_settings_from_environment() -> None:
    env = {"ZOO_MAX_FILES": "3", "ZOO_API_TOKEN": "s3cret", "ZOO_CORS_ORIGINS": "http://a, http://b", "ZOO_MODE": "nn"}
    s = Settings.from_env(env, max_files=None, samples=7)
    assert (s.max_files, s.api_token, s.mode, s.samples) == (3, "s3cret", "nn", 7)
    assert s.cors_origins == ("http://a", "http://b")
    assert Settings.from_json(s.to_json(), {"ZOO_API_TOKEN": "s3cret"}) == s
    assert "s3cret" not in s.to_json()  # the token never travels in the JSON
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        Settings(mode="bogus")
    with pytest.raises(ConfigError, match="ZOO_MAX_FILES"):
        Settings.from_env({"ZOO_MAX_FILES": "many"})


def test_labels_fall_back_to_the_classes_zoo_finetune_records() -> None:
    """A posterior from `zoo finetune` or the demo names its classes in meta["classes"], not in config.json."""
    from zoo.loading import one_name_per_class

    assert one_name_per_class({"classes": ["zero", "one"]}.get("classes"), 2) == ["zero", "one"]
    assert one_name_per_class({"classes": ["zero"]}.get("classes"), 2) is None  # one name per class, or none
    assert one_name_per_class({"classes": [0, 1]}.get("classes"), 2) is None
    assert one_name_per_class({}.get("classes"), 2) is None
