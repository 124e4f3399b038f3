"""A tiny ONNX graph that picks rows of many tensors at once, written without the ``onnx`` package.

The device-resident decode path (``device_runner.py``) reorders beams and drops finished images
without copying the cache to the host: one run of this graph gathers the same rows (axis 0) of
every cache tensor where they live. The runtime may import only numpy, onnxruntime, pillow and
tokenizers, and ``onnx`` is not among them, so the graph's protobuf bytes are written here by
hand: a ModelProto with one Gather node per tensor is a few nested messages of strings and
integers. Building it in-process (rather than shipping a file with each export) keeps every
existing export, the embedded model included, usable on the device path without re-export.
Field numbers are those of onnx.proto; tests/test_device_runner.py checks the bytes with
``onnx.checker``.
"""

from __future__ import annotations

import numpy as np

# onnx.proto TensorProto.DataType codes for the element types a cache can have.
ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int64): 7, np.dtype(np.float16): 10}
ROWS = "rows"
IR_VERSION = 8  # read by every onnxruntime this package supports
OPSET = 13
_INT_ATTRIBUTE = 2  # AttributeProto.AttributeType.INT


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, element_type: int, dims: list[str]) -> bytes:
    """ValueInfoProto: name and tensor type, every dimension symbolic."""
    shape = b"".join(_bytes_field(1, _bytes_field(2, dim)) for dim in dims)
    tensor = _int_field(1, element_type) + _bytes_field(2, shape)
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor))


def _gather_node(index: int) -> bytes:
    axis = _bytes_field(1, "axis") + _int_field(3, 0) + _int_field(20, _INT_ATTRIBUTE)
    return (_bytes_field(1, f"x{index}") + _bytes_field(1, ROWS) + _bytes_field(2, f"y{index}")
            + _bytes_field(3, f"gather{index}") + _bytes_field(4, "Gather")
            + _bytes_field(5, axis))


def gather_rows_model(tensors: list[tuple[np.dtype, int]]) -> bytes:
    """A serialized ModelProto for tensors of the given (element type, rank): inputs ``rows``
    (int64 [n]) and ``x0..xk``; outputs ``y_i = Gather(x_i, rows, axis=0)``.

    Raises:
        ValueError: an element type the cache never has, or a scalar.
    """
    try:
        codes = [ELEMENT_TYPES[np.dtype(dtype)] for dtype, _ in tensors]
    except KeyError as exc:
        raise ValueError(f"no gather graph for element type {exc}") from None
    if any(rank < 1 for _, rank in tensors):
        raise ValueError("rows can only be gathered from tensors of rank one or more")
    graph = b"".join(_bytes_field(1, _gather_node(i)) for i in range(len(codes)))
    graph += _bytes_field(2, "gather_rows")
    graph += _bytes_field(11, _value_info(ROWS, ELEMENT_TYPES[np.dtype(np.int64)], ["n"]))
    for i, (code, (_, rank)) in enumerate(zip(codes, tensors)):
        rest = [f"d{i}_{axis}" for axis in range(1, rank)]  # the other axes pass through
        graph += _bytes_field(11, _value_info(f"x{i}", code, [f"r{i}", *rest]))
    for i, (code, (_, rank)) in enumerate(zip(codes, tensors)):
        rest = [f"d{i}_{axis}" for axis in range(1, rank)]
        graph += _bytes_field(12, _value_info(f"y{i}", code, ["n", *rest]))
    opset = _bytes_field(1, "") + _int_field(2, OPSET)
    return (_int_field(1, IR_VERSION) + _bytes_field(2, "edgecap") + _bytes_field(7, graph)
            + _bytes_field(8, opset))
