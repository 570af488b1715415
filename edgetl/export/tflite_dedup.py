"""Rewrite a ``.tflite`` flatbuffer compactly: every distinct vector stored once, buffers 16-byte aligned.

TFLite's converter gives every tensor its own quantisation vectors: float32 scales and int64 zero points,
one entry per output channel for per-channel weights and again for their int32 biases. In a per-channel
int8 MobileNetV2 the zero points (all 0: weights are symmetric) are a tenth of the file, written ~100
times over. A flatbuffer is a graph of offsets, so tables may point at one shared vector (what
FlatBuffers' own ``CreateSharedString`` does for strings); readers cannot tell the difference, and every
value the interpreter sees is unchanged. The same pass aligns each buffer's data to 16 bytes, as the
converter does and TFLite Micro expects (the Python writer, used after bias correction, aligns a byte
vector to 1 only).

Needs only ``flatbuffers`` and LiteRT's schema module, both on the device too.
"""

from __future__ import annotations

import numpy as np

BUFFER_ALIGNMENT = 16


def _builder_class():
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        """A builder that writes each distinct numeric vector once and aligns byte vectors to 16."""

        def __init__(self, initial_size: int):
            super().__init__(initial_size)
            self._written: dict[tuple[str, bytes], int] = {}

        def CreateNumpyVector(self, x):  # noqa: N802 (flatbuffers' name)
            key = (x.dtype.str, x.tobytes())
            offset = self._written.get(key)
            if offset is None:
                offset = self._create_aligned(x) if x.dtype == np.uint8 else super().CreateNumpyVector(x)
                self._written[key] = offset
            return offset

        def _create_aligned(self, x):
            # In the TFLite schema the only ubyte vectors are buffer data and custom options.
            payload = x.tobytes()
            self.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            self.head -= len(payload)
            self.Bytes[self.head : self.head + len(payload)] = payload
            return self.EndVector()

    return SharingBuilder


def compact(model: bytes) -> bytes:
    """The same model, its repeated vectors shared and its buffers aligned (see the module docstring).

    A model that keeps its buffers outside the flatbuffer (files over 2 GB) is returned unchanged.
    """
    tree = unpack(model)
    if any(buffer.offset > 1 for buffer in tree.buffers or []):
        return model
    return pack(tree, len(model))


def unpack(model: bytes):
    """The model's object tree (LiteRT's schema, ``ModelT``), to edit and :func:`pack` again."""
    from ai_edge_litert import schema_py_generated as schema

    return schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))


def pack(tree, size_hint: int = 1 << 20) -> bytes:
    """Serialise a ``ModelT`` compactly: shared vectors, 16-byte aligned buffers."""
    builder = _builder_class()(size_hint + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
