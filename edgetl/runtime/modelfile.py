"""Check that a ``.tflite`` file is a whole, well-formed TFLite flatbuffer before an interpreter maps it.

LiteRT's Python interpreter trusts the file it is given: a truncated model (an interrupted copy to an
SD card, a partial download) makes it read past the end of its memory map and the process dies with
SIGSEGV, no message, no exit code a script can read. This module walks the parts of the flatbuffer
the interpreter follows — the root table, every vtable, the operator codes, subgraphs, tensors,
operators and buffers, every vector's extent and every index between them — with the standard library
alone, and raises :class:`ModelFileError` with one line instead. (Pure Python; a MobileNetV2 takes a
few milliseconds.)

The layout is TFLite's schema (``tensorflow/compiler/mlir/lite/schema/schema.fbs``): field numbers
below are the schema's field order.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3

# Field numbers in the schema's tables.
MODEL_OPERATOR_CODES, MODEL_SUBGRAPHS, MODEL_DESCRIPTION, MODEL_BUFFERS = 1, 2, 3, 4
MODEL_METADATA_BUFFER, MODEL_METADATA, MODEL_SIGNATURE_DEFS = 5, 6, 7
METADATA_NAME, METADATA_BUFFER = 0, 1
OPCODE_CUSTOM_CODE = 1
SUBGRAPH_NAME = 4
TENSOR_NAME = 3
SUBGRAPH_TENSORS, SUBGRAPH_INPUTS, SUBGRAPH_OUTPUTS, SUBGRAPH_OPERATORS = 0, 1, 2, 3
TENSOR_SHAPE, TENSOR_BUFFER, TENSOR_QUANTIZATION = 0, 2, 4
QUANT_MIN, QUANT_MAX, QUANT_SCALE, QUANT_ZERO_POINT = 0, 1, 2, 3
OPERATOR_OPCODE, OPERATOR_INPUTS, OPERATOR_OUTPUTS, OPERATOR_OPTIONS, OPERATOR_CUSTOM = 0, 1, 2, 4, 5
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2


class ModelFileError(ValueError):
    """The file is not a complete, well-formed model."""


@dataclass(frozen=True)
class ModelShapes:
    """What the file says about its first subgraph's inputs and outputs (shapes as stored)."""

    inputs: list[tuple[int, ...]]
    outputs: list[tuple[int, ...]]


