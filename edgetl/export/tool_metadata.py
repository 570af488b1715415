"""Models that other tools load as they are: TFLite model metadata and a uint8 output.

MediaPipe Tasks' ``ImageClassifier``, Android Studio's ML binding and the TFLite Support library read a
model's *metadata*: a ``ModelMetadata`` flatbuffer (schema ``metadata_schema.fbs``, identifier "M001")
in a model buffer named ``TFLITE_METADATA``, with its associated files (the labels) in a zip archive
appended to the ``.tflite`` file. :func:`with_metadata` writes that with the ``flatbuffers`` package and
the standard library alone (no tflite-support, whose pins clash with TensorFlow's): the name and
description, the input as an RGB image of the model's size with its normalisation (raw 0..255 pixels:
mean 0, std 1; the model normalises inside) and value range, and the output as class scores with
``labels.txt`` as its axis labels.

MediaPipe also refuses an int8 output tensor (it takes uint8 or float32). :func:`uint8_output` appends
one QUANTIZE op (int8 -> uint8: the same scale, the zero point + 128), the op the model already starts
with for its uint8 input, so every value keeps its meaning and top-1 cannot change. The Edge TPU
compiler, Vela and TFLite Micro all run QUANTIZE; a target that wants the raw int8 output sets
``output_type = "int8"`` under ``[quantization]``.

Interpreters ignore metadata buffers and trailing bytes, so neither changes what a model computes.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.export.tflite_dedup import pack, unpack

METADATA_NAME = b"TFLITE_METADATA"
LABELS_FILE = "labels.txt"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed time: the same inputs give the same bytes

# metadata_schema.fbs enums
_IMAGE_PROPERTIES, _FEATURE_PROPERTIES = 2, 1  # ContentProperties
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions
_RGB = 1  # ColorSpaceType
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType


@dataclass(frozen=True)
class ModelDescription:
    name: str
    description: str
    version: str
    labels: list[str]
    image_size: int


def uint8_output(model: bytes) -> bytes:
    """``model`` with its int8 output requantised to uint8 by a final QUANTIZE op (unchanged otherwise).

    The new output tensor takes the old one's name; the int8 tensor becomes ``NAME/int8``.
    """
    from ai_edge_litert import schema_py_generated as schema

    tree = unpack(model)
    graph = tree.subgraphs[0]
    old = graph.tensors[graph.outputs[0]]
    if old.type != schema.TensorType.INT8:
        return model
    new = schema.TensorT()
    new.shape, new.type, new.name = list(old.shape), schema.TensorType.UINT8, old.name
    new.quantization = schema.QuantizationParametersT()
    new.quantization.scale = list(old.quantization.scale)
    new.quantization.zeroPoint = [int(z) + 128 for z in old.quantization.zeroPoint]
    old.name = (old.name or b"output") + b"/int8"
    graph.tensors.append(new)
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(tree, schema.BuiltinOperator.QUANTIZE)
    op.inputs, op.outputs = [graph.outputs[0]], [len(graph.tensors) - 1]
    graph.operators.append(op)
    for signature in tree.signatureDefs or []:
        for output in signature.outputs or []:
            if output.tensorIndex == graph.outputs[0]:
                output.tensorIndex = len(graph.tensors) - 1
    graph.outputs = [len(graph.tensors) - 1]
    return pack(tree, len(model))


def _opcode(tree, builtin: int) -> int:
    from ai_edge_litert import schema_py_generated as schema

    for index, code in enumerate(tree.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    tree.operatorCodes.append(code)
    return len(tree.operatorCodes) - 1


def with_metadata(model: bytes, about: ModelDescription) -> bytes:
    """``model`` with TFLite model metadata and ``labels.txt`` packed in (any earlier metadata replaced)."""
    from ai_edge_litert import schema_py_generated as schema

    tree = unpack(model)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata_flatbuffer(about), np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tree.buffers) - 1
    tree.metadata = [m for m in (tree.metadata or []) if m.name != METADATA_NAME] + [entry]
    out = io.BytesIO()
    out.write(pack(tree, len(model)))
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo(LABELS_FILE, ZIP_DATE)
        archive.writestr(info, "".join(f"{label}\n" for label in about.labels))
    return out.getvalue()


def packed_files(model: bytes) -> dict[str, bytes]:
    """The associated files packed into a model (empty when there are none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}


