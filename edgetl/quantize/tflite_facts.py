"""Structural facts about a ``.tflite`` model: I/O, op types, tensor dtypes, weight quantisation.

Used to prove that an "int8" model really is full-integer before anything ships it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetl.runtime.model import TensorSpec

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def op_names() -> dict[int, str]:
    """TFLite's builtin operator codes -> names (``CONV_2D``), from LiteRT's schema module."""
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


@dataclass
class TFLiteFacts:
    input: TensorSpec
    output: TensorSpec
    ops: dict[str, int]  # op type -> count
    tensor_dtypes: dict[str, int]  # dtype -> count of tensors
    float_tensors: list[str]  # names of float tensors (a full-integer model has none)
    per_tensor_conv_weights: list[str]  # conv weights quantised per-tensor (want per-channel)
    conv_weights: int = 0
    notes: list[str] = field(default_factory=list)

    def full_integer_problems(self) -> list[str]:
        """Why this model is not a full-integer int8 model with uint8 raw-pixel input (empty: it is)."""
        problems = []
        if self.input.dtype != "uint8":
            problems.append(f"input is {self.input.dtype}, not uint8")
        elif (self.input.scale, self.input.zero_point) != (1.0, 0):
            problems.append(
                f"uint8 input is quantised with scale {self.input.scale} and zero point "
                f"{self.input.zero_point}, so it does not take raw pixels"
            )
        if len(self.input.shape) != 4 or self.input.shape[0] != 1 or self.input.shape[3] != 3:
            problems.append(f"input shape {list(self.input.shape)} is not [1, H, W, 3]")
        if self.float_tensors:
            problems.append(f"{len(self.float_tensors)} float tensors, e.g. {self.float_tensors[0]}")
        if self.per_tensor_conv_weights:
            problems.append(
                f"{len(self.per_tensor_conv_weights)} conv weights are per-tensor, not per-channel"
            )
        if self.output.dtype not in ("int8", "uint8"):
            problems.append(f"output is {self.output.dtype}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "ops": dict(sorted(self.ops.items())),
            "tensor_dtypes": dict(sorted(self.tensor_dtypes.items())),
            "float_tensors": len(self.float_tensors),
            "conv_weights": self.conv_weights,
            "per_channel_conv_weights": self.conv_weights - len(self.per_tensor_conv_weights),
        }


def inspect_tflite(path: str) -> TFLiteFacts:
    """Read a model's structure with the LiteRT interpreter (no delegates applied)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgetl.runtime.model import native_stderr_captured

    with native_stderr_captured():
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # public API has no op listing; this is LiteRT's own helper
    used = {i for op in ops for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0}
    float_tensors, per_tensor, conv_weights = [], [], 0
    dtypes: Counter[str] = Counter()
    for index in sorted(used):
        tensor = tensors[index]
        dtype = np.dtype(tensor["dtype"]).name
        dtypes[dtype] += 1
        if dtype.startswith("float"):
            float_tensors.append(tensor["name"])
    for op in ops:
        if op["op_name"] in WEIGHTED_OPS and len(op["inputs"]) > 1:
            weight = tensors[op["inputs"][1]]
            conv_weights += 1
            scales = weight["quantization_parameters"]["scales"]
            if len(scales) <= 1 and np.dtype(weight["dtype"]).name == "int8":
                per_tensor.append(weight["name"])
    return TFLiteFacts(
        input=TensorSpec.from_details(interpreter.get_input_details()[0]),
        output=TensorSpec.from_details(interpreter.get_output_details()[0]),
        ops=dict(Counter(op["op_name"] for op in ops)),
        tensor_dtypes=dict(dtypes),
        float_tensors=float_tensors,
        per_tensor_conv_weights=per_tensor,
        conv_weights=conv_weights,
    )


def size_breakdown(path: str) -> dict[str, int]:
    """Where a ``.tflite`` file's bytes go: weights, biases, quantisation parameters, names, the rest.

    Read from the flatbuffer itself, each stored vector counted once (:mod:`edgetl.export.tflite_dedup`
    shares identical vectors between tensors). Weights and biases are the weighted ops' inputs 1 and 2.
    TFLite stores quantisation scales as float32 and zero points as int64: as the converter writes them,
    12 bytes per entry, so a per-channel int8 convolution pays 24 bytes per output channel (its weights'
    and its int32 bias's parameters) on top of the weights themselves.
    """
    import os

    from ai_edge_litert import schema_py_generated as schema

    data = open(path, "rb").read()
    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    codes = op_names()
    weighted = set(WEIGHTED_OPS) | {"FULLY_CONNECTED"}
    slots: dict[int, set[int]] = {1: set(), 2: set()}  # input slot -> buffer indices
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        if codes.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode())) in weighted:
            for slot in (1, 2):
                if slot < op.InputsLength() and op.Inputs(slot) >= 0:
                    slots[slot].add(graph.Tensors(op.Inputs(slot)).Buffer())
    weights, biases = (sum(model.Buffers(b).DataLength() for b in slots[s]) for s in (1, 2))
    stored: dict[int, int] = {}  # vector position -> payload bytes
    names = 0
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        names += len(tensor.Name() or b"")
        quantization = tensor.Quantization()
        if quantization is None:
            continue
        table = quantization._tab  # the generated API reads vectors but does not say where they are
        for slot, itemsize in ((4, 4), (6, 4), (8, 4), (10, 8)):  # min, max, scale, zero_point
            offset = table.Offset(slot)
            if offset:
                stored[table.Vector(offset)] = itemsize * table.VectorLen(offset)
    quant = sum(stored.values())
    total = os.path.getsize(path)
    return {"file": total, "weights": weights, "biases": biases, "quantization_parameters": quant,
            "tensor_names": names, "other": total - weights - biases - quant - names}  # fmt: skip
