"""The HTTP API and the draw-a-digit page: a FastAPI app around one checkpoint's network.

Images are read by predict's own ``open_image`` and ``decode`` (``read_image`` in two halves), so a file gets
the same answer here as from predict.
Uploads stay in memory: nothing is written to disk.
"""

import base64
import gc
import hmac
import io
import json
import os
from importlib.resources import files

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from mnist_lightning.errors import UserError
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.images import UnsupportedImage
from mnist_lightning.net import normalise
from mnist_lightning.serve import metrics
from mnist_lightning.serve.decoding import Decoder
from mnist_lightning.serve.guard import OwnPageOnly
from mnist_lightning.serve.lifecycle import draining
from mnist_lightning.serve.uploads import BadRequest, LingeringClose, multipart_file, read_body

SETTINGS_VARIABLE = "MNIST_SERVE_SETTINGS"  # how the processes of --workers N learn what to serve
RAW_TYPES = ("", "application/octet-stream")  # besides image/*; curl --data-binary sends a form type instead
# The page is one file with inline script and style; the policy keeps it from fetching anything else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'"
)


def check_key(request: Request, api_key: str | None) -> None:
    """The routes that compute need the key, if the server has one; the page, health and metadata do not."""
    if api_key and not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), api_key.encode()):
        raise BadRequest(401, "missing or wrong API key; send it in the X-API-Key header")


def create_app(
    net: torch.nn.Module,
    mean: float,
    std: float,
    *,
    api_key: str | None,
    max_bytes: int,
    hosts: set[str] | None = None,
    cors_origins: list[str] = (),
    temperature: float = 1.0,
    drain_seconds: float = 0.0,
) -> FastAPI:
    """The app; ``hosts`` are the Host names it answers to (None: any), ``cors_origins`` the other pages that
    may call it from a browser, ``temperature`` the checkpoint's, which calibrates the probabilities,
    ``drain_seconds`` how long it goes on serving after SIGTERM, not ready (serve.lifecycle)."""
    torch.set_num_threads(1)  # one small image a call has nothing to share out; workers are the parallelism
    # What exists now (torch, the network) lives as long as the process: keep it out of every garbage
    # collection. A full one over it took 150-160 ms here, a stall for every request in flight.
    gc.collect()
    gc.freeze()
    decoder = Decoder()  # the cap on big decodes at once is this worker's
    page = files("mnist_lightning.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(
        title="mnist-lightning", docs_url=None, redoc_url=None, openapi_url=None, lifespan=draining(drain_seconds)
    )
    app.state.ready = True  # until SIGTERM: GET /ready, and any other readiness route, read it
    if cors_origins:  # answers the preflights of the pages allowed, and tells their browsers they may read
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(OwnPageOnly, hosts=hosts or {"*"}, cors_origins=list(cors_origins))
    metrics.install(app)  # outside the guard, so that it counts the guard's refusals too
    # The outermost: every answer given before its body was read, and the drain after it, not timed as latency.
    app.add_middleware(LingeringClose)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)  # Starlette's own 404 and 405, as JSON like the rest
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": err.detail}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)  # a bug answers 500 as JSON too; uvicorn logs its traceback and serves on
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal server error; the server's log has the traceback"}, status_code=500)

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")  # for a balancer: 503 from SIGTERM on, while the server drains
    async def ready() -> JSONResponse:
        if not app.state.ready:
            return JSONResponse({"status": "stopping", "error": "the server is stopping; send to another"}, 503)
        return JSONResponse({"status": "ready"})

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        check_key(request, api_key)
        content_type = request.headers.get("content-type", "").strip()
        kind = content_type.split(";")[0].strip().lower()  # the type is case-blind; a multipart boundary is not
        if not (kind in RAW_TYPES or kind.startswith("image/") or kind == "multipart/form-data"):
            raise BadRequest(
                415,
                f"Content-Type {kind} is not an image; send the file as the body with Content-Type image/png "
                "(or image/jpeg, ...) or as a multipart upload: curl -F file=@digit.png",
            )
        body = await read_body(request, max_bytes)
        data = multipart_file(body, content_type) if kind == "multipart/form-data" else body
        if not data:
            raise BadRequest(400, "the upload is empty; send one image file")
        try:
            image = await decoder.digit(data)
        except UnsupportedImage as err:
            raise BadRequest(415, f"{err}") from None
        except UserError as err:
            raise BadRequest(422, f"{err}", blank=str(err).startswith("no digit found")) from None
        metrics.images_predicted(request, 1)
        return JSONResponse(answer(image, classify(net, mean, std, image, temperature)))

    from mnist_lightning.serve.v2 import v2_router  # here: v2 builds on this module's errors and body reading

    app.include_router(v2_router(net, mean, std, temperature=temperature, api_key=api_key, max_bytes=max_bytes))
    return app


def classify(
    net: torch.nn.Module, mean: float, std: float, image: np.ndarray, temperature: float = 1.0
) -> torch.Tensor:
    """The ten calibrated probabilities for one 28x28 uint8 image, softmax(logits / T) as predict's."""
    with torch.inference_mode():
        return (net(normalise(torch.from_numpy(image[None]).unsqueeze(1), mean, std))[0] / temperature).softmax(0)


def answer(image: np.ndarray, probabilities: torch.Tensor) -> dict:
    """/predict's JSON: predict's digit, probability and top 3, all ten probabilities and the image seen."""
    top = probabilities.topk(3)
    return {
        "digit": int(top.indices[0]),
        "probability": float(top.values[0]),
        "top3": [list(pair) for pair in zip(top.indices.tolist(), top.values.tolist(), strict=True)],
        "probabilities": probabilities.tolist(),
        "image": "data:image/png;base64," + base64.b64encode(as_png(image)).decode(),
    }


def from_environment() -> FastAPI:
    """The app for one process of ``--workers N``, built from the settings the command put in the environment."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    # quiet: the command has said once whether the checkpoint is calibrated; N workers need not repeat it.
    net, (mean, std), saved = load_checkpoint(settings["ckpt_path"], quiet=True)
    return create_app(
        net,
        mean,
        std,
        api_key=settings["api_key"],
        max_bytes=settings["max_bytes"],
        hosts=set(settings["hosts"]),
        cors_origins=settings["cors_origins"],
        temperature=saved["temperature"],
        drain_seconds=settings["drain_seconds"],
    )


def as_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()
