"""The HTTP server, as its users meet it: a real process on a loopback port, spoken to over HTTP."""

import base64
import http.client
import io
import json
import os
import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import foreign_images, run_module, spy_program
from mnist_lightning import predict
from mnist_lightning.errors import run_main
from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.files.images import read_image
from mnist_lightning.net import normalise
from mnist_lightning.serve.server import cli_main, listen
from serving import Server
from test_checkpoint import RunsACommand
from test_predict import png_claiming

LIMIT = 10_000_000  # the server's default --max_bytes


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def bar(digit: int) -> Image.Image:
    """A new digit of the synthetic data's kind (conftest.synthetic_digits): a bright bar at rows 2c+4..2c+7."""
    pixels = np.random.default_rng(digit).integers(0, 60, (28, 28))
    pixels[2 * digit + 4 : 2 * digit + 8, 6:22] += 180
    return Image.fromarray(pixels.astype(np.uint8))


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart/form-data body: (name, filename or None, data) per field."""
    body = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(trained_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "cwd").mkdir()
    (root / "tmp").mkdir()
    # An empty working folder and temp folder of its own: the tests can see that nothing lands in them. A
    # stand-in Ghostscript first on its PATH records whether any upload made the server run it.
    bin_dir, _ = spy_program(root / "bin", "gs")
    env = {"TMPDIR": str(root / "tmp"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    running = Server("--ckpt_path", str(trained_ckpt), cwd=root / "cwd", log=root / "stderr.log", env=env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def expected(trained_ckpt):
    """What the checkpoint's network says about an image file, by predict's own functions: calibrated
    probabilities, softmax(logits / T)."""
    net, (mean, std), saved = load_checkpoint(trained_ckpt)

    def answer(data: bytes) -> tuple[np.ndarray, torch.Tensor]:
        image = read_image(data)
        with torch.inference_mode():
            logits = net(normalise(torch.from_numpy(image[None]).unsqueeze(1), mean, std))
        return image, (logits / saved["temperature"]).softmax(1)[0]

    return answer


def seen(answer: dict) -> np.ndarray:
    """The 28x28 image the server says the model saw."""
    assert answer["image"].startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"].split(",", 1)[1]))))


def test_known_images_get_their_digit(server, expected):
    for digit in range(10):
        status, answer = server.post(encoded(bar(digit)))
        assert status == 200, answer
        assert answer["digit"] == digit
        image, probabilities = expected(encoded(bar(digit)))
        assert np.array_equal(seen(answer), image)
        assert answer["probabilities"] == pytest.approx(probabilities.tolist(), abs=1e-6)
        assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert [d for d, _ in answer["top3"]] == probabilities.topk(3).indices.tolist()
        assert answer["probability"] == answer["top3"][0][1] == max(answer["probabilities"])


def user_files(tmp_path, data_dir) -> list:
    """The same digits as predict's users send them: many formats, sizes and modes."""
    mnist = load_split(data_dir / "MNIST" / "raw", "test")[0][:4, 0].numpy()
    seven = Image.new("L", (200, 300), 255)
    ImageDraw.Draw(seven).line([(60, 40), (140, 40), (100, 260)], fill=0, width=18)
    transparent = Image.new("RGBA", (120, 160), (0, 0, 0, 0))
    ImageDraw.Draw(transparent).line([(60, 20), (60, 140)], fill=(20, 20, 200, 255), width=14)
    files = [(f"mnist{i}.png", Image.fromarray(image), "PNG") for i, image in enumerate(mnist)]
    files += [
        ("seven.jpg", seven.convert("RGB"), "JPEG"),
        ("seven.bmp", seven, "BMP"),
        ("seven.gif", seven.convert("P"), "GIF"),
        ("seven.webp", seven.convert("RGB"), "WEBP"),
        ("one.png", transparent, "PNG"),
        ("three16.png", Image.fromarray(np.asarray(bar(3)).astype(np.uint16) * 257), "PNG"),  # 16-bit
    ]
    paths = []
    for name, image, kind in files:
        (tmp_path / name).write_bytes(encoded(image, kind))
        paths.append(tmp_path / name)
    return paths


