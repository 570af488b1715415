"""Where int8 saves time on this host: LiteRT latency of each MobileNetV2 layer alone, float32 vs int8.

Builds every layer of MobileNetV2 (width 1.0, 224x224: the stem, each block's expansion, depthwise and
projection convolutions, the residual additions, the last 1x1 convolution) as its own one-op TFLite
model, float32 and full-integer int8 (TFLiteConverter, per-channel weights, random calibration data:
the speed of XNNPACK's kernels does not depend on the values), times each alone (LiteRT with
XNNPACK, one thread, median of ``--runs`` invokes after warm-up) and sums them per op type. The sum of
the parts is not the whole model's latency (no cache reuse between ops, per-invoke overhead), but the
ratio per op type shows which layers int8 speeds up on this CPU and which it does not. Writes
``results/op_latency_<tag>.{json,md}``.

``--cut MODEL.tflite [MODEL.tflite ...]`` instead times whole exported models with their first 0..4
operators removed (the subgraph input moved to the first remaining operator's input), which shows
what the ops at the front of a model cost in place; writes ``results/op_latency_cut_<tag>.{json,md}``.

    python benchmarks/op_latency.py [--runs 100] [--threads 1]
    python benchmarks/op_latency.py --cut run/model_float32.tflite run/model_int8.tflite --tag NAME
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

# torchvision's MobileNetV2: expansion t, output channels c, repeats n, first stride s
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def layers() -> list[dict]:
    """Every op of MobileNetV2 1.0 at 224 with its input size: kind, side, in/out channels, stride."""
    out = [{"kind": "stem conv 3x3", "side": 224, "cin": 3, "cout": 32, "stride": 2}]
    side, channels = 112, 32
    for t, c, n, s in SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = channels * t
            if t != 1:
                out.append({"kind": "expansion 1x1", "side": side, "cin": channels, "cout": hidden, "stride": 1})
            out.append({"kind": "depthwise 3x3", "side": side, "cin": hidden, "cout": hidden, "stride": stride})
            side //= stride
            out.append({"kind": "projection 1x1", "side": side, "cin": hidden, "cout": c, "stride": 1})
            if stride == 1 and channels == c:
                out.append({"kind": "residual add", "side": side, "cin": c, "cout": c, "stride": 1})
            channels = c
    out.append({"kind": "last conv 1x1", "side": side, "cin": channels, "cout": 1280, "stride": 1})
    return out


def one_op(layer: dict):
    import tensorflow as tf

    x = tf.keras.Input((layer["side"], layer["side"], layer["cin"]), batch_size=1)
    kind = layer["kind"]
    if kind == "residual add":  # the block's input stream plus its projection's output: two int8 scales
        other = tf.keras.Input((layer["side"], layer["side"], layer["cin"]), batch_size=1)
        return tf.keras.Model([x, other], tf.keras.layers.Add()([x, other]))
    if kind.startswith("depthwise"):
        y = tf.keras.layers.DepthwiseConv2D(3, strides=layer["stride"], padding="same")(x)
    else:
        size = 3 if kind.startswith("stem") else 1
        y = tf.keras.layers.Conv2D(layer["cout"], size, strides=layer["stride"], padding="same")(x)
    if not kind.startswith("projection"):  # projections are linear; everything else ends in ReLU6
        y = tf.keras.layers.ReLU(6.0)(y)
    return tf.keras.Model(x, y)


def convert(model, int8: bool) -> bytes:
    import numpy as np
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        shapes = [(1, *shape[1:]) for shape in (model.input_shape if isinstance(model.input_shape, list)
                                                else [model.input_shape])]  # fmt: skip
        rng = np.random.default_rng(0)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [rng.uniform(-2 * i, 6, shape).astype(np.float32) for i, shape in enumerate(shapes)] for _ in range(4)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def latency_ms(model: bytes, runs: int, threads: int) -> float:
    """Median invoke time in ms (:func:`edgetl.runtime.bench.invoke_latency`, 10 warm-ups), every
    input zero-filled once beforehand: one-op models may have two inputs."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from edgetl.runtime.bench import invoke_latency

    interpreter = Interpreter(model_content=model, num_threads=threads)
    interpreter.allocate_tensors()
    for inp in interpreter.get_input_details():
        interpreter.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))

    class Preset:  # invoke_latency's model: inputs already set, so invoke(tensor) is invoke() alone
        @staticmethod
        def invoke(_tensor: object) -> None:
            interpreter.invoke()

    return invoke_latency(Preset, None, runs=runs, warmup=10)["median_ms"]


