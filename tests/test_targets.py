"""Targets as data: every shipped file loads; bad files are clear errors with suggestions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.errors import ConfigError
from edgetl.targets import all_targets, load_target, target_files

REQUIRED = {"rpi4-cpu", "rpi5-cpu", "x86-onnx", "coral-edgetpu", "ethos-u55", "ethos-u55-256", "ethos-u65-256",
            "ethos-u85-256", "mcu-tflm"}


def test_every_target_file_loads_and_the_required_ones_exist():
    targets = {t.name: t for t in all_targets()}
    assert REQUIRED <= set(targets)
    assert len(targets) == len(target_files())  # names are unique, one per file
    for path in target_files():
        assert load_target(path.stem).name == path.stem  # file stem and name agree
    assert targets["rpi4-cpu"].artifact == "model_int8.tflite" and targets["rpi4-cpu"].input.dtype == "uint8"
    assert targets["x86-onnx"].precision == "float32"
    assert targets["mcu-tflm"].model.width == 0.35 and targets["mcu-tflm"].input.size == 96
    for name, accelerator in (("ethos-u55", "ethos-u55-128"), ("ethos-u55-256", "ethos-u55-256"),
                              ("ethos-u65-256", "ethos-u65-256"), ("ethos-u85-256", "ethos-u85-256")):  # fmt: skip
        spec = targets[name].compile
        assert spec.tool == "vela" and spec.args[spec.args.index("--accelerator-config") + 1] == accelerator
        assert spec.max_cpu_ops == 0 and targets[name].constraints.max_arena_bytes


def load_target_text(name: str) -> str:
    return open(load_target(name).source).read()


@pytest.mark.parametrize(
    "replace, message, hint",
    [
        (('runtime = "litert"', 'runtme = "litert"'), "unknown key 'runtme'", "did you mean 'runtime'?"),
        (("max_drop = 1.0", "max_dorp = 1.0"), "unknown key 'max_dorp'", "did you mean 'max_drop'?"),
        (("threads = 4", 'threads = "four"'), "threads must be int", None),
        (('runtime = "litert"', 'runtime = "tpu"'), "runtime must be one of", None),
        (("size = 224", "size = 100"), "multiple of 8", None),
        (("min_agreement = 0.98", "min_agreement = 1.5"), "min_agreement", None),
        (('mode = "int8"', 'mode = "float32"'), "does not match artifact", None),
        (("[device]", '[compile]\ntool = "velaa"\n\n[device]'), "compile tool must be one of", None),
        (("[device]", "[compile]\nmax_cpu_ops = -1\n\n[device]"), "max_cpu_ops must be >= 0", None),
        (('[input]\nsize = 224\nsizes = [96, 128, 160, 192, 224]   # any side runs on a CPU: what `edgetl search` '
          'tries\ndtype = "uint8"\nlayout = "NHWC"\n', ""), None, None),
    ],
)
def test_bad_target_files_are_clear_errors(tmp_path, replace, message, hint):
    path = tmp_path / "custom.toml"
    text = load_target_text("rpi4-cpu")
    assert replace[0] in text
    text = text.replace(*replace, 1)
    if message is None:  # the [input] table replaced by a plain value
        text, message = text.replace("threads = 4", "threads = 4\ninput = 3"), "must be a table"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_target(str(path))
    assert message in info.value.message
    if hint:
        assert info.value.hint == hint


def test_unknown_target_name_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        load_target("rpi4")
    assert "did you mean 'rpi4-cpu'?" in info.value.hint


def test_targets_command_text_and_json():
    listing = CliRunner().invoke(main, ["targets"])
    assert listing.exit_code == 0 and "rpi4-cpu" in listing.stdout and "onnxruntime" in listing.stdout
    payload = json.loads(CliRunner().invoke(main, ["targets", "--json"]).stdout)
    assert REQUIRED <= {t["name"] for t in payload["targets"]}
    shown = json.loads(CliRunner().invoke(main, ["targets", "show", "coral-edgetpu", "--json"]).stdout)
    assert shown["compile"]["tool"] == "edgetpu_compiler" and shown["constraints"]["batch"] == 1
    bad = CliRunner().invoke(main, ["targets", "show", "nope"])
    assert bad.exit_code == 2 and "unknown target 'nope'" in bad.stderr


def test_stamp_parts_separate_training_from_export_settings():
    def stamp(stage):
        result = CliRunner().invoke(main, ["targets", "stamp", "rpi4-cpu", stage])
        return json.loads(result.stdout)

    assert set(stamp("finetune")) == {"input", "model"}
    assert {"parity", "quantization", "artifact"} <= set(stamp("export"))
