"""The Open Inference Protocol's tensors: the request's pixels read and checked, the answer's outputs encoded.

A tensor travels as JSON (``data``, row-major, flat or nested) or, with Triton's binary tensor data
extension, as raw little-endian bytes after the JSON object, whose length the Inference-Header-Content-Length
header gives; each binary tensor says how many bytes it takes in its ``binary_data_size`` parameter.
"""

import json

import numpy as np

from mnist_lightning.serve.app import BadRequest

INPUT = "pixels"
DATATYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}  # the binary extension's bytes are little-endian
IMAGE_SHAPES = ([1, 28, 28], [784])  # one image's shape, after the batch's N
PIXELS = 28 * 28
OUTPUTS = {"logits": "FP32", "probabilities": "FP32", "digit": "INT64"}
SHAPE_HELP = "send pixels of shape [N, 1, 28, 28] or [N, 784]"


def read_request(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON inference request and the binary tensor data after it."""
    size = len(body)
    if header_length is not None:
        size = int(header_length) if header_length.isascii() and header_length.strip().isdigit() else -1
        if not 0 <= size <= len(body):
            raise BadRequest(
                400,
                f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the body's "
                f"{len(body):,} bytes; give the length of the JSON object that starts the body",
            )
    try:
        request = json.loads(body[:size])
    except (ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        hint = "" if header_length else "; a body with binary tensors needs the Inference-Header-Content-Length header"
        raise BadRequest(400, f"the inference request is not valid JSON ({err}){hint}") from None
    if not isinstance(request, dict):
        raise BadRequest(400, 'the inference request must be a JSON object: {"inputs": [{"name": "pixels", ...}]}')
    if not isinstance(request.get("id", ""), str) or not isinstance(request.get("parameters", {}), dict):
        raise BadRequest(400, 'the request\'s "id" must be a string and its "parameters" an object')
    return request, memoryview(body)[size:]  # a view: a batch's binary tensor is not copied


def read_pixels(request: dict, binary: memoryview, max_batch: int) -> np.ndarray:
    """The request's images as an (N, 784) array of 0-255 pixels, uint8 or float32, checked whole."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else "no list of"
        raise BadRequest(400, f'the model takes one input, "pixels", and the request has {count} inputs')
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    parameters = tensor.get("parameters", {})
    if name != INPUT:
        raise BadRequest(400, f'unknown input {str(name)[:100]!r}: the model\'s one input is "pixels"')
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(400, f"input pixels has datatype {str(datatype)[:20]!r}; send FP32 or UINT8")
    if not (isinstance(shape, list) and shape and all(type(d) is int for d in shape) and shape[1:] in IMAGE_SHAPES):
        raise BadRequest(400, f"input pixels has shape {str(shape)[:100]}; {SHAPE_HELP}")
    if not 1 <= shape[0] <= max_batch:
        raise BadRequest(
            400, f"a batch of {shape[0]:,} images is outside 1-{max_batch:,}; send at most {max_batch:,} per request"
        )
    if not isinstance(parameters, dict) or any(key.startswith("shared_memory") for key in parameters):
        raise BadRequest(400, "input pixels' parameters are not understood; send its data in JSON or binary")
    dtype, count = DATATYPES[datatype], shape[0] * PIXELS
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in tensor or type(size) is not int or size != count * dtype.itemsize or size != len(binary):
            raise BadRequest(
                400,
                f"input pixels declares {str(size)[:20]} bytes of binary data and the body holds {len(binary):,} "
                f"after the JSON; {shape} in {datatype} takes {count * dtype.itemsize:,} bytes, with no JSON data",
            )
        values = np.frombuffer(binary, dtype)
    else:
        if binary:
            raise BadRequest(400, f"the body holds {len(binary):,} bytes after the JSON that no input declares")
        values = json_values(tensor.get("data"), datatype)
        if values.size != count:
            raise BadRequest(400, f"input pixels holds {values.size:,} values and its shape {shape} takes {count:,}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise BadRequest(400, "input pixels holds NaN or infinite values; send raw 0-255 pixels")
    if values.dtype != np.uint8 and (values.min() < 0 or values.max() > 255):
        raise BadRequest(
            400,
            f"input pixels holds values from {values.min()} to {values.max()}; send raw 0-255 pixels, not normalised",
        )
    return values.astype(np.uint8 if datatype == "UINT8" else np.float32).reshape(shape[0], PIXELS)


def json_values(data, datatype: str) -> np.ndarray:
    """A tensor's JSON data, flat or nested, as an array of numbers; integers only for UINT8."""
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise BadRequest(400, "input pixels' data is nested unevenly; send a flat list of N * 784 numbers") from None
    if values.dtype.kind not in ("iu" if datatype == "UINT8" else "iuf") or values.dtype == np.bool_:
        raise BadRequest(400, f"input pixels' data is not a list of {datatype} numbers; send N * 784 pixels")
    return values.ravel()


def requested_outputs(request: dict) -> list[tuple[str, bool]]:
    """The outputs to answer with, in order, and whether each goes as binary data."""
    binary = request.get("parameters", {}).get("binary_data_output", False)
    wanted = request.get("outputs")
    if wanted is None:
        return [(name, binary is True) for name in OUTPUTS]
    if not isinstance(wanted, list) or not all(isinstance(output, dict) for output in wanted):
        raise BadRequest(400, '"outputs" must be a list of objects: [{"name": "probabilities"}]')
    chosen = []
    for output in wanted:
        name, parameters = output.get("name"), output.get("parameters", {})
        if not isinstance(name, str) or name not in OUTPUTS or name in dict(chosen):
            raise BadRequest(
                400, f"output {str(name)[:100]!r} is unknown or asked twice; ask once for any of {list(OUTPUTS)}"
            )
        if not isinstance(parameters, dict) or set(parameters) - {"binary_data"}:
            raise BadRequest(400, f"output {name}'s parameters are not understood; binary_data is the only one")
        chosen.append((name, parameters.get("binary_data", binary) is True))
    return chosen


def encode(request: dict, answer: dict, tensors: dict[str, np.ndarray], wanted) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: ``answer`` with the outputs wanted, binary ones after the JSON."""
    outputs, chunks = [], []
    for name, binary in wanted:
        array = tensors[name]
        output = {"name": name, "datatype": OUTPUTS[name], "shape": list(array.shape)}
        if binary:
            chunks.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
            output["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    header = json.dumps({**answer, **({"id": request["id"]} if "id" in request else {}), "outputs": outputs}).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
