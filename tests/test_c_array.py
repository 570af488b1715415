"""The model as C source: compiles with the system C compiler and holds the model byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.package.c_source import c_sources
from edgetl.rundir import read_manifest
from edgetl.targets import load_target

MAIN_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "edgetl_model_data.h"

int main(void) {
  if (edgetl_model_data_len != EDGETL_MODEL_DATA_LEN) return 2;
  if (((uintptr_t)edgetl_model_data) % 16 != 0) return 3;
  if (memcmp(edgetl_model_data + 4, "TFL3", 4) != 0) return 4;  /* the flatbuffer file identifier */
  FILE* f = fopen("copy.tflite", "wb");
  fwrite(edgetl_model_data, 1, edgetl_model_data_len, f);
  fclose(f);
  printf("%d %d %d %d %s %d\n", EDGETL_MODEL_INPUT_HEIGHT, EDGETL_MODEL_INPUT_WIDTH,
         EDGETL_MODEL_INPUT_CHANNELS, EDGETL_MODEL_NUM_CLASSES, edgetl_model_labels[0],
         EDGETL_MODEL_INPUT_TYPE_UINT8);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no system C compiler (cc)")
def test_c_array_compiles_and_round_trips_the_model(exported_run, tmp_path):
    _, run_dir = exported_run
    model = (run_dir / "model_int8.tflite").read_bytes()
    io = read_manifest(run_dir)["stages"]["export"]["artifacts"]["model_int8.tflite"]
    labels = (run_dir / "labels.txt").read_text().splitlines()
    header, source = c_sources(model, io, ['quote"d', *labels[1:]])
    (tmp_path / "edgetl_model_data.h").write_text(header)
    (tmp_path / "edgetl_model_data.c").write_text(source)
    (tmp_path / "main.c").write_text(MAIN_C)
    build = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "-o", "check", "main.c", "edgetl_model_data.c"],
                           cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run(["./check"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.returncode
    side = io["input"]["shape"][1]
    assert run.stdout.split() == [str(side), str(side), "3", str(len(labels)), 'quote"d', "1"]
    assert (tmp_path / "copy.tflite").read_bytes() == model


def test_bad_identifier_is_refused():
    with pytest.raises(ValueError, match="C identifier"):
        c_sources(b"", {"input": {}, "output": {}}, [], name="1model")


def test_mcu_bundle_ships_the_c_array(exported_run, tmp_path):
    _, run_dir = exported_run
    side = read_manifest(run_dir)["stages"]["export"]["artifacts"]["model_int8.tflite"]["input"]["shape"][1]
    target = tmp_path / "mcu.toml"
    text = open(load_target("mcu-tflm").source).read().replace("size = 96", f"size = {side}")
    target.write_text(text.replace("max_model_bytes = 1_000_000", "max_model_bytes = 100_000_000"))
    result = CliRunner().invoke(main, ["-q", "package", str(run_dir), "--target", str(target),
                                       "--out", str(tmp_path / "b"), "--force", "--json", "--no-tflm"])  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout)["bundle_dir"]
    files = json.loads(open(f"{bundle}/manifest.json").read())["files"]
    assert {"edgetl_model_data.c", "edgetl_model_data.h", "model_int8.tflite"} <= set(files)
