"""Edge targets as data: one TOML file per target in ``targets/``, validated on load.

A target says which artifact ships, how the device runs it, what its input looks like, how it is
quantised, the parity thresholds it needs, and the limits the model must fit. Unknown keys are errors
that name the closest valid key; wrong types and out-of-range values are errors too. Anywhere a target
name is accepted, a path to a user's own ``.toml`` file works as well.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgetl.config import check_keys, data_dir
from edgetl.errors import ConfigError, first_line
from edgetl.rundir import ARTIFACTS

RUNTIMES = ("litert", "onnxruntime", "tflm")
DELEGATES = ("none", "xnnpack", "edgetpu", "ethos-u")
KINDS = ("cpu", "accelerator", "mcu")
COMPILERS = ("", "edgetpu_compiler", "vela")
ARTIFACT_PRECISION = {name: precision for name, (_, precision) in ARTIFACTS.items()}


@dataclass(frozen=True)
class InputSpec:
    size: int = 224  # square input side the model must have
    dtype: str = "uint8"  # "uint8" (raw pixels), "int8" or "float32"
    layout: str = "NHWC"  # "NHWC" (TFLite) or "NCHW" (ONNX)
    sizes: tuple[int, ...] = ()  # other sides the target takes as well (a CPU runs any): what `edgetl search` tries

    @property
    def accepted(self) -> tuple[int, ...]:
        """Every input side the target takes, smallest first."""
        return tuple(sorted({self.size, *self.sizes}))


@dataclass(frozen=True)
class QuantizationSpec:
    mode: str = "int8"  # "int8", "int16x8" or "float32"
    input_dtype: str = "uint8"
    output_dtype: str = "uint8"  # int8 models: "uint8" (one final QUANTIZE, what MediaPipe takes) or "int8"


@dataclass(frozen=True)
class ParitySpec:
    max_drop: float = 1.0  # top-1 points the shipped artifact may lose against float
    min_agreement: float = 0.98  # required top-1 agreement with float
    # the verdict package trusts must rest on at least this many images (or the whole validation split
    # when that is smaller): a check on two images says nothing about the model
    min_images: int = 100


@dataclass(frozen=True)
class Constraints:
    max_model_bytes: int | None = None  # flash for the shipped model file (the compiled one, if compiled)
    max_arena_bytes: int | None = None  # RAM for activations: the TFLM tensor arena or Vela's SRAM use
    static_shapes: bool = True
    batch: int = 1


@dataclass(frozen=True)
class CompileSpec:
    tool: str = ""  # "", "edgetpu_compiler" or "vela"
    args: tuple[str, ...] = ()
    allow_cpu_ops: bool = False  # any number of operations may fall back to the CPU
    max_cpu_ops: int = 0  # otherwise: how many may (more is exit 7)


@dataclass(frozen=True)
class LatencySpec:
    """How `edgetl search` estimates the board's latency from this host's when it cannot measure it there:
    board ms = host ms (one thread, LiteRT int8) x host_factor, within x/÷ uncertainty."""

    host_factor: float | None = None  # None: no estimate; measure over ssh (or --latency-on host)
    uncertainty: float = 2.0  # the estimate may be this many times too high or too low
    reference: str = ""  # where the factor comes from (a measurement, a published figure)


@dataclass(frozen=True)
class ModelSpec:
    width: float | None = None  # MobileNetV2 width this target needs (finetune --target uses it)


@dataclass(frozen=True)
class DeviceSpec:
    arch: str = ""
    python: str = ""
    requirements: tuple[str, ...] = ()  # pip requirements of the device runtime
    system: tuple[str, ...] = ()  # system packages (informational)
    emulate: str = ""  # the CPU qemu-user emulates for on-target checks ("cortex-a72"); "" = not emulated
    userland: str = ""  # the board's software for those checks ("debian-bookworm-arm64": Python 3.11)


SECTIONS = {
    "input": InputSpec,
    "quantization": QuantizationSpec,
    "parity": ParitySpec,
    "constraints": Constraints,
    "compile": CompileSpec,
    "model": ModelSpec,
    "device": DeviceSpec,
    "latency": LatencySpec,
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # "cpu", "accelerator" or "mcu"
    runtime: str  # "litert", "onnxruntime" or "tflm"
    delegate: str  # "none", "xnnpack", "edgetpu" or "ethos-u"
    artifact: str  # the file from the run that ships
    threads: int = 1
    input: InputSpec = field(default_factory=InputSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    parity: ParitySpec = field(default_factory=ParitySpec)
    constraints: Constraints = field(default_factory=Constraints)
    compile: CompileSpec = field(default_factory=CompileSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    device: DeviceSpec = field(default_factory=DeviceSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    source: str = ""  # the file it was read from (not a key)

    @property
    def precision(self) -> str:
        return ARTIFACT_PRECISION[self.artifact]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data


def _check_type(where: str, key: str, value: Any, expected: Any) -> Any:
    """Validate one TOML value against a dataclass field's annotation (a string under __future__)."""
    text = str(expected)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} must not be empty")
    if "tuple[int" in text:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of integers, got {value!r}")
        return tuple(value)
    if "tuple" in text:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
        return tuple(value)
    if text.startswith("bool"):
        ok = isinstance(value, bool)
    elif text.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif text.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = text.split(" ")[0].split("|")[0]
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    valid = {f.name for f in fields(cls)} - {"source"}
    check_keys(values, valid, where)
    types = {f.name: f.type for f in fields(cls)}
    built = {}
    for key, value in values.items():
        if key in SECTIONS and cls is Target:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            built[key] = _build(SECTIONS[key], value, f"{where} [{key}]")
        else:
            built[key] = _check_type(where, key, value, types[key])
    return cls(**built)