class _Reader:
    """Bounds-checked reads of flatbuffer primitives from ``data``."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.name} is truncated or corrupt ({what}); copy the model again")

    def read(self, fmt: str, pos: int, what: str) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise self.fail(f"{what} at byte {pos} lies past the end of the {len(self.data)}-byte file")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def table(self, pos: int, what: str) -> _Table:
        vtable = pos - self.read("<i", pos, what)
        vtable_size = self.read("<H", vtable, f"{what} vtable")
        table_size = self.read("<H", vtable + 2, f"{what} vtable")
        if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > len(self.data):
            raise self.fail(f"{what} has a broken vtable")
        if pos + table_size > len(self.data):
            raise self.fail(f"{what} lies past the end of the file")
        return _Table(self, pos, vtable, vtable_size, what)

    def target(self, pos: int, what: str) -> int:
        """Follow the uoffset stored at ``pos``."""
        return pos + self.read("<I", pos, what)

    def vector(self, pos: int, element_size: int, what: str) -> tuple[int, int]:
        """(first element position, length) of the vector at ``pos``, checked to fit in the file."""
        length = self.read("<I", pos, f"{what} length")
        if pos + 4 + length * element_size > len(self.data):
            raise self.fail(f"{what} ({length} elements) runs past the end of the file")
        return pos + 4, length


class _Table:
    def __init__(self, reader: _Reader, pos: int, vtable: int, vtable_size: int, what: str):
        self.reader, self.pos, self.vtable, self.vtable_size, self.what = reader, pos, vtable, vtable_size, what

    def field(self, index: int) -> int | None:
        entry = 4 + 2 * index
        if entry >= self.vtable_size:
            return None
        offset = self.reader.read("<H", self.vtable + entry, self.what)
        return self.pos + offset if offset else None

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        pos = self.field(index)
        return default if pos is None else self.reader.read(fmt, pos, f"{self.what} field {index}")

    def vector(self, index: int, element_size: int, name: str) -> tuple[int, int]:
        pos = self.field(index)
        if pos is None:
            return 0, 0
        what = f"{self.what}.{name}"
        return self.reader.vector(self.reader.target(pos, what), element_size, what)

    def string(self, index: int, name: str) -> None:
        start, length = self.vector(index, 1, name)
        if start and self.reader.read("<B", start + length, f"{self.what}.{name} terminator") != 0:
            raise self.reader.fail(f"{self.what}.{name} is not a terminated string")

    def ints(self, index: int, name: str) -> list[int]:
        start, length = self.vector(index, 4, name)
        return [self.reader.read("<i", start + 4 * i, name) for i in range(length)]

    def tables(self, index: int, name: str) -> list[_Table]:
        start, length = self.vector(index, 4, name)
        what = f"{self.what}.{name}"
        return [self.reader.table(self.reader.target(start + 4 * i, what), f"{what}[{i}]") for i in range(length)]

    def child(self, index: int, name: str) -> _Table | None:
        pos = self.field(index)
        if pos is None:
            return None
        what = f"{self.what}.{name}"
        return self.reader.table(self.reader.target(pos, what), what)


def check_tflite_bytes(data: bytes, name: str = "model") -> ModelShapes:
    """Walk a TFLite flatbuffer in memory; see :func:`check_tflite`."""
    reader = _Reader(data, name)
    if len(data) < 8:
        raise ModelFileError(f"{name} is {len(data)} bytes: not a TFLite model" if data else f"{name} is empty")
    if data[4:8] != IDENTIFIER:
        raise ModelFileError(f"{name} is not a TFLite model (no {IDENTIFIER.decode()} identifier)")
    model = reader.table(reader.target(0, "root offset"), "model")
    version = model.scalar(0, "<I")
    if version != SCHEMA_VERSION:
        raise ModelFileError(f"{name} has TFLite schema version {version}; this runtime reads {SCHEMA_VERSION}")
    opcodes = model.tables(MODEL_OPERATOR_CODES, "operator_codes")
    for opcode in opcodes:
        opcode.string(OPCODE_CUSTOM_CODE, "custom_code")
    buffers = model.tables(MODEL_BUFFERS, "buffers")
    model.string(MODEL_DESCRIPTION, "description")
    if any(not 0 <= i < len(buffers) for i in model.ints(MODEL_METADATA_BUFFER, "metadata_buffer")):
        raise reader.fail("model.metadata_buffer names a buffer that does not exist")
    for metadata in model.tables(MODEL_METADATA, "metadata"):
        metadata.string(METADATA_NAME, "name")
        if metadata.scalar(METADATA_BUFFER, "<I") >= len(buffers):
            raise reader.fail(f"{metadata.what} names a buffer that does not exist")
    model.tables(MODEL_SIGNATURE_DEFS, "signature_defs")
    for buffer in buffers:
        buffer.vector(BUFFER_DATA, 1, "data")
        offset, size = buffer.scalar(BUFFER_OFFSET, "<Q"), buffer.scalar(BUFFER_SIZE, "<Q")
        if offset > 1 and offset + size > len(data):
            raise reader.fail(f"{buffer.what} points past the end of the file")
    subgraphs = model.tables(MODEL_SUBGRAPHS, "subgraphs")
    if not subgraphs:
        raise ModelFileError(f"{name} has no subgraph")
    shapes = None
    for subgraph in subgraphs:
        subgraph.string(SUBGRAPH_NAME, "name")
        tensors = subgraph.tables(SUBGRAPH_TENSORS, "tensors")
        tensor_shapes = [_check_tensor(tensor, len(buffers), reader) for tensor in tensors]
        ends = {"inputs": subgraph.ints(SUBGRAPH_INPUTS, "inputs"),
                "outputs": subgraph.ints(SUBGRAPH_OUTPUTS, "outputs")}  # fmt: skip
        for operator in subgraph.tables(SUBGRAPH_OPERATORS, "operators"):
            if operator.scalar(OPERATOR_OPCODE, "<I") >= len(opcodes):
                raise reader.fail(f"{operator.what} names an operator code that does not exist")
            operator.child(OPERATOR_OPTIONS, "builtin_options")  # its table header must be in the file
            operator.vector(OPERATOR_CUSTOM, 1, "custom_options")
            ends[operator.what] = [*operator.ints(OPERATOR_INPUTS, "inputs"),
                                   *operator.ints(OPERATOR_OUTPUTS, "outputs")]  # fmt: skip
        for where, indices in ends.items():
            if any(not -1 <= i < len(tensors) for i in indices):
                raise reader.fail(f"{subgraph.what} {where} name a tensor that does not exist")
        if shapes is None:
            shapes = ModelShapes(inputs=[tensor_shapes[i] for i in ends["inputs"]],
                                 outputs=[tensor_shapes[i] for i in ends["outputs"]])  # fmt: skip
    return shapes


def _check_tensor(tensor: _Table, buffer_count: int, reader: _Reader) -> tuple[int, ...]:
    shape = tuple(tensor.ints(TENSOR_SHAPE, "shape"))
    tensor.string(TENSOR_NAME, "name")
    if tensor.scalar(TENSOR_BUFFER, "<I") >= max(buffer_count, 1):
        raise reader.fail(f"{tensor.what} names a buffer that does not exist")
    quantization = tensor.child(TENSOR_QUANTIZATION, "quantization")
    if quantization is not None:
        for index, (name, size) in enumerate((("min", 4), ("max", 4), ("scale", 4), ("zero_point", 8))):
            quantization.vector(index, size, name)
    return shape


def check_tflite(path: str | os.PathLike) -> ModelShapes:
    """Refuse a file that is not a complete TFLite model; return its input and output shapes.

    Raises:
        ModelFileError: missing, empty, not a TFLite flatbuffer, truncated or internally inconsistent.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ModelFileError(f"cannot read {name}: {exc.strerror or exc}") from None
    return check_tflite_bytes(data, name)