def metadata_flatbuffer(about: ModelDescription) -> bytes:
    """The ``ModelMetadata`` flatbuffer (metadata_schema.fbs, file identifier "M001")."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    inputs = _input_metadata(b, about.image_size)
    outputs = _output_metadata(b, len(about.labels))
    subgraph_name = b.CreateString("image_classifier")
    input_vector, output_vector = _offsets(b, [inputs]), _offsets(b, [outputs])
    b.StartObject(5)  # SubGraphMetadata
    b.PrependUOffsetTRelativeSlot(0, subgraph_name, 0)
    b.PrependUOffsetTRelativeSlot(2, input_vector, 0)
    b.PrependUOffsetTRelativeSlot(3, output_vector, 0)
    subgraph = b.EndObject()
    strings = [b.CreateString(text) for text in (about.name, about.description, about.version, "edgetl", "1.0.0")]
    subgraphs = _offsets(b, [subgraph])
    b.StartObject(8)  # ModelMetadata
    for slot, offset in zip((0, 1, 2, 4, 7), strings, strict=True):  # name, description, version, author, parser
        b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    b.PrependUOffsetTRelativeSlot(3, subgraphs, 0)
    b.Finish(b.EndObject(), file_identifier=b"M001")
    return bytes(b.Output())


def _offsets(b, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _floats(b, values: list[float]) -> int:
    b.StartVector(4, len(values), 4)
    for value in reversed(values):
        b.PrependFloat32(value)
    return b.EndVector()


def _two_float_vectors(b, first: list[float], second: list[float]) -> int:
    """A table of two float vectors: Stats (max, min) and NormalizationOptions (mean, std) alike."""
    firsts, seconds = _floats(b, first), _floats(b, second)
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(0, firsts, 0)
    b.PrependUOffsetTRelativeSlot(1, seconds, 0)
    return b.EndObject()


def _input_metadata(b, size: int) -> int:
    """An RGB image of ``size`` x ``size``, raw 0..255 pixels (mean 0, std 1: normalised in the model)."""
    b.StartObject(2)  # ImageSize
    b.PrependUint32Slot(0, size, 0)
    b.PrependUint32Slot(1, size, 0)
    image_size = b.EndObject()
    b.StartObject(2)  # ImageProperties
    b.PrependInt8Slot(0, _RGB, 0)
    b.PrependUOffsetTRelativeSlot(1, image_size, 0)
    properties = b.EndObject()
    content = _content(b, _IMAGE_PROPERTIES, properties)
    normalization = _two_float_vectors(b, [0.0], [1.0])  # NormalizationOptions: mean, std
    b.StartObject(2)  # ProcessUnit
    b.PrependUint8Slot(0, _NORMALIZATION_OPTIONS, 0)
    b.PrependUOffsetTRelativeSlot(1, normalization, 0)
    units = _offsets(b, [b.EndObject()])
    stats = _two_float_vectors(b, [255.0], [0.0])  # Stats: max, min
    return _tensor(b, "image", "RGB pixels 0..255, resized and centre-cropped as the bundle's manifest.json says",
                   content, stats, units=units)  # fmt: skip


def _output_metadata(b, classes: int) -> int:
    b.StartObject(0)  # FeatureProperties
    content = _content(b, _FEATURE_PROPERTIES, b.EndObject())
    name, description = b.CreateString(LABELS_FILE), b.CreateString("class names, one per output")
    b.StartObject(4)  # AssociatedFile
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependUOffsetTRelativeSlot(1, description, 0)
    b.PrependInt8Slot(2, _TENSOR_AXIS_LABELS, 0)
    files = _offsets(b, [b.EndObject()])
    return _tensor(b, "logits", f"one score per class ({classes}); the highest is the prediction", content,
                   None, files=files)  # fmt: skip


def _content(b, kind: int, properties: int) -> int:
    b.StartObject(3)  # Content: content_properties (type, value), range
    b.PrependUint8Slot(0, kind, 0)
    b.PrependUOffsetTRelativeSlot(1, properties, 0)
    return b.EndObject()


def _tensor(b, name: str, description: str, content: int, stats: int | None, units: int | None = None,
            files: int | None = None) -> int:  # fmt: skip
    name_offset, description_offset = b.CreateString(name), b.CreateString(description)
    b.StartObject(7)  # TensorMetadata
    b.PrependUOffsetTRelativeSlot(0, name_offset, 0)
    b.PrependUOffsetTRelativeSlot(1, description_offset, 0)
    b.PrependUOffsetTRelativeSlot(3, content, 0)
    for slot, offset in ((4, units), (5, stats), (6, files)):
        if offset is not None:
            b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    return b.EndObject()


def describe_run(run_dir: Path) -> ModelDescription:
    """What the metadata says about a fine-tuned run's model: its name, classes and input size."""
    from edgetl import __version__
    from edgetl.rundir import read_manifest

    stage = read_manifest(Path(run_dir))["stages"]["finetune"]
    labels = list(stage["labels"])
    return ModelDescription(
        name=Path(run_dir).resolve().name, version=f"edgetl {__version__}", labels=labels,
        image_size=int(stage["preprocess"]["image_size"]),
        description=f"MobileNetV2 image classifier fine-tuned with edgetl: {len(labels)} classes",
    )  # fmt: skip


def finish_for_tools(path: Path, about: ModelDescription, int8_output: str = "uint8") -> None:
    """Rewrite a converted ``.tflite`` in place for other tools: metadata with the labels, and an int8
    output requantised to uint8 unless ``int8_output`` is "int8" (float and int16 outputs stay)."""
    model = path.read_bytes()
    if int8_output == "uint8":
        model = uint8_output(model)
    path.write_bytes(with_metadata(model, about))
