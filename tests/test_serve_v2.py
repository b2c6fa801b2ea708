"""The server's Open Inference Protocol (KServe v2) routes, spoken to by the real client, tritonclient."""

import gzip
import json
import zlib

import numpy as np
import pytest
import torch

from mnist_lightning.files.checkpoints import load_checkpoint
from mnist_lightning.files.idx import load_split
from mnist_lightning.net import normalise
from serving import Server

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = {"X-API-Key": "v2-s3cret"}
INFER = "/v2/models/mnist/infer"


@pytest.fixture(scope="module")
def server(trained_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    running = Server(
        "--ckpt_path", str(trained_ckpt), cwd=root, log=root / "stderr.log", env={"MNIST_API_KEY": KEY["X-API-Key"]}
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        yield client


@pytest.fixture(scope="module")
def test_set(data_dir, trained_ckpt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The synthetic test images, uint8 (N, 1, 28, 28), and predict's logits and calibrated probabilities."""
    images = load_split(data_dir / "MNIST" / "raw", "test")[0]
    net, (mean, std), saved = load_checkpoint(trained_ckpt)
    with torch.inference_mode():
        logits = net(normalise(images, mean, std))
    return images.numpy(), logits.numpy(), (logits / saved["temperature"]).softmax(1).numpy()


def infer(client, pixels: np.ndarray, binary: bool, outputs=None, **options):
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8" if pixels.dtype == np.uint8 else "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    # A copy: the client adds Inference-Header-Content-Length to the headers it is given.
    return client.infer("mnist", [tensor], outputs=outputs, headers=dict(KEY), **options)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape", [(1, 28, 28), (784,)])
def test_the_client_infers_the_test_set_as_predicts_network(client, test_set, binary, datatype, shape):
    images, logits, probabilities = test_set
    batch = 128  # 301 images: two full batches and a partial one
    for start in range(0, len(images), batch):
        pixels = images[start : start + batch].astype(datatype).reshape(-1, *shape)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
        result = infer(client, pixels, binary, outputs + [httpclient.InferRequestedOutput("digit", binary)])
        expected = slice(start, start + batch)
        np.testing.assert_allclose(result.as_numpy("logits"), logits[expected], rtol=0, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities[expected], rtol=0, atol=1e-6)
        assert np.array_equal(result.as_numpy("digit"), probabilities[expected].argmax(1))
        assert result.as_numpy("logits").dtype == np.float32 and result.as_numpy("digit").dtype == np.int64


def test_outputs_are_the_ones_asked_for_each_in_its_encoding(client, test_set):
    images, logits, probabilities = test_set
    result = infer(client, images[:5], True, [httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    assert [output["name"] for output in result.get_response()["outputs"]] == ["probabilities"]
    assert "data" in result.get_response()["outputs"][0] and result.as_numpy("logits") is None
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities[:5], atol=1e-6)
    everything = infer(client, images[:5], True)  # none named: all three, in binary (the client asks so)
    assert [output["name"] for output in everything.get_response()["outputs"]] == ["logits", "probabilities", "digit"]
    assert all("binary_data_size" in output["parameters"] for output in everything.get_response()["outputs"])
    np.testing.assert_allclose(everything.as_numpy("logits"), logits[:5], atol=1e-5)


def test_compressed_requests_and_the_batch_limit(client, test_set):
    images, _, probabilities = test_set
    for algorithm in ("gzip", "deflate"):
        result = infer(client, images[:3], True, request_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities[:3], atol=1e-6)
    full = np.resize(images, (1024, 1, 28, 28))  # the documented limit, answered
    assert infer(client, full, True).as_numpy("probabilities").shape == (1024, 10)
    with pytest.raises(InferenceServerException, match="1-1,024") as refused:
        infer(client, np.resize(images, (1025, 1, 28, 28)), True)
    assert refused.value.status() == "400"


def test_health_and_metadata_speak_the_protocol(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist") and client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("cifar") and not client.is_model_ready("mnist", "2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("mnist")
    assert metadata["name"] == "mnist" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert {(o["name"], o["datatype"]) for o in metadata["outputs"]} == {
        ("logits", "FP32"),
        ("probabilities", "FP32"),
        ("digit", "INT64"),
    }
    with pytest.raises(InferenceServerException, match="unknown model") as unknown:
        client.get_model_metadata("cifar")
    assert unknown.value.status() == "404"
    assert server.request("GET", "/v2/health/live") == (200, {"live": True})


def test_infer_needs_the_api_key_and_health_does_not(client, server, test_set):
    tensor = httpclient.InferInput("pixels", [1, 784], "UINT8").set_data_from_numpy(test_set[0][:1].reshape(1, 784))
    for headers in ({}, {"X-API-Key": "wrong"}):
        with pytest.raises(InferenceServerException, match="API key") as refused:
            client.infer("mnist", [tensor], headers=headers)
        assert refused.value.status() == "401"
    assert client.is_server_ready() and client.get_model_metadata("mnist")["name"] == "mnist"
    assert server.request("GET", "/v2")[0] == 200


def request(pixels, datatype="UINT8", shape=None, binary=False, **fields) -> tuple[bytes, dict]:
    """A raw infer body and its headers, for what the client would refuse to send."""
    tensor = {"name": "pixels", "datatype": datatype, "shape": shape or [1, 784]}
    data = np.asarray(pixels, {"UINT8": "u1"}.get(datatype, "<f4")).tobytes() if binary else None
    tensor |= {"parameters": {"binary_data_size": len(data)}} if binary else {"data": pixels}
    header = json.dumps({"inputs": [tensor], **fields}).encode()
    return header + (data or b""), {"Inference-Header-Content-Length": str(len(header))} if binary else {}


def with_input(**changes) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], **changes}]}).encode()