def test_same_answer_as_predict_for_the_same_files(server, trained_ckpt, data_dir, tmp_path):
    files = user_files(tmp_path, data_dir)
    saved_to = tmp_path / "seen"
    rows = predict.cli_main(["--ckpt_path", str(trained_ckpt), *map(str, files), "--save_preprocessed", str(saved_to)])
    assert len(rows) == len(files)
    for i, (path, row) in enumerate(zip(files, rows, strict=True)):
        as_raw = server.post(path.read_bytes(), "application/octet-stream")
        as_upload = server.post(*multipart([("file", path.name, path.read_bytes())]))
        for status, answer in (as_raw, as_upload):
            assert status == 200, (path.name, answer)
            assert answer["digit"] == row["digit"], path.name
            assert [d for d, _ in answer["top3"]] == [d for d, _ in row["top3"]], path.name
            assert [p for _, p in answer["top3"]] == pytest.approx([p for _, p in row["top3"]], abs=1e-6)
            saved = np.asarray(Image.open(saved_to / f"{i:05d}_{path.stem}.png"))
            assert np.array_equal(seen(answer), saved), path.name


def raw_request(server: Server, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes as they are, for requests http.client will not make; the status and JSON answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def claimed_length(server: Server, length: int) -> tuple[int, dict]:
    """Headers that announce a body over the limit, and none of it: the server must answer without waiting."""
    head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
    return raw_request(server, head.encode())


def chunked(server: Server, size: int) -> tuple[int, dict]:
    """A body with no length up front, sent in 1 MB chunks."""
    chunks = [b"\0" * min(1_000_000, size - start) for start in range(0, size, 1_000_000)]
    connection = server.connect()
    headers = {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}
    connection.request("POST", "/predict", body=iter(chunks), headers=headers, encode_chunked=True)
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def bad_inputs(tmp_path) -> dict:
    """Each bad request the server must refuse with one JSON error, by name: (status, how to send it)."""
    good = encoded(bar(4))
    png_claiming(tmp_path / "bomb.png", 30_000, 30_000)
    return {
        "empty body": (400, lambda s: s.post(b"")),
        "empty multipart file": (400, lambda s: s.post(*multipart([("file", "x.png", b"")]))),
        "not an image": (415, lambda s: s.post(b"hello, I am plain text and not a PNG at all")),
        "truncated PNG": (422, lambda s: s.post(good[: len(good) // 2])),
        "decompression bomb": (422, lambda s: s.post((tmp_path / "bomb.png").read_bytes())),
        "over the size limit, by its Content-Length": (413, lambda s: claimed_length(s, LIMIT + 1)),
        "over the size limit, chunked": (413, lambda s: chunked(s, LIMIT + 1)),
        "text content type": (415, lambda s: s.post(good, "text/plain")),
        "form content type (curl --data-binary)": (415, lambda s: s.post(good, "application/x-www-form-urlencoded")),
        "JSON content type": (415, lambda s: s.post(b'{"image": 1}', "application/json")),
        "multipart without a boundary": (400, lambda s: s.post(good, "multipart/form-data")),
        "multipart with another boundary": (
            400,
            lambda s: s.post(multipart([("f", "a.png", good)])[0], "multipart/form-data; boundary=zzz"),
        ),
        "multipart cut short": (400, lambda s: s.post(multipart([("file", "a.png", good)])[0][:-30], multipart([])[1])),
        "multipart with no file": (400, lambda s: s.post(*multipart([("note", None, b"hello")]))),
        "multipart with a broken part header": (
            400,
            lambda s: s.post(b"--b0undary\r\nno colon here\r\n\r\nx\r\n--b0undary--\r\n", multipart([])[1]),
        ),
        "black image": (422, lambda s: s.post(encoded(Image.new("L", (28, 28), 0)))),
        "white photo": (422, lambda s: s.post(encoded(Image.new("RGB", (640, 480), "white"), "JPEG"))),
        "GET /predict": (405, lambda s: s.request("GET", "/predict")),
        "unknown path": (404, lambda s: s.request("POST", "/predicts", good)),
    }


def test_every_bad_input_is_one_json_error_and_the_next_request_is_answered(server, tmp_path):
    good, digit = encoded(bar(4)), 4
    for name, (status, send) in bad_inputs(tmp_path).items():
        got, answer = send(server)
        assert (got, sorted(answer)) in ((status, ["error"]), (status, ["blank", "error"])), (name, got, answer)
        assert "\n" not in answer["error"] and len(answer["error"]) < 300, name
        assert server.alive(), name
        got, answer = server.post(good)
        assert (got, answer["digit"]) == (200, digit), f"after {name}: {got} {answer}"
    assert "Traceback" not in server.log.read_text()


def test_only_the_documented_formats_are_decoded_and_no_program_runs(server, tmp_path):
    foreign = foreign_images(tmp_path)
    assert {"EPS", "XBM", "PCX", "ICO"} <= foreign.keys()
    for kind, path in foreign.items():
        data = path.read_bytes()
        for status, answer in (server.post(data), server.post(*multipart([("f", path.name, data)]))):
            assert status == 415 and "only PNG, JPEG, BMP, GIF, WebP or TIFF files are read" in answer["error"], kind
    assert server.post(encoded(bar(5)))[1]["digit"] == 5
    assert not (server.log.parent / "bin" / "gs.ran").exists()


def browser_post(server: Server, origin: str | None, host: str | None = None, body: bytes | None = None) -> tuple:
    """A multipart POST of a digit as a browser sends it from a page at ``origin``: a "simple" request, no
    preflight. Returns the status, the JSON answer and the headers."""
    # Chrome's boundary, in mixed case: the server once lowercased it with the type, failing every browser upload.
    boundary = "----WebKitFormBoundaryQ3vYt7Lr"
    data, content_type = multipart([("file", "digit.png", body or encoded(bar(3)))], boundary=boundary)
    headers = {"Content-Type": content_type, "Host": f"127.0.0.1:{server.port}" if host is None else host}
    if origin is not None:
        headers |= {"Origin": origin, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"}
    connection = server.connect()
    connection.putrequest("POST", "/predict", skip_host=True)
    for name, value in {**headers, "Content-Length": str(len(data))}.items():
        connection.putheader(name, value)
    connection.endheaders(data)
    response = connection.getresponse()
    answer = response.status, json.loads(response.read()), dict(response.getheaders())
    connection.close()
    return answer


def test_only_the_servers_own_page_may_call_it_from_a_browser(server):
    own = f"http://127.0.0.1:{server.port}"
    assert browser_post(server, None)[0] == 200  # curl, Python: no Origin
    assert browser_post(server, own)[0] == 200  # the draw-a-digit page
    assert browser_post(server, f"http://localhost:{server.port}", f"localhost:{server.port}")[0] == 200
    for origin in (
        "https://evil.example",
        "http://127.0.0.1:9",
        f"http://127.0.0.1.evil.example:{server.port}",
        "null",
    ):
        status, answer, headers = browser_post(server, origin)
        assert status == 403 and "only this server's own page may call it" in answer["error"], origin
        assert "access-control-allow-origin" not in {k.lower() for k in headers}
    # A preflight from another page is refused as well.
    status, answer = server.request(
        "OPTIONS", "/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert status == 403


def test_a_host_that_is_not_the_servers_is_refused_against_dns_rebinding(server):
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.nip.io", "", "[bad"):
        status, answer, _ = browser_post(server, None, host=host)
        assert status == 400 and "not a name this server answers to" in answer["error"], (host, answer)
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert browser_post(server, None, host=host)[0] == 200, host
    assert server.post(encoded(bar(5)))[1]["digit"] == 5


def test_cors_origins_and_allowed_hosts_open_the_server_to_the_pages_named(trained_ckpt, tmp_path):
    app = "https://digits.example"
    opened = Server("--ckpt_path", str(trained_ckpt), "--cors_origins", app, "--allowed_hosts", "api.example",
                    cwd=tmp_path, log=tmp_path / "log")  # fmt: skip
    try:
        status, answer, headers = browser_post(opened, app, host="api.example")
        assert (status, answer["digit"], headers.get("access-control-allow-origin")) == (200, 3, app)
        preflight = {
            "Origin": app,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        }
        assert opened.request("OPTIONS", "/predict", headers=preflight)[0] == 200
        assert browser_post(opened, "https://evil.example", host="api.example")[0] == 403
        assert browser_post(opened, None, host="other.example")[0] == 400
    finally:
        opened.stop()


def test_a_blank_image_is_answered_and_flagged(server):
    for blank in (Image.new("L", (28, 28), 0), Image.new("L", (300, 200), 255)):
        status, answer = server.post(encoded(blank))
        assert (status, answer["blank"]) == (422, True)
        assert answer["error"] == "no digit found: the image is blank"
    status, answer = server.post(encoded(bar(1))[:60], "image/png")  # a PNG cut short: unreadable, not blank
    assert (status, answer["blank"]) == (422, False)


def test_uploads_are_kept_in_memory_not_written_to_disk(server):
    # 2.25 MB: Starlette's own form parsing would spool this to a temporary file (over 1 MB).
    seven = Image.new("L", (1500, 1500), 255)
    ImageDraw.Draw(seven).line([(400, 200), (1100, 200), (700, 1300)], fill=0, width=120)
    big = encoded(seven, "BMP")
    assert len(big) > 2_000_000
    for status, answer in (server.post(big, "image/bmp"), server.post(*multipart([("file", "seven.bmp", big)]))):
        assert status == 200, answer
    root = server.log.parent
    assert list((root / "cwd").iterdir()) == [] and list((root / "tmp").iterdir()) == []


def test_the_page_is_served_whole_and_self_contained(server):
    connection = server.connect()
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode()
    connection.close()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    for contract in ('id="canvas"', 'id="prediction"', 'id="clear"'):
        assert contract in page
    # Offline: no address anywhere in the page, and a policy that would block one if there were.
    assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", page)
    assert "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert server.request("GET", "/health") == (200, {"status": "ok"})


def test_the_api_key_guards_predict_only(trained_ckpt, tmp_path):
    keyed = Server(
        "--ckpt_path", str(trained_ckpt), cwd=tmp_path, log=tmp_path / "log", env={"MNIST_API_KEY": "s3cret"}
    )
    try:
        good = encoded(bar(2))
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "s3cre"}, {"Authorization": "Bearer s3cret"}):
            status, answer = keyed.post(good, headers=headers)
            assert status == 401 and "API key" in answer["error"], headers
        status, answer = keyed.post(good, headers={"X-API-Key": "s3cret"})
        assert (status, answer["digit"]) == (200, 2)
        assert keyed.request("GET", "/health")[0] == 200 and keyed.request("GET", "/")[0] == 200
        assert "s3cret" not in keyed.first_line
    finally:
        keyed.stop()


def refusal(capsys, *args: str) -> str:
    """The one line a start-up failure prints, after checking its exit status; in-process, so fast."""
    with pytest.raises(SystemExit) as exit_:
        run_main(cli_main, list(args))
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (out, err)
    return err


def test_bad_checkpoints_are_refused_before_the_port_opens(tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": RunsACommand(f"touch {tmp_path}/pwned")}, tmp_path / "hostile.ckpt")
    assert "does not exist" in refusal(capsys, "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert "corrupt" in refusal(capsys, "--ckpt_path", str(tmp_path / "junk.ckpt"))
    assert "unsafe" in refusal(capsys, "--ckpt_path", str(tmp_path / "hostile.ckpt"))
    assert not (tmp_path / "pwned").exists()


def test_bad_options_and_a_taken_port_are_refused(trained_ckpt, capsys):
    assert "--workers" in refusal(capsys, "--ckpt_path", str(trained_ckpt), "--workers", "0")
    assert "--max_bytes" in refusal(capsys, "--ckpt_path", str(trained_ckpt), "--max_bytes", "-1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port}" in refusal(capsys, "--ckpt_path", str(trained_ckpt), "--port", port)


def test_best_and_last_name_the_newest_runs_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "no run in ./ has a checkpoint" in refusal(capsys, "--ckpt_path", "best")
    run = tmp_path / "lightning_logs/version_0/checkpoints"
    run.mkdir(parents=True)
    (run / "best-epoch2-val_acc0.9000.ckpt").write_bytes(b"junk")
    assert "best-epoch2-val_acc0.9000.ckpt is truncated, corrupt" in refusal(capsys, "--ckpt_path", "best")
    assert "version_0, has no last.ckpt" in refusal(capsys, "--ckpt_path", "last")


def test_start_up_failure_is_one_line_and_exit_2_as_a_command(tmp_path):
    proc = run_module("mnist_lightning.serve", "--ckpt_path", "missing.ckpt", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: checkpoint missing.ckpt does not exist") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_best_serves_the_newest_finished_runs_best_checkpoint(trained_ckpt, tmp_path):
    run = tmp_path / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not used")
    (run / "metrics.json").write_text(json.dumps({"best_model_path": str(trained_ckpt)}))
    best = Server("--ckpt_path", "best", cwd=tmp_path, log=tmp_path / "log")
    try:
        assert best.first_line == f"serving {trained_ckpt} at http://127.0.0.1:{best.port}/"
        assert best.post(encoded(bar(6)))[1]["digit"] == 6
    finally:
        best.stop()


@pytest.mark.slow
def test_two_workers_share_the_port(trained_ckpt, tmp_path):
    pair = Server("--ckpt_path", str(trained_ckpt), "--workers", "2", cwd=tmp_path, log=tmp_path / "log")
    try:
        for digit in list(range(10)) * 3:
            assert pair.post(encoded(bar(digit)))[1]["digit"] == digit
        assert pair.post(b"")[0] == 400 and pair.post(encoded(bar(8)))[1]["digit"] == 8
    finally:
        pair.stop()
    assert pair.proc.returncode == 0  # SIGTERM is a clean stop, workers and all


def test_the_listening_socket_says_it_is_tcp():
    """asyncio turns Nagle's algorithm off only on sockets whose protocol is TCP; with it on, every answer
    waited about 40 ms for the client's delayed ACK (22 requests/s on one connection, found by the benchmark)."""
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
