"""The device runtime: sources, the latest-frame camera reader, video, errors, bench, third-party models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED

from edgetl.runtime import app, bench
from edgetl.runtime.sources import LatestFrameReader, SourceError

CORAL = SHARED / "models" / "coral_mobilenet_v2"


def run_app(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = app.main(list(argv))
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    return code, rows, captured.err


# ----------------------------------------------------------------------------- camera reader


def test_latest_frame_reader_drops_stale_frames_instead_of_falling_behind():
    produced = {"n": 0}

    def read():
        time.sleep(0.002)
        produced["n"] += 1
        return True, np.full((4, 4, 3), produced["n"] % 256, np.uint8)

    reader = LatestFrameReader(read, "fake")
    try:
        first = reader.latest()
        time.sleep(0.1)  # a slow model: the camera keeps going meanwhile
        second = reader.latest()
    finally:
        reader.stop()
    assert int(second[0, 0, 0]) > int(first[0, 0, 0]) + 5  # the newest frame, not the next queued one
    assert reader.dropped >= 5


def test_camera_that_stops_delivering_is_a_clear_error():
    frames = iter([True, True])

    def read():
        return (next(frames, False), np.zeros((4, 4, 3), np.uint8))

    reader = LatestFrameReader(read, "usb0", failure_timeout=0.2)
    try:
        reader.latest()
        with pytest.raises(SourceError, match="unplugged"):
            for _ in range(3):
                reader.latest(timeout=2)
    finally:
        reader.stop()
    assert not any(t.name == "capture-usb0" and t.is_alive() for t in threading.enumerate())


def test_missing_camera_and_video_are_one_line_errors(bundle_dir, capsys):
    code, _, err = run_app(capsys, str(bundle_dir), "--camera", "57")
    assert code == 1 and "no camera at index 57" in err
    code, _, err = run_app(capsys, str(bundle_dir), "--video", "/no/such.mp4")
    assert code == 1 and "does not exist" in err
    code, _, err = run_app(capsys, str(bundle_dir))
    assert code == 2 and "nothing to classify" in err


# ----------------------------------------------------------------------------- with a bundle


@pytest.fixture(scope="module")
def bundle_dir(exported_run, tmp_path_factory):
    from edgetl.package.bundle import package
    from edgetl.targets import load_target

    _, run_dir = exported_run
    base = tmp_path_factory.mktemp("runtime")
    text = open(load_target("rpi4-cpu").source).read().replace("size = 224", "size = 64")
    text = text.replace("max_drop = 1.0", "max_drop = 10.0").replace("min_agreement = 0.98", "min_agreement = 0.85")
    (base / "t.toml").write_text(text)
    return package(run_dir, load_target(str(base / "t.toml")), base / "out").bundle_dir


@pytest.fixture(scope="module")
def video(exported_run, tmp_path_factory):
    import cv2

    from edgetl.rundir import read_manifest

    root = read_manifest(exported_run[1])["stages"]["finetune"]["data"]["root"]
    images = sorted(Path(root, "test").rglob("*.png"))[:12]
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (96, 72))
    for image in images:
        writer.write(cv2.resize(cv2.imread(str(image)), (96, 72)))
    writer.release()
    return path


def test_video_every_frame_classified_and_annotated_output_saved(bundle_dir, video, tmp_path, capsys):
    import cv2

    out = tmp_path / "annotated.mp4"
    code, rows, err = run_app(capsys, str(bundle_dir), "--video", str(video), "--json", "--save", str(out))
    assert code == 0, err
    assert len(rows) == 12 and rows[0]["source"] == "clip.mp4:0"
    assert all(r["latency_ms"] > 0 and r["fps"] > 0 and len(r["top"]) == 3 for r in rows)
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    summary = json.loads(err.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["frames"] == 12 and summary["skipped"] == 0


def test_unreadable_images_are_skipped_and_counted(bundle_dir, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (80, 60), (200, 10, 10)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    code, rows, err = run_app(capsys, str(bundle_dir), str(tmp_path), "--json")
    assert code == 0 and len(rows) == 1
    assert "skipping" in err and '"skipped": 1' in err
    (tmp_path / "good.png").unlink()
    code, rows, err = run_app(capsys, str(bundle_dir), str(tmp_path))
    assert code == 1 and "no frame could be classified" in err


def _png_bomb(path, side: int = 20_000) -> None:
    """A real 8-bit grey PNG of side x side pixels (400 Mpx: 400 MB decoded) in about 390 KB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" * (side + 1)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_an_image_above_the_training_pixel_limit_is_refused_before_decoding(bundle_dir, tmp_path, capsys):
    from PIL import Image

    from edgetl.runtime.imageheader import MAX_PIXELS
    from edgetl.runtime.preprocess import load_image

    _png_bomb(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 500_000
    with pytest.raises(ValueError, match=r"declares 20000x20000 pixels \(400 Mpx\), more than the 179 Mpx"):
        load_image(str(tmp_path / "bomb.png"))
    with pytest.raises(Image.DecompressionBombError):  # what training does with it
        Image.open(tmp_path / "bomb.png")
    assert 20_000**2 > MAX_PIXELS > 13_000**2
    Image.new("RGB", (80, 60), (200, 10, 10)).save(tmp_path / "good.png")
    code, rows, err = run_app(capsys, str(bundle_dir), str(tmp_path), "--json")
    assert code == 0 and [r["source"] for r in rows] == [str(tmp_path / "good.png")], err
    assert "declares 20000x20000 pixels" in err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
def test_image_headers_give_the_size_without_decoding(fmt):
    import io

    from PIL import Image

    from edgetl.runtime.imageheader import header_size

    out = io.BytesIO()
    Image.new("RGB", (123, 45), (1, 2, 3)).save(out, format=fmt)
    assert header_size(out.getvalue()) == (123, 45)
    assert header_size(out.getvalue()[:6]) is None  # cut short: left to OpenCV's own limit


def test_ctrl_c_ends_with_a_summary(bundle_dir, video, capsys, monkeypatch):
    real = app.Classifier.classify
    calls = {"n": 0}

    def interrupt_third(self, rgb, top_k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, rgb, top_k)

    monkeypatch.setattr(app.Classifier, "classify", interrupt_third)
    code, rows, err = run_app(capsys, str(bundle_dir), "--video", str(video), "--json")
    assert code == 130 and len(rows) == 2
    assert "interrupted" in err and '"frames": 2' in err


def test_runtime_agrees_with_the_parity_check(bundle_dir, exported_run, capsys):
    """The device path (OpenCV decode, shared preprocessing, LiteRT) reproduces edgetl check's int8 top-1."""
    from edgetl.data.folders import discover
    from edgetl.rundir import read_manifest

    _, run_dir = exported_run
    stage = read_manifest(run_dir)["stages"]["finetune"]
    val = discover(stage["data"]["root"], stage["config"]["val_fraction"], stage["config"]["seed"]).val
    code, rows, _ = run_app(capsys, str(bundle_dir), *[str(s.path) for s in val], "--json", "--top-k", "1")
    assert code == 0 and len(rows) == len(val)
    labels = stage["labels"]
    correct = np.mean([r["top"][0]["label"] == labels[s.label] for r, s in zip(rows, val, strict=True)])
    parity = json.loads((run_dir / "parity.json").read_text())["artifacts"]["model_int8.tflite"]
    assert correct == pytest.approx(parity["top1"])


def test_bench_reports_invoke_and_frame_latency_per_thread_count(bundle_dir, capsys):
    code = app.main(["bench", str(bundle_dir), "--threads", "1,2", "--runs", "5", "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 0 and [r["threads"] for r in result["results"]] == [1, 2] and result["interleaved"]
    for row in result["results"]:
        assert 0 < row["invoke_ms_median"] <= row["frame_ms_median"]
        assert row["invoke_ms_p90"] >= row["invoke_ms_median"]
    load = result["host_load"]
    assert load["seconds"] > 0 and load["cores"] >= 1 and isinstance(load["busy"], bool)
    assert (result["warning"] is not None) == ("warning: host busy" in captured.err)


def test_bench_times_several_bundles_together(bundle_dir, tmp_path, capsys):
    other = tmp_path / "copy"
    shutil.copytree(bundle_dir, other)
    code = app.main(["bench", str(bundle_dir), str(other), "--threads", "1,2", "--runs", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["models"] == [str(bundle_dir), str(other)]
    assert [(r["model"], r["threads"]) for r in result["results"]] == [
        (str(bundle_dir), 1), (str(bundle_dir), 2), (str(other), 1), (str(other), 2)]
    code = app.main(["bench", str(bundle_dir), str(other), "--threads", "1", "--runs", "2"])
    table = capsys.readouterr().out
    assert code == 0 and table.count(str(other)) == 1 and table.splitlines()[0].startswith("model")


def test_interleaved_timing_runs_every_call_once_per_round_in_a_rotating_order():
    seen = []
    calls = {name: (lambda name=name: seen.append(name)) for name in "abc"}
    stats = bench.interleaved_latency(calls, runs=3, warmup=1)
    assert "".join(seen) == "abc" + "abc" + "bca" + "cab"
    assert all(s["runs"] == 3 and len(s["samples"]) == 3 for s in stats.values())
    assert "samples" not in bench.call_latency(lambda: None, runs=2, warmup=0)


def test_the_paired_ratio_and_the_spread_warning():
    base, fast = {"samples": [2.0, 40.0, 6.0], "median_ms": 6.0}, {"samples": [1.0, 20.0, 3.0], "median_ms": 3.0}
    assert bench.paired_ratio(base, fast) == 2.0  # the loaded round slowed both alike
    assert bench.paired_ratio({"median_ms": 6.0}, {"median_ms": 2.0}) == 3.0
    assert bench.spread_warning({"x": {"median_ms": 1.0, "p90_ms": 1.2}}) is None
    assert bench.spread_warning({"x": {"median_ms": 1.0, "p90_ms": 2.0}}) == "p90 2.0x the median (x)"


def test_host_load_counts_other_processes_not_this_one():
    spin_until = time.monotonic() + 0.5
    with bench.HostLoad() as own:
        while time.monotonic() < spin_until:  # this process's own work is not load
            pass
    assert own.other_cores is not None and own.other_cores < 0.5
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with bench.HostLoad() as loaded:
            time.sleep(1.0)
    finally:
        burner.kill()
        burner.wait()
    assert loaded.other_cores > 0.5 and loaded.busy and "other processes used" in loaded.reason
    assert "host busy: other processes used" in bench.timing_warning(loaded, {})


def _labelled_val_folder(run_dir, dest):
    """The run's validation images as DEST/<label>/<file> (the layout bench --data reads)."""
    from edgetl.data.folders import discover
    from edgetl.rundir import read_manifest

    stage = read_manifest(run_dir)["stages"]["finetune"]
    val = discover(stage["data"]["root"], stage["config"]["val_fraction"], stage["config"]["seed"]).val
    for sample in val:
        folder = dest / stage["labels"][sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / sample.path.name).symlink_to(sample.path)
    return dest, len(val)


def test_bench_measures_accuracy_on_a_labelled_folder(bundle_dir, exported_run, tmp_path, capsys):
    _, run_dir = exported_run
    data, count = _labelled_val_folder(run_dir, tmp_path / "val")
    code = app.main(["bench", str(bundle_dir), "--threads", "1", "--runs", "2", "--data", str(data), "--json"])
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    parity = json.loads((run_dir / "parity.json").read_text())["artifacts"]["model_int8.tflite"]
    assert code == 0 and accuracy["images"] == count and accuracy["skipped"] == 0
    assert accuracy["top1"] == pytest.approx(parity["top1"])
    (data / "zebra").mkdir()
    code = app.main(["bench", str(bundle_dir), "--threads", "1", "--runs", "2", "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 1 and "folders that are not labels of the model: zebra" in err


# ----------------------------------------------------------------------------- third-party model


@pytest.mark.skipif(not CORAL.is_dir(), reason=f"needs the Coral reference model in {CORAL}")
def test_third_party_coral_model_labels_the_parrot_a_macaw(capsys):
    model = str(CORAL / "mobilenet_v2_1.0_224_quant.tflite")
    code, rows, err = run_app(capsys, model, "--labels", str(CORAL / "imagenet_labels.txt"),
                              str(CORAL / "parrot.jpg"), "--background", "--json")  # fmt: skip
    assert code == 0, err
    assert rows[0]["top"][0]["label"] == "macaw" and rows[0]["top"][0]["score"] > 0.9
    assert all(t["label"] != "background" for t in rows[0]["top"])


def test_plain_model_without_labels_is_a_usage_error(tmp_path, capsys):
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"\0" * 16)
    code, _, err = run_app(capsys, str(fake), "x.jpg")
    assert code == 2 and "--labels" in err


@pytest.mark.slow
def test_a_fresh_device_venv_with_only_the_bundle_requirements_runs_it(bundle_dir, video, exported_run, tmp_path):
    """What a Pi does: a new virtualenv, `pip install -r requirements-device.txt`, nothing else."""
    import os
    import subprocess
    import sys

    from edgetl.rundir import read_manifest

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGETL_NETGUARD_LOG")}
    pip = subprocess.run([python, "-m", "pip", "install", "-qq", "--disable-pip-version-check", "-r",
                          str(bundle_dir / "requirements-device.txt")],
                         capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    if pip.returncode != 0:
        pytest.skip(f"cannot install the device requirements from the package index here: {pip.stderr[-300:]}")
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               env=env).stdout.lower()  # fmt: skip
    assert "torch" not in installed and "tensorflow" not in installed and "edgetl" not in installed
    root = read_manifest(exported_run[1])["stages"]["finetune"]["data"]["root"]
    for source in ([f"{root}/test/circle", f"{root}/test/square"], ["--video", str(video)]):
        proc = subprocess.run([python, "-m", "edgetl_runtime", ".", *source, "--json"], cwd=bundle_dir,
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-1000:]
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(rows) == (20 if source[0] != "--video" else 12)
        assert all(len(r["top"]) == 3 for r in rows)


class FakeCapture:
    """Stands in for cv2.VideoCapture of a USB camera (no camera exists on the test machine)."""

    def __init__(self, index):
        self.index, self.count = index, 0

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return self.index == 0

    def set(self, prop, value):
        return True

    def read(self):
        time.sleep(0.005)
        self.count += 1
        return True, np.full((48, 64, 3), (self.count * 7) % 256, np.uint8)

    def release(self):
        pass


def test_live_camera_path_with_overlay_window(bundle_dir, capsys, monkeypatch):
    import cv2

    shown = []
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    monkeypatch.setattr(cv2, "imshow", lambda name, image: shown.append(image.shape))
    monkeypatch.setattr(cv2, "waitKey", lambda delay: -1)
    code, rows, err = run_app(capsys, str(bundle_dir), "--camera", "0", "--max-frames", "4", "--show", "--json")
    assert code == 0, err
    assert [r["source"] for r in rows] == [f"camera0:{i}" for i in range(4)]
    assert shown == [(48, 64, 3)] * 4  # the annotated frame, at camera resolution
    summary = json.loads(err.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["frames"] == 4 and "dropped_camera_frames" in summary
    code, _, err = run_app(capsys, str(bundle_dir), "--camera", "1")
    assert code == 1 and "no camera at index 1" in err
