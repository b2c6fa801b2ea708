"""Serving speed: ``python benchmarks/serve.py CKPT DATA_DIR [--seconds 5] [--client wrk|asyncio]``.

Starts ``python -m mnist_lightning.serve`` on a free loopback port with 1 and 2 workers and sends it
28x28 PNGs (MNIST test digits) and photo-sized JPEGs (those digits drawn large on 12-megapixel
paper) at 1, 8, 32 and 128 connections, then batches of those digits to the Open Inference Protocol's
infer route, as JSON and as binary tensors. The load comes from wrk when it is installed (C: it takes far
less of the CPU it shares with the server than a Python client), else from an asyncio client. Prints
markdown tables: requests/s, p50/p95/p99 latency and errors per row, and beside them the same images'
in-process throughput, predict's path, and what one request's work costs without HTTP; for infer, the
images/s against the same network on the same batch in-process.
"""

import argparse
import asyncio
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from fastapi.responses import JSONResponse
from PIL import Image

from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.files.images import read_image
from mnist_lightning.net import normalise
from mnist_lightning.serve.app import answer, as_png, classify
from mnist_lightning.serve.v2 import infer_batch

V2_INFER = "/v2/models/mnist/infer"
# wrk's Lua: each thread cycles through the bodies; done() prints the totals and exact percentiles.
WRK_SCRIPT = """
local bodies, i = {}, 0
for n, path in ipairs({%(files)s}) do local f = io.open(path, "rb"); bodies[n] = f:read("*a"); f:close() end
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%(path)s", {%(headers)s}, bodies[i])
end
done = function(s, latency)
  local e = s.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d\\n", s.requests, s.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(95),
    latency:percentile(99)))
end
"""


def images(digits: np.ndarray, pngs: int, jpegs: int) -> dict[str, tuple[str, list[bytes]]]:
    rng = np.random.default_rng(0)
    photos = []
    for digit in digits[:jpegs]:
        # A dark digit on grey, unevenly lit paper with sensor noise, as a phone would take it.
        paper = np.linspace(150, 215, 3024)[:, None] + rng.normal(0, 6, (3024, 4032))
        ink = np.asarray(Image.fromarray(digit).resize((1400, 1400), Image.Resampling.BILINEAR), np.float64)
        paper[812:2212, 1316:2716] -= ink * 0.55
        photo = Image.fromarray(paper.clip(0, 255).astype(np.uint8)).convert("RGB")
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        photos.append(buffer.getvalue())
    return {
        "28x28 PNGs": ("image/png", [as_png(digit) for digit in digits[:pngs]]),
        "4032x3024 JPEGs": ("image/jpeg", photos),
    }


def passes(run, bodies: list[bytes], seconds: float = 2) -> float:
    """Items per second of ``run(bodies)``, repeated for at least ``seconds`` after one warm-up pass."""
    run(bodies)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(bodies)
        count += len(bodies)
    return count / (time.perf_counter() - start)


def in_process(ckpt: str, bodies: list[bytes]) -> tuple[str, float]:
    """Predict's path in batches of 1024, and the server's work for one request without HTTP, step by step."""
    net, (mean, std), _ = load_checkpoint(ckpt)

    def batched(bodies: list[bytes]) -> None:
        with torch.inference_mode():
            for i in range(0, len(bodies), 1024):
                pixels = torch.from_numpy(np.stack([read_image(b) for b in bodies[i : i + 1024]])).unsqueeze(1)
                net(normalise(pixels, mean, std)).softmax(1).topk(3)

    predict_rate, threads = passes(batched, bodies), torch.get_num_threads()
    steps = {
        "read_image": read_image,
        "network": lambda image: (image, classify(net, mean, std, image)),
        "answer": lambda pair: answer(*pair),
        "JSON": lambda content: JSONResponse(content).body,
    }
    costs, calls = dict.fromkeys(steps, 0.0), [0]

    def one_by_one(bodies: list[bytes]) -> None:
        for value in bodies:
            for name, step in steps.items():
                started = time.perf_counter()
                value = step(value)
                costs[name] += time.perf_counter() - started
        calls[0] += len(bodies)

    torch.set_num_threads(1)  # as each server process runs
    request_rate = passes(one_by_one, bodies)
    torch.set_num_threads(threads)
    each = ", ".join(f"{name} {1e6 * seconds / calls[0]:,.0f} µs" for name, seconds in costs.items())
    return (
        f"In-process, no HTTP: predict's path (read_image and the network in batches of 1024, {threads} torch "
        f"threads) {predict_rate:,.0f} images/s; the server's work for one request, on 1 thread, "
        f"{request_rate:,.0f}/s ({each})."
    ), request_rate


