"""The Open Inference Protocol (KServe v2) beside ``/predict``: what tritonclient, KServe and Seldon speak.

One model, ``mnist``, version 1. Its input ``pixels`` is a batch of raw 0-255 pixels, FP32 or UINT8, of
shape [N, 1, 28, 28] or [N, 784], the exported graph's contract; its outputs are ``logits`` and
``probabilities`` [N, 10] FP32, softmax(logits / T) with the checkpoint's temperature as /predict's, and
``digit`` [N] INT64. Tensors travel as JSON or as Triton's binary tensor data (see ``tensors``).
Health and metadata are open, as /health and the page are; infer needs the API key, as /predict does.
"""

import zlib
from functools import partial
from importlib.metadata import version as package_version

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from mnist_lightning.net import normalise
from mnist_lightning.serve import metrics
from mnist_lightning.serve.app import check_key
from mnist_lightning.serve.decoding import INLINE_BYTES
from mnist_lightning.serve.tensors import INPUT, OUTPUTS, encode, read_pixels, read_request, requested_outputs
from mnist_lightning.serve.uploads import BadRequest, read_body

MODEL, VERSION = "mnist", "1"
# Images per infer request: 3 MB of FP32 in binary, within the default --max_bytes; clients split bigger sets.
MAX_BATCH = 1024
ENCODINGS = {"gzip": 31, "deflate": 15}  # Content-Encoding -> zlib's wbits; what tritonclient can compress with
# Big requests are worked in threads, at most this many at once per process: each holds its decoded JSON
# (tens of MB for a full body), and the network itself uses the one torch thread of the process.
THREADS = 2


def v2_router(
    net: torch.nn.Module, mean: float, std: float, *, temperature: float, api_key: str | None, max_bytes: int
) -> APIRouter:
    """The v2 routes, each model route also under /versions/1."""
    router, limiter = APIRouter(), anyio.CapacityLimiter(THREADS)
    server = {"name": "mnist-lightning", "version": package_version("mnist-lightning")}
    server["extensions"] = ["binary_tensor_data"]  # Triton's name for the binary extension
    metadata = {
        "name": MODEL,
        "versions": [VERSION],
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],  # UINT8 and [-1, 784] too
        "outputs": [
            {"name": name, "datatype": datatype, "shape": [-1, 10] if datatype == "FP32" else [-1]}
            for name, datatype in OUTPUTS.items()
        ],
    }

    def model_route(suffix: str, method: str):
        def add(handler):
            for path in (f"/v2/models/{{name}}{suffix}", f"/v2/models/{{name}}/versions/{{version}}{suffix}"):
                router.add_api_route(path, handler, methods=[method])
            return handler

        return add

    @router.get("/v2")
    async def server_metadata() -> JSONResponse:
        return JSONResponse(server)

    @router.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @router.get("/v2/health/ready")  # false from SIGTERM on, while the server drains, as GET /ready
    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": request.app.state.ready}, 200 if request.app.state.ready else 503)

    @model_route("", "GET")
    async def model_metadata(request: Request) -> JSONResponse:
        check_model(request)
        return JSONResponse(metadata)

    @model_route("/ready", "GET")
    async def model_ready(request: Request) -> JSONResponse:
        check_model(request)
        return JSONResponse({"name": MODEL, "ready": request.app.state.ready}, 200 if request.app.state.ready else 503)

    @model_route("/infer", "POST")
    async def infer(request: Request) -> Response:
        check_key(request, api_key)
        check_model(request)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", *ENCODINGS):
            raise BadRequest(415, f"Content-Encoding {encoding[:20]!r} is not understood; send gzip, deflate or none")
        body = await read_body(request, max_bytes)
        work = partial(answer, body, encoding, request.headers.get("inference-header-content-length"))
        # A batch costs O(N) to parse and compute: a big one in a thread, so that the event loop serves on.
        small = len(body) <= INLINE_BYTES and encoding == "identity"
        content, headers, count = work() if small else await anyio.to_thread.run_sync(work, limiter=limiter)
        metrics.images_predicted(request, count)
        return Response(content, headers=headers)

    def answer(body: bytes, encoding: str, header_length: str | None) -> tuple[bytes, dict[str, str], int]:
        if encoding != "identity":
            body = inflate(body, ENCODINGS[encoding], max_bytes)
        request, binary = read_request(body, header_length)
        pixels = read_pixels(request, binary, MAX_BATCH)
        wanted = requested_outputs(request)
        tensors = infer_batch(net, mean, std, temperature, pixels)
        content, headers = encode(request, {"model_name": MODEL, "model_version": VERSION}, tensors, wanted)
        return content, headers, len(pixels)

    return router


def check_model(request: Request) -> None:
    name, version = request.path_params["name"], request.path_params.get("version", VERSION)
    if name != MODEL:
        raise BadRequest(404, f"unknown model {name[:100]!r}; this server serves the model {MODEL!r}")
    if version != VERSION:
        raise BadRequest(404, f"model {MODEL} has no version {version[:20]!r}; its one version is {VERSION}")


def inflate(body: bytes, wbits: int, max_bytes: int) -> bytes:
    """A compressed body, decompressed no further than the server's limit: a few kB can inflate to gigabytes."""
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, max_bytes + 1)
    except zlib.error as err:
        raise BadRequest(400, f"the body does not decompress ({err}); send it as its Content-Encoding says") from None
    if len(data) > max_bytes:
        raise BadRequest(413, f"the body decompresses to over the server's limit of {max_bytes:,} bytes")
    if not decompressor.eof:
        raise BadRequest(400, "the compressed body is cut short; send all of it")
    return data


def infer_batch(
    net: torch.nn.Module, mean: float, std: float, temperature: float, pixels: np.ndarray
) -> dict[str, np.ndarray]:
    """Every output for a batch of 0-255 pixels, in one forward: predict's network and calibration."""
    with torch.inference_mode():
        logits = net(normalise(torch.from_numpy(pixels), mean, std))
        probabilities = (logits / temperature).softmax(1)
    return {"logits": logits.numpy(), "probabilities": probabilities.numpy(), "digit": logits.argmax(1).numpy()}