ZEROS = [0] * 784
GOOD, GOOD_HEADERS = request(ZEROS, "FP32", binary=True)
PIXELS = json.loads(with_input(data=ZEROS))["inputs"][0]


def with_bytes(tensor: dict, data: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


BOTH = with_bytes(PIXELS | {"parameters": {"binary_data_size": 784}}, bytes(784))
CLASSIFY = [{"name": "digit", "parameters": {"classification": 3}}]
BAD = {  # what is wrong: (body, headers, status, a word of the error)
    "input name": (with_input(name="image", data=ZEROS), {}, 400, "unknown input"),
    "two inputs": (json.dumps({"inputs": [PIXELS, PIXELS]}).encode(), {}, 400, "one input"),
    "no inputs": (b'{"outputs": []}', {}, 400, "one input"),
    "datatype": (with_input(datatype="FP64", data=ZEROS), {}, 400, "FP32 or UINT8"),
    "datatype not a string": (with_input(datatype=["FP32"], data=ZEROS), {}, 400, "FP32 or UINT8"),
    "shape, no batch": (with_input(shape=[1, 28, 28], data=ZEROS), {}, 400, "shape"),
    "shape, 785": (with_input(shape=[1, 785], data=ZEROS + [0]), {}, 400, "shape"),
    "shape of strings": (with_input(shape=["1", 784], data=ZEROS), {}, 400, "shape"),
    "batch of 0": (with_input(shape=[0, 784], data=[]), {}, 400, "outside 1-1,024"),
    "batch over the limit": (with_input(shape=[1025, 784], data=ZEROS), {}, 400, "outside 1-1,024"),
    "count vs shape": (with_input(shape=[2, 784], data=ZEROS), {}, 400, "takes 1,568"),
    "ragged data": (with_input(data=[ZEROS[:400], ZEROS[:384], [0]]), {}, 400, "unevenly"),
    "strings": (with_input(data=["0"] * 784), {}, 400, "not a list of UINT8"),
    "floats as UINT8": (with_input(data=[0.5] * 784), {}, 400, "not a list of UINT8"),
    "no data": (with_input(), {}, 400, "not a list"),
    "UINT8 over 255": (with_input(data=[300] + ZEROS[1:]), {}, 400, "0-255"),
    "negative FP32": (request([-1.0] + ZEROS[1:], "FP32")[0], {}, 400, "0-255"),
    "normalised FP32": (*request([2.5, -0.4] * 392, "FP32", binary=True), 400, "0-255"),
    "NaN in JSON": (with_input(datatype="FP32", data=[float("nan")] + ZEROS[1:]), {}, 400, "NaN"),
    "infinity in binary": (*request([np.inf] + ZEROS[1:], "FP32", binary=True), 400, "NaN or infinite"),
    "binary one byte short": (GOOD[:-1], GOOD_HEADERS, 400, "binary data"),
    "binary one byte over": (GOOD + b"\0", GOOD_HEADERS, 400, "binary data"),
    "binary size vs shape": (*request(ZEROS[:783], binary=True), 400, "takes 784"),
    "binary and JSON data": (*BOTH, 400, "with no JSON data"),
    "binary without its header": (GOOD, {}, 400, "Inference-Header-Content-Length"),
    "header length over the body": (GOOD, {"Inference-Header-Content-Length": str(len(GOOD) + 1)}, 400, "not a length"),
    "header length not a number": (GOOD, {"Inference-Header-Content-Length": "1_0"}, 400, "not a length"),
    "bytes no input declares": (*with_bytes(PIXELS, bytes(8)), 400, "no input declares"),
    "malformed JSON": (b'{"inputs": [', {}, 400, "not valid JSON"),
    "JSON nested deep": (b"[" * 100_000, {}, 400, "not valid JSON"),
    "not UTF-8": (b'{"inputs": "\xff"}', {}, 400, "not valid JSON"),
    "a list, not an object": (b"[]", {}, 400, "JSON object"),
    "id not a string": (request(ZEROS, id=7)[0], {}, 400, '"id"'),
    "unknown output": (request(ZEROS, outputs=[{"name": "logit"}])[0], {}, 400, "unknown or asked twice"),
    "output asked twice": (request(ZEROS, outputs=[{"name": "digit"}] * 2)[0], {}, 400, "asked twice"),
    "output name not a string": (request(ZEROS, outputs=[{"name": ["digit"]}])[0], {}, 400, "unknown"),
    "classification": (request(ZEROS, outputs=CLASSIFY)[0], {}, 400, "binary_data is the only"),
    "shared memory": (with_input(parameters={"shared_memory_region": "r"}), {}, 400, "parameters are not understood"),
    "gzip that is not": (GOOD, {**GOOD_HEADERS, "Content-Encoding": "gzip"}, 400, "decompress"),
    "gzip cut short": (gzip.compress(with_input(data=ZEROS))[:-12], {"Content-Encoding": "gzip"}, 400, "cut short"),
    "gzip bomb": (gzip.compress(b" " * 10_000_001), {"Content-Encoding": "gzip"}, 413, "limit"),
    "unknown encoding": (GOOD, {**GOOD_HEADERS, "Content-Encoding": "br"}, 415, "gzip, deflate"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_each_bad_request_is_one_json_error_and_the_next_is_answered(server, case):
    body, headers, status, words = BAD[case]
    answer = server.request("POST", INFER, body, {**KEY, **headers})
    assert answer[0] == status and words in answer[1]["error"], answer
    assert server.request("POST", INFER, GOOD, {**KEY, **GOOD_HEADERS})[0] == 200


def test_unknown_models_and_versions_are_404(server):
    for path in ("/v2/models/cifar/infer", "/v2/models/mnist/versions/2/infer"):
        status, answer = server.request("POST", path, GOOD, {**KEY, **GOOD_HEADERS})
        assert status == 404 and ("unknown model" in answer["error"] or "no version" in answer["error"]), answer
    assert server.request("POST", "/v2/models/mnist/versions/1/infer", GOOD, {**KEY, **GOOD_HEADERS})[0] == 200


def test_a_json_answer_follows_the_protocol(server, test_set):
    images, logits, probabilities = test_set
    body = request(images[:2].reshape(2, 784).tolist(), shape=[2, 784], id="req-7")[0]
    connection = server.connect()
    connection.request("POST", INFER, zlib.compress(body), {**KEY, "Content-Encoding": "deflate"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Inference-Header-Content-Length") is None
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("mnist", "1", "req-7")
    assert [(o["name"], o["datatype"], o["shape"]) for o in answer["outputs"]] == [
        ("logits", "FP32", [2, 10]),
        ("probabilities", "FP32", [2, 10]),
        ("digit", "INT64", [2]),
    ]
    np.testing.assert_allclose(np.reshape(answer["outputs"][1]["data"], (2, 10)), probabilities[:2], atol=1e-6)