def infer_request(digits: np.ndarray, batch: int, binary: bool) -> tuple[bytes, dict[str, str]]:
    """An infer body and its headers for ``batch`` digits as FP32 [N, 1, 28, 28], as tritonclient sends them:
    all outputs asked for, in the input's encoding."""
    pixels = np.resize(digits, (batch, 1, 28, 28)).astype("<f4")
    tensor = {"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32"}
    if binary:
        data = pixels.tobytes()
        tensor["parameters"] = {"binary_data_size": len(data)}
    else:
        data, tensor["data"] = b"", pixels.ravel().tolist()
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": binary}}).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + data, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def v2_in_process(ckpt: str, digits: np.ndarray, batches: list[int]) -> dict[int, float]:
    """Images/s of infer's own computation (normalise, one forward, softmax) on each batch, without HTTP,
    on 1 torch thread as each server process runs."""
    net, (mean, std), saved = load_checkpoint(ckpt, quiet=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    for batch in batches:
        pixels = np.resize(digits, (batch, 28 * 28)).astype(np.float32)
        rates[batch] = passes(lambda pixels: infer_batch(net, mean, std, saved["temperature"], pixels), pixels)
    torch.set_num_threads(threads)
    return rates


class Server:
    def __init__(self, ckpt: str, workers: int):
        command = [
            sys.executable,
            "-m",
            "mnist_lightning.serve",
            "--ckpt_path",
            ckpt,
            "--port",
            "0",
            "--drain_seconds",
            "0",
        ]
        self.proc = subprocess.Popen([*command, "--workers", str(workers)], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().split(" at ")[-1].strip()  # "serving CKPT at http://127.0.0.1:N/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(self.url + "health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server at {self.url!r} did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def with_wrk(url: str, path: str, headers: dict, files: list[Path], connections: int, seconds: float):
    script = files[0].parent / "post.lua"
    lua_headers = ", ".join(f'["{name}"] = "{value}"' for name, value in headers.items())
    script.write_text(WRK_SCRIPT % {"files": ", ".join(f'"{f}"' for f in files), "path": path, "headers": lua_headers})
    threads = min(2, connections)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "60s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    requests, micros, failed, bad_status, p50, p95, p99 = map(int, out.split("RESULT")[1].split())
    return requests, requests / (micros / 1e6), failed + bad_status, [p50 / 1000, p95 / 1000, p99 / 1000]


async def with_asyncio(url: str, path: str, headers: dict, bodies: list[bytes], connections: int, seconds: float):
    host, port = url.split("//")[1].rstrip("/").split(":")
    lines = "".join(f"{name}: {value}\r\n" for name, value in {"Host": host, **headers}.items())
    messages = [
        f"POST {path} HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body for body in bodies
    ]
    latencies, errors, deadline = [], [0], time.perf_counter() + seconds
    limit = 200_000  # the count bound, beside the time bound

    async def connection(offset: int) -> None:
        reader = writer = None
        n = offset
        while time.perf_counter() < deadline and len(latencies) < limit:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                start = time.perf_counter()
                writer.write(messages[n % len(messages)])
                head = await reader.readuntil(b"\r\n\r\n")
                # The line's start, as Inference-Header-Content-Length ends the same way.
                length = int(head.lower().split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                errors[0] += not head.startswith(b"HTTP/1.1 200")
            except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
                errors[0] += 1
                if writer is not None:
                    writer.close()
                writer = None
            n += 1
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(connections)))
    elapsed = time.perf_counter() - start
    p = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
    return len(latencies), len(latencies) / elapsed, errors[0], list(p)


def load(client: str, server: Server, files: list[Path], connections: int, seconds: float, path: str, headers: dict):
    if client == "wrk":
        return with_wrk(server.url, path, headers, files, connections, seconds)
    bodies = [f.read_bytes() for f in files]
    return asyncio.run(with_asyncio(server.url, path, headers, bodies, connections, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint written by mnist_lightning.fit")
    parser.add_argument("data_dir", help="folder holding MNIST/raw/")
    parser.add_argument("--seconds", type=float, default=5, help="load per row, at least")
    parser.add_argument("--max_seconds", type=float, default=60, help="load per row, at most")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pngs", type=int, default=256, help="distinct 28x28 PNGs sent round-robin")
    parser.add_argument("--jpegs", type=int, default=4, help="distinct photo-sized JPEGs")
    parser.add_argument("--v2_batches", type=int, nargs="+", default=[1, 256], help="images per infer request")
    parser.add_argument("--v2_connections", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--client", choices=["wrk", "asyncio"], default="wrk" if shutil.which("wrk") else "asyncio")
    args = parser.parse_args()
    digits = load_split(Path(args.data_dir) / "MNIST" / "raw", "test")[0][:, 0].numpy()
    sets = images(digits, args.pngs, args.jpegs)
    ceilings = {name: in_process(args.ckpt, bodies) for name, (_, bodies) in sets.items()}
    v2_ceilings = v2_in_process(args.ckpt, digits, args.v2_batches)
    rows, v2_rows = {name: [] for name in sets}, []
    with tempfile.TemporaryDirectory() as folder:
        files = {name: [Path(folder, f"{name[:5]}{i}") for i in range(len(sets[name][1]))] for name in sets}
        for name, (_, bodies) in sets.items():
            for path, body in zip(files[name], bodies, strict=True):
                path.write_bytes(body)
        infers = {}  # (tensors, batch) -> the body's file and its headers
        for tensors in ("binary", "JSON"):
            for batch in args.v2_batches:
                body, headers = infer_request(digits, batch, tensors == "binary")
                infers[tensors, batch] = Path(folder, f"infer-{tensors}-{batch}"), headers
                infers[tensors, batch][0].write_bytes(body)
        png = {"Content-Type": "image/png"}
        for workers in args.workers:
            server = Server(args.ckpt, workers)
            try:
                load(args.client, server, files["28x28 PNGs"], 8, 1, "/predict", png)  # warm-up, not shown
                for name, (content_type, _) in sets.items():
                    for connections in args.connections:
                        # Long enough for each connection's requests to come back a few times, at the
                        # in-process rate: 128 photos in flight take 10-20 s each to come back.
                        wait = 3 * connections / (workers * ceilings[name][1])
                        seconds = min(max(args.seconds, wait), args.max_seconds)
                        headers = {"Content-Type": content_type}
                        result = load(args.client, server, files[name], connections, seconds, "/predict", headers)
                        rows[name].append((workers, connections, seconds, *result))
            finally:
                server.stop()
            # A fresh server: the photos still queued from the last row above held up the first infer rows.
            server = Server(args.ckpt, workers)
            try:
                warm_up, headers = infers["binary", args.v2_batches[0]]
                load(args.client, server, [warm_up], 8, 1, V2_INFER, headers)  # not shown
                for (tensors, batch), (path, headers) in infers.items():
                    for connections in args.v2_connections:
                        result = load(args.client, server, [path], connections, args.seconds, V2_INFER, headers)
                        v2_rows.append((workers, connections, tensors, batch, args.seconds, *result))
            finally:
                server.stop()
    client = "wrk" if args.client == "wrk" else "an asyncio client (wrk is not installed)"
    for name, (_, bodies) in sets.items():
        size = statistics.mean(map(len, bodies)) / 1000
        print(f"\n### {name}: {len(bodies)} distinct, {size:,.1f} kB each on average; load from {client}")
        print(f"\n{ceilings[name][0]}\n")
        print("| workers | connections | requests/s | p50 ms | p95 ms | p99 ms | errors | requests | seconds |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for workers, connections, seconds, count, rate, errors, latency in rows[name]:
            cells = [workers, connections, f"{rate:,.1f}", *(f"{ms:,.1f}" for ms in latency), errors, f"{count:,}"]
            print("| " + " | ".join(map(str, cells)) + f" | {seconds:.0f} |")
    print(f"\n### Open Inference Protocol: POST {V2_INFER}, FP32 pixels [N, 1, 28, 28]; load from {client}")
    each = ", ".join(f"batch {batch} {rate:,.0f} images/s" for batch, rate in v2_ceilings.items())
    print(
        f"\nIn-process, no HTTP: infer's computation on the same batch, on 1 thread as each server process: {each}.\n"
    )
    print(
        "| workers | connections | tensors | batch | requests/s | images/s | of in-process | p50 ms | p95 ms | p99 ms "
        "| errors | requests | seconds |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers, connections, tensors, batch, seconds, count, rate, errors, latency in v2_rows:
        share = f"{100 * rate * batch / v2_ceilings[batch]:.0f}%"
        cells = [workers, connections, tensors, batch, f"{rate:,.1f}", f"{rate * batch:,.0f}", share]
        cells += [*(f"{ms:,.1f}" for ms in latency), errors, f"{count:,}", f"{seconds:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