def _validate(target: Target, where: str) -> None:
    def bad(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    for name, value, allowed in (("kind", target.kind, KINDS), ("runtime", target.runtime, RUNTIMES),
                                 ("delegate", target.delegate, DELEGATES)):  # fmt: skip
        if value not in allowed:
            raise bad(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if target.artifact not in ARTIFACT_PRECISION:
        raise bad(f"artifact must be one of {', '.join(ARTIFACT_PRECISION)}, got {target.artifact!r}")
    if target.quantization.mode != target.precision:
        raise bad(f"quantization mode {target.quantization.mode!r} does not match artifact {target.artifact}")
    outputs = {"int8": ("uint8", "int8"), "int16x8": ("int16",), "float32": ("float32",)}[target.precision]
    if target.quantization.output_dtype not in outputs:
        raise bad(f"quantization output_dtype must be {' or '.join(outputs)} for {target.artifact}, "
                  f"got {target.quantization.output_dtype!r}")  # fmt: skip
    for size in target.input.accepted:
        if not 16 <= size <= 1024 or size % 8:
            raise bad(f"input size must be a multiple of 8 in 16..1024, got {size}")
    if target.latency.host_factor is not None and not target.latency.host_factor > 0:
        raise bad("latency.host_factor must be > 0")
    if not target.latency.uncertainty >= 1:
        raise bad("latency.uncertainty must be >= 1 (a factor: x/÷ this)")
    if target.input.layout not in ("NHWC", "NCHW"):
        raise bad(f"input layout must be NHWC or NCHW, got {target.input.layout!r}")
    if target.threads < 1:
        raise bad("threads must be >= 1")
    if target.parity.max_drop < 0 or not 0 <= target.parity.min_agreement <= 1:
        raise bad("parity needs max_drop >= 0 and 0 <= min_agreement <= 1")
    if target.parity.min_images < 1:
        raise bad("parity.min_images must be >= 1")
    for key in ("max_model_bytes", "max_arena_bytes"):
        value = getattr(target.constraints, key)
        if value is not None and value <= 0:
            raise bad(f"constraints.{key} must be > 0")
    if target.compile.tool not in COMPILERS:
        raise bad(f"compile tool must be one of {', '.join(repr(c) for c in COMPILERS)}, got {target.compile.tool!r}")
    if target.compile.max_cpu_ops < 0:
        raise bad("compile.max_cpu_ops must be >= 0")
    if bool(target.device.emulate) != bool(target.device.userland):
        raise bad("device.emulate and device.userland go together (the CPU and the software to run on it)")
    if target.model.width is not None and not 0.05 <= target.model.width <= 4:
        raise bad("model width must be within 0.05..4")


def target_files() -> list[Path]:
    return sorted(data_dir("targets").glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """Load a target by name (``targets/<name>.toml``) or by path to a ``.toml`` file.

    Raises:
        ConfigError: unknown target (with the closest names), bad TOML, unknown key, bad value.
    """
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = data_dir("targets") / f"{name_or_path}.toml"
    if not path.is_file():
        import difflib

        known = [p.stem for p in target_files()]
        close = difflib.get_close_matches(str(name_or_path), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known targets: {', '.join(known)}"
        raise ConfigError(f"unknown target {name_or_path!r}", hint=hint + " (or give a .toml path)")
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read target file {path}: {first_line(exc)}") from None
    where = f"target {path.name}"
    check_keys(values, {f.name for f in fields(Target)} - {"source"}, where)
    for required in ("name", "description", "kind", "runtime", "delegate", "artifact"):
        if required not in values:
            raise ConfigError(f"{where}: missing key {required!r}")
    target = _build(Target, values, where)
    _validate(target, where)
    return Target(**{**{f.name: getattr(target, f.name) for f in fields(Target)}, "source": str(path)})


def all_targets() -> list[Target]:
    return [load_target(str(path)) for path in target_files()]
