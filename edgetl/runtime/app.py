"""The device application: classify images, videos or a live camera with a bundle or a plain model.

    python3 -m edgetl_runtime BUNDLE photo.jpg folder/ [--json]
    python3 -m edgetl_runtime BUNDLE --camera 0 [--show] [--save out.mp4]
    python3 -m edgetl_runtime BUNDLE --video clip.mp4
    python3 -m edgetl_runtime model.tflite --labels labels.txt photo.jpg      # third-party model
    python3 -m edgetl_runtime bench BUNDLE [MORE ...] [--threads 1,2,4] [--runs 50] [--data LABELLED_FOLDER]
    python3 -m edgetl_runtime scores BUNDLE --list images.txt [--inputs crops.npy]   # raw scores, for parity

Exit codes: 0 ok, 1 error, 2 usage, 6 bundle failed verification, 130 interrupted (with a summary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .bundle import BundleError
from .classifier import (  # noqa: F401 (re-exported: the commands' shared pieces)
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY,
    Classifier,
    RuntimeFailure,
    UsageError,
    load_classifier,
    max_threads,
    positive_int,
    thread_count,
    too_many_threads,
)
from .scores import add_arguments as add_score_arguments
from .scores import main_scores
from .sources import SourceError, camera_frames, image_frames, video_frames


@dataclass
class Stats:
    frames: int = 0
    skipped: int = 0
    invoke_ms: list[float] = field(default_factory=list)
    frame_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def summary(self, dropped: int = 0) -> dict:
        elapsed = time.perf_counter() - self.started
        fps = round(self.frames / elapsed, 2) if elapsed > 0 else 0.0
        out = {"frames": self.frames, "skipped": self.skipped, "dropped_camera_frames": dropped,
               "seconds": round(elapsed, 3), "fps": fps}  # fmt: skip
        if self.invoke_ms:
            out["invoke_ms_median"] = round(statistics.median(self.invoke_ms), 3)
            out["frame_ms_median"] = round(statistics.median(self.frame_ms), 3)
        return out


def draw_overlay(bgr: np.ndarray, top: list[dict], fps: float, latency_ms: float) -> np.ndarray:
    import cv2

    out = bgr.copy()
    lines = [f"{t['label']} {t['score']:.2f}" for t in top] + [f"{fps:.1f} FPS  {latency_ms:.1f} ms"]
    for i, text in enumerate(lines):
        y = 28 + 26 * i
        cv2.putText(out, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(out, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    return out


class _Output:
    """The annotated frames: written to a video file (``--save``) and/or shown in a window (``--show``)."""

    def __init__(self, save: str | None, show: bool):
        self.save, self.display, self.writer = save, show, None

    def show(self, rgb: np.ndarray, top: list[dict], fps: float, frame_ms: float) -> bool:
        """Annotate and emit one frame; False when the user closed the window (q or Esc)."""
        import cv2

        annotated = draw_overlay(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), top, fps, frame_ms)
        if self.save:
            if self.writer is None:
                height, width = annotated.shape[:2]
                self.writer = cv2.VideoWriter(self.save, cv2.VideoWriter_fourcc(*"mp4v"), 15.0, (width, height))
                if not self.writer.isOpened():
                    raise RuntimeFailure(f"cannot write video {self.save}")
            self.writer.write(annotated)
        if self.display:
            cv2.imshow("edgetl", annotated)
            return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def run(args: argparse.Namespace) -> int:
    classifier = load_classifier(args.model, args.threads, args.labels, args.background,
                                 args.crop_fraction, args.pixel_range)  # fmt: skip
    reader = None
    if args.camera is not None:
        frames, reader = camera_frames(args.camera, max_frames=args.max_frames, picamera2=args.picamera2)
    elif args.video:
        frames = video_frames(args.video)
    elif args.sources:
        frames = image_frames(args.sources)
    else:
        raise RuntimeFailure("nothing to classify: give images or folders, --video FILE or --camera N", EXIT_USAGE)

    stats, output = Stats(), _Output(args.save, args.show)
    try:
        for frame in frames:
            if frame.rgb is None:
                print(f"edgetl-runtime: warning: skipping {frame.name}: {frame.error}", file=sys.stderr)
                stats.skipped += 1
                continue
            start = time.perf_counter()
            top, timings = classifier.classify(frame.rgb, args.top_k)
            frame_ms = (time.perf_counter() - start) * 1e3
            stats.frames += 1
            stats.invoke_ms.append(timings["invoke_ms"])
            stats.frame_ms.append(frame_ms)
            fps = stats.frames / max(time.perf_counter() - stats.started, 1e-9)
            record = {"source": frame.name, "top": top, "latency_ms": round(frame_ms, 3),
                      "invoke_ms": round(timings["invoke_ms"], 3), "fps": round(fps, 2)}  # fmt: skip
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                ranked = ", ".join(f"{t['label']} {t['score']:.3f}" for t in top)
                print(f"{frame.name}: {ranked}  ({frame_ms:.1f} ms, {fps:.1f} FPS)", flush=True)
            if (args.show or args.save) and not output.show(frame.rgb, top, fps, frame_ms):
                break
    except KeyboardInterrupt:
        summary = stats.summary(reader.dropped if reader else 0)
        print(f"edgetl-runtime: interrupted; {json.dumps(summary)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        output.close()
    summary = stats.summary(reader.dropped if reader else 0)
    print(f"edgetl-runtime: {json.dumps(summary)}", file=sys.stderr)
    if stats.frames == 0:
        raise RuntimeFailure(f"no frame could be classified ({stats.skipped} skipped)")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits; one line and our exit code instead
        raise UsageError(f"{message} (see --help)")


def parser(prog: str = "edgetl-runtime") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Classify with an edgetl bundle or a .tflite model.")
    p.add_argument("model", help="bundle folder, or a .tflite/.onnx file with --labels")
    p.add_argument("sources", nargs="*", help="image files or folders (bench: more bundles or models)")
    p.add_argument("--camera", type=int, default=None, help="camera index (V4L2 on a Pi)")
    p.add_argument("--picamera2", action="store_true", help="read the camera with Picamera2")
    p.add_argument("--video", default=None, help="video file")
    p.add_argument("--max-frames", type=_count, default=None, help="stop after this many camera frames")
    p.add_argument("--labels", default=None, help="labels file for a plain model")
    p.add_argument("--background", action="store_true", help="index 0 is a background class: never report it")
    p.add_argument("--crop-fraction", type=float, default=1.0, help="plain models: centre-crop fraction [1.0]")
    p.add_argument("--pixel-range", default="0,255", help="plain float models: input range, e.g. -1,1 [0,255]")
    p.add_argument("--top-k", type=_count, default=3)
    p.add_argument("--threads", default=None, help="interpreter threads; bench: a list like 1,2,4")
    p.add_argument("--runs", type=_count, default=50, help="bench: timed runs per thread count")
    p.add_argument("--data", default=None, help="bench: also top-1 on a labelled folder DATA/<label>/<images>")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (bench: one object)")
    p.add_argument("--show", action="store_true", help="show an annotated window (q quits)")
    p.add_argument("--save", default=None, help="write the annotated frames to this video file")
    add_score_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "edgetl-runtime") -> int:
    """Run the application; every failure is one ``PROG: error:`` line on stderr and an exit code
    (with ``--json`` also ``{"ok": false, "error": {...}}`` on stdout)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("bench", "scores") else None
    wants_json = "--json" in argv
    try:
        args = parser(prog).parse_intermixed_args(argv[1:] if command else argv)
        if command == "bench":
            from .bench_command import bench

            return bench(args)
        if command == "scores":
            return main_scores(args)
        if args.threads is not None:
            args.threads = thread_count(args.threads, "--threads")
        return run(args)
    except UsageError as exc:
        return _fail(prog, str(exc), EXIT_USAGE, wants_json)
    except (RuntimeFailure, SourceError) as exc:
        return _fail(prog, str(exc), getattr(exc, "code", EXIT_ERROR), wants_json)
    except BundleError as exc:
        return _fail(prog, str(exc), EXIT_VERIFY if "verification" in str(exc) else EXIT_ERROR, wants_json)
    except ValueError as exc:  # e.g. a model file the interpreter cannot read (ModelFileError)
        return _fail(prog, str(exc), EXIT_ERROR, wants_json)
    except OSError as exc:  # an unreadable labels file, a full disk under --save
        return _fail(prog, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_ERROR, wants_json)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(prog: str, message: str, code: int, wants_json: bool) -> int:
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    if wants_json:
        print(json.dumps({"ok": False, "error": {"message": message, "exit_code": code}}), flush=True)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _count(value: str) -> int:
    """argparse type: a positive integer."""
    try:
        return positive_int(value, "the value")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