def without_front(model: bytes, count: int) -> bytes:
    """``model`` with its first ``count`` operators removed; its input becomes the next operator's input."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    graph = tree.subgraphs[0]
    graph.inputs = np.array([graph.operators[count].inputs[0]], np.int32)
    graph.operators = graph.operators[count:]
    builder = flatbuffers.Builder(len(model) + 4096)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def cut_report(args: argparse.Namespace) -> int:
    from ai_edge_litert.interpreter import Interpreter

    info = machine()
    rows = []
    lines = [f"# Latency of exported models with their first operators removed ({args.tag})", "",
             f"Machine: {info['cpu']}, {info['cpus']} CPUs. LiteRT (ai-edge-litert) with XNNPACK, median of "
             f"{args.runs} invokes after 10 warm-ups, one process; threads: {', '.join(map(str, args.threads_list))}.",
             "", "| model | removed from the front | " + " | ".join(f"ms @{t}" for t in args.threads_list) + " |",
             "|---|---|" + "---|" * len(args.threads_list)]  # fmt: skip
    for path in args.cut:
        model = Path(path).read_bytes()
        ops = [op["op_name"] for op in Interpreter(model_content=model)._get_ops_details()]
        for count in range(5):
            variant = without_front(model, count) if count else model
            times = {t: latency_ms(variant, args.runs, t) for t in args.threads_list}
            rows.append({"model": path, "removed": ops[:count], "ms": times})
            lines.append(f"| `{path}` | {', '.join(ops[:count]) or '-'} | "
                         + " | ".join(f"{times[t]:.3f}" for t in args.threads_list) + " |")  # fmt: skip
    write_result(f"op_latency_cut_{args.tag}", {"machine": info, "rows": rows}, "\n".join(lines) + "\n")
    return 0


def thread_counts(text: str) -> list[int]:
    """``"1,2"`` -> [1, 2]; argparse turns the ValueError of anything else into a usage error."""
    counts = [int(t) for t in text.split(",")]
    if not counts or min(counts) < 1:
        raise ValueError(text)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--cut", nargs="+", default=None, help="exported .tflite models to time front-cut")
    parser.add_argument("--cut-threads", type=thread_counts, default=[1, 2], help="thread counts for --cut [1,2]")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.cut:
        missing = [path for path in args.cut if not Path(path).is_file()]
        if missing:
            print(f"op_latency: error: no model at {', '.join(missing)}", file=sys.stderr)
            return 2
        args.threads_list = args.cut_threads
        return cut_report(args)

    rows = []
    for layer in layers():
        model = one_op(layer)
        row = {**layer, "float_ms": latency_ms(convert(model, False), args.runs, args.threads),
               "int8_ms": latency_ms(convert(model, True), args.runs, args.threads)}  # fmt: skip
        rows.append(row)
        print(f"{layer['kind']:<15} {layer['side']:>3} {layer['cin']:>4}->{layer['cout']:<4} s{layer['stride']}: "
              f"float {row['float_ms']:.3f} ms, int8 {row['int8_ms']:.3f} ms", flush=True)  # fmt: skip

    kinds: dict[str, dict] = {}
    for row in rows:
        k = kinds.setdefault(row["kind"], {"layers": 0, "float_ms": 0.0, "int8_ms": 0.0})
        k["layers"] += 1
        k["float_ms"] += row["float_ms"]
        k["int8_ms"] += row["int8_ms"]
    total_float = sum(k["float_ms"] for k in kinds.values())
    total_int8 = sum(k["int8_ms"] for k in kinds.values())
    info = machine()
    lines = [
        f"# Per-layer LiteRT latency, float32 vs int8: MobileNetV2 1.0, 224x224 ({args.tag})",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs. LiteRT (ai-edge-litert) with XNNPACK, {args.threads} "
        f"thread(s); each layer a one-op model, median of {args.runs} invokes after 10 warm-ups, one process.",
        "The sum of the parts is not the whole model's latency; the ratios show where int8 gains on this CPU.",
        "",
        "| op type | layers | float32 ms | int8 ms | int8 / float | share of the int8 sum |",
        "|---|---|---|---|---|---|",
    ]
    for name, k in kinds.items():
        lines.append(f"| {name} | {k['layers']} | {k['float_ms']:.3f} | {k['int8_ms']:.3f} | "
                     f"{k['int8_ms'] / k['float_ms']:.2f} | {100 * k['int8_ms'] / total_int8:.0f} % |")  # fmt: skip
    lines += [f"| **all** | {len(rows)} | {total_float:.3f} | {total_int8:.3f} | {total_int8 / total_float:.2f} | |"]
    depthwise = kinds["depthwise 3x3"]
    rest_float, rest_int8 = total_float - depthwise["float_ms"], total_int8 - depthwise["int8_ms"]
    lines += ["", f"The other op types together: int8/float {rest_int8 / rest_float:.2f}; the depthwise layers: "
              f"{depthwise['int8_ms'] / depthwise['float_ms']:.2f}, {100 * depthwise['int8_ms'] / total_int8:.0f} % "
              "of the int8 sum."]  # fmt: skip
    write_result(f"op_latency_{args.tag}", {"machine": info, "settings": vars(args), "rows": rows, "kinds": kinds},
                 "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
