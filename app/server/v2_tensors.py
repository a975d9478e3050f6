"""Tensors of the Open Inference Protocol V2 (KServe, Triton): JSON tensors and the binary tensor data
extension, both ways. Knows nothing of models: routes/inference_v2.py says which tensors a model takes.

A request body is a JSON header, then (binary extension) the raw little-endian bytes of every input that
declares `parameters.binary_data_size`, in input order; the header's length is the HTTP header
Inference-Header-Content-Length (absent: the whole body is JSON). Responses are built the same way for the
outputs asked for in binary (tritonclient asks for all of them in binary by default).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidRequest, loads

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}


@dataclass
class Tensor:
    name: str
    datatype: str
    array: np.ndarray  # of DATATYPES[datatype], in the declared shape


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None  # None: as the request's binary_data_output says


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None  # None: the model's default outputs
    binary_outputs: bool  # the request's binary_data_output: the default for outputs that do not say


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request body (and its Inference-Header-Content-Length, if any) -> its tensors, or
    InvalidRequest naming what is wrong: bad JSON, a datatype or shape that does not fit its data, binary
    data shorter or longer than the header says."""
    json_length = len(body) if header_length is None else parse_length(header_length, len(body))
    header = loads(
        body[:json_length],
        "the inference request header" + ("" if header_length is None else f" (its first {json_length} bytes)"),
    )
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise InvalidRequest('expected a JSON object with a non-empty "inputs" list of tensors')
    binary = memoryview(body)[json_length:]
    inputs: dict[str, Tensor] = {}
    offset = 0
    for position, spec in enumerate(header["inputs"]):
        tensor, used = parse_input(spec, position, binary[offset:])
        if tensor.name in inputs:
            raise InvalidRequest(f"input {tensor.name} is given twice")
        inputs[tensor.name] = tensor
        offset += used
    if offset != len(binary):
        raise InvalidRequest(
            f"{len(binary)} bytes of binary data follow the JSON header, but the inputs' binary_data_size add up "
            f"to {offset}"
        )
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters must be a JSON object")
    request_id = header.get("id")
    return InferRequest(
        id=None if request_id is None else str(request_id),
        inputs=inputs,
        outputs=parse_outputs(header.get("outputs")),
        binary_outputs=parameters.get("binary_data_output") is True,
    )


def parse_length(value: str, body_length: int) -> int:
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise InvalidRequest(f"{HEADER_LENGTH} must be a byte count, got {value[:40]!r}")
    length = int(digits)
    if length == 0:
        raise InvalidRequest(f"{HEADER_LENGTH} is 0: it must count the JSON header's bytes, at least 1")
    if length > body_length:
        raise InvalidRequest(
            f"{HEADER_LENGTH} is {length}, but the body has {body_length} bytes: the JSON header cannot be "
            "longer than the body (a truncated request?)"
        )
    return length


def parse_input(spec: Any, position: int, binary: memoryview) -> tuple[Tensor, int]:
    """One input tensor -> (the tensor, bytes of binary data it used)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest(f"inputs[{position}] must be an object with a name, datatype, shape and data")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if datatype not in DATATYPES:
        raise InvalidRequest(f"input {name}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"input {name}: shape must be a list of sizes >= 0, got {shape!r}")
    dtype, count = DATATYPES[datatype], math.prod(shape)
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if "data" in spec:
            raise InvalidRequest(f"input {name}: give data or parameters.binary_data_size, not both")
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise InvalidRequest(
                f"input {name}: binary_data_size is {size!r}, but {datatype} of shape {shape} is "
                f"{count * dtype.itemsize} bytes"
            )
        if size > len(binary):
            raise InvalidRequest(
                f"input {name}: binary_data_size is {size}, but only {len(binary)} bytes of binary data are left "
                "after the JSON header and the inputs before it (a truncated request?)"
            )
        array = np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
        return Tensor(name, datatype, array), size
    if "data" not in spec:
        raise InvalidRequest(f"input {name}: no data (give data, or binary data with parameters.binary_data_size)")
    return Tensor(name, datatype, json_array(name, spec["data"], datatype, shape)), 0


def json_array(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """JSON tensor data (row-major, flat or nested) -> an array of the datatype, checked value by value: a
    float is no integer, and an integer must fit the datatype."""
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidRequest(f"input {name}: data must be a list of numbers (flat, or nested evenly)") from None
    dtype = DATATYPES[datatype]
    allowed = {"b": "b", "u": "biu", "i": "biu", "f": "biuf"}[dtype.kind]
    if values.size and values.dtype.kind not in allowed:
        expected = {"b": "true/false", "u": "integers", "i": "integers", "f": "numbers"}[dtype.kind]
        raise InvalidRequest(f"input {name}: {datatype} data must be {expected}")
    if values.size != math.prod(shape):
        raise InvalidRequest(f"input {name}: shape {shape} has {math.prod(shape)} elements, data has {values.size}")
    if dtype.kind in "ui" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidRequest(f"input {name}: {datatype} values must be in {info.min}..{info.max}")
    return values.astype(dtype).reshape(shape)


def parse_outputs(outputs: Any) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidRequest('outputs must be a list of {"name": ..., "parameters"?: {"binary_data": bool}}')
    requested = []
    for output in outputs:
        parameters = output.get("parameters") or {}
        binary = parameters.get("binary_data") if isinstance(parameters, dict) else None
        requested.append(RequestedOutput(output["name"], binary if isinstance(binary, bool) else None))
    return requested


def encode_response(
    model_name: str, request: InferRequest, outputs: list[tuple[Tensor, bool]]
) -> tuple[bytes, int | None]:
    """(tensor, binary?) outputs -> (body, JSON header length or None when every output is JSON)."""
    entries, blobs = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        if binary:
            blob = np.ascontiguousarray(tensor.array, dtype=DATATYPES[tensor.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.array.reshape(-1).tolist()
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": entries}
    if request.id is not None:
        header["id"] = request.id
    text = json.dumps(header, separators=(",", ":")).encode()
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)
